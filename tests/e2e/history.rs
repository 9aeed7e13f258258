//! The history checker: concurrent clients write and read tags (each tag a register naming
//! one manifest) through two routers while replicas and routers are killed, frozen and made
//! to refuse writes; then the recorded history is checked.
//!
//! The guarantee checked (ARCHITECTURE.md, "In-sync replicas"), per tag:
//! 1. No acknowledged write is lost: after the faults heal, every tag reads back a value no
//!    older than the last write acknowledged for it.
//! 2. Epoch-consistent reads: a read labelled (`x-flotilla-epoch`) with an epoch at least
//!    the commit epoch of an acknowledged write W never returns a value whose write ended
//!    before W began. The router labels a read with the epoch of the shard record it routed
//!    by, so this says: a router that has seen a write's commit never serves anything older.
//! 3. Read-your-router's-writes in real time: a read through router R that began after R
//!    acknowledged W never returns a value older than W (R's own commit updates its view
//!    before it answers).
//! 4. No read returns a value nobody wrote, or a value whose write began after the read
//!    ended.
//!
//! What is not claimed: a read through router B that begins after router A acknowledged W
//! may still return the value before W until B's watch has delivered W's commit (routers
//! cache records and manifests; a metadata-store round trip per read is what this avoids).
//! The checker counts those reads and reports the longest such lag; they are not
//! violations. Sizes: the clients run while the faults do (a few hundred operations in CI;
//! `FLOTILLA_HISTORY_ROUNDS` repeats the faults for a
//! larger run, `scripts/history.sh`); `FLOTILLA_HISTORY_SEED` (default 1) picks the
//! operation mix.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::cluster_support::{layer_for, poll, try_push_image, ClusterOpts, ClusterProc};
use crate::support::{image_manifest, signal, Oci};

const REPO: &str = "hist/app";
const TAGS: [&str; 3] = ["a", "b", "c"];
/// Upper bound of the random pause between a client's operations.
const PACE_MS: u64 = 200;
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

/// A small deterministic generator (xorshift64*): the seed fixes every client's choices.
#[derive(Clone, Debug)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[derive(Clone, Debug)]
enum Outcome {
    /// The write was acknowledged (201) with this commit epoch.
    Acked(u64),
    /// Refused with a client error: certainly not applied.
    Refused,
    /// 5xx or no answer: may or may not have been applied.
    Unknown,
}

#[derive(Clone, Debug)]
struct Write {
    tag: &'static str,
    value: String,
    router: usize,
    start: Instant,
    end: Instant,
    outcome: Outcome,
}

#[derive(Clone, Debug)]
struct Read {
    tag: &'static str,
    router: usize,
    start: Instant,
    end: Instant,
    /// `None` for a 404, `Some(value)` for a 200; failed reads are not recorded.
    value: Option<String>,
    epoch: Option<u64>,
    /// The replica that answered (`x-flotilla-node`; absent for a router cache hit).
    node: Option<String>,
}

#[derive(Debug)]
struct History {
    t0: Instant,
    writes: Vec<Write>,
    reads: Vec<Read>,
    failed_reads: usize,
}

#[derive(Debug, Default)]
struct Verdict {
    violations: Vec<String>,
    /// Reads through one router that trailed a write acknowledged by another, before that
    /// router's view reached the write's commit (allowed; reported).
    cross_router_lag: usize,
    longest_lag: Duration,
}

/// Check `h` against guarantees 2–4 (guarantee 1 is checked on the final reads, which are
/// part of `h` like any other read).
fn check(h: &History) -> Verdict {
    let mut v = Verdict::default();
    let writes: std::collections::HashMap<&str, &Write> =
        h.writes.iter().map(|w| (w.value.as_str(), w)).collect();
    for r in &h.reads {
        let acked_before: Vec<(&Write, u64)> = h
            .writes
            .iter()
            .filter(|w| w.tag == r.tag && w.end < r.start)
            .filter_map(|w| match w.outcome {
                Outcome::Acked(e) => Some((w, e)),
                _ => None,
            })
            .collect();
        let Some(value) = &r.value else {
            // 404: only before any acknowledged write of the tag.
            if let Some((w, _)) = acked_before.first() {
                v.violations.push(format!(
                    "read of {} via router {} got 404 after write {} was acknowledged",
                    r.tag, r.router, w.value
                ));
            }
            continue;
        };
        let Some(src) = writes.get(value.as_str()) else {
            v.violations
                .push(format!("read of {} returned {value}, never written", r.tag));
            continue;
        };
        if src.tag != r.tag || src.start > r.end || matches!(src.outcome, Outcome::Refused) {
            v.violations.push(format!(
                "read of {} returned {value}: wrong tag, a refused write, or from the future",
                r.tag
            ));
            continue;
        }
        // Writes that certainly took effect after `src` did and before the read began.
        // An unacknowledged `src` may have taken effect at any point: no claim against it.
        if !matches!(src.outcome, Outcome::Acked(_)) {
            continue;
        }
        for (w, epoch) in acked_before.iter().filter(|(w, _)| src.end < w.start) {
            let seen = r.epoch.is_some_and(|e| e >= *epoch);
            if seen || w.router == r.router {
                v.violations.push(format!(
                    "stale read of {} via router {} (epoch {:?}, node {:?}, at +{:?}): got {value} (acked at +{:?}), but {} (router {}, commit epoch {epoch}) was acknowledged {:?} before the read began",
                    r.tag,
                    r.router,
                    r.epoch,
                    r.node,
                    r.start - h.t0,
                    src.end - h.t0,
                    w.value,
                    w.router,
                    r.start - w.end
                ));
            } else {
                v.cross_router_lag += 1;
                v.longest_lag = v.longest_lag.max(r.start - w.end);
            }
        }
    }
    v
}

