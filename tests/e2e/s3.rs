//! Object storage as the source of truth: write-through on every push, read-through on every
//! miss, against a real S3-compatible server (moto) and the `file://` store.

use futures::StreamExt;
use sha2::Digest as _;
use std::process::Command;

use crate::s3support::{s3_args, Moto, Proxy};
use crate::support::*;

const BUCKET: &str = "flotilla";

/// A node on `data` (inside `tmp`) storing through `endpoint`.
async fn s3_node(tmp: &tempfile::TempDir, name: &str, endpoint: &str) -> NodeProc {
    let n = NodeProc::spawn(
        tmp.path().join(name),
        free_port(),
        "n1",
        s3_args(endpoint, BUCKET, "reg"),
    );
    n.wait_ready().await;
    n
}

async fn wipe_and_restart(n: &mut NodeProc) {
    n.kill9();
    std::fs::remove_dir_all(&n.data).expect("wipe data dir");
    n.restart().await;
}

async fn metric(n: &NodeProc, name: &str) -> f64 {
    crate::support::metric_sum(&n.url(), name).await
}

#[tokio::test(flavor = "multi_thread")]
async fn wiped_node_serves_everything_from_s3_through_skopeo() {
    let moto = Moto::start(BUCKET).await;
    let tmp = tempfile::tempdir().unwrap();
    let mut n = s3_node(&tmp, "d", &moto.url()).await;
    let c = n.client();
    let mut images = Vec::new();
    for (i, repo) in ["billing/api", "billing/api/worker", "search/web"]
        .iter()
        .enumerate()
    {
        let layer: Vec<u8> = (0..(200_000 + i * 1_000_000))
            .map(|j| (j * (i + 3) % 251) as u8)
            .collect();
        let m = c.push_image(repo, "v1", &layer).await;
        images.push((repo.to_string(), m, layer));
    }
    wipe_and_restart(&mut n).await;
    assert!(files_under(&n.data.join("blobs")).is_empty());

    let skopeo = require_tool("skopeo");
    for (repo, manifest_digest, layer) in &images {
        let out = tempfile::tempdir().unwrap();
        let dest = out.path().join("img");
        let src = format!("docker://{}/{repo}:v1", n.host());
        let host = n.host();
        let dest2 = dest.clone();
        let skopeo = skopeo.clone();
        tokio::task::spawn_blocking(move || {
            run(Command::new(&skopeo)
                .args(["copy", "--src-tls-verify=false", &src])
                .arg(format!("dir:{}", dest2.display())))
        })
        .await
        .unwrap();
        let manifest = std::fs::read(dest.join("manifest.json")).unwrap();
        assert_eq!(
            &sha256(&manifest),
            manifest_digest,
            "{repo}: manifest bytes changed"
        );
        let layer_hex = sha256(layer).trim_start_matches("sha256:").to_owned();
        assert_eq!(
            std::fs::read(dest.join(&layer_hex)).unwrap(),
            *layer,
            "{repo}: layer bytes changed"
        );
        let _ = host;
    }
    // The local cache refilled: every blob and manifest is on disk again.
    let on_disk = files_under(&n.data.join("blobs"));
    assert_eq!(
        on_disk.len(),
        images.len() * 3,
        "config, layer and manifest per image: {on_disk:?}"
    );
}

/// A ready node whose object store is a directory under `tmp`; returns it and that directory.
async fn file_store_node(tmp: &tempfile::TempDir) -> (NodeProc, std::path::PathBuf) {
    let objects = tmp.path().join("objects");
    let n = NodeProc::spawn(
        tmp.path().join("d"),
        free_port(),
        "n1",
        vec!["--store".into(), format!("file://{}", objects.display())],
    );
    n.wait_ready().await;
    (n, objects)
}

