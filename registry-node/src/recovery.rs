//! Recovery on the node side: seeding a repository from object storage (what the seeder asks
//! for through `POST /internal/v1/seed`), verification of local blobs on read, quarantine of
//! blobs whose bytes do not match their digest, and the background scrubber.
//!
//! Why the node does the copying rather than the seeder: the node already owns the one code
//! path that fetches, hashes and commits object-storage bytes (`readthrough`), so a seeded
//! blob goes through exactly the verification a client read does, and the seeder stays a
//! coordinator that moves no bytes.
//!
//! Verification on read: a local blob under [`readthrough::WAIT_WHOLE_BELOW`] is hashed whole before the
//! response starts; a larger one streamed whole holds back its last chunk until the digest
//! checks out (as a read-through does), so a client never receives a complete corrupt blob.
//! A `Range` read of a large blob cannot be verified and is served as stored: that window
//! stays open until the scrubber reaches the blob (documented in ARCHITECTURE.md).

use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::{Duration, Instant};

use bytes::Bytes;
use flotilla_core::{layout, Digest, DigestHasher, RepoName, Tag};
use futures::{Stream, StreamExt};
use tokio::io::AsyncReadExt;
use tokio_util::sync::CancellationToken;

use crate::readthrough::{self, Outcome, Started};
use crate::remote::RemoteError;
use crate::service::ServiceError;
use crate::store::{io_err, ReferrerDescriptor, StoreError};
use crate::NodeService;

const CHUNK: usize = 256 * 1024;

/// Local directory that receives blobs failing verification (kept for inspection, never
/// served; nothing reads from it).
pub const QUARANTINE_DIR: &str = "quarantine";

/// A verified stream of a local blob's bytes (see [`verifying_stream`]).
pub struct VerifyingStream(Pin<Box<dyn Stream<Item = Result<Bytes, io::Error>> + Send>>);

impl std::fmt::Debug for VerifyingStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("VerifyingStream")
    }
}

impl Stream for VerifyingStream {
    type Item = Result<Bytes, io::Error>;

    fn poll_next(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        self.0.as_mut().poll_next(cx)
    }
}

/// What seeding one repository did.
#[derive(Clone, Copy, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct SeedStats {
    /// Objects of the repository now present and verified locally (tags, manifests, blobs).
    pub objects: u64,
    /// Bytes of blobs and manifests now present and verified locally.
    pub bytes: u64,
    /// Of those, bytes fetched from object storage by this call.
    pub fetched_bytes: u64,
    /// Links whose blob object storage does not hold (reported, not fatal).
    pub missing: u64,
}

impl SeedStats {
    /// Count one object: `(size, bytes fetched)` when present, `None` when object storage
    /// lacks it.
    fn count(&mut self, got: Option<(u64, u64)>) {
        match got {
            Some((size, fetched)) => {
                self.objects += 1;
                self.bytes += size;
                self.fetched_bytes += fetched;
            }
            None => self.missing += 1,
        }
    }
}

/// Move a blob that failed verification out of `blobs/` so it is never served again.
pub async fn quarantine(node: &NodeService, d: &Digest) -> Result<(), StoreError> {
    let store = node.store();
    let src = store.path(&layout::local_blob(d));
    let dir = store.path(QUARANTINE_DIR);
    tokio::fs::create_dir_all(&dir)
        .await
        .map_err(io_err(&dir))?;
    let dest = dir.join(format!(
        "{}-{}-{}",
        d.algorithm(),
        d.hex(),
        uuid::Uuid::new_v4().simple()
    ));
    match tokio::fs::rename(&src, &dest).await {
        Ok(()) => {
            tracing::error!(digest = %d, to = %dest.display(), "local blob failed verification; quarantined");
            metrics::counter!("flotilla_node_quarantined_total").increment(1);
            Ok(())
        }
        // Someone else quarantined it first.
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err(&src)(e)),
    }
}

/// Fetch `d` from object storage into the cache (single-flight, verified), unless present.
pub async fn repair(node: &NodeService, d: &Digest) -> Result<(), ServiceError> {
    let Some(fetches) = node.fetches() else {
        return Err(StoreError::BlobUnknown(d.clone()).into());
    };
    let w = match fetches.start(d, false).await? {
        Started::Wait(w) => w,
        // Not asked to lead; cannot happen, but draining it would also be correct.
        Started::Lead { .. } => return Ok(()),
    };
    match readthrough::wait(w).await {
        Outcome::Cached => Ok(()),
        Outcome::NotFound => Err(StoreError::BlobUnknown(d.clone()).into()),
        Outcome::Corrupt => Err(ServiceError::CorruptRemote(d.clone())),
        Outcome::Unavailable(m) => Err(RemoteError::Io(io::Error::other(m)).into()),
    }
}