async fn put_tag(oci: &Oci, tag: &str, manifest: &str) -> (Outcome, Instant) {
    let r = oci
        .http
        .put(oci.url(&format!("/v2/{REPO}/manifests/{tag}")))
        .header("content-type", OCI_MANIFEST)
        .timeout(Duration::from_secs(15))
        .body(manifest.to_owned())
        .send()
        .await;
    let end = Instant::now();
    let outcome = match r {
        Ok(r) if r.status() == 201 => {
            let epoch = r
                .headers()
                .get("x-flotilla-epoch")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok())
                .expect("an acknowledged write carries its commit epoch");
            Outcome::Acked(epoch)
        }
        Ok(r) if r.status().is_client_error() => Outcome::Refused,
        _ => Outcome::Unknown,
    };
    (outcome, end)
}

/// GET the tag; `None` when the read failed (5xx, no answer).
async fn get_tag(oci: &Oci, tag: &str) -> Option<(Option<String>, Option<u64>, Option<String>)> {
    let r = oci
        .http
        .get(oci.url(&format!("/v2/{REPO}/manifests/{tag}")))
        .header("accept", OCI_MANIFEST)
        .timeout(Duration::from_secs(15))
        .send()
        .await
        .ok()?;
    let epoch = r
        .headers()
        .get("x-flotilla-epoch")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    let node = r
        .headers()
        .get("x-flotilla-node")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    match r.status().as_u16() {
        404 => Some((None, epoch, node)),
        200 => {
            let m: Value = r.json().await.ok()?;
            let value = m["annotations"]["w"].as_str()?.to_owned();
            Some((Some(value), epoch, node))
        }
        _ => None,
    }
}

/// A manifest for `value`: the same config and layer, the value in an annotation, so every
/// write names a distinct digest.
fn manifest_for(base: &str, value: &str) -> String {
    let mut m: Value = serde_json::from_str(base).expect("manifest json");
    m["annotations"] = serde_json::json!({ "w": value });
    m.to_string()
}

async fn client(
    id: usize,
    routers: Vec<Oci>,
    base: String,
    seed: u64,
    budget: Arc<std::sync::atomic::AtomicIsize>,
    done: Arc<std::sync::atomic::AtomicBool>,
    history: Arc<Mutex<History>>,
) {
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (id as u64 + 1));
    let mut n = 0;
    while !done.load(std::sync::atomic::Ordering::Relaxed)
        && budget.fetch_sub(1, std::sync::atomic::Ordering::Relaxed) > 0
    {
        // Pacing, not synchronisation: it spreads a few hundred operations over the faults.
        tokio::time::sleep(Duration::from_millis(20 + rng.below(PACE_MS))).await;
        let router = rng.below(routers.len() as u64) as usize;
        let tag = TAGS[rng.below(TAGS.len() as u64) as usize];
        let oci = &routers[router];
        let start = Instant::now();
        if rng.below(10) < 4 {
            n += 1;
            let value = format!("c{id}-{n}");
            let (outcome, end) = put_tag(oci, tag, &manifest_for(&base, &value)).await;
            history.lock().unwrap().writes.push(Write {
                tag,
                value,
                router,
                start,
                end,
                outcome,
            });
        } else {
            match get_tag(oci, tag).await {
                Some((value, epoch, node)) => history.lock().unwrap().reads.push(Read {
                    tag,
                    router,
                    start,
                    end: Instant::now(),
                    value,
                    epoch,
                    node,
                }),
                None => history.lock().unwrap().failed_reads += 1,
            }
        }
    }
}

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Whether every replica of the key is back in sync (no lagging entry in its record).
async fn in_sync(c: &ClusterProc) -> bool {
    let (_, shards) = c.admin_get(0, "/shards").await;
    shards.as_array().is_some_and(|all| {
        all.iter().filter(|s| s["key"] == REPO).all(|s| {
            ["lagging", "syncing"]
                .iter()
                .all(|f| s[*f].as_array().is_none_or(|l| l.is_empty()))
        })
    })
}

