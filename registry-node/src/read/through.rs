//! Read-through of blobs missing locally: one fetch per digest however many clients ask
//! (single flight), streamed to the first client while it is written to the cache, verified
//! against its digest before the cache keeps it.
//!
//! Corrupt bytes in object storage must never reach a client as a complete blob: the fetch
//! holds back the last chunk it has read until the digest checks out, and on a mismatch ends
//! the stream with an error instead (the client sees an aborted transfer). Blobs up to
//! [`WAIT_WHOLE_BELOW`] are fetched and verified completely before the response starts, so a
//! small corrupt blob gets a clean JSON error.

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use flotilla_core::{layout, Digest, DigestHasher};
use futures::StreamExt;
use tokio::sync::{mpsc, watch};
use tokio_util::task::TaskTracker;

use crate::store::LocalStore;
use flotilla_objstore::{Remote, RemoteError};

/// Unit in which fetched bytes are written to the cache and forwarded to the leader.
const FETCH_WRITE_UNIT: usize = 1024 * 1024;

/// Below this size a miss is fetched whole before answering.
pub(crate) const WAIT_WHOLE_BELOW: u64 = 4 * 1024 * 1024;

/// How a fetch ended, shared with everyone waiting on it.
#[derive(Clone, Debug)]
pub(crate) enum Outcome {
    Cached,
    NotFound,
    Corrupt,
    Unavailable(String),
}

type Waiter = watch::Receiver<Option<Outcome>>;

/// The body of a response streamed from a fetch in progress.
pub(crate) type FetchStream = tokio_stream::wrappers::ReceiverStream<Result<Bytes, io::Error>>;

#[derive(Clone, Debug)]
pub(crate) struct Fetches {
    inflight: Arc<Mutex<HashMap<Digest, Waiter>>>,
    local: LocalStore,
    remote: Remote,
    tasks: TaskTracker,
}

/// What a caller got: either join-and-wait, or lead with a live stream of `size` bytes.
pub(crate) enum Started {
    Wait(Waiter),
    Lead { size: u64, body: FetchStream },
}

impl Fetches {
    pub(crate) fn new(local: LocalStore, remote: Remote, tasks: TaskTracker) -> Self {
        Fetches {
            inflight: Arc::default(),
            local,
            remote,
            tasks,
        }
    }

    /// Join the fetch of `d` in progress, or start one. With `lead`, the starter also gets a
    /// stream of the bytes as they arrive.
    pub(crate) async fn start(&self, d: &Digest, lead: bool) -> Result<Started, RemoteError> {
        let mut pending = {
            let mut map = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(w) = map.get(d) {
                return Ok(Started::Wait(w.clone()));
            }
            let (tx, rx) = watch::channel(None);
            map.insert(d.clone(), rx);
            Pending {
                fetches: self,
                digest: d.clone(),
                tx: Some(tx),
            }
        };
        // A fetch that finished between our caller's local miss and the insert above has
        // already committed the blob (it commits before leaving the map): don't fetch again.
        if self.local.has_blob(d).await.unwrap_or(false) {
            return Ok(Started::Wait(pending.finish(Outcome::Cached)));
        }
        metrics::counter!("flotilla_node_readthrough_fetches_total").increment(1);
        let opened = self.remote.get_stream(&layout::remote_blob(d)).await;
        let (size, stream) = match opened {
            Ok(Some(s)) => s,
            Ok(None) => return Ok(Started::Wait(pending.finish(Outcome::NotFound))),
            Err(e) => {
                pending.finish(Outcome::Unavailable(e.to_string()));
                return Err(e);
            }
        };
        let Some(tx) = pending.tx.take() else {
            return Err(RemoteError::Io(io::Error::other("fetch already finished")));
        };
        let (body_tx, body_rx) = mpsc::channel(8);
        let leader = (lead && size >= WAIT_WHOLE_BELOW).then_some(body_tx);
        let waiter = tx.subscribe();
        let me = self.clone();
        let d2 = d.clone();
        self.tasks.spawn(async move {
            let outcome = me.fetch(&d2, stream, leader).await;
            me.finish(&d2, &tx, outcome);
        });
        Ok(match lead && size >= WAIT_WHOLE_BELOW {
            true => Started::Lead {
                size,
                body: tokio_stream::wrappers::ReceiverStream::new(body_rx),
            },
            false => Started::Wait(waiter),
        })
    }

    fn finish(&self, d: &Digest, tx: &watch::Sender<Option<Outcome>>, outcome: Outcome) {
        self.inflight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(d);
        tx.send_replace(Some(outcome));
    }

