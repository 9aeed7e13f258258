//! The outbox's journal: numbered events as JSON lines in segment files
//! (`journal-<first seq>.log`), appended by one writer thread that fsyncs each batch before
//! it answers, so an acknowledged event is on disk and concurrent appends share one fsync.
//! A torn last line (a crash mid-write, never acknowledged) is cut off when the journal opens.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};

use crate::{Event, EventsError};

/// A segment is closed and a new one begun past this size; segments every sink has passed
/// are deleted whole.
const SEGMENT_BYTES: u64 = 1 << 20;
/// Appends queued while a batch is written go into the next batch, up to this many.
const BATCH: usize = 512;

#[derive(Serialize)]
struct LineRef<'a> {
    seq: u64,
    event: &'a Event,
}

#[derive(Deserialize)]
struct Line {
    seq: u64,
    event: Event,
}

type Append = (Event, oneshot::Sender<Result<u64, EventsError>>);

#[derive(Debug)]
pub struct Journal {
    dir: PathBuf,
    tx: mpsc::Sender<Append>,
    durable: watch::Receiver<u64>,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> EventsError + '_ {
    move |e| EventsError::Io(path.to_path_buf(), e)
}

fn segment_name(first: u64) -> String {
    format!("journal-{first:020}.log")
}

/// The segments, by first sequence number.
fn segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>, EventsError> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).map_err(io(dir))? {
        let e = e.map_err(io(dir))?;
        let name = e.file_name();
        let Some(first) = name
            .to_str()
            .and_then(|n| n.strip_prefix("journal-"))
            .and_then(|n| n.strip_suffix(".log"))
            .and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        out.push((first, e.path()));
    }
    out.sort();
    Ok(out)
}

fn sync_dir(dir: &Path) -> Result<(), EventsError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
}

/// The complete, parseable lines of a segment and the byte length they span.
fn parse_segment(path: &Path) -> Result<(Vec<(u64, Event)>, u64), EventsError> {
    let lines = parse_from(path, 0)?;
    let len = lines.last().map_or(0, |l| l.2);
    Ok((lines.into_iter().map(|(s, e, _)| (s, e)).collect(), len))
}

/// The complete lines of a segment from byte `offset` on, each with the offset just past it.
fn parse_from(path: &Path, offset: u64) -> Result<Vec<(u64, Event, u64)>, EventsError> {
    use std::io::{Read, Seek};
    let mut f = File::open(path).map_err(io(path))?;
    f.seek(std::io::SeekFrom::Start(offset)).map_err(io(path))?;
    let mut bytes = Vec::new();
    f.read_to_end(&mut bytes).map_err(io(path))?;
    let mut out = Vec::new();
    let mut start = 0usize;
    for (i, b) in bytes.iter().enumerate() {
        if *b != b'\n' {
            continue;
        }
        match serde_json::from_slice::<Line>(&bytes[start..i]) {
            Ok(l) => out.push((l.seq, l.event, offset + i as u64 + 1)),
            Err(e) => {
                return Err(EventsError::Corrupt(
                    path.to_path_buf(),
                    out.len() + 1,
                    e.to_string(),
                ))
            }
        }
        start = i + 1;
    }
    Ok(out)
}

/// An event and its sequence number.
pub type Numbered = (u64, Event);

/// Where a reader stopped: the segment, the byte just past the last line it took, and that
/// line's sequence number. A sink passes it back so each read parses only what is new.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Position {
    segment: u64,
    offset: u64,
    seq: u64,
}

impl Journal {
    /// Opens the journal in `dir` (created if missing) and starts its writer thread.
    pub fn open(dir: &Path) -> Result<Journal, EventsError> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let segs = segments(dir)?;
        let (path, first) = match segs.last() {
            Some((first, path)) => (path.clone(), *first),
            None => {
                let path = dir.join(segment_name(1));
                File::create(&path).map_err(io(&path))?;
                sync_dir(dir)?;
                (path, 1)
            }
        };
        // Only the last segment can end in a torn line: everything before it was fsynced
        // before a newer segment began.
        let bytes = std::fs::read(&path).map_err(io(&path))?;
        let end = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
        if end < bytes.len() {
            tracing::warn!(path = %path.display(), bytes = bytes.len() - end, "cutting a torn last line (a crash mid-append; it was never acknowledged)");
            let f = OpenOptions::new()
                .write(true)
                .open(&path)
                .map_err(io(&path))?;
            f.set_len(end as u64).map_err(io(&path))?;
            f.sync_all().map_err(io(&path))?;
        }
        let (lines, len) = parse_segment(&path)?;
        let last = lines.last().map_or(first - 1, |(s, _)| *s);
        let file = OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(io(&path))?;
        let (tx, rx) = mpsc::channel::<Append>(4096);
        let (durable_tx, durable) = watch::channel(last);
        let writer = Writer {
            dir: dir.to_path_buf(),
            path,
            file,
            len,
            seq: last,
            durable: durable_tx,
        };
        std::thread::Builder::new()
            .name("events-journal".into())
            .spawn(move || writer.run(rx))
            .map_err(io(dir))?;
        Ok(Journal {
            dir: dir.to_path_buf(),
            tx,
            durable,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Appends `event`; answers with its sequence number once it is on disk.
    pub async fn append(&self, event: Event) -> Result<u64, EventsError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send((event, tx))
            .await
            .map_err(|_| EventsError::Stopped)?;
        rx.await.map_err(|_| EventsError::Stopped)?
    }

    /// The last sequence number on disk.
    pub fn last_durable(&self) -> u64 {
        *self.durable.borrow()
    }

    /// Wakes when events past `seq` are on disk.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.durable.clone()
    }