/// Read a small local blob whole and check it; `None` (after quarantining it) on a mismatch.
pub async fn read_verified(
    node: &NodeService,
    d: &Digest,
    mut f: tokio::fs::File,
    len: u64,
) -> Result<Option<Bytes>, ServiceError> {
    let mut buf = Vec::with_capacity(len as usize);
    let path = node.store().path(&layout::local_blob(d));
    f.read_to_end(&mut buf).await.map_err(io_err(&path))?;
    if Digest::of(d.algorithm(), &buf) == *d {
        return Ok(Some(Bytes::from(buf)));
    }
    metrics::counter!("flotilla_node_read_corrupt_total").increment(1);
    quarantine(node, d).await?;
    Ok(None)
}

/// Stream a local blob, releasing the last chunk only once the whole file hashed to `d`; on
/// a mismatch the stream ends with an error (the client sees an aborted transfer) and the
/// blob is quarantined, so the next read fetches it again from object storage.
///
/// Reading and hashing run on a blocking thread in 1 MiB units and hand chunks over a small
/// bounded channel, so verification overlaps with sending instead of adding to it: a read is
/// bounded by the slower of sha256 and the network, not by their sum.
pub fn verifying_stream(node: NodeService, d: &Digest, file: tokio::fs::File) -> VerifyingStream {
    const UNIT: usize = 1024 * 1024;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, io::Error>>(4);
    let d = d.clone();
    let handle = tokio::runtime::Handle::current();
    let file = file.try_into_std();
    tokio::task::spawn_blocking(move || {
        use std::io::Read;
        let mut file = match file {
            Ok(f) => f,
            Err(_) => {
                let _ = tx.blocking_send(Err(io::Error::other("blob file busy")));
                return;
            }
        };
        let mut hasher = DigestHasher::new(d.algorithm());
        let mut held: Option<Bytes> = None;
        loop {
            let mut buf = vec![0u8; UNIT];
            let mut filled = 0;
            while filled < UNIT {
                match file.read(&mut buf[filled..]) {
                    Ok(0) => break,
                    Ok(n) => filled += n,
                    Err(e) => {
                        let _ = tx.blocking_send(Err(e));
                        return;
                    }
                }
            }
            if filled == 0 {
                break;
            }
            buf.truncate(filled);
            hasher.update(&buf);
            if let Some(prev) = held.replace(Bytes::from(buf)) {
                if tx.blocking_send(Ok(prev)).is_err() {
                    return; // the client went away
                }
            }
        }
        if hasher.finish() == d {
            if let Some(last) = held {
                let _ = tx.blocking_send(Ok(last));
            }
            return;
        }
        metrics::counter!("flotilla_node_read_corrupt_total").increment(1);
        if let Err(e) = handle.block_on(quarantine(&node, &d)) {
            tracing::warn!(digest = %d, error = %e, "could not quarantine a corrupt blob");
        }
        let _ = tx.blocking_send(Err(io::Error::other("blob failed digest verification")));
    });
    VerifyingStream(tokio_stream::wrappers::ReceiverStream::new(rx).boxed())
}

