//! Registry events that are never lost. An operation's event goes into a durable outbox (a
//! journal of JSON lines, fsynced) before the client hears that the operation succeeded, so a
//! `kill -9` after the 201 cannot lose it; every sink then receives the journal in order, at
//! least once, from a cursor it persists after each delivery, retrying with backoff while the
//! receiver is down, across restarts. Distribution keeps its queue in memory and drops it with
//! the process; this is what it would take not to.
//!
//! The journal is split into segments (`journal-<first seq>.log`, rolled at a few MiB) so a
//! sink that was away for a week reads only what it missed and segments every sink has
//! passed are deleted; writes are grouped (one fsync for every event queued meanwhile), so
//! concurrent pushes share the cost of durability.

mod journal;
mod sink;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

pub use journal::{Journal, Numbered, Position};
pub use sink::{check_url, parse_sinks, Kind, SinkConfig, SinkStatus, CLOUDEVENTS_BATCH, ENVELOPE};

#[derive(Debug, thiserror::Error)]
pub enum EventsError {
    #[error("events journal {0}: {1}")]
    Io(PathBuf, std::io::Error),
    #[error("events journal {0}: line {1} is not an event: {2}")]
    Corrupt(PathBuf, usize, String),
    #[error("the events journal writer has stopped")]
    Stopped,
    #[error("sink {0}: {1}")]
    Sink(String, String),
}

/// One event, in the shape of Distribution's notification envelope
/// (`application/vnd.docker.distribution.events.v2+json`), so receivers written for it work.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Stable across retries: receivers deduplicate on it.
    pub id: String,
    /// RFC 3339, UTC.
    pub timestamp: String,
    /// Registry events use Distribution's actions (`push`, `delete`, `mount`, `pull`); the
    /// cluster's and the deploy side's are dotted (`node.died`, `deploy.converged`, ...), so a
    /// receiver written for Distribution passes them by.
    pub action: String,
    pub target: Target,
    #[serde(default)]
    pub actor: Actor,
    pub source: Source,
    /// What the action needs beyond the target: a moved tag's previous digest, a reseed's
    /// figures, the host of a deploy. Absent when empty, so the envelope stays Distribution's.
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub detail: serde_json::Map<String, serde_json::Value>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    #[serde(
        rename = "mediaType",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    pub media_type: String,
    #[serde(default)]
    pub size: u64,
    pub digest: String,
    #[serde(default)]
    pub length: u64,
    pub repository: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Actor {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Source {
    pub addr: String,
    #[serde(rename = "instanceID")]
    pub instance_id: String,
}

impl Event {
    /// A new event with a fresh id and the current time.
    pub fn new(action: &str, target: Target, actor: Option<String>, source: Source) -> Event {
        Event {
            id: uuid::Uuid::new_v4().to_string(),
            timestamp: rfc3339(SystemTime::now()),
            action: action.to_string(),
            target,
            actor: Actor { name: actor },
            source,
            detail: serde_json::Map::new(),
        }
    }

    /// Adds `key: value` to the event's detail.
    pub fn with_detail(mut self, key: &str, value: impl Into<serde_json::Value>) -> Event {
        self.detail.insert(key.to_string(), value.into());
        self
    }

    /// Gives the event an id made from `what` (UUID-shaped, from its SHA-256), for events that
    /// several components observe (two routers watching a node die): the same change gets the
    /// same id from each, and receivers deduplicate it as a retry.
    pub fn with_stable_id(mut self, what: &str) -> Event {
        let h = flotilla_core::Digest::sha256_of(what.as_bytes()).to_string();
        let x = &h["sha256:".len()..];
        self.id = format!(
            "{}-{}-{}-{}-{}",
            &x[0..8],
            &x[8..12],
            &x[12..16],
            &x[16..20],
            &x[20..32]
        );
        self
    }
}

pub use flotilla_core::rfc3339;

/// How the outbox is set up: where its journal lives and whom it delivers to.
#[derive(Clone, Debug)]
pub struct OutboxConfig {
    pub dir: PathBuf,
    pub sinks: Vec<SinkConfig>,
}

/// The durable outbox and its sinks' delivery tasks (stopped when it is dropped).
pub struct Outbox {
    journal: Arc<Journal>,
    sinks: Vec<Arc<sink::Sink>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox")
            .field("dir", &self.journal.dir())
            .field("sinks", &self.sinks.len())
            .finish()
    }
}

