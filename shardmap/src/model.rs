//! The shard-map data model: versioned node and shard records and the key layout under the
//! store prefix. Every record is written with `"v": 1` so a newer writer can add fields and an
//! older reader can refuse what it does not understand instead of silently overwriting it.

use flotilla_core::{NodeId, RackId, ShardKey};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// The record format this build writes and the newest it can read.
pub const RECORD_VERSION: u64 = 1;

/// Why a stored value could not be turned into a record. Callers branch on this: a future
/// version means "upgrade me", a corrupt record means "an operator must look".
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("record at {key:?} is corrupt: {source}")]
    Corrupt {
        key: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("record at {key:?} has no \"v\" version field")]
    MissingVersion { key: String },
    #[error(
        "record at {key:?} has format version {found}, this build understands up to {supported}"
    )]
    FutureVersion {
        key: String,
        found: u64,
        supported: u64,
    },
}

/// A node's lifecycle state. Only `Ready` nodes receive new keys; `Joining`/`Seeding` nodes are
/// being filled, `Draining` ones are leaving, `Down` ones missed their heartbeats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeState {
    Joining,
    Seeding,
    Ready,
    Draining,
    Down,
}

/// A registry node as registered in `nodes/<id>`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub id: NodeId,
    /// Base URL of the node's internal API, e.g. `http://10.0.0.5:5001`.
    pub url: String,
    pub rack: RackId,
    pub state: NodeState,
    /// Milliseconds since the Unix epoch of the node's last heartbeat.
    pub heartbeat_ms: u64,
    /// Relative capacity; load is compared as keys held divided by weight. 0 = take no new keys.
    pub weight: u32,
    /// Whether the node reached its object store at its last heartbeat. Routers prefer nodes
    /// that do: only they can acknowledge a write or read through a miss.
    #[serde(default = "yes")]
    pub store_ok: bool,
    /// Whether the node accepts new data (false when its disk is nearly full). Such a node
    /// receives no new keys; reads keep working.
    #[serde(default = "yes")]
    pub writable: bool,
}

fn yes() -> bool {
    true
}

/// The placement of one shard key, stored in `shards/<key>`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardRecord {
    pub key: ShardKey,
    /// Ready replicas, most preferred first.
    pub replicas: Vec<NodeId>,
    /// Nodes being seeded to become replicas (the first half of a move).
    #[serde(default)]
    pub joining: Vec<NodeId>,
    /// Replicas that missed an acknowledged manifest or tag write (they failed, refused or
    /// did not answer it in time). No router reads from them for this key until they have
    /// caught up from object storage (through `syncing`). Every other replica is in sync: it
    /// took every write acknowledged since it was last listed here. Absent from the stored
    /// JSON when empty,
    /// so records written before in-sync tracking read back unchanged.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lagging: Vec<NodeId>,
    /// Lagging replicas catching up: routers send them every write (as to joining nodes) but
    /// read from them only once they have left this list. A write one of them misses puts it
    /// back in `lagging`. The two steps make a rejoin finish under any write load: writes
    /// committed before a replica entered `syncing` are in object storage for its catch-up,
    /// later ones reach it directly.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub syncing: Vec<NodeId>,
    /// Bumped on every change so caches can tell which of two records is newer, and by
    /// routers after every manifest or tag write in the shard (it invalidates their
    /// manifest caches).
    pub epoch: u64,
    /// Operator override: placement planning never moves a pinned shard.
    #[serde(default)]
    pub pinned: bool,
    /// Set when fewer racks than RF had healthy nodes at placement time.
    #[serde(default)]
    pub rack_relaxed: bool,
    pub created_ms: u64,
}

/// A record type that lives in the store as versioned JSON.
pub trait Record: Serialize + DeserializeOwned {
    /// Serialise with the `"v"` field first.
    fn encode(&self) -> Vec<u8> {
        // Serialising plain structs of strings and integers into a Vec cannot fail.
        serde_json::to_vec(&Versioned::current(self)).unwrap_or_default()
    }

