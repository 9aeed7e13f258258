//! The drills' load client: one pusher and two pullers against the compose cluster's two
//! routers, recording every acknowledged push and every failed request with its time, so a
//! drill can say what a fault cost clients and how long they took to recover.
//!
//! The pusher pushes small distinct images (config blob, layer blob, manifest under a new
//! tag `tN`) into a few repositories and then moves the repository's `latest` tag to the
//! same manifest. The pullers pull acknowledged images back by tag, checking the manifest's
//! and every blob's digest, and read `latest` checking it is current: a read through the
//! router that acknowledged a `latest` write, begun after that acknowledgement, must not
//! return an older value (ARCHITECTURE.md, "In-sync replicas"; reads through the other
//! router may trail by the watch delay, which is counted and reported, not failed).
//!
//! Every request has a deadline (15 s, connect 2 s). A request that gets no answer or a
//! 5xx from one router is sent again to the other, and that router is avoided for
//! `ROUTER_BACKOFF` (then tried again), as a client configured with both routers does (the
//! deploy agent will): each such attempt is recorded as a failed request, and only an
//! operation whose request failed on both routers is a failed operation. A wrong answer
//! (404 for an acknowledged tag, a digest mismatch) is never retried.

#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::support::{image_manifest, sha256, OCI_MANIFEST};

/// Whole-request deadline: a manifest write may take its 5 s attempt plus a 3 s commit.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Pacing between a client's operations, so the load stays small next to the cluster.
const PUSH_PACE: Duration = Duration::from_millis(100);
const PULL_PACE: Duration = Duration::from_millis(50);
/// How long a router that failed a request is skipped (unless both have failed).
const ROUTER_BACKOFF: Duration = Duration::from_secs(2);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Kind {
    Push,
    Pull,
}

/// One acknowledged push.
#[derive(Clone, Debug)]
pub(crate) struct Image {
    pub(crate) repo: String,
    pub(crate) tag: String,
    pub(crate) manifest: String,
    pub(crate) blobs: Vec<String>,
}

/// One request attempt that failed (no answer, or a 5xx), or an operation that failed.
#[derive(Clone, Debug)]
pub(crate) struct Failure {
    pub(crate) at: Instant,
    pub(crate) kind: Kind,
    pub(crate) router: Option<usize>,
    pub(crate) what: String,
}

/// A write of `latest` in one repository, by the pusher's sequence number.
#[derive(Clone, Debug)]
struct LatestWrite {
    seq: u64,
    /// Router and time of the acknowledgement; `None` when not acknowledged (it may still
    /// have been applied).
    acked: Option<(usize, Instant)>,
}

#[derive(Debug, Default)]
struct State {
    acked: Vec<Image>,
    /// Attempted `latest` writes per repository, and which sequence number each digest is.
    latest: HashMap<String, Vec<LatestWrite>>,
    seq_of: HashMap<String, u64>,
    failed_requests: Vec<Failure>,
    failed_ops: Vec<Failure>,
    /// Completion times of successful operations.
    ok: Vec<(Instant, Kind)>,
    violations: Vec<String>,
    cross_router_lag: usize,
    longest_lag: Duration,
}

struct Inner {
    routers: [String; 2],
    http: reqwest::Client,
    repos: Vec<String>,
    label: String,
    state: Mutex<State>,
    stop: AtomicBool,
    /// Per router, until when it is avoided after a failed request.
    avoid_until: Mutex<[Option<Instant>; 2]>,
}

/// What one window of the run cost clients.
#[derive(Debug)]
pub(crate) struct Window {
    pub(crate) name: String,
    pub(crate) failed_push_requests: usize,
    pub(crate) failed_pull_requests: usize,
    pub(crate) failed_pushes: usize,
    pub(crate) failed_pulls: usize,
    pub(crate) pushes: usize,
    pub(crate) pulls: usize,
    /// What the failed requests got, by class (`HTTP 503`, `connection refused`, ...).
    pub(crate) classes: Vec<(String, usize)>,
    /// The first few failed operations: when, and what the last router answered.
    pub(crate) failed_examples: Vec<String>,
    /// From the fault to the last failed request in the window (failed over or not): how
    /// long clients saw the fault.
    pub(crate) last_failed_request: Option<Duration>,
    /// From the fault to the last failed operation in the window.
    pub(crate) last_failed_op: Option<Duration>,
    /// From the fault to the first successful operation of the kind that failed last,
    /// completed after it: how long until a client was served again.
    pub(crate) recovered: Option<Duration>,
}

