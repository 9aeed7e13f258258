//! Multi-process cluster harness: real `flotilla node` processes (n1, n2 in rack r1; n3 in
//! r2), one or more `flotilla router` processes and optionally `flotilla seeder` processes
//! on free loopback ports, sharing an embedded (`file://`) metadata store in a temp dir and a
//! moto S3 object store (optionally behind a [`Proxy`] a test can cut). Readiness is polled
//! with bounded timeouts; every process is killed on drop.

#![allow(dead_code)]

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::s3support::{Moto, Proxy};
use crate::support::{free_port, sha256, Oci, OCI_MANIFEST};

pub(crate) const BUCKET: &str = "flotilla";
pub(crate) const PREFIX: &str = "reg";
pub(crate) const CLUSTER_TIMEOUT: Duration = Duration::from_secs(30);

/// The default topology: two racks, rack r2 holding a single node.
pub(crate) const TOPOLOGY: [(&str, &str); 3] = [("n1", "r1"), ("n2", "r1"), ("n3", "r2")];

/// Poll `f` until it yields `Some`, or panic with `what` after `timeout`.
pub(crate) async fn poll<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub(crate) struct ClusterNode {
    pub id: String,
    pub rack: String,
    pub port: u16,
    pub data: PathBuf,
    pub child: Option<Child>,
}

impl ClusterNode {
    pub(crate) fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// A client with the cluster's secret (a router's view of the node).
    pub(crate) fn client(&self) -> Oci {
        Oci::with_secret(&self.url(), CLUSTER_SECRET)
    }

    /// A client without the secret (an outside client's view of the node).
    pub(crate) fn anonymous(&self) -> Oci {
        Oci::new(&self.url())
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.as_ref().expect("node is running").id()
    }

    /// Whether this node's disk holds the blob `digest` (`sha256:<hex>`).
    pub(crate) fn has_blob(&self, digest: &str) -> bool {
        let hex = digest.strip_prefix("sha256:").expect("sha256 digest");
        self.data
            .join("blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .is_file()
    }
}

pub(crate) struct RouterProc {
    pub port: u16,
    pub child: Child,
}

impl RouterProc {
    pub(crate) fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub(crate) fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

/// The shared secret of the node-internal API in these clusters.
pub(crate) const CLUSTER_SECRET: &str = "cluster-test-secret";

/// Knobs of a cluster beyond the default topology.
#[derive(Clone, Debug)]
pub(crate) struct ClusterOpts {
    /// `flotilla seeder` processes to run (0: none, the nodes alone).
    pub seeders: usize,
    pub replace_after_secs: u64,
    /// Seeder pacing (0 = unpaced), to make a reseed last long enough to interfere with.
    pub seed_bytes_per_sec: u64,
    pub seed_concurrency: usize,
    /// Route every object-store connection (nodes and seeders) through a cuttable proxy.
    pub proxy: bool,
    pub scrub_bytes_per_sec: u64,
    pub scrub_interval_secs: u64,
    /// Nodes' sweep for data of shards moved away: interval and grace, in seconds.
    pub gc_interval_secs: u64,
    pub gc_grace_secs: u64,
    /// Nodes' `--remote-confirm-secs` (how long an upload proves an object exists).
    pub remote_confirm_secs: u64,
    /// Keep the shard map in a real etcd instead of the embedded file store.
    pub etcd: bool,
    /// Keep the shard map in the Consul stand-in (in this test process) instead.
    pub consul: bool,
    /// Further flags for every node.
    pub node_args: Vec<String>,
    /// `Authorization` for the helpers' admin calls (routers started with auth flags).
    pub admin_authorization: Option<String>,
}

impl Default for ClusterOpts {
    fn default() -> Self {
        ClusterOpts {
            seeders: 0,
            replace_after_secs: 600,
            seed_bytes_per_sec: 0,
            seed_concurrency: 4,
            proxy: false,
            scrub_bytes_per_sec: 8 * 1024 * 1024,
            scrub_interval_secs: 60,
            gc_interval_secs: 60,
            gc_grace_secs: 600,
            remote_confirm_secs: 60,
            etcd: false,
            consul: false,
            node_args: Vec::new(),
            admin_authorization: None,
        }
    }
}

pub(crate) struct SeederProc {
    pub id: String,
    pub child: Option<Child>,
}

pub(crate) struct ClusterProc {
    pub nodes: Vec<ClusterNode>,
    pub routers: Vec<RouterProc>,
    pub seeders: Vec<SeederProc>,
    pub opts: ClusterOpts,
    pub meta_url: String,
    pub store_url: String,
    pub proxy: Option<Proxy>,
    pub moto: Moto,
    pub etcd: Option<crate::etcdsupport::Etcd>,
    pub tmp: tempfile::TempDir,
    pub http: reqwest::Client,
}

fn log_file(path: &Path) -> std::fs::File {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .expect("log file")
}

impl ClusterProc {
    /// Three nodes (see [`TOPOLOGY`]) and `routers` routers, all ready.
    pub(crate) async fn start(routers: usize) -> ClusterProc {
        Self::start_with(routers, ClusterOpts::default()).await
    }

