//! Fault drills against the docker-compose cluster (issue 13; `docs/drills.md` has the
//! figures and the commands): a network partition, `docker kill` of each kind of
//! component, a rolling restart and a wiped node volume, each under the load of
//! `compose_load` (a pusher and two pullers through both routers, failing over between
//! them), each printing what the fault cost clients and how long recovery took.
//!
//! Every wait is a poll with a deadline; a fault is held for a fixed time (`OUTAGE`), which
//! is the drill's parameter, not synchronisation. One cluster per drill (a drill's damage
//! never leaks into the next), one cluster at a time (`compose_support::COMPOSE_LOCK`).

use std::time::{Duration, Instant};

use crate::clients::unique;
use crate::compose_load::{Load, Summary, Window};
use crate::compose_support::{poll_for, Project};
use crate::support::{sha256, OCI_MANIFEST};

/// How long a killed or partitioned component stays down.
const OUTAGE: Duration = Duration::from_secs(8);
/// How long a node may take to be ready, live and in sync again after a fault.
const REJOIN_TIMEOUT: Duration = Duration::from_secs(90);
/// How long a restarted container may take to pass its health check.
const HEALTHY_TIMEOUT: Duration = Duration::from_secs(90);

/// Four repositories, four shard keys: spread over n1 and n2, each with n3 (rack r2's only
/// node holds every key).
fn repos(id: &str) -> Vec<String> {
    (0..4).map(|k| format!("drill{id}/k{k}")).collect()
}

fn short_id() -> String {
    unique()
        .rsplit('-')
        .next()
        .map(|n| n[n.len().saturating_sub(6)..].to_owned())
        .expect("unique id")
}

async fn start_load(p: &Project, label: &str) -> (Load, Vec<String>) {
    let id = short_id();
    let repos = repos(&id);
    let load = Load::start(
        &format!("{label}-{id}"),
        [p.router_url(0, ""), p.router_url(1, "")],
        repos.clone(),
    )
    .await;
    // Warm: both kinds of operation served before any fault.
    load.wait_served(Instant::now(), 5, 10).await;
    (load, repos)
}

/// Every acknowledged image pulls, digest-checked, through each router alone; no wrong
/// answer was served during the run.
async fn verify(summary: &Summary) {
    for router in 0..2 {
        summary
            .verify_all(router)
            .await
            .unwrap_or_else(|e| panic!("after the drill, through router {router}: {e}"));
    }
    assert!(
        summary.violations.is_empty(),
        "wrong answers: {:#?}",
        summary.violations
    );
}

/// `repo:latest` read from `node` itself (not through a router) is the last acknowledged
/// write or later: what the node serves once back is current.
async fn assert_node_current(p: &Project, node: &str, summary: &Summary, repos: &[String]) {
    for repo in repos {
        let (status, body) = p
            .node_get(node, &format!("/v2/{repo}/manifests/latest"), OCI_MANIFEST)
            .await;
        assert_eq!(status, 200, "{node} {repo}:latest");
        let d = sha256(&body);
        assert!(
            summary.is_current(repo, &d),
            "{node} serves {repo}:latest = {d}, older than the last acknowledged write"
        );
    }
}

fn report(drill: &str, windows: &[Window], summary: &Summary, took: Duration) {
    for w in windows {
        eprintln!("drill {drill}: {w}");
    }
    eprintln!("drill {drill}: total {summary}; drill took {took:.1?}");
}

/// Partition n3 (it holds every key) from the compose network while clients push and pull:
/// reads keep succeeding through the partners, writes are committed without n3 (marked
/// lagging), and once reconnected n3 goes lagging → syncing → in sync, and what it serves
/// is current.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn partition() {
    let p = Project::up("drillpart").await;
    // The drill itself: image and cluster start are printed by `Project::up`.
    let t0 = Instant::now();
    let (load, repos) = start_load(&p, "part").await;
    let victim = "n3";
    let container = p.container(victim).await;
    let net = p.network();

    let cut = Instant::now();
    p.docker(&["network", "disconnect", &net, &container]).await;
    // The partition is felt: every key's record marks n3 lagging (a write was committed
    // without it), and the clients go on being served.
    let lagging = poll_for("n3 marked lagging on every key", REJOIN_TIMEOUT, || async {
        let shards = p.shards().await;
        let all = repos.iter().all(|r| {
            shards.iter().any(|s| {
                s["key"] == r.as_str()
                    && s["lagging"]
                        .as_array()
                        .is_some_and(|l| l.iter().any(|n| n == victim))
            })
        });
        all.then(|| cut.elapsed())
    })
    .await;
    load.wait_served(cut, 10, 20).await;
    tokio::time::sleep(OUTAGE.saturating_sub(cut.elapsed())).await;

    let heal = Instant::now();
    // With its service name as alias, as compose attached it: a bare `network connect`
    // registers only the container's own names, and `n3` would stay unresolvable.
    p.docker(&["network", "connect", "--alias", victim, &net, &container])
        .await;
    let rejoined = p.wait_node_serving(victim, REJOIN_TIMEOUT).await;
    // Served after the rejoin too (the clients' reads now reach n3 again).
    load.wait_served(Instant::now(), 5, 20).await;
    let end = Instant::now();
    let windows = [
        load.window("partitioned", cut, heal),
        load.window("rejoining", heal, end),
    ];
    let failures = load.failures(cut, end);
    let summary = load.stop().await;
    report("partition", &windows, &summary, t0.elapsed());
    eprintln!(
        "drill partition: {victim} marked lagging on every key after {lagging:.1?}, \
         partitioned {:.1?}, in sync and serving {rejoined:.1?} after reconnect",
        heal - cut
    );
    verify(&summary).await;
    assert_node_current(&p, victim, &summary, &repos).await;
    assert_eq!(summary.failed_pulls, 0, "pulls failed: {failures:#?}");
    assert!(summary.pushes > 20, "too few pushes to judge: {summary}");
}