    /// Events with `after < seq <= upto`, in order, at most `limit`.
    pub fn read(
        &self,
        after: u64,
        limit: usize,
        upto: u64,
    ) -> Result<Vec<(u64, Event)>, EventsError> {
        Ok(self.read_at(after, None, limit, upto)?.0)
    }

    /// [`Journal::read`] from where an earlier read stopped (`hint`, when it stopped at
    /// `after`), and where this one stopped.
    pub fn read_at(
        &self,
        after: u64,
        hint: Option<Position>,
        limit: usize,
        upto: u64,
    ) -> Result<(Vec<Numbered>, Option<Position>), EventsError> {
        let segs = segments(&self.dir)?;
        let resume = hint.filter(|h| h.seq == after).and_then(|h| {
            segs.iter()
                .position(|(f, _)| *f == h.segment)
                .map(|i| (i, h.offset))
        });
        // Else the last segment starting at or before the first wanted event, from its start.
        let (from, offset) = resume.unwrap_or_else(|| {
            let i = segs
                .iter()
                .rposition(|(first, _)| *first <= after + 1)
                .unwrap_or(0);
            (i, 0)
        });
        let mut out = Vec::new();
        let mut pos = hint.filter(|h| h.seq == after);
        for (i, (first, path)) in segs.iter().enumerate().skip(from) {
            let lines = match parse_from(path, if i == from { offset } else { 0 }) {
                Ok(l) => l,
                // Deleted under us (every sink had passed it): nothing wanted was in it.
                Err(EventsError::Io(_, e)) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            for (seq, ev, end) in lines {
                if seq > after && (seq > upto || out.len() >= limit) {
                    return Ok((out, pos));
                }
                if seq > after {
                    out.push((seq, ev));
                }
                pos = Some(Position {
                    segment: *first,
                    offset: end,
                    seq,
                });
            }
        }
        Ok((out, pos))
    }

    /// Deletes the segments whose every event is at or before `seq` (never the last one,
    /// which the writer appends to).
    pub fn drop_through(&self, seq: u64) -> Result<usize, EventsError> {
        let segs = segments(&self.dir)?;
        let mut dropped = 0;
        for w in segs.windows(2) {
            let (next_first, path) = (w[1].0, &w[0].1);
            if next_first <= seq + 1 {
                std::fs::remove_file(path).map_err(io(path))?;
                dropped += 1;
            }
        }
        Ok(dropped)
    }
}

struct Writer {
    dir: PathBuf,
    path: PathBuf,
    file: File,
    len: u64,
    seq: u64,
    durable: watch::Sender<u64>,
}

impl Writer {
    fn run(mut self, mut rx: mpsc::Receiver<Append>) {
        while let Some(first) = rx.blocking_recv() {
            let mut batch = vec![first];
            while batch.len() < BATCH {
                match rx.try_recv() {
                    Ok(a) => batch.push(a),
                    Err(_) => break,
                }
            }
            let mut buf = Vec::with_capacity(batch.len() * 512);
            for (i, (event, _)) in batch.iter().enumerate() {
                let line = LineRef {
                    seq: self.seq + 1 + i as u64,
                    event,
                };
                serde_json::to_writer(&mut buf, &line).expect("an event serializes");
                buf.push(b'\n');
            }
            let written = self
                .file
                .write_all(&buf)
                .and_then(|_| self.file.sync_data());
            match written {
                Ok(()) => {
                    let start = self.seq;
                    self.seq += batch.len() as u64;
                    self.len += buf.len() as u64;
                    self.durable.send_replace(self.seq);
                    metrics::histogram!("flotilla_events_batch_size").record(batch.len() as f64);
                    for (i, (_, reply)) in batch.into_iter().enumerate() {
                        let _ = reply.send(Ok(start + 1 + i as u64));
                    }
                    if self.len >= SEGMENT_BYTES {
                        if let Err(e) = self.roll() {
                            tracing::error!(error = %e, "could not begin a new journal segment; appending to the old one");
                        }
                    }
                }
                Err(e) => {
                    tracing::error!(path = %self.path.display(), error = %e, "events journal write failed");
                    metrics::counter!("flotilla_events_journal_errors_total").increment(1);
                    // Cut whatever part of the batch reached the file: none of it was
                    // acknowledged, and the sequence numbers are reused.
                    let _ = self.file.set_len(self.len);
                    for (_, reply) in batch {
                        let _ = reply.send(Err(EventsError::Io(
                            self.path.clone(),
                            std::io::Error::new(e.kind(), e.to_string()),
                        )));
                    }
                }
            }
        }
    }

