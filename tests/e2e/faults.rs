//! Faults that kill no process (issue 20), on real processes against moto and the file
//! metadata store: a frozen object store, objects lost from object storage.

use std::time::{Duration, Instant};

use crate::cluster_support::{layer_for, poll, try_pull, try_push_image, ClusterOpts, ClusterProc};
use crate::support::{image_manifest, signal, OCI_MANIFEST};

const FAULT_TIMEOUT: Duration = Duration::from_secs(90);

/// Poll until a push of a tiny image `repo:tag` (layer from `seed`) succeeds through `oci`.
async fn push_eventually(
    oci: &crate::support::Oci,
    what: &str,
    repo: &str,
    tag: &str,
    seed: &str,
    len: usize,
) -> crate::cluster_support::Pushed {
    poll(what, FAULT_TIMEOUT, || async {
        try_push_image(oci, repo, tag, &layer_for(seed, len))
            .await
            .ok()
    })
    .await
}

fn blob_key(digest: &str) -> String {
    format!("blobs/sha256/{}", digest.trim_start_matches("sha256:"))
}

/// A layer deleted from object storage: a re-push whose client skipped the upload (its HEAD
/// found the blob on a node) restores it from the node's verified copy before the 201; a
/// replica rebuilt while the layer is missing reports the hole and stays out of service
/// instead of calling its reseed done; once the object is back the reseed completes and
/// every read is served, never a 404.
#[tokio::test(flavor = "multi_thread")]
async fn lost_object_is_restored_from_a_node_and_a_reseed_never_hides_it() {
    let opts = ClusterOpts {
        seeders: 1,
        scrub_bytes_per_sec: 0,
        // The loss follows the upload at once: no proof of an upload may stand in for a HEAD.
        remote_confirm_secs: 0,
        ..ClusterOpts::default()
    };
    let mut c = ClusterProc::start_with(1, opts).await;
    let oci = c.router(0);
    let layer = layer_for("lost/prod-layer", 64 * 1024);
    let pushed = try_push_image(&oci, "lost/prod", "v1", &layer)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let layer_digest = pushed.blobs[1].clone();
    assert!(c.s3_has_blob(&layer_digest).await);

    // The object disappears from the bucket; the client's HEAD still finds the blob on a
    // node, so it pushes only the manifest, under a new tag.
    c.s3_delete(&blob_key(&layer_digest)).await;
    assert!(!c.s3_has_blob(&layer_digest).await);
    let head = oci
        .http
        .head(oci.url(&format!("/v2/lost/prod/blobs/{layer_digest}")))
        .send()
        .await
        .expect("HEAD");
    assert_eq!(head.status(), 200, "the node still holds the blob");
    let config_len = try_pull_config_len(&c, &pushed).await;
    let m = image_manifest(&pushed.blobs[0], config_len, &layer_digest, layer.len());
    let put = |tag: &'static str| {
        let (oci, m) = (oci.clone(), m.clone());
        async move {
            oci.http
                .put(oci.url(&format!("/v2/lost/prod/manifests/{tag}")))
                .header("content-type", OCI_MANIFEST)
                .body(m)
                .send()
                .await
                .expect("PUT manifest")
        }
    };
    let r = put("v2").await;
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap_or_default());
    assert!(
        c.s3_has_blob(&layer_digest).await,
        "a 201 that depends on a blob object storage lacks"
    );

    // Lost again, and now a replica is rebuilt from object storage.
    c.s3_delete(&blob_key(&layer_digest)).await;
    let replicas = c.replicas(0, "lost/prod").await;
    assert_eq!(replicas.len(), 2, "{replicas:?}");
    let wiped = replicas[1].clone();
    c.wipe_and_restart(&wiped);
    let rec = poll(
        "the reseed to report the missing object",
        FAULT_TIMEOUT,
        || async {
            let r = c.reseed_of(0, &wiped).await?;
            r["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("lacks"))
                .then_some(r)
        },
    )
    .await;
    assert_ne!(rec["status"], "done", "{rec}");
    assert_eq!(
        c.node_state(0, &wiped).await.as_deref(),
        Some("seeding"),
        "a replica with a hole must not take traffic"
    );
    // Reads keep working from the replica that holds the layer.
    for tag in ["v1", "v2"] {
        let mut p = pushed.clone();
        p.tag = tag.to_owned();
        try_pull(&oci, &p).await.unwrap_or_else(|e| panic!("{e}"));
    }

    // A push that depends on the layer restores it; the reseed then completes.
    let r = put("v3").await;
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap_or_default());
    assert!(c.s3_has_blob(&layer_digest).await);
    let rec = poll("the reseed to complete", FAULT_TIMEOUT, || async {
        let r = c.reseed_of(0, &wiped).await?;
        (r["status"] == "done").then_some(r)
    })
    .await;
    assert!(rec["last_error"].is_null(), "{rec}");
    poll("the rebuilt replica to be ready", FAULT_TIMEOUT, || async {
        let n = c.admin_node(0, &wiped).await?;
        (n["state"] == "ready" && n["live"] == true).then_some(())
    })
    .await;
    // Straight from the rebuilt replica, not through the router's failover.
    let direct = c.node(&wiped).client();
    for tag in ["v1", "v2", "v3"] {
        let mut p = pushed.clone();
        p.tag = tag.to_owned();
        try_pull(&direct, &p)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
}