/// Hash a file with `d`'s algorithm, optionally paced to `bytes_per_sec` (0 = unpaced).
async fn file_matches(
    path: &Path,
    d: &Digest,
    bytes_per_sec: u64,
    cancel: Option<&CancellationToken>,
) -> io::Result<Option<bool>> {
    let mut f = match tokio::fs::File::open(path).await {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut h = DigestHasher::new(d.algorithm());
    let mut buf = vec![0u8; CHUNK];
    let started = Instant::now();
    let mut total = 0u64;
    loop {
        let n = f.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        total += n as u64;
        if bytes_per_sec > 0 {
            let due = Duration::from_secs_f64(total as f64 / bytes_per_sec as f64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                match cancel {
                    Some(c) => tokio::select! {
                        _ = c.cancelled() => return Ok(None),
                        _ = tokio::time::sleep(wait) => {}
                    },
                    None => tokio::time::sleep(wait).await,
                }
            }
        }
    }
    Ok(Some(h.finish() == *d))
}

/// Make sure a verified copy of `d` is on disk; returns (size, fetched bytes), or `None` when
/// object storage does not hold it.
async fn ensure_blob(
    node: &NodeService,
    d: &Digest,
    verify: bool,
) -> Result<Option<(u64, u64)>, ServiceError> {
    let store = node.store();
    let path = store.path(&layout::local_blob(d));
    if let Some(size) = store.blob_size(d).await? {
        if !verify {
            return Ok(Some((size, 0)));
        }
        match file_matches(&path, d, 0, None)
            .await
            .map_err(io_err(&path))?
        {
            Some(true) => return Ok(Some((size, 0))),
            Some(false) => quarantine(node, d).await?,
            None => {}
        }
    }
    match repair(node, d).await {
        Ok(()) => {}
        Err(ServiceError::Store(StoreError::BlobUnknown(_))) => return Ok(None),
        Err(e) => return Err(e),
    }
    let size = store.blob_size(d).await?.unwrap_or(0);
    Ok(Some((size, size)))
}

/// Copy everything object storage holds for `repo` onto this disk, verified: blobs, then
/// manifests (with their revision links and referrer entries), then tags — the order a push
/// makes them visible. Idempotent: what is already present and verifies is not fetched again,
/// so a seeder that resumes simply asks again. With `verify`, blobs already on disk are
/// re-hashed (a partial disk may hold damaged files); without, their presence suffices.
pub async fn seed_repo(
    node: &NodeService,
    repo: &RepoName,
    concurrency: usize,
    verify: bool,
) -> Result<SeedStats, ServiceError> {
    let Some(remote) = node.remote() else {
        return Ok(SeedStats::default());
    };
    let prefix = layout::remote_repo_prefix(repo);
    let keys = remote.list_keys(&prefix).await?;
    let mut tags: Vec<Tag> = Vec::new();
    let mut manifests: Vec<Digest> = Vec::new();
    let mut blobs: Vec<Digest> = Vec::new();
    for k in keys {
        if layout::repo_of_remote_key(&k).as_ref() != Some(repo) {
            continue; // a nested repository's key
        }
        let Some(rest) = k.strip_prefix(&prefix) else {
            continue;
        };
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            ["tags", t] => tags.extend(t.parse().ok()),
            ["manifests", alg, hex] => manifests.extend(format!("{alg}:{hex}").parse().ok()),
            ["blobs", alg, hex] => blobs.extend(format!("{alg}:{hex}").parse().ok()),
            _ => {}
        }
    }
    let mut stats = SeedStats::default();
    let concurrency = concurrency.max(1);
    let store = node.store();

    let mut results = futures::stream::iter(blobs.into_iter().map(|d| {
        let (node, repo) = (node.clone(), repo.clone());
        async move {
            let got = ensure_blob(&node, &d, verify).await?;
            if got.is_some() {
                node.store().link_layer(&repo, &d).await?;
            }
            Ok::<_, ServiceError>(got)
        }
    }))
    .buffer_unordered(concurrency);
    while let Some(r) = results.next().await {
        stats.count(r?);
    }
    drop(results);

    let limit = node.config().manifest_max_bytes as u64;
    let mut results = futures::stream::iter(manifests.into_iter().map(|d| {
        let (node, repo) = (node.clone(), repo.clone());
        async move { seed_manifest(&node, &repo, &d, limit).await }
    }))
    .buffer_unordered(concurrency);
    while let Some(r) = results.next().await {
        stats.count(r?);
    }
    drop(results);

    for tag in &tags {
        let Some(bytes) = remote
            .get_bytes(&layout::remote_tag(repo, tag), 1024)
            .await?
        else {
            continue; // deleted since the listing
        };
        let Ok(d) = String::from_utf8_lossy(&bytes).trim().parse::<Digest>() else {
            tracing::error!(%repo, %tag, "tag object in object storage does not hold a digest");
            continue;
        };
        if store.get_tag(repo, tag).await?.as_ref() != Some(&d) {
            store.put_tag(repo, tag, &d).await?;
        }
        stats.objects += 1;
    }
    metrics::counter!("flotilla_node_seed_objects_total").increment(stats.objects);
    metrics::counter!("flotilla_node_seed_bytes_total").increment(stats.fetched_bytes);
    Ok(stats)
}

