//! Test harness: real `flotilla` processes on free loopback ports with temp data dirs,
//! readiness polled with a bounded timeout, killed on drop. Also the small OCI client the
//! spec tests use (raw HTTP via reqwest) and helpers to require external tools loudly.

#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sha2::Digest as _;

pub(crate) const READY_TIMEOUT: Duration = Duration::from_secs(20);

pub(crate) fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind port 0")
}

pub(crate) fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes)))
}

pub(crate) fn sha512(bytes: &[u8]) -> String {
    format!("sha512:{}", hex::encode(sha2::Sha512::digest(bytes)))
}

/// Poll `url` until it answers 2xx, or panic after `timeout`.
pub(crate) async fn wait_http_ok(url: &str, timeout: Duration) {
    let client = reqwest::Client::new();
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(r) = client.get(url).send().await {
            if r.status().is_success() {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "{url} not ready within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A `flotilla node` process. Dropping it kills the process; the data dir lives as long as
/// the `TempDir` given to it (or the process struct if it made its own).
pub(crate) struct NodeProc {
    pub child: Child,
    pub port: u16,
    pub data: PathBuf,
    pub id: String,
    extra: Vec<String>,
    _tmp: Option<tempfile::TempDir>,
}

impl NodeProc {
    pub(crate) async fn start() -> NodeProc {
        let tmp = tempfile::tempdir().expect("tempdir");
        let data = tmp.path().join("data");
        let mut n = NodeProc::spawn(data, free_port(), "n1", Vec::new());
        n._tmp = Some(tmp);
        n.wait_ready().await;
        n
    }

    pub(crate) fn spawn(data: PathBuf, port: u16, id: &str, extra: Vec<String>) -> NodeProc {
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

    pub(crate) async fn wait_ready(&self) {
        wait_http_ok(&format!("{}/v2/", self.url()), READY_TIMEOUT).await;
    }

    pub(crate) fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub(crate) fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// SIGKILL: no chance to flush or clean up, the crash the store must survive.
    pub(crate) fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Start again on the same port and data dir.
    pub(crate) async fn restart(&mut self) {
        self.kill9();
        self.child = spawn_node_child(&self.data, self.port, &self.id, &self.extra);
        self.wait_ready().await;
    }

    pub(crate) fn client(&self) -> Oci {
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
        .env("AWS_ACCESS_KEY_ID", "flotilla-test")
        .env("AWS_SECRET_ACCESS_KEY", "flotilla-test")
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

/// A child process killed (and reaped) when the test is done with it, pass or fail; a no-op
/// once it has exited.
pub(crate) struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// An upload `Location` with `digest=` appended (it may already carry a query).
pub(crate) fn with_digest(loc: &str, d: &str) -> String {
    let sep = if loc.contains('?') { '&' } else { '?' };
    format!("{loc}{sep}digest={d}")
}

/// Minimal OCI client over raw HTTP, so tests see exactly what the server sends.
#[derive(Clone)]
pub(crate) struct Oci {
    pub base: String,
    pub http: reqwest::Client,
}

impl Oci {
    pub(crate) fn new(base: &str) -> Oci {
        Oci {
            base: base.trim_end_matches('/').to_owned(),
            http: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .expect("client"),
        }
    }

    /// A client that presents the cluster's internal secret, as a router does: nodes serve
    /// `/v2` reads and writes to it without a signed URL.
    pub(crate) fn with_secret(base: &str, secret: &str) -> Oci {
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert(
            registry_client::internal::SECRET_HEADER,
            secret.parse().expect("ASCII secret"),
        );
        Oci {
            base: base.trim_end_matches('/').to_owned(),
            http: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .default_headers(headers)
                .build()
                .expect("client"),
        }
    }

    pub(crate) fn url(&self, path: &str) -> String {
        if path.starts_with("http") {
            path.to_owned()
        } else {
            format!("{}{}", self.base, path)
        }
    }

    /// `POST /v2/<repo>/blobs/uploads/?digest=<digest>` with the whole blob (a monolithic
    /// push); the response as the server gave it.
    pub(crate) async fn post_blob(
        &self,
        repo: &str,
        digest: &str,
        body: impl Into<reqwest::Body>,
    ) -> reqwest::Result<reqwest::Response> {
        self.http
            .post(self.url(&format!("/v2/{repo}/blobs/uploads/?digest={digest}")))
            .body(body)
            .send()
            .await
    }

    /// `PATCH <location>` with one chunk, streamed (no `Content-Range`).
    pub(crate) async fn patch(
        &self,
        location: &str,
        chunk: Vec<u8>,
    ) -> reqwest::Result<reqwest::Response> {
        self.http.patch(self.url(location)).body(chunk).send().await
    }

    /// `PUT <location>?digest=<digest>`: close an upload session, `last` being its final
    /// chunk (empty for none).
    pub(crate) async fn close_upload(
        &self,
        location: &str,
        digest: &str,
        last: Vec<u8>,
    ) -> reqwest::Result<reqwest::Response> {
        self.http
            .put(self.url(&with_digest(location, digest)))
            .body(last)
            .send()
            .await
    }

    /// Monolithic push of a blob; returns its digest.
    pub(crate) async fn push_blob(&self, repo: &str, bytes: &[u8]) -> String {
        let d = sha256(bytes);
        let r = self
            .post_blob(repo, &d, bytes.to_vec())
            .await
            .expect("push blob");
        assert_eq!(
            r.status(),
            201,
            "push blob {d}: {}",
            r.text().await.unwrap_or_default()
        );
        d
    }

    pub(crate) async fn put_manifest(
        &self,
        repo: &str,
        reference: &str,
        media_type: &str,
        body: &[u8],
    ) -> reqwest::Response {
        self.http
            .put(self.url(&format!("/v2/{repo}/manifests/{reference}")))
            .header("content-type", media_type)
            .body(body.to_vec())
            .send()
            .await
            .expect("put manifest")
    }

    pub(crate) async fn get(&self, path: &str) -> reqwest::Response {
        self.http.get(self.url(path)).send().await.expect("GET")
    }

    /// Push a tiny image (config + one layer) and tag it; returns the manifest digest.
    pub(crate) async fn push_image(&self, repo: &str, tag: &str, layer: &[u8]) -> String {
        let config = format!(
            r#"{{"architecture":"amd64","os":"linux","rootfs":{{"type":"layers","diff_ids":["{}"]}}}}"#,
            sha256(layer)
        );
        let cd = self.push_blob(repo, config.as_bytes()).await;
        let ld = self.push_blob(repo, layer).await;
        let m = image_manifest(&cd, config.len(), &ld, layer.len());
        let r = self
            .put_manifest(repo, tag, OCI_MANIFEST, m.as_bytes())
            .await;
        assert_eq!(r.status(), 201, "{}", r.text().await.unwrap_or_default());
        sha256(m.as_bytes())
    }
}

pub(crate) const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub(crate) const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

pub(crate) fn image_manifest(
    config: &str,
    config_len: usize,
    layer: &str,
    layer_len: usize,
) -> String {
    format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config}","size":{config_len}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{layer}","size":{layer_len}}}]}}"#
    )
}

