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
    let t0 = Instant::now();
    let p = Project::up("drillpart").await;
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
    let t0 = Instant::now();
    let p = Project::up("drillroll").await;
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
