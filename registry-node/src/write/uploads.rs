//! Upload sessions: bytes stream from the request body through a hashing writer into a file
//! under `uploads/`, across as many PATCH requests as the client likes.
//!
//! The digest is computed while bytes arrive (never by re-reading), on a blocking thread fed
//! through a small bounded channel, so hashing and disk writes overlap with network reads and
//! memory stays bounded by the channel depth whatever the blob size. The one exception is a
//! chunked upload finished with a digest of another algorithm than the session hashed with
//! (sha512 named only at the final PUT): that file is hashed once more at commit.

use std::collections::HashMap;
use std::io::{self, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use flotilla_core::{layout, Algorithm, DigestHasher, RepoName, UploadId};
use futures::{Stream, StreamExt};
use tokio::sync::mpsc;

/// Chunks queued between the request body and the writer thread. Each chunk can pin a whole
/// HTTP read buffer (up to ~400 KiB), so this depth, not the blob size, bounds an upload's
/// memory: 4 keeps 64 concurrent pushes near 100 MiB while still overlapping network reads
/// with hashing and disk writes.
const UPLOAD_QUEUE_CHUNKS: usize = 4;

/// Failures while receiving upload bytes.
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    #[error("upload {0} unknown")]
    Unknown(UploadId),
    #[error("chunk starts at {got} but the upload holds {have} bytes")]
    OutOfOrder { have: u64, got: u64 },
    #[error("client body: {0}")]
    Body(String),
    #[error("upload i/o: {0}")]
    Io(#[from] io::Error),
    #[error("upload exceeds the largest blob this registry takes ({limit} bytes)")]
    TooLarge { limit: u64 },
}

/// The part of a session that travels to the writer thread and back.
#[derive(Debug)]
struct Sink {
    file: std::fs::File,
    hasher: DigestHasher,
}

/// One upload in progress. `sink` is `None` only while a request is streaming into it, which
/// the per-session async mutex already serialises.
#[derive(Debug)]
pub(crate) struct Session {
    pub id: UploadId,
    pub repo: RepoName,
    pub path: PathBuf,
    pub size: u64,
    sink: Option<Sink>,
    last_active: Instant,
}

impl Session {
    /// Append a stream of chunks; returns the new size. On a body error the bytes that did
    /// arrive stay counted, so the client's next `Range` tells it where to resume. A chunk
    /// that would take the session past `max` bytes is refused (`TooLarge`) before it is
    /// written; the caller then drops the session.
    pub(crate) async fn append<S, E>(
        &mut self,
        body: S,
        max: Option<u64>,
    ) -> Result<u64, UploadError>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        self.last_active = Instant::now();
        let sink = self.sink.take().ok_or_else(|| {
            UploadError::Io(io::Error::other("session sink lost by an earlier failure"))
        })?;
        let (tx, rx) = mpsc::channel::<Bytes>(UPLOAD_QUEUE_CHUNKS);
        let writer = tokio::task::spawn_blocking(move || write_chunks(sink, rx));
        let mut body = body;
        let mut body_err = None;
        let mut too_large = None;
        let mut queued = self.size;
        while let Some(chunk) = body.next().await {
            match chunk {
                Ok(b) if b.is_empty() => {}
                Ok(b) => {
                    queued += b.len() as u64;
                    if let Some(limit) = max.filter(|m| queued > *m) {
                        too_large = Some(UploadError::TooLarge { limit });
                        break;
                    }
                    if tx.send(b).await.is_err() {
                        break; // the writer failed; its error is reported below
                    }
                }
                Err(e) => {
                    body_err = Some(e.to_string());
                    break;
                }
            }
        }
        drop(tx);
        let (sink, written, io_result) = writer
            .await
            .map_err(|e| UploadError::Io(io::Error::other(e)))?;
        self.size += written;
        self.sink = Some(sink);
        self.last_active = Instant::now();
        io_result?;
        if let Some(e) = too_large {
            return Err(e);
        }
        if let Some(e) = body_err {
            return Err(UploadError::Body(e));
        }
        Ok(self.size)
    }

    /// Flush and fsync the data, and hand back the digest computed on the way in.
    pub(crate) async fn finish(&mut self) -> Result<(flotilla_core::Digest, PathBuf), UploadError> {
        let sink = self
            .sink
            .take()
            .ok_or_else(|| UploadError::Io(io::Error::other("session sink lost")))?;
        let digest = tokio::task::spawn_blocking(move || -> io::Result<_> {
            sink.file.sync_all()?;
            Ok(sink.hasher.finish())
        })
        .await
        .map_err(|e| UploadError::Io(io::Error::other(e)))??;
        Ok((digest, self.path.clone()))
    }
}

