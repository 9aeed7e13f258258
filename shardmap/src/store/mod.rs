//! The `MetaStore` trait — get, put, compare-and-swap, delete, list, watch, leases and leader
//! locks over opaque bytes — plus typed shard-map helpers shared by every backend, and
//! [`open`], which picks a backend from a [`MetaUrl`].

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::stream::BoxStream;

use crate::model::{Keyspace, NodeRecord, Record, RecordError, ShardRecord};
use flotilla_core::{NodeId, ShardKey};

#[cfg(feature = "consul")]
pub mod consul;
#[cfg(feature = "etcd")]
pub mod etcd;
pub mod file;
pub mod url;

pub use url::{MetaUrl, MetaUrlError};

/// A key's version: a store-wide, monotonically increasing revision (etcd `mod_revision`,
/// Consul `ModifyIndex`, the embedded store's revision counter). Compare-and-swap and watch
/// resumption are expressed in it.
pub type Version = u64;

/// One key, its value and the version that wrote it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub key: String,
    pub value: Bytes,
    pub version: Version,
}

/// A compare-and-swap lost: the key's current version (`None` = it does not exist).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conflict {
    pub current: Option<Version>,
}

/// A change seen by [`MetaStore::watch`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WatchEvent {
    Put {
        key: String,
        value: Bytes,
        version: Version,
    },
    Delete {
        key: String,
        version: Version,
    },
}

impl WatchEvent {
    pub fn key(&self) -> &str {
        match self {
            WatchEvent::Put { key, .. } | WatchEvent::Delete { key, .. } => key,
        }
    }

    /// The version to pass as `from` when resuming after this event.
    pub fn version(&self) -> Version {
        match self {
            WatchEvent::Put { version, .. } | WatchEvent::Delete { version, .. } => *version,
        }
    }
}

/// A stream of changes; it ends only with an error (or when dropped).
pub type WatchStream = BoxStream<'static, Result<WatchEvent, StoreError>>;

/// A liveness lease (etcd lease, Consul session, embedded expiry record). Keys written with
/// [`MetaStore::put_with_lease`] and locks taken with it vanish once it is revoked or not kept
/// alive within its TTL, which is how a dead node or seeder leader is noticed.
#[derive(Clone, PartialEq, Eq)]
pub struct Lease {
    pub id: String,
    pub ttl: Duration,
}

impl fmt::Debug for Lease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Lease({}, {:?})", self.id, self.ttl)
    }
}

/// Errors of the store layer.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("unsupported metadata store URL {0:?} (expected file:///DIR, consul://HOST:PORT or etcd://HOST:PORT[,HOST:PORT...])")]
    BadUrl(String),
    #[error("metadata store I/O error at {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("metadata store unreachable ({endpoint}): {source}")]
    Unreachable {
        endpoint: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("metadata store {endpoint} answered {status}: {body}")]
    Status {
        endpoint: String,
        status: u16,
        body: String,
    },
    #[error("metadata store CA file {path}: {detail}")]
    Tls { path: String, detail: String },
    #[error("metadata store sent an unexpected response: {0}")]
    Protocol(String),
    #[error("embedded store state at {path} is corrupt: {detail}")]
    CorruptState { path: String, detail: String },
    #[error("lease {0} has expired or was revoked")]
    LeaseExpired(String),
    #[error("watch cannot resume from version {from}: history before {oldest} was compacted")]
    Compacted { from: Version, oldest: Version },
    #[error(transparent)]
    Record(#[from] RecordError),
}

/// The metadata store: the same contract for the embedded file store, Consul and etcd. Used as
/// `Arc<dyn MetaStore>`; the `testsuite` feature exports the conformance suite.
#[async_trait::async_trait]
pub trait MetaStore: Send + Sync + fmt::Debug {
    /// The value and version of `key`, or `None` if it does not exist (or its lease expired).
    async fn get(&self, key: &str) -> Result<Option<(Bytes, Version)>, StoreError>;

    /// Unconditionally write `key`; returns the new version.
    async fn put(&self, key: &str, value: Bytes) -> Result<Version, StoreError>;

    /// Write `key` only if its version is `expected` (`None`: only if it does not exist).
    /// The outer error is a store failure; the inner one a lost race.
    async fn cas(
        &self,
        key: &str,
        expected: Option<Version>,
        value: Bytes,
    ) -> Result<Result<Version, Conflict>, StoreError>;

    /// Remove `key`; removing a missing key is not an error.
    async fn delete(&self, key: &str) -> Result<(), StoreError>;