    /// Like [`ClusterProc::start`], with seeders and knobs from `opts`.
    pub(crate) async fn start_with(routers: usize, opts: ClusterOpts) -> ClusterProc {
        let moto = Moto::start(BUCKET).await;
        let tmp = tempfile::tempdir().expect("tempdir");
        let meta_dir = tmp.path().join("meta");
        std::fs::create_dir_all(&meta_dir).expect("meta dir");
        let etcd = if opts.etcd {
            Some(crate::etcdsupport::Etcd::start().await)
        } else {
            None
        };
        let meta_url = match &etcd {
            Some(e) => e.url(),
            None if opts.consul => {
                format!("consul://{}", crate::consul_standin::start_standin().await)
            }
            None => format!("file://{}", meta_dir.display()),
        };
        let proxy = if opts.proxy {
            Some(Proxy::start(moto.port).await)
        } else {
            None
        };
        let endpoint = proxy
            .as_ref()
            .map(Proxy::endpoint)
            .unwrap_or_else(|| moto.url());
        let store_url = format!("s3://{BUCKET}/{PREFIX}?endpoint={endpoint}&region=us-east-1");
        let mut c = ClusterProc {
            nodes: Vec::new(),
            routers: Vec::new(),
            seeders: Vec::new(),
            opts: opts.clone(),
            meta_url,
            store_url,
            proxy,
            moto,
            etcd,
            tmp,
            http: {
                let mut h = reqwest::header::HeaderMap::new();
                if let Some(a) = &opts.admin_authorization {
                    h.insert(reqwest::header::AUTHORIZATION, a.parse().expect("header"));
                }
                reqwest::Client::builder()
                    .timeout(Duration::from_secs(30))
                    .default_headers(h)
                    .build()
                    .expect("client")
            },
        };
        for (id, rack) in TOPOLOGY {
            let mut n = ClusterNode {
                id: id.to_owned(),
                rack: rack.to_owned(),
                port: free_port(),
                data: c.tmp.path().join(id),
                child: None,
            };
            n.child = Some(c.spawn_node(&n));
            c.nodes.push(n);
        }
        for _ in 0..routers {
            c.spawn_router(&[]);
        }
        for r in 0..c.routers.len() {
            c.wait_router_ready(r).await;
        }
        for i in 0..opts.seeders {
            let id = format!("s{}", i + 1);
            let child = c.spawn_seeder(&id);
            c.seeders.push(SeederProc {
                id,
                child: Some(child),
            });
        }
        c
    }