    /// Parse a stored value, refusing unknown future versions and corrupt bytes with a typed
    /// error (never a default), so a CAS-based update cannot clobber what it did not understand.
    fn decode(key: &str, bytes: &[u8]) -> Result<Self, RecordError> {
        #[derive(Deserialize)]
        struct Probe {
            v: Option<u64>,
        }
        let corrupt = |source| RecordError::Corrupt {
            key: key.to_owned(),
            source,
        };
        let probe: Probe = serde_json::from_slice(bytes).map_err(corrupt)?;
        match probe.v {
            None => Err(RecordError::MissingVersion {
                key: key.to_owned(),
            }),
            Some(v) if v > RECORD_VERSION => Err(RecordError::FutureVersion {
                key: key.to_owned(),
                found: v,
                supported: RECORD_VERSION,
            }),
            Some(_) => serde_json::from_slice(bytes).map_err(corrupt),
        }
    }
}

/// A record as it is stored, `"v"` first: what [`Record::encode`] writes, and what an API
/// that shows stored records verbatim serialises.
#[derive(Clone, Debug, Serialize)]
pub struct Versioned<T> {
    pub v: u64,
    #[serde(flatten)]
    pub rec: T,
}

impl<T> Versioned<T> {
    /// `rec` in the format this build writes.
    pub fn current(rec: T) -> Self {
        Versioned {
            v: RECORD_VERSION,
            rec,
        }
    }
}

impl Record for NodeRecord {}
impl Record for ShardRecord {}

impl ShardRecord {
    /// The replicas that took every acknowledged write: the only ones that may answer reads.
    pub fn in_sync(&self) -> impl Iterator<Item = &NodeId> {
        self.replicas
            .iter()
            .filter(|r| !self.lagging.contains(r) && !self.syncing.contains(r))
    }

    pub fn is_in_sync(&self, id: &NodeId) -> bool {
        self.replicas.contains(id) && !self.lagging.contains(id) && !self.syncing.contains(id)
    }
}

/// The key layout under a prefix (default `flotilla/`):
///
/// ```text
/// <prefix>nodes/<node-id>
/// <prefix>shards/<shard-key with '/' replaced by '~'>
/// <prefix>deployments/<encoded shard-key>/<host>
/// <prefix>config/<name>
/// <prefix>locks/<name>            (locks/seeder is the seeder's leader lock)
/// <prefix>seeder/leader           the acting seeder (leased)
/// <prefix>seeder/absent/<node-id> when a dead node was first seen missing
/// <prefix>reseed/<node-id>        reseed progress of a node
/// <prefix>moves/<encoded key>     a replica move in flight
/// ```
///
/// Shard keys contain `/`; they are stored with every `/` replaced by `~`, a character the
/// repository-name grammar never allows, so the mapping is reversible and a listing of
/// `shards/` returns exactly one level. Changing this layout is a data migration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Keyspace {
    prefix: String,
}

impl Default for Keyspace {
    fn default() -> Self {
        Keyspace::new("flotilla/")
    }
}