impl Outbox {
    /// Opens (or creates) the journal and starts one delivery task per sink, each from the
    /// cursor it persisted (a sink seen for the first time starts at the journal's end).
    /// Must run inside a Tokio runtime.
    pub fn open(cfg: OutboxConfig) -> Result<Outbox, EventsError> {
        let journal = Arc::new(Journal::open(&cfg.dir)?);
        let mut sinks = Vec::new();
        for s in cfg.sinks {
            sinks.push(Arc::new(sink::Sink::open(s, &journal)?));
        }
        let all: Arc<[Arc<sink::Sink>]> = sinks.clone().into();
        let tasks = sinks
            .iter()
            .map(|s| tokio::spawn(sink::deliver(s.clone(), journal.clone(), all.clone())))
            .collect();
        Ok(Outbox {
            journal,
            sinks,
            tasks,
        })
    }

    /// Records `event` durably; returns its sequence number once it is on disk.
    pub async fn record(&self, event: Event) -> Result<u64, EventsError> {
        let seq = self.journal.append(event).await?;
        metrics::counter!("flotilla_events_recorded_total").increment(1);
        Ok(seq)
    }

    /// Each sink's queue and health, for `GET /admin/v1/events/sinks`.
    pub fn sinks(&self) -> Vec<SinkStatus> {
        let last = self.journal.last_durable();
        self.sinks.iter().map(|s| s.status(last)).collect()
    }

    /// Every event after `since` (a sequence number), at most `limit`: the recent timeline.
    pub fn since(&self, since: u64, limit: usize) -> Result<Vec<(u64, Event)>, EventsError> {
        self.journal.read(since, limit, self.journal.last_durable())
    }
}

impl Drop for Outbox {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Delivery attempts back off from this, doubling, up to [`MAX_BACKOFF`].
pub const MIN_BACKOFF: Duration = Duration::from_millis(200);
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    fn ev(n: u64) -> Event {
        Event::new(
            "push",
            Target {
                digest: format!("sha256:{n:064x}"),
                repository: format!("team/r{}", n % 3),
                tag: Some(format!("v{n}")),
                ..Target::default()
            },
            Some("bob".into()),
            Source::default(),
        )
    }

    type Seen = Arc<Mutex<(u32, Vec<Event>)>>;