/// Restart n1, n2, n3, router1 and router2 one at a time (SIGTERM, drain, start; the next
/// only once the last is healthy and, for a node, in sync) under the load: zero failed
/// pulls, zero lost acknowledged pushes. Clients fail over between the routers.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rolling_restart() {
    let p = Project::up("drillroll").await;
    // The drill itself: image and cluster start are printed by `Project::up`.
    let t0 = Instant::now();
    let (load, _repos) = start_load(&p, "roll").await;
    let mut windows = Vec::new();
    for service in ["n1", "n2", "n3", "router1", "router2"] {
        let t = Instant::now();
        p.compose_run(&["restart", "-t", "40", service]).await;
        let stopped = t.elapsed();
        p.wait_healthy(service, HEALTHY_TIMEOUT).await;
        if service.starts_with('n') {
            p.wait_node_serving(service, REJOIN_TIMEOUT).await;
        }
        let back = t.elapsed();
        load.wait_served(Instant::now(), 3, 10).await;
        let w = load.window(service, t, Instant::now());
        eprintln!(
            "drill rolling_restart: {service} restarted in {stopped:.1?}, serving again \
             after {back:.1?}"
        );
        windows.push(w);
    }
    let failures = load.failures(t0, Instant::now());
    let summary = load.stop().await;
    report("rolling_restart", &windows, &summary, t0.elapsed());
    verify(&summary).await;
    assert_eq!(summary.failed_pulls, 0, "pulls failed: {failures:#?}");
    assert!(summary.pushes > 20, "too few pushes to judge: {summary}");
}

/// The seeder service whose seeder holds the leader lock, and that seeder's id.
async fn seeder_leader(p: &Project) -> (String, String) {
    let id = poll_for("a seeder leader", HEALTHY_TIMEOUT, || async {
        let v = p.admin("/reseed").await;
        v["leader"]["id"].as_str().map(str::to_owned)
    })
    .await;
    for service in ["seeder1", "seeder2"] {
        let logs = p.compose_run(&["logs", "--no-color", service]).await;
        if logs.contains(&id) {
            return (service.to_owned(), id);
        }
    }
    panic!("no seeder logged the leader's id {id}");
}

/// `docker kill` n1, router1, the seeder leader, etcd and S3, one after the other under
/// the load, each held down for `OUTAGE` and then `docker start`ed (`restart:
/// unless-stopped` does not restart a container `docker kill` stopped: Docker counts it as
/// stopped by hand; the drill asserts so). Prints what each cost clients; every pull is
/// served throughout (node: the partner; router: the client's failover; seeder: not on the
/// request path; etcd: reads need no metadata write; S3: nodes serve from disk), no push
/// fails for a router or seeder kill, and every acknowledged image pulls byte-identical at
/// the end. S3 (moto) keeps objects in memory, so its kill also empties the bucket: last.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kills() {
    let p = Project::up("drillkill").await;
    // The drill itself: image and cluster start are printed by `Project::up`.
    let t0 = Instant::now();
    let (load, _repos) = start_load(&p, "kill").await;
    let (leader_service, leader_id) = seeder_leader(&p).await;
    let mut windows = Vec::new();
    for service in ["n1", "router1", leader_service.as_str(), "etcd", "s3"] {
        let container = p.container(service).await;
        let t = Instant::now();
        p.docker(&["kill", &container]).await;
        let mut note = String::new();
        if service == leader_service {
            let new = poll_for("the standby to take over", HEALTHY_TIMEOUT, || async {
                let v = p.admin("/reseed").await;
                v["leader"]["id"]
                    .as_str()
                    .filter(|id| *id != leader_id)
                    .map(str::to_owned)
            })
            .await;
            note = format!(", standby {new} leader after {:.1?}", t.elapsed());
        }
        tokio::time::sleep(OUTAGE.saturating_sub(t.elapsed())).await;
        let state = p
            .inspect(service, "{{.State.Status}} {{.RestartCount}}")
            .await;
        assert_eq!(
            state, "exited 0",
            "{service} after docker kill and {OUTAGE:?} (restart: unless-stopped)"
        );
        p.docker(&["start", &container]).await;
        let down = t.elapsed();
        p.wait_healthy(service, HEALTHY_TIMEOUT).await;
        if service == "n1" {
            p.wait_node_serving(service, REJOIN_TIMEOUT).await;
        }
        let back = t.elapsed();
        // The clients are served again, pushes included.
        load.wait_served(Instant::now(), 3, 10).await;
        let w = load.window(service, t, Instant::now());
        eprintln!(
            "drill kills: {service} killed, started after {down:.1?}, healthy{} after \
             {back:.1?}{note}; {w}",
            if service == "n1" { " and in sync" } else { "" }
        );
        windows.push(w);
    }
    let failures = load.failures(t0, Instant::now());
    let summary = load.stop().await;
    report("kills", &windows, &summary, t0.elapsed());
    verify(&summary).await;
    assert_eq!(summary.failed_pulls, 0, "pulls failed: {failures:#?}");
    // A router or seeder kill costs no push (the client fails over; the seeder is not on
    // the request path). A node kill may fail the upload it held and the first one each
    // router sends it before ejecting it (503 "retry the upload", which a client retries);
    // etcd and S3 kills fail pushes while they are down. Those are reported, not failed.
    for w in windows
        .iter()
        .filter(|w| w.name.starts_with("router") || w.name.starts_with("seeder"))
    {
        assert_eq!(w.failed_pushes, 0, "{w}: {failures:#?}");
    }
}