impl Keyspace {
    /// A prefix that does not end in `/` gets one, so `nodes/` never collides with a sibling.
    pub fn new(prefix: &str) -> Self {
        let mut prefix = prefix.to_owned();
        if !prefix.is_empty() && !prefix.ends_with('/') {
            prefix.push('/');
        }
        Keyspace { prefix }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn nodes(&self) -> String {
        format!("{}nodes/", self.prefix)
    }

    pub fn node(&self, id: &NodeId) -> String {
        format!("{}nodes/{id}", self.prefix)
    }

    pub fn shards(&self) -> String {
        format!("{}shards/", self.prefix)
    }

    pub fn shard(&self, key: &ShardKey) -> String {
        format!("{}shards/{}", self.prefix, encode_shard_key(key))
    }

    /// The shard key a `shards/...` store key names, if it is one.
    pub fn shard_key_of(&self, store_key: &str) -> Option<ShardKey> {
        let rest = store_key.strip_prefix(&self.shards())?;
        rest.replace('~', "/").parse().ok()
    }

    pub fn deployments(&self, key: &ShardKey) -> String {
        format!("{}deployments/{}/", self.prefix, encode_shard_key(key))
    }

    /// `host` is a deploy host's name as the agent reports it; `/` in it is encoded as `~`.
    pub fn deployment(&self, key: &ShardKey, host: &str) -> String {
        format!("{}{}", self.deployments(key), host.replace('/', "~"))
    }

    /// Every key's desired deployment.
    pub fn desired_deployments(&self) -> String {
        format!("{}desired/", self.prefix)
    }

    /// A key's desired deployment (`deploy::DeploymentRecord`).
    pub fn desired_deployment(&self, key: &ShardKey) -> String {
        format!("{}{}", self.desired_deployments(), encode_shard_key(key))
    }

    /// The digest an immutable tag is bound to (`/` in the repository encoded as `~`).
    pub fn immutable_tag(&self, repo: &str, tag: &str) -> String {
        format!(
            "{}tags/immutable/{}/{tag}",
            self.prefix,
            repo.replace('/', "~")
        )
    }

    pub fn config(&self, name: &str) -> String {
        format!("{}config/{name}", self.prefix)
    }

    pub fn lock(&self, name: &str) -> String {
        format!("{}locks/{name}", self.prefix)
    }

    pub fn seeder_lock(&self) -> String {
        self.lock("seeder")
    }

    /// The acting seeder's self-description (bound to its lease), for the admin API.
    pub fn seeder_leader(&self) -> String {
        format!("{}seeder/leader", self.prefix)
    }

    /// When the seeder first saw `node` missing from `nodes/` (its replace_after clock, kept
    /// here so a new leader does not restart it).
    pub fn seeder_absent(&self, node: &NodeId) -> String {
        format!("{}seeder/absent/{node}", self.prefix)
    }

    pub fn seeder_absents(&self) -> String {
        format!("{}seeder/absent/", self.prefix)
    }

    /// Reseed progress records, one per node being (or last) reseeded.
    pub fn reseeds(&self) -> String {
        format!("{}reseed/", self.prefix)
    }

    pub fn reseed(&self, node: &NodeId) -> String {
        format!("{}reseed/{node}", self.prefix)
    }

    /// Replica moves in flight (add as joining → seed → swap → drop), one per shard key.
    pub fn moves(&self) -> String {
        format!("{}moves/", self.prefix)
    }

    pub fn shard_move(&self, key: &ShardKey) -> String {
        format!("{}moves/{}", self.prefix, encode_shard_key(key))
    }
}

fn encode_shard_key(key: &ShardKey) -> String {
    key.as_str().replace('/', "~")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shard() -> ShardRecord {
        ShardRecord {
            key: "billing/api".parse().unwrap(),
            replicas: vec!["n1".parse().unwrap(), "n2".parse().unwrap()],
            joining: vec![],
            lagging: Vec::new(),
            syncing: Vec::new(),
            epoch: 3,
            pinned: false,
            rack_relaxed: false,
            created_ms: 7,
        }
    }

    #[test]
    fn roundtrip_carries_version() {
        let bytes = shard().encode();
        let json: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(json["v"], 1);
        assert_eq!(ShardRecord::decode("k", &bytes).unwrap(), shard());
    }

    #[test]
    fn refuses_future_corrupt_and_unversioned() {
        let mut json: serde_json::Value = serde_json::from_slice(&shard().encode()).unwrap();
        json["v"] = 2.into();
        let err = ShardRecord::decode("k", json.to_string().as_bytes()).unwrap_err();
        assert!(
            matches!(err, RecordError::FutureVersion { found: 2, .. }),
            "{err}"
        );
        let err = ShardRecord::decode("k", b"{not json").unwrap_err();
        assert!(matches!(err, RecordError::Corrupt { .. }), "{err}");
        let err = ShardRecord::decode("k", br#"{"key":"a"}"#).unwrap_err();
        assert!(matches!(err, RecordError::MissingVersion { .. }), "{err}");
        let err = ShardRecord::decode("k", br#"{"v":1,"key":"A"}"#).unwrap_err();
        assert!(matches!(err, RecordError::Corrupt { .. }), "{err}");
    }

    #[test]
    fn key_layout_is_pinned() {
        let ks = Keyspace::default();
        let key: ShardKey = "billing/api".parse().unwrap();
        assert_eq!(ks.node(&"n1".parse().unwrap()), "flotilla/nodes/n1");
        assert_eq!(ks.shard(&key), "flotilla/shards/billing~api");
        assert_eq!(
            ks.shard_key_of("flotilla/shards/billing~api"),
            Some(key.clone())
        );
        assert_eq!(
            ks.deployment(&key, "h1"),
            "flotilla/deployments/billing~api/h1"
        );
        assert_eq!(ks.desired_deployment(&key), "flotilla/desired/billing~api");
        assert_eq!(ks.config("drain_seconds"), "flotilla/config/drain_seconds");
        assert_eq!(ks.seeder_lock(), "flotilla/locks/seeder");
        assert_eq!(Keyspace::new("x").shards(), "x/shards/");
    }
}