async fn seed_manifest(
    node: &NodeService,
    repo: &RepoName,
    d: &Digest,
    limit: u64,
) -> Result<Option<(u64, u64)>, ServiceError> {
    let store = node.store();
    let Some(remote) = node.remote() else {
        return Ok(None);
    };
    let Some(mt) = remote
        .get_bytes(&layout::remote_manifest_link(repo, d), 4096)
        .await?
    else {
        return Ok(None); // deleted since the listing
    };
    let media_type = String::from_utf8_lossy(&mt).into_owned();
    let mut fetched = 0;
    let bytes = match store.read_blob_bytes(d, limit).await {
        Ok(b) if Digest::of(d.algorithm(), &b) == *d => Bytes::from(b),
        other => {
            if other.is_ok() {
                quarantine(node, d).await?;
            }
            let Some(b) = remote.get_bytes(&layout::remote_blob(d), limit).await? else {
                return Ok(None);
            };
            if Digest::of(d.algorithm(), &b) != *d {
                tracing::error!(digest = %d, "object storage holds a corrupt manifest; not seeded");
                return Err(ServiceError::CorruptRemote(d.clone()));
            }
            store.put_blob_bytes(d, &b).await?;
            fetched = b.len() as u64;
            b
        }
    };
    if store.manifest_media_type(repo, d).await?.is_none() {
        store.link_manifest(repo, d, &media_type).await?;
    }
    if let Ok(m) = crate::manifest::parse(&bytes, Some(&media_type)) {
        if let Some(subject) = &m.subject {
            let desc = ReferrerDescriptor {
                media_type: m.media_type.clone(),
                digest: d.clone(),
                size: bytes.len() as u64,
                artifact_type: m.artifact_type.clone(),
                annotations: m.annotations.clone(),
            };
            store.put_referrer(repo, subject, &desc).await?;
        }
    }
    Ok(Some((bytes.len() as u64, fetched)))
}

/// Every blob file under `blobs/` with the digest its path names.
fn list_blob_files(root: &Path) -> io::Result<Vec<(PathBuf, Digest)>> {
    let mut out = Vec::new();
    for alg in ["sha256", "sha512"] {
        let dir = root.join("blobs").join(alg);
        let rd = match std::fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for sub in rd {
            let sub = sub?;
            if !sub.file_type()?.is_dir() {
                continue;
            }
            for f in std::fs::read_dir(sub.path())? {
                let f = f?;
                let name = f.file_name();
                let Some(hex) = name.to_str() else { continue };
                if let Ok(d) = format!("{alg}:{hex}").parse() {
                    out.push((f.path(), d));
                }
            }
        }
    }
    out.sort();
    Ok(out)
}

/// The scrubber: re-hash every stored blob at `scrub_bytes_per_sec`, one pass after another
/// (pausing `scrub_interval` between passes); a mismatch is quarantined and fetched again
/// from object storage (verified), so the node heals without a client ever seeing it.
pub async fn scrub_loop(node: NodeService, cancel: CancellationToken) {
    let rate = node.config().scrub_bytes_per_sec;
    let pause = node.config().scrub_interval;
    loop {
        let root = node.store().root().to_owned();
        let files = tokio::task::spawn_blocking(move || list_blob_files(&root)).await;
        let files = match files {
            Ok(Ok(f)) => f,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "scrubber could not list blobs");
                Vec::new()
            }
            Err(e) => {
                tracing::warn!(error = %e, "scrubber listing task failed");
                Vec::new()
            }
        };
        let mut checked = 0u64;
        for (path, d) in files {
            if cancel.is_cancelled() {
                return;
            }
            match file_matches(&path, &d, rate, Some(&cancel)).await {
                Ok(Some(true)) | Ok(None) => {}
                Ok(Some(false)) => {
                    metrics::counter!("flotilla_node_scrub_corrupt_total").increment(1);
                    tracing::error!(digest = %d, "scrubber found a corrupt blob");
                    if let Err(e) = quarantine(&node, &d).await {
                        tracing::warn!(digest = %d, error = %e, "quarantine failed");
                        continue;
                    }
                    match repair(&node, &d).await {
                        Ok(()) => {
                            metrics::counter!("flotilla_node_scrub_repaired_total").increment(1);
                            tracing::info!(digest = %d, "corrupt blob repaired from object storage");
                        }
                        Err(e) => {
                            tracing::warn!(digest = %d, error = %e, "repair failed; the next read or pass retries")
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "scrubber read failed")
                }
            }
            checked += 1;
            metrics::counter!("flotilla_node_scrub_blobs_total").increment(1);
        }
        metrics::gauge!("flotilla_node_scrub_last_pass_blobs").set(checked as f64);
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(pause) => {}
        }
    }
}
