//! Events are never lost: `flotilla dev --webhook` with the receiver down while images are
//! pushed, the whole process killed with SIGKILL, started again on the same data, and only
//! then the receiver up: every push arrives, at least once, in the order of each repository's
//! pushes, naming the manifest digest and tag the client was told.

use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::cluster_support::CLUSTER_TIMEOUT;
use crate::support::{free_port, wait_http_ok, KillOnDrop, Oci};

fn dev(data: &std::path::Path, hook: &str) -> (KillOnDrop, String) {
    let port = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_flotilla"))
        .args(["dev", "--listen", &format!("127.0.0.1:{port}"), "--data"])
        .arg(data)
        .args(["--webhook", hook, "--webhook-timeout-secs", "1"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn flotilla dev");
    (KillOnDrop(child), format!("http://127.0.0.1:{port}"))
}

/// Every event body the receiver accepted.
type Received = Arc<Mutex<Vec<Value>>>;

fn receiver(listener: TcpListener) -> Received {
    let got: Received = Arc::default();
    let g = got.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: axum::http::HeaderMap, body: String| {
            let g = g.clone();
            async move {
                assert_eq!(
                    headers["content-type"],
                    "application/vnd.docker.distribution.events.v2+json"
                );
                let v: Value = serde_json::from_str(&body).expect("envelope JSON");
                g.lock()
                    .unwrap()
                    .extend(v["events"].as_array().expect("events").iter().cloned());
                axum::http::StatusCode::OK
            }
        }),
    );
    listener.set_nonblocking(true).unwrap();
    let l = tokio::net::TcpListener::from_std(listener).unwrap();
    tokio::spawn(async move { axum::serve(l, app).await });
    got
}

async fn sinks(url: &str) -> Value {
    reqwest::get(format!("{url}/admin/v1/events/sinks"))
        .await
        .expect("GET sinks")
        .json()
        .await
        .expect("sinks JSON")
}

#[tokio::test(flavor = "multi_thread")]
async fn pushes_made_while_the_receiver_is_down_arrive_after_a_sigkill_and_restart() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    let hook_port = free_port();
    let hook = format!("http://127.0.0.1:{hook_port}/hook");

    let (mut first, url) = dev(&data, &hook);
    wait_http_ok(&format!("{url}/readyz"), CLUSTER_TIMEOUT).await;
    let oci = Oci::new(&url);
    // 20 pushes over two repositories, the receiver down throughout.
    let mut pushed: Vec<(String, String, String)> = Vec::new();
    for i in 0..20 {
        let repo = format!("events/r{}", i % 2);
        let tag = format!("t{i:02}");
        let digest = oci
            .push_image(&repo, &tag, format!("layer {i}").as_bytes())
            .await;
        pushed.push((repo, tag, digest));
    }
    let s = sinks(&url).await;
    assert_eq!(s[0]["pending"], 20, "{s}");
    assert!(s[0]["last_error"].is_string(), "the receiver is down: {s}");
    // SIGKILL: nothing gets to flush or say goodbye.
    first.0.kill().expect("kill -9");
    first.0.wait().expect("reap");

    let (_second, url) = dev(&data, &hook);
    wait_http_ok(&format!("{url}/readyz"), CLUSTER_TIMEOUT).await;
    let got = receiver(TcpListener::bind(("127.0.0.1", hook_port)).expect("bind the receiver"));

    let deadline = Instant::now() + Duration::from_secs(30);
    let pushes = loop {
        // First delivery of each event id (at least once: repeats are allowed).
        let mut seen = Vec::new();
        let mut ids = std::collections::HashSet::new();
        for e in got.lock().unwrap().iter() {
            if e["action"] == "push" && ids.insert(e["id"].as_str().unwrap_or("").to_owned()) {
                seen.push(e.clone());
            }
        }
        if seen.len() >= pushed.len() {
            break seen;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {} push events delivered within 30 s: {}",
            seen.len(),
            pushed.len(),
            sinks(&url).await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let as_sent: Vec<(String, String, String)> = pushes
        .iter()
        .map(|e| {
            let t = &e["target"];
            (
                t["repository"].as_str().unwrap_or("").to_owned(),
                t["tag"].as_str().unwrap_or("").to_owned(),
                t["digest"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    assert_eq!(
        as_sent, pushed,
        "every push, with the digest the client got, in order"
    );
    let first = &pushes[0];
    assert_eq!(
        first["target"]["mediaType"],
        "application/vnd.oci.image.manifest.v1+json"
    );
    assert!(first["target"]["size"].as_u64().unwrap_or(0) > 0, "{first}");
    assert!(first["timestamp"]
        .as_str()
        .is_some_and(|t| t.ends_with('Z')));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = sinks(&url).await;
        if s[0]["pending"] == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "still pending: {s}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The timeline shows the same events.
    let timeline: Value = reqwest::get(format!("{url}/admin/v1/events?since=0&limit=5"))
        .await
        .expect("GET events")
        .json()
        .await
        .expect("events JSON");
    assert_eq!(timeline.as_array().map(Vec::len), Some(5), "{timeline}");
    assert_eq!(timeline[0]["seq"], 1);
    assert_eq!(timeline[0]["event"]["id"], pushes[0]["id"]);
}
