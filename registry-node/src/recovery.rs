//! Recovery on the node side: seeding a repository from object storage (what the seeder asks
//! for through `POST /internal/v1/seed`), verification of local blobs on read, quarantine of
//! blobs whose bytes do not match their digest, and the background scrubber.
//!
//! Why the node does the copying rather than the seeder: the node already owns the one code
//! path that fetches, hashes and commits object-storage bytes (`readthrough`), so a seeded
//! blob goes through exactly the verification a client read does, and the seeder stays a
//! coordinator that moves no bytes.
//!
//! Verification on read: a read serves bytes only from a file verified since its bytes last
//! changed. A file the node has not verified in its current state (by metadata stamp, see
//! `store::verified`) is checked on the way: under [`readthrough::WAIT_WHOLE_BELOW`] it is
//! hashed whole before the response starts; a larger one streamed whole holds back its last
//! chunk until the digest checks out (as a read-through does), so a client never receives a
//! complete corrupt blob; a `Range` read hashes the whole file first. Media rot that changes
//! no metadata is left to the scrubber (documented in ARCHITECTURE.md).

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
use crate::store::{io_err, FileStamp, ReferrerDescriptor, StoreError};
use crate::NodeService;

const CHUNK: usize = 256 * 1024;
/// Unit of local blob reads that are streamed to a client.
const UNIT: usize = 1024 * 1024;

/// Local directory that receives blobs failing verification (kept for inspection, never
/// served; nothing reads from it).
pub const QUARANTINE_DIR: &str = "quarantine";

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
    store.forget_verified(d);
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
/// `stamp` is the file's metadata when it was opened: a match is remembered against it.
pub async fn read_verified(
    node: &NodeService,
    d: &Digest,
    mut f: tokio::fs::File,
    len: u64,
    stamp: FileStamp,
) -> Result<Option<Bytes>, ServiceError> {
    let mut buf = Vec::with_capacity(len as usize);
    let path = node.store().path(&layout::local_blob(d));
    f.read_to_end(&mut buf).await.map_err(io_err(&path))?;
    if Digest::of(d.algorithm(), &buf) == *d {
        node.store().mark_verified(d, stamp);
        return Ok(Some(Bytes::from(buf)));
    }
    metrics::counter!("flotilla_node_read_corrupt_total").increment(1);
    quarantine(node, d).await?;
    Ok(None)
}

/// Hash a large local blob through its open descriptor before a `Range` read is served
/// from it; `None` (after quarantining it) on a mismatch.
pub async fn verify_open(
    node: &NodeService,
    d: &Digest,
    f: tokio::fs::File,
    stamp: FileStamp,
) -> Result<Option<tokio::fs::File>, ServiceError> {
    let path = node.store().path(&layout::local_blob(d));
    let mut f = f.into_std().await;
    let alg = d.algorithm();
    let (f, got) = tokio::task::spawn_blocking(move || {
        use std::io::{Read, Seek};
        let mut h = DigestHasher::new(alg);
        let mut buf = vec![0u8; UNIT];
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
        f.rewind()?;
        Ok::<_, io::Error>((f, h.finish()))
    })
    .await
    .map_err(|e| io_err(&path)(io::Error::other(e)))?
    .map_err(io_err(&path))?;
    if got == *d {
        node.store().mark_verified(d, stamp);
        return Ok(Some(tokio::fs::File::from_std(f)));
    }
    metrics::counter!("flotilla_node_read_corrupt_total").increment(1);
    quarantine(node, d).await?;
    Ok(None)
}

/// Bytes of a local blob read on a blocking thread (see [`file_stream`]).
pub struct LocalStream(Pin<Box<dyn Stream<Item = Result<Bytes, io::Error>> + Send>>);

impl std::fmt::Debug for LocalStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LocalStream")
    }
}

impl Stream for LocalStream {
    type Item = Result<Bytes, io::Error>;

    fn poll_next(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        self.0.as_mut().poll_next(cx)
    }
}

