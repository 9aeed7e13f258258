//! A real S3-compatible server for tests: moto's `moto_server` on a free port, started and
//! stopped by the test, plus a TCP proxy in front of it that a test can cut to make object
//! storage unreachable without losing moto's in-memory state.

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::support::{free_port, require_tool};

pub(crate) struct Moto {
    child: Child,
    pub port: u16,
}

impl Moto {
    /// Start moto and create `bucket`. A missing `moto_server` fails the test (CI installs it).
    pub(crate) async fn start(bucket: &str) -> Moto {
        let bin = require_tool("moto_server");
        let port = free_port();
        let child = Command::new(bin)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn moto_server");
        let m = Moto { child, port };
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = http.put(format!("{}/{bucket}", m.url())).send().await {
                if r.status().is_success() {
                    break;
                }
            }
            assert!(Instant::now() < deadline, "moto_server not ready in 30s");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        m
    }

    pub(crate) fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Freeze (SIGSTOP) or thaw (SIGCONT) the server: a frozen store accepts connections
    /// and answers nothing, the failure no connect timeout catches.
    pub(crate) fn freeze(&self, frozen: bool) {
        let sig = if frozen { "-STOP" } else { "-CONT" };
        let ok = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .expect("run kill")
            .success();
        assert!(ok, "kill {sig} moto");
    }

    /// A signed S3 client on this server, for tampering with objects behind a node's back.
    pub(crate) fn s3(&self, bucket: &str) -> object_store::aws::AmazonS3 {
        object_store::aws::AmazonS3Builder::new()
            .with_bucket_name(bucket)
            .with_endpoint(self.url())
            .with_allow_http(true)
            .with_region("us-east-1")
            .with_access_key_id("flotilla-test")
            .with_secret_access_key("flotilla-test")
            .build()
            .expect("s3 client")
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `flotilla node` arguments for an S3 store at `endpoint`, plus the credentials env.
pub(crate) fn s3_args(endpoint: &str, bucket: &str, prefix: &str) -> Vec<String> {
    vec![
        "--store".into(),
        format!("s3://{bucket}/{prefix}?endpoint={endpoint}&region=us-east-1"),
    ]
}

/// A loopback TCP proxy that can be switched off (connections refused, live ones cut).
pub(crate) struct Proxy {
    pub port: u16,
    down: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    pub(crate) async fn start(target_port: u16) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let down = Arc::new(AtomicBool::new(false));
        let d = down.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    break;
                };
                if d.load(Ordering::SeqCst) {
                    drop(inbound); // reset: "connection refused" as far as clients can tell
                    continue;
                }
                let d = d.clone();
                tokio::spawn(async move {
                    let Ok(mut out) =
                        tokio::net::TcpStream::connect(("127.0.0.1", target_port)).await
                    else {
                        return;
                    };
                    let copy = tokio::io::copy_bidirectional(&mut inbound, &mut out);
                    tokio::pin!(copy);
                    loop {
                        tokio::select! {
                            _ = &mut copy => break,
                            _ = tokio::time::sleep(Duration::from_millis(50)) => {
                                if d.load(Ordering::SeqCst) { break; }
                            }
                        }
                    }
                });
            }
        });
        Proxy { port, down, task }
    }

    pub(crate) fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub(crate) fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}