/// The scrubber checks object storage against what it verified on disk and restores what
/// the bucket lost, with no client involved.
#[tokio::test(flavor = "multi_thread")]
async fn scrubber_restores_objects_lost_from_object_storage() {
    let opts = ClusterOpts {
        scrub_bytes_per_sec: 256 * 1024 * 1024,
        scrub_interval_secs: 1,
        ..ClusterOpts::default()
    };
    let c = ClusterProc::start_with(1, opts).await;
    let oci = c.router(0);
    let layer = layer_for("scrubbed/prod-layer", 32 * 1024);
    let pushed = try_push_image(&oci, "scrubbed/prod", "v1", &layer)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    for d in &pushed.blobs {
        c.s3_delete(&blob_key(d)).await;
    }
    poll(
        "the scrubber to restore both blobs",
        FAULT_TIMEOUT,
        || async {
            for d in &pushed.blobs {
                if !c.s3_has_blob(d).await {
                    return None;
                }
            }
            Some(())
        },
    )
    .await;
    // The restored objects are the right bytes.
    for d in &pushed.blobs {
        let bytes = c.s3_get(&blob_key(d)).await;
        assert_eq!(&crate::support::sha256(&bytes), d);
    }
    let mut repaired = 0.0;
    for id in ["n1", "n2", "n3"] {
        repaired += c
            .node_metric(id, "flotilla_node_remote_repaired_total")
            .await;
    }
    assert!(repaired >= 2.0, "repairs counted: {repaired}");
}

/// The config blob's length, from object storage (the test pushed it).
async fn try_pull_config_len(c: &ClusterProc, p: &crate::cluster_support::Pushed) -> usize {
    c.s3_get(&blob_key(&p.blobs[0])).await.len()
}

async fn readyz(url: &str) -> serde_json::Value {
    reqwest::get(format!("{url}/readyz"))
        .await
        .expect("GET /readyz")
        .json()
        .await
        .expect("readyz JSON")
}

/// The object store frozen (SIGSTOP: connections accepted, nothing answered): a push gets a
/// clean 503 `UNAVAILABLE` in seconds with nothing acknowledged, nodes report the store
/// unreachable, reads of what they hold keep working, and once the store thaws pushes
/// succeed again without a restart.
#[tokio::test(flavor = "multi_thread")]
async fn frozen_object_store_fails_writes_in_seconds_and_heals() {
    let c = ClusterProc::start_with(1, ClusterOpts::default()).await;
    let oci = c.router(0);
    let before = try_push_image(&oci, "frozen/prod", "v1", &layer_for("frozen-1", 8192))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    c.moto.freeze(true);
    let t0 = Instant::now();
    let err = try_push_image(&oci, "frozen/prod", "v2", &layer_for("frozen-2", 8192))
        .await
        .expect_err("a push acknowledged while object storage is frozen");
    let took = t0.elapsed();
    eprintln!("push with the object store frozen failed after {took:?}: {err}");
    assert!(took < Duration::from_secs(5), "took {took:?}");
    assert!(err.contains("503") && err.contains("UNAVAILABLE"), "{err}");
    // The node that took the write says why.
    let mut unreachable = 0;
    for id in ["n1", "n2", "n3"] {
        if readyz(&c.node(id).url()).await["object_store"] == "unreachable" {
            unreachable += 1;
        }
    }
    assert!(unreachable >= 1, "no node reports the frozen store");
    // What the nodes hold is still served.
    try_pull(&oci, &before)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    c.moto.freeze(false);
    let after = push_eventually(
        &oci,
        "a push to succeed after the thaw",
        "frozen/prod",
        "v2",
        "frozen-2",
        8192,
    )
    .await;
    try_pull(&oci, &after)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    // The refused tag was never acknowledged, so nothing half-written shows: v2 is the
    // image pushed after the thaw.
    assert!(c.s3_has_blob(&after.blobs[1]).await);
}