impl std::fmt::Display for Window {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: {} pushes, {} pulls; failed requests: {} push, {} pull; failed operations \
             (both routers): {} push, {} pull",
            self.name,
            self.pushes,
            self.pulls,
            self.failed_push_requests,
            self.failed_pull_requests,
            self.failed_pushes,
            self.failed_pulls
        )?;
        if !self.classes.is_empty() {
            let c: Vec<String> = self
                .classes
                .iter()
                .map(|(c, n)| format!("{n}× {c}"))
                .collect();
            write!(f, " ({})", c.join(", "))?;
        }
        if let Some(l) = self.last_failed_request {
            write!(f, "; last failed request +{l:.1?}")?;
        }
        match (self.last_failed_op, self.recovered) {
            (Some(l), Some(r)) => {
                write!(f, ", last failed operation +{l:.1?}, served again +{r:.1?}")?
            }
            (Some(l), None) => write!(f, ", last failed operation +{l:.1?}, not served again")?,
            (None, _) if self.last_failed_request.is_some() => {
                write!(f, ", every operation served (failover)")?
            }
            _ => {}
        }
        for e in &self.failed_examples {
            write!(f, "\n    failed operation {e}")?;
        }
        Ok(())
    }
}

/// The running load; [`Load::stop`] ends it.
pub(crate) struct Load {
    inner: Arc<Inner>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    /// Push one image into each of `repos` (placing their shard keys, asserting success),
    /// then start the pusher and two pullers against routers at `routers`.
    pub(crate) async fn start(label: &str, routers: [String; 2], repos: Vec<String>) -> Load {
        let inner = Arc::new(Inner {
            routers,
            http: reqwest::Client::builder()
                .timeout(REQUEST_TIMEOUT)
                .connect_timeout(CONNECT_TIMEOUT)
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .expect("client"),
            repos,
            label: label.to_owned(),
            state: Mutex::new(State::default()),
            stop: AtomicBool::new(false),
            avoid_until: Mutex::new([None; 2]),
        });
        for seq in 0..inner.repos.len() as u64 {
            assert!(inner.push(seq).await, "initial push {seq} failed");
        }
        let mut tasks = Vec::new();
        let n = inner.repos.len() as u64;
        let pusher = inner.clone();
        tasks.push(tokio::spawn(async move {
            let mut seq = n;
            while !pusher.stop.load(Ordering::SeqCst) {
                pusher.push(seq).await;
                seq += 1;
                tokio::time::sleep(PUSH_PACE).await;
            }
        }));
        for id in 0..2u64 {
            let puller = inner.clone();
            tasks.push(tokio::spawn(async move {
                let mut i = id;
                while !puller.stop.load(Ordering::SeqCst) {
                    puller.pull_one(i).await;
                    i += 1;
                    tokio::time::sleep(PULL_PACE).await;
                }
            }));
        }
        Load { inner, tasks }
    }

    /// Acknowledged pushes so far.
    pub(crate) fn acked(&self) -> usize {
        self.inner.state.lock().unwrap().acked.len()
    }

    /// Successful operations of `kind` completed since `since`.
    pub(crate) fn ok_since(&self, kind: Kind, since: Instant) -> usize {
        let s = self.inner.state.lock().unwrap();
        s.ok.iter()
            .filter(|(t, k)| *k == kind && *t >= since)
            .count()
    }