    fn roll(&mut self) -> Result<(), EventsError> {
        let path = self.dir.join(segment_name(self.seq + 1));
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io(&path))?;
        sync_dir(&self.dir)?;
        self.file = file;
        self.path = path;
        self.len = 0;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Source, Target};

    fn ev(n: u64) -> Event {
        Event::new(
            "push",
            Target {
                digest: format!("sha256:{n:064x}"),
                repository: "a/b".into(),
                ..Target::default()
            },
            None,
            Source::default(),
        )
    }

    #[tokio::test]
    async fn appends_survive_reopening_and_a_torn_tail_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        {
            let j = Journal::open(dir.path()).unwrap();
            for n in 1..=3 {
                assert_eq!(j.append(ev(n)).await.unwrap(), n);
            }
        }
        // A crash mid-append leaves half a line.
        let seg = dir.path().join(segment_name(1));
        let mut f = OpenOptions::new().append(true).open(&seg).unwrap();
        f.write_all(br#"{"seq":4,"event":{"id":"#).unwrap();
        drop(f);
        let j = Journal::open(dir.path()).unwrap();
        assert_eq!(j.last_durable(), 3);
        assert_eq!(j.append(ev(4)).await.unwrap(), 4);
        let all = j.read(0, 100, j.last_durable()).unwrap();
        assert_eq!(
            all.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
            [1, 2, 3, 4]
        );
        assert_eq!(all[3].1.target.digest, ev(4).target.digest);
    }

    #[tokio::test]
    async fn segments_roll_and_passed_ones_are_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let j = std::sync::Arc::new(Journal::open(dir.path()).unwrap());
        // Big enough events that some hundreds roll several segments; appended concurrently,
        // so batches form.
        let mut big = ev(0);
        big.target.media_type = "x".repeat(4000);
        // A batch may carry up to 2 MiB into one segment before it rolls.
        let n = (6 * SEGMENT_BYTES / 4000) + 10;
        let appends: Vec<_> = (0..n)
            .map(|_| {
                let (j, e) = (j.clone(), big.clone());
                tokio::spawn(async move { j.append(e).await })
            })
            .collect();
        let mut seqs = Vec::new();
        for a in appends {
            seqs.push(a.await.unwrap().unwrap());
        }
        seqs.sort();
        assert_eq!(
            seqs,
            (1..=n).collect::<Vec<_>>(),
            "every append got its own number"
        );
        let segs = segments(dir.path()).unwrap();
        assert!(segs.len() >= 3, "{} segments", segs.len());
        // Reading across segments sees every event once, in order.
        let all = j.read(0, usize::MAX, j.last_durable()).unwrap();
        assert_eq!(all.len() as u64, n);
        assert!(all.windows(2).all(|w| w[1].0 == w[0].0 + 1));
        // Reading from the middle starts in the right segment.
        let mid = j.read(n / 2, 5, j.last_durable()).unwrap();
        assert_eq!(mid[0].0, n / 2 + 1);
        // Reading on from a position reads what follows it, across segments, as a full
        // read would.
        let mut after = 0;
        let mut hint = None;
        let mut stepped = Vec::new();
        loop {
            let (got, pos) = j.read_at(after, hint, 97, j.last_durable()).unwrap();
            if got.is_empty() {
                break;
            }
            after = got.last().unwrap().0;
            stepped.extend(got.into_iter().map(|(s, e)| (s, e.id)));
            hint = pos;
            assert_eq!(hint.map(|h| h.seq), Some(after));
        }
        let full: Vec<_> = all.iter().map(|(s, e)| (*s, e.id.clone())).collect();
        assert_eq!(stepped, full);
        // Dropping through the second segment's last event keeps the rest readable.
        let through = segs[2].0 - 1;
        assert_eq!(j.drop_through(through).unwrap(), 2);
        let rest = j.read(through, usize::MAX, j.last_durable()).unwrap();
        assert_eq!(rest.first().map(|r| r.0), Some(through + 1));
        assert_eq!(rest.last().map(|r| r.0), Some(n));
    }
}
