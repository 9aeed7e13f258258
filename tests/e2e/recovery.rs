//! Automatic recovery (issue 6), on real processes against a real S3 server (moto): reseed of
//! a wiped node, replacement of a dead node, rebalance onto a new node, corruption never
//! served and repaired, seeder failover mid-reseed, object storage outage mid-reseed.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::cluster_support::{
    layer_for, poll, push_image, try_pull, try_push_image, ClusterOpts, ClusterProc, PullLoop,
    Pushed,
};
use crate::support::sha256;

/// Generous bound on any recovery step in these tests (moto is slow; the machine is shared).
const RECOVERY_TIMEOUT: Duration = Duration::from_secs(90);

fn rack_of(c: &ClusterProc, id: &str) -> String {
    c.node(id).rack.clone()
}

/// Push one image into each of `n` shard keys (`svcK/prod`), plus a nested repository and a
/// second tag in the first key, so seeding covers nested names and several tags.
async fn push_keys(c: &ClusterProc, n: usize, layer_len: usize) -> Vec<Pushed> {
    let oci = c.router(0);
    let mut out = Vec::new();
    for k in 0..n {
        let repo = format!("svc{k}/prod");
        let layer = layer_for(&format!("{repo}-layer"), layer_len);
        out.push(
            try_push_image(&oci, &repo, "v1", &layer)
                .await
                .unwrap_or_else(|e| panic!("{e}")),
        );
    }
    out.push(push_image(&oci, "svc0/prod/worker", "v1").await);
    out.push(push_image(&oci, "svc0/prod", "v2").await);
    out
}

