//! The control plane at fleet scale: records one build cannot read must not stop anything.

use std::time::Duration;

use crate::cluster_support::{poll, push_image, try_pull, try_push_image, ClusterProc};

/// A corrupt shard record and one from a future format version sit in the metadata store.
/// Routers (a running one and one started afterwards), nodes (restarted: membership and the
/// in-sync watch list every record) and pushes and pulls of every other key go on; the
/// admin API lists both records as unreadable; a push to the corrupt key is refused with
/// 503 rather than placed over it; and neither record is ever rewritten.
#[tokio::test(flavor = "multi_thread")]
async fn unreadable_records_are_skipped_reported_and_never_overwritten() {
    let mut c = ClusterProc::start(1).await;
    let oci = c.router(0);
    let before = push_image(&oci, "good/prod", "v1").await;

    let url: shardmap::MetaUrl = c.meta_url.parse().expect("meta url");
    let store = shardmap::open(&url).expect("open store");
    let corrupt_key = "flotilla/shards/broken~prod";
    let future_key = "flotilla/shards/future~prod";
    let corrupt = bytes::Bytes::from_static(b"{\"v\":1,\"key\":");
    let future = bytes::Bytes::from_static(
        br#"{"v":9,"key":"future/prod","replicas":["n1","n2"],"epoch":4,"created_ms":1,"quorum":"new"}"#,
    );
    store.put(corrupt_key, corrupt.clone()).await.expect("put");
    store.put(future_key, future.clone()).await.expect("put");

    // The running router keeps working, and says what it skipped.
    let unreadable = poll(
        "the router to report both records",
        Duration::from_secs(60),
        || async {
            let (s, v) = c.admin_get(0, "/unreadable").await;
            assert_eq!(s, 200);
            let keys: Vec<String> = v
                .as_array()
                .expect("array")
                .iter()
                .map(|u| u["key"].as_str().unwrap_or_default().to_owned())
                .collect();
            (keys.contains(&corrupt_key.to_owned()) && keys.contains(&future_key.to_owned()))
                .then_some(v)
        },
    )
    .await;
    let text = unreadable.to_string();
    assert!(text.contains("format version 9"), "{text}");
    try_pull(&oci, &before)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let other = push_image(&oci, "other/prod", "v1").await;

    // A router started now, and a node restarted now, come up with the records present.
    let r = c.add_router(&[]).await;
    let oci2 = c.router(r);
    try_pull(&oci2, &other)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    c.restart("n1").await;
    // (A push right after a node restart may meet a pooled connection to the old process
    // and get a 503 "retry the upload", as a client would: retried.)
    let third = poll(
        "a push after the restart",
        Duration::from_secs(30),
        || async {
            try_push_image(&oci2, "third/prod", "v1", b"third-layer")
                .await
                .ok()
        },
    )
    .await;
    try_pull(&oci, &third)
        .await
        .unwrap_or_else(|e| panic!("{e}"));

    // The corrupt key cannot be placed over; the future one is left to its newer writer.
    let err = try_push_image(&oci, "broken/prod", "v1", b"layer")
        .await
        .expect_err("a push to a key whose record is unreadable");
    assert!(err.contains("503"), "{err}");
    for (k, v) in [(corrupt_key, &corrupt), (future_key, &future)] {
        let (got, _) = store.get(k).await.expect("get").expect("still there");
        assert_eq!(&got, v, "{k} was rewritten");
    }
}

/// `flotilla router --drain-secs`: a client stalled in the middle of an upload body cannot
/// hold a router that was told to stop; it exits once the drain time is over.
#[tokio::test(flavor = "multi_thread")]
async fn router_shutdown_is_bounded_by_its_drain_time() {
    use tokio::io::AsyncWriteExt;
    let mut c = ClusterProc::start(0).await;
    let r = c.add_router(&["--drain-secs", "1"]).await;
    let oci = c.router(r);
    let start = oci
        .http
        .post(oci.url("/v2/drain/prod/blobs/uploads/"))
        .send()
        .await
        .expect("start upload");
    assert_eq!(start.status(), 202);
    let loc = start.headers()["location"].to_str().unwrap().to_owned();
    let path = loc
        .split_once("127.0.0.1")
        .map_or(loc.clone(), |(_, rest)| {
            rest.split_once('/')
                .map(|(_, p)| format!("/{p}"))
                .unwrap_or_default()
        });
    let mut s = tokio::net::TcpStream::connect(c.routers[r].host())
        .await
        .expect("connect");
    let head = format!(
        "PATCH {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/octet-stream\r\nContent-Length: 1048576\r\n\r\n",
        c.routers[r].host()
    );
    s.write_all(head.as_bytes()).await.expect("head");
    s.write_all(&[7u8; 4096]).await.expect("part of the body");
    // The upload is in flight on the node behind the router (its first bytes arrived).
    tokio::time::sleep(Duration::from_millis(300)).await; // pacing: let the bytes cross
    let pid = c.routers[r].child.id();
    crate::support::run(std::process::Command::new("kill").args(["-TERM", &pid.to_string()]));
    let t0 = std::time::Instant::now();
    let status = loop {
        if let Some(st) = c.routers[r].child.try_wait().expect("wait") {
            break st;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "router still running"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let took = t0.elapsed();
    eprintln!("router exited {took:?} after SIGTERM with a stalled upload: {status}");
    assert!(
        took >= Duration::from_millis(900),
        "exited before draining: {took:?}"
    );
    assert!(took < Duration::from_secs(5), "{took:?}");
    drop(s);
}