/// A tmpfs of `mib` MiB mounted for the test, unmounted on drop (after the node using it,
/// which is declared later and so dropped first).
struct Tmpfs {
    dir: std::path::PathBuf,
    _parent: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(mib: u64) -> Tmpfs {
        let parent = tempfile::tempdir().expect("tempdir");
        let dir = parent.path().join("small");
        std::fs::create_dir_all(&dir).expect("mount point");
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(&dir)
            .status()
            .expect("run mount")
            .success();
        assert!(ok, "mounting a tmpfs needs root (CI runs as root)");
        Tmpfs {
            dir,
            _parent: parent,
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.dir)
            .status();
    }
}

fn files_under(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0)
}

/// A node on a small disk: a push that fills it gets a clear 507 with the OCI body and its
/// partial bytes are deleted at once; below the free-space floor the node refuses new data
/// fast and says so in `/readyz`, reads keep working, and it takes data again by itself
/// once space returns.
#[tokio::test(flavor = "multi_thread")]
async fn full_disk_refuses_cleanly_frees_the_upload_and_recovers() {
    let fs = Tmpfs::mount(64);
    let data = fs.dir.join("node");
    let node = crate::support::NodeProc::spawn(
        data.clone(),
        crate::support::free_port(),
        "n1",
        vec!["--min-free-bytes".into(), (4u64 << 20).to_string()],
    );
    node.wait_ready().await;
    let oci = node.client();
    let small = layer_for("disk-small", 64 * 1024);
    let kept = try_push_image(&oci, "disk/prod", "v1", &small)
        .await
        .unwrap_or_else(|e| panic!("{e}"));

    // 100 MiB in 10 MiB chunks onto a 64 MiB disk.
    let r = oci
        .http
        .post(oci.url("/v2/disk/prod/blobs/uploads/"))
        .send()
        .await
        .expect("POST");
    assert_eq!(r.status(), 202);
    let mut location = r.headers()["location"].to_str().unwrap().to_owned();
    let chunk = vec![7u8; 10 << 20];
    let mut refused = None;
    for _ in 0..10 {
        match oci.patch(&location, chunk.clone()).await {
            Ok(r) if r.status() == 202 => {
                location = r.headers()["location"].to_str().unwrap().to_owned();
            }
            Ok(r) => {
                refused = Some((r.status().as_u16(), r.text().await.unwrap_or_default()));
                break;
            }
            // The node may answer before it read the whole chunk and close the connection.
            Err(e) => {
                refused = Some((0, e.to_string()));
                break;
            }
        }
    }
    let (status, body) = refused.expect("100 MiB accepted onto a 64 MiB disk");
    if status != 0 {
        assert_eq!(status, 507, "{body}");
        assert!(
            body.contains("UNAVAILABLE") && body.contains("disk is full"),
            "{body}"
        );
    }
    // The partial upload is gone at once (not at the hourly purge), and its space with it.
    poll(
        "the failed upload's bytes to be removed",
        Duration::from_secs(10),
        || async { (files_under(&data.join("uploads")) == 0).then_some(()) },
    )
    .await;
    let status = oci.http.get(oci.url(&location)).send().await.expect("GET");
    assert_eq!(status.status(), 404, "the failed session must be gone");
    let ready = poll(
        "the node to be writable again",
        Duration::from_secs(10),
        || async {
            let r = readyz(&node.url()).await;
            (r["writable"] == true).then_some(r)
        },
    )
    .await;
    eprintln!("after the failed upload: {ready}");

    // Below the floor: refused fast with the cause, reads still served.
    let free = ready["disk_free_bytes"].as_u64().expect("free bytes");
    let ballast = fs.dir.join("ballast");
    std::fs::write(&ballast, vec![1u8; (free - (2 << 20)) as usize]).expect("ballast");
    let full = poll(
        "the node to report it is not writable",
        Duration::from_secs(10),
        || async {
            let r = readyz(&node.url()).await;
            (r["writable"] == false).then_some(r)
        },
    )
    .await;
    assert_eq!(full["ready"], true, "reads still served: {full}");
    let t0 = Instant::now();
    let r = oci
        .post_blob("disk/prod", &crate::support::sha256(b"x"), b"x".to_vec())
        .await
        .expect("POST");
    assert_eq!(r.status(), 507);
    let body = r.text().await.unwrap_or_default();
    assert!(body.contains("min_free_bytes"), "{body}");
    assert!(t0.elapsed() < Duration::from_secs(1));
    try_pull(&oci, &kept)
        .await
        .unwrap_or_else(|e| panic!("{e}"));

    std::fs::remove_file(&ballast).expect("remove ballast");
    poll(
        "the node to take data again",
        Duration::from_secs(10),
        || async {
            try_push_image(&oci, "disk/prod", "v2", &layer_for("disk-after", 4096))
                .await
                .ok()
        },
    )
    .await;
}