/// What a [`file_stream`] checks while it reads: the whole file must hash to `digest`.
#[derive(Debug)]
pub struct Check {
    pub node: NodeService,
    pub digest: Digest,
    /// The file's metadata when opened; remembered as verified if the hash matches.
    pub stamp: FileStamp,
}

/// Stream `len` bytes of a local blob from `start`. With a [`Check`] (whole-blob reads of a
/// blob not known to be verified) the last chunk is released only once the whole file
/// hashed to its digest; on a mismatch the stream ends with an error (the client sees an
/// aborted transfer) and the blob is quarantined, so the next read fetches it again from
/// object storage.
///
/// Reading (and hashing) run on one blocking thread in 1 MiB units handed over a small
/// bounded channel: one thread hop per MiB instead of one per read, buffers that are never
/// zeroed, and verification overlapped with sending, so a read is bounded by the slower of
/// sha256 and the network, not by their sum.
pub fn file_stream(
    file: tokio::fs::File,
    start: u64,
    len: u64,
    check: Option<Check>,
) -> LocalStream {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, io::Error>>(4);
    let handle = tokio::runtime::Handle::current();
    let file = file.try_into_std();
    tokio::task::spawn_blocking(move || {
        use std::io::{Read, Seek};
        let mut file = match file {
            Ok(f) => f,
            Err(_) => {
                let _ = tx.blocking_send(Err(io::Error::other("blob file busy")));
                return;
            }
        };
        if start > 0 {
            if let Err(e) = file.seek(io::SeekFrom::Start(start)) {
                let _ = tx.blocking_send(Err(e));
                return;
            }
        }
        let mut hasher = check
            .as_ref()
            .map(|c| DigestHasher::new(c.digest.algorithm()));
        let mut held: Option<Bytes> = None;
        let mut left = len;
        while left > 0 {
            let want = left.min(UNIT as u64);
            // `read_to_end` fills spare capacity without initialising it first.
            let mut buf = Vec::with_capacity(want as usize);
            match (&mut file).take(want).read_to_end(&mut buf) {
                Ok(0) => break,
                Ok(n) => left -= n as u64,
                Err(e) => {
                    let _ = tx.blocking_send(Err(e));
                    return;
                }
            }
            let chunk = Bytes::from(buf);
            let Some(h) = hasher.as_mut() else {
                if tx.blocking_send(Ok(chunk)).is_err() {
                    return; // the client went away
                }
                continue;
            };
            h.update(&chunk);
            if let Some(prev) = held.replace(chunk) {
                if tx.blocking_send(Ok(prev)).is_err() {
                    return;
                }
            }
        }
        let (Some(check), Some(h)) = (check, hasher) else {
            if left > 0 {
                let _ = tx.blocking_send(Err(io::Error::other("blob shorter than its size")));
            }
            return;
        };
        if left == 0 && h.finish() == check.digest {
            check.node.store().mark_verified(&check.digest, check.stamp);
            if let Some(last) = held {
                let _ = tx.blocking_send(Ok(last));
            }
            return;
        }
        metrics::counter!("flotilla_node_read_corrupt_total").increment(1);
        if let Err(e) = handle.block_on(quarantine(&check.node, &check.digest)) {
            tracing::warn!(digest = %check.digest, error = %e, "could not quarantine a corrupt blob");
        }
        let _ = tx.blocking_send(Err(io::Error::other("blob failed digest verification")));
    });
    LocalStream(tokio_stream::wrappers::ReceiverStream::new(rx).boxed())
}

/// Hash a file with `d`'s algorithm, optionally paced to `bytes_per_sec` (0 = unpaced); a
/// match is remembered as verified (see `store::verified`). `None` when there is no file.
async fn file_matches(
    node: &NodeService,
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
    let stamp = FileStamp::of(&f.metadata().await?);
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
    let ok = h.finish() == *d;
    if ok {
        node.store().mark_verified(d, stamp);
    }
    Ok(Some(ok))
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
        match file_matches(node, &path, d, 0, None)
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
pub(crate) fn list_blob_files(root: &Path) -> io::Result<Vec<(PathBuf, Digest)>> {
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
            match file_matches(&node, &path, &d, rate, Some(&cancel)).await {
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