    /// Every key starting with `prefix`, sorted by key.
    async fn list(&self, prefix: &str) -> Result<Vec<Entry>, StoreError>;

    /// Changes under `prefix` with a version greater than `from`; `None` = only changes made
    /// after the watch is established. Pass the last seen [`WatchEvent::version`] to resume.
    async fn watch(&self, prefix: &str, from: Option<Version>) -> Result<WatchStream, StoreError>;

    /// Grant a lease that expires `ttl` after its last keepalive.
    async fn lease(&self, ttl: Duration) -> Result<Lease, StoreError>;

    /// Extend the lease; [`StoreError::LeaseExpired`] if it is already gone.
    async fn keepalive(&self, lease: &Lease) -> Result<(), StoreError>;

    /// End the lease now, deleting its keys and releasing its locks.
    async fn revoke(&self, lease: &Lease) -> Result<(), StoreError>;

    /// Write `key` bound to `lease`: it disappears with the lease.
    async fn put_with_lease(
        &self,
        key: &str,
        value: Bytes,
        lease: &Lease,
    ) -> Result<Version, StoreError>;

    /// Take the lock `key` for `lease`; `true` if it is now held by this lease (re-entrant),
    /// `false` if another live lease holds it. The lock dies with the lease.
    async fn try_lock(&self, key: &str, lease: &Lease) -> Result<bool, StoreError>;

    /// Release the lock if `lease` holds it.
    async fn unlock(&self, key: &str, lease: &Lease) -> Result<(), StoreError>;
}

/// Open a metadata store: `file:///var/lib/flotilla/meta` (embedded, the default),
/// `consul://127.0.0.1:8500` (token from `CONSUL_HTTP_TOKEN`; HTTPS with `consuls://` or
/// `CONSUL_HTTP_SSL=true`, extra roots from `?ca=` or `CONSUL_CACERT`), `etcds://` for etcd
/// over HTTPS, or
/// `etcd://10.0.0.1:2379,10.0.0.2:2379` (tried in order, failing over on connection errors).
/// The URL was validated when parsed; what can still fail here is the backend itself (the
/// embedded store's directory, an HTTP client).
pub fn open(url: &MetaUrl) -> Result<Arc<dyn MetaStore>, StoreError> {
    match &url.0 {
        url::Backend::File(dir) => Ok(Arc::new(file::FileStore::open(dir)?)),
        #[cfg(feature = "consul")]
        url::Backend::Consul { addr, tls } => {
            let token = std::env::var("CONSUL_HTTP_TOKEN").ok();
            // Consul's own variables, as its CLI reads them.
            let env_ssl = std::env::var("CONSUL_HTTP_SSL")
                .is_ok_and(|v| matches!(v.as_str(), "1" | "true" | "TRUE" | "True"));
            let env_ca = std::env::var_os("CONSUL_CACERT").map(std::path::PathBuf::from);
            let tls = match tls {
                Some(t) => Some(url::Tls {
                    ca: t.ca.clone().or(env_ca),
                }),
                None if env_ssl => Some(url::Tls { ca: env_ca }),
                None => None,
            };
            Ok(Arc::new(consul::ConsulStore::with_tls(
                addr,
                token,
                tls.as_ref(),
            )?))
        }
        #[cfg(feature = "etcd")]
        url::Backend::Etcd { addrs, tls } => Ok(Arc::new(etcd::EtcdStore::with_tls(
            &addrs.join(","),
            tls.as_ref(),
        )?)),
    }
}

/// Typed shard-map operations on any [`MetaStore`], so every backend agrees on keys and
/// encodings. A record that is corrupt or from a newer format surfaces as
/// [`StoreError::Record`]; CAS helpers never overwrite such a record because the caller has
/// no version of a decoded record to pass.
#[derive(Clone, Debug)]
pub struct ShardMap {
    store: Arc<dyn MetaStore>,
    keys: Keyspace,
}

impl ShardMap {
    pub fn new(store: Arc<dyn MetaStore>, keys: Keyspace) -> Self {
        ShardMap { store, keys }
    }

    pub fn store(&self) -> &Arc<dyn MetaStore> {
        &self.store
    }

    pub fn keys(&self) -> &Keyspace {
        &self.keys
    }

    /// The shard record and its version.
    pub async fn get_shard(
        &self,
        key: &ShardKey,
    ) -> Result<Option<(ShardRecord, Version)>, StoreError> {
        let k = self.keys.shard(key);
        decode_opt(&k, self.store.get(&k).await?)
    }