/// One replica has a hole (its copy of a layer gone, and object storage lost the layer too,
/// so it cannot read through): reads through the router never see the 404, whichever
/// replica the rotation picks first; the router asks the partner.
#[tokio::test(flavor = "multi_thread")]
async fn one_replicas_hole_never_reaches_a_client() {
    let opts = ClusterOpts {
        scrub_bytes_per_sec: 0,
        ..ClusterOpts::default()
    };
    let c = ClusterProc::start_with(1, opts).await;
    let oci = c.router(0);
    let pushed = try_push_image(
        &oci,
        "holes/prod",
        "v1",
        &layer_for("holes-layer", 16 * 1024),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let layer = pushed.blobs[1].clone();
    let hex = layer.trim_start_matches("sha256:").to_owned();
    let replicas = c.replicas(0, "holes/prod").await;
    let holed = c.node(&replicas[0]);
    std::fs::remove_file(holed.data.join("blobs/sha256").join(&hex[..2]).join(&hex))
        .expect("remove the replica's copy");
    c.s3_delete(&blob_key(&layer)).await;
    let direct = holed
        .client()
        .http
        .get(holed.client().url(&format!("/v2/holes/prod/blobs/{layer}")))
        .send()
        .await
        .expect("GET");
    assert_eq!(direct.status(), 404, "the hole is real");
    for round in 0..6 {
        let r = oci
            .http
            .get(oci.url(&format!("/v2/holes/prod/blobs/{layer}")))
            .send()
            .await
            .expect("GET");
        assert_eq!(r.status(), 200, "round {round}");
        let body = r.bytes().await.expect("body");
        assert_eq!(crate::support::sha256(&body), layer);
    }
    let retries = crate::support::metric_sum(
        &c.routers[0].url(),
        "flotilla_router_blob_404_retries_total",
    )
    .await;
    assert!(
        retries >= 1.0,
        "the router never asked the partner: {retries}"
    );
}

/// Push an image whose layer is `big` into `repo` through router 0 and wait until both
/// replicas hold the layer on disk (the partner is warmed after the push); returns the
/// layer's digest and the replicas.
async fn push_to_both_replicas(c: &ClusterProc, repo: &str, big: &[u8]) -> (String, Vec<String>) {
    let pushed = try_push_image(&c.router(0), repo, "v1", big)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let layer = pushed.blobs[1].clone();
    let replicas = c.replicas(0, repo).await;
    poll("both replicas to hold the layer", FAULT_TIMEOUT, || async {
        replicas
            .iter()
            .all(|r| c.node(r).has_blob(&layer))
            .then_some(())
    })
    .await;
    (layer, replicas)
}

/// A replica killed while it streams a large blob to a client: the router resumes the body
/// from the partner at the byte where it was cut, and the client gets the whole, correct
/// blob without seeing the failure.
#[tokio::test(flavor = "multi_thread")]
async fn a_blob_stream_cut_mid_body_is_resumed_from_the_partner() {
    let mut c = ClusterProc::start_with(1, ClusterOpts::default()).await;
    let oci = c.router(0);
    let big = layer_for("cut-layer", 64 << 20);
    let (layer, replicas) = push_to_both_replicas(&c, "cut/prod", &big).await;
    let blob_gets = |c: &ClusterProc| {
        let urls: Vec<(String, String)> = replicas
            .iter()
            .map(|r| (r.clone(), c.node(r).url()))
            .collect();
        async move {
            let mut out = Vec::new();
            for (id, url) in urls {
                let text = reqwest::get(format!("{url}/metrics"))
                    .await
                    .expect("metrics")
                    .text()
                    .await
                    .expect("text");
                let n: f64 = text
                    .lines()
                    .filter(|l| {
                        l.starts_with("flotilla_node_requests_total")
                            && l.contains("method=\"GET\"")
                            && l.contains("route=\"blob\"")
                    })
                    .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                    .sum();
                out.push((id, n));
            }
            out
        }
    };
    let before = blob_gets(&c).await;
    let mut resp = oci
        .http
        .get(oci.url(&format!("/v2/cut/prod/blobs/{layer}")))
        .send()
        .await
        .expect("GET");
    assert_eq!(resp.status(), 200);
    let mut got = resp
        .chunk()
        .await
        .expect("first chunk")
        .expect("some bytes")
        .to_vec();
    let after = blob_gets(&c).await;
    let serving = before
        .iter()
        .zip(&after)
        .find(|((_, a), (_, b))| b > a)
        .map(|((id, _), _)| id.clone())
        .expect("a replica served the GET");
    c.kill9(&serving);
    while let Some(chunk) = resp.chunk().await.expect("the body must not break") {
        got.extend_from_slice(&chunk);
    }
    assert_eq!(got.len(), big.len());
    assert_eq!(crate::support::sha256(&got), layer);
    let resumed = crate::support::metric_sum(
        &c.routers[0].url(),
        "flotilla_router_blob_streams_resumed_total",
    )
    .await;
    assert!(
        resumed >= 1.0,
        "cut after {} bytes but not resumed",
        got.len()
    );
}

/// PUT `manifest` as `repo:tag` through `oci`, returning the status and how long it took.
async fn put_manifest_timed(
    oci: &crate::support::Oci,
    repo: &str,
    tag: &str,
    manifest: &str,
) -> (u16, Duration, String) {
    let t0 = Instant::now();
    let r = oci
        .http
        .put(oci.url(&format!("/v2/{repo}/manifests/{tag}")))
        .header("content-type", OCI_MANIFEST)
        .body(manifest.to_owned())
        .send()
        .await
        .expect("PUT manifest");
    let took = t0.elapsed();
    (
        r.status().as_u16(),
        took,
        r.text().await.unwrap_or_default(),
    )
}

/// The metadata store (a real etcd) frozen, then killed. A tag write is acknowledged only
/// once it is committed in the shard record (in-sync replicas), so with the store gone it
/// is refused with a clear 503 within the commit deadline, never hangs and never gets a
/// 201 a replica could contradict; reads keep working (tags already written read back at
/// once, the router no longer trusting its manifest cache), a new key fails fast with 503,
/// and once the store is back writes and placements work again without a restart, with no
/// write that was refused having become visible as a half-state (the retried writes land).
#[tokio::test(flavor = "multi_thread")]
async fn metadata_store_frozen_or_killed_fails_writes_fast_and_keeps_reads() {
    let opts = ClusterOpts {
        etcd: true,
        ..ClusterOpts::default()
    };
    let mut c = ClusterProc::start_with(1, opts).await;
    let oci = c.router(0);
    let layer = layer_for("meta-layer", 8192);
    let p = try_push_image(&oci, "meta/prod", "v1", &layer)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let config_len = c.s3_get(&blob_key(&p.blobs[0])).await.len();
    let manifest = image_manifest(&p.blobs[0], config_len, &p.blobs[1], layer.len());
    // Warm the router's cache for the tag.
    let mut moved = p.clone();
    moved.tag = "moving".into();
    let (s, _, body) = put_manifest_timed(&oci, "meta/prod", "moving", &manifest).await;
    assert_eq!(s, 201, "{body}");
    try_pull(&oci, &moved)
        .await
        .unwrap_or_else(|e| panic!("{e}"));

    let etcd = c.etcd.as_mut().expect("etcd");
    etcd.freeze(true);
    for (i, tag) in ["f1", "f2"].iter().enumerate() {
        let (s, took, body) = put_manifest_timed(&oci, "meta/prod", tag, &manifest).await;
        eprintln!("tag write {i} with etcd frozen: {s} in {took:?}: {body}");
        assert_eq!(s, 503, "{body}");
        assert!(body.contains("UNAVAILABLE"), "{body}");
        assert!(took < Duration::from_secs(4), "tag write took {took:?}");
    }
    // Reads of what was acknowledged before the freeze go on.
    for q in [&p, &moved] {
        try_pull(&oci, q).await.unwrap_or_else(|e| panic!("{e}"));
    }
    let t0 = Instant::now();
    let err = try_push_image(&oci, "brandnew/prod", "v1", &layer_for("new", 512))
        .await
        .expect_err("a new key placed with the metadata store frozen");
    eprintln!(
        "new key with etcd frozen failed after {:?}: {err}",
        t0.elapsed()
    );
    assert!(t0.elapsed() < Duration::from_secs(4), "{:?}", t0.elapsed());
    assert!(err.contains("503"), "{err}");

    let etcd = c.etcd.as_mut().expect("etcd");
    etcd.freeze(false);
    etcd.kill9();
    let (s, took, body) = put_manifest_timed(&oci, "meta/prod", "k1", &manifest).await;
    eprintln!("tag write with etcd killed: {s} in {took:?}");
    assert_eq!(s, 503, "{body}");
    assert!(took < Duration::from_secs(4), "tag write took {took:?}");
    try_pull(&oci, &p).await.unwrap_or_else(|e| panic!("{e}"));

    c.etcd.as_mut().expect("etcd").restart().await;
    push_eventually(
        &oci,
        "a new key to be placed once etcd is back",
        "brandnew/prod",
        "v1",
        "new",
        512,
    )
    .await;
    // The client's retries of the refused writes land, and read back.
    for tag in ["f1", "f2", "k1"] {
        let (s, _, body) = put_manifest_timed(&oci, "meta/prod", tag, &manifest).await;
        assert_eq!(s, 201, "{body}");
    }
    for tag in ["v1", "moving", "f1", "f2", "k1"] {
        let mut q = p.clone();
        q.tag = tag.into();
        try_pull(&oci, &q).await.unwrap_or_else(|e| panic!("{e}"));
    }
}

/// A large blob corrupted on one replica: a read that lands on it is cut short before its
/// last chunk (the node verifies while it streams), never completed with wrong bytes, and
/// the cut is counted by the router; the file is quarantined and fetched again, every later
/// read is whole and correct, and the quarantine is trimmed to its bounds (here a cap of 0
/// bytes) with the deletion counted.
#[tokio::test(flavor = "multi_thread")]
async fn corrupt_large_blob_is_never_served_wrong_and_the_quarantine_is_bounded() {
    let opts = ClusterOpts {
        scrub_bytes_per_sec: 0,
        // The trim runs with the upload purge, every second here; keep no quarantined bytes.
        node_args: ["--upload-max-age-secs", "1", "--quarantine-max-bytes", "0"]
            .map(String::from)
            .to_vec(),
        ..ClusterOpts::default()
    };
    let c = ClusterProc::start_with(1, opts).await;
    let oci = c.router(0);
    let big = layer_for("corrupt-layer", 16 << 20);
    let (layer, replicas) = push_to_both_replicas(&c, "rot/prod", &big).await;
    let bad = &replicas[0];
    let hex = layer.trim_start_matches("sha256:");
    let path = c
        .node(bad)
        .data
        .join("blobs/sha256")
        .join(&hex[..2])
        .join(hex);
    let mut bytes = std::fs::read(&path).expect("read blob");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&path, &bytes).expect("corrupt blob");
    let mut rounds = 0;
    while c.node_metric(bad, "flotilla_node_read_corrupt_total").await < 1.0 {
        rounds += 1;
        assert!(rounds <= 8, "the corrupt replica was never read");
        let r = oci
            .http
            .get(oci.url(&format!("/v2/rot/prod/blobs/{layer}")))
            .send()
            .await
            .expect("GET");
        assert_eq!(r.status(), 200);
        // Cut short is allowed (that read met the corruption); complete and wrong is not.
        if let Ok(body) = r.bytes().await {
            assert_eq!(body.len(), big.len(), "round {rounds}");
            assert_eq!(crate::support::sha256(&body), layer, "round {rounds}");
        }
    }
    let cut = crate::support::metric_sum(
        &c.routers[0].url(),
        "flotilla_router_upstream_bodies_cut_total",
    )
    .await;
    assert!(cut >= 1.0, "the cut was not counted: {cut}");
    for round in 0..4 {
        let r = oci
            .http
            .get(oci.url(&format!("/v2/rot/prod/blobs/{layer}")))
            .send()
            .await
            .expect("GET");
        let body = r.bytes().await.expect("healed: the body must not break");
        assert_eq!(
            crate::support::sha256(&body),
            layer,
            "after healing, round {round}"
        );
    }
    poll("the quarantine to be trimmed", FAULT_TIMEOUT, || async {
        let deleted = c
            .node_metric(bad, "flotilla_node_quarantine_deleted_total")
            .await;
        (deleted >= 1.0 && files_under(&c.node(bad).data.join("quarantine")) == 0).then_some(())
    })
    .await;
}