    fn spawn_seeder(&self, id: &str) -> Child {
        Command::new(env!("CARGO_BIN_EXE_flotilla"))
            .args([
                "seeder",
                "--meta",
                &self.meta_url,
                "--store",
                &self.store_url,
            ])
            .args(["--id", id])
            .arg("--replace-after-secs")
            .arg(self.opts.replace_after_secs.to_string())
            .arg("--seed-bytes-per-sec")
            .arg(self.opts.seed_bytes_per_sec.to_string())
            .arg("--seed-concurrency")
            .arg(self.opts.seed_concurrency.to_string())
            .args(["--rebalance-interval-secs", "1"])
            .env("FLOTILLA_SECRET", CLUSTER_SECRET)
            .env("RUST_LOG", "info")
            .env("AWS_ACCESS_KEY_ID", "flotilla-test")
            .env("AWS_SECRET_ACCESS_KEY", "flotilla-test")
            .stdout(Stdio::null())
            .stderr(log_file(&self.tmp.path().join(format!("seeder-{id}.log"))))
            .spawn()
            .expect("spawn flotilla seeder")
    }

    /// Start one more router with `extra` flags; returns its index once it is ready.
    pub(crate) async fn add_router(&mut self, extra: &[&str]) -> usize {
        self.spawn_router(extra);
        let r = self.routers.len() - 1;
        self.wait_router_ready(r).await;
        r
    }

    /// Until router `r` answers `/readyz` and sees every node live.
    async fn wait_router_ready(&self, r: usize) {
        crate::support::wait_http_ok(
            &format!("{}/readyz", self.routers[r].url()),
            CLUSTER_TIMEOUT,
        )
        .await;
        for (id, _) in TOPOLOGY {
            self.wait_node_live(r, id).await;
        }
    }

    fn spawn_router(&mut self, extra: &[&str]) {
        let port = free_port();
        let child = Command::new(env!("CARGO_BIN_EXE_flotilla"))
            .args(["router", "--meta", &self.meta_url])
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log_file(
                &self
                    .tmp
                    .path()
                    .join(format!("router{}.log", self.routers.len())),
            ))
            .env("FLOTILLA_SECRET", CLUSTER_SECRET)
            .spawn()
            .expect("spawn flotilla router");
        self.routers.push(RouterProc { port, child });
    }

