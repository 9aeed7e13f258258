//! What the seeder asks of nodes and of object storage: the node-internal seeding calls
//! (through `registry_client`'s client, which owns their paths, secret and deadlines) and the
//! list of repositories a shard key holds in object storage.

use std::collections::BTreeMap;
use std::num::NonZeroUsize;

use flotilla_core::{layout, RepoName, ShardKey};
use flotilla_objstore::Remote;
use registry_client::internal::{self, NodeStatus, SeedStats};
use shardmap::NodeRecord;

use crate::SeederError;

/// The internal client, speaking of nodes as the seeder knows them (their records).
#[derive(Clone, Debug)]
pub struct NodeClient(internal::NodeClient);

impl NodeClient {
    /// `ca`: extra roots (PEM) for nodes serving TLS under a private CA.
    pub fn new(secret: Option<String>, ca: Option<&std::path::Path>) -> Result<Self, SeederError> {
        internal::NodeClient::with_ca(secret, ca)
            .map(NodeClient)
            .map_err(|source| SeederError::Node {
                node: String::new(),
                source,
            })
    }

    fn fail(node: &NodeRecord) -> impl FnOnce(internal::ClientError) -> SeederError + '_ {
        |source| SeederError::Node {
            node: node.id.to_string(),
            source,
        }
    }

    pub async fn status(&self, node: &NodeRecord) -> Result<NodeStatus, SeederError> {
        self.0.status(&node.url).await.map_err(Self::fail(node))
    }

    /// Make `node` copy `repo` from object storage (verified; idempotent).
    pub async fn seed(
        &self,
        node: &NodeRecord,
        repo: &RepoName,
        verify: bool,
    ) -> Result<SeedStats, SeederError> {
        self.0
            .seed(&node.url, repo, verify)
            .await
            .map_err(Self::fail(node))
    }

    /// Tell `node` its disk is complete; it reports ready from its next (immediate) heartbeat.
    pub async fn seeded(&self, node: &NodeRecord) -> Result<(), SeederError> {
        self.0
            .seeded(&node.url)
            .await
            .map(|_| ())
            .map_err(Self::fail(node))
    }
}

/// The repositories of `key` in object storage, each with its number of objects (tags,
/// manifest links, blob links). Lists `repos/<key>/` and keeps the names whose shard key is
/// `key` (a one-component key's prefix also holds deeper keys' repositories).
pub async fn shard_repos(
    remote: &Remote,
    key: &ShardKey,
    depth: NonZeroUsize,
) -> Result<BTreeMap<RepoName, u64>, SeederError> {
    let mut out = BTreeMap::new();
    for k in remote.list_keys(&layout::remote_shard_dir(key)).await? {
        if let Some(repo) = layout::repo_of_remote_key(&k) {
            if &repo.shard_key(depth) == key {
                *out.entry(repo).or_insert(0) += 1;
            }
        }
    }
    Ok(out)
}