/// The catalog lists one entry per repository (`catalog/<name>/_repo`, written before a
/// repository's first object) instead of every key under `repos/`; a store written before
/// entries existed is backfilled once, when a node catches up.
#[tokio::test]
async fn catalog_is_an_index_and_old_stores_are_backfilled() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut n, objects) = file_store_node(&tmp).await;
    let c = n.client();
    c.push_image("team/app", "1", b"catalog layer").await;
    c.push_image("team/app/worker", "1", b"nested layer").await;
    c.push_blob("blobs/only", b"a blob without a manifest")
        .await;
    let want = serde_json::json!(["blobs/only", "team/app", "team/app/worker"]);
    let entry = |name: &str| objects.join(format!("catalog/{name}/_repo"));
    for name in ["team/app", "team/app/worker", "blobs/only"] {
        assert!(entry(name).is_file(), "catalog entry of {name}");
    }
    assert!(objects.join("meta/catalog-v1-complete").is_file());
    let catalog = |c: crate::support::Oci| async move {
        let v: serde_json::Value = c.get("/v2/_catalog").await.json().await.unwrap();
        v["repositories"].clone()
    };
    assert_eq!(catalog(n.client()).await, want);
    // An entry the listing relies on: remove one and it is gone from the catalog (proof the
    // catalog is read from the index, not from `repos/`).
    std::fs::remove_file(entry("blobs/only")).unwrap();
    assert_eq!(
        catalog(n.client()).await,
        serde_json::json!(["team/app", "team/app/worker"])
    );
    // A store from before the catalog: no entries, no completion marker. A restarted node
    // backfills them from `repos/` before it is ready.
    std::fs::remove_dir_all(objects.join("catalog")).unwrap();
    std::fs::remove_file(objects.join("meta/catalog-v1-complete")).unwrap();
    n.kill9();
    n.restart().await;
    assert_eq!(catalog(n.client()).await, want);
    for name in ["team/app", "team/app/worker", "blobs/only"] {
        assert!(entry(name).is_file(), "backfilled entry of {name}");
    }
}

#[tokio::test]
async fn file_store_rebuilds_a_wiped_node() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut n, _) = file_store_node(&tmp).await;
    let c = n.client();
    let m = c.push_image("team/app", "1", b"file store layer").await;
    wipe_and_restart(&mut n).await;
    let r = c.get("/v2/team/app/manifests/1").await;
    assert_eq!(r.status(), 200);
    assert_eq!(sha256(&r.bytes().await.unwrap()), m);
    let v: serde_json::Value = c.get("/v2/team/app/tags/list").await.json().await.unwrap();
    assert_eq!(v["tags"], serde_json::json!(["1"]));
    let v: serde_json::Value = c.get("/v2/_catalog").await.json().await.unwrap();
    assert_eq!(v["repositories"], serde_json::json!(["team/app"]));
    let layer = sha256(b"file store layer");
    let r = c.get(&format!("/v2/team/app/blobs/{layer}")).await;
    assert_eq!(r.bytes().await.unwrap().as_ref(), b"file store layer");
}

/// Deterministic content of `len` bytes, streamed in 1 MiB chunks.
fn big_chunks(len: usize) -> impl Iterator<Item = Vec<u8>> {
    let mut block = vec![0u8; 1 << 20];
    for (i, b) in block.iter_mut().enumerate() {
        *b = (i.wrapping_mul(2654435761) >> 13) as u8;
    }
    (0..len.div_ceil(1 << 20)).map(move |i| {
        let n = (len - i * (1 << 20)).min(1 << 20);
        let mut c = block[..n].to_vec();
        c[0] = i as u8;
        c
    })
}

fn vm_hwm_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn large_blob_goes_up_multipart_with_bounded_memory() {
    const LEN: usize = 300 << 20;
    let moto = Moto::start(BUCKET).await;
    let tmp = tempfile::tempdir().unwrap();
    let n = s3_node(&tmp, "d", &moto.url()).await;
    let mut h = sha2::Sha256::new();
    for c in big_chunks(LEN) {
        h.update(&c);
    }
    let d = format!("sha256:{}", hex::encode(h.finalize()));
    let body = reqwest::Body::wrap_stream(futures::stream::iter(
        big_chunks(LEN).map(Ok::<_, std::io::Error>),
    ));
    let c = n.client();
    let r = c.post_blob("big", &d, body).await.unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap_or_default());

    // Multipart objects carry an ETag of the form "<md5>-<parts>".
    let key = format!("reg/blobs/sha256/{}", d.trim_start_matches("sha256:"));
    let head = object_store::ObjectStore::head(&moto.s3(BUCKET), &key.into())
        .await
        .expect("object");
    assert_eq!(head.size, LEN as u64);
    let etag = head.e_tag.unwrap_or_default();
    assert!(etag.contains('-'), "expected a multipart ETag, got {etag}");

    let peak_mib = vm_hwm_kib(n.child.id()) / 1024;
    println!("peak RSS of the node after a 300 MiB write-through push: {peak_mib} MiB");
    assert!(
        peak_mib < 160,
        "node memory grew to {peak_mib} MiB for a 300 MiB blob"
    );

    // And it streams back intact.
    let mut s = c.get(&format!("/v2/big/blobs/{d}")).await.bytes_stream();
    let mut h = sha2::Sha256::new();
    while let Some(chunk) = s.next().await {
        h.update(chunk.unwrap());
    }
    assert_eq!(format!("sha256:{}", hex::encode(h.finalize())), d);
}