    async fn fetch(
        &self,
        d: &Digest,
        mut stream: futures::stream::BoxStream<'static, Result<Bytes, RemoteError>>,
        leader: Option<mpsc::Sender<Result<Bytes, io::Error>>>,
    ) -> Outcome {
        let tmp = self
            .local
            .tmp_dir()
            .join(format!("fetch-{}", uuid::Uuid::new_v4().simple()));
        let result = async {
            let file = tokio::fs::File::create(&tmp).await?.into_std().await;
            let (to_writer, from_fetch) = mpsc::channel::<Vec<Bytes>>(4);
            let writer = tokio::task::spawn_blocking({
                let alg = d.algorithm();
                move || write_and_hash(file, alg, from_fetch)
            });
            let mut held: Option<Vec<Bytes>> = None;
            let mut leader = leader;
            // Stores hand out small chunks (8–64 KiB); they are batched, not copied, into
            // 1 MiB units, each one thread hop and one writev for the writer.
            let mut batch: Vec<Bytes> = Vec::new();
            let mut batch_len = 0;
            let mut done = false;
            while !done {
                match stream.next().await {
                    Some(chunk) => {
                        let chunk = chunk.map_err(io::Error::other)?;
                        batch_len += chunk.len();
                        batch.push(chunk);
                        if batch_len < FETCH_WRITE_UNIT {
                            continue;
                        }
                    }
                    None if batch.is_empty() => break,
                    None => done = true,
                }
                let unit = std::mem::take(&mut batch);
                batch_len = 0;
                if to_writer.send(unit.clone()).await.is_err() {
                    break; // the writer failed; its result says why
                }
                if let Some(prev) = held.replace(unit) {
                    // A client that went away does not stop the fetch others wait on.
                    if let Some(l) = &leader {
                        for chunk in prev {
                            if l.send(Ok(chunk)).await.is_err() {
                                leader = None;
                                break;
                            }
                        }
                    }
                }
            }
            drop(to_writer);
            let actual = writer.await.map_err(io::Error::other)??;
            if &actual != d {
                tracing::error!(expected = %d, %actual, "object storage returned corrupt blob; not cached");
                metrics::counter!("flotilla_node_readthrough_corrupt_total").increment(1);
                if let Some(l) = &leader {
                    let _ = l
                        .send(Err(io::Error::other("blob failed digest verification")))
                        .await;
                }
                return Ok::<_, io::Error>(Outcome::Corrupt);
            }
            self.local
                .commit_blob(&tmp, d)
                .await
                .map_err(io::Error::other)?;
            if let (Some(l), Some(last)) = (&leader, held) {
                for chunk in last {
                    if l.send(Ok(chunk)).await.is_err() {
                        break;
                    }
                }
            }
            Ok(Outcome::Cached)
        }
        .await;
        let outcome = match result {
            Ok(o) => o,
            Err(e) => {
                tracing::warn!(digest = %d, error = %e, "read-through fetch failed");
                Outcome::Unavailable(e.to_string())
            }
        };
        if !matches!(outcome, Outcome::Cached) {
            let _ = tokio::fs::remove_file(&tmp).await;
        }
        outcome
    }
}

/// The cache file's writer, on a blocking thread: hash and `writev` each unit as it comes
/// (no copy of the fetched chunks), then fsync; returns the digest of what was written.
fn write_and_hash(
    mut file: std::fs::File,
    alg: flotilla_core::Algorithm,
    mut units: mpsc::Receiver<Vec<Bytes>>,
) -> io::Result<Digest> {
    use std::io::{IoSlice, Write};
    let mut hasher = DigestHasher::new(alg);
    while let Some(unit) = units.blocking_recv() {
        for chunk in &unit {
            hasher.update(chunk);
        }
        let mut slices: Vec<IoSlice<'_>> = unit.iter().map(|c| IoSlice::new(c)).collect();
        let mut rest = &mut slices[..];
        while !rest.is_empty() {
            let n = file.write_vectored(rest)?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            IoSlice::advance_slices(&mut rest, n);
        }
    }
    file.sync_all()?;
    Ok(hasher.finish())
}

/// The map entry of a fetch being started. If the caller's future is dropped before the
/// fetch task takes over (a client that disconnects while object storage answers), the
/// entry is removed on drop; otherwise every later request for the digest would join a
/// fetch that can never finish.
struct Pending<'a> {
    fetches: &'a Fetches,
    digest: Digest,
    tx: Option<watch::Sender<Option<Outcome>>>,
}

impl Pending<'_> {
    /// End the fetch with `outcome`; returns a waiter that sees it.
    fn finish(&mut self, outcome: Outcome) -> Waiter {
        let (tx, rx) = match self.tx.take() {
            Some(tx) => {
                let rx = tx.subscribe();
                (tx, rx)
            }
            None => {
                let (tx, rx) = watch::channel(None);
                (tx, rx)
            }
        };
        self.fetches.finish(&self.digest, &tx, outcome);
        rx
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if let Some(tx) = self.tx.take() {
            self.fetches.finish(
                &self.digest,
                &tx,
                Outcome::Unavailable("fetch abandoned".into()),
            );
        }
    }
}

/// Wait for a fetch to finish.
pub(crate) async fn wait(mut w: Waiter) -> Outcome {
    loop {
        if let Some(o) = w.borrow_and_update().clone() {
            return o;
        }
        if w.changed().await.is_err() {
            return w
                .borrow()
                .clone()
                .unwrap_or(Outcome::Unavailable("fetch task ended".into()));
        }
    }
}
