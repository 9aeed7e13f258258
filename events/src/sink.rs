//! Delivery to one sink: from its persisted cursor, in journal order, a batch at a time in
//! Distribution's envelope (`{"events": [...]}`), the cursor moved (and persisted) only after
//! the receiver answered 2xx, so a receiver that is down, slow or failing gets everything
//! later, at least once, with backoff between attempts and a timeout on each.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::journal::Journal;
use crate::{EventsError, MAX_BACKOFF, MIN_BACKOFF};

/// Distribution's notification media type.
pub const ENVELOPE: &str = "application/vnd.docker.distribution.events.v2+json";
/// Events per request.
const BATCH: usize = 100;

#[derive(Clone, Debug)]
pub struct SinkConfig {
    /// Names the sink's cursor file and its metrics: letters, digits, `-`, `_`.
    pub name: String,
    pub url: String,
    /// Per request, connecting included.
    pub timeout: Duration,
}

/// What `GET /admin/v1/events/sinks` shows of a sink.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct SinkStatus {
    pub name: String,
    pub url: String,
    /// Events recorded but not yet delivered.
    pub pending: u64,
    /// The last event the receiver took.
    pub delivered_through: u64,
    pub last_success: Option<String>,
    pub last_error: Option<String>,
    pub consecutive_failures: u64,
}

#[derive(Default)]
struct State {
    last_success: Option<SystemTime>,
    last_error: Option<String>,
    failures: u64,
}

pub(crate) struct Sink {
    cfg: SinkConfig,
    url: reqwest::Url,
    cursor_path: PathBuf,
    cursor: AtomicU64,
    state: Mutex<State>,
    client: reqwest::Client,
}

fn bad(name: &str, m: impl Into<String>) -> EventsError {
    EventsError::Sink(name.to_string(), m.into())
}

impl Sink {
    /// Checks the configuration (a bad URL stops the start, not the first delivery) and
    /// reads the cursor; a new sink starts at the journal's end.
    pub(crate) fn open(cfg: SinkConfig, journal: &Journal) -> Result<Sink, EventsError> {
        if cfg.name.is_empty()
            || !cfg
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(bad(
                &cfg.name,
                "a sink name is letters, digits, '-' and '_'",
            ));
        }
        let url = check_url(&cfg.url).map_err(|m| bad(&cfg.name, m))?;
        let cursor_path = journal.dir().join(format!("cursor-{}", cfg.name));
        let cursor = match std::fs::read_to_string(&cursor_path) {
            Ok(t) => t.trim().parse::<u64>().map_err(|e| {
                bad(
                    &cfg.name,
                    format!("cursor file {}: {e}", cursor_path.display()),
                )
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let last = journal.last_durable();
                write_cursor(&cursor_path, last)?;
                last
            }
            Err(e) => return Err(EventsError::Io(cursor_path, e)),
        };
        let client = reqwest::Client::builder()
            .timeout(cfg.timeout)
            .connect_timeout(cfg.timeout.min(Duration::from_secs(2)))
            .build()
            .map_err(|e| bad(&cfg.name, e.to_string()))?;
        Ok(Sink {
            cfg,
            url,
            cursor_path,
            cursor: AtomicU64::new(cursor),
            state: Mutex::default(),
            client,
        })
    }

    pub(crate) fn status(&self, last: u64) -> SinkStatus {
        let s = self.state.lock().expect("sink state");
        let cursor = self.cursor.load(Ordering::Acquire);
        SinkStatus {
            name: self.cfg.name.clone(),
            url: self.cfg.url.clone(),
            pending: last.saturating_sub(cursor),
            delivered_through: cursor,
            last_success: s.last_success.map(crate::rfc3339),
            last_error: s.last_error.clone(),
            consecutive_failures: s.failures,
        }
    }

    /// reqwest's own message is "error sending request"; the cause is what an operator
    /// needs to read in `last_error`.
    fn describe(&self, e: &reqwest::Error) -> String {
        if e.is_timeout() {
            return format!("timed out after {:?}", self.cfg.timeout);
        }
        let mut m = e.to_string();
        let mut src = std::error::Error::source(e);
        while let Some(s) = src {
            m.push_str(": ");
            m.push_str(&s.to_string());
            src = s.source();
        }
        m
    }

