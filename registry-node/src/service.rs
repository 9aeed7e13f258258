//! `NodeService`: the node's state behind one cheap `Clone` handle, its error type, and the
//! lifecycle that is not a request (open, readiness, the seeding flag).
//!
//! The registry operations are `impl NodeService` blocks in the modules that own each path,
//! so a reader follows one concern in one file: `read` (open, verify, read through,
//! quarantine), `write` (uploads, commit, write-through, manifests, deletes), `listing`,
//! `seed`, `scrub`, `anti_entropy`, `identity`, `membership`. Handlers stay thin: extract,
//! call one method, render.

use std::sync::Arc;

use flotilla_core::{Digest, RepoName};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::identity;
use crate::manifest::ManifestError;
use crate::read::through::Fetches;
use crate::store::{LocalStore, StoreError};
use crate::write::uploads::{UploadError, Uploads};
use crate::{NodeConfig, NodeError};
use flotilla_objstore::{Remote, RemoteError};

/// Failures of registry operations; `http::error` maps each to its OCI code.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Upload(#[from] UploadError),
    #[error("digest mismatch: client said {expected}, content is {actual}")]
    DigestMismatch { expected: Digest, actual: Digest },
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error("manifest references {0}, which the repository does not hold")]
    ManifestBlobUnknown(Digest),
    #[error("manifest of {size} bytes exceeds the limit of {limit}")]
    ManifestTooLarge { size: usize, limit: usize },
    #[error("{0}")]
    SizeInvalid(String),
    #[error("object storage unavailable: {0}")]
    Remote(#[from] RemoteError),
    #[error("object storage holds corrupt content for {0}")]
    CorruptRemote(Digest),
    #[error("the router's deadline for this write passed before it was applied")]
    DeadlinePassed,
    #[error(
        "the node's disk is nearly full ({free} bytes free, floor {floor}); it takes no new data"
    )]
    NotWritable { free: u64, floor: u64 },
}

pub(crate) type Result<T, E = ServiceError> = std::result::Result<T, E>;

#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) cfg: NodeConfig,
    pub(crate) store: LocalStore,
    pub(crate) uploads: Uploads,
    pub(crate) remote: Option<Remote>,
    pub(crate) fetches: Option<Fetches>,
    pub(crate) ready: std::sync::atomic::AtomicBool,
    /// Set while the data directory may be missing content of the shards this node holds
    /// (it started without its identity file); cleared once a seeder filled it.
    pub(crate) needs_seed: std::sync::atomic::AtomicBool,
    /// Repositories whose catalog entry this process has written or seen (each is written
    /// once per process, before the repository's first object).
    pub(crate) cataloged: std::sync::Mutex<std::collections::HashSet<RepoName>>,
    /// Free space and whether the node takes new data (see `disk`).
    pub(crate) disk: crate::disk::DiskState,
    /// Object-storage keys recently seen to exist (see `durable`).
    pub(crate) confirmed: crate::durable::Confirmed,
    /// Seen `layout::remote_catalog_complete()` (it is never removed).
    pub(crate) catalog_complete: std::sync::atomic::AtomicBool,
    pub(crate) seed_id: String,
    /// Wakes the membership loop for an immediate heartbeat (after a state change).
    pub(crate) beat: tokio::sync::Notify,
    /// Serialises every change of one tag on this node (see [`TagLocks`]).
    pub(crate) tag_locks: TagLocks,
    pub(crate) cancel: CancellationToken,
    pub(crate) tasks: TaskTracker,
}

/// Cheap `Clone` handle over the node's state.
#[derive(Clone, Debug)]
pub(crate) struct NodeService {
    pub(crate) inner: Arc<Inner>,
}

