//! The write path: upload sessions (`uploads`), commit of a verified blob, write-through to
//! object storage before the 201, manifests and tags, deletes and mounts.
//!
//! Write order for a blob: bytes stream into `uploads/<id>` while hashed → `fsync` → digest
//! compared with the client's → `rename` to `blobs/...` → `fsync` of the directory → object
//! storage put of the blob (skipped if already there), of the catalog entry and of the
//! repository link → local repository link written atomically → 201. For a manifest: object
//! storage first (blob bytes, catalog entry, membership, tag), then locally blob bytes,
//! revision link, referrer entry, tag (each temp file + fsync + rename + directory fsync),
//! then 201. An object-storage failure answers 503 `UNAVAILABLE` and leaves no local link or
//! tag, so a retry starts clean.
//!
//! What a `kill -9` leaves at each step: before the rename, only files under `uploads/` and
//! `tmp/`, which startup deletes (sessions do not survive a restart; clients restart the
//! upload). After the rename, a complete, verified blob, possibly without its link: harmless,
//! a retry re-links it. A tag is written last, so it never names a missing manifest.
//!
//! Assumed of the filesystem: `rename` within one filesystem is atomic; `fsync` of a file and
//! of its directory makes the data and the name durable; `uploads/`, `tmp/` and `blobs/` share
//! one filesystem.

pub(crate) mod uploads;

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use flotilla_core::{layout, Algorithm, Digest, DigestHasher, RepoName, Tag, UploadId};
use futures::{Stream, StreamExt, TryStreamExt};

use self::uploads::UploadError;
use crate::manifest;
use crate::service::{Result, ServiceError};
use crate::store::{ReferrerDescriptor, StoreError};
use crate::NodeService;
use flotilla_objstore::Remote;

/// What a successful manifest push returns to the client.
#[derive(Debug)]
pub(crate) struct PutManifest {
    pub digest: Digest,
    pub subject: Option<Digest>,
}