/// One replica of a key frozen (SIGSTOP: connections accepted, nothing answered): a tag
/// write through the router is answered within its per-attempt bound (the frozen replica is
/// then ejected and later writes are fast), and every manifest read right after a write (a
/// cache miss, since the write bumped the epoch) is answered in well under a second, hedged
/// to the partner.
#[tokio::test(flavor = "multi_thread")]
async fn a_frozen_replica_costs_reads_well_under_a_second_and_writes_a_bounded_time() {
    let c = ClusterProc::start_with(1, ClusterOpts::default()).await;
    let oci = c.router(0);
    let layer = layer_for("frozen-replica", 4096);
    let p = try_push_image(&oci, "stall/prod", "v1", &layer)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let config_len = c.s3_get(&blob_key(&p.blobs[0])).await.len();
    let manifest = image_manifest(&p.blobs[0], config_len, &p.blobs[1], layer.len());
    let replicas = c.replicas(0, "stall/prod").await;
    let frozen = c.node(&replicas[0]).pid();
    signal(frozen, "-STOP");
    // Reads the cache has never seen (each listing query is its own entry), one after the
    // other until one started at the frozen replica (the router rotates the first replica
    // per read); every one is answered in well under a second, the frozen one by the hedge.
    let mut hedged = 0.0;
    for n in 1..=8 {
        let path = format!("/v2/stall/prod/tags/list?n={n}");
        let t0 = Instant::now();
        let r = oci.http.get(oci.url(&path)).send().await.expect("GET");
        let took = t0.elapsed();
        eprintln!(
            "GET {path} with a replica frozen: {} in {took:?}",
            r.status()
        );
        assert_eq!(r.status(), 200, "{path}");
        assert!(took < Duration::from_secs(1), "{path} took {took:?}");
        hedged =
            crate::support::metric_sum(&c.routers[0].url(), "flotilla_router_hedged_reads_total")
                .await;
        if hedged >= 1.0 {
            break;
        }
    }
    assert!(hedged >= 1.0, "no read was hedged in 8 reads");
    let mut slowest_read = Duration::ZERO;
    for i in 0..6 {
        let tag = format!("t{i}");
        let (s, took, body) = put_manifest_timed(&oci, "stall/prod", &tag, &manifest).await;
        eprintln!("tag write {i} with a replica frozen: {s} in {took:?}");
        assert_eq!(s, 201, "{body}");
        // The first write waits out its attempt on the frozen replica (5 s), which is then
        // lagging: later writes go to the partner alone.
        let bound = if i == 0 { 6 } else { 2 };
        assert!(took < Duration::from_secs(bound), "write {i} took {took:?}");
        let t0 = Instant::now();
        let mut q = p.clone();
        q.tag = tag;
        try_pull(&oci, &q).await.unwrap_or_else(|e| panic!("{e}"));
        slowest_read = slowest_read.max(t0.elapsed());
    }
    eprintln!("slowest pull (manifest + 2 blobs) with a replica frozen: {slowest_read:?}");
    assert!(slowest_read < Duration::from_secs(1), "{slowest_read:?}");
    signal(frozen, "-CONT");
}

