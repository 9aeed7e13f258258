//! The docker-compose cluster (docker-compose.yml) as a test fixture, shared by the smoke
//! test (`compose`) and the fault drills (`drills`): the image built from this build's
//! binary, the stack up under a unique project name with random router ports, container
//! handles for `docker kill`/`start`/`network disconnect`, the admin API, and `down -v` plus
//! `rmi` on drop whatever happens.
//!
//! Compose tests take [`COMPOSE_LOCK`] for their whole life: two clusters of nine
//! containers at once on a 2-core machine would turn the drills' recovery figures into
//! figures of the other cluster's start-up.

#![allow(dead_code)]

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::clients::{blocking, unique};
use crate::support::{free_port, require_tool, run, run_out};

/// One compose cluster at a time in this test binary (module doc).
pub(crate) static COMPOSE_LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// How long a whole cluster may take to become ready (measured: ~15–30 s).
pub(crate) const UP_TIMEOUT: Duration = Duration::from_secs(180);

pub(crate) fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Poll `f` every 200 ms until it yields `Some`, or panic naming `what` after `within`.
pub(crate) async fn poll_for<T, F, Fut>(what: &str, within: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The compose project and the flotilla image made for it, removed on drop.
pub(crate) struct Project {
    pub(crate) name: String,
    pub(crate) image: String,
    pub(crate) secret: String,
    pub(crate) ports: [u16; 2],
    env: Vec<(String, String)>,
    /// A client for the admin API and readiness (3 s per request).
    pub(crate) http: reqwest::Client,
    _lock: Option<tokio::sync::MutexGuard<'static, ()>>,
}

impl Project {
    /// Build the image, bring the whole stack up and wait for both routers to be ready.
    /// `label` goes into the project and image names (with a unique suffix).
    pub(crate) async fn up(label: &str) -> Project {
        require_tool("docker");
        require_tool("docker-compose");
        require_tool("debootstrap");
        require_tool("strip");
        let lock = COMPOSE_LOCK.lock().await;
        let id = unique()
            .to_lowercase()
            .replace(|c: char| !c.is_ascii_alphanumeric(), "");
        let (p1, p2) = (free_port(), free_port());
        let project = Project {
            name: format!("flotilla{label}{id}"),
            image: format!("flotilla-e2e-{label}:{id}"),
            secret: format!("e2e-{id}"),
            ports: [p1, p2],
            env: vec![
                (
                    "FLOTILLA_IMAGE".into(),
                    format!("flotilla-e2e-{label}:{id}"),
                ),
                ("ROUTER1_PORT".into(), p1.to_string()),
                ("ROUTER2_PORT".into(), p2.to_string()),
                ("FLOTILLA_SECRET".into(), format!("e2e-{id}")),
            ],
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(3))
                .build()
                .expect("client"),
            _lock: Some(lock),
        };
        let ctx = tempfile::tempdir().expect("tempdir");
        let t0 = Instant::now();
        let (image, ctx_path) = (project.image.clone(), ctx.path().to_owned());
        blocking(move || build_image(&image, &ctx_path)).await;
        let built = t0.elapsed();
        let project = blocking(move || {
            run(project.compose().args(["up", "-d"]));
            project
        })
        .await;
        for i in 0..2 {
            wait_ready(&project.http, &project.router_url(i, "/readyz"), UP_TIMEOUT).await;
        }
        eprintln!(
            "compose {}: image built in {built:?}, cluster ready {:?} after that",
            project.name,
            t0.elapsed() - built
        );
        project
    }

    pub(crate) fn compose(&self) -> Command {
        let mut c = Command::new("docker-compose");
        c.current_dir(repo_root())
            .args(["-f", "docker-compose.yml", "-p", &self.name])
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        c
    }

    /// `http://127.0.0.1:<router i's port><path>`.
    pub(crate) fn router_url(&self, i: usize, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.ports[i])
    }

    /// `host:port` of router `i`, as docker names it in an image reference.
    pub(crate) fn router_host(&self, i: usize) -> String {
        format!("127.0.0.1:{}", self.ports[i])
    }

    /// The compose default network, which every service is on.
    pub(crate) fn network(&self) -> String {
        format!("{}_default", self.name)
    }

    /// The named volume of a service (`n1` → `<project>_n1`).
    pub(crate) fn volume(&self, name: &str) -> String {
        format!("{}_{name}", self.name)
    }

    /// The container id of `service` (`docker-compose ps -q`).
    pub(crate) async fn container(&self, service: &str) -> String {
        let mut cmd = self.compose();
        cmd.args(["ps", "-q", service]);
        let id = blocking(move || run(&mut cmd)).await.trim().to_owned();
        assert!(!id.is_empty(), "no container for {service}");
        id
    }

    /// `docker ARGS...` off the runtime; panics with its output on failure.
    pub(crate) async fn docker(&self, args: &[&str]) -> String {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        blocking(move || run(Command::new("docker").args(&args))).await
    }

    /// `docker-compose ARGS...` off the runtime; panics with its output on failure.
    pub(crate) async fn compose_run(&self, args: &[&str]) -> String {
        let mut cmd = self.compose();
        cmd.args(args);
        blocking(move || run(&mut cmd)).await
    }

    /// `docker inspect --format FORMAT` of `service`'s container.
    pub(crate) async fn inspect(&self, service: &str, format: &str) -> String {
        let id = self.container(service).await;
        let format = format.to_owned();
        blocking(move || {
            let out = Command::new("docker")
                .args(["inspect", "--format", &format, &id])
                .output()
                .expect("docker inspect");
            String::from_utf8_lossy(&out.stdout).trim().to_owned()
        })
        .await
    }

    /// Wait until `service`'s container is running and its health check says healthy.
    pub(crate) async fn wait_healthy(&self, service: &str, within: Duration) {
        let id = self.container(service).await;
        poll_for(&format!("{service} healthy"), within, || {
            let id = id.clone();
            async move {
                let s = blocking(move || {
                    let out = Command::new("docker")
                        .args([
                            "inspect",
                            "--format",
                            "{{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{end}}",
                            &id,
                        ])
                        .output()
                        .expect("docker inspect");
                    String::from_utf8_lossy(&out.stdout).trim().to_owned()
                })
                .await;
                (s == "running healthy").then_some(())
            }
        })
        .await;
    }

    /// `GET /admin/v1<path>` on router `i`; `None` on any failure (the router may be down).
    pub(crate) async fn try_admin(&self, i: usize, path: &str) -> Option<Value> {
        let r = self
            .http
            .get(self.router_url(i, &format!("/admin/v1{path}")))
            .send()
            .await
            .ok()?;
        if !r.status().is_success() {
            return None;
        }
        r.json().await.ok()
    }

    /// `GET /admin/v1<path>` on whichever router answers.
    pub(crate) async fn admin(&self, path: &str) -> Value {
        for i in 0..2 {
            if let Some(v) = self.try_admin(i, path).await {
                return v;
            }
        }
        panic!("GET /admin/v1{path}: neither router answered");
    }

    /// The shard records (`GET /admin/v1/shards`), from whichever router answers.
    pub(crate) async fn shards(&self) -> Vec<Value> {
        self.admin("/shards")
            .await
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// Whether every shard record naming `node` lists it in sync (not lagging, not
    /// syncing), as router `i` sees them; `None` when the router does not answer.
    pub(crate) async fn in_sync_on(&self, i: usize, node: &str) -> Option<bool> {
        let shards = self.try_admin(i, "/shards").await?;
        Some(shards.as_array()?.iter().all(|s| {
            ["lagging", "syncing"].iter().all(|f| {
                s[*f]
                    .as_array()
                    .is_none_or(|l| !l.iter().any(|n| n == node))
            })
        }))
    }

    /// The node view of `id` (`GET /admin/v1/nodes`) on router `i`.
    pub(crate) async fn node_view(&self, i: usize, id: &str) -> Option<Value> {
        let nodes = self.try_admin(i, "/nodes").await?;
        nodes.as_array()?.iter().find(|n| n["id"] == id).cloned()
    }

    /// Wait until both routers list `id` ready and live and every shard record lists it in
    /// sync; returns how long it took.
    pub(crate) async fn wait_node_serving(&self, id: &str, within: Duration) -> Duration {
        let t0 = Instant::now();
        poll_for(&format!("{id} ready, live and in sync"), within, || async {
            for i in 0..2 {
                let n = self.node_view(i, id).await?;
                if n["state"] != "ready" || n["live"] != true {
                    return None;
                }
                if !self.in_sync_on(i, id).await? {
                    return None;
                }
            }
            Some(())
        })
        .await;
        t0.elapsed()
    }

    /// A `GET` of `path` on node `service` itself, from inside its container (nodes are
    /// not published), with the cluster secret as a router sends it: status and body.
    pub(crate) async fn node_get(&self, service: &str, path: &str, accept: &str) -> (u16, Vec<u8>) {
        let id = self.container(service).await;
        let script = format!(
            "exec 3<>/dev/tcp/127.0.0.1/5000 && printf 'GET {path} HTTP/1.0\\r\\nHost: {service}\\r\\n{}: {}\\r\\nAccept: {accept}\\r\\n\\r\\n' >&3 && cat <&3",
            registry_client::internal::SECRET_HEADER,
            self.secret
        );
        let out = blocking(move || {
            run_out(Command::new("docker").args(["exec", &id, "bash", "-c", &script])).stdout
        })
        .await;
        let end = out
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .unwrap_or_else(|| panic!("no HTTP head from {service}: {out:?}"));
        let head = String::from_utf8_lossy(&out[..end]);
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad status line from {service}: {head}"));
        (status, out[end + 4..].to_vec())
    }
}

impl Drop for Project {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // The tail here, every line in target/compose-logs/<project>.log.
            if let Ok(out) = self.compose().args(["logs", "--no-color"]).output() {
                let dir = repo_root().join("target/compose-logs");
                let file = dir.join(format!("{}.log", self.name));
                if std::fs::create_dir_all(&dir)
                    .and_then(|()| std::fs::write(&file, &out.stdout))
                    .is_ok()
                {
                    eprintln!("compose logs: {}", file.display());
                }
                let text = String::from_utf8_lossy(&out.stdout);
                let lines: Vec<&str> = text.lines().collect();
                eprintln!("{}", lines[lines.len().saturating_sub(60)..].join("\n"));
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

/// The image the Dockerfile makes, from this build's binary (stripped: the context stays
/// small). The base images come from `deploy/prepare` (a no-op once they exist).
pub(crate) fn build_image(tag: &str, ctx: &Path) {
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

/// Poll `url` until it answers 2xx, or panic after `within`.
pub(crate) async fn wait_ready(http: &reqwest::Client, url: &str, within: Duration) {
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
