//! `NodeService`: every registry operation a handler can ask for, over the local store and
//! the upload sessions. Handlers stay thin: extract, call one method here, render.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use flotilla_core::{layout, Algorithm, Digest, DigestHasher, RepoName, Tag, UploadId};
use futures::Stream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::manifest::{self, ManifestError};
use crate::readthrough::{self, Fetches, Outcome, Started};
use crate::remote::{Remote, RemoteError};
use crate::store::{LocalStore, ReferrerDescriptor, StoreError};
use crate::uploads::{UploadError, Uploads};
use crate::{NodeConfig, NodeError};

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
}

pub type Result<T, E = ServiceError> = std::result::Result<T, E>;

/// What a successful manifest push returns to the client.
#[derive(Debug)]
pub struct PutManifest {
    pub digest: Digest,
    pub subject: Option<Digest>,
}

/// A manifest as stored: its exact bytes and the media type it was pushed with.
#[derive(Debug)]
pub struct StoredManifest {
    pub bytes: Bytes,
    pub media_type: String,
    pub digest: Digest,
}

/// Where the bytes of a blob GET come from.
#[derive(Debug)]
pub enum BlobBody {
    /// A local file verified since its bytes last changed (see `store::verified`).
    File(tokio::fs::File),
    /// A small local blob, already verified against its digest.
    Bytes(Bytes),
    /// A large local blob to stream whole, verified before its last chunk is released.
    Checked(tokio::fs::File, crate::recovery::Check),
    /// A read-through in progress, verified before its last chunk is released.
    Fetch(readthrough::FetchStream),
}

#[derive(Debug)]
struct Inner {
    cfg: NodeConfig,
    store: LocalStore,
    uploads: Uploads,
    remote: Option<Remote>,
    fetches: Option<Fetches>,
    ready: std::sync::atomic::AtomicBool,
    /// Set while the data directory may be missing content of the shards this node holds
    /// (it started without its identity file); cleared once a seeder filled it.
    needs_seed: std::sync::atomic::AtomicBool,
    /// Repositories whose catalog entry this process has written or seen (each is written
    /// once per process, before the repository's first object).
    cataloged: std::sync::Mutex<std::collections::HashSet<RepoName>>,
    /// Seen `layout::remote_catalog_complete()` (it is never removed).
    catalog_complete: std::sync::atomic::AtomicBool,
    seed_id: String,
    /// Wakes the membership loop for an immediate heartbeat (after a state change).
    beat: tokio::sync::Notify,
    cancel: CancellationToken,
    tasks: TaskTracker,
}

/// Cheap `Clone` handle over the node's state.
#[derive(Clone, Debug)]
pub struct NodeService {
    inner: Arc<Inner>,
}

/// Handle on the node's background tasks; `shutdown` cancels and awaits them all.
#[derive(Debug)]
pub struct BackgroundTasks {
    cancel: CancellationToken,
    tasks: TaskTracker,
}

impl BackgroundTasks {
    pub async fn shutdown(self) {
        self.cancel.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }
}

/// `node.json`. `needs_seed` is written `true` when the file had to be created (a new or
/// wiped disk) and cleared only once a seeder has filled the disk, so a restart in the middle
/// of a reseed is still recognised as "same id, incomplete disk".
#[derive(serde::Serialize, serde::Deserialize)]
struct Identity {
    id: String,
    rack: String,
    layout: u32,
    #[serde(default)]
    needs_seed: bool,
    /// Names this disk's reseed, so a seeder resuming a reseed of the same id can tell a disk
    /// wiped again (new `seed_id`: start over) from the one it was filling.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    seed_id: Option<String>,
}

