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
/// A CloudEvents 1.0 batch in the structured JSON format.
pub const CLOUDEVENTS_BATCH: &str = "application/cloudevents-batch+json";
/// How long a woken sink waits for more events before sending.
const LINGER: Duration = Duration::from_millis(20);
/// Events per request.
const BATCH: usize = 100;

#[derive(Clone, Debug)]
pub struct SinkConfig {
    /// Names the sink's cursor file and its metrics: letters, digits, `-`, `_`.
    pub name: String,
    pub url: String,
    /// Per request, connecting included.
    pub timeout: Duration,
    pub kind: Kind,
    /// Sent with every delivery (a receiver's token, say).
    pub headers: Vec<(String, String)>,
    /// Only these actions (`push`, `delete`); empty: all.
    pub actions: Vec<String>,
    /// Only repositories matching one of these globs; empty: all.
    pub repositories: Vec<flotilla_core::glob::Glob>,
}

/// The body a sink receives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Distribution's notification envelope, `{"events": [...]}`.
    Distribution,
    /// A CloudEvents 1.0 batch (structured JSON, `application/cloudevents-batch+json`), each
    /// event's `data` the Distribution-shaped event.
    CloudEvents,
}

impl SinkConfig {
    /// A `--webhook`: Distribution's envelope, every event.
    pub fn webhook(name: &str, url: &str, timeout: Duration) -> SinkConfig {
        SinkConfig {
            name: name.to_string(),
            url: url.to_string(),
            timeout,
            kind: Kind::Distribution,
            headers: Vec::new(),
            actions: Vec::new(),
            repositories: Vec::new(),
        }
    }