/// Pull every image through router 0, every digest checked.
async fn pull_all(c: &ClusterProc, images: &[Pushed]) {
    for p in images {
        try_pull(&c.router(0), p)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
}

/// Shard keys that list `node` as a replica.
async fn keys_on(c: &ClusterProc, node: &str) -> Vec<String> {
    let (s, v) = c.admin_get(0, "/shards").await;
    assert_eq!(s, 200, "{v}");
    v.as_array()
        .expect("shards")
        .iter()
        .filter(|s| {
            s["replicas"]
                .as_array()
                .is_some_and(|r| r.iter().any(|x| x == node))
        })
        .map(|s| s["key"].as_str().expect("key").to_owned())
        .collect()
}

fn local_blob_ok(data: &Path, alg: &str, hex: &str) -> bool {
    let p = data.join("blobs").join(alg).join(&hex[..2]).join(hex);
    std::fs::read(&p).is_ok_and(|b| sha256(&b) == format!("{alg}:{hex}"))
}

/// Compare `node`'s disk with object storage for shard `key`, file by file: every tag with
/// the same digest, every manifest and blob linked and present with bytes matching their
/// digest. Returns what is missing or wrong (empty = complete).
async fn disk_gaps(c: &ClusterProc, node: &str, key: &str) -> Vec<String> {
    let data = c.node(node).data.clone();
    let mut gaps = Vec::new();
    for k in c.s3_shard_keys(key).await {
        let parts: Vec<&str> = k.split('/').collect();
        let n = parts.len();
        if n >= 4 && parts[n - 2] == "tags" {
            let name = parts[1..n - 2].join("/");
            let local = data.join(format!("repos/{name}/_manifests/tags/{}", parts[n - 1]));
            let want = String::from_utf8(c.s3_get(&k).await).expect("tag text");
            match std::fs::read_to_string(&local) {
                Ok(got) if got.trim() == want.trim() => {}
                _ => gaps.push(format!("tag {k}")),
            }
        } else if n >= 5 && matches!(parts[n - 3], "manifests" | "blobs") {
            let name = parts[1..n - 3].join("/");
            let (alg, hex) = (parts[n - 2], parts[n - 1]);
            let link = if parts[n - 3] == "manifests" {
                data.join(format!("repos/{name}/_manifests/revisions/{alg}/{hex}"))
            } else {
                data.join(format!("repos/{name}/_layers/{alg}/{hex}"))
            };
            if !link.is_file() {
                gaps.push(format!("link {k}"));
            }
            if !local_blob_ok(&data, alg, hex) {
                gaps.push(format!("bytes of {k}"));
            }
        }
    }
    gaps
}

async fn assert_disk_complete(c: &ClusterProc, node: &str, keys: &[String]) {
    assert!(
        !keys.is_empty(),
        "{node} holds no shard; the test proves nothing"
    );
    for key in keys {
        let gaps = disk_gaps(c, node, key).await;
        assert!(gaps.is_empty(), "{node} misses objects of {key}: {gaps:?}");
    }
}

/// Every shard record's replicas are in distinct racks (three racks or fewer nodes allow it).
async fn assert_rack_valid(c: &ClusterProc) {
    let (_, v) = c.admin_get(0, "/shards").await;
    for s in v.as_array().expect("shards") {
        let racks: BTreeSet<String> = s["replicas"]
            .as_array()
            .expect("replicas")
            .iter()
            .map(|r| rack_of(c, r.as_str().expect("id")))
            .collect();
        assert_eq!(racks.len(), 2, "replicas of {} share a rack: {s}", s["key"]);
    }
}

async fn wait_ready(c: &ClusterProc, node: &str) {
    poll(
        &format!("{node} to be ready and live again"),
        RECOVERY_TIMEOUT,
        || async {
            let n = c.admin_node(0, node).await?;
            (n["state"] == "ready" && n["live"] == true).then_some(())
        },
    )
    .await
}

async fn wait_reseed_done(c: &ClusterProc, node: &str) -> Value {
    poll(
        &format!("the reseed of {node} to be recorded as done"),
        RECOVERY_TIMEOUT,
        || async {
            let r = c.reseed_of(0, node).await?;
            (r["status"] == "done").then_some(r)
        },
    )
    .await
}

/// Wipe a node's data directory, restart it under the same id: it registers as seeding, is
/// reseeded with no operator action, and is ready with every object of its shards on disk.
#[tokio::test(flavor = "multi_thread")]
async fn wiped_node_is_reseeded_from_s3_and_ready_again() {
    reseed_wiped_node(ClusterOpts::default()).await;
}

/// The seeder, routers and nodes end to end on a real etcd.
#[tokio::test(flavor = "multi_thread")]
async fn wiped_node_is_reseeded_on_etcd() {
    reseed_wiped_node(ClusterOpts {
        etcd: true,
        ..ClusterOpts::default()
    })
    .await;
}

/// The seeder, routers and nodes end to end on the Consul stand-in.
#[tokio::test(flavor = "multi_thread")]
async fn wiped_node_is_reseeded_on_consul_standin() {
    reseed_wiped_node(ClusterOpts {
        consul: true,
        ..ClusterOpts::default()
    })
    .await;
}

async fn reseed_wiped_node(opts: ClusterOpts) {
    let opts = ClusterOpts { seeders: 1, ..opts };
    let mut c = ClusterProc::start_with(1, opts).await;
    let images = push_keys(&c, 6, 64 * 1024).await;
    let keys = keys_on(&c, "n1").await;
    let t0 = Instant::now();
    c.wipe_and_restart("n1");
    wait_ready(&c, "n1").await;
    let took = t0.elapsed();
    let rec = wait_reseed_done(&c, "n1").await;
    assert_disk_complete(&c, "n1", &keys).await;
    assert_eq!(rec["shards_total"], keys.len(), "{rec}");
    assert_eq!(
        rec["shards_done"].as_array().map(Vec::len),
        Some(keys.len()),
        "{rec}"
    );
    assert!(
        rec["objects_done"].as_u64() >= rec["objects_total"].as_u64(),
        "{rec}"
    );
    assert!(rec["bytes_done"].as_u64().unwrap_or(0) > 0, "{rec}");
    pull_all(&c, &images).await;
    eprintln!(
        "reseed of n1: {} shards, {} objects, {} bytes, ready after {took:?}",
        keys.len(),
        rec["objects_done"],
        rec["bytes_done"]
    );
}

/// Kill a node for good: after replace_after its shards move to rack-valid nodes through
/// joining → seed → swap; every image pulls throughout; the records show the new replicas.
#[tokio::test(flavor = "multi_thread")]
async fn dead_node_is_replaced_on_rack_valid_nodes() {
    let opts = ClusterOpts {
        seeders: 1,
        replace_after_secs: 3,
        ..ClusterOpts::default()
    };
    let mut c = ClusterProc::start_with(1, opts).await;
    let images = push_keys(&c, 6, 16 * 1024).await;
    let moved = keys_on(&c, "n1").await;
    assert!(!moved.is_empty(), "n1 holds no shard");
    let pulls = PullLoop::start(c.router(0), images.clone());
    c.kill9("n1");
    poll(
        "every shard of n1 to be re-homed",
        RECOVERY_TIMEOUT,
        || async { keys_on(&c, "n1").await.is_empty().then_some(()) },
    )
    .await;
    let (rounds, failures) = pulls.finish().await;
    assert!(rounds > 0);
    assert!(
        failures.is_empty(),
        "pulls failed during replacement: {failures:?}"
    );
    for key in &moved {
        let replicas = c.replicas(0, key).await;
        // n1's rack partner is the only rack-valid target (n3 is alone in r2).
        assert!(replicas.contains(&"n2".to_owned()), "{key}: {replicas:?}");
        assert!(replicas.contains(&"n3".to_owned()), "{key}: {replicas:?}");
    }
    assert_rack_valid(&c).await;
    assert_disk_complete(&c, "n2", &moved).await;
    let (_, v) = c.admin_get(0, "/shards").await;
    for s in v.as_array().expect("shards") {
        assert!(s["joining"].as_array().is_none_or(Vec::is_empty), "{s}");
        if moved.iter().any(|k| s["key"] == k.as_str()) {
            assert!(
                s["epoch"].as_u64() >= Some(3),
                "join + swap bump the epoch: {s}"
            );
        }
    }
    pull_all(&c, &images).await;
}

/// Add a fourth node in a third rack: it receives about its fair share of shards, and each
/// shard is on its disk before the record lists it as a replica (seeded before traffic).
#[tokio::test(flavor = "multi_thread")]
async fn new_node_gets_its_fair_share_seeded_before_traffic() {
    let opts = ClusterOpts {
        seeders: 1,
        gc_interval_secs: 1,
        gc_grace_secs: 2,
        ..ClusterOpts::default()
    };
    let mut c = ClusterProc::start_with(1, opts).await;
    let images = push_keys(&c, 8, 16 * 1024).await;
    let total = {
        let (_, v) = c.admin_get(0, "/shards").await;
        v.as_array().expect("shards").len()
    };
    c.add_node("n4", "r3");
    c.wait_node_live(0, "n4").await;
    // Racks r1 (2 nodes), r2, r3: rack shares 1, ½, ½ of the keys, so n4's share is half of
    // them (shardmap::fair_shares).
    let target = total / 2;
    let mut seen: BTreeSet<String> = BTreeSet::new();
    let deadline = Instant::now() + RECOVERY_TIMEOUT;
    loop {
        for key in keys_on(&c, "n4").await {
            if seen.insert(key.clone()) {
                // The swap happens only after seeding: the disk must already be complete.
                let gaps = disk_gaps(&c, "n4", &key).await;
                assert!(gaps.is_empty(), "n4 took {key} before it held it: {gaps:?}");
            }
        }
        let (_, r) = c.admin_get(0, "/reseed").await;
        let idle = r["moves"].as_array().is_some_and(Vec::is_empty);
        if seen.len() >= target && idle {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "n4 reached {} of {target} shards",
            seen.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let held = keys_on(&c, "n4").await.len();
    assert!(
        held + 1 >= target && held <= target + 1,
        "n4 holds {held} shards, fair share {target} of {total}"
    );
    assert_rack_valid(&c).await;
    // Drop: the donors delete what moved away (after the grace period), and only that; every
    // image still pulls.
    let on_disk = |id: &str, p: &Pushed| {
        let data = &c.node(id).data;
        let layer = p.blobs[1].strip_prefix("sha256:").expect("sha256");
        (
            data.join(format!("repos/{}/_manifests", p.repo)).exists(),
            data.join("blobs/sha256")
                .join(&layer[..2])
                .join(layer)
                .exists(),
        )
    };
    poll(
        "donors to drop the shards that moved",
        RECOVERY_TIMEOUT,
        || async {
            let mut pending = Vec::new();
            for p in &images {
                let key = p.repo.split('/').take(2).collect::<Vec<_>>().join("/");
                let replicas = c.replicas(0, &key).await;
                for id in ["n1", "n2", "n3", "n4"] {
                    let (repo, layer) = on_disk(id, p);
                    let holds = replicas.iter().any(|r| r == id);
                    assert!(!holds || repo, "{id} lost {} which it holds", p.repo);
                    if !holds && (repo || layer) {
                        pending.push(format!("{id}: {}", p.repo));
                    }
                }
            }
            pending.is_empty().then_some(())
        },
    )
    .await;
    pull_all(&c, &images).await;
}

fn flip_bytes(data: &Path, digest: &str) {
    let hex = digest.strip_prefix("sha256:").expect("sha256");
    let p = data.join("blobs/sha256").join(&hex[..2]).join(hex);
    let mut b = std::fs::read(&p).expect("blob on disk");
    for i in (0..b.len()).step_by(997) {
        b[i] ^= 0xff;
    }
    std::fs::write(&p, &b).expect("write corrupted blob");
}

fn quarantined(data: &Path, digest: &str) -> bool {
    let hex = digest.strip_prefix("sha256:").expect("sha256");
    std::fs::read_dir(data.join("quarantine"))
        .into_iter()
        .flatten()
        .flatten()
        .any(|e| e.file_name().to_string_lossy().contains(hex))
}

/// Flip bytes of stored blobs: no client ever receives corrupt bytes (small blobs are
/// verified before the response, large ones before their last chunk), the read path
/// quarantines and re-fetches, and the scrubber repairs blobs no one reads.
#[tokio::test(flavor = "multi_thread")]
async fn flipped_bytes_are_never_served_and_are_repaired() {
    let opts = ClusterOpts {
        scrub_bytes_per_sec: 64 * 1024 * 1024,
        scrub_interval_secs: 1,
        ..ClusterOpts::default()
    };
    let c = ClusterProc::start_with(1, opts).await;
    let oci = c.router(0);
    let small = try_push_image(&oci, "scrub/read", "v1", &layer_for("small", 100 * 1024))
        .await
        .expect("push small");
    let large = try_push_image(&oci, "scrub/big", "v1", &layer_for("large", 6 << 20))
        .await
        .expect("push large");
    let idle = try_push_image(&oci, "scrub/idle", "v1", &layer_for("idle", 50 * 1024))
        .await
        .expect("push idle");
    // Every replica holds each layer (pull once through each node to warm its cache).
    for p in [&small, &large, &idle] {
        for id in c.replicas(0, &p.repo).await {
            try_pull(&c.node(&id).client(), p).await.expect("warm");
            assert!(c.node(&id).has_blob(&p.blobs[1]));
        }
    }
    // Corrupt the layers on every replica; only the first two are read afterwards.
    let mut corrupted = Vec::new();
    for p in [&small, &large, &idle] {
        for id in c.replicas(0, &p.repo).await {
            flip_bytes(&c.node(&id).data, &p.blobs[1]);
            corrupted.push((id, p.blobs[1].clone()));
        }
    }
    // A Range read is checked too: the whole file is hashed before any byte of it is served,
    // so the range comes from the repaired copy (byte 0 was flipped on disk).
    let want = layer_for("large", 6 << 20);
    for id in c.replicas(0, &large.repo).await {
        let client = c.node(&id).client();
        let path = format!("/v2/{}/blobs/{}", large.repo, large.blobs[1]);
        let r = client
            .http
            .get(client.url(&path))
            .header("range", "bytes=0-99")
            .send()
            .await
            .expect("range GET");
        assert_eq!(r.status(), 206, "{id}");
        assert_eq!(
            &r.bytes().await.expect("range body")[..],
            &want[..100],
            "{id}: corrupt range served"
        );
    }
    // Reads through the router and straight from each node: a GET either fails or returns
    // the right bytes, and the right bytes come back within a bounded time.
    for p in [&small, &large] {
        let path = format!("/v2/{}/blobs/{}", p.repo, p.blobs[1]);
        let mut clients = vec![oci.clone()];
        for id in c.replicas(0, &p.repo).await {
            clients.push(c.node(&id).client());
        }
        for client in clients {
            poll(
                &format!("a verified read of {path}"),
                RECOVERY_TIMEOUT,
                || async {
                    let r = client.http.get(client.url(&path)).send().await.ok()?;
                    let status = r.status();
                    let body = r.bytes().await;
                    match body {
                        Ok(b) if status == 200 => {
                            assert_eq!(sha256(&b), p.blobs[1], "corrupt bytes served for {path}");
                            Some(())
                        }
                        _ => None, // refused or aborted: never corrupt
                    }
                },
            )
            .await;
        }
    }
    // Every corrupted copy is repaired on disk (read path or scrubber) and quarantined.
    for (id, d) in &corrupted {
        let data = c.node(id).data.clone();
        let hex = d.strip_prefix("sha256:").expect("sha256").to_owned();
        poll(&format!("{id} to repair {d}"), RECOVERY_TIMEOUT, || async {
            (local_blob_ok(&data, "sha256", &hex) && quarantined(&data, d)).then_some(())
        })
        .await;
    }
    for p in [&small, &large, &idle] {
        try_pull(&oci, p).await.unwrap_or_else(|e| panic!("{e}"));
    }
}

/// Wipe n3 (which holds every shard) and restart it; returns once its paced reseed has made
/// progress but not finished, with the progress record seen at that moment.
async fn reseed_in_progress(c: &mut ClusterProc) -> Value {
    c.wipe_and_restart("n3");
    poll(
        "the reseed of n3 to make progress",
        RECOVERY_TIMEOUT,
        || async {
            let r = c.reseed_of(0, "n3").await?;
            (r["status"] == "seeding" && r["objects_done"].as_u64() > Some(0)).then_some(r)
        },
    )
    .await
}

fn paced_opts(seeders: usize, proxy: bool) -> ClusterOpts {
    ClusterOpts {
        seeders,
        proxy,
        // ~12 × 256 KiB at 384 KiB/s: about 8 s of seeding, long enough to interfere.
        seed_bytes_per_sec: 384 * 1024,
        seed_concurrency: 1,
        ..ClusterOpts::default()
    }
}

/// Kill the acting seeder in the middle of a reseed: the standby takes over within seconds
/// and resumes the same reseed (same start time, shards already done are kept) to the end.
#[tokio::test(flavor = "multi_thread")]
async fn killed_seeder_mid_reseed_is_taken_over_and_the_reseed_completes() {
    let mut c = ClusterProc::start_with(1, paced_opts(2, false)).await;
    let images = push_keys(&c, 10, 256 * 1024).await;
    poll("a seeder leader", RECOVERY_TIMEOUT, || async {
        let v = c.reseed_status(0).await;
        v["leader"]["id"].as_str().map(str::to_owned)
    })
    .await;
    let before = reseed_in_progress(&mut c).await;
    let leader = c.reseed_status(0).await["leader"]["id"]
        .as_str()
        .expect("leader id")
        .to_owned();
    let done_before = before["objects_done"].as_u64().unwrap_or(0);
    c.kill_seeder(&leader);
    let killed = Instant::now();
    let successor = poll("another seeder to take over", RECOVERY_TIMEOUT, || async {
        let v = c.reseed_status(0).await;
        let id = v["leader"]["id"].as_str()?.to_owned();
        (id != leader).then_some(id)
    })
    .await;
    let takeover = killed.elapsed();
    wait_ready(&c, "n3").await;
    let rec = wait_reseed_done(&c, "n3").await;
    assert_eq!(rec["seeder"], successor.as_str(), "{rec}");
    assert_eq!(
        rec["started_ms"], before["started_ms"],
        "resumed, not restarted: {rec}"
    );
    assert!(
        rec["objects_done"].as_u64().unwrap_or(0) >= done_before,
        "{rec}"
    );
    assert!(
        takeover < Duration::from_secs(15),
        "takeover took {takeover:?}"
    );
    let keys = keys_on(&c, "n3").await;
    assert_disk_complete(&c, "n3", &keys).await;
    pull_all(&c, &images).await;
    eprintln!("seeder takeover after {takeover:?}");
}

async fn node_state_now(c: &ClusterProc, id: &str) -> String {
    c.node_state(0, id).await.unwrap_or_default()
}

/// Object storage unreachable during a reseed: the node stays not ready and the failure is
/// recorded; when storage returns the reseed resumes and completes.
#[tokio::test(flavor = "multi_thread")]
async fn s3_outage_mid_reseed_keeps_the_node_unready_until_it_resumes() {
    let mut c = ClusterProc::start_with(1, paced_opts(1, true)).await;
    let images = push_keys(&c, 10, 256 * 1024).await;
    let before = reseed_in_progress(&mut c).await;
    c.proxy.as_ref().expect("proxy").set_down(true);
    let failed = poll(
        "the seeder to record the outage",
        RECOVERY_TIMEOUT,
        || async {
            let r = c.reseed_of(0, "n3").await?;
            r["last_error"].is_string().then_some(r)
        },
    )
    .await;
    assert_eq!(failed["status"], "seeding", "{failed}");
    assert_ne!(node_state_now(&c, "n3").await, "ready");
    c.proxy.as_ref().expect("proxy").set_down(false);
    wait_ready(&c, "n3").await;
    let rec = wait_reseed_done(&c, "n3").await;
    assert_eq!(
        rec["started_ms"], before["started_ms"],
        "resumed, not restarted: {rec}"
    );
    let keys = keys_on(&c, "n3").await;
    assert_disk_complete(&c, "n3", &keys).await;
    pull_all(&c, &images).await;
}

/// A standalone seeder exposes its metrics: alone on its metadata store it becomes leader,
/// and `/metrics` says so.
#[tokio::test(flavor = "multi_thread")]
async fn standalone_seeder_serves_metrics_and_takes_leadership() {
    let tmp = tempfile::tempdir().unwrap();
    let port = crate::support::free_port();
    let log = std::fs::File::create(tmp.path().join("seeder.log")).unwrap();
    let _child = crate::support::KillOnDrop(
        std::process::Command::new(env!("CARGO_BIN_EXE_flotilla"))
            .args(["seeder", "--id", "s1"])
            .arg("--meta")
            .arg(format!("file://{}", tmp.path().join("meta").display()))
            .arg("--store")
            .arg(format!("file://{}", tmp.path().join("objects").display()))
            .arg("--metrics-listen")
            .arg(format!("127.0.0.1:{port}"))
            .env("FLOTILLA_SECRET", "standalone-test-secret")
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn seeder"),
    );
    let url = format!("http://127.0.0.1:{port}/metrics");
    poll(
        "seeder leadership in /metrics",
        Duration::from_secs(20),
        || async {
            let text = reqwest::get(&url).await.ok()?.text().await.ok()?;
            text.lines()
                .any(|l| l.starts_with("flotilla_seeder_leader") && l.trim_end().ends_with(" 1"))
                .then_some(())
        },
    )
    .await
}
