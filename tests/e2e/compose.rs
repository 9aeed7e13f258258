//! The docker-compose cluster (docker-compose.yml) end to end: images from `deploy/prepare`
//! and this build's binary, the whole stack up under a unique project name, a `docker push`,
//! `rmi` and `pull` through router1, the shard map from router2, and `down -v` whatever happens.

use std::process::Command;

use crate::clients::{blocking, unique, DockerImages};
use crate::compose_support::Project;
use crate::support::*;

#[tokio::test(flavor = "multi_thread")]
async fn compose_cluster_push_rmi_pull() {
    let project = Project::up("e2e").await;
    let [p1, p2] = project.ports;
    let http = project.http.clone();
    let id = unique();

    let tmp = tempfile::tempdir().expect("tempdir");
    let tarball = tmp.path().join("rootfs.tar");
    std::fs::write(
        &tarball,
        tar_bytes(&[("app/README", format!("compose {id}\n").as_bytes())]),
    )
    .expect("tarball");
    let reference = format!("127.0.0.1:{p1}/billing/api:1");
    let via_router2 = format!("127.0.0.1:{p2}/billing/api:1");
    let guard = DockerImages(vec![reference.clone(), via_router2.clone()]);
    let inspect = |r: &str| {
        run(Command::new("docker").args(["image", "inspect", "--format", "{{.Id}}", r]))
            .trim()
            .to_owned()
    };
    let guard = blocking(move || {
        run(Command::new("docker")
            .arg("import")
            .arg(&tarball)
            .arg(&reference));
        let image_id = inspect(&reference);
        run(Command::new("docker").args(["push", &reference]));
        run(Command::new("docker").args(["rmi", &reference]));
        assert!(
            !Command::new("docker")
                .args(["image", "inspect", &reference])
                .output()
                .expect("docker")
                .status
                .success(),
            "{reference} still present after rmi"
        );
        run(Command::new("docker").args(["pull", &reference]));
        assert_eq!(inspect(&reference), image_id, "pulled through router1");
        // The other router serves the same cluster.
        run(Command::new("docker").args(["pull", &via_router2]));
        assert_eq!(inspect(&via_router2), image_id, "pulled through router2");
        guard
    })
    .await;

    // Two replicas in two racks: n3 is rack r2's only node, so it holds one of them.
    let get = |path: &str| {
        let (http, url) = (http.clone(), format!("http://127.0.0.1:{p2}{path}"));
        async move {
            let r = http.get(&url).send().await.expect("GET admin");
            assert!(r.status().is_success(), "{url}: {}", r.status());
            r.json::<serde_json::Value>().await.expect("admin JSON")
        }
    };
    let shards = get("/admin/v1/shards").await;
    let shard = shards
        .as_array()
        .and_then(|a| a.iter().find(|s| s["key"] == "billing/api"))
        .unwrap_or_else(|| panic!("no billing/api in {shards}"));
    let replicas = shard["replicas"].as_array().expect("replicas");
    assert_eq!(replicas.len(), 2, "{shard}");
    assert!(
        replicas.iter().any(|r| r == "n3"),
        "no replica in rack r2: {shard}"
    );
    let nodes = get("/admin/v1/nodes").await;
    assert_eq!(nodes.as_array().map(Vec::len), Some(3), "nodes: {nodes}");
    drop(guard);
    drop(project);
}
