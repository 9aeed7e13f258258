//! What the seeder asks of nodes and of object storage: the node-internal seeding calls
//! (`/internal/v1/{status,seed,seeded}`, authenticated with the shared secret) and the list of
//! repositories a shard key holds in object storage.

use std::collections::BTreeMap;
use std::num::NonZeroUsize;
use std::time::Duration;

use flotilla_core::{layout, RepoName, ShardKey};
use registry_node::http::internal::SECRET_HEADER;
use registry_node::remote::Remote;
use registry_node::seed::SeedStats;
use shardmap::NodeRecord;

use crate::SeederError;

/// One seeding call copies a whole repository; large ones take minutes.
const SEED_TIMEOUT: Duration = Duration::from_secs(30 * 60);

#[derive(Clone, Debug)]
pub struct NodeClient {
    http: reqwest::Client,
    secret: Option<String>,
}

/// What `GET /internal/v1/status` tells the seeder.
#[derive(Debug, serde::Deserialize)]
pub struct NodeStatus {
    #[serde(default)]
    pub needs_seed: bool,
    #[serde(default)]
    pub seed_id: String,
}

impl NodeClient {
    pub fn new(secret: Option<String>) -> Result<Self, SeederError> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(2))
            .build()
            .map_err(|e| SeederError::Node {
                node: String::new(),
                detail: e.to_string(),
            })?;
        Ok(NodeClient { http, secret })
    }

    fn post(&self, node: &NodeRecord, path: &str) -> reqwest::RequestBuilder {
        let mut b = self.http.post(format!(
            "{}/internal/v1/{path}",
            node.url.trim_end_matches('/')
        ));
        if let Some(s) = &self.secret {
            b = b.header(SECRET_HEADER, s);
        }
        b
    }

    fn fail(node: &NodeRecord, detail: impl std::fmt::Display) -> SeederError {
        SeederError::Node {
            node: node.id.to_string(),
            detail: detail.to_string(),
        }
    }

    async fn json<T: serde::de::DeserializeOwned>(
        node: &NodeRecord,
        r: Result<reqwest::Response, reqwest::Error>,
    ) -> Result<T, SeederError> {
        let r = r.map_err(|e| Self::fail(node, e))?;
        let status = r.status();
        if !status.is_success() {
            let body = r.text().await.unwrap_or_default();
            return Err(Self::fail(node, format!("{status}: {body}")));
        }
        r.json().await.map_err(|e| Self::fail(node, e))
    }

    pub async fn status(&self, node: &NodeRecord) -> Result<NodeStatus, SeederError> {
        let mut b = self.http.get(format!(
            "{}/internal/v1/status",
            node.url.trim_end_matches('/')
        ));
        if let Some(s) = &self.secret {
            b = b.header(SECRET_HEADER, s);
        }
        Self::json(node, b.timeout(Duration::from_secs(5)).send().await).await
    }

    /// Make `node` copy `repo` from object storage (verified; idempotent).
    pub async fn seed(
        &self,
        node: &NodeRecord,
        repo: &RepoName,
        verify: bool,
    ) -> Result<SeedStats, SeederError> {
        let r = self
            .post(node, "seed")
            .json(&serde_json::json!({ "repo": repo, "verify": verify }))
            .timeout(SEED_TIMEOUT)
            .send()
            .await;
        Self::json(node, r).await
    }

    /// Tell `node` its disk is complete; it reports ready from its next (immediate) heartbeat.
    pub async fn seeded(&self, node: &NodeRecord) -> Result<(), SeederError> {
        let r = self
            .post(node, "seeded")
            .timeout(Duration::from_secs(10))
            .send()
            .await;
        Self::json::<serde_json::Value>(node, r).await.map(|_| ())
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
    for k in remote
        .list_keys(&format!("{}{}/", layout::remote_repos_root(), key))
        .await?
    {
        if let Some(repo) = layout::repo_of_remote_key(&k) {
            if &repo.shard_key(depth) == key {
                *out.entry(repo).or_insert(0) += 1;
            }
        }
    }
    Ok(out)
}