    /// Write `rec` if the stored version is still `expected` (`None`: create only).
    pub async fn cas_shard(
        &self,
        rec: &ShardRecord,
        expected: Option<Version>,
    ) -> Result<Result<Version, Conflict>, StoreError> {
        let k = self.keys.shard(&rec.key);
        self.store.cas(&k, expected, rec.encode().into()).await
    }

    /// Bind an immutable tag to `digest`, once and for every router at the same time (a
    /// create-only write): `Ok(Ok(()))` when the tag is now, or already was, bound to
    /// `digest`; `Ok(Err(current))` when another digest holds it.
    pub async fn bind_immutable_tag(
        &self,
        repo: &str,
        tag: &str,
        digest: &str,
    ) -> Result<Result<(), String>, StoreError> {
        let k = self.keys.immutable_tag(repo, tag);
        // Read, else create; a lost create means another router bound it: read theirs.
        for _ in 0..3 {
            if let Some((v, _)) = self.store.get(&k).await? {
                let current = String::from_utf8_lossy(&v).into_owned();
                return Ok(if current == digest {
                    Ok(())
                } else {
                    Err(current)
                });
            }
            if self
                .store
                .cas(&k, None, Bytes::from(digest.to_owned()))
                .await?
                .is_ok()
            {
                return Ok(Ok(()));
            }
        }
        Err(StoreError::Protocol(format!(
            "immutable tag {k} was created and removed while binding it"
        )))
    }

    /// Create the record for a new key unless a router beat us to it; either way return the
    /// record that is now stored, so racing routers all report the winner's placement.
    pub async fn create_shard(
        &self,
        rec: &ShardRecord,
    ) -> Result<(ShardRecord, Version), StoreError> {
        match self.cas_shard(rec, None).await? {
            Ok(v) => Ok((rec.clone(), v)),
            Err(_) => self.get_shard(&rec.key).await?.ok_or_else(|| {
                StoreError::Protocol(format!(
                    "shard {} existed at create time and vanished before it could be read",
                    rec.key
                ))
            }),
        }
    }

    /// Every shard record this build can read. A corrupt or future-version record is left
    /// out (and reported by [`ShardMap::list_shards_checked`]): one bad record must not stop
    /// routing, seeding, membership or GC for every other key. Nothing here rewrites it.
    pub async fn list_shards(&self) -> Result<Vec<(ShardRecord, Version)>, StoreError> {
        Ok(self.list_shards_checked().await?.0)
    }

    /// Every readable shard record, and the keys of those that are not, with why.
    pub async fn list_shards_checked(
        &self,
    ) -> Result<(Vec<(ShardRecord, Version)>, Vec<Unreadable>), StoreError> {
        let entries = self.store.list(&self.keys.shards()).await?;
        Ok(split(entries, "shard"))
    }

    /// A key's desired deployment.
    pub async fn get_deployment(
        &self,
        key: &ShardKey,
    ) -> Result<Option<(crate::DeploymentRecord, Version)>, StoreError> {
        let k = self.keys.desired_deployment(key);
        decode_opt(&k, self.store.get(&k).await?)
    }

    /// Set a key's desired deployment (last writer wins: an operator's intent, not a race).
    pub async fn put_deployment(
        &self,
        rec: &crate::DeploymentRecord,
    ) -> Result<Version, StoreError> {
        let k = self.keys.desired_deployment(&rec.key);
        self.store.put(&k, rec.encode().into()).await
    }

    pub async fn delete_deployment(&self, key: &ShardKey) -> Result<(), StoreError> {
        self.store.delete(&self.keys.desired_deployment(key)).await
    }

    /// Every readable desired deployment (unreadable ones skipped and counted, as shards).
    pub async fn list_deployments(
        &self,
    ) -> Result<Vec<(crate::DeploymentRecord, Version)>, StoreError> {
        let entries = self.store.list(&self.keys.desired_deployments()).await?;
        Ok(split(entries, "deployment").0)
    }

    pub async fn get_node(&self, id: &NodeId) -> Result<Option<(NodeRecord, Version)>, StoreError> {
        let k = self.keys.node(id);
        decode_opt(&k, self.store.get(&k).await?)
    }

    /// Register (or refresh) a node bound to `lease`, so it disappears if the node dies.
    pub async fn register_node(
        &self,
        rec: &NodeRecord,
        lease: &Lease,
    ) -> Result<Version, StoreError> {
        let k = self.keys.node(&rec.id);
        self.store
            .put_with_lease(&k, rec.encode().into(), lease)
            .await
    }

