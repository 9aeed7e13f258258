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

#[derive(Debug)]
struct Inner {
    cfg: NodeConfig,
    store: LocalStore,
    uploads: Uploads,
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

#[derive(serde::Serialize, serde::Deserialize)]
struct Identity {
    id: String,
    rack: String,
    layout: u32,
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
        check_identity(&store, &cfg).await?;
        let uploads = Uploads::new(&cfg.data_dir);
        Ok(NodeService {
            inner: Arc::new(Inner {
                cfg,
                store,
                uploads,
                cancel: CancellationToken::new(),
                tasks: TaskTracker::new(),
            }),
        })
    }

    pub fn config(&self) -> &NodeConfig {
        &self.inner.cfg
    }

    pub fn store(&self) -> &LocalStore {
        &self.inner.store
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
        BackgroundTasks {
            cancel,
            tasks: self.inner.tasks.clone(),
        }
    }

    // ---- blobs -----------------------------------------------------------------------

    /// Size of a blob the repository holds.
    pub async fn stat_blob(&self, repo: &RepoName, d: &Digest) -> Result<u64> {
        if !self.inner.store.has_layer(repo, d).await? {
            return Err(StoreError::BlobUnknown(d.clone()).into());
        }
        self.inner
            .store
            .blob_size(d)
            .await?
            .ok_or_else(|| StoreError::BlobUnknown(d.clone()).into())
    }

    pub async fn open_blob(&self, repo: &RepoName, d: &Digest) -> Result<(tokio::fs::File, u64)> {
        if !self.inner.store.has_layer(repo, d).await? {
            return Err(StoreError::BlobUnknown(d.clone()).into());
        }
        Ok(self.inner.store.open_blob(d).await?)
    }

    pub async fn delete_blob(&self, repo: &RepoName, d: &Digest) -> Result<()> {
        if !self.inner.store.unlink_layer(repo, d).await? {
            return Err(StoreError::BlobUnknown(d.clone()).into());
        }
        Ok(())
    }

    /// Link an existing blob into `repo`. With `from`, only that repository's blobs are
    /// candidates; without it, any blob on the node is (the spec's automatic discovery).
    /// Returns false when there is nothing to mount, and the client gets a fresh session.
    pub async fn mount_blob(
        &self,
        repo: &RepoName,
        d: &Digest,
        from: Option<&RepoName>,
    ) -> Result<bool> {
        let found = match from {
            Some(src) => {
                self.inner.store.has_layer(src, d).await? && self.inner.store.has_blob(d).await?
            }
            None => self.inner.store.has_blob(d).await?,
        };
        if found {
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
        self.inner.store.commit_blob(&path, expected).await?;
        self.inner.store.link_layer(repo, expected).await?;
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
            if !(store.has_layer(repo, b).await? && store.has_blob(b).await?) {
                return Err(ServiceError::ManifestBlobUnknown(b.clone()));
            }
        }
        for child in &m.manifests {
            if store.manifest_media_type(repo, child).await?.is_none() {
                return Err(ServiceError::ManifestBlobUnknown(child.clone()));
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

    async fn resolve(
        &self,
        repo: &RepoName,
        reference: &flotilla_core::Reference,
    ) -> Result<Digest> {
        match reference {
            flotilla_core::Reference::Digest(d) => Ok(d.clone()),
            flotilla_core::Reference::Tag(t) => self
                .inner
                .store
                .get_tag(repo, t)
                .await?
                .ok_or_else(|| StoreError::ManifestUnknown(t.to_string()).into()),
        }
    }

    pub async fn get_manifest(
        &self,
        repo: &RepoName,
        reference: &flotilla_core::Reference,
    ) -> Result<StoredManifest> {
        let digest = self.resolve(repo, reference).await?;
        let media_type = self
            .inner
            .store
            .manifest_media_type(repo, &digest)
            .await?
            .ok_or_else(|| StoreError::ManifestUnknown(reference.to_string()))?;
        let bytes = self
            .inner
            .store
            .read_blob_bytes(&digest, self.inner.cfg.manifest_max_bytes as u64)
            .await
            .map_err(|e| match e {
                StoreError::BlobUnknown(_) => StoreError::ManifestUnknown(reference.to_string()),
                other => other,
            })?;
        Ok(StoredManifest {
            bytes: Bytes::from(bytes),
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
                if !store.delete_tag(repo, t).await? {
                    return Err(StoreError::ManifestUnknown(t.to_string()).into());
                }
            }
            flotilla_core::Reference::Digest(d) => {
                if store.manifest_media_type(repo, d).await?.is_none() {
                    return Err(StoreError::ManifestUnknown(d.to_string()).into());
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

    pub async fn list_tags(&self, repo: &RepoName) -> Result<Vec<Tag>> {
        Ok(self.inner.store.list_tags(repo).await?)
    }

    pub async fn list_repos(&self) -> Result<Vec<RepoName>> {
        Ok(self.inner.store.list_repos().await?)
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

async fn check_identity(store: &LocalStore, cfg: &NodeConfig) -> Result<(), NodeError> {
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
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let id = Identity {
                id: cfg.id.to_string(),
                rack: cfg.rack.to_string(),
                layout: layout::LAYOUT_VERSION,
            };
            let bytes = serde_json::to_vec_pretty(&id).map_err(|e| io_err(io::Error::other(e)))?;
            crate::store::write_atomic(&store.tmp_dir(), &path, &bytes)
                .await
                .map_err(io_err)
        }
        Err(e) => Err(io_err(e)),
    }
}