    /// A receiver on `listener` that answers 500 to its first `fail` requests, then 200,
    /// keeping every event of the accepted ones.
    fn receiver(listener: std::net::TcpListener, fail: u32) -> Seen {
        let seen: Seen = Arc::default();
        let s = seen.clone();
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(move |headers: axum::http::HeaderMap, body: String| {
                let s = s.clone();
                async move {
                    assert_eq!(headers["content-type"], sink::ENVELOPE);
                    let mut g = s.lock().unwrap();
                    g.0 += 1;
                    if g.0 <= fail {
                        return axum::http::StatusCode::INTERNAL_SERVER_ERROR;
                    }
                    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
                    for e in v["events"].as_array().unwrap() {
                        g.1.push(serde_json::from_value(e.clone()).unwrap());
                    }
                    axum::http::StatusCode::OK
                }
            }),
        );
        listener.set_nonblocking(true).unwrap();
        let l = tokio::net::TcpListener::from_std(listener).unwrap();
        tokio::spawn(async move { axum::serve(l, app).await });
        seen
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn events_recorded_while_the_receiver_is_down_arrive_in_order_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        // A port nothing listens on yet: the receiver is down.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let cfg = OutboxConfig {
            dir: dir.path().to_path_buf(),
            sinks: vec![SinkConfig::webhook(
                "hook",
                &format!("http://127.0.0.1:{port}/hook"),
                Duration::from_secs(1),
            )],
        };
        let outbox = Outbox::open(cfg.clone()).unwrap();
        let mut sent = Vec::new();
        for n in 1..=20 {
            let e = ev(n);
            sent.push(e.id.clone());
            assert_eq!(outbox.record(e).await.unwrap(), n);
        }
        let st = outbox.sinks();
        assert_eq!(st[0].pending, 20, "{st:?}");
        // The process dies with nothing delivered; a new one opens the same outbox.
        drop(outbox);
        let outbox = Outbox::open(cfg).unwrap();
        // The receiver comes up, failing its first two requests.
        let seen = receiver(std::net::TcpListener::bind(("127.0.0.1", port)).unwrap(), 2);
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let got: Vec<String> = seen
                .lock()
                .unwrap()
                .1
                .iter()
                .map(|e| e.id.clone())
                .collect();
            let mut first: Vec<String> = Vec::new();
            for id in got {
                if !first.contains(&id) {
                    first.push(id);
                }
            }
            if first.len() == sent.len() {
                assert_eq!(first, sent, "every event, in the order recorded");
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{} of {} events delivered within 20 s: {:?}",
                first.len(),
                sent.len(),
                outbox.sinks()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while outbox.sinks()[0].pending != 0 {
            assert!(std::time::Instant::now() < deadline, "{:?}", outbox.sinks());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let st = &outbox.sinks()[0];
        assert_eq!(st.delivered_through, 20);
        assert!(seen.lock().unwrap().0 >= 3, "the two failures were retried");
        assert!(
            st.last_success.is_some() && st.consecutive_failures == 0,
            "{st:?}"
        );
        // The event says what the receiver needs.
        let first = seen.lock().unwrap().1[0].clone();
        assert_eq!(first.action, "push");
        assert_eq!(first.actor.name.as_deref(), Some("bob"));
        assert_eq!(first.target.tag.as_deref(), Some("v1"));
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_receiver_that_hangs_costs_a_timeout_per_attempt_not_a_stuck_queue() {
        let dir = tempfile::tempdir().unwrap();
        // Accepts connections and never answers.
        let hang = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = hang.local_addr().unwrap().port();
        let held = std::thread::spawn(move || {
            let conns: Vec<_> = hang.incoming().take(3).collect();
            std::thread::sleep(Duration::from_secs(10));
            drop(conns);
        });
        let outbox = Outbox::open(OutboxConfig {
            dir: dir.path().to_path_buf(),
            sinks: vec![SinkConfig::webhook(
                "slow",
                &format!("http://127.0.0.1:{port}/hook"),
                Duration::from_millis(300),
            )],
        })
        .unwrap();
        let started = std::time::Instant::now();
        assert_eq!(
            outbox.record(ev(1)).await.unwrap(),
            1,
            "recording never waits on a sink"
        );
        assert!(started.elapsed() < Duration::from_secs(1));
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let s = &outbox.sinks()[0];
            if s.consecutive_failures >= 2 {
                assert_eq!(s.pending, 1);
                let e = s.last_error.as_deref().unwrap_or("");
                assert!(e.contains("timed out") || e.contains("timeout"), "{e}");
                break;
            }
            assert!(std::time::Instant::now() < deadline, "{s:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        drop(outbox);
        let _ = held;
    }

    #[tokio::test]
    async fn a_bad_sink_is_refused_at_start() {
        let dir = tempfile::tempdir().unwrap();
        for (name, url) in [
            ("ok", "ftp://x/hook"),
            ("ok", "not a url"),
            ("a b", "http://x/"),
        ] {
            let e = Outbox::open(OutboxConfig {
                dir: dir.path().to_path_buf(),
                sinks: vec![SinkConfig::webhook(name, url, Duration::from_secs(1))],
            })
            .unwrap_err();
            assert!(matches!(e, EventsError::Sink(..)), "{name} {url}: {e}");
        }
    }

    #[test]
    fn timestamps_are_rfc3339() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        assert_eq!(rfc3339(t), "2023-11-14T22:13:20.123Z");
        assert_eq!(rfc3339(SystemTime::UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
    }
}
