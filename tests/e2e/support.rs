//! Test harness: real `flotilla` processes on free loopback ports with temp data dirs,
//! readiness polled with a bounded timeout, killed on drop. Also the small OCI client the
//! spec tests use (raw HTTP via reqwest) and helpers to require external tools loudly.

#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sha2::Digest as _;

pub const READY_TIMEOUT: Duration = Duration::from_secs(20);

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind port 0")
}

pub fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes)))
}

pub fn sha512(bytes: &[u8]) -> String {
    format!("sha512:{}", hex::encode(sha2::Sha512::digest(bytes)))
}

/// Poll `url` until it answers 2xx, or panic after `timeout`.
pub async fn wait_http_ok(url: &str, timeout: Duration) {
    let client = reqwest::Client::new();
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(r) = client.get(url).send().await {
            if r.status().is_success() {
                return;
            }
        }
        assert!(Instant::now() < deadline, "{url} not ready within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A `flotilla node` process. Dropping it kills the process; the data dir lives as long as
/// the `TempDir` given to it (or the process struct if it made its own).
pub struct NodeProc {
    pub child: Child,
    pub port: u16,
    pub data: PathBuf,
    pub id: String,
    extra: Vec<String>,
    _tmp: Option<tempfile::TempDir>,
}

impl NodeProc {
    pub async fn start() -> NodeProc {
        let tmp = tempfile::tempdir().expect("tempdir");
        let data = tmp.path().join("data");
        let mut n = NodeProc::spawn(data, free_port(), "n1", Vec::new());
        n._tmp = Some(tmp);
        n.wait_ready().await;
        n
    }

    pub fn spawn(data: PathBuf, port: u16, id: &str, extra: Vec<String>) -> NodeProc {
        let child = spawn_node_child(&data, port, id, &extra);
        NodeProc {
            child,
            port,
            data,
            id: id.to_owned(),
            extra,
            _tmp: None,
        }
    }

    pub async fn wait_ready(&self) {
        wait_http_ok(&format!("{}/v2/", self.url()), READY_TIMEOUT).await;
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// SIGKILL: no chance to flush or clean up, the crash the store must survive.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Start again on the same port and data dir.
    pub async fn restart(&mut self) {
        self.kill9();
        self.child = spawn_node_child(&self.data, self.port, &self.id, &self.extra);
        self.wait_ready().await;
    }

    pub fn client(&self) -> Oci {
        Oci::new(&self.url())
    }
}

fn spawn_node_child(data: &Path, port: u16, id: &str, extra: &[String]) -> Child {
    // Log next to the data dir (appending across restarts) so a failing test can be read.
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(format!("{}.log", data.display()))
        .or_else(|_| std::fs::File::create("/dev/null"))
        .expect("log file");
    Command::new(env!("CARGO_BIN_EXE_flotilla"))
        .args(["node", "--id", id, "--rack", "r1"])
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--data")
        .arg(data)
        .args(extra)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn flotilla node")
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Minimal OCI client over raw HTTP, so tests see exactly what the server sends.
#[derive(Clone)]
pub struct Oci {
    pub base: String,
    pub http: reqwest::Client,
}

impl Oci {
    pub fn new(base: &str) -> Oci {
        Oci {
            base: base.trim_end_matches('/').to_owned(),
            http: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .expect("client"),
        }
    }

    pub fn url(&self, path: &str) -> String {
        if path.starts_with("http") {
            path.to_owned()
        } else {
            format!("{}{}", self.base, path)
        }
    }

    /// Monolithic push of a blob; returns its digest.
    pub async fn push_blob(&self, repo: &str, bytes: &[u8]) -> String {
        let d = sha256(bytes);
        let r = self
            .http
            .post(self.url(&format!("/v2/{repo}/blobs/uploads/?digest={d}")))
            .body(bytes.to_vec())
            .send()
            .await
            .expect("push blob");
        assert_eq!(r.status(), 201, "push blob {d}: {}", r.text().await.unwrap_or_default());
        d
    }

    pub async fn put_manifest(&self, repo: &str, reference: &str, media_type: &str, body: &[u8]) -> reqwest::Response {
        self.http
            .put(self.url(&format!("/v2/{repo}/manifests/{reference}")))
            .header("content-type", media_type)
            .body(body.to_vec())
            .send()
            .await
            .expect("put manifest")
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.http.get(self.url(path)).send().await.expect("GET")
    }

    /// Push a tiny image (config + one layer) and tag it; returns the manifest digest.
    pub async fn push_image(&self, repo: &str, tag: &str, layer: &[u8]) -> String {
        let config = format!(r#"{{"architecture":"amd64","os":"linux","rootfs":{{"type":"layers","diff_ids":["{}"]}}}}"#, sha256(layer));
        let cd = self.push_blob(repo, config.as_bytes()).await;
        let ld = self.push_blob(repo, layer).await;
        let m = image_manifest(&cd, config.len(), &ld, layer.len());
        let r = self.put_manifest(repo, tag, OCI_MANIFEST, m.as_bytes()).await;
        assert_eq!(r.status(), 201, "{}", r.text().await.unwrap_or_default());
        sha256(m.as_bytes())
    }
}

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

pub fn image_manifest(config: &str, config_len: usize, layer: &str, layer_len: usize) -> String {
    format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config}","size":{config_len}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{layer}","size":{layer_len}}}]}}"#
    )
}

/// The error code of an OCI JSON error body, asserting the body has the spec's shape.
pub async fn error_code(r: reqwest::Response) -> String {
    let status = r.status();
    let text = r.text().await.unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("status {status}: body is not JSON ({e}): {text:?}"));
    let code = v["errors"][0]["code"].as_str().unwrap_or_else(|| panic!("no errors[0].code in {text}"));
    assert!(v["errors"][0]["message"].is_string(), "no message in {text}");
    code.to_owned()
}

/// Path of a required external tool; a missing tool fails the test loudly (CI installs them).
pub fn require_tool(name: &str) -> PathBuf {
    let out = Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .output()
        .expect("sh");
    let p = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(
        !p.is_empty(),
        "required tool `{name}` is not installed; `.ci/run` installs it (see README)"
    );
    PathBuf::from(p)
}

/// Run a command, panic with its output on failure; returns stdout.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Every regular file under `dir`, relative paths, sorted.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(rel) = p.strip_prefix(dir) {
                out.push(rel.to_owned());
            }
        }
    }
    out.sort();
    out
}
