//! A real single-member etcd (Debian's `etcd-server`) for end-to-end tests, on free ports,
//! with the means to freeze, kill and restart it on its own data directory.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::{free_port, require_tool};

pub(crate) struct Etcd {
    child: Option<Child>,
    pub client_port: u16,
    peer_port: u16,
    dir: tempfile::TempDir,
    /// Serve clients over HTTPS: (certificate, key, the CA that signed them).
    tls: Option<(PathBuf, PathBuf, PathBuf)>,
}

impl Etcd {
    /// Start etcd and wait until it reports healthy (bounded).
    pub(crate) async fn start() -> Etcd {
        Self::start_with(None).await
    }

    /// Clients over HTTPS with `cert`/`key` (signed by `ca`, which the health check trusts).
    pub(crate) async fn start_tls(cert: PathBuf, key: PathBuf, ca: PathBuf) -> Etcd {
        Self::start_with(Some((cert, key, ca))).await
    }

    async fn start_with(tls: Option<(PathBuf, PathBuf, PathBuf)>) -> Etcd {
        let mut e = Etcd {
            child: None,
            client_port: free_port(),
            peer_port: free_port(),
            dir: tempfile::tempdir().expect("tempdir"),
            tls,
        };
        e.spawn();
        e.wait_healthy().await;
        e
    }

    fn spawn(&mut self) {
        let bin = require_tool("etcd");
        let client = format!("{}://127.0.0.1:{}", self.scheme(), self.client_port);
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let mut cmd = Command::new(bin);
        if let Some((cert, key, _)) = &self.tls {
            cmd.arg("--cert-file").arg(cert).arg("--key-file").arg(key);
        }
        let child = cmd
            .args(["--name", "e2e"])
            .arg("--data-dir")
            .arg(self.dir.path().join("data"))
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("e2e={peer}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn etcd");
        self.child = Some(child);
    }

    fn scheme(&self) -> &'static str {
        if self.tls.is_some() {
            "https"
        } else {
            "http"
        }
    }

    async fn wait_healthy(&self) {
        let mut b = reqwest::Client::builder();
        if let Some((_, _, ca)) = &self.tls {
            let pem = std::fs::read(ca).expect("read CA");
            b = b.add_root_certificate(reqwest::Certificate::from_pem(&pem).expect("CA PEM"));
        }
        let http = b.build().expect("client");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ok = http
                .get(format!(
                    "{}://127.0.0.1:{}/health",
                    self.scheme(),
                    self.client_port
                ))
                .timeout(Duration::from_secs(2))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if ok {
                return;
            }
            assert!(Instant::now() < deadline, "etcd not healthy in 60 s");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `etcd://` (or `etcds://`, without a CA option) for this member.
    pub(crate) fn url(&self) -> String {
        let s = if self.tls.is_some() { "etcds" } else { "etcd" };
        format!("{s}://127.0.0.1:{}", self.client_port)
    }

    /// SIGSTOP or SIGCONT: a frozen member accepts connections and answers nothing.
    pub(crate) fn freeze(&self, frozen: bool) {
        let pid = self.child.as_ref().expect("etcd running").id();
        let sig = if frozen { "-STOP" } else { "-CONT" };
        let ok = Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .expect("run kill")
            .success();
        assert!(ok, "kill {sig} etcd");
    }

    pub(crate) fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Start again on the same data directory and ports.
    pub(crate) async fn restart(&mut self) {
        self.kill9();
        self.spawn();
        self.wait_healthy().await;
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill9();
    }
}