/// Kill n3 (it holds every key), delete its volume and start it on an empty one: it
/// registers with a new disk id, the seeder reseeds it from S3 (progress in
/// `GET /admin/v1/reseed`) while the partners serve every pull, then it is ready, in sync,
/// and serves current data.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn wipe_volume() {
    let p = Project::up("drillwipe").await;
    // The drill itself: image and cluster start are printed by `Project::up`.
    let t0 = Instant::now();
    let (load, repos) = start_load(&p, "wipe").await;
    poll_for(
        "40 acknowledged pushes",
        Duration::from_secs(120),
        || async { (load.acked() >= 40).then_some(()) },
    )
    .await;
    let victim = "n3";
    let reseed_of = |v: &serde_json::Value| {
        v["reseeds"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|r| r["node"] == victim)
            .cloned()
    };
    let before = reseed_of(&p.admin("/reseed").await).map(|r| r["seed_id"].clone());

    let t = Instant::now();
    p.compose_run(&["kill", victim]).await;
    p.compose_run(&["rm", "-f", victim]).await;
    p.docker(&["volume", "rm", &p.volume(victim)]).await;
    p.compose_run(&["up", "-d", "--no-deps", victim]).await;
    let started = t.elapsed();
    let progress = std::cell::RefCell::new(Vec::new());
    let rec = poll_for("the reseed of n3 to be done", REJOIN_TIMEOUT, || {
        let (p, before, progress) = (&p, &before, &progress);
        async move {
            let r = reseed_of(&p.admin("/reseed").await)?;
            if before.as_ref() == Some(&r["seed_id"]) {
                return None;
            }
            let line = format!(
                "{} {}/{} shards, {}/{} objects, {} bytes",
                r["status"],
                r["shards_done"].as_array().map_or(0, Vec::len),
                r["shards_total"],
                r["objects_done"],
                r["objects_total"],
                r["bytes_done"]
            );
            let mut progress = progress.borrow_mut();
            if progress
                .last()
                .is_none_or(|(_, l): &(Duration, String)| *l != line)
            {
                progress.push((t.elapsed(), line));
            }
            (r["status"] == "done").then_some(r)
        }
    })
    .await;
    let reseeded = t.elapsed();
    let serving = p.wait_node_serving(victim, REJOIN_TIMEOUT).await + reseeded;
    load.wait_served(Instant::now(), 3, 10).await;
    let window = load.window("wipe", t, Instant::now());
    let failures = load.failures(t, Instant::now());
    let summary = load.stop().await;
    for (at, line) in progress.borrow().iter() {
        eprintln!("drill wipe_volume: +{at:.1?} reseed {line}");
    }
    eprintln!(
        "drill wipe_volume: {victim} killed, volume removed, started on an empty one after \
         {started:.1?}; reseed done after {reseeded:.1?} (recorded {} ms from start to \
         done, {} objects, {} bytes); ready and in sync after {serving:.1?}",
        rec["updated_ms"].as_u64().unwrap_or(0) - rec["started_ms"].as_u64().unwrap_or(0),
        rec["objects_done"],
        rec["bytes_done"]
    );
    report("wipe_volume", &[window], &summary, t0.elapsed());
    verify(&summary).await;
    assert_node_current(&p, victim, &summary, &repos).await;
    assert_eq!(
        rec["shards_done"].as_array().map(Vec::len),
        rec["shards_total"].as_u64().map(|n| n as usize),
        "{rec}"
    );
    assert!(
        rec["shards_total"].as_u64() >= Some(repos.len() as u64),
        "{rec}"
    );
    assert!(
        rec["objects_done"].as_u64() >= rec["objects_total"].as_u64(),
        "{rec}"
    );
    assert_eq!(summary.failed_pulls, 0, "pulls failed: {failures:#?}");
}