/// The faults, one after the other while the clients run: a frozen replica, a killed
/// replica, a replica that refuses every write (its disk floor above its free space), a
/// killed router. Each heals before the next starts; the key must be fully in sync again
/// within a bounded time after each.
async fn inject(t0: Instant, c: &mut ClusterProc, rounds: u64) -> Vec<String> {
    let mut log = Vec::new();
    let replicas = c.replicas(0, REPO).await;
    let pause = Duration::from_millis(1500);
    let heal = Duration::from_secs(30);

    for _ in 0..rounds {
        let frozen = c.node(&replicas[0]).pid();
        signal(frozen, "-STOP");
        log.push(format!("+{:?} SIGSTOP {}", t0.elapsed(), replicas[0]));
        // Longer than a router's write attempt (5 s): writes in flight to it time out, it is
        // marked lagging, and the late requests it finds when it wakes must not apply.
        tokio::time::sleep(Duration::from_secs(6)).await;
        signal(frozen, "-CONT");
        poll("the frozen replica back in sync", heal, || async {
            in_sync(c).await.then_some(())
        })
        .await;

        c.kill9(&replicas[1]);
        log.push(format!("+{:?} kill -9 {}", t0.elapsed(), replicas[1]));
        tokio::time::sleep(pause).await;
        c.restart(&replicas[1]).await;
        poll("the killed replica back in sync", heal, || async {
            in_sync(c).await.then_some(())
        })
        .await;

        c.respawn_with(&replicas[0], &["--min-free-bytes", "1000000000000000"]);
        log.push(format!(
            "+{:?} {} refuses writes",
            t0.elapsed(),
            replicas[0]
        ));
        tokio::time::sleep(pause * 2).await;
        c.restart(&replicas[0]).await;
        poll("the refusing replica back in sync", heal, || async {
            in_sync(c).await.then_some(())
        })
        .await;

        c.restart_router(1).await;
        log.push(format!("+{:?} kill -9 router 1, restarted", t0.elapsed()));
    }
    log
}

/// The proof under faults, at CI size, on the embedded metadata store.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tag_history_under_faults_keeps_every_acknowledged_write() {
    history_under_faults(ClusterOpts::default(), 2).await;
}

/// The same on a real etcd: routers' commits and nodes' rejoins through its CAS and watch.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tag_history_on_etcd() {
    let opts = ClusterOpts {
        etcd: true,
        ..ClusterOpts::default()
    };
    history_under_faults(opts, 1).await;
}

/// The same on the Consul stand-in (Consul's server cannot be installed here).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tag_history_on_consul_standin() {
    let opts = ClusterOpts {
        consul: true,
        ..ClusterOpts::default()
    };
    history_under_faults(opts, 1).await;
}

