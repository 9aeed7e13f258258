//! TLS, with a CA each test makes with `openssl` (nothing trusted beyond the test): skopeo
//! and the Docker engine push to `flotilla dev --tls-cert/--tls-key` (the nodes serve TLS
//! too, the router and seeder trust them through `--tls-ca`), a client without the CA is
//! refused, and the certificate is reloaded when its files change and on SIGHUP. The
//! metadata-store clients speak TLS to a real etcd serving HTTPS (`etcds://...?ca=`).
//! Docker's CA goes to `/etc/docker/certs.d/<host:port>/ca.crt` and is removed afterwards.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::clients::{blocking, guard_cleanup, single_image, skopeo, unique, DockerImages, Layout};
use crate::cluster_support::{poll, CLUSTER_TIMEOUT};
use crate::support::*;

/// A CA and certificates it signed, in a temp dir.
pub(crate) struct TestCa {
    pub(crate) dir: tempfile::TempDir,
}

/// Run openssl in `cwd`, panicking with its stderr on failure.
pub(crate) fn openssl(args: &[&str], cwd: &Path) {
    let out = Command::new(require_tool("openssl"))
        .args(args)
        .current_dir(cwd)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl TestCa {
    pub(crate) fn new() -> TestCa {
        let dir = tempfile::tempdir().expect("tempdir");
        openssl(
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                "ca.key",
                "-out",
                "ca.crt",
                "-days",
                "2",
                "-subj",
                "/CN=flotilla e2e test CA",
            ],
            dir.path(),
        );
        TestCa { dir }
    }

    pub(crate) fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.crt")
    }

    /// A server certificate `name.crt`/`name.key` for `ips` (and `localhost`); returns the
    /// paths and the certificate's serial as openssl prints it.
    pub(crate) fn leaf(&self, name: &str, ips: &[&str]) -> (PathBuf, PathBuf, String) {
        let d = self.dir.path();
        let mut san: Vec<String> = ips.iter().map(|ip| format!("IP:{ip}")).collect();
        san.push("DNS:localhost".into());
        std::fs::write(
            d.join(format!("{name}.ext")),
            format!(
                "subjectAltName={}\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n",
                san.join(",")
            ),
        )
        .expect("ext file");
        let (key, csr, crt, ext) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.crt"),
            format!("{name}.ext"),
        );
        openssl(
            &[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                &key,
                "-out",
                &csr,
                "-subj",
                "/CN=flotilla e2e",
            ],
            d,
        );
        openssl(
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &crt,
                "-days",
                "2",
                "-extfile",
                &ext,
            ],
            d,
        );
        let serial = serial_of_file(&d.join(&crt));
        (d.join(crt), d.join(key), serial)
    }

    /// A directory holding only `ca.crt`, as skopeo's `--cert-dir` wants it.
    pub(crate) fn cert_dir(&self) -> PathBuf {
        let dir = self.dir.path().join("certs.d");
        std::fs::create_dir_all(&dir).expect("cert dir");
        std::fs::copy(self.ca(), dir.join("ca.crt")).expect("copy ca");
        dir
    }
}