impl NodeService {
    pub async fn open(cfg: NodeConfig) -> Result<Self, NodeError> {
        let dir_err = |source| NodeError::DataDir {
            path: cfg.data_dir.clone(),
            source,
        };
        tokio::fs::create_dir_all(&cfg.data_dir)
            .await
            .map_err(dir_err)?;
        let store = LocalStore::open(cfg.data_dir.clone())
            .await
            .map_err(|e| dir_err(io::Error::other(e)))?;
        let (needs_seed, seed_id) = check_identity(&store, &cfg).await?;
        let uploads = Uploads::new(&cfg.data_dir);
        let remote = match &cfg.store_url {
            Some(url) => Some(Remote::open(url).map_err(|e| NodeError::Store(e.to_string()))?),
            None => None,
        };
        let tasks = TaskTracker::new();
        let fetches = remote
            .clone()
            .map(|r| Fetches::new(store.clone(), r, tasks.clone()));
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
                catalog_complete: std::sync::atomic::AtomicBool::new(false),
                seed_id,
                beat: tokio::sync::Notify::new(),
                cancel: CancellationToken::new(),
                tasks,
            }),
        })
    }

    pub fn config(&self) -> &NodeConfig {
        &self.inner.cfg
    }

    pub fn store(&self) -> &LocalStore {
        &self.inner.store
    }

    pub(crate) fn remote(&self) -> Option<&Remote> {
        self.inner.remote.as_ref()
    }

    pub(crate) fn fetches(&self) -> Option<&Fetches> {
        self.inner.fetches.as_ref()
    }

    /// Whether this node's disk still waits for a seeder (see [`Identity`]).
    pub fn needs_seed(&self) -> bool {
        self.inner
            .needs_seed
            .load(std::sync::atomic::Ordering::Acquire)
    }

    /// Record that the disk holds everything of this node's shards: rewrite `node.json`
    /// without the flag (durably, so a restart does not ask for another reseed), then report
    /// ready to the membership loop.
    pub async fn mark_seeded(&self) -> Result<()> {
        write_identity(&self.inner.store, &self.inner.cfg, false, None)
            .await
            .map_err(|e| match e {
                NodeError::DataDir { path, source } => StoreError::Io { path, source },
                other => StoreError::Io {
                    path: self.inner.store.path(layout::local_identity()),
                    source: io::Error::other(other.to_string()),
                },
            })?;
        self.inner
            .needs_seed
            .store(false, std::sync::atomic::Ordering::Release);
        self.inner.beat.notify_one();
        Ok(())
    }

    /// The id of the reseed this disk waits for (empty when none).
    pub fn seed_id(&self) -> &str {
        &self.inner.seed_id
    }

    /// Resolves when the node wants an immediate heartbeat.
    pub async fn beat_requested(&self) {
        self.inner.beat.notified().await
    }

    /// Start the upload purger (and, later, the other housekeeping loops).
    pub fn start_background(&self) -> BackgroundTasks {
        let me = self.clone();
        let cancel = self.inner.cancel.child_token();
        let c = cancel.clone();
        self.inner.tasks.spawn(async move {
            let mut tick = tokio::time::interval(me.inner.cfg.upload_purge_interval);
            loop {
                tokio::select! {
                    _ = c.cancelled() => break,
                    _ = tick.tick() => { me.inner.uploads.purge_idle(me.inner.cfg.upload_max_age).await; }
                }
            }
        });
        let me = self.clone();
        let c = cancel.clone();
        self.inner.tasks.spawn(async move {
            // First pass until it succeeds (the node reports ready only after it), then a
            // periodic pass that closes the window of writes missed while unreachable.
            let mut tick = tokio::time::interval(me.inner.cfg.catch_up_interval);
            loop {
                tokio::select! {
                    _ = c.cancelled() => break,
                    _ = tick.tick() => {
                        if let Err(e) = me.catch_up().await {
                            tracing::warn!(error = %e, "catch-up with object storage failed; will retry");
                        }
                    }
                }
            }
        });
        if self.inner.cfg.scrub_bytes_per_sec > 0 {
            let me = self.clone();
            let c = cancel.clone();
            self.inner
                .tasks
                .spawn(async move { crate::recovery::scrub_loop(me, c).await });
        }
        BackgroundTasks {
            cancel,
            tasks: self.inner.tasks.clone(),
        }
    }

    /// Whether the node finished catching up with object storage and may take traffic.
    pub fn is_ready(&self) -> bool {
        self.inner.ready.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Anti-entropy: bring local tags and links in line with object storage, which every
    /// acknowledged write reached first. Catches what this node missed while it was down or
    /// unreachable: re-pointed or deleted tags, deleted manifests and blob links. What it
    /// merely lacks needs no work here; reads fetch it through on demand. Returns how many
    /// local entries changed.
    pub async fn catch_up(&self) -> Result<usize> {
        let Some(r) = &self.inner.remote else {
            self.inner
                .ready
                .store(true, std::sync::atomic::Ordering::Release);
            return Ok(0);
        };
        self.backfill_catalog(r).await?;
        let store = &self.inner.store;
        let mut changed = 0;
        for repo in store.list_repos().await? {
            let prefix = layout::remote_repo_prefix(&repo);
            let remote_tags: std::collections::HashSet<String> = r
                .list_names(&format!("{prefix}tags"))
                .await?
                .into_iter()
                .collect();
            for tag in store.list_tags(&repo).await.unwrap_or_default() {
                let local = store.get_tag(&repo, &tag).await?;
                if !remote_tags.contains(tag.as_str()) {
                    store.delete_tag(&repo, &tag).await?;
                    changed += 1;
                    continue;
                }
                let remote = r
                    .get_bytes(&layout::remote_tag(&repo, &tag), 1024)
                    .await?
                    .and_then(|b| String::from_utf8_lossy(&b).trim().parse::<Digest>().ok());
                match remote {
                    Some(d) if Some(&d) != local.as_ref() => {
                        store.put_tag(&repo, &tag, &d).await?;
                        changed += 1;
                    }
                    None => {
                        store.delete_tag(&repo, &tag).await?;
                        changed += 1;
                    }
                    _ => {}
                }
            }
            for (manifests, kind) in [(true, "manifests"), (false, "blobs")] {
                let mut remote_links = std::collections::HashSet::new();
                for alg in ["sha256", "sha512"] {
                    for n in r.list_names(&format!("{prefix}{kind}/{alg}")).await? {
                        remote_links.insert(format!("{alg}:{n}"));
                    }
                }
                for d in store.list_links(&repo, manifests).await? {
                    if !remote_links.contains(&d.to_string()) {
                        if manifests {
                            store.unlink_manifest(&repo, &d).await?;
                        } else {
                            store.unlink_layer(&repo, &d).await?;
                        }
                        changed += 1;
                    }
                }
            }
        }
        self.inner
            .ready
            .store(true, std::sync::atomic::Ordering::Release);
        if changed > 0 {
            tracing::info!(changed, "caught up with object storage");
        }
        metrics::counter!("flotilla_node_catch_up_changes_total").increment(changed as u64);
        Ok(changed)
    }

    // ---- blobs -----------------------------------------------------------------------

    /// Make sure `repo` holds `d`: a local link, or a link in object storage (then cached).
    async fn ensure_linked(&self, repo: &RepoName, d: &Digest) -> Result<()> {
        if self.inner.store.has_layer(repo, d).await? {
            return Ok(());
        }
        if let Some(r) = &self.inner.remote {
            if r.head(&layout::remote_blob_link(repo, d)).await?.is_some() {
                self.inner.store.link_layer(repo, d).await?;
                return Ok(());
            }
        }
        Err(StoreError::BlobUnknown(d.clone()).into())
    }

    /// Whether `repo` holds `d` with its bytes available locally or in object storage.
    async fn repo_has_blob(&self, repo: &RepoName, d: &Digest) -> Result<bool> {
        match self.ensure_linked(repo, d).await {
            Ok(()) => {}
            Err(ServiceError::Store(StoreError::BlobUnknown(_))) => return Ok(false),
            Err(e) => return Err(e),
        }
        if self.inner.store.has_blob(d).await? {
            return Ok(true);
        }
        match &self.inner.remote {
            Some(r) => Ok(r.head(&layout::remote_blob(d)).await?.is_some()),
            None => Ok(false),
        }
    }

    /// Size of a blob the repository holds.
    pub async fn stat_blob(&self, repo: &RepoName, d: &Digest) -> Result<u64> {
        self.ensure_linked(repo, d).await?;
        if let Some(size) = self.inner.store.blob_size(d).await? {
            return Ok(size);
        }
        if let Some(r) = &self.inner.remote {
            if let Some(size) = r.head(&layout::remote_blob(d)).await? {
                return Ok(size);
            }
        }
        Err(StoreError::BlobUnknown(d.clone()).into())
    }

    /// Open a blob for reading. A local miss reads through object storage; with `whole`
    /// (no `Range`) a large miss streams to this client while it is cached.
    pub async fn open_blob(
        &self,
        repo: &RepoName,
        d: &Digest,
        whole: bool,
    ) -> Result<(BlobBody, u64)> {
        self.ensure_linked(repo, d).await?;
        let store = &self.inner.store;
        match store.open_blob(d).await {
            Ok((f, len, stamp)) if store.is_verified(d, stamp) => {
                return Ok((BlobBody::File(f), len));
            }
            Ok((f, len, stamp)) if len < readthrough::WAIT_WHOLE_BELOW => {
                // Small blobs are verified whole before the response starts; a mismatch is
                // quarantined and read through again below.
                if let Some(bytes) = crate::recovery::read_verified(self, d, f, len, stamp).await? {
                    return Ok((BlobBody::Bytes(bytes), len));
                }
            }
            Ok((f, len, stamp)) if whole => {
                let check = crate::recovery::Check {
                    node: self.clone(),
                    digest: d.clone(),
                    stamp,
                };
                return Ok((BlobBody::Checked(f, check), len));
            }
            Ok((f, len, stamp)) => {
                // A range of a blob not verified in its current state: hash it all first.
                if let Some(f) = crate::recovery::verify_open(self, d, f, stamp).await? {
                    return Ok((BlobBody::File(f), len));
                }
            }
            Err(StoreError::BlobUnknown(_)) => {}
            Err(e) => return Err(e.into()),
        }
        let Some(fetches) = &self.inner.fetches else {
            return Err(StoreError::BlobUnknown(d.clone()).into());
        };
        let waiter = match fetches.start(d, whole).await? {
            Started::Lead { size, body } => return Ok((BlobBody::Fetch(body), size)),
            Started::Wait(w) => w,
        };
        match readthrough::wait(waiter).await {
            Outcome::Cached => {
                // Just fetched, hashed and committed (which remembered it as verified).
                let (f, len, _) = self.inner.store.open_blob(d).await?;
                Ok((BlobBody::File(f), len))
            }
            Outcome::NotFound => Err(StoreError::BlobUnknown(d.clone()).into()),
            Outcome::Corrupt => Err(ServiceError::CorruptRemote(d.clone())),
            Outcome::Unavailable(m) => Err(RemoteError::Io(io::Error::other(m)).into()),
        }
    }

    /// Make sure `repo` has its catalog entry in object storage before any object of it is
    /// written there (see `layout::remote_catalog_entry`); once per repository per process.
    async fn catalog(&self, r: &Remote, repo: &RepoName) -> Result<()> {
        let cataloged = || {
            self.inner
                .cataloged
                .lock()
                .unwrap_or_else(|p| p.into_inner())
        };
        if cataloged().contains(repo) {
            return Ok(());
        }
        r.put_bytes(&layout::remote_catalog_entry(repo), Bytes::new())
            .await?;
        cataloged().insert(repo.clone());
        Ok(())
    }

    pub async fn delete_blob(&self, repo: &RepoName, d: &Digest) -> Result<()> {
        let mut existed = false;
        if let Some(r) = &self.inner.remote {
            let key = layout::remote_blob_link(repo, d);
            existed = r.head(&key).await?.is_some();
            r.delete(&key).await?;
        }
        existed |= self.inner.store.unlink_layer(repo, d).await?;
        if !existed {
            return Err(StoreError::BlobUnknown(d.clone()).into());
        }
        Ok(())
    }

    /// Link an existing blob into `repo`. With `from`, only that repository's blobs are
    /// candidates; without it, any blob on the node or in object storage is (the spec's
    /// automatic discovery). Returns false when there is nothing to mount, and the client
    /// gets a fresh session.
    pub async fn mount_blob(
        &self,
        repo: &RepoName,
        d: &Digest,
        from: Option<&RepoName>,
    ) -> Result<bool> {
        let found = match from {
            Some(src) => self.repo_has_blob(src, d).await?,
            None => {
                self.inner.store.has_blob(d).await?
                    || match &self.inner.remote {
                        Some(r) => r.head(&layout::remote_blob(d)).await?.is_some(),
                        None => false,
                    }
            }
        };
        if found {
            if let Some(r) = &self.inner.remote {
                self.catalog(r, repo).await?;
                r.put_bytes(&layout::remote_blob_link(repo, d), Bytes::new())
                    .await?;
            }
            self.inner.store.link_layer(repo, d).await?;
        }
        Ok(found)
    }

    // ---- uploads ---------------------------------------------------------------------

    pub async fn start_upload(&self, repo: &RepoName) -> Result<UploadId> {
        let h = self
            .inner
            .uploads
            .create(repo.clone(), Algorithm::Sha256)
            .await?;
        let id = h.lock().await.id.clone();
        Ok(id)
    }

    /// A whole blob in one request (`POST ?digest=`), hashed with the digest's algorithm.
    pub async fn upload_monolithic<S, E>(
        &self,
        repo: &RepoName,
        expected: &Digest,
        body: S,
    ) -> Result<()>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        let h = self
            .inner
            .uploads
            .create(repo.clone(), expected.algorithm())
            .await?;
        let id = h.lock().await.id.clone();
        let result = self.finish_into(&h, repo, expected, Some(body)).await;
        self.inner.uploads.remove(&id).await;
        result
    }

    /// Append a chunk. `range` is the client's `Content-Range` (inclusive start-end), which
    /// must start exactly where the upload ends.
    pub async fn upload_chunk<S, E>(
        &self,
        repo: &RepoName,
        id: &UploadId,
        range: Option<(u64, u64)>,
        content_length: Option<u64>,
        body: S,
    ) -> Result<u64>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        let h = self.inner.uploads.get(repo, id)?;
        let mut s = h.lock().await;
        if let Some((start, end)) = range {
            if start != s.size {
                return Err(UploadError::OutOfOrder {
                    have: s.size,
                    got: start,
                }
                .into());
            }
            if let Some(len) = content_length {
                if end < start || end - start + 1 != len {
                    return Err(ServiceError::SizeInvalid(format!(
                        "Content-Range {start}-{end} does not match Content-Length {len}"
                    )));
                }
            }
        }
        Ok(s.append(body).await?)
    }

    pub async fn upload_status(&self, repo: &RepoName, id: &UploadId) -> Result<u64> {
        let h = self.inner.uploads.get(repo, id)?;
        let s = h.lock().await;
        Ok(s.size)
    }

    pub async fn cancel_upload(&self, repo: &RepoName, id: &UploadId) -> Result<()> {
        self.inner.uploads.get(repo, id)?;
        self.inner.uploads.remove(id).await;
        Ok(())
    }

    /// `PUT ?digest=`: take the optional last chunk, verify, commit, link. The session ends
    /// whatever the outcome, as the spec requires after a digest mismatch.
    pub async fn upload_complete<S, E>(
        &self,
        repo: &RepoName,
        id: &UploadId,
        expected: &Digest,
        body: Option<S>,
    ) -> Result<()>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        let h = self.inner.uploads.get(repo, id)?;
        let result = self.finish_into(&h, repo, expected, body).await;
        self.inner.uploads.remove(id).await;
        result
    }

    async fn finish_into<S, E>(
        &self,
        h: &Arc<tokio::sync::Mutex<crate::uploads::Session>>,
        repo: &RepoName,
        expected: &Digest,
        body: Option<S>,
    ) -> Result<()>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        let mut s = h.lock().await;
        if let Some(body) = body {
            s.append(body).await?;
        }
        let (mut actual, path) = s.finish().await?;
        if actual.algorithm() != expected.algorithm() {
            actual = rehash(path.clone(), expected.algorithm()).await?;
        }
        if &actual != expected {
            metrics::counter!("flotilla_node_digest_mismatch_total").increment(1);
            return Err(ServiceError::DigestMismatch {
                expected: expected.clone(),
                actual,
            });
        }
        let store = &self.inner.store;
        store.commit_blob(&path, expected).await?;
        // Durable in object storage before the 201; the repository link goes last so a
        // failed write-through leaves nothing a retry could trip over.
        if let Some(r) = &self.inner.remote {
            r.put_blob_file(expected, &store.path(&layout::local_blob(expected)), s.size)
                .await?;
            self.catalog(r, repo).await?;
            r.put_bytes(&layout::remote_blob_link(repo, expected), Bytes::new())
                .await?;
        }
        store.link_layer(repo, expected).await?;
        metrics::counter!("flotilla_node_blobs_committed_total").increment(1);
        metrics::counter!("flotilla_node_blob_bytes_in_total").increment(s.size);
        Ok(())
    }

    // ---- manifests -------------------------------------------------------------------

    pub async fn put_manifest(
        &self,
        repo: &RepoName,
        reference: &flotilla_core::Reference,
        content_type: Option<&str>,
        bytes: Bytes,
    ) -> Result<PutManifest> {
        let limit = self.inner.cfg.manifest_max_bytes;
        if bytes.len() > limit {
            return Err(ServiceError::ManifestTooLarge {
                size: bytes.len(),
                limit,
            });
        }
        let algorithm = match reference {
            flotilla_core::Reference::Digest(d) => d.algorithm(),
            flotilla_core::Reference::Tag(_) => Algorithm::Sha256,
        };
        let digest = Digest::of(algorithm, &bytes);
        if let flotilla_core::Reference::Digest(expected) = reference {
            if expected != &digest {
                return Err(ServiceError::DigestMismatch {
                    expected: expected.clone(),
                    actual: digest,
                });
            }
        }
        let m = manifest::parse(&bytes, content_type)?;
        let store = &self.inner.store;
        for b in &m.blobs {
            if !self.repo_has_blob(repo, b).await? {
                return Err(ServiceError::ManifestBlobUnknown(b.clone()));
            }
        }
        for child in &m.manifests {
            if self.manifest_media_type(repo, child).await?.is_none() {
                return Err(ServiceError::ManifestBlobUnknown(child.clone()));
            }
        }
        // Object storage first: a manifest or tag is acknowledged only once it is durable
        // there, and a failure leaves no local trace of an unacknowledged tag.
        if let Some(r) = &self.inner.remote {
            let blob_key = layout::remote_blob(&digest);
            if r.head(&blob_key).await? != Some(bytes.len() as u64) {
                r.put_bytes(&blob_key, bytes.clone()).await?;
            }
            self.catalog(r, repo).await?;
            r.put_bytes(
                &layout::remote_manifest_link(repo, &digest),
                Bytes::from(m.media_type.clone()),
            )
            .await?;
            if let flotilla_core::Reference::Tag(tag) = reference {
                r.put_bytes(
                    &layout::remote_tag(repo, tag),
                    Bytes::from(digest.to_string()),
                )
                .await?;
            }
        }
        // Visibility order: content, membership, referrer index, tag.
        store.put_blob_bytes(&digest, &bytes).await?;
        store.link_manifest(repo, &digest, &m.media_type).await?;
        if let Some(subject) = &m.subject {
            let desc = ReferrerDescriptor {
                media_type: m.media_type.clone(),
                digest: digest.clone(),
                size: bytes.len() as u64,
                artifact_type: m.artifact_type.clone(),
                annotations: m.annotations.clone(),
            };
            store.put_referrer(repo, subject, &desc).await?;
        }
        if let flotilla_core::Reference::Tag(tag) = reference {
            store.put_tag(repo, tag, &digest).await?;
        }
        metrics::counter!("flotilla_node_manifests_put_total").increment(1);
        Ok(PutManifest {
            digest,
            subject: m.subject,
        })
    }

    /// The media type of a manifest `repo` holds, locally or in object storage (cached).
    async fn manifest_media_type(&self, repo: &RepoName, d: &Digest) -> Result<Option<String>> {
        if let Some(mt) = self.inner.store.manifest_media_type(repo, d).await? {
            return Ok(Some(mt));
        }
        let Some(r) = &self.inner.remote else {
            return Ok(None);
        };
        let Some(bytes) = r
            .get_bytes(&layout::remote_manifest_link(repo, d), 4096)
            .await?
        else {
            return Ok(None);
        };
        let mt = String::from_utf8_lossy(&bytes).into_owned();
        Ok(Some(mt))
    }

    async fn resolve(
        &self,
        repo: &RepoName,
        reference: &flotilla_core::Reference,
    ) -> Result<Digest> {
        let tag = match reference {
            flotilla_core::Reference::Digest(d) => return Ok(d.clone()),
            flotilla_core::Reference::Tag(t) => t,
        };
        if let Some(d) = self.inner.store.get_tag(repo, tag).await? {
            return Ok(d);
        }
        if let Some(r) = &self.inner.remote {
            if let Some(bytes) = r.get_bytes(&layout::remote_tag(repo, tag), 1024).await? {
                if let Ok(d) = String::from_utf8_lossy(&bytes).trim().parse() {
                    return Ok(d);
                }
                tracing::error!(%repo, %tag, "tag object in object storage does not hold a digest");
            }
        }
        Err(StoreError::ManifestUnknown(tag.to_string()).into())
    }

    pub async fn get_manifest(
        &self,
        repo: &RepoName,
        reference: &flotilla_core::Reference,
    ) -> Result<StoredManifest> {
        let digest = self.resolve(repo, reference).await?;
        let store = &self.inner.store;
        let limit = self.inner.cfg.manifest_max_bytes as u64;
        let local_link = store.manifest_media_type(repo, &digest).await?;
        let media_type = match &local_link {
            Some(mt) => mt.clone(),
            None => self
                .manifest_media_type(repo, &digest)
                .await?
                .ok_or_else(|| StoreError::ManifestUnknown(reference.to_string()))?,
        };
        let local = match store.read_blob_bytes(&digest, limit).await {
            Ok(b) if Digest::of(digest.algorithm(), &b) == digest => Ok(b),
            Ok(_) => {
                // Bit rot or tampering: never serve it; quarantine and read through below.
                crate::recovery::quarantine(self, &digest).await?;
                Err(StoreError::BlobUnknown(digest.clone()))
            }
            Err(e) => Err(e),
        };
        let bytes = match local {
            Ok(b) => Bytes::from(b),
            Err(StoreError::BlobUnknown(_)) => {
                let r = self
                    .inner
                    .remote
                    .as_ref()
                    .ok_or_else(|| StoreError::ManifestUnknown(reference.to_string()))?;
                let b = r
                    .get_bytes(&layout::remote_blob(&digest), limit)
                    .await?
                    .ok_or_else(|| StoreError::ManifestUnknown(reference.to_string()))?;
                if Digest::of(digest.algorithm(), &b) != digest {
                    tracing::error!(%digest, "object storage holds a corrupt manifest; not cached");
                    return Err(ServiceError::CorruptRemote(digest));
                }
                store.put_blob_bytes(&digest, &b).await?;
                b
            }
            Err(e) => return Err(e.into()),
        };
        // Cache what was read through, in the same order a push writes it.
        if local_link.is_none() {
            store.link_manifest(repo, &digest, &media_type).await?;
        }
        if let flotilla_core::Reference::Tag(t) = reference {
            if store.get_tag(repo, t).await?.as_ref() != Some(&digest) {
                store.put_tag(repo, t, &digest).await?;
            }
        }
        Ok(StoredManifest {
            bytes,
            media_type,
            digest,
        })
    }

    /// By tag: untag. By digest: remove the manifest from the repository with every tag
    /// pointing at it and its referrer entry.
    pub async fn delete_manifest(
        &self,
        repo: &RepoName,
        reference: &flotilla_core::Reference,
    ) -> Result<()> {
        let store = &self.inner.store;
        match reference {
            flotilla_core::Reference::Tag(t) => {
                let mut existed = false;
                if let Some(r) = &self.inner.remote {
                    let key = layout::remote_tag(repo, t);
                    existed = r.head(&key).await?.is_some();
                    r.delete(&key).await?;
                }
                existed |= store.delete_tag(repo, t).await?;
                if !existed {
                    return Err(StoreError::ManifestUnknown(t.to_string()).into());
                }
            }
            flotilla_core::Reference::Digest(d) => {
                if self.manifest_media_type(repo, d).await?.is_none() {
                    return Err(StoreError::ManifestUnknown(d.to_string()).into());
                }
                if let Some(r) = &self.inner.remote {
                    for tag in r
                        .list_names(&format!("{}tags", layout::remote_repo_prefix(repo)))
                        .await?
                    {
                        let Ok(tag) = tag.parse::<Tag>() else {
                            continue;
                        };
                        let key = layout::remote_tag(repo, &tag);
                        let points_here = r
                            .get_bytes(&key, 1024)
                            .await?
                            .is_some_and(|b| String::from_utf8_lossy(&b).trim() == d.to_string());
                        if points_here {
                            r.delete(&key).await?;
                        }
                    }
                    r.delete(&layout::remote_manifest_link(repo, d)).await?;
                }
                let subject = match store
                    .read_blob_bytes(d, self.inner.cfg.manifest_max_bytes as u64)
                    .await
                {
                    Ok(bytes) => manifest::parse(&bytes, None).ok().and_then(|m| m.subject),
                    Err(_) => None,
                };
                for tag in store.tags_pointing_at(repo, d).await? {
                    store.delete_tag(repo, &tag).await?;
                }
                if let Some(subject) = subject {
                    store.delete_referrer(repo, &subject, d).await?;
                }
                store.unlink_manifest(repo, d).await?;
            }
        }
        Ok(())
    }

    // ---- listing ---------------------------------------------------------------------

    /// Tags in lexical order. With object storage, its listing is authoritative: every tag
    /// write lands there before it is acknowledged, and a rebuilt node's disk may be partial.
    pub async fn list_tags(&self, repo: &RepoName) -> Result<Vec<Tag>> {
        let Some(r) = &self.inner.remote else {
            return Ok(self.inner.store.list_tags(repo).await?);
        };
        let prefix = layout::remote_repo_prefix(repo);
        let mut tags: Vec<Tag> = r
            .list_names(&format!("{prefix}tags"))
            .await?
            .into_iter()
            .filter_map(|t| t.parse().ok())
            .collect();
        if tags.is_empty() && r.list_keys(&prefix).await?.is_empty() {
            return Err(StoreError::NameUnknown(repo.clone()).into());
        }
        tags.sort();
        Ok(tags)
    }

    /// Every repository, from object storage when configured: its catalog entries (one key
    /// per repository) once they are complete, else every key under `repos/`.
    pub async fn list_repos(&self) -> Result<Vec<RepoName>> {
        let Some(r) = &self.inner.remote else {
            return Ok(self.inner.store.list_repos().await?);
        };
        let mut repos: Vec<RepoName> = if self.catalog_is_complete(r).await? {
            r.list_keys(layout::remote_catalog_root())
                .await?
                .iter()
                .filter_map(|k| layout::repo_of_catalog_key(k))
                .collect()
        } else {
            self.repos_from_keys(r).await?
        };
        repos.sort();
        repos.dedup();
        Ok(repos)
    }

    async fn repos_from_keys(&self, r: &Remote) -> Result<Vec<RepoName>> {
        Ok(r.list_keys(layout::remote_repos_root())
            .await?
            .iter()
            .filter_map(|k| layout::repo_of_remote_key(k))
            .collect())
    }

    /// Give every repository in object storage its catalog entry, once per store: data
    /// written before the catalog existed has none. Idempotent, so nodes starting together
    /// may all run it.
    async fn backfill_catalog(&self, r: &Remote) -> Result<()> {
        if self.catalog_is_complete(r).await? {
            return Ok(());
        }
        let mut repos = self.repos_from_keys(r).await?;
        repos.sort();
        repos.dedup();
        for repo in &repos {
            self.catalog(r, repo).await?;
        }
        r.put_bytes(layout::remote_catalog_complete(), Bytes::new())
            .await?;
        self.inner
            .catalog_complete
            .store(true, std::sync::atomic::Ordering::Relaxed);
        tracing::info!(repos = repos.len(), "catalog entries backfilled");
        Ok(())
    }

    /// Whether every repository has its catalog entry; asked of object storage only until
    /// the answer is yes (the marker is never removed).
    async fn catalog_is_complete(&self, r: &Remote) -> Result<bool> {
        use std::sync::atomic::Ordering;
        if self.inner.catalog_complete.load(Ordering::Relaxed) {
            return Ok(true);
        }
        let done = r.head(layout::remote_catalog_complete()).await?.is_some();
        self.inner.catalog_complete.store(done, Ordering::Relaxed);
        Ok(done)
    }

    /// Referrers of `subject` still present in the repository, optionally filtered.
    pub async fn referrers(
        &self,
        repo: &RepoName,
        subject: &Digest,
        artifact_type: Option<&str>,
    ) -> Result<Vec<ReferrerDescriptor>> {
        let mut out = Vec::new();
        for desc in self.inner.store.list_referrers(repo, subject).await? {
            if artifact_type.is_some_and(|a| desc.artifact_type.as_deref() != Some(a)) {
                continue;
            }
            if self
                .inner
                .store
                .manifest_media_type(repo, &desc.digest)
                .await?
                .is_some()
            {
                out.push(desc);
            }
        }
        Ok(out)
    }
}