/// The error code of an OCI JSON error body, asserting the body has the spec's shape.
pub(crate) async fn error_code(r: reqwest::Response) -> String {
    let status = r.status();
    let body = r.bytes().await.unwrap_or_default();
    error_code_of(status.as_u16(), &body)
}

/// The code of the spec's error body `{"errors":[{"code":..,"message":..}]}`, asserting
/// that shape.
fn error_code_of(status: u16, body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let v: serde_json::Value = serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("status {status}: body is not JSON ({e}): {text:?}"));
    let code = v["errors"][0]["code"]
        .as_str()
        .unwrap_or_else(|| panic!("no errors[0].code in {text}"));
    assert!(
        v["errors"][0]["message"].is_string(),
        "no message in {text}"
    );
    code.to_owned()
}

/// Path of a required external tool; a missing tool fails the test loudly (CI installs them).
pub(crate) fn require_tool(name: &str) -> PathBuf {
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

/// Run a command; panic with its output on failure; return the whole output.
pub(crate) fn run_out(cmd: &mut Command) -> std::process::Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Run a command, panic with its output on failure; returns stdout.
pub(crate) fn run(cmd: &mut Command) -> String {
    String::from_utf8_lossy(&run_out(cmd).stdout).into_owned()
}

/// Every regular file under `dir`, relative paths, sorted.
pub(crate) fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
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

// ---- added for clients/hostile/crash ---------------------------------------------------

/// A minimal POSIX ustar archive of regular files (mode 0644, uid/gid 0, mtime 0), so the
/// bytes (and so every digest) are the same on every run.
pub(crate) fn tar_bytes(files: &[(&str, &[u8])]) -> Vec<u8> {
    fn octal(field: &mut [u8], v: u64) {
        // width-1 octal digits, NUL-terminated
        let s = format!("{:0w$o}", v, w = field.len() - 1);
        field[..s.len()].copy_from_slice(s.as_bytes());
        field[s.len()] = 0;
    }
    let mut out = Vec::new();
    for (name, data) in files {
        assert!(name.len() < 100, "tar name too long: {name}");
        let mut h = [0u8; 512];
        h[..name.len()].copy_from_slice(name.as_bytes());
        octal(&mut h[100..108], 0o644);
        octal(&mut h[108..116], 0);
        octal(&mut h[116..124], 0);
        octal(&mut h[124..136], data.len() as u64);
        octal(&mut h[136..148], 0);
        h[148..156].copy_from_slice(b"        ");
        h[156] = b'0';
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        h[265..269].copy_from_slice(b"root");
        h[297..301].copy_from_slice(b"root");
        let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
        let s = format!("{sum:06o}\0 ");
        h[148..156].copy_from_slice(s.as_bytes());
        out.extend_from_slice(&h);
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(512) * 512, 0);
    }
    out.resize(out.len() + 1024, 0);
    out
}