fn serial_of_file(crt: &Path) -> String {
    let out = Command::new("openssl")
        .args(["x509", "-noout", "-serial", "-in"])
        .arg(crt)
        .output()
        .expect("openssl x509");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// The serial of the certificate `host:port` serves, or `None` if no handshake.
fn served_serial(addr: &str) -> Option<String> {
    let s = Command::new("openssl")
        .args(["s_client", "-connect", addr])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let out = s.wait_with_output().ok()?;
    let mut x = Command::new("openssl")
        .args(["x509", "-noout", "-serial"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    use std::io::Write as _;
    x.stdin.take()?.write_all(&out.stdout).ok()?;
    let o = x.wait_with_output().ok()?;
    o.status
        .success()
        .then(|| String::from_utf8_lossy(&o.stdout).trim().to_owned())
}

/// This machine's first non-loopback IPv4 address: the Docker engine treats every
/// 127.0.0.0/8 registry as insecure (it would skip verification there), so the Docker
/// push goes to an address where the CA must be trusted.
fn external_ip() -> Option<String> {
    let out = Command::new("hostname").arg("-I").output().ok()?;
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .find(|a| {
            a.parse::<std::net::Ipv4Addr>()
                .is_ok_and(|ip| !ip.is_loopback())
        })
        .map(str::to_owned)
}

fn https_client(ca: &Path) -> reqwest::Client {
    let pem = std::fs::read(ca).expect("read CA");
    reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&pem).expect("CA PEM"))
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client")
}

/// `/etc/docker/certs.d/<host:port>/`, removed on drop.
struct DockerCertsDir(PathBuf);

impl DockerCertsDir {
    fn install(host: &str, ca: &Path) -> DockerCertsDir {
        let dir = PathBuf::from("/etc/docker/certs.d").join(host);
        std::fs::create_dir_all(&dir).expect("create /etc/docker/certs.d/<host> (needs root)");
        std::fs::copy(ca, dir.join("ca.crt")).expect("install ca.crt");
        DockerCertsDir(dir)
    }
}

impl Drop for DockerCertsDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn dev_over_tls_takes_skopeo_and_docker_pushes_and_reloads_its_certificate() {
    let ca = TestCa::new();
    let ip = external_ip();
    let listen_ip = ip.clone().unwrap_or_else(|| "127.0.0.1".into());
    let mut ips = vec!["127.0.0.1"];
    if let Some(ip) = &ip {
        ips.push(ip);
    }
    let (cert, key, serial1) = ca.leaf("server", &ips);
    let tmp = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let host = format!("{listen_ip}:{port}");
    let log = tmp.path().join("dev.log");
    let dev = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_flotilla"))
            .args(["dev", "--listen", &host, "--data"])
            .arg(tmp.path().join("data"))
            .arg("--tls-cert")
            .arg(&cert)
            .arg("--tls-key")
            .arg(&key)
            .arg("--tls-ca")
            .arg(ca.ca())
            .env("RUST_LOG", "info")
            .stderr(std::fs::File::create(&log).expect("log"))
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn flotilla dev"),
    );
    let base = format!("https://{host}");
    let http = https_client(&ca.ca());
    poll("dev ready over https", CLUSTER_TIMEOUT, || async {
        let r = http.get(format!("{base}/readyz")).send().await.ok()?;
        r.status().is_success().then_some(())
    })
    .await;
    assert_eq!(served_serial(&host).as_deref(), Some(serial1.as_str()));

    // skopeo trusting the test CA pushes; without it, verification refuses the registry.
    let img = single_image();
    let layout = tmp.path().join("layout");
    let mut l = Layout::new(&layout);
    l.put_image(&img);
    l.tag("v1", OCI_MANIFEST, &img.manifest);
    let cert_dir = ca.cert_dir();
    let (src, dest) = (
        format!("oci:{}:v1", layout.display()),
        format!("docker://{host}/tls/skopeo:v1"),
    );
    let (s2, d2, cd) = (src.clone(), dest.clone(), cert_dir.clone());
    blocking(move || {
        run(skopeo()
            .args(["copy", "--dest-tls-verify=true", "--dest-cert-dir"])
            .arg(&cd)
            .arg(&s2)
            .arg(&d2))
    })
    .await;
    let untrusted = blocking(move || {
        skopeo()
            .args(["copy", "--dest-tls-verify=true"])
            .arg(&src)
            .arg(dest.replace("skopeo:v1", "skopeo:untrusted"))
            .output()
            .expect("run skopeo")
    })
    .await;
    let stderr = String::from_utf8_lossy(&untrusted.stderr);
    assert!(
        !untrusted.status.success() && stderr.contains("unknown authority"),
        "skopeo without the CA must fail verification: {stderr}"
    );
    let r = http
        .get(format!("{base}/v2/tls/skopeo/manifests/v1"))
        .header("accept", OCI_MANIFEST)
        .send()
        .await
        .expect("GET manifest");
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.bytes().await.expect("manifest").as_ref(),
        img.manifest.bytes.as_slice()
    );

    // The Docker engine, trusting the CA through certs.d.
    require_tool("docker");
    let certs = DockerCertsDir::install(&host, &ca.ca());
    let tag = format!("e2e-{}", unique());
    let reference = format!("{host}/tls/docker:{tag}");
    let tarball = tmp.path().join("rootfs.tar");
    std::fs::write(&tarball, tar_bytes(&[("tls/README", tag.as_bytes())])).expect("tarball");
    let guard = DockerImages(vec![reference.clone()]);
    let r2 = reference.clone();
    let guard = blocking(move || {
        run(Command::new("docker").arg("import").arg(&tarball).arg(&r2));
        run(Command::new("docker").args(["push", &r2]));
        run(Command::new("docker").args(["rmi", &r2]));
        run(Command::new("docker").args(["pull", &r2]));
        guard
    })
    .await;
    guard_cleanup(guard).await;
    drop(certs);
    assert!(
        !PathBuf::from("/etc/docker/certs.d").join(&host).exists(),
        "certs.d entry removed"
    );

    // A renewed certificate is served once its files change (polled every 2 s).
    let (cert2, key2, serial2) = ca.leaf("renewed", &ips);
    std::fs::copy(&key2, &key).expect("replace key");
    std::fs::copy(&cert2, &cert).expect("replace cert");
    let h = host.clone();
    poll(
        "the renewed certificate served",
        Duration::from_secs(15),
        || {
            let h = h.clone();
            let want = serial2.clone();
            async move {
                let got = blocking(move || served_serial(&h)).await;
                (got.as_deref() == Some(want.as_str())).then_some(())
            }
        },
    )
    .await;
    // SIGHUP reloads too (and does not stop the process).
    let pid = dev.0.id().to_string();
    run(Command::new("kill").args(["-HUP", &pid]));
    poll(
        "a SIGHUP reload logged",
        Duration::from_secs(10),
        || async {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            text.lines()
                .any(|l| l.contains("TLS certificate reloaded") && l.contains("SIGHUP"))
                .then_some(())
        },
    )
    .await;
    let r = http
        .get(format!("{base}/v2/"))
        .send()
        .await
        .expect("GET /v2/");
    assert_eq!(r.status(), 200, "still serving after SIGHUP");
    drop(dev);
}

