//! The docker-compose cluster (docker-compose.yml) end to end: images from `deploy/prepare`
//! and this build's binary, the whole stack up under a unique project name, a `docker push`,
//! `rmi` and `pull` through router1, the shard map from router2, and `down -v` whatever happens.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::clients::{blocking, unique, DockerImages};
use crate::support::*;

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The compose project and the flotilla image made for it, removed on drop.
struct Project {
    name: String,
    image: String,
    env: Vec<(String, String)>,
}

impl Project {
    fn compose(&self) -> Command {
        let mut c = Command::new("docker-compose");
        c.current_dir(repo_root())
            .args(["-f", "docker-compose.yml", "-p", &self.name])
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        c
    }
}

impl Drop for Project {
    fn drop(&mut self) {
        if std::thread::panicking() {
            if let Ok(out) = self
                .compose()
                .args(["logs", "--no-color", "--tail", "40"])
                .output()
            {
                eprintln!("{}", String::from_utf8_lossy(&out.stdout));
            }
        }
        let _ = self
            .compose()
            .args(["down", "-v", "--remove-orphans", "-t", "5"])
            .output();
        let _ = Command::new("docker")
            .args(["rmi", "--force", &self.image])
            .output();
    }
}

/// The image the Dockerfile makes, from this build's binary (stripped: the context stays small).
fn build_image(tag: &str, ctx: &Path) {
    run(&mut Command::new(repo_root().join("deploy/prepare")));
    std::fs::create_dir_all(ctx.join("deploy")).expect("context dir");
    run(Command::new("strip")
        .arg("-o")
        .arg(ctx.join("flotilla"))
        .arg(env!("CARGO_BIN_EXE_flotilla")));
    std::fs::copy(repo_root().join("deploy/probe"), ctx.join("deploy/probe")).expect("probe");
    run(Command::new("docker")
        .args([
            "build",
            "-q",
            "-t",
            tag,
            "--build-arg",
            "BINARY=flotilla",
            "-f",
        ])
        .arg(repo_root().join("Dockerfile"))
        .arg(ctx));
}

async fn wait_ready(http: &reqwest::Client, url: &str, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let r = http.get(url).send().await;
        if matches!(&r, Ok(r) if r.status().is_success()) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{url} not ready within {within:?}: {r:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn compose_cluster_push_rmi_pull() {
    require_tool("docker");
    require_tool("docker-compose");
    require_tool("debootstrap");
    require_tool("strip");
    let id = unique()
        .to_lowercase()
        .replace(|c: char| !c.is_ascii_alphanumeric(), "");
    let (p1, p2) = (free_port(), free_port());
    let project = Project {
        name: format!("flotillae2e{id}"),
        image: format!("flotilla-e2e:{id}"),
        env: vec![
            ("FLOTILLA_IMAGE".into(), format!("flotilla-e2e:{id}")),
            ("ROUTER1_PORT".into(), p1.to_string()),
            ("ROUTER2_PORT".into(), p2.to_string()),
            ("FLOTILLA_SECRET".into(), format!("e2e-{id}")),
        ],
    };
    let ctx = tempfile::tempdir().expect("tempdir");
    let (image, ctx_path) = (project.image.clone(), ctx.path().to_owned());
    blocking(move || build_image(&image, &ctx_path)).await;
    let project = blocking(move || {
        run(project.compose().args(["up", "-d"]));
        project
    })
    .await;

    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(3))
        .build()
        .expect("client");
    for port in [p1, p2] {
        wait_ready(
            &http,
            &format!("http://127.0.0.1:{port}/readyz"),
            Duration::from_secs(120),
        )
        .await;
    }

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