/// gzip with the system `gzip -n` (no name, no timestamp: deterministic bytes).
pub(crate) fn gzip_bytes(data: &[u8]) -> Vec<u8> {
    use std::io::Write as _;
    require_tool("gzip");
    let mut child = Command::new("gzip")
        .args(["-n", "-c"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn gzip");
    let mut stdin = child.stdin.take().expect("gzip stdin");
    let input = data.to_vec();
    let feeder = std::thread::spawn(move || stdin.write_all(&input));
    let out = child.wait_with_output().expect("gzip");
    feeder.join().expect("gzip feeder").expect("write to gzip");
    assert!(out.status.success(), "gzip failed");
    out.stdout
}

/// A response read off a raw socket.
#[derive(Debug)]
pub(crate) struct RawResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawResponse {
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// One HTTP/1.1 request over a fresh TCP connection with the request target sent exactly
/// as given: no URL normalisation (reqwest would resolve `..`, `%2e%2e` and backslashes
/// before sending). A `Content-Length` is added unless the caller set it or
/// `Transfer-Encoding`. The body is written concurrently with reading the answer, since a
/// server may refuse (and close) before reading a large body.
pub(crate) async fn raw_request(
    host: &str,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> RawResponse {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut head = format!("{method} {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
    let framed = headers.iter().any(|(k, _)| {
        k.eq_ignore_ascii_case("content-length") || k.eq_ignore_ascii_case("transfer-encoding")
    });
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if !framed {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    let mut payload = head.into_bytes();
    payload.extend_from_slice(body);

    let stream = tokio::net::TcpStream::connect(host)
        .await
        .unwrap_or_else(|e| panic!("connect {host}: {e}"));
    let (mut rd, mut wr) = stream.into_split();
    let writer = tokio::spawn(async move {
        // An early answer may close the connection mid-body; that is the server's right.
        let _ = wr.write_all(&payload).await;
        wr // kept open (no half-close) until the answer is read
    });
    let read = async {
        let mut buf = Vec::new();
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            if let Some(resp) = parse_raw_response(&buf) {
                return resp;
            }
            match rd.read(&mut chunk).await {
                Ok(0) | Err(_) => {
                    return parse_raw_response(&buf).unwrap_or_else(|| {
                        panic!(
                            "{method} {target}: connection ended before a complete response: {:?}",
                            String::from_utf8_lossy(&buf)
                        )
                    })
                }
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    };
    let resp = tokio::time::timeout(Duration::from_secs(30), read)
        .await
        .unwrap_or_else(|_| panic!("{method} {target}: no response within 30s"));
    writer.abort();
    resp
}

/// A complete response in `buf` (Content-Length or chunked framing), or `None` if more
/// bytes are needed.
fn parse_raw_response(buf: &[u8]) -> Option<RawResponse> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&buf[..end]).expect("response head is not UTF-8");
    let mut lines = head.split("\r\n");
    let status_line = lines.next()?;
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let rest = &buf[end + 4..];
    let get = |n: &str| headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
    let body = if get("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        let mut body = Vec::new();
        let mut at = 0;
        loop {
            let nl = rest[at..].windows(2).position(|w| w == b"\r\n")?;
            let size_str = std::str::from_utf8(&rest[at..at + nl]).ok()?;
            let size = usize::from_str_radix(size_str.split(';').next()?.trim(), 16).ok()?;
            at += nl + 2;
            if size == 0 {
                break;
            }
            if rest.len() < at + size + 2 {
                return None;
            }
            body.extend_from_slice(&rest[at..at + size]);
            at += size + 2;
        }
        body
    } else if let Some(len) = get("content-length") {
        let len: usize = len.parse().expect("content-length");
        if rest.len() < len {
            return None;
        }
        rest[..len].to_vec()
    } else if status == 204 || status == 304 || (100..200).contains(&status) {
        Vec::new()
    } else {
        return None; // delimited by EOF: wait for it
    };
    Some(RawResponse {
        status,
        headers,
        body,
    })
}

/// Encode `body` with chunked transfer coding (for a `Transfer-Encoding: chunked` request).
pub(crate) fn chunked_body(body: &[u8], chunk: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for c in body.chunks(chunk.max(1)) {
        out.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
        out.extend_from_slice(c);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"0\r\n\r\n");
    out
}

/// [`error_code`] for a [`RawResponse`]: asserts a JSON content type and the spec's error
/// shape, returns the code.
pub(crate) fn error_code_raw(r: &RawResponse) -> String {
    let text = String::from_utf8_lossy(&r.body);
    let ct = r.header("content-type").unwrap_or("");
    assert!(
        ct.starts_with("application/json"),
        "status {}: content-type {ct:?}, body {text:?}",
        r.status
    );
    error_code_of(r.status, &r.body)
}

/// The sum of every series of metric `name` in the `/metrics` text served at `base_url`.
pub(crate) async fn metric_sum(base_url: &str, name: &str) -> f64 {
    let text = reqwest::get(format!("{base_url}/metrics"))
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("metrics text");
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Send `sig` (`-STOP`, `-CONT`, ...) to `pid`, asserting it was delivered.
pub(crate) fn signal(pid: u32, sig: &str) {
    let ok = std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .expect("run kill")
        .success();
    assert!(ok, "kill {sig} {pid}");
}