/// Writer thread: hash and write every chunk; always hands the sink back so the session
/// stays consistent with what reached the disk.
fn write_chunks(mut sink: Sink, mut rx: mpsc::Receiver<Bytes>) -> (Sink, u64, io::Result<()>) {
    let mut written = 0u64;
    while let Some(chunk) = rx.blocking_recv() {
        if let Err(e) = sink.file.write_all(&chunk) {
            return (sink, written, Err(e));
        }
        sink.hasher.update(&chunk);
        written += chunk.len() as u64;
    }
    (sink, written, Ok(()))
}

type Handle = Arc<tokio::sync::Mutex<Session>>;

/// Registry of live sessions. The map is behind a std mutex held only for lookups; each
/// session has its own async mutex held for the duration of one request.
#[derive(Clone, Debug)]
pub(crate) struct Uploads {
    data_dir: PathBuf,
    sessions: Arc<Mutex<HashMap<UploadId, Handle>>>,
}

impl Uploads {
    pub(crate) fn new(data_dir: &std::path::Path) -> Self {
        Uploads {
            data_dir: data_dir.to_owned(),
            sessions: Arc::default(),
        }
    }

    /// Start a session whose bytes are hashed with `algorithm`.
    pub(crate) async fn create(
        &self,
        repo: RepoName,
        algorithm: Algorithm,
    ) -> Result<Handle, UploadError> {
        let id: UploadId = uuid::Uuid::new_v4()
            .to_string()
            .parse()
            .map_err(|e| UploadError::Io(io::Error::other(e)))?;
        let path = self.data_dir.join(layout::local_upload(&id));
        let p = path.clone();
        let file = tokio::task::spawn_blocking(move || std::fs::File::create_new(&p))
            .await
            .map_err(|e| UploadError::Io(io::Error::other(e)))??;
        let session = Session {
            id: id.clone(),
            repo,
            path,
            size: 0,
            sink: Some(Sink {
                file,
                hasher: DigestHasher::new(algorithm),
            }),
            last_active: Instant::now(),
        };
        let handle = Arc::new(tokio::sync::Mutex::new(session));
        self.lock().insert(id, handle.clone());
        metrics::gauge!("flotilla_node_upload_sessions").increment(1.0);
        Ok(handle)
    }

    /// The session `id`, if it exists and belongs to `repo`.
    pub(crate) fn get(&self, repo: &RepoName, id: &UploadId) -> Result<Handle, UploadError> {
        let handle = self
            .lock()
            .get(id)
            .cloned()
            .ok_or_else(|| UploadError::Unknown(id.clone()))?;
        // try_lock: a session busy with another request is still "known"; repo is immutable.
        if let Ok(s) = handle.try_lock() {
            if &s.repo != repo {
                return Err(UploadError::Unknown(id.clone()));
            }
        }
        Ok(handle)
    }

    /// Forget a session and delete its bytes (cancel, or after commit moved the file away).
    pub(crate) async fn remove(&self, id: &UploadId) {
        let removed = self.lock().remove(id);
        if let Some(h) = removed {
            metrics::gauge!("flotilla_node_upload_sessions").decrement(1.0);
            let path = h.lock().await.path.clone();
            let _ = tokio::fs::remove_file(path).await;
        }
    }

    /// Drop sessions idle longer than `max_age`; returns how many were purged.
    pub(crate) async fn purge_idle(&self, max_age: Duration) -> usize {
        let candidates: Vec<(UploadId, Handle)> = self
            .lock()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let mut purged = 0;
        for (id, h) in candidates {
            // A session locked by a request is active by definition.
            let idle = match h.try_lock() {
                Ok(s) => s.last_active.elapsed() > max_age,
                Err(_) => false,
            };
            if idle {
                self.remove(&id).await;
                purged += 1;
            }
        }
        if purged > 0 {
            tracing::info!(purged, "purged idle upload sessions");
        }
        purged
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<UploadId, Handle>> {
        // A poisoned map only means a panic elsewhere; the map itself is still consistent.
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }
}