    /// Wait until at least `pushes` pushes and `pulls` pulls succeeded after `since`
    /// (bounded): the load goes on, and the cluster serves it, past a point.
    pub(crate) async fn wait_served(&self, since: Instant, pushes: usize, pulls: usize) {
        crate::compose_support::poll_for(
            &format!("{pushes} pushes and {pulls} pulls to succeed"),
            Duration::from_secs(120),
            || async {
                (self.ok_since(Kind::Push, since) >= pushes
                    && self.ok_since(Kind::Pull, since) >= pulls)
                    .then_some(())
            },
        )
        .await;
    }

    /// What `[from, to)` cost clients (`name` is the fault's).
    pub(crate) fn window(&self, name: &str, from: Instant, to: Instant) -> Window {
        let s = self.inner.state.lock().unwrap();
        let within = |t: &Instant| *t >= from && *t < to;
        let count =
            |v: &[Failure], k: Kind| v.iter().filter(|f| f.kind == k && within(&f.at)).count();
        let last_request = s
            .failed_requests
            .iter()
            .filter(|f| within(&f.at))
            .map(|f| f.at)
            .max();
        let last = s
            .failed_ops
            .iter()
            .filter(|f| within(&f.at))
            .max_by_key(|f| f.at);
        let recovered = last.and_then(|l| {
            s.ok.iter()
                .filter(|(t, k)| *k == l.kind && *t > l.at)
                .map(|(t, _)| *t)
                .min()
        });
        let mut classes: Vec<(String, usize)> = Vec::new();
        for f in s.failed_requests.iter().filter(|f| within(&f.at)) {
            let c = class(&f.what);
            match classes.iter_mut().find(|(k, _)| *k == c) {
                Some((_, n)) => *n += 1,
                None => classes.push((c, 1)),
            }
        }
        let failed_examples = s
            .failed_ops
            .iter()
            .filter(|f| within(&f.at))
            .take(3)
            .map(|f| format!("+{:.1?} {:?}: {}", f.at - from, f.kind, f.what))
            .collect();
        Window {
            name: name.to_owned(),
            classes,
            failed_examples,
            failed_push_requests: count(&s.failed_requests, Kind::Push),
            failed_pull_requests: count(&s.failed_requests, Kind::Pull),
            failed_pushes: count(&s.failed_ops, Kind::Push),
            failed_pulls: count(&s.failed_ops, Kind::Pull),
            pushes: s
                .ok
                .iter()
                .filter(|(t, k)| *k == Kind::Push && within(t))
                .count(),
            pulls: s
                .ok
                .iter()
                .filter(|(t, k)| *k == Kind::Pull && within(t))
                .count(),
            last_failed_request: last_request.map(|t| t - from),
            last_failed_op: last.map(|l| l.at - from),
            recovered: recovered.map(|r| r - from),
        }
    }

    /// The failed operations and requests in `[from, to)`, for a message.
    pub(crate) fn failures(&self, from: Instant, to: Instant) -> Vec<String> {
        let s = self.inner.state.lock().unwrap();
        s.failed_ops
            .iter()
            .map(|f| ("operation", f))
            .chain(s.failed_requests.iter().map(|f| ("request", f)))
            .filter(|(_, f)| f.at >= from && f.at < to)
            .map(|(w, f)| {
                format!(
                    "+{:.1?} {w} {:?} via {:?}: {}",
                    f.at - from,
                    f.kind,
                    f.router,
                    f.what
                )
            })
            .collect()
    }

    /// Stop the clients (each finishes its operation, bounded by the request deadline) and
    /// check the history: no wrong answer was ever served. Returns the acknowledged images.
    pub(crate) async fn stop(self) -> Summary {
        self.inner.stop.store(true, Ordering::SeqCst);
        for t in self.tasks {
            tokio::time::timeout(REQUEST_TIMEOUT * 6, t)
                .await
                .expect("load client stops within its deadlines")
                .expect("load client task");
        }
        let s = self.inner.state.lock().unwrap();
        Summary {
            acked: s.acked.clone(),
            violations: s.violations.clone(),
            cross_router_lag: s.cross_router_lag,
            longest_lag: s.longest_lag,
            failed_pushes: s.failed_ops.iter().filter(|f| f.kind == Kind::Push).count(),
            failed_pulls: s.failed_ops.iter().filter(|f| f.kind == Kind::Pull).count(),
            failed_requests: s.failed_requests.len(),
            pushes: s.ok.iter().filter(|(_, k)| *k == Kind::Push).count(),
            pulls: s.ok.iter().filter(|(_, k)| *k == Kind::Pull).count(),
            latest: s
                .latest
                .iter()
                .map(|(repo, w)| {
                    let last = w.iter().filter(|w| w.acked.is_some()).map(|w| w.seq).max();
                    (repo.clone(), last.unwrap_or(0))
                })
                .collect(),
            seq_of: s.seq_of.clone(),
            inner: self.inner.clone(),
        }
    }
}