/// Object storage that lost a repository (a bucket emptied or recreated, a bad restore: the
/// compose S3 kill drill's moto restarts empty) deleted nothing: a replica's catch-up keeps
/// that repository's tags. It used to delete every one of them, after which the replica,
/// back in sync, answered 404 for acknowledged images. A tag really deleted (the catalog
/// entry still there) is still caught up.
#[tokio::test(flavor = "multi_thread")]
async fn catch_up_keeps_what_object_storage_lost() {
    let c = ClusterProc::start(1).await;
    let oci = c.router(0);
    let lost = crate::cluster_support::push_image(&oci, "lost/prod", "v1").await;
    crate::cluster_support::push_image(&oci, "kept/prod", "v1").await;
    crate::cluster_support::push_image(&oci, "kept/prod", "v2").await;
    // An untag this node missed, as object storage shows it; and the loss of lost/prod.
    c.s3_delete("repos/kept/prod/tags/v2").await;
    let keys = c.s3_shard_keys("lost/prod").await;
    assert!(keys.iter().any(|k| k.contains("/tags/v1")), "{keys:?}");
    for k in &keys {
        c.s3_delete(k).await;
    }
    c.s3_delete("catalog/lost/prod/_repo").await;
    let http = reqwest::Client::new();
    for id in ["n1", "n2", "n3"] {
        let r = http
            .post(format!("{}/internal/v1/catch-up", c.node(id).url()))
            .header(
                registry_client::internal::SECRET_HEADER,
                crate::cluster_support::CLUSTER_SECRET,
            )
            .timeout(Duration::from_secs(30))
            .send()
            .await
            .expect("catch-up");
        assert_eq!(r.status(), 200, "catch-up on {id}");
    }
    let tag = |repo: &str, t: &str| format!("/v2/{repo}/manifests/{t}");
    for id in c.replicas(0, "lost/prod").await {
        let r = c
            .node(&id)
            .client()
            .http
            .get(c.node(&id).client().url(&tag("lost/prod", "v1")))
            .header("accept", OCI_MANIFEST)
            .send()
            .await
            .expect("GET");
        assert_eq!(r.status(), 200, "lost/prod:v1 on {id} after the catch-up");
        let body = r.bytes().await.expect("body");
        assert_eq!(crate::support::sha256(&body), lost.manifest, "on {id}");
    }
    for id in c.replicas(0, "kept/prod").await {
        let n = c.node(&id).client();
        assert_eq!(n.get(&tag("kept/prod", "v1")).await.status(), 200, "{id}");
        assert_eq!(
            n.get(&tag("kept/prod", "v2")).await.status(),
            404,
            "the untag reached {id}"
        );
    }
}