/// Hash a file once more with another algorithm (see the `uploads` module doc).
async fn rehash(path: PathBuf, algorithm: Algorithm) -> Result<Digest> {
    tokio::task::spawn_blocking(move || -> io::Result<Digest> {
        use std::io::Read;
        let mut f = std::fs::File::open(&path)?;
        let mut h = DigestHasher::new(algorithm);
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
        Ok(h.finish())
    })
    .await
    .map_err(|e| UploadError::Io(io::Error::other(e)))?
    .map_err(|e| UploadError::Io(e).into())
}

/// Check (or create) `node.json`; returns whether the disk still needs a seeder, and the id of
/// that reseed.
async fn check_identity(store: &LocalStore, cfg: &NodeConfig) -> Result<(bool, String), NodeError> {
    let path = store.path(layout::local_identity());
    let io_err = |source| NodeError::DataDir {
        path: path.clone(),
        source,
    };
    match tokio::fs::read(&path).await {
        Ok(bytes) => {
            let id: Identity = serde_json::from_slice(&bytes)
                .map_err(|e| io_err(io::Error::new(io::ErrorKind::InvalidData, e)))?;
            if id.id != cfg.id.as_str() {
                return Err(NodeError::IdentityMismatch {
                    expected: cfg.id.to_string(),
                    found: id.id,
                });
            }
            Ok((id.needs_seed, id.seed_id.unwrap_or_default()))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            // Only a cluster member with object storage can be seeded, so only it waits.
            let needs_seed = cfg.store_url.is_some() && cfg.meta_url.is_some();
            let seed_id = needs_seed.then(|| uuid::Uuid::new_v4().simple().to_string());
            write_identity(store, cfg, needs_seed, seed_id.clone()).await?;
            Ok((needs_seed, seed_id.unwrap_or_default()))
        }
        Err(e) => Err(io_err(e)),
    }
}

async fn write_identity(
    store: &LocalStore,
    cfg: &NodeConfig,
    needs_seed: bool,
    seed_id: Option<String>,
) -> Result<(), NodeError> {
    let path = store.path(layout::local_identity());
    let io_err = |source| NodeError::DataDir {
        path: path.clone(),
        source,
    };
    let id = Identity {
        id: cfg.id.to_string(),
        rack: cfg.rack.to_string(),
        layout: layout::LAYOUT_VERSION,
        needs_seed,
        seed_id,
    };
    let bytes = serde_json::to_vec_pretty(&id).map_err(|e| io_err(io::Error::other(e)))?;
    crate::store::write_atomic(&store.tmp_dir(), &path, &bytes)
        .await
        .map_err(io_err)
}