/// The load's history once stopped.
pub(crate) struct Summary {
    pub(crate) acked: Vec<Image>,
    pub(crate) violations: Vec<String>,
    pub(crate) cross_router_lag: usize,
    pub(crate) longest_lag: Duration,
    pub(crate) failed_pushes: usize,
    pub(crate) failed_pulls: usize,
    pub(crate) failed_requests: usize,
    pub(crate) pushes: usize,
    pub(crate) pulls: usize,
    /// Per repository, the last acknowledged `latest` sequence number.
    latest: HashMap<String, u64>,
    seq_of: HashMap<String, u64>,
    inner: Arc<Inner>,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} pushes acknowledged ({} failed), {} pulls ({} failed), {} failed requests \
             failed over, {} wrong answers, {} cross-router lagging reads (longest {:?})",
            self.pushes,
            self.failed_pushes,
            self.pulls,
            self.failed_pulls,
            self.failed_requests,
            self.violations.len(),
            self.cross_router_lag,
            self.longest_lag
        )
    }
}

impl Summary {
    /// Whether manifest `digest` read as `repo:latest` is the last acknowledged write of
    /// it or a later one.
    pub(crate) fn is_current(&self, repo: &str, digest: &str) -> bool {
        let last = self.latest.get(repo).copied().unwrap_or(0);
        self.seq_of.get(digest).is_some_and(|s| *s >= last)
    }

    /// Pull every acknowledged image through router `router` alone (no failover), every
    /// digest checked, and check each repository's `latest` is no older than its last
    /// acknowledged write: no acknowledged write was lost.
    pub(crate) async fn verify_all(&self, router: usize) -> Result<(), String> {
        for img in &self.acked {
            self.inner
                .pull_from(router, img)
                .await
                .map_err(|e| format!("acknowledged {}:{}: {e}", img.repo, img.tag))?;
        }
        for (repo, last) in &self.latest {
            let (_, body) = self
                .inner
                .get_from(
                    router,
                    &format!("/v2/{repo}/manifests/latest"),
                    Some(OCI_MANIFEST),
                )
                .await?;
            let d = sha256(&body);
            let seq = self.seq_of.get(&d).copied();
            if seq.is_none_or(|s| s < *last) {
                return Err(format!(
                    "{repo}:latest is write {seq:?}, older than the last acknowledged ({last})"
                ));
            }
        }
        Ok(())
    }
}

/// The class of a failed request's description (`METHOD PATH: STATUS BODY` or
/// `METHOD PATH: ERROR`), for the report.
fn class(what: &str) -> String {
    let rest = what.split_once(": ").map_or(what, |(_, r)| r);
    if let Some(code) = rest.split(' ').next().filter(|c| c.parse::<u16>().is_ok()) {
        let detail = ["UNAVAILABLE", "BLOB_UPLOAD", "INTERNAL"]
            .iter()
            .find(|c| rest.contains(*c))
            .map_or(String::new(), |c| format!(" {c}"));
        return format!("HTTP {code}{detail}");
    }
    let lower = rest.to_ascii_lowercase();
    let c = if lower.contains("connectionrefused") || lower.contains("connection refused") {
        "connection refused"
    } else if lower.contains("timedout") || lower.contains("timed out") || lower.contains("timeout")
    {
        "timeout"
    } else if lower.contains("incompletemessage") || lower.contains("connection closed") {
        "connection closed before the answer"
    } else if lower.contains("connectionreset") || lower.contains("reset by peer") {
        "connection reset"
    } else if rest.starts_with("body") {
        "body cut"
    } else {
        "other"
    };
    c.to_owned()
}