    fn wants(&self, e: &crate::Event) -> bool {
        (self.actions.is_empty() || self.actions.contains(&e.action))
            && (self.repositories.is_empty()
                || self
                    .repositories
                    .iter()
                    .any(|g| g.matches(&e.target.repository)))
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SinksFile {
    #[serde(default)]
    sinks: Vec<RawSink>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSink {
    name: String,
    url: String,
    #[serde(default = "distribution")]
    kind: Kind,
    #[serde(default = "five")]
    timeout_secs: u64,
    #[serde(default)]
    headers: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    actions: Vec<String>,
    #[serde(default)]
    repositories: Vec<String>,
}

fn distribution() -> Kind {
    Kind::Distribution
}

fn five() -> u64 {
    5
}

/// The sinks of an `--events FILE` (TOML, `[[sinks]]` tables), every mistake named.
pub fn parse_sinks(text: &str) -> Result<Vec<SinkConfig>, String> {
    let f: SinksFile = toml::from_str(text).map_err(|e| e.to_string())?;
    let mut out: Vec<SinkConfig> = Vec::new();
    for r in f.sinks {
        let at = |m: String| format!("sink {:?}: {m}", r.name);
        if out.iter().any(|s| s.name == r.name) {
            return Err(at("two sinks have this name".into()));
        }
        check_url(&r.url).map_err(at)?;
        if r.timeout_secs == 0 {
            return Err(at("timeout_secs must be positive".into()));
        }
        for a in &r.actions {
            if !matches!(a.as_str(), "push" | "delete") {
                return Err(at(format!("unknown action {a:?} (push, delete)")));
            }
        }
        for (k, v) in &r.headers {
            if reqwest::header::HeaderName::from_bytes(k.as_bytes()).is_err()
                || reqwest::header::HeaderValue::from_str(v).is_err()
            {
                return Err(at(format!("header {k:?} is not a valid HTTP header")));
            }
        }
        let repositories = r
            .repositories
            .iter()
            .map(|p| flotilla_core::glob::Glob::new(p).map_err(|m| at(m.clone())))
            .collect::<Result<Vec<_>, _>>()?;
        out.push(SinkConfig {
            name: r.name.clone(),
            url: r.url.clone(),
            timeout: Duration::from_secs(r.timeout_secs),
            kind: r.kind,
            headers: r.headers.into_iter().collect(),
            actions: r.actions,
            repositories,
        });
    }
    Ok(out)
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
        let content_type = match self.cfg.kind {
            Kind::Distribution => ENVELOPE,
            Kind::CloudEvents => CLOUDEVENTS_BATCH,
        };
        let mut req = self
            .client
            .post(self.url.clone())
            .header(reqwest::header::CONTENT_TYPE, content_type);
        for (k, v) in &self.cfg.headers {
            req = req.header(k.as_str(), v.as_str());
        }
        let r = req.body(body).send().await.map_err(|e| self.describe(&e))?;
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

/// One event as CloudEvents 1.0 (structured mode).
#[derive(Serialize)]
struct CloudEvent<'a> {
    specversion: &'static str,
    id: &'a str,
    source: String,
    #[serde(rename = "type")]
    kind: String,
    time: &'a str,
    subject: String,
    datacontenttype: &'static str,
    data: &'a crate::Event,
}

fn body(kind: Kind, events: Vec<&crate::Event>) -> Vec<u8> {
    match kind {
        Kind::Distribution => serde_json::to_vec(&Envelope { events }),
        Kind::CloudEvents => serde_json::to_vec(
            &events
                .into_iter()
                .map(|e| CloudEvent {
                    specversion: "1.0",
                    id: &e.id,
                    source: format!("flotilla://{}/{}", e.source.addr, e.source.instance_id),
                    kind: format!("io.flotilla.registry.manifest.{}", e.action),
                    time: &e.timestamp,
                    subject: match &e.target.tag {
                        Some(t) => format!("{}:{t}", e.target.repository),
                        None => format!("{}@{}", e.target.repository, e.target.digest),
                    },
                    datacontenttype: "application/json",
                    data: e,
                })
                .collect::<Vec<_>>(),
        ),
    }
    .expect("events serialize")
}

/// The delivery loop of one sink; runs until the outbox is dropped.
pub(crate) async fn deliver(sink: Arc<Sink>, journal: Arc<Journal>, all: Arc<[Arc<Sink>]>) {
    let mut durable = journal.subscribe();
    let mut backoff = MIN_BACKOFF;
    let name = sink.cfg.name.clone();
    // Where the last delivered batch ended in the journal: the next read starts there.
    let mut hint = None;
    loop {
        let cursor = sink.cursor.load(Ordering::Acquire);
        let last = *durable.borrow_and_update();
        metrics::gauge!("flotilla_events_pending", "sink" => name.clone())
            .set(last.saturating_sub(cursor) as f64);
        if last <= cursor {
            if durable.changed().await.is_err() {
                return;
            }
            // Events come in bursts (an image is several tags, CI pushes many): a moment's
            // wait turns a request per event into a request per burst.
            tokio::time::sleep(LINGER).await;
            continue;
        }
        let (batch, pos) = match journal.read_at(cursor, hint, BATCH, last) {
            Ok((b, pos)) if !b.is_empty() => (b, pos),
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
        let wanted: Vec<&crate::Event> = batch
            .iter()
            .map(|(_, e)| e)
            .filter(|e| sink.cfg.wants(e))
            .collect();
        let sent = wanted.len();
        let delivered = if wanted.is_empty() {
            // Nothing here for this sink: pass it by.
            Ok(())
        } else {
            sink.post(body(sink.cfg.kind, wanted)).await
        };
        match delivered {
            Ok(()) => {
                hint = pos;
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
                    .increment(sent as u64);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Event, Source, Target};

    fn ev(action: &str, repo: &str) -> Event {
        Event::new(
            action,
            Target {
                digest: format!("sha256:{}", "b".repeat(64)),
                repository: repo.into(),
                tag: Some("v1".into()),
                ..Target::default()
            },
            None,
            Source {
                addr: "r1".into(),
                instance_id: "i".into(),
            },
        )
    }

    #[test]
    fn an_events_file_names_its_mistakes_and_filters_what_it_asks() {
        let sinks = parse_sinks(
            r#"
[[sinks]]
name = "audit"
kind = "cloudevents"
url = "https://hooks.example/registry"
timeout_secs = 2
headers = { Authorization = "Bearer t" }
actions = ["delete"]
repositories = ["billing/**"]

[[sinks]]
name = "all"
url = "http://127.0.0.1:9/hook"
"#,
        )
        .unwrap();
        assert_eq!(sinks.len(), 2);
        let (audit, all) = (&sinks[0], &sinks[1]);
        assert_eq!(audit.kind, Kind::CloudEvents);
        assert_eq!(audit.timeout, Duration::from_secs(2));
        assert_eq!(audit.headers, [("Authorization".into(), "Bearer t".into())]);
        assert!(audit.wants(&ev("delete", "billing/api")));
        assert!(!audit.wants(&ev("push", "billing/api")));
        assert!(!audit.wants(&ev("delete", "shop/api")));
        assert_eq!(all.kind, Kind::Distribution);
        assert!(all.wants(&ev("push", "shop/api")));
        for (bad, names) in [
            ("[[sinks]]\nname = \"a\"\nurl = \"ftp://x\"", "ftp://x"),
            ("[[sinks]]\nname = \"a\"\nurl = \"http://x/\"\nactions = [\"pull\"]", "pull"),
            ("[[sinks]]\nname = \"a\"\nurl = \"http://x/\"\nkind = \"slack\"", "slack"),
            ("[[sinks]]\nname = \"a\"\nurl = \"http://x/\"\nrepositories = [\"\"]", "empty"),
            ("[[sinks]]\nname = \"a\"\nurl = \"http://x/\"\nurl2 = 1", "url2"),
            ("[[sinks]]\nname=\"a\"\nurl=\"http://x/\"\n[[sinks]]\nname=\"a\"\nurl=\"http://y/\"", "two sinks"),
        ] {
            let e = parse_sinks(bad).unwrap_err();
            assert!(e.contains(names), "{bad:?}: {e}");
        }
    }

    #[test]
    fn cloudevents_batches_carry_the_event_as_data() {
        let e = ev("push", "billing/api");
        let v: serde_json::Value =
            serde_json::from_slice(&body(Kind::CloudEvents, vec![&e])).unwrap();
        let c = &v[0];
        assert_eq!(c["specversion"], "1.0");
        assert_eq!(c["id"], e.id.as_str());
        assert_eq!(c["type"], "io.flotilla.registry.manifest.push");
        assert_eq!(c["source"], "flotilla://r1/i");
        assert_eq!(c["subject"], "billing/api:v1");
        assert_eq!(c["data"]["target"]["repository"], "billing/api");
        let d: serde_json::Value =
            serde_json::from_slice(&body(Kind::Distribution, vec![&e])).unwrap();
        assert_eq!(d["events"][0]["id"], e.id.as_str());
    }
}
