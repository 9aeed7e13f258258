//! Verification of local blobs on read, quarantine of blobs whose bytes do not match their
//! digest, and repair from object storage.
//!
//! A read serves bytes only from a file verified since its bytes last changed. A file the
//! node has not verified in its current state (by metadata stamp, see `store::verified`) is
//! checked on the way: under [`through::WAIT_WHOLE_BELOW`] it is hashed whole before the
//! response starts; a larger one streamed whole holds back its last chunk until the digest
//! checks out (as a read-through does), so a client never receives a complete corrupt blob;
//! a `Range` read hashes the whole file first. Media rot that changes no metadata is left to
//! the scrubber.

use std::io;
use std::path::Path;
use std::pin::Pin;
use std::time::{Duration, Instant};

use bytes::Bytes;
use flotilla_core::{layout, Digest, DigestHasher};
use futures::{Stream, StreamExt};
use tokio::io::AsyncReadExt;
use tokio_util::sync::CancellationToken;

use super::through::{self, Outcome, Started};
use crate::service::ServiceError;
use crate::store::{io_err, FileStamp, StoreError};
use crate::NodeService;
use flotilla_objstore::RemoteError;

const CHUNK: usize = 256 * 1024;
/// Unit of local blob reads that are streamed to a client.
const UNIT: usize = 1024 * 1024;

/// Move a blob that failed verification out of `blobs/` so it is never served again.
pub(crate) async fn quarantine(node: &NodeService, d: &Digest) -> Result<(), StoreError> {
    let store = node.store();
    store.forget_verified(d);
    let src = store.path(&layout::local_blob(d));
    let dir = store.path(&layout::local_quarantine_dir());
    tokio::fs::create_dir_all(&dir)
        .await
        .map_err(io_err(&dir))?;
    let unique = uuid::Uuid::new_v4().simple().to_string();
    let dest = store.path(&layout::local_quarantined(d, &unique));
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

/// What one trim of the quarantine did.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Trimmed {
    pub(crate) files: u64,
    pub(crate) bytes: u64,
    /// What stays after the trim.
    pub(crate) kept_bytes: u64,
}

/// Bound the quarantine: delete files older than `retention`, then the oldest until at most
/// `max_bytes` remain. Blocking; run it off the runtime.
pub(crate) fn trim_quarantine(
    dir: &std::path::Path,
    retention: std::time::Duration,
    max_bytes: u64,
) -> io::Result<Trimmed> {
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Trimmed::default()),
        Err(e) => return Err(e),
    };
    let mut files = Vec::new();
    for e in rd {
        let e = e?;
        let m = e.metadata()?;
        if m.is_file() {
            let age = m.modified()?.elapsed().unwrap_or_default();
            files.push((age, m.len(), e.path()));
        }
    }
    // Oldest first.
    files.sort_by_key(|f| std::cmp::Reverse(f.0));
    let mut total: u64 = files.iter().map(|f| f.1).sum();
    let mut out = Trimmed::default();
    for (age, len, path) in files {
        if age < retention && total <= max_bytes {
            break;
        }
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        total -= len;
        out.files += 1;
        out.bytes += len;
    }
    out.kept_bytes = total;
    Ok(out)
}

/// Fetch `d` from object storage into the cache (single-flight, verified), unless present.
pub(crate) async fn repair(node: &NodeService, d: &Digest) -> Result<(), ServiceError> {
    let Some(fetches) = node.fetches() else {
        return Err(StoreError::BlobUnknown(d.clone()).into());
    };
    let w = match fetches.start(d, false).await? {
        Started::Wait(w) => w,
        // Not asked to lead; cannot happen, but draining it would also be correct.
        Started::Lead { .. } => return Ok(()),
    };
    match through::wait(w).await {
        Outcome::Cached => Ok(()),
        Outcome::NotFound => Err(StoreError::BlobUnknown(d.clone()).into()),
        Outcome::Corrupt => Err(ServiceError::CorruptRemote(d.clone())),
        Outcome::Unavailable(m) => Err(RemoteError::Io(io::Error::other(m)).into()),
    }
}

/// Read a small local blob whole and check it; `None` (after quarantining it) on a mismatch.
/// `stamp` is the file's metadata when it was opened: a match is remembered against it.
pub(crate) async fn read_verified(
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
pub(crate) async fn verify_open(
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
pub(crate) struct LocalStream(Pin<Box<dyn Stream<Item = Result<Bytes, io::Error>> + Send>>);

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
pub(crate) struct Check {
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
pub(crate) fn file_stream(
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
pub(crate) async fn file_matches(
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn file(dir: &std::path::Path, name: &str, len: usize, age: Duration) {
        let p = dir.join(name);
        std::fs::write(&p, vec![0u8; len]).unwrap();
        let f = std::fs::File::options().write(true).open(&p).unwrap();
        f.set_modified(std::time::SystemTime::now() - age).unwrap();
    }

    #[test]
    fn quarantine_is_trimmed_by_age_then_by_size_oldest_first() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path();
        let hour = Duration::from_secs(3600);
        file(d, "ancient", 10, 100 * hour);
        file(d, "old", 300, 5 * hour);
        file(d, "mid", 300, 3 * hour);
        file(d, "new", 300, hour);
        // Retention 50 h removes `ancient`; the cap of 700 bytes then removes `old` only.
        let got = trim_quarantine(d, 50 * hour, 700).unwrap();
        assert_eq!(
            got,
            Trimmed {
                files: 2,
                bytes: 310,
                kept_bytes: 600
            }
        );
        let mut left: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left, ["mid", "new"]);
        // Within both bounds nothing more goes; a missing directory is no error.
        assert_eq!(trim_quarantine(d, 50 * hour, 700).unwrap().files, 0);
        assert_eq!(
            trim_quarantine(&d.join("none"), hour, 0).unwrap(),
            Trimmed::default()
        );
    }
}