/// A deterministic layer for push `seq` of load `label`: distinct per push.
fn layer(label: &str, seq: u64) -> Vec<u8> {
    let seed = sha256(format!("{label}/{seq}").as_bytes());
    seed.as_bytes()
        .iter()
        .cycle()
        .take(8 * 1024 + (seq as usize % 7) * 1024)
        .copied()
        .collect()
}

impl Inner {
    fn failed_request(&self, kind: Kind, router: usize, what: String) {
        self.avoid_until.lock().unwrap()[router] = Some(Instant::now() + ROUTER_BACKOFF);
        self.state.lock().unwrap().failed_requests.push(Failure {
            at: Instant::now(),
            kind,
            router: Some(router),
            what,
        });
    }

    fn failed_op(&self, kind: Kind, what: String) {
        self.state.lock().unwrap().failed_ops.push(Failure {
            at: Instant::now(),
            kind,
            router: None,
            what,
        });
    }

    fn violation(&self, what: String) {
        self.state.lock().unwrap().violations.push(what);
    }

    /// One request on router `router`: the status and the whole body, or why not.
    async fn attempt(
        &self,
        router: usize,
        method: reqwest::Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<Bytes>,
    ) -> Result<(u16, reqwest::header::HeaderMap, Bytes), String> {
        let mut rb = self
            .http
            .request(method, format!("{}{path}", self.routers[router]));
        for (k, v) in headers {
            rb = rb.header(*k, *v);
        }
        if let Some(b) = body {
            rb = rb.body(b);
        }
        let r = rb.send().await.map_err(|e| format!("{e:?}"))?;
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        let body = r.bytes().await.map_err(|e| format!("body: {e:?}"))?;
        Ok((status, headers, body))
    }

    /// A request on `first`, sent again to the other router when `first` gives no answer
    /// or a 5xx. Returns the router that answered, its status, headers and body; `Err` when
    /// both failed (recorded as a failed operation of `kind`).
    async fn send(
        &self,
        kind: Kind,
        first: usize,
        method: reqwest::Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<Bytes>,
    ) -> Result<(usize, u16, reqwest::header::HeaderMap, Bytes), ()> {
        let avoided =
            |r: usize| self.avoid_until.lock().unwrap()[r].is_some_and(|t| Instant::now() < t);
        let first = if avoided(first) && !avoided(1 - first) {
            1 - first
        } else {
            first
        };
        let mut last = String::new();
        for router in [first, 1 - first] {
            match self
                .attempt(router, method.clone(), path, headers, body.clone())
                .await
            {
                Ok((status, h, b)) if status < 500 => return Ok((router, status, h, b)),
                Ok((status, _, b)) => {
                    last = format!(
                        "{method} {path}: {status} {}",
                        String::from_utf8_lossy(&b[..b.len().min(200)])
                    );
                    self.failed_request(kind, router, last.clone());
                }
                Err(e) => {
                    last = format!("{method} {path}: {e}");
                    self.failed_request(kind, router, last.clone());
                }
            }
        }
        self.failed_op(kind, last);
        Err(())
    }