#[tokio::test(flavor = "multi_thread")]
async fn object_storage_outage_fails_pushes_cleanly_and_keeps_serving_cache() {
    let moto = Moto::start(BUCKET).await;
    let proxy = Proxy::start(moto.port).await;
    let tmp = tempfile::tempdir().unwrap();
    let n = s3_node(&tmp, "d", &proxy.endpoint()).await;
    let c = n.client();
    let before = c.push_image("ops/app", "v1", b"acknowledged layer").await;

    proxy.set_down(true);
    let blob = b"pushed while storage is down".to_vec();
    let d = sha256(&blob);
    let started = std::time::Instant::now();
    let r = c.post_blob("ops/app", &d, blob.clone()).await.unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(error_code(r).await, "UNAVAILABLE");
    println!(
        "push refused after {:?} with storage down",
        started.elapsed()
    );
    // Nothing half-written: the repository does not claim the blob.
    let r = c
        .http
        .head(c.url(&format!("/v2/ops/app/blobs/{d}")))
        .send()
        .await
        .unwrap();
    assert_ne!(r.status(), 200);
    // Manifest pushes fail the same way.
    let m = c
        .get("/v2/ops/app/manifests/v1")
        .await
        .bytes()
        .await
        .unwrap();
    assert_eq!(
        sha256(&m),
        before,
        "cached manifest still served while storage is down"
    );
    let r = c.put_manifest("ops/app", "v2", OCI_MANIFEST, &m).await;
    assert_eq!(r.status(), 503);
    assert_eq!(error_code(r).await, "UNAVAILABLE");
    let r = c.get("/v2/ops/app/manifests/v2").await;
    assert_ne!(r.status(), 200, "an unacknowledged tag must not be served");
    assert!(!n.data.join("repos/ops/app/_manifests/tags/v2").exists());
    let layer = sha256(b"acknowledged layer");
    let r = c.get(&format!("/v2/ops/app/blobs/{layer}")).await;
    assert_eq!(r.bytes().await.unwrap().as_ref(), b"acknowledged layer");

    proxy.set_down(false);
    let r = c.post_blob("ops/app", &d, blob.clone()).await.unwrap();
    assert_eq!(
        r.status(),
        201,
        "the same push succeeds once storage is back"
    );
    let r = c.put_manifest("ops/app", "v2", OCI_MANIFEST, &m).await;
    assert_eq!(r.status(), 201);
    // Everything acknowledged is in object storage.
    let s3 = moto.s3(BUCKET);
    for key in [
        format!("reg/blobs/sha256/{}", d.trim_start_matches("sha256:")),
        format!(
            "reg/repos/ops/app/blobs/sha256/{}",
            d.trim_start_matches("sha256:")
        ),
        format!("reg/blobs/sha256/{}", layer.trim_start_matches("sha256:")),
        "reg/repos/ops/app/tags/v1".into(),
        "reg/repos/ops/app/tags/v2".into(),
    ] {
        let r = object_store::ObjectStore::head(&s3, &key.clone().into()).await;
        assert!(r.is_ok(), "{key} missing from object storage: {r:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn corrupt_objects_are_refused_never_cached_never_served() {
    let moto = Moto::start(BUCKET).await;
    let tmp = tempfile::tempdir().unwrap();
    let mut n = s3_node(&tmp, "d", &moto.url()).await;
    let c = n.client();
    let small: Vec<u8> = (0..100_000u32).map(|i| (i % 7) as u8).collect();
    let large: Vec<u8> = (0..(6 << 20) as u32).map(|i| (i % 13) as u8).collect();
    let ds = c.push_blob("x/y", &small).await;
    let dl = c.push_blob("x/y", &large).await;
    wipe_and_restart(&mut n).await;
    let s3 = moto.s3(BUCKET);
    for (d, bytes) in [(&ds, &small), (&dl, &large)] {
        let mut bad = bytes.clone();
        bad[bytes.len() / 2] ^= 0xff;
        let key = format!("reg/blobs/sha256/{}", d.trim_start_matches("sha256:"));
        object_store::ObjectStore::put(&s3, &key.into(), bad.into())
            .await
            .expect("tamper");
    }
    for _attempt in 0..2 {
        // Small: verified before the response starts, a clean JSON error.
        let r = c.get(&format!("/v2/x/y/blobs/{ds}")).await;
        assert_eq!(r.status(), 503);
        assert_eq!(error_code(r).await, "UNAVAILABLE");
        // Large: streamed, but the transfer is aborted before the last chunk.
        let r = c.get(&format!("/v2/x/y/blobs/{dl}")).await;
        if r.status() == 200 {
            let body = r.bytes().await;
            assert!(
                body.is_err(),
                "a corrupt blob was delivered in full ({} bytes)",
                body.map(|b| b.len()).unwrap_or(0)
            );
        } else {
            assert_eq!(r.status(), 503);
        }
        let cached = files_under(&n.data.join("blobs"));
        assert!(cached.is_empty(), "corrupt content was cached: {cached:?}");
    }
}

#[tokio::test]
async fn nodes_sharing_a_bucket_upload_each_blob_once() {
    let moto = Moto::start(BUCKET).await;
    let tmp = tempfile::tempdir().unwrap();
    let a = s3_node(&tmp, "a", &moto.url()).await;
    let b = s3_node(&tmp, "b", &moto.url()).await;
    let blob = vec![9u8; 1 << 20];
    a.client().push_blob("svc/one", &blob).await;
    b.client().push_blob("svc/two", &blob).await;
    assert_eq!(
        metric(&a, "flotilla_node_remote_blob_bytes_out_total").await,
        (1 << 20) as f64
    );
    assert_eq!(
        metric(&b, "flotilla_node_remote_blob_dedup_total").await,
        1.0
    );
    assert_eq!(
        metric(&b, "flotilla_node_remote_blob_bytes_out_total").await,
        0.0
    );
    // Both repositories are linked in object storage.
    let v: serde_json::Value = b.client().get("/v2/_catalog").await.json().await.unwrap();
    assert_eq!(v["repositories"], serde_json::json!(["svc/one", "svc/two"]));
}

#[tokio::test]
async fn restarted_node_catches_up_on_missed_tag_changes_before_ready() {
    let moto = Moto::start(BUCKET).await;
    let tmp = tempfile::tempdir().unwrap();
    let a = s3_node(&tmp, "a", &moto.url()).await;
    let mut b = s3_node(&tmp, "b", &moto.url()).await;
    let (ca, cb) = (a.client(), b.client());
    let m1 = ca.push_image("cu/app", "v1", b"first").await;
    ca.push_image("cu/app", "gone", b"doomed").await;
    // B caches both tags.
    for tag in ["v1", "gone"] {
        assert_eq!(
            cb.get(&format!("/v2/cu/app/manifests/{tag}"))
                .await
                .status(),
            200
        );
    }
    b.kill9();
    // While B is down: v1 moves, `gone` is deleted.
    let m2 = ca.push_image("cu/app", "v1", b"second").await;
    assert_ne!(m1, m2);
    let r = ca
        .http
        .delete(ca.url("/v2/cu/app/manifests/gone"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    b.restart().await;
    wait_http_ok(&format!("{}/readyz", b.url()), READY_TIMEOUT).await;
    let r = cb.get("/v2/cu/app/manifests/v1").await;
    assert_eq!(
        sha256(&r.bytes().await.unwrap()),
        m2,
        "stale tag served after restart"
    );
    assert_eq!(cb.get("/v2/cu/app/manifests/gone").await.status(), 404);
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_misses_make_one_fetch() {
    let moto = Moto::start(BUCKET).await;
    let tmp = tempfile::tempdir().unwrap();
    let mut n = s3_node(&tmp, "d", &moto.url()).await;
    let c = n.client();
    let big: Vec<u8> = (0..(12 << 20) as u32).map(|i| (i % 199) as u8).collect();
    let d = c.push_blob("sf/app", &big).await;
    wipe_and_restart(&mut n).await;
    let mut tasks = Vec::new();
    for i in 0..8 {
        let (c, d) = (c.clone(), d.clone());
        // Half whole-blob GETs (one of them leads the stream), half ranges (they wait).
        tasks.push(tokio::spawn(async move {
            let mut req = c.http.get(c.url(&format!("/v2/sf/app/blobs/{d}")));
            if i % 2 == 1 {
                req = req.header("range", "bytes=0-99");
            }
            let r = req.send().await.unwrap();
            (r.status().as_u16(), r.bytes().await.unwrap())
        }));
    }
    for t in tasks {
        let (status, body) = t.await.unwrap();
        match status {
            200 => assert_eq!(sha256(&body), d),
            206 => assert_eq!(&body[..], &big[..100]),
            s => panic!("unexpected status {s}"),
        }
    }
    assert_eq!(
        metric(&n, "flotilla_node_readthrough_fetches_total").await,
        1.0,
        "one fetch for eight concurrent misses"
    );
}