async fn history_under_faults(opts: ClusterOpts, default_rounds: u64) {
    // An upper bound: the clients stop when the faults are done (a few hundred operations).
    const MIN_ACKED: usize = 50;
    let ops = env_or("FLOTILLA_HISTORY_OPS", 5000) as isize;
    let seed = env_or("FLOTILLA_HISTORY_SEED", 1);
    let mut c = ClusterProc::start_with(2, opts).await;
    let routers: Vec<Oci> = (0..2).map(|i| c.router(i)).collect();
    let layer = layer_for("history", 2048);
    let p = try_push_image(&routers[0], REPO, "base", &layer)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let config = c
        .s3_get(&format!(
            "blobs/sha256/{}",
            p.blobs[0].trim_start_matches("sha256:")
        ))
        .await;
    let base = image_manifest(&p.blobs[0], config.len(), &p.blobs[1], layer.len());

    let history = Arc::new(Mutex::new(History {
        t0: Instant::now(),
        writes: Vec::new(),
        reads: Vec::new(),
        failed_reads: 0,
    }));
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let budget = Arc::new(std::sync::atomic::AtomicIsize::new(ops));
    let clients: Vec<_> = (0..4)
        .map(|id| {
            tokio::spawn(client(
                id,
                routers.clone(),
                base.clone(),
                seed,
                budget.clone(),
                done.clone(),
                history.clone(),
            ))
        })
        .collect();
    let started = Instant::now();
    let rounds = env_or("FLOTILLA_HISTORY_ROUNDS", default_rounds);
    let t0 = history.lock().unwrap().t0;
    let faults = inject(t0, &mut c, rounds).await;
    // The faults must overlap the operations: the budget must not have run out first.
    let left = budget.load(std::sync::atomic::Ordering::Relaxed);
    // The clients go on after the faults until the history holds enough acknowledged
    // writes to judge (on a loaded machine the fault window alone may hold too few).
    poll(
        "enough acknowledged writes",
        Duration::from_secs(90),
        || async {
            let h = history.lock().unwrap();
            let acked = h
                .writes
                .iter()
                .filter(|w| matches!(w.outcome, Outcome::Acked(_)))
                .count();
            (acked >= MIN_ACKED || budget.load(std::sync::atomic::Ordering::Relaxed) <= 0)
                .then_some(())
        },
    )
    .await;
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in clients {
        t.await.expect("client task");
    }
    let took = started.elapsed();
    // Guarantee 1: after the faults, every tag reads back through both routers (these
    // reads join the history and are checked like the rest).
    poll(
        "every replica in sync after the run",
        Duration::from_secs(30),
        || async { in_sync(&c).await.then_some(()) },
    )
    .await;
    for (i, oci) in routers.iter().enumerate() {
        for tag in TAGS {
            let start = Instant::now();
            let (value, epoch, node) = get_tag(oci, tag).await.expect("final read answered");
            history.lock().unwrap().reads.push(Read {
                tag,
                router: i,
                start,
                end: Instant::now(),
                value,
                epoch,
                node,
            });
        }
    }
    let h = history.lock().unwrap();
    let verdict = check(&h);
    let acked = h
        .writes
        .iter()
        .filter(|w| matches!(w.outcome, Outcome::Acked(_)))
        .count();
    eprintln!(
        "history: seed {seed}, {} writes ({acked} acknowledged), {} reads ({} failed), {took:?}, faults {faults:?}; {} violations; {} cross-router lagging reads (longest {:?})",
        h.writes.len(),
        h.reads.len(),
        h.failed_reads,
        verdict.violations.len(),
        verdict.cross_router_lag,
        verdict.longest_lag
    );
    for v in verdict.violations.iter().take(20) {
        eprintln!("VIOLATION: {v}");
    }
    assert!(
        left > 0,
        "the operation budget ran out before the faults were done ({ops} ops); raise it"
    );
    assert!(acked >= MIN_ACKED, "too few writes acknowledged: {acked}");
    assert!(
        verdict.violations.is_empty(),
        "{} violations",
        verdict.violations.len()
    );
}

/// The checker itself must catch what it claims to: hand-made histories with a stale read,
/// a lost write and a value from nowhere are flagged; a clean one is not.
#[test]
fn the_checker_flags_stale_lost_and_invented_values() {
    let t0 = Instant::now();
    let at = |ms: u64| t0 + Duration::from_millis(ms);
    let w = |tag, value: &str, router, s, e, epoch| Write {
        tag,
        value: value.to_owned(),
        router,
        start: at(s),
        end: at(e),
        outcome: Outcome::Acked(epoch),
    };
    let r = |tag, value: Option<&str>, router, s, e, epoch| Read {
        tag,
        router,
        start: at(s),
        end: at(e),
        value: value.map(str::to_owned),
        epoch,
        node: None,
    };
    let writes = vec![w("a", "v1", 0, 0, 10, 2), w("a", "v2", 0, 20, 30, 3)];
    let clean = History {
        t0,
        writes: writes.clone(),
        reads: vec![
            r("a", Some("v1"), 0, 12, 15, Some(2)),
            r("a", Some("v2"), 1, 25, 35, Some(2)), // concurrent with v2: either is fine
            r("a", Some("v2"), 0, 40, 45, Some(3)),
            r("a", Some("v1"), 1, 40, 45, Some(2)), // router 1 had not seen epoch 3
        ],
        failed_reads: 0,
    };
    let v = check(&clean);
    assert!(v.violations.is_empty(), "{:?}", v.violations);
    assert_eq!(v.cross_router_lag, 1);
    for bad in [
        r("a", Some("v1"), 0, 40, 45, Some(3)), // same router, after its own ack
        r("a", Some("v1"), 1, 40, 45, Some(3)), // saw the commit epoch, still old
        r("a", None, 1, 40, 45, Some(1)),       // lost: 404 after an ack
        r("a", Some("v9"), 0, 40, 45, Some(3)), // never written
        r("a", Some("v2"), 0, 5, 8, Some(2)),   // from the future
    ] {
        let h = History {
            t0,
            writes: writes.clone(),
            reads: vec![bad.clone()],
            failed_reads: 0,
        };
        assert_eq!(check(&h).violations.len(), 1, "not flagged: {bad:?}");
    }
}