impl NodeService {
    pub(crate) async fn open(cfg: NodeConfig) -> Result<Self, NodeError> {
        let dir_err = |source| NodeError::DataDir {
            path: cfg.data_dir.clone(),
            source,
        };
        tokio::fs::create_dir_all(&cfg.data_dir)
            .await
            .map_err(dir_err)?;
        let store = LocalStore::open(cfg.data_dir.clone())
            .await
            .map_err(|e| dir_err(std::io::Error::other(e)))?;
        let (needs_seed, seed_id) = identity::check(&store, &cfg).await?;
        let uploads = Uploads::new(&cfg.data_dir);
        let remote = match &cfg.store_url {
            Some(url) => Some(Remote::open(url).map_err(|e| NodeError::Store(e.to_string()))?),
            None => None,
        };
        let tasks = TaskTracker::new();
        let fetches = remote
            .clone()
            .map(|r| Fetches::new(store.clone(), r, tasks.clone()));
        let confirmed = crate::durable::Confirmed::new(cfg.remote_confirm_ttl);
        Ok(NodeService {
            inner: Arc::new(Inner {
                cfg,
                store,
                uploads,
                remote,
                fetches,
                ready: std::sync::atomic::AtomicBool::new(false),
                needs_seed: std::sync::atomic::AtomicBool::new(needs_seed),
                cataloged: std::sync::Mutex::default(),
                confirmed,
                disk: crate::disk::DiskState::default(),
                catalog_complete: std::sync::atomic::AtomicBool::new(false),
                seed_id,
                beat: tokio::sync::Notify::new(),
                tag_locks: TagLocks::default(),
                cancel: CancellationToken::new(),
                tasks,
            }),
        })
    }

    pub(crate) fn config(&self) -> &NodeConfig {
        &self.inner.cfg
    }

    pub(crate) fn store(&self) -> &LocalStore {
        &self.inner.store
    }

    pub(crate) fn remote(&self) -> Option<&Remote> {
        self.inner.remote.as_ref()
    }

    pub(crate) fn fetches(&self) -> Option<&Fetches> {
        self.inner.fetches.as_ref()
    }

    /// Whether this node's disk still waits for a seeder (see `identity`).
    pub(crate) fn needs_seed(&self) -> bool {
        self.inner
            .needs_seed
            .load(std::sync::atomic::Ordering::Acquire)
    }

    /// Record that the disk holds everything of this node's shards: rewrite `node.json`
    /// without the flag (durably, so a restart does not ask for another reseed), then report
    /// ready to the membership loop.
    pub(crate) async fn mark_seeded(&self) -> Result<()> {
        identity::write(&self.inner.store, &self.inner.cfg, false, None)
            .await
            .map_err(|e| match e {
                NodeError::DataDir { path, source } => StoreError::Io { path, source },
                other => StoreError::Io {
                    path: self
                        .inner
                        .store
                        .path(&flotilla_core::layout::local_identity()),
                    source: std::io::Error::other(other.to_string()),
                },
            })?;
        self.inner
            .needs_seed
            .store(false, std::sync::atomic::Ordering::Release);
        self.inner.beat.notify_one();
        Ok(())
    }

    /// The id of the reseed this disk waits for (empty when none).
    pub(crate) fn seed_id(&self) -> &str {
        &self.inner.seed_id
    }

    /// Resolves when the node wants an immediate heartbeat.
    pub(crate) async fn beat_requested(&self) {
        self.inner.beat.notified().await
    }

    /// Whether the object store answered the node's last call (true without one).
    pub(crate) fn object_store_healthy(&self) -> bool {
        self.inner.remote.as_ref().is_none_or(|r| r.healthy())
    }

    /// Whether the node finished catching up with object storage and may take traffic.
    pub(crate) fn is_ready(&self) -> bool {
        self.inner.ready.load(std::sync::atomic::Ordering::Acquire)
    }
}

/// Striped locks over `(repository, tag)`. Every step that changes a tag on this node holds
/// its stripe: a write (object storage, then disk), a delete, the catch-up's compare-and-set
/// against object storage, a seed, and a read caching a tag it found only in object
/// storage. Without them a read or a catch-up that looked at the tag before a write could
/// put the older value back after it: a replica that acknowledged a write would then serve
/// what the write replaced.
#[derive(Debug)]
pub(crate) struct TagLocks(Vec<tokio::sync::Mutex<()>>);

impl Default for TagLocks {
    fn default() -> Self {
        TagLocks((0..64).map(|_| tokio::sync::Mutex::new(())).collect())
    }
}

impl TagLocks {
    pub(crate) async fn lock(
        &self,
        repo: &RepoName,
        tag: &flotilla_core::Tag,
    ) -> tokio::sync::MutexGuard<'_, ()> {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        repo.as_str().hash(&mut h);
        tag.as_str().hash(&mut h);
        self.0[(h.finish() % self.0.len() as u64) as usize]
            .lock()
            .await
    }
}