/// A tag one replica lacks (it was written while the replica lagged, and object storage has
/// since lost it: the compose S3 kill drill) is served from the partner, never a 404:
/// routers ask every replica before a manifest 404, as they do for blobs.
#[tokio::test(flavor = "multi_thread")]
async fn one_replicas_missing_tag_never_reaches_a_client() {
    let mut c = ClusterProc::start(1).await;
    // No manifest cache on this router: every round must reach a replica.
    let uncached = c.add_router(&["--manifest-cache-mib", "0"]).await;
    let oci = c.router(uncached);
    let pushed = try_push_image(&oci, "tagholes/prod", "v1", &layer_for("tagholes", 4096))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let replicas = c.replicas(0, "tagholes/prod").await;
    let holed = c.node(&replicas[0]);
    std::fs::remove_file(holed.data.join("repos/tagholes/prod/_manifests/tags/v1"))
        .expect("remove the replica's tag");
    c.s3_delete("repos/tagholes/prod/tags/v1").await;
    let path = "/v2/tagholes/prod/manifests/v1";
    let direct = holed
        .client()
        .http
        .get(holed.client().url(path))
        .header("accept", OCI_MANIFEST)
        .send()
        .await
        .expect("GET");
    assert_eq!(direct.status(), 404, "the hole is real");
    let mut served_by = std::collections::BTreeSet::new();
    for round in 0..6 {
        let r = oci
            .http
            .get(oci.url(path))
            .header("accept", OCI_MANIFEST)
            .send()
            .await
            .expect("GET");
        assert_eq!(r.status(), 200, "round {round}");
        if let Some(n) = r.headers().get("x-flotilla-node") {
            served_by.insert(n.to_str().unwrap_or_default().to_owned());
        }
        let body = r.bytes().await.expect("body");
        assert_eq!(crate::support::sha256(&body), pushed.manifest);
    }
    assert_eq!(
        served_by.into_iter().collect::<Vec<_>>(),
        vec![replicas[1].clone()],
        "only the partner holds the tag"
    );
    // A tag no replica has is still a 404.
    let r = oci
        .http
        .get(oci.url("/v2/tagholes/prod/manifests/none"))
        .header("accept", OCI_MANIFEST)
        .send()
        .await
        .expect("GET");
    assert_eq!(r.status(), 404);
}