#[tokio::test(flavor = "multi_thread")]
async fn metadata_store_client_speaks_tls_to_etcd_with_a_ca_file() {
    let ca = TestCa::new();
    let (cert, key, _) = ca.leaf("etcd", &["127.0.0.1"]);
    let etcd = crate::etcdsupport::Etcd::start_tls(cert, key, ca.ca()).await;
    let url = format!("{}?ca={}", etcd.url(), ca.ca().display());
    let meta: shardmap::MetaUrl = url.parse().expect("etcds URL");
    let store = shardmap::open(&meta).expect("open etcds store");
    let v = store
        .put("e2e/tls", bytes::Bytes::from_static(b"over https"))
        .await
        .expect("put over TLS");
    let (got, version) = store.get("e2e/tls").await.expect("get").expect("present");
    assert_eq!(got.as_ref(), b"over https");
    assert_eq!(version, v);

    // Without the CA the same member is refused (its certificate is not trusted).
    let untrusted: shardmap::MetaUrl = etcd.url().parse().expect("etcds URL");
    let store = shardmap::open(&untrusted).expect("open");
    let r = tokio::time::timeout(Duration::from_secs(30), store.get("e2e/tls"))
        .await
        .expect("bounded by the store's own retry deadline");
    assert!(r.is_err(), "an untrusted etcd certificate must fail: {r:?}");

    // A node registers through it and a router sees the node: both over TLS to etcd.
    let node_dir = tempfile::tempdir().expect("tempdir");
    let node = NodeProc::spawn(
        node_dir.path().join("data"),
        free_port(),
        "n1",
        ["--meta", url.as_str(), "--secret", "tls-test"]
            .map(String::from)
            .to_vec(),
    );
    node.wait_ready().await;
    let port = free_port();
    let _router = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_flotilla"))
            .args(["router", "--meta", &url, "--listen"])
            .arg(format!("127.0.0.1:{port}"))
            .env("FLOTILLA_SECRET", "tls-test")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn router"),
    );
    // Ready means: the router reached the store and found the node there.
    wait_http_ok(&format!("http://127.0.0.1:{port}/readyz"), CLUSTER_TIMEOUT).await;
}

