//! `flotilla dev`, the README's first command: one process that must take a `docker push`
//! on a fresh machine, place it on a rack-aware pair, serve it back, and stop cleanly.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::clients::{docker_pull_same, docker_push_fresh};
use crate::cluster_support::{push_image, try_pull, CLUSTER_TIMEOUT};
use crate::support::{free_port, wait_http_ok, KillOnDrop, Oci};

#[tokio::test(flavor = "multi_thread")]
async fn dev_takes_a_docker_push_on_a_rack_aware_pair_and_stops_cleanly() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let mut dev = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_flotilla"))
            .args(["dev", "--listen", &format!("127.0.0.1:{port}"), "--data"])
            .arg(tmp.path().join("data"))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn flotilla dev"),
    );
    let url = format!("http://127.0.0.1:{port}");
    wait_http_ok(&format!("{url}/readyz"), CLUSTER_TIMEOUT).await;
    let oci = Oci::new(&url);

    // The Docker engine, as in the README.
    let pushed = docker_push_fresh(&format!("127.0.0.1:{port}"), "billing/api", tmp.path()).await;
    let (s, rec) = admin(&oci, "/shards/billing/api").await;
    assert_eq!(s, 200, "{rec}");
    let replicas: Vec<String> = rec["replicas"]
        .as_array()
        .expect("replicas")
        .iter()
        .map(|r| r.as_str().expect("id").to_owned())
        .collect();
    let (_, nodes) = admin(&oci, "/nodes").await;
    let rack = |id: &str| {
        nodes
            .as_array()
            .expect("nodes")
            .iter()
            .find(|n| n["id"] == id)
            .and_then(|n| n["rack"].as_str())
            .unwrap_or_else(|| panic!("no node {id} in {nodes}"))
            .to_owned()
    };
    assert_eq!(replicas.len(), 2, "RF=2: {rec}");
    assert_ne!(
        rack(&replicas[0]),
        rack(&replicas[1]),
        "a rack-aware pair: {rec}"
    );
    docker_pull_same(pushed).await;

    // And an image pushed and pulled over plain HTTP, every digest checked (reqwest follows
    // redirects: on a loopback listener dev sends blob GETs straight to a replica).
    let p = push_image(&oci, "billing/worker", "1").await;
    let follow = Oci {
        http: reqwest::Client::new(),
        ..oci.clone()
    };
    try_pull(&follow, &p)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let blob = oci
        .http
        .get(oci.url(&format!("/v2/billing/worker/blobs/{}", p.blobs[1])))
        .send()
        .await
        .expect("blob GET");
    assert_eq!(
        blob.status(),
        307,
        "--blob-redirect auto on a loopback listener"
    );

    // SIGTERM: the whole cluster stops within a bounded time.
    let child = &mut dev.0;
    let pid = child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill")
        .success());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            assert!(status.success(), "flotilla dev exited with {status}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "flotilla dev did not stop within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn admin(oci: &Oci, path: &str) -> (u16, Value) {
    let r = oci
        .http
        .get(oci.url(&format!("/admin/v1{path}")))
        .send()
        .await
        .expect("admin GET");
    let s = r.status().as_u16();
    (s, r.json().await.unwrap_or(Value::Null))
}