    /// SIGKILL seeder `id`.
    pub(crate) fn kill_seeder(&mut self, id: &str) {
        let s = self
            .seeders
            .iter_mut()
            .find(|s| s.id == id)
            .unwrap_or_else(|| panic!("no seeder {id}"));
        if let Some(mut c) = s.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Start a new node `id` in `rack` (not waiting for it).
    pub(crate) fn add_node(&mut self, id: &str, rack: &str) {
        let mut n = ClusterNode {
            id: id.to_owned(),
            rack: rack.to_owned(),
            port: free_port(),
            data: self.tmp.path().join(id),
            child: None,
        };
        n.child = Some(self.spawn_node(&n));
        self.nodes.push(n);
    }

    /// SIGKILL `id`, delete its whole data directory (identity file included) and start it
    /// again under the same id and port, without waiting: it comes back as seeding.
    pub(crate) fn wipe_and_restart(&mut self, id: &str) {
        self.kill9(id);
        let data = self.node(id).data.clone();
        std::fs::remove_dir_all(&data).expect("wipe data dir");
        let child = self.spawn_node(self.node(id));
        self.node_mut(id).child = Some(child);
    }

    /// The state router `router` lists for `id` (`None` when unregistered).
    pub(crate) async fn node_state(&self, router: usize, id: &str) -> Option<String> {
        self.admin_node(router, id)
            .await
            .map(|n| n["state"].as_str().unwrap_or_default().to_owned())
    }

    /// `GET /admin/v1/reseed`.
    pub(crate) async fn reseed_status(&self, router: usize) -> Value {
        let (s, v) = self.admin_get(router, "/reseed").await;
        assert_eq!(s, 200, "{v}");
        v
    }

    /// The reseed record of `node`, if any.
    pub(crate) async fn reseed_of(&self, router: usize, node: &str) -> Option<Value> {
        let v = self.reseed_status(router).await;
        v["reseeds"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|r| r["node"] == node)
            .cloned()
    }

    fn spawn_node(&self, n: &ClusterNode) -> Child {
        self.spawn_node_with(n, &[])
    }

    fn spawn_node_with(&self, n: &ClusterNode, extra: &[&str]) -> Child {
        Command::new(env!("CARGO_BIN_EXE_flotilla"))
            .args(["node", "--id", &n.id, "--rack", &n.rack])
            .arg("--listen")
            .arg(format!("127.0.0.1:{}", n.port))
            .arg("--advertise")
            .arg(n.url())
            .arg("--data")
            .arg(&n.data)
            .args(["--meta", &self.meta_url, "--store", &self.store_url])
            .args(["--drain-secs", "5"])
            .arg("--scrub-bytes-per-sec")
            .arg(self.opts.scrub_bytes_per_sec.to_string())
            .arg("--scrub-interval-secs")
            .arg(self.opts.scrub_interval_secs.to_string())
            // Every pass checks object storage here: the tests are about what a check finds.
            .args(["--scrub-remote-check-every", "1"])
            .arg("--gc-interval-secs")
            .arg(self.opts.gc_interval_secs.to_string())
            .arg("--gc-grace-secs")
            .arg(self.opts.gc_grace_secs.to_string())
            .arg("--remote-confirm-secs")
            .arg(self.opts.remote_confirm_secs.to_string())
            .args(&self.opts.node_args)
            .args(extra)
            .env("FLOTILLA_SECRET", CLUSTER_SECRET)
            .env("RUST_LOG", "info")
            .env("AWS_ACCESS_KEY_ID", "flotilla-test")
            .env("AWS_SECRET_ACCESS_KEY", "flotilla-test")
            .stdout(Stdio::null())
            .stderr(log_file(&self.tmp.path().join(format!("{}.log", n.id))))
            .spawn()
            .expect("spawn flotilla node")
    }

    pub(crate) fn node(&self, id: &str) -> &ClusterNode {
        self.nodes
            .iter()
            .find(|n| n.id == id)
            .unwrap_or_else(|| panic!("no node {id}"))
    }

    fn node_mut(&mut self, id: &str) -> &mut ClusterNode {
        self.nodes
            .iter_mut()
            .find(|n| n.id == id)
            .unwrap_or_else(|| panic!("no node {id}"))
    }

    pub(crate) fn router(&self, i: usize) -> Oci {
        Oci::new(&self.routers[i].url())
    }

    /// SIGKILL a node: no deregistration, its lease simply stops being renewed.
    pub(crate) fn kill9(&mut self, id: &str) {
        if let Some(mut c) = self.node_mut(id).child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM a node (graceful shutdown); returns once the process has exited.
    pub(crate) async fn sigterm(&mut self, id: &str) {
        let mut child = self.node_mut(id).child.take().expect("node is running");
        crate::support::run(Command::new("kill").args(["-TERM", &child.id().to_string()]));
        let deadline = Instant::now() + CLUSTER_TIMEOUT;
        loop {
            if let Some(status) = child.try_wait().expect("wait node") {
                assert!(
                    status.success(),
                    "node {id} exited with {status} on SIGTERM"
                );
                return;
            }
            assert!(Instant::now() < deadline, "node {id} ignored SIGTERM");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Start a (killed) node again on the same port and data dir; waits until every router
    /// lists it as live.
    pub(crate) async fn restart(&mut self, id: &str) {
        self.kill9(id);
        let child = self.spawn_node(self.node(id));
        self.node_mut(id).child = Some(child);
        for r in 0..self.routers.len() {
            self.wait_node_live(r, id).await;
        }
    }

    /// Start a (killed) node again with further flags, without waiting for it: a node that
    /// refuses writes (say) may never look healthy to the tests' readiness checks.
    pub(crate) fn respawn_with(&mut self, id: &str, extra: &[&str]) {
        self.kill9(id);
        let child = self.spawn_node_with(self.node(id), extra);
        self.node_mut(id).child = Some(child);
    }

    /// SIGKILL router `i` and start it again on the same port; waits until it is ready.
    pub(crate) async fn restart_router(&mut self, i: usize) {
        let _ = self.routers[i].child.kill();
        let _ = self.routers[i].child.wait();
        let port = self.routers[i].port;
        let child = Command::new(env!("CARGO_BIN_EXE_flotilla"))
            .args(["router", "--meta", &self.meta_url])
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log_file(&self.tmp.path().join(format!("router{i}.log"))))
            .env("FLOTILLA_SECRET", CLUSTER_SECRET)
            .spawn()
            .expect("spawn flotilla router");
        self.routers[i].child = child;
        self.wait_router_ready(i).await;
    }

    pub(crate) async fn admin_get(&self, router: usize, path: &str) -> (u16, Value) {
        let r = self
            .http
            .get(format!("{}/admin/v1{path}", self.routers[router].url()))
            .send()
            .await
            .expect("admin GET");
        let status = r.status().as_u16();
        let text = r.text().await.expect("admin body");
        let v = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("GET {path}: {status} not JSON ({e}): {text}"));
        (status, v)
    }

    /// `GET /admin/v1/nodes` on router `router`.
    pub(crate) async fn admin_nodes(&self, router: usize) -> Vec<Value> {
        let (s, v) = self.admin_get(router, "/nodes").await;
        assert_eq!(s, 200, "{v}");
        v.as_array().expect("nodes array").clone()
    }

    pub(crate) async fn admin_node(&self, router: usize, id: &str) -> Option<Value> {
        self.admin_nodes(router)
            .await
            .into_iter()
            .find(|n| n["id"] == id)
    }

    /// The replicas of `key` per `GET /admin/v1/shards/{key}`.
    pub(crate) async fn replicas(&self, router: usize, key: &str) -> Vec<String> {
        let (s, v) = self.admin_get(router, &format!("/shards/{key}")).await;
        assert_eq!(s, 200, "shard {key}: {v}");
        v["replicas"]
            .as_array()
            .expect("replicas")
            .iter()
            .map(|r| r.as_str().expect("node id").to_owned())
            .collect()
    }

    /// Wait until router `router` lists `id` as ready and live.
    pub(crate) async fn wait_node_live(&self, router: usize, id: &str) {
        poll(
            &format!("router {router} to list node {id} as ready and live"),
            CLUSTER_TIMEOUT,
            || async {
                let n = self.admin_node(router, id).await?;
                (n["state"] == "ready" && n["live"] == true).then_some(())
            },
        )
        .await
    }

    /// Wait until router `router` no longer lists `id`.
    pub(crate) async fn wait_node_gone(&self, router: usize, id: &str, timeout: Duration) {
        poll(
            &format!("router {router} to drop node {id}"),
            timeout,
            || async { self.admin_node(router, id).await.is_none().then_some(()) },
        )
        .await
    }

    /// Every key under `repos/<key>/` in object storage whose repository belongs to shard
    /// `key` (depth 2), relative to the store prefix.
    pub(crate) async fn s3_shard_keys(&self, key: &str) -> Vec<String> {
        use futures::TryStreamExt;
        let prefix = format!("{PREFIX}/repos/{key}/");
        let metas: Vec<_> =
            object_store::ObjectStore::list(&self.moto.s3(BUCKET), Some(&prefix.as_str().into()))
                .try_collect()
                .await
                .expect("list s3");
        let depth_ok = |rest: &str| {
            // rest = "<sub...>/tags|manifests|blobs/...": the repository is the key itself
            // (rest starts with a kind) or a deeper name of the same key.
            let first = rest.split('/').next().unwrap_or_default();
            matches!(first, "tags" | "manifests" | "blobs") || key.contains('/')
        };
        metas
            .into_iter()
            .map(|m| m.location.to_string())
            .filter_map(|k| k.strip_prefix(&format!("{PREFIX}/")).map(str::to_owned))
            .filter(|k| depth_ok(&k[format!("repos/{key}/").len()..]))
            .collect()
    }

    /// Object bytes at `key` (relative to the store prefix).
    pub(crate) async fn s3_get(&self, key: &str) -> Vec<u8> {
        let key = format!("{PREFIX}/{key}");
        object_store::ObjectStore::get(&self.moto.s3(BUCKET), &key.as_str().into())
            .await
            .expect("s3 get")
            .bytes()
            .await
            .expect("s3 body")
            .to_vec()
    }

    pub(crate) async fn s3_has(&self, key: &str) -> bool {
        let key = format!("{PREFIX}/{key}");
        object_store::ObjectStore::head(&self.moto.s3(BUCKET), &key.into())
            .await
            .is_ok()
    }

    /// The sum of metric `name` on node `id`.
    pub(crate) async fn node_metric(&self, id: &str, name: &str) -> f64 {
        crate::support::metric_sum(&self.node(id).url(), name).await
    }

    /// Delete an object (relative to the store prefix), as an operator or a bucket policy
    /// might.
    pub(crate) async fn s3_delete(&self, key: &str) {
        let key = format!("{PREFIX}/{key}");
        object_store::ObjectStore::delete(&self.moto.s3(BUCKET), &key.into())
            .await
            .expect("s3 delete");
    }

    pub(crate) async fn s3_has_blob(&self, digest: &str) -> bool {
        let hex = digest.strip_prefix("sha256:").expect("sha256 digest");
        self.s3_has(&format!("blobs/sha256/{hex}")).await
    }
}

impl Drop for ClusterProc {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // The temp dir (and the logs in it) goes with us: show the tail of each log.
            let mut logs: Vec<_> = std::fs::read_dir(self.tmp.path())
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "log"))
                .collect();
            logs.sort();
            for p in logs {
                let text = std::fs::read_to_string(&p).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                let tail = &lines[lines.len().saturating_sub(25)..];
                eprintln!("==== {} ====\n{}", p.display(), tail.join("\n"));
            }
        }
        for s in &mut self.seeders {
            if let Some(mut c) = s.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        for r in &mut self.routers {
            let _ = r.child.kill();
            let _ = r.child.wait();
        }
        for n in &mut self.nodes {
            if let Some(mut c) = n.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

/// A small image of a repository: its manifest digest and every blob it references.
#[derive(Clone, Debug)]
pub(crate) struct Pushed {
    pub repo: String,
    pub tag: String,
    pub manifest: String,
    pub blobs: Vec<String>,
}

/// A deterministic layer unique to `seed`.
pub(crate) fn layer_for(seed: &str, len: usize) -> Vec<u8> {
    let h = sha256(seed.as_bytes());
    h.as_bytes().iter().cycle().take(len).copied().collect()
}

/// Push a tiny image (config + one layer) without panicking: `Err` on any refusal.
pub(crate) async fn try_push_image(
    c: &Oci,
    repo: &str,
    tag: &str,
    layer: &[u8],
) -> Result<Pushed, String> {
    let config = format!(
        r#"{{"architecture":"amd64","os":"linux","rootfs":{{"type":"layers","diff_ids":["{}"]}}}}"#,
        sha256(layer)
    );
    let mut blobs = Vec::new();
    for bytes in [config.as_bytes(), layer] {
        let d = sha256(bytes);
        let r = c
            .post_blob(repo, &d, bytes.to_vec())
            .await
            .map_err(|e| format!("push blob {d}: {e}"))?;
        if r.status() != 201 {
            return Err(format!(
                "push blob {d}: {} {}",
                r.status(),
                r.text().await.unwrap_or_default()
            ));
        }
        blobs.push(d);
    }
    let m = crate::support::image_manifest(&blobs[0], config.len(), &blobs[1], layer.len());
    let r = c
        .http
        .put(c.url(&format!("/v2/{repo}/manifests/{tag}")))
        .header("content-type", OCI_MANIFEST)
        .body(m.clone())
        .send()
        .await
        .map_err(|e| format!("put manifest: {e}"))?;
    if r.status() != 201 {
        return Err(format!(
            "put manifest {repo}:{tag}: {} {}",
            r.status(),
            r.text().await.unwrap_or_default()
        ));
    }
    Ok(Pushed {
        repo: repo.to_owned(),
        tag: tag.to_owned(),
        manifest: sha256(m.as_bytes()),
        blobs,
    })
}

pub(crate) async fn push_image(c: &Oci, repo: &str, tag: &str) -> Pushed {
    let layer = layer_for(&format!("{repo}:{tag}"), 4096);
    try_push_image(c, repo, tag, &layer)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Pull `p` by tag (manifest, then every blob it references), verifying every digest.
pub(crate) async fn try_pull(c: &Oci, p: &Pushed) -> Result<(), String> {
    let r = c
        .http
        .get(c.url(&format!("/v2/{}/manifests/{}", p.repo, p.tag)))
        .header("accept", OCI_MANIFEST)
        .send()
        .await
        .map_err(|e| format!("GET manifest {}:{}: {e}", p.repo, p.tag))?;
    let status = r.status();
    let body = r
        .bytes()
        .await
        .map_err(|e| format!("manifest body {}:{}: {e}", p.repo, p.tag))?;
    if status != 200 {
        return Err(format!(
            "GET manifest {}:{}: {status} {}",
            p.repo,
            p.tag,
            String::from_utf8_lossy(&body)
        ));
    }
    if sha256(&body) != p.manifest {
        return Err(format!("manifest {}:{} digest mismatch", p.repo, p.tag));
    }
    let m: Value = serde_json::from_slice(&body).map_err(|e| format!("manifest JSON: {e}"))?;
    let mut refs = vec![m["config"]["digest"]
        .as_str()
        .unwrap_or_default()
        .to_owned()];
    refs.extend(
        m["layers"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|l| l["digest"].as_str().unwrap_or_default().to_owned()),
    );
    if refs != p.blobs {
        return Err(format!("manifest {}:{} references {refs:?}", p.repo, p.tag));
    }
    for d in refs {
        let r = c
            .get_checked(&format!("/v2/{}/blobs/{d}", p.repo))
            .await
            .map_err(|e| format!("blob {d} of {}: {e}", p.repo))?;
        if sha256(&r) != d {
            return Err(format!("blob {d} of {}: digest mismatch", p.repo));
        }
    }
    Ok(())
}

trait GetChecked {
    async fn get_checked(&self, path: &str) -> Result<Vec<u8>, String>;
}

impl GetChecked for Oci {
    async fn get_checked(&self, path: &str) -> Result<Vec<u8>, String> {
        let r = self
            .http
            .get(self.url(path))
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let status = r.status();
        let body = r.bytes().await.map_err(|e| e.to_string())?;
        if status != 200 {
            return Err(format!("{status} {}", String::from_utf8_lossy(&body)));
        }
        Ok(body.to_vec())
    }
}

/// A background client pulling every image in a loop through the router.
pub(crate) struct PullLoop {
    stop: Arc<AtomicBool>,
    rounds: Arc<AtomicUsize>,
    failures: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl PullLoop {
    pub(crate) fn start(oci: Oci, images: Vec<Pushed>) -> PullLoop {
        let stop = Arc::new(AtomicBool::new(false));
        let rounds = Arc::new(AtomicUsize::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let (s, r, f) = (stop.clone(), rounds.clone(), failures.clone());
        let task = tokio::spawn(async move {
            while !s.load(Ordering::SeqCst) {
                for p in &images {
                    if let Err(e) = try_pull(&oci, p).await {
                        f.lock().unwrap().push(e);
                    }
                }
                r.fetch_add(1, Ordering::SeqCst);
            }
        });
        PullLoop {
            stop,
            rounds,
            failures,
            task,
        }
    }

    /// Wait until at least `n` more full rounds ran and `min` time passed.
    pub(crate) async fn run_for(&self, n: usize, min: Duration) {
        let start = self.rounds.load(Ordering::SeqCst);
        let t0 = Instant::now();
        poll("pull rounds", Duration::from_secs(60), || async {
            (self.rounds.load(Ordering::SeqCst) >= start + n && t0.elapsed() >= min).then_some(())
        })
        .await;
    }

    pub(crate) async fn finish(self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        self.task.await.expect("pull loop");
        let f = self.failures.lock().unwrap().clone();
        (self.rounds.load(Ordering::SeqCst), f)
    }
}