/// Consul over HTTPS with an ACL token: the stand-in (Consul's server cannot be had here)
/// served by `flotilla-serve` with a test certificate and requiring a token. A router and a
/// node reach it with `consuls://...?ca=` and `CONSUL_HTTP_TOKEN`, or with `consul://` plus
/// Consul's own `CONSUL_HTTP_SSL`/`CONSUL_CACERT`; without the token the router logs the
/// store's refusal.
#[tokio::test(flavor = "multi_thread")]
async fn metadata_store_client_speaks_tls_to_consul_with_a_ca_file_and_a_token() {
    let ca = TestCa::new();
    let (cert, key, _) = ca.leaf("consul", &["127.0.0.1"]);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let mut cfg = flotilla_serve::ServeConfig::new("node");
    cfg.tls = Some(flotilla_serve::TlsFiles { cert, key });
    let app = crate::consul_standin::standin_app(Some("acl-token".into()));
    let stop = stop_signal();
    let server = tokio::spawn(flotilla_serve::serve(listener, app, cfg, stop.1));
    let anon = https_client(&ca.ca())
        .get(format!("https://{addr}/v1/kv/x"))
        .send()
        .await
        .expect("GET over TLS");
    assert_eq!(anon.status(), 403, "the stand-in enforces its token");

    let tmp = tempfile::tempdir().expect("tempdir");
    let url = format!("consuls://{addr}?ca={}", ca.ca().display());
    let spawn = |args: Vec<String>, envs: Vec<(&str, String)>, log: &Path| {
        KillOnDrop(
            Command::new(env!("CARGO_BIN_EXE_flotilla"))
                .args(args)
                .env("FLOTILLA_SECRET", "tls-test")
                .env_remove("CONSUL_HTTP_TOKEN")
                .env_remove("CONSUL_HTTP_SSL")
                .env_remove("CONSUL_CACERT")
                .envs(envs)
                .env("RUST_LOG", "info")
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(log).expect("log"))
                .spawn()
                .expect("spawn flotilla"),
        )
    };
    // The node with Consul's own variables on a plain consul:// URL.
    let node_port = free_port();
    let _node = spawn(
        vec![
            "node".into(),
            "--id".into(),
            "n1".into(),
            "--rack".into(),
            "r1".into(),
            "--listen".into(),
            format!("127.0.0.1:{node_port}"),
            "--data".into(),
            tmp.path().join("n1").display().to_string(),
            "--meta".into(),
            format!("consul://{addr}"),
        ],
        vec![
            ("CONSUL_HTTP_TOKEN", "acl-token".into()),
            ("CONSUL_HTTP_SSL", "true".into()),
            ("CONSUL_CACERT", ca.ca().display().to_string()),
        ],
        &tmp.path().join("node.log"),
    );
    wait_http_ok(
        &format!("http://127.0.0.1:{node_port}/readyz"),
        CLUSTER_TIMEOUT,
    )
    .await;
    // The router with consuls://?ca= and the token: ready once it found the node there.
    let port = free_port();
    let _router = spawn(
        vec![
            "router".into(),
            "--meta".into(),
            url.clone(),
            "--listen".into(),
            format!("127.0.0.1:{port}"),
        ],
        vec![("CONSUL_HTTP_TOKEN", "acl-token".into())],
        &tmp.path().join("router.log"),
    );
    wait_http_ok(&format!("http://127.0.0.1:{port}/readyz"), CLUSTER_TIMEOUT).await;
    let nodes: serde_json::Value = reqwest::get(format!("http://127.0.0.1:{port}/admin/v1/nodes"))
        .await
        .expect("nodes")
        .json()
        .await
        .expect("JSON");
    assert_eq!(nodes[0]["id"], "n1", "{nodes}");

    // Without the token the store refuses the router, and the router says why.
    let log = tmp.path().join("router-no-token.log");
    let bad_port = free_port();
    let _bad = spawn(
        vec![
            "router".into(),
            "--meta".into(),
            url,
            "--listen".into(),
            format!("127.0.0.1:{bad_port}"),
        ],
        vec![],
        &log,
    );
    poll("the refusal logged", CLUSTER_TIMEOUT, || async {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        (text.contains("403") || text.contains("Permission denied")).then_some(())
    })
    .await;
    // Meanwhile it answers, and says it is not ready (a bounded client: a hang would fail).
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("client");
    let r = http
        .get(format!("http://127.0.0.1:{bad_port}/readyz"))
        .send()
        .await
        .expect("a starting router answers");
    assert_eq!(r.status(), 503, "a router the store refuses is not ready");
    let r = http
        .get(format!("http://127.0.0.1:{bad_port}/v2/"))
        .send()
        .await
        .expect("a starting router answers /v2/");
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["retry-after"], "1");
    assert_eq!(error_code(r).await, "UNAVAILABLE");
    let _ = stop.0.send(());
    let _ = tokio::time::timeout(Duration::from_secs(10), server).await;
}

/// A shutdown future for `flotilla_serve::serve` and the sender that resolves it.
fn stop_signal() -> (
    tokio::sync::oneshot::Sender<()>,
    impl std::future::Future<Output = ()> + Send + 'static,
) {
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    (tx, async move {
        let _ = rx.await;
    })
}
