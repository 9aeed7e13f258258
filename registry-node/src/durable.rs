//! Object storage checked, not trusted blindly: before an acknowledgement depends on a blob
//! (a manifest naming it), the node makes sure object storage holds the blob and the
//! repository's link to it, and when it does not, puts this node's verified copy back. The
//! scrubber runs the same check for every blob it verifies, so an object lost from the
//! store (deleted by hand, a bucket policy, a bad restore) is repaired from any node that
//! still holds it.
//!
//! A bounded memo of recent confirmations (a successful upload or HEAD) keeps the common
//! push — blobs uploaded seconds before the manifest — free of extra requests; a push that
//! deduplicated against a local copy (the client's HEAD said the blob exists) pays one HEAD
//! per blob and link once the proof is older than `remote_confirm_ttl` (60 s by default). An
//! object lost within that window of its upload is caught by the scrubber, which always
//! asks.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use flotilla_core::layout::{self, RemoteKey};
use flotilla_core::{Digest, RepoName};

use crate::read::verify::{file_matches, quarantine};
use crate::service::{Result, ServiceError};
use crate::store::io_err;
use crate::NodeService;

/// Entries kept at most; the memo is cleared when full (a miss only costs a HEAD).
const CONFIRMED_CAP: usize = 65_536;

/// Object-storage keys known to exist, with when that was last seen.
#[derive(Debug)]
pub(crate) struct Confirmed {
    seen: Mutex<HashMap<RemoteKey, Instant>>,
    /// How long a confirmation is trusted: long enough to cover a push, short enough that a
    /// later loss is noticed by the next push that depends on the object.
    ttl: Duration,
}

impl Confirmed {
    pub(crate) fn new(ttl: Duration) -> Self {
        Confirmed {
            seen: Mutex::default(),
            ttl,
        }
    }

    pub(crate) fn insert(&self, key: RemoteKey) {
        if self.ttl.is_zero() {
            return;
        }
        let mut m = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if m.len() >= CONFIRMED_CAP {
            m.clear();
        }
        m.insert(key, Instant::now());
    }

    fn fresh(&self, key: &RemoteKey) -> bool {
        let m = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        m.get(key).is_some_and(|t| t.elapsed() < self.ttl)
    }

    fn forget(&self, key: &RemoteKey) {
        let mut m = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        m.remove(key);
    }
}

/// What a check of one blob in object storage found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RemoteBlob {
    /// Object storage holds it (or no object storage is configured).
    Present,
    /// It was missing and this node's verified copy was uploaded.
    Repaired,
    /// It is missing and this node has no verified copy to restore it from.
    Lost,
}

impl NodeService {
    /// Record that object storage holds `key` (after a successful put or HEAD).
    pub(crate) fn confirm_remote(&self, key: RemoteKey) {
        self.inner.confirmed.insert(key);
    }

    /// Make sure object storage holds blob `d` and `repo`'s link to it, restoring either from
    /// this node when missing. `Err(ManifestBlobUnknown)` when the bytes exist nowhere.
    pub(crate) async fn ensure_blob_durable(&self, repo: &RepoName, d: &Digest) -> Result<()> {
        let link = layout::remote_blob_link(repo, d);
        self.ensure_durable(repo, d, link, bytes::Bytes::new())
            .await
    }

    /// [`Self::ensure_blob_durable`] for a child manifest of an index: its bytes and the
    /// repository's revision link (holding `media_type`).
    pub(crate) async fn ensure_manifest_durable(
        &self,
        repo: &RepoName,
        d: &Digest,
        media_type: &str,
    ) -> Result<()> {
        let link = layout::remote_manifest_link(repo, d);
        let body = bytes::Bytes::from(media_type.to_owned());
        self.ensure_durable(repo, d, link, body).await
    }

    /// The bytes of `d` and `repo`'s `link` to them (restored with `link_body`).
    async fn ensure_durable(
        &self,
        repo: &RepoName,
        d: &Digest,
        link: RemoteKey,
        link_body: bytes::Bytes,
    ) -> Result<()> {
        let Some(r) = &self.inner.remote else {
            return Ok(());
        };
        if self.check_remote_blob(d, false).await? == RemoteBlob::Lost {
            return Err(ServiceError::ManifestBlobUnknown(d.clone()));
        }
        if !self.inner.confirmed.fresh(&link) {
            if r.head(&link).await?.is_none() {
                tracing::warn!(%repo, digest = %d, %link, "object storage lacked a link this node holds; restored");
                metrics::counter!("flotilla_node_remote_repaired_total", "kind" => "link")
                    .increment(1);
                self.catalog(r, repo).await?;
                r.put_bytes(&link, link_body).await?;
            }
            self.confirm_remote(link);
        }
        Ok(())
    }

    /// Whether object storage holds blob `d`; when it does not and this node has a copy that
    /// verifies, upload it. `recheck` ignores the memo (the scrubber asks every time).
    pub(crate) async fn check_remote_blob(&self, d: &Digest, recheck: bool) -> Result<RemoteBlob> {
        let Some(r) = &self.inner.remote else {
            return Ok(RemoteBlob::Present);
        };
        let key = layout::remote_blob(d);
        if !recheck && self.inner.confirmed.fresh(&key) {
            return Ok(RemoteBlob::Present);
        }
        if r.head(&key).await?.is_some() {
            self.confirm_remote(key);
            return Ok(RemoteBlob::Present);
        }
        self.inner.confirmed.forget(&key);
        let store = &self.inner.store;
        let Some(size) = store.blob_size(d).await? else {
            tracing::error!(digest = %d, "object storage lacks a blob and this node has no copy");
            metrics::counter!("flotilla_node_remote_lost_total").increment(1);
            return Ok(RemoteBlob::Lost);
        };
        let path = store.path(&layout::local_blob(d));
        match file_matches(self, &path, d, 0, None)
            .await
            .map_err(io_err(&path))?
        {
            Some(true) => {}
            Some(false) => {
                quarantine(self, d).await?;
                return Ok(RemoteBlob::Lost);
            }
            None => return Ok(RemoteBlob::Lost),
        }
        r.put_blob_file(d, &path, size).await?;
        tracing::warn!(digest = %d, size, "object storage lacked a blob; restored from this node's verified copy");
        metrics::counter!("flotilla_node_remote_repaired_total", "kind" => "blob").increment(1);
        self.confirm_remote(key);
        Ok(RemoteBlob::Repaired)
    }
}
