//! The read path: a blob or manifest GET/HEAD from the local store, verified before it is
//! served (`verify`), read through object storage on a miss (`through`), and a corrupt local
//! copy quarantined and replaced, never served.

pub(crate) mod through;
pub(crate) mod verify;

use std::io;

use bytes::Bytes;
use flotilla_core::{layout, Digest, RepoName};

use self::through::{Outcome, Started};
use crate::service::{Result, ServiceError};
use crate::store::StoreError;
use crate::NodeService;
use flotilla_objstore::RemoteError;

/// A manifest as stored: its exact bytes and the media type it was pushed with.
#[derive(Debug)]
pub(crate) struct StoredManifest {
    pub bytes: Bytes,
    pub media_type: String,
    pub digest: Digest,
}

/// Where the bytes of a blob GET come from.
#[derive(Debug)]
pub(crate) enum BlobBody {
    /// A local file verified since its bytes last changed (see `store::verified`).
    File(tokio::fs::File),
    /// A small local blob, already verified against its digest.
    Bytes(Bytes),
    /// A large local blob to stream whole, verified before its last chunk is released.
    Checked(tokio::fs::File, verify::Check),
    /// A read-through in progress, verified before its last chunk is released.
    Fetch(through::FetchStream),
}

impl NodeService {
    /// Make sure `repo` holds `d`: a local link, or a link in object storage (then cached).
    pub(crate) async fn ensure_linked(&self, repo: &RepoName, d: &Digest) -> Result<()> {
        if self.inner.store.has_layer(repo, d).await? {
            return Ok(());
        }
        if let Some(r) = &self.inner.remote {
            let link = layout::remote_blob_link(repo, d);
            if r.head(&link).await?.is_some() {
                self.confirm_remote(link);
                self.inner.store.link_layer(repo, d).await?;
                return Ok(());
            }
        }
        Err(StoreError::BlobUnknown(d.clone()).into())
    }

    /// Whether `repo` holds `d` with its bytes available locally or in object storage.
    pub(crate) async fn repo_has_blob(&self, repo: &RepoName, d: &Digest) -> Result<bool> {
        match self.ensure_linked(repo, d).await {
            Ok(()) => {}
            Err(ServiceError::Store(StoreError::BlobUnknown(_))) => return Ok(false),
            Err(e) => return Err(e),
        }
        if self.inner.store.has_blob(d).await? {
            return Ok(true);
        }
        let Some(r) = &self.inner.remote else {
            return Ok(false);
        };
        let key = layout::remote_blob(d);
        let found = r.head(&key).await?.is_some();
        if found {
            self.confirm_remote(key);
        }
        Ok(found)
    }

    /// Size of a blob the repository holds.
    pub(crate) async fn stat_blob(&self, repo: &RepoName, d: &Digest) -> Result<u64> {
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
    pub(crate) async fn open_blob(
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
            Ok((f, len, stamp)) if len < through::WAIT_WHOLE_BELOW => {
                // Small blobs are verified whole before the response starts; a mismatch is
                // quarantined and read through again below.
                if let Some(bytes) = verify::read_verified(self, d, f, len, stamp).await? {
                    return Ok((BlobBody::Bytes(bytes), len));
                }
            }
            Ok((f, len, stamp)) if whole => {
                let check = verify::Check {
                    node: self.clone(),
                    digest: d.clone(),
                    stamp,
                };
                return Ok((BlobBody::Checked(f, check), len));
            }
            Ok((f, len, stamp)) => {
                // A range of a blob not verified in its current state: hash it all first.
                if let Some(f) = verify::verify_open(self, d, f, stamp).await? {
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
        match through::wait(waiter).await {
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

    /// The media type of a manifest `repo` holds, locally or in object storage (cached).
    pub(crate) async fn manifest_media_type(
        &self,
        repo: &RepoName,
        d: &Digest,
    ) -> Result<Option<String>> {
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
    ) -> Result<(Digest, bool)> {
        let tag = match reference {
            flotilla_core::Reference::Digest(d) => return Ok((d.clone(), false)),
            flotilla_core::Reference::Tag(t) => t,
        };
        if let Some(d) = self.inner.store.get_tag(repo, tag).await? {
            return Ok((d, false));
        }
        if let Some(r) = &self.inner.remote {
            if let Some(bytes) = r.get_bytes(&layout::remote_tag(repo, tag), 1024).await? {
                if let Ok(d) = String::from_utf8_lossy(&bytes).trim().parse() {
                    return Ok((d, true));
                }
                tracing::error!(%repo, %tag, "tag object in object storage does not hold a digest");
            }
        }
        Err(StoreError::ManifestUnknown(tag.to_string()).into())
    }

    pub(crate) async fn get_manifest(
        &self,
        repo: &RepoName,
        reference: &flotilla_core::Reference,
    ) -> Result<StoredManifest> {
        let (digest, from_remote) = self.resolve(repo, reference).await?;
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
                verify::quarantine(self, &digest).await?;
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
        // A tag found only in object storage is kept, and only if no write put one here
        // meanwhile: a tag this node already holds is never replaced by what a read saw.
        if let flotilla_core::Reference::Tag(t) = reference {
            if from_remote {
                let _guard = self.inner.tag_locks.lock(repo, t).await;
                if store.get_tag(repo, t).await?.is_none() {
                    store.put_tag(repo, t, &digest).await?;
                }
            }
        }
        Ok(StoredManifest {
            bytes,
            media_type,
            digest,
        })
    }
}