    async fn post(&self, body: Vec<u8>) -> Result<(), String> {
        let r = self
            .client
            .post(self.url.clone())
            .header(reqwest::header::CONTENT_TYPE, ENVELOPE)
            .body(body)
            .send()
            .await
            .map_err(|e| self.describe(&e))?;
        if r.status().is_success() {
            Ok(())
        } else {
            Err(format!("the receiver answered {}", r.status()))
        }
    }
}

/// A webhook URL as the sinks take it: `http://` or `https://` with a host.
pub fn check_url(url: &str) -> Result<reqwest::Url, String> {
    let u = reqwest::Url::parse(url).map_err(|e| format!("{url:?} is not a URL: {e}"))?;
    if !matches!(u.scheme(), "http" | "https") || u.host_str().is_none() {
        return Err(format!("{url:?}: a webhook is an http:// or https:// URL"));
    }
    Ok(u)
}

fn write_cursor(path: &std::path::Path, seq: u64) -> Result<(), EventsError> {
    // Renamed into place: a crash leaves the old cursor or the new one, never half of one
    // (an old cursor only means some events are delivered again).
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, format!("{seq}\n"))
        .and_then(|_| std::fs::rename(&tmp, path))
        .map_err(|e| EventsError::Io(path.to_path_buf(), e))
}

#[derive(Serialize)]
struct Envelope<'a> {
    events: Vec<&'a crate::Event>,
}

/// The delivery loop of one sink; runs until the outbox is dropped.
pub(crate) async fn deliver(sink: Arc<Sink>, journal: Arc<Journal>, all: Arc<[Arc<Sink>]>) {
    let mut durable = journal.subscribe();
    let mut backoff = MIN_BACKOFF;
    let name = sink.cfg.name.clone();
    loop {
        let cursor = sink.cursor.load(Ordering::Acquire);
        let last = *durable.borrow_and_update();
        metrics::gauge!("flotilla_events_pending", "sink" => name.clone())
            .set(last.saturating_sub(cursor) as f64);
        if last <= cursor {
            if durable.changed().await.is_err() {
                return;
            }
            continue;
        }
        let batch = match journal.read(cursor, BATCH, last) {
            Ok(b) if !b.is_empty() => b,
            Ok(_) => {
                // The journal lost events the cursor had not passed (deleted by hand?):
                // say so and move on rather than spin.
                tracing::error!(sink = %name, cursor, last, "events missing from the journal; skipping to its end");
                sink.cursor.store(last, Ordering::Release);
                continue;
            }
            Err(e) => {
                tracing::error!(sink = %name, error = %e, "reading the events journal");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        };
        let through = batch.last().map_or(cursor, |(s, _)| *s);
        let body = serde_json::to_vec(&Envelope {
            events: batch.iter().map(|(_, e)| e).collect(),
        })
        .expect("events serialize");
        match sink.post(body).await {
            Ok(()) => {
                sink.cursor.store(through, Ordering::Release);
                if let Err(e) = write_cursor(&sink.cursor_path, through) {
                    tracing::error!(sink = %name, error = %e, "could not persist the sink's cursor (events may be delivered again)");
                }
                {
                    let mut s = sink.state.lock().expect("sink state");
                    s.last_success = Some(SystemTime::now());
                    s.failures = 0;
                }
                metrics::counter!("flotilla_events_delivered_total", "sink" => name.clone())
                    .increment(batch.len() as u64);
                backoff = MIN_BACKOFF;
                let passed = all
                    .iter()
                    .map(|s| s.cursor.load(Ordering::Acquire))
                    .min()
                    .unwrap_or(through);
                if let Err(e) = journal.drop_through(passed) {
                    tracing::warn!(error = %e, "could not delete delivered journal segments");
                }
            }
            Err(e) => {
                tracing::warn!(sink = %name, url = %sink.cfg.url, error = %e, retry_in = ?backoff, "event delivery failed");
                metrics::counter!("flotilla_events_delivery_failures_total", "sink" => name.clone())
                    .increment(1);
                {
                    let mut s = sink.state.lock().expect("sink state");
                    s.last_error = Some(e);
                    s.failures += 1;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}