    /// Push image `seq`; true when acknowledged.
    async fn push(&self, seq: u64) -> bool {
        let repo = self.repos[seq as usize % self.repos.len()].clone();
        let tag = format!("t{seq}");
        let layer = layer(&self.label, seq);
        let config = format!(
            r#"{{"architecture":"amd64","os":"linux","rootfs":{{"type":"layers","diff_ids":["{}"]}}}}"#,
            sha256(&layer)
        );
        let first = (seq % 2) as usize;
        let mut blobs = Vec::new();
        for bytes in [config.as_bytes().to_vec(), layer.clone()] {
            let d = sha256(&bytes);
            let path = format!("/v2/{repo}/blobs/uploads/?digest={d}");
            let Ok((_, status, _, body)) = self
                .send(
                    Kind::Push,
                    first,
                    reqwest::Method::POST,
                    &path,
                    &[],
                    Some(Bytes::from(bytes)),
                )
                .await
            else {
                return false;
            };
            if status != 201 {
                self.failed_op(
                    Kind::Push,
                    format!("POST {path}: {status} {}", String::from_utf8_lossy(&body)),
                );
                return false;
            }
            blobs.push(d);
        }
        let m = image_manifest(&blobs[0], config.len(), &blobs[1], layer.len());
        let digest = sha256(m.as_bytes());
        self.state
            .lock()
            .unwrap()
            .seq_of
            .insert(digest.clone(), seq);
        let mut acked = false;
        for reference in [tag.as_str(), "latest"] {
            let path = format!("/v2/{repo}/manifests/{reference}");
            if reference == "latest" {
                self.state
                    .lock()
                    .unwrap()
                    .latest
                    .entry(repo.clone())
                    .or_default()
                    .push(LatestWrite { seq, acked: None });
            }
            let Ok((router, status, _, body)) = self
                .send(
                    Kind::Push,
                    first,
                    reqwest::Method::PUT,
                    &path,
                    &[("content-type", OCI_MANIFEST)],
                    Some(Bytes::from(m.clone())),
                )
                .await
            else {
                break;
            };
            if status != 201 {
                self.failed_op(
                    Kind::Push,
                    format!("PUT {path}: {status} {}", String::from_utf8_lossy(&body)),
                );
                break;
            }
            let now = Instant::now();
            let mut s = self.state.lock().unwrap();
            if reference == "latest" {
                if let Some(w) = s.latest.get_mut(&repo).and_then(|w| w.last_mut()) {
                    w.acked = Some((router, now));
                }
                s.ok.push((now, Kind::Push));
            } else {
                acked = true;
                s.acked.push(Image {
                    repo: repo.clone(),
                    tag: tag.clone(),
                    manifest: digest.clone(),
                    blobs: blobs.clone(),
                });
            }
        }
        acked
    }

    /// One pull operation: every even `i` an acknowledged image, every odd one a `latest`.
    async fn pull_one(&self, i: u64) {
        let first = (i / 2 % 2) as usize;
        if i & 1 == 0 {
            let img = {
                let s = self.state.lock().unwrap();
                if s.acked.is_empty() {
                    return;
                }
                // Mostly recent images (the ones a fault is likeliest to have hurt).
                let n = s.acked.len();
                let k = (i as usize / 2).wrapping_mul(2_654_435_761) % n.min(20);
                s.acked[n - 1 - k].clone()
            };
            if self.pull_image(first, &img).await {
                self.state
                    .lock()
                    .unwrap()
                    .ok
                    .push((Instant::now(), Kind::Pull));
            }
        } else {
            let repo = self.repos[(i as usize / 2) % self.repos.len()].clone();
            if self.read_latest(first, &repo).await {
                self.state
                    .lock()
                    .unwrap()
                    .ok
                    .push((Instant::now(), Kind::Pull));
            }
        }
    }

    /// Pull `img` by tag with failover: manifest and blobs, every digest checked.
    async fn pull_image(&self, first: usize, img: &Image) -> bool {
        let path = format!("/v2/{}/manifests/{}", img.repo, img.tag);
        let Ok((router, status, _, body)) = self
            .send(
                Kind::Pull,
                first,
                reqwest::Method::GET,
                &path,
                &[("accept", OCI_MANIFEST)],
                None,
            )
            .await
        else {
            return false;
        };
        if status != 200 || sha256(&body) != img.manifest {
            self.violation(format!(
                "GET {path} via router {router}: {status}, digest {} (acknowledged {})",
                sha256(&body),
                img.manifest
            ));
            self.failed_op(Kind::Pull, format!("GET {path}: wrong answer {status}"));
            return false;
        }
        for d in &img.blobs {
            let path = format!("/v2/{}/blobs/{d}", img.repo);
            let Ok((router, status, headers, body)) = self
                .send(Kind::Pull, first, reqwest::Method::GET, &path, &[], None)
                .await
            else {
                return false;
            };
            if status != 200 || sha256(&body) != *d {
                self.violation(format!(
                    "GET {path} via router {router} (node {:?}): {status}, {} bytes, digest {}",
                    headers.get("x-flotilla-node"),
                    body.len(),
                    sha256(&body)
                ));
                self.failed_op(Kind::Pull, format!("GET {path}: wrong answer {status}"));
                return false;
            }
        }
        true
    }