impl NodeService {
    /// Make sure `repo` has its catalog entry in object storage before any object of it is
    /// written there (see `layout::remote_catalog_entry`); once per repository per process.
    pub(crate) async fn catalog(&self, r: &Remote, repo: &RepoName) -> Result<()> {
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

    pub(crate) async fn delete_blob(&self, repo: &RepoName, d: &Digest) -> Result<()> {
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
    pub(crate) async fn mount_blob(
        &self,
        repo: &RepoName,
        d: &Digest,
        from: Option<&RepoName>,
    ) -> Result<bool> {
        self.ensure_writable()?;
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

    pub(crate) async fn start_upload(&self, repo: &RepoName) -> Result<UploadId> {
        self.ensure_writable()?;
        let h = self
            .inner
            .uploads
            .create(repo.clone(), Algorithm::Sha256)
            .await?;
        let id = h.lock().await.id.clone();
        Ok(id)
    }

    /// A whole blob in one request (`POST ?digest=`), hashed with the digest's algorithm.
    pub(crate) async fn upload_monolithic<S, E>(
        &self,
        repo: &RepoName,
        expected: &Digest,
        body: S,
    ) -> Result<()>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        self.ensure_writable()?;
        let h = self
            .inner
            .uploads
            .create(repo.clone(), expected.algorithm())
            .await?;
        let id = h.lock().await.id.clone();
        let result = self.finish_into(&h, repo, expected, Some(body)).await;
        let result = self.note_disk(result);
        self.inner.uploads.remove(&id).await;
        result
    }

    /// Append a chunk. `range` is the client's `Content-Range` (inclusive start-end), which
    /// must start exactly where the upload ends.
    pub(crate) async fn upload_chunk<S, E>(
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
        self.ensure_writable()?;
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
        let max = self.inner.cfg.max_blob_bytes;
        let appended = self.note_disk(s.append(body, max).await.map_err(ServiceError::from));
        let too_large = matches!(
            appended,
            Err(ServiceError::Upload(UploadError::TooLarge { .. }))
        );
        if too_large || appended.as_ref().is_err_and(ServiceError::is_disk_full) {
            // The bytes that did land only hold the disk full: drop the session with them.
            drop(s);
            self.inner.uploads.remove(id).await;
        }
        appended
    }

    pub(crate) async fn upload_status(&self, repo: &RepoName, id: &UploadId) -> Result<u64> {
        let h = self.inner.uploads.get(repo, id)?;
        let s = h.lock().await;
        Ok(s.size)
    }

    pub(crate) async fn cancel_upload(&self, repo: &RepoName, id: &UploadId) -> Result<()> {
        self.inner.uploads.get(repo, id)?;
        self.inner.uploads.remove(id).await;
        Ok(())
    }

    /// `PUT ?digest=`: take the optional last chunk, verify, commit, link. The session ends
    /// whatever the outcome, as the spec requires after a digest mismatch.
    pub(crate) async fn upload_complete<S, E>(
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
        let result = match self.ensure_writable() {
            Ok(()) => self.finish_into(&h, repo, expected, body).await,
            Err(e) => Err(e),
        };
        self.inner.uploads.remove(id).await;
        self.note_disk(result)
    }

    async fn finish_into<S, E>(
        &self,
        h: &Arc<tokio::sync::Mutex<uploads::Session>>,
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
            s.append(body, self.inner.cfg.max_blob_bytes).await?;
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
            self.confirm_remote(layout::remote_blob(expected));
            self.catalog(r, repo).await?;
            let link = layout::remote_blob_link(repo, expected);
            r.put_bytes(&link, Bytes::new()).await?;
            self.confirm_remote(link);
        }
        store.link_layer(repo, expected).await?;
        metrics::counter!("flotilla_node_blobs_committed_total").increment(1);
        metrics::counter!("flotilla_node_blob_bytes_in_total").increment(s.size);
        Ok(())
    }

    // ---- manifests -------------------------------------------------------------------

    pub(crate) async fn put_manifest(
        &self,
        repo: &RepoName,
        reference: &flotilla_core::Reference,
        content_type: Option<&str>,
        bytes: Bytes,
        deadline: Deadline,
    ) -> Result<PutManifest> {
        self.ensure_writable()?;
        deadline.check()?;
        let put = self
            .put_manifest_inner(repo, reference, content_type, bytes, deadline)
            .await;
        self.note_disk(put)
    }

    async fn put_manifest_inner(
        &self,
        repo: &RepoName,
        reference: &flotilla_core::Reference,
        content_type: Option<&str>,
        bytes: Bytes,
        deadline: Deadline,
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
        // Checked concurrently: each may cost object-storage HEADs.
        let checks = m.blobs.iter().cloned().map(|b| {
            let (me, repo) = (self.clone(), repo.clone());
            async move {
                if !me.repo_has_blob(&repo, &b).await? {
                    return Err(ServiceError::ManifestBlobUnknown(b));
                }
                // The client may have skipped the upload because this node's disk had the
                // blob: the acknowledgement must not depend on an object storage has lost.
                me.ensure_blob_durable(&repo, &b).await
            }
        });
        futures::stream::iter(checks)
            .buffer_unordered(8)
            .try_collect::<Vec<()>>()
            .await?;
        for child in &m.manifests {
            let Some(media_type) = self.manifest_media_type(repo, child).await? else {
                return Err(ServiceError::ManifestBlobUnknown(child.clone()));
            };
            self.ensure_manifest_durable(repo, child, &media_type)
                .await?;
        }
        // The tag's lock from its object-storage write to its local one: nothing on this
        // node can interleave an older value between the two.
        let _tag_guard = match reference {
            flotilla_core::Reference::Tag(tag) => Some(self.inner.tag_locks.lock(repo, tag).await),
            flotilla_core::Reference::Digest(_) => None,
        };
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
                deadline.check()?;
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
            deadline.check()?;
            store.put_tag(repo, tag, &digest).await?;
        }
        metrics::counter!("flotilla_node_manifests_put_total").increment(1);
        Ok(PutManifest {
            digest,
            subject: m.subject,
        })
    }
    /// By tag: untag. By digest: remove the manifest from the repository with every tag
    /// pointing at it and its referrer entry.
    pub(crate) async fn delete_manifest(
        &self,
        repo: &RepoName,
        reference: &flotilla_core::Reference,
        deadline: Deadline,
    ) -> Result<()> {
        deadline.check()?;
        let store = &self.inner.store;
        match reference {
            flotilla_core::Reference::Tag(t) => {
                let _guard = self.inner.tag_locks.lock(repo, t).await;
                let mut existed = false;
                if let Some(r) = &self.inner.remote {
                    let key = layout::remote_tag(repo, t);
                    existed = r.head(&key).await?.is_some();
                    deadline.check()?;
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
                    for tag in r.list_names(&layout::remote_tags_dir(repo)).await? {
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

/// The router's deadline for a manifest or tag write
/// ([`registry_client::WRITE_DEADLINE_HEADER`]), checked right before each step that makes
/// the write visible (the tag in object storage, then on disk). A write without one (a
/// client talking to a standalone node) has no deadline.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Deadline(pub(crate) Option<u64>);

impl Deadline {
    pub(crate) fn from_headers(h: &http::HeaderMap) -> Self {
        Deadline(
            h.get(registry_client::WRITE_DEADLINE_HEADER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok()),
        )
    }

    fn check(&self) -> Result<()> {
        let Some(at) = self.0 else { return Ok(()) };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        if now >= at {
            metrics::counter!("flotilla_node_late_writes_refused_total").increment(1);
            return Err(ServiceError::DeadlinePassed);
        }
        Ok(())
    }
}
