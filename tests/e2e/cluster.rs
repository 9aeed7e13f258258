//! The router and replica pairs, end to end: three real `flotilla node` processes (n1, n2 in
//! rack r1; n3 alone in r2) and real `flotilla router` processes over one embedded metadata
//! store and a moto S3 object store. Placement, failover on kill -9, catch-up after a
//! restart, concurrent placement by two routers, real clients through the router, the admin
//! API and graceful shutdown.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::clients::{
    assert_manifest_blobs, blocking, docker_pull_same, docker_push_fresh, get_manifest,
    layout_blob, skopeo_copy_from, skopeo_push_single, Podman, DOCKER_MANIFEST,
};
use crate::cluster_support::*;
use crate::support::OCI_MANIFEST;

const RACK: [(&str, &str); 3] = TOPOLOGY;

fn rack_of(id: &str) -> &'static str {
    RACK.iter()
        .find(|(n, _)| *n == id)
        .map(|(_, r)| *r)
        .unwrap_or_else(|| panic!("unknown node {id}"))
}

/// Wait until the blobs of `p` (manifest included) are on exactly the disks of `replicas`,
/// then assert the other nodes do not hold them.
async fn assert_on_pair_disks(c: &ClusterProc, p: &Pushed, replicas: &[String]) {
    let mut all = p.blobs.clone();
    all.push(p.manifest.clone());
    poll(
        &format!("blobs of {}:{} on {replicas:?}", p.repo, p.tag),
        CLUSTER_TIMEOUT,
        || async {
            all.iter()
                .all(|d| replicas.iter().all(|r| c.node(r).has_blob(d)))
                .then_some(())
        },
    )
    .await;
    for n in &c.nodes {
        if !replicas.contains(&n.id) {
            for d in &all {
                assert!(
                    !n.has_blob(d),
                    "{d} of {}:{} is on non-replica {} (replicas {replicas:?})",
                    p.repo,
                    p.tag,
                    n.id
                );
            }
        }
    }
}

async fn assert_in_s3(c: &ClusterProc, p: &Pushed) {
    for d in p.blobs.iter().chain([&p.manifest]) {
        assert!(c.s3_has_blob(d).await, "{d} of {} not in S3", p.repo);
    }
    let tag_key = format!("repos/{}/tags/{}", p.repo, p.tag);
    assert!(c.s3_has(&tag_key).await, "{tag_key} not in S3");
}