    /// Read `repo:latest` and check it is current (module doc).
    async fn read_latest(&self, first: usize, repo: &str) -> bool {
        let start = Instant::now();
        let path = format!("/v2/{repo}/manifests/latest");
        let Ok((router, status, headers, body)) = self
            .send(
                Kind::Pull,
                first,
                reqwest::Method::GET,
                &path,
                &[("accept", OCI_MANIFEST)],
                None,
            )
            .await
        else {
            return false;
        };
        let mut s = self.state.lock().unwrap();
        let writes = s.latest.get(repo).cloned().unwrap_or_default();
        let seq = if status == 200 {
            s.seq_of.get(&sha256(&body)).copied()
        } else {
            None
        };
        let node = headers
            .get("x-flotilla-node")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        // The first acknowledged write before the read began that the answer predates:
        // through this router a violation, through the other the watch's lag.
        let missed = |same: bool| {
            writes.iter().find_map(|w| {
                let (by, at) = w.acked?;
                (at < start && (by == router) == same && seq.is_none_or(|s| s < w.seq))
                    .then_some((w.seq, at))
            })
        };
        if let Some((w, at)) = missed(true) {
            s.violations.push(format!(
                "stale {repo}:latest via router {router} (node {node:?}), read begun \
                 +{:.1?} after write {w} was acknowledged there: got {status}, write {seq:?}",
                start - at
            ));
            drop(s);
            self.failed_op(Kind::Pull, format!("GET {path}: stale"));
            return false;
        }
        if let Some((_, at)) = missed(false) {
            s.cross_router_lag += 1;
            s.longest_lag = s.longest_lag.max(start - at);
        }
        if status == 200 && seq.is_none() {
            s.violations.push(format!(
                "{repo}:latest via router {router}: a value nobody wrote"
            ));
            drop(s);
            self.failed_op(Kind::Pull, format!("GET {path}: unknown value"));
            return false;
        }
        // A 404 before any acknowledged write (or one trailing the other router's) is a
        // fine answer.
        if status != 200 && status != 404 {
            drop(s);
            self.failed_op(Kind::Pull, format!("GET {path}: {status}"));
            return false;
        }
        true
    }

    /// `GET path` on `router` only; the body of a 200.
    async fn get_from(
        &self,
        router: usize,
        path: &str,
        accept: Option<&str>,
    ) -> Result<(reqwest::header::HeaderMap, Bytes), String> {
        let headers: Vec<(&str, &str)> = accept.map(|a| ("accept", a)).into_iter().collect();
        let (status, h, body) = self
            .attempt(router, reqwest::Method::GET, path, &headers, None)
            .await?;
        if status != 200 {
            return Err(format!(
                "GET {path} via router {router}: {status} {}",
                String::from_utf8_lossy(&body)
            ));
        }
        Ok((h, body))
    }

    /// Pull `img` through `router` alone, every digest checked.
    async fn pull_from(&self, router: usize, img: &Image) -> Result<(), String> {
        let (_, body) = self
            .get_from(
                router,
                &format!("/v2/{}/manifests/{}", img.repo, img.tag),
                Some(OCI_MANIFEST),
            )
            .await?;
        if sha256(&body) != img.manifest {
            return Err(format!("manifest digest {}", sha256(&body)));
        }
        for d in &img.blobs {
            let (_, body) = self
                .get_from(router, &format!("/v2/{}/blobs/{d}", img.repo), None)
                .await?;
            if sha256(&body) != *d {
                return Err(format!("blob {d}: digest {}", sha256(&body)));
            }
        }
        Ok(())
    }
}