    /// Every node record this build can read (see [`ShardMap::list_shards`]).
    pub async fn list_nodes(&self) -> Result<Vec<(NodeRecord, Version)>, StoreError> {
        Ok(self.list_nodes_checked().await?.0)
    }

    pub async fn list_nodes_checked(
        &self,
    ) -> Result<(Vec<(NodeRecord, Version)>, Vec<Unreadable>), StoreError> {
        let entries = self.store.list(&self.keys.nodes()).await?;
        Ok(split(entries, "node"))
    }

    /// The cluster's shard key depth (how many leading components of a repository name
    /// form its shard key), stored once in `config/shard_key_depth`: the first component to
    /// start writes `default` there (create-only, so concurrent starters agree), and every
    /// component uses what is stored, so routers and seeders can never disagree on it.
    pub async fn key_depth(
        &self,
        default: std::num::NonZeroUsize,
    ) -> Result<std::num::NonZeroUsize, StoreError> {
        let k = self.keys.config("shard_key_depth");
        let parse = |b: &[u8]| {
            std::str::from_utf8(b)
                .ok()
                .and_then(|s| s.trim().parse::<std::num::NonZeroUsize>().ok())
                .ok_or_else(|| {
                    StoreError::Protocol(format!("{k} does not hold a positive integer"))
                })
        };
        if let Some((b, _)) = self.store.get(&k).await? {
            return parse(&b);
        }
        match self
            .store
            .cas(&k, None, Bytes::from(default.to_string()))
            .await?
        {
            Ok(_) => Ok(default),
            Err(_) => match self.store.get(&k).await? {
                Some((b, _)) => parse(&b),
                None => Err(StoreError::Protocol(format!(
                    "{k} vanished after a create race"
                ))),
            },
        }
    }

    /// Try to become the seeder leader.
    pub async fn try_lock_seeder(&self, lease: &Lease) -> Result<bool, StoreError> {
        self.store.try_lock(&self.keys.seeder_lock(), lease).await
    }
}

/// A stored record this build cannot read: corrupt, or written by a newer version.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Unreadable {
    /// The store key, as stored.
    pub key: String,
    pub error: String,
}

/// Decode a listing, setting aside what does not decode (logged, and counted in the
/// `flotilla_shardmap_unreadable_records` gauge by record kind).
fn split<T: Record>(
    entries: Vec<Entry>,
    kind: &'static str,
) -> (Vec<(T, Version)>, Vec<Unreadable>) {
    let mut ok = Vec::with_capacity(entries.len());
    let mut bad = Vec::new();
    for e in entries {
        match T::decode(&e.key, &e.value) {
            Ok(r) => ok.push((r, e.version)),
            Err(err) => {
                tracing::warn!(key = %e.key, error = %err, "skipping a record this build cannot read; it is left as stored");
                bad.push(Unreadable {
                    key: e.key,
                    error: err.to_string(),
                });
            }
        }
    }
    metrics::gauge!("flotilla_shardmap_unreadable_records", "kind" => kind).set(bad.len() as f64);
    (ok, bad)
}

fn decode_opt<T: Record>(
    key: &str,
    got: Option<(Bytes, Version)>,
) -> Result<Option<(T, Version)>, StoreError> {
    match got {
        None => Ok(None),
        Some((bytes, v)) => Ok(Some((T::decode(key, &bytes)?, v))),
    }
}

/// The HTTP client of a networked backend: fail fast on connect so an unreachable member
/// of the metadata store is skipped, not waited on.
pub(crate) fn http_client(
    endpoint: &str,
    connect_timeout: std::time::Duration,
    ca: Option<&std::path::Path>,
) -> Result<reqwest::Client, StoreError> {
    let mut b = reqwest::Client::builder().connect_timeout(connect_timeout);
    if let Some(path) = ca {
        let bad = |detail: String| StoreError::Tls {
            path: path.display().to_string(),
            detail,
        };
        let pem = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| bad(e.to_string()))?;
        if certs.is_empty() {
            return Err(bad("no PEM certificate in the file".to_owned()));
        }
        for c in certs {
            b = b.add_root_certificate(c);
        }
    }
    b.build().map_err(|e| StoreError::Unreachable {
        endpoint: endpoint.to_owned(),
        source: e,
    })
}

/// The smallest key greater than every key starting with `prefix` (etcd's `range_end`), or
/// `[0]` ("to the end") when no such key exists.
pub(crate) fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// Milliseconds since the Unix epoch (0 if the clock is before 1970).
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