#[tokio::test(flavor = "multi_thread")]
async fn placement_is_rack_aware_even_and_on_the_pairs_disks() {
    let c = ClusterProc::start(1).await;
    let oci = c.router(0);
    let mut pushed = Vec::new();
    for i in 0..12 {
        pushed.push(push_image(&oci, &format!("svc{i}/prod/app"), "v1").await);
    }

    let mut per_node: HashMap<String, usize> = HashMap::new();
    for (i, p) in pushed.iter().enumerate() {
        let key = format!("svc{i}/prod");
        let replicas = c.replicas(0, &key).await;
        assert_eq!(replicas.len(), 2, "{key}: {replicas:?}");
        assert_ne!(
            rack_of(&replicas[0]),
            rack_of(&replicas[1]),
            "{key}: replicas {replicas:?} share a rack"
        );
        assert!(replicas.contains(&"n3".to_owned()), "{key}: {replicas:?}");
        for r in &replicas {
            *per_node.entry(r.clone()).or_default() += 1;
        }
        assert_on_pair_disks(&c, p, &replicas).await;
        assert_in_s3(&c, p).await;
    }
    assert_eq!(per_node.get("n3"), Some(&12), "{per_node:?}");
    assert_eq!(per_node.get("n1"), Some(&6), "{per_node:?}");
    assert_eq!(per_node.get("n2"), Some(&6), "{per_node:?}");

    // The listing endpoints agree with the per-key records.
    let (s, shards) = c.admin_get(0, "/shards").await;
    assert_eq!(s, 200);
    assert_eq!(shards.as_array().map(Vec::len), Some(12), "{shards}");
    let nodes = c.admin_nodes(0).await;
    let counts: Vec<(String, u64, String)> = nodes
        .iter()
        .map(|n| {
            (
                n["id"].as_str().unwrap_or_default().to_owned(),
                n["shards"].as_u64().unwrap_or(0),
                n["rack"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        counts,
        vec![
            ("n1".to_owned(), 6, "r1".to_owned()),
            ("n2".to_owned(), 6, "r1".to_owned()),
            ("n3".to_owned(), 12, "r2".to_owned()),
        ]
    );
    for p in &pushed {
        try_pull(&oci, p).await.unwrap_or_else(|e| panic!("{e}"));
    }
}

/// Tests 2 and 3 of the issue: kill -9 under read load, pushes while down, catch-up.
#[tokio::test(flavor = "multi_thread")]
async fn kill9_keeps_reads_and_pushes_working_and_the_node_catches_up() {
    let mut c = ClusterProc::start(1).await;
    let oci = c.router(0);
    let mut images = Vec::new();
    for i in 0..6 {
        images.push(push_image(&oci, &format!("svc{i}/prod/app"), "v1").await);
    }
    for (i, p) in images.iter().enumerate() {
        let replicas = c.replicas(0, &format!("svc{i}/prod")).await;
        assert!(replicas.contains(&"n3".to_owned()), "{replicas:?}");
        assert_on_pair_disks(&c, p, &replicas).await;
    }

    let pulls = PullLoop::start(oci.clone(), images.clone());
    pulls.run_for(5, Duration::from_secs(3)).await;
    c.kill9("n3");
    let killed = Instant::now();
    // Through the first failure (ejection), the ejection's expiry and the lease's expiry.
    pulls.run_for(5, Duration::from_secs(3)).await;
    c.wait_node_gone(0, "n3", Duration::from_secs(30)).await;
    pulls.run_for(3, Duration::ZERO).await;
    let (rounds, failures) = pulls.finish().await;
    assert!(
        failures.is_empty(),
        "{} pulls failed around the kill -9 ({rounds} rounds): {failures:#?}",
        failures.len()
    );
    println!(
        "{rounds} pull rounds of {} images, none failed; n3 left the map {:?} after kill -9",
        images.len(),
        killed.elapsed()
    );

    // Pushes while n3 (alone in rack r2, a replica of every key) is down.
    let mut acked = Vec::new();
    for i in 0..6 {
        let repo = format!("svc{i}/prod/app");
        let layer = layer_for(&format!("{repo}:v2"), 8192);
        match try_push_image(&oci, &repo, "v2", &layer).await {
            Ok(p) => acked.push(p),
            Err(e) => panic!("push while n3 is down: {e}"),
        }
    }
    for i in 0..2 {
        let p = push_image(&oci, &format!("new{i}/prod/app"), "v1").await;
        let replicas = c.replicas(0, &format!("new{i}/prod")).await;
        assert!(!replicas.contains(&"n3".to_owned()), "{replicas:?}");
        acked.push(p);
    }
    for p in images.iter().chain(&acked) {
        try_pull(&oci, p)
            .await
            .unwrap_or_else(|e| panic!("with n3 down: {e}"));
    }

    // n3 comes back on its old disk: what it missed is readable from it directly.
    c.restart("n3").await;
    let n3 = c.node("n3").client();
    for p in acked.iter().take(6).chain(&images) {
        try_pull(&n3, p)
            .await
            .unwrap_or_else(|e| panic!("directly from restarted n3: {e}"));
    }
    for p in images.iter().chain(&acked) {
        try_pull(&oci, p)
            .await
            .unwrap_or_else(|e| panic!("through the router after the restart: {e}"));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn two_routers_agree_on_concurrent_first_placement() {
    let c = ClusterProc::start(2).await;
    let (a, b) = (c.router(0), c.router(1));
    let pushes = (0..10).map(|i| {
        let (a, b) = (a.clone(), b.clone());
        async move {
            let repo = format!("race{i}/prod/app");
            let (la, lb) = (
                layer_for(&format!("{repo}:a"), 4096),
                layer_for(&format!("{repo}:b"), 4096),
            );
            let (pa, pb) = tokio::join!(
                try_push_image(&a, &repo, "a", &la),
                try_push_image(&b, &repo, "b", &lb)
            );
            (
                pa.unwrap_or_else(|e| panic!("router 0: {e}")),
                pb.unwrap_or_else(|e| panic!("router 1: {e}")),
            )
        }
    });
    let results = futures::future::join_all(pushes).await;
    for (i, (pa, pb)) in results.iter().enumerate() {
        let key = format!("race{i}/prod");
        let (s0, r0) = c.admin_get(0, &format!("/shards/{key}")).await;
        let (s1, r1) = c.admin_get(1, &format!("/shards/{key}")).await;
        assert_eq!((s0, s1), (200, 200), "{r0} {r1}");
        // One placement: the same replicas and creation on both routers. Each of the two
        // manifest writes then committed once (epoch 1 → 3); a replica too slow for a
        // write's attempt (this machine is loaded) is marked lagging and rejoins, two more
        // bumps each time, so the epoch is at least 3 and both replicas end in sync.
        for field in ["replicas", "created_ms", "key"] {
            assert_eq!(r0[field], r1[field], "{key}: routers disagree on {field}");
        }
        poll(
            &format!("{key} at epoch 3 or later, in sync, on both routers"),
            CLUSTER_TIMEOUT,
            || async {
                let (_, r0) = c.admin_get(0, &format!("/shards/{key}")).await;
                let (_, r1) = c.admin_get(1, &format!("/shards/{key}")).await;
                let in_sync = r0.get("lagging").is_none() && r0.get("syncing").is_none();
                (r0 == r1 && r0["epoch"].as_u64() >= Some(3) && in_sync).then_some(())
            },
        )
        .await;
        let replicas = c.replicas(0, &key).await;
        // Both pushes went to the one agreed pair.
        assert_on_pair_disks(&c, pa, &replicas).await;
        assert_on_pair_disks(&c, pb, &replicas).await;
        for p in [pa, pb] {
            try_pull(&a, p).await.unwrap_or_else(|e| panic!("{e}"));
            try_pull(&b, p).await.unwrap_or_else(|e| panic!("{e}"));
        }
    }
    // The cached listings converge too.
    poll(
        "both routers' shard listings to agree",
        CLUSTER_TIMEOUT,
        || async {
            let (_, l0) = c.admin_get(0, "/shards").await;
            let (_, l1) = c.admin_get(1, "/shards").await;
            (l0 == l1 && l0.as_array().map(Vec::len) == Some(10)).then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn real_clients_through_the_router() {
    require_clients();
    let c = ClusterProc::start(1).await;
    let oci = c.router(0);
    let host = c.routers[0].host();
    let tmp = tempfile::tempdir().expect("tempdir");

    // skopeo in: a hand-made OCI layout.
    let img = skopeo_push_single(&host, tmp.path(), "clients/skopeo/app:v1").await;
    let (_, digest, bytes) = get_manifest(&oci, "clients/skopeo/app", "v1").await;
    assert_eq!(digest, img.manifest.digest);
    assert_eq!(bytes, img.manifest.bytes);
    assert_manifest_blobs(&oci, "clients/skopeo/app", &bytes).await;
    let replicas = c.replicas(0, "clients/skopeo").await;
    let pushed = Pushed {
        repo: "clients/skopeo/app".into(),
        tag: "v1".into(),
        manifest: img.manifest.digest.clone(),
        blobs: img.blobs().map(|b| b.digest.clone()).collect(),
    };
    assert_on_pair_disks(&c, &pushed, &replicas).await;

    // skopeo out.
    let out = tmp.path().join("layout-out");
    let (src, o) = (
        format!("docker://{host}/clients/skopeo/app:v1"),
        out.clone(),
    );
    skopeo_copy_from(src, format!("oci:{}:v1", o.display())).await;
    assert_eq!(layout_blob(&out, &img.manifest.digest), img.manifest.bytes);
    for b in img.blobs() {
        assert_eq!(layout_blob(&out, &b.digest), b.bytes);
    }

    // podman pull.
    let pm = Podman::new();
    let src = format!("{host}/clients/skopeo/app:v1");
    let config_hex = img.config.hex().to_owned();
    let pm = blocking(move || {
        pm.pull_checked(&src, &config_hex);
        pm
    })
    .await;
    drop(pm);

    // docker import → push → rmi → pull, through the router (127.0.0.1 is insecure-ok).
    let pushed = docker_push_fresh(&host, "clients/docker/api", tmp.path()).await;
    let (ct, digest, bytes) = get_manifest(&oci, "clients/docker/api", &pushed.tag).await;
    assert_eq!(ct, DOCKER_MANIFEST);
    assert_eq!(digest, pushed.digest);
    assert_manifest_blobs(&oci, "clients/docker/api", &bytes).await;
    docker_pull_same(pushed).await;
}

fn require_clients() {
    for t in ["skopeo", "podman", "docker"] {
        crate::support::require_tool(t);
    }
}

async fn put_pin(c: &ClusterProc, key: &str, body: &str) -> (u16, Value) {
    let r = c
        .http
        .put(format!("{}/admin/v1/shards/{key}", c.routers[0].url()))
        .header("content-type", "application/json")
        .body(body.to_owned())
        .send()
        .await
        .expect("PUT shard");
    let s = r.status().as_u16();
    let text = r.text().await.unwrap_or_default();
    let v = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{s}: not JSON ({e}): {text}"));
    (s, v)
}

async fn post_admin(c: &ClusterProc, path: &str) -> (u16, Value) {
    let r = c
        .http
        .post(format!("{}/admin/v1{path}", c.routers[0].url()))
        .send()
        .await
        .expect("POST admin");
    let s = r.status().as_u16();
    let v = r.json().await.expect("admin JSON");
    (s, v)
}

/// Sum of a node's OCI request counter (what it served, whoever asked).
async fn node_requests(c: &ClusterProc, id: &str) -> f64 {
    let text = reqwest::get(format!("{}/metrics", c.node(id).url()))
        .await
        .expect("node metrics")
        .text()
        .await
        .expect("metrics text");
    text.lines()
        .filter(|l| l.starts_with("flotilla_node_requests_total{") && l.contains("method=\"GET\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread")]
async fn admin_api_validates_pins_and_drains() {
    let c = ClusterProc::start(1).await;
    let oci = c.router(0);
    let bad = [
        (r#"{"replicas":["n1","n9"]}"#, "not registered"),
        (r#"{"replicas":["n1","n1"]}"#, "listed twice"),
        (r#"{"replicas":["n1","n2"]}"#, "distinct racks"),
        (r#"{"replicas":["n1","#, "must be JSON"),
        (r#"{"nodes":["n1","n3"]}"#, "must be JSON"),
        (r#"{"replicas":[]}"#, "at least one"),
    ];
    for (body, msg) in bad {
        let (s, v) = put_pin(&c, "pinned/prod", body).await;
        assert_eq!(s, 400, "{body}: {v}");
        let err = v["errors"][0]["message"].as_str().unwrap_or_default();
        assert!(err.contains(msg), "{body}: error {err:?} lacks {msg:?}");
        assert_eq!(v["errors"][0]["code"], "UNSUPPORTED", "{body}: {v}");
    }
    let (s, _) = c.admin_get(0, "/shards/pinned/prod").await;
    assert_eq!(s, 404, "a refused pin must not create the key");

    // A valid pin, then pushes land on the pinned pair only.
    let (s, v) = put_pin(&c, "pinned/prod", r#"{"replicas":["n2","n3"]}"#).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["pinned"], true, "{v}");
    assert_eq!(c.replicas(0, "pinned/prod").await, ["n2", "n3"]);
    let p = push_image(&oci, "pinned/prod/app", "v1").await;
    assert_on_pair_disks(&c, &p, &["n2".into(), "n3".into()]).await;
    try_pull(&oci, &p).await.unwrap_or_else(|e| panic!("{e}"));

    // Drain n2: listed as draining, reads of its keys stop reaching it.
    let (s, v) = post_admin(&c, "/nodes/n2/drain").await;
    assert_eq!(s, 200, "{v}");
    let n2 = c.admin_node(0, "n2").await.expect("n2 listed");
    assert_eq!(n2["state"], "draining", "{n2}");
    assert_eq!(n2["live"], false, "{n2}");
    let before = node_requests(&c, "n2").await;
    for _ in 0..10 {
        try_pull(&oci, &p).await.unwrap_or_else(|e| panic!("{e}"));
    }
    assert_eq!(
        node_requests(&c, "n2").await,
        before,
        "the router sent reads to draining n2"
    );
    // The drain survives the node's heartbeats (2.5 s apart).
    let t0 = Instant::now();
    poll("two heartbeats", Duration::from_secs(10), || async {
        let n = c.admin_node(0, "n2").await?;
        assert_eq!(n["state"], "draining", "drain lost: {n}");
        (t0.elapsed() > Duration::from_secs(6)).then_some(())
    })
    .await;
    let (s, v) = post_admin(&c, "/nodes/n9/drain").await;
    assert_eq!(s, 404, "{v}");

    // Undrain: ready and live again, reads reach it again.
    let (s, v) = post_admin(&c, "/nodes/n2/undrain").await;
    assert_eq!(s, 200, "{v}");
    c.wait_node_live(0, "n2").await;
    let before = node_requests(&c, "n2").await;
    for _ in 0..10 {
        try_pull(&oci, &p).await.unwrap_or_else(|e| panic!("{e}"));
    }
    assert!(
        node_requests(&c, "n2").await > before,
        "no read reached n2 after undrain"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_deregisters_and_the_partner_serves() {
    let mut c = ClusterProc::start(1).await;
    let oci = c.router(0);
    let mut images = Vec::new();
    for i in 0..4 {
        images.push(push_image(&oci, &format!("svc{i}/prod/app"), "v1").await);
    }
    for (i, p) in images.iter().enumerate() {
        let replicas = c.replicas(0, &format!("svc{i}/prod")).await;
        assert_on_pair_disks(&c, p, &replicas).await;
    }
    let t0 = Instant::now();
    c.sigterm("n3").await;
    // Deregistered on the way out, not left to expire (lease TTL 10 s).
    c.wait_node_gone(0, "n3", Duration::from_secs(5)).await;
    println!("n3 gone from the map {:?} after SIGTERM", t0.elapsed());
    for p in &images {
        try_pull(&oci, p)
            .await
            .unwrap_or_else(|e| panic!("after SIGTERM of n3: {e}"));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn internal_api_needs_the_secret_and_probes_eject_dead_nodes_fast() {
    let mut c = ClusterProc::start(1).await;
    let http = reqwest::Client::new();
    let status_url = format!("{}/internal/v1/status", c.node("n1").url());
    for secret in [
        None,
        Some("wrong"),
        Some(crate::cluster_support::CLUSTER_SECRET),
    ] {
        let mut req = http.get(&status_url);
        if let Some(s) = secret {
            req = req.header("x-flotilla-secret", s);
        }
        let r = req.send().await.unwrap();
        if secret == Some(crate::cluster_support::CLUSTER_SECRET) {
            assert_eq!(r.status(), 200);
            let v: Value = r.json().await.unwrap();
            assert_eq!(v["id"], "n1");
            assert_eq!(v["ready"], true);
        } else {
            assert_eq!(r.status(), 401, "secret {secret:?}");
            assert_eq!(crate::support::error_code(r).await, "UNAUTHORIZED");
        }
    }
    let r = http
        .post(format!("{}/internal/v1/catch-up", c.node("n1").url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    // Active probing: a SIGKILLed node is out of rotation long before its 10 s lease expires.
    let t0 = Instant::now();
    c.kill9("n2");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let n2 = c.admin_node(0, "n2").await;
        if n2.as_ref().is_some_and(|n| n["live"] == false) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "n2 still live 5 s after kill -9: {n2:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!("n2 ejected by probes {:?} after kill -9", t0.elapsed());
}

/// A router's counter `name` (unlabelled).
async fn router_metric(c: &ClusterProc, router: usize, name: &str) -> f64 {
    let text = reqwest::get(c.router(router).url("/metrics"))
        .await
        .expect("router metrics")
        .text()
        .await
        .expect("metrics text");
    let name = format!("{name} ");
    text.lines()
        .filter(|l| l.starts_with(&name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn router_cache(c: &ClusterProc, router: usize, what: &str) -> f64 {
    router_metric(
        c,
        router,
        &format!("flotilla_router_manifest_cache_{what}_total"),
    )
    .await
}

/// Until router 1's record of `key` has router 0's epoch (router 0 made the last write).
async fn routers_agree_on_epoch(c: &ClusterProc, key: &str) {
    let path = format!("/shards/{key}");
    let now = c.admin_get(0, &path).await.1["epoch"].clone();
    poll(
        "router 1 to see the latest epoch",
        CLUSTER_TIMEOUT,
        || async { (c.admin_get(1, &path).await.1["epoch"] == now).then_some(()) },
    )
    .await;
}

/// A router's answer to a manifest HEAD.
async fn head_manifest(
    c: &ClusterProc,
    router: usize,
    repo: &str,
    reference: &str,
) -> reqwest::Response {
    c.router(router)
        .http
        .head(
            c.router(router)
                .url(&format!("/v2/{repo}/manifests/{reference}")),
        )
        .send()
        .await
        .expect("HEAD")
}

/// What a router answers for a manifest GET: status and digest header.
async fn manifest_at(c: &ClusterProc, router: usize, repo: &str, reference: &str) -> (u16, String) {
    let r = c
        .router(router)
        .http
        .get(
            c.router(router)
                .url(&format!("/v2/{repo}/manifests/{reference}")),
        )
        .header("accept", OCI_MANIFEST)
        .send()
        .await
        .expect("manifest GET");
    let status = r.status().as_u16();
    let digest = r
        .headers()
        .get("docker-content-digest")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    if status == 200 {
        let body = r.bytes().await.expect("manifest body");
        assert_eq!(
            crate::support::sha256(&body),
            digest,
            "body is the digest served"
        );
    }
    (status, digest)
}

#[tokio::test(flavor = "multi_thread")]
async fn manifest_cache_is_as_fresh_as_the_shard_map() {
    let c = ClusterProc::start(2).await;
    let repo = "cache/prod/app";
    let first = push_image(&c.router(0), repo, "live").await;
    let epoch = |v: Value| v["epoch"].as_u64().expect("epoch");
    // Once router 1 has seen the push's epoch bump (router 0 made it), so warm entries stay.
    routers_agree_on_epoch(&c, "cache/prod").await;
    // Warm both routers' caches and check they serve from memory.
    for r in [0, 1] {
        for _ in 0..5 {
            assert_eq!(
                manifest_at(&c, r, repo, "live").await,
                (200, first.manifest.clone())
            );
        }
    }
    let replicas = c.replicas(0, "cache/prod").await;
    let before: f64 = futures::future::join_all(replicas.iter().map(|n| node_requests(&c, n)))
        .await
        .into_iter()
        .sum();
    for r in [0, 1] {
        assert_eq!(
            manifest_at(&c, r, repo, "live").await,
            (200, first.manifest.clone())
        );
        let head = head_manifest(&c, r, repo, "live").await;
        assert_eq!(head.status(), 200);
        assert_eq!(
            head.headers()["docker-content-digest"].to_str().unwrap(),
            first.manifest
        );
        assert!(head.headers().contains_key("content-length"));
    }
    let after: f64 = futures::future::join_all(replicas.iter().map(|n| node_requests(&c, n)))
        .await
        .into_iter()
        .sum();
    assert_eq!(after, before, "warm manifest reads reached a node");
    assert!(router_cache(&c, 0, "hits").await >= 6.0);
    assert!(router_cache(&c, 1, "hits").await >= 6.0);
    let e0 = epoch(c.admin_get(0, "/shards/cache/prod").await.1);

    // Re-point the tag through router 0: router 0 serves the new manifest at once (read your
    // writes), router 1 as soon as it sees the bumped epoch (bounded well under the TTL).
    let layer = layer_for("cache second", 4096);
    let second = try_push_image(&c.router(0), repo, "live", &layer)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_ne!(second.manifest, first.manifest);
    assert_eq!(
        manifest_at(&c, 0, repo, "live").await,
        (200, second.manifest.clone())
    );
    // Five seconds is half the cache TTL: only the epoch bump can make this pass.
    poll(
        "router 1 to serve the re-pointed tag",
        Duration::from_secs(5),
        || async {
            (manifest_at(&c, 1, repo, "live").await == (200, second.manifest.clone())).then_some(())
        },
    )
    .await;
    assert!(epoch(c.admin_get(1, "/shards/cache/prod").await.1) > e0);

    // Delete by digest through router 1: router 1 at once, router 0 soon after, say 404.
    let by_digest = second.manifest.clone();
    assert_eq!(manifest_at(&c, 0, repo, &by_digest).await.0, 200);
    assert_eq!(manifest_at(&c, 0, repo, &by_digest).await.0, 200);
    let del = c
        .router(1)
        .http
        .delete(
            c.router(1)
                .url(&format!("/v2/{repo}/manifests/{by_digest}")),
        )
        .send()
        .await
        .expect("DELETE");
    assert_eq!(del.status(), 202);
    assert_eq!(manifest_at(&c, 1, repo, &by_digest).await.0, 404);
    poll(
        "router 0 to forget the deleted manifest",
        Duration::from_secs(5),
        || async { (manifest_at(&c, 0, repo, &by_digest).await.0 == 404).then_some(()) },
    )
    .await;
    assert_eq!(
        manifest_at(&c, 0, repo, "live").await.0,
        404,
        "its tag went with it"
    );

    // A refused write (a manifest naming a missing blob) leaves the epoch alone.
    let e1 = epoch(c.admin_get(0, "/shards/cache/prod").await.1);
    let bad = crate::support::image_manifest(
        &format!("sha256:{}", "0".repeat(64)),
        2,
        &first.blobs[1],
        4096,
    );
    let r = c
        .router(0)
        .http
        .put(c.router(0).url(&format!("/v2/{repo}/manifests/bad")))
        .header("content-type", OCI_MANIFEST)
        .body(bad)
        .send()
        .await
        .expect("PUT");
    assert_eq!(r.status(), 400);
    assert_eq!(epoch(c.admin_get(0, "/shards/cache/prod").await.1), e1);

    // Tag listings are cached under the same epochs: a new tag shows up once seen.
    let tags = |r: usize| {
        let url = c.router(r).url(&format!("/v2/{repo}/tags/list"));
        let http = c.router(r).http.clone();
        async move {
            let resp = http.get(url).send().await.expect("tags list");
            assert_eq!(resp.status(), 200);
            let v: Value = resp.json().await.expect("tags json");
            v["tags"].clone()
        }
    };
    routers_agree_on_epoch(&c, "cache/prod").await;
    let before = router_cache(&c, 1, "hits").await;
    assert_eq!(
        tags(1).await,
        serde_json::json!([]),
        "the only tag went with its manifest"
    );
    assert_eq!(tags(1).await, serde_json::json!([]));
    assert_eq!(
        router_cache(&c, 1, "hits").await,
        before + 1.0,
        "the second listing is a hit"
    );

    // A pull starts with a HEAD by tag: a HEAD miss fills the cache too.
    let third = push_image(&c.router(0), repo, "headfirst").await;
    assert_eq!(
        tags(0).await,
        serde_json::json!(["headfirst"]),
        "read your write"
    );
    // Once router 1 has seen that push's epoch bump (else its fill could be outdated at once).
    routers_agree_on_epoch(&c, "cache/prod").await;
    let hits = router_cache(&c, 1, "hits").await;
    for _ in 0..2 {
        let head = head_manifest(&c, 1, repo, "headfirst").await;
        assert_eq!(head.status(), 200);
        assert_eq!(
            head.headers()["docker-content-digest"].to_str().unwrap(),
            third.manifest
        );
    }
    assert_eq!(
        router_cache(&c, 1, "hits").await,
        hits + 1.0,
        "the second HEAD is a hit"
    );
    assert_eq!(head_manifest(&c, 1, repo, "nosuchtag").await.status(), 404);
    assert_eq!(tags(1).await, serde_json::json!(["headfirst"]));
}

#[tokio::test(flavor = "multi_thread")]
async fn blob_redirect_sends_clients_to_a_live_replica() {
    let mut c = ClusterProc::start(1).await;
    let r = c.add_router(&["--blob-redirect"]).await;
    let oci = c.router(r);
    let p = push_image(&oci, "redir/prod/app", "v1").await;
    let replicas = c.replicas(0, "redir/prod").await;
    let urls: Vec<String> = replicas.iter().map(|id| c.node(id).url()).collect();
    let no_follow = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client");
    let path = format!("/v2/{}/blobs/{}", p.repo, p.blobs[1]);
    let location = |resp: &reqwest::Response| {
        resp.headers()
            .get("location")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    let mut seen = std::collections::HashSet::new();
    for _ in 0..8 {
        let resp = no_follow.get(oci.url(&path)).send().await.expect("GET");
        assert_eq!(resp.status(), 307);
        let loc = location(&resp);
        let node = urls
            .iter()
            .find(|u| loc.starts_with(&format!("{u}{path}?")))
            .unwrap_or_else(|| panic!("redirected outside the pair {urls:?}: {loc}"));
        seen.insert(node.clone());
        // The redirect is signed for that path only: the node serves it, refuses the bare path,
        // a tampered signature and the same signature on another blob.
        assert_eq!(no_follow.get(&loc).send().await.expect("GET").status(), 200);
        let bare = format!("{node}{path}");
        assert_eq!(
            no_follow.get(&bare).send().await.expect("GET").status(),
            401
        );
        let tampered = format!("{}0", &loc[..loc.len() - 1]);
        let tampered = if tampered == loc {
            format!("{}1", &loc[..loc.len() - 1])
        } else {
            tampered
        };
        assert_eq!(
            no_follow.get(&tampered).send().await.expect("GET").status(),
            401
        );
        let other = loc.replace(&p.blobs[1], &p.blobs[0]);
        assert_eq!(
            no_follow.get(&other).send().await.expect("GET").status(),
            401
        );
        // Writes never go around the router, signed or not.
        let put = no_follow
            .post(format!("{node}/v2/{}/blobs/uploads/", p.repo))
            .send()
            .await
            .expect("POST");
        assert_eq!(put.status(), 403);
        let body: serde_json::Value = put.json().await.expect("OCI error body");
        assert_eq!(body["errors"][0]["code"], "DENIED");
    }
    assert_eq!(seen.len(), 2, "reads are spread over both replicas");
    // A client that follows redirects (reqwest's default policy) gets every blob intact.
    let follow = reqwest::Client::new();
    let pull_blobs = || async {
        for d in &p.blobs {
            let resp = follow
                .get(oci.url(&format!("/v2/{}/blobs/{d}", p.repo)))
                .send()
                .await
                .expect("GET");
            assert_eq!(resp.status(), 200);
            assert_eq!(
                crate::support::sha256(&resp.bytes().await.expect("body")),
                *d
            );
        }
    };
    pull_blobs().await;
    // skopeo follows the redirects too (as it does for registries that redirect to S3).
    let before_skopeo = router_metric(&c, r, "flotilla_router_blob_redirects_total").await;
    let tmp = tempfile::tempdir().expect("tempdir");
    let (src, out) = (
        format!(
            "docker://{}/{}:v1",
            oci.url("").trim_start_matches("http://"),
            p.repo
        ),
        tmp.path().join("out"),
    );
    skopeo_copy_from(src, format!("oci:{}:v1", out.display())).await;
    // skopeo verified every digest it fetched (it recompresses the uncompressed test layer
    // for the OCI layout, so only the config is stored as fetched).
    assert_eq!(
        crate::support::sha256(&layout_blob(&out, &p.blobs[0])),
        p.blobs[0]
    );
    assert!(
        router_metric(&c, r, "flotilla_router_blob_redirects_total").await >= before_skopeo + 2.0,
        "skopeo was redirected"
    );
    // And the Docker engine pulls through the redirects.
    let host = oci.url("").trim_start_matches("http://").to_owned();
    let pushed = docker_push_fresh(&host, "redir/prod/docker", tmp.path()).await;
    let before_docker = router_metric(&c, r, "flotilla_router_blob_redirects_total").await;
    docker_pull_same(pushed).await;
    let after_docker = router_metric(&c, r, "flotilla_router_blob_redirects_total").await;
    assert!(
        after_docker >= before_docker + 2.0,
        "docker was redirected (config + layer)"
    );
    let head = no_follow.head(oci.url(&path)).send().await.expect("HEAD");
    assert_eq!(head.status(), 200);
    let missing = no_follow
        .get(oci.url(&format!("/v2/{}/blobs/sha256:{}", p.repo, "0".repeat(64))))
        .send()
        .await
        .expect("GET");
    assert_eq!(missing.status(), 404);
    assert_eq!(crate::support::error_code(missing).await, "BLOB_UNKNOWN");
    // A dead replica is probed, skipped and ejected: every redirect names the partner.
    c.kill9(&replicas[0]);
    for _ in 0..6 {
        let resp = no_follow.get(oci.url(&path)).send().await.expect("GET");
        assert_eq!(resp.status(), 307);
        assert!(location(&resp).starts_with(&format!("{}{path}?", urls[1])));
    }
    pull_blobs().await;
}
