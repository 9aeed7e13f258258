//! The trust boundary from outside, with the real clients: `flotilla dev` with `--htpasswd`
//! and `--access` (Basic), with `--token-key` (it issues Docker registry tokens) and with
//! `--token-realm/--token-cert` (it trusts another issuer's tokens). Docker (`docker login`
//! into a private `--config`), skopeo `--creds` and podman `login` push and pull; anonymous,
//! wrong-password, expired, wrong-scope, wrong-audience and foreign-key requests are refused
//! with the right status and challenge; the admin API and the nodes' `/v2` writes are closed.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::clients::{blocking, single_image, skopeo, unique, DockerImages, Layout, Podman};
use crate::cluster_support::{layer_for, push_image, try_pull, try_push_image, CLUSTER_TIMEOUT};
use crate::support::*;

const POLICY: &str = r#"
admins = ["alice"]

[groups]
builders = ["bob"]

# Any signed-in user may pull anything.
[[repositories]]
pattern = "**"
authenticated = ["pull"]

[[repositories]]
pattern = "team/**"
groups = { builders = ["pull", "push"] }
authenticated = ["pull"]
immutable_tags = ["release-*"]

[[repositories]]
pattern = "public/**"
anonymous = ["pull"]
users = { bob = ["pull", "push"] }
"#;

fn htpasswd(file: &Path, user: &str, password: &str) {
    let mut c = Command::new(require_tool("htpasswd"));
    c.arg("-B").arg("-b");
    if !file.exists() {
        c.arg("-c");
    }
    run(c.arg(file).arg(user).arg(password));
}

/// The users of [`POLICY`] (alice the admin, bob the builder, carol signed in only), each
/// with password `NAME-pw`, and the policy file, in `dir`.
fn auth_files(dir: &Path) -> (PathBuf, PathBuf) {
    let users = dir.join("htpasswd");
    for u in ["alice", "bob", "carol"] {
        htpasswd(&users, u, &format!("{u}-pw"));
    }
    let policy = dir.join("access.toml");
    std::fs::write(&policy, POLICY).expect("policy");
    (users, policy)
}

fn basic(user: &str, password: &str) -> String {
    use base64::Engine as _;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    )
}

/// A client that sends `authorization` on every request and follows redirects (blob GETs
/// go to a replica by a signed URL in `flotilla dev`).
fn authed(base: &str, authorization: &str) -> Oci {
    let mut h = reqwest::header::HeaderMap::new();
    h.insert(
        reqwest::header::AUTHORIZATION,
        authorization.parse().expect("header"),
    );
    Oci {
        base: base.to_owned(),
        http: reqwest::Client::builder()
            .default_headers(h)
            .timeout(Duration::from_secs(30))
            .build()
            .expect("client"),
    }
}

fn anonymous(base: &str) -> Oci {
    Oci {
        base: base.to_owned(),
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .expect("client"),
    }
}

/// `flotilla dev` with extra flags, ready; its log on stderr goes to a file.
struct Dev {
    _child: KillOnDrop,
    port: u16,
    log: PathBuf,
}

impl Dev {
    async fn start(dir: &Path, args: &[&str]) -> Dev {
        let port = free_port();
        let log = dir.join(format!("dev-{port}.log"));
        let child = KillOnDrop(
            Command::new(env!("CARGO_BIN_EXE_flotilla"))
                .args(["dev", "--listen", &format!("127.0.0.1:{port}"), "--data"])
                .arg(dir.join(format!("data-{port}")))
                .args(args)
                .env("RUST_LOG", "info")
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).expect("log file"))
                .spawn()
                .expect("spawn flotilla dev"),
        );
        let dev = Dev {
            _child: child,
            port,
            log,
        };
        wait_http_ok(&format!("{}/readyz", dev.url()), CLUSTER_TIMEOUT).await;
        dev
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

fn www_authenticate(r: &reqwest::Response) -> String {
    r.headers()
        .get("www-authenticate")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

/// Status, challenge and OCI error code of a response that must be an error.
async fn refusal(r: reqwest::Response) -> (u16, String, String) {
    let status = r.status().as_u16();
    let challenge = www_authenticate(&r);
    (status, challenge, error_code(r).await)
}

/// The node URLs, as an admin sees them.
async fn node_urls(admin: &Oci) -> Vec<String> {
    let r = admin.get("/admin/v1/nodes").await;
    assert_eq!(r.status(), 200);
    let nodes: Value = r.json().await.expect("nodes JSON");
    nodes
        .as_array()
        .expect("array")
        .iter()
        .map(|n| {
            n["url"]
                .as_str()
                .expect("url")
                .trim_end_matches('/')
                .to_owned()
        })
        .collect()
}

fn docker(config: &Path) -> Command {
    let mut c = Command::new(require_tool("docker"));
    c.arg("--config").arg(config);
    c
}

/// `docker login` (into a private config dir) then import, push, rmi and pull a fresh image;
/// returns the pushed reference (the guard removes it from the engine).
async fn docker_login_push_pull(host: &str, repo: &str, user: &str, password: &str, tmp: &Path) {
    let config = tmp.join(format!("docker-{}", unique()));
    std::fs::create_dir_all(&config).expect("docker config dir");
    let tag = format!("e2e-{}", unique());
    let reference = format!("{host}/{repo}:{tag}");
    let tarball = tmp.join(format!("rootfs-{tag}.tar"));
    std::fs::write(&tarball, tar_bytes(&[("auth/README", tag.as_bytes())])).expect("tarball");
    let guard = DockerImages(vec![reference.clone()]);
    let (host, user, password) = (host.to_owned(), user.to_owned(), password.to_owned());
    let guard = blocking(move || {
        // A wrong password: `docker login` itself fails.
        let bad = docker(&config)
            .args(["login", "-u", &user, "--password-stdin", &host])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                use std::io::Write as _;
                c.stdin
                    .take()
                    .expect("stdin")
                    .write_all(b"not-the-password")?;
                c.wait_with_output()
            })
            .expect("docker login");
        assert!(
            !bad.status.success(),
            "docker login with a wrong password must fail"
        );
        let ok = docker(&config)
            .args(["login", "-u", &user, "-p", &password, &host])
            .output()
            .expect("docker login");
        assert!(
            ok.status.success(),
            "docker login: {}",
            String::from_utf8_lossy(&ok.stderr)
        );
        run(docker(&config).arg("import").arg(&tarball).arg(&reference));
        let id = run(docker(&config).args(["image", "inspect", "--format", "{{.Id}}", &reference]));
        run(docker(&config).args(["push", &reference]));
        run(docker(&config).args(["rmi", &reference]));
        run(docker(&config).args(["pull", &reference]));
        let again =
            run(docker(&config).args(["image", "inspect", "--format", "{{.Id}}", &reference]));
        assert_eq!(id.trim(), again.trim(), "docker pulled what it pushed");
        // Logged out, the same pull is refused.
        run(docker(&config).args(["logout", &host]));
        run(docker(&config).args(["rmi", &reference]));
        let out = docker(&config)
            .args(["pull", &reference])
            .output()
            .expect("docker pull");
        assert!(
            !out.status.success(),
            "an anonymous docker pull of {reference} must fail"
        );
        guard
    })
    .await;
    crate::clients::guard_cleanup(guard).await;
}

/// skopeo copies an OCI layout to `dest` with `creds`; returns whether it succeeded and
/// its stderr.
async fn skopeo_push(layout: &Path, dest: String, creds: Option<&str>) -> (bool, String) {
    let src = format!("oci:{}:v1", layout.display());
    let creds = creds.map(str::to_owned);
    blocking(move || {
        let mut c = skopeo();
        c.args(["copy", "--dest-tls-verify=false"]);
        if let Some(creds) = creds {
            c.arg("--dest-creds").arg(creds);
        }
        let out = c.arg(src).arg(dest).output().expect("skopeo");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    })
    .await
}

/// podman logs in (its own auth file), pulls `src` (`repo:tag` on `host`, pushed by
/// skopeo), pushes it as `dest_repo:v1`, removes it and pulls it back; without the auth
/// file it is refused.
async fn podman_login_push_pull(
    host: &str,
    src: &str,
    dest_repo: &str,
    user: &str,
    password: &str,
) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let authfile = tmp.path().join("auth.json");
    let src = format!("{host}/{src}");
    let dest = format!("{host}/{dest_repo}:v1");
    let (host, user, password) = (host.to_owned(), user.to_owned(), password.to_owned());
    let pm = Podman::new();
    let config_hex = single_image().config.hex().to_owned();
    blocking(move || {
        let none = tmp.path().join("none.json");
        std::fs::write(&none, "{}").expect("empty auth file");
        let out = pm
            .cmd()
            .args(["pull", "--tls-verify=false", "--authfile"])
            .arg(&none)
            .arg(&src)
            .output()
            .expect("podman");
        assert!(
            !out.status.success(),
            "podman without credentials must be refused"
        );
        run(pm
            .cmd()
            .args([
                "login",
                "--tls-verify=false",
                "-u",
                &user,
                "-p",
                &password,
                "--authfile",
            ])
            .arg(&authfile)
            .arg(&host));
        let with_auth = |args: &[&str]| {
            let mut c = pm.cmd();
            c.arg(args[0])
                .args(["--tls-verify=false", "--authfile"])
                .arg(&authfile)
                .args(&args[1..]);
            c
        };
        pm.pull_checked_with(with_auth(&["pull", &src]), &src, &config_hex);
        run(pm.cmd().args(["tag", &src, &dest]));
        run(&mut with_auth(&["push", &dest]));
        run(pm.cmd().args(["rmi", "--all", "--force"]));
        pm.pull_checked_with(with_auth(&["pull", &dest]), &dest, &config_hex);
        drop(pm);
    })
    .await;
}

fn layout_with_image(dir: &Path) -> PathBuf {
    let layout = dir.join(format!("layout-{}", unique()));
    let img = single_image();
    let mut l = Layout::new(&layout);
    l.put_image(&img);
    l.tag("v1", OCI_MANIFEST, &img.manifest);
    layout
}

#[tokio::test(flavor = "multi_thread")]
async fn basic_auth_and_the_access_policy_hold_for_every_client_and_every_door() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (users, policy) = auth_files(tmp.path());

    // Other hash types are refused at start, naming the line.
    let md5 = tmp.path().join("md5.htpasswd");
    run(Command::new("htpasswd")
        .args(["-m", "-b", "-c"])
        .arg(&md5)
        .args(["eve", "pw"]));
    let out = Command::new(env!("CARGO_BIN_EXE_flotilla"))
        .args([
            "dev",
            "--listen",
            &format!("127.0.0.1:{}", free_port()),
            "--data",
        ])
        .arg(tmp.path().join("md5-data"))
        .arg("--htpasswd")
        .arg(&md5)
        .output()
        .expect("flotilla dev");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "an MD5 htpasswd must be refused");
    assert!(err.contains("bcrypt") && err.contains("line 1"), "{err}");

    let dev = Dev::start(
        tmp.path(),
        &[
            "--htpasswd",
            users.to_str().unwrap(),
            "--access",
            policy.to_str().unwrap(),
        ],
    )
    .await;
    assert!(dev.log().contains("authentication on"), "{}", dev.log());
    let url = dev.url();
    let anon = anonymous(&url);
    let (alice, bob, carol) = (
        authed(&url, &basic("alice", "alice-pw")),
        authed(&url, &basic("bob", "bob-pw")),
        authed(&url, &basic("carol", "carol-pw")),
    );

    // Anonymous and wrong passwords get the Basic challenge and UNAUTHORIZED.
    for c in [&anon, &authed(&url, &basic("bob", "wrong"))] {
        let (s, ch, code) = refusal(c.get("/v2/").await).await;
        assert_eq!(
            (s, ch.as_str(), code.as_str()),
            (401, "Basic realm=\"flotilla\"", "UNAUTHORIZED")
        );
    }
    assert_eq!(bob.get("/v2/").await.status(), 200);
    // Health and metrics stay open.
    for path in ["/healthz", "/readyz", "/metrics"] {
        assert_eq!(anon.get(path).await.status(), 200, "{path}");
    }

    // Push by the builders' group, pull by anyone signed in, nothing for the rest.
    let app = push_image(&bob, "team/app", "v1").await;
    try_pull(&carol, &app)
        .await
        .expect("carol may pull team/**");
    let refused = try_push_image(&carol, "team/app", "v2", &layer_for("carol", 512)).await;
    assert!(
        refused.as_ref().is_err_and(|e| e.contains("403")),
        "{refused:?}"
    );
    let r = carol
        .http
        .post(carol.url("/v2/team/app/blobs/uploads/"))
        .send()
        .await
        .expect("POST");
    assert_eq!(refusal(r).await, (403, String::new(), "DENIED".into()));
    let r = anon.get("/v2/team/app/manifests/v1").await;
    assert_eq!(refusal(r).await.0, 401);

    // Anonymous pull of public/**, never push.
    let public = push_image(&bob, "public/base", "1").await;
    try_pull(&anon, &public)
        .await
        .expect("anonymous pull of public/**");
    let r = anon
        .http
        .post(anon.url("/v2/public/base/blobs/uploads/"))
        .send()
        .await
        .expect("POST");
    assert_eq!(refusal(r).await.0, 401);

    // Immutable tags: created once, the same digest again is fine, another digest is not.
    let rel = push_image(&bob, "team/app", "release-1").await;
    let again = try_push_image(
        &bob,
        "team/app",
        "release-1",
        &layer_for("team/app:release-1", 4096),
    )
    .await;
    assert_eq!(again.expect("same digest re-pushed").manifest, rel.manifest);
    let moved = try_push_image(&bob, "team/app", "release-1", &layer_for("other", 4096)).await;
    let e = moved.expect_err("moving an immutable tag");
    assert!(
        e.contains("403") && e.contains("DENIED") && e.contains("immutable"),
        "{e}"
    );
    try_pull(&anon.clone(), &rel)
        .await
        .expect_err("anonymous may not pull team/**");
    try_pull(&carol, &rel)
        .await
        .expect("release-1 still names the first image");
    // Mutable tags still move.
    try_push_image(&bob, "team/app", "v1", &layer_for("v1 again", 4096))
        .await
        .expect("v1 is not immutable");

    // Delete and the admin API are for admins only.
    let r = bob
        .http
        .delete(bob.url(&format!("/v2/team/app/manifests/{}", app.manifest)))
        .send()
        .await
        .expect("DELETE");
    assert_eq!(refusal(r).await, (403, String::new(), "DENIED".into()));
    for path in ["/admin/v1/nodes", "/admin/v1/shards", "/v2/_catalog"] {
        assert_eq!(refusal(anon.get(path).await).await.0, 401, "{path}");
        let (s, _, code) = refusal(bob.get(path).await).await;
        assert_eq!((s, code.as_str()), (403, "DENIED"), "{path}");
        assert_eq!(alice.get(path).await.status(), 200, "{path}");
    }
    let r = bob
        .http
        .post(bob.url("/admin/v1/nodes/n1/drain"))
        .send()
        .await
        .expect("POST");
    assert_eq!(r.status(), 403);

    // The nodes: no write without the router's credential, no read without a signed URL.
    let nodes = node_urls(&alice).await;
    assert!(!nodes.is_empty());
    for n in &nodes {
        let r = reqwest::Client::new()
            .post(format!("{n}/v2/team/app/blobs/uploads/"))
            .header("authorization", basic("alice", "alice-pw"))
            .send()
            .await
            .expect("POST to a node");
        assert_eq!(
            refusal(r).await,
            (403, String::new(), "DENIED".into()),
            "{n}"
        );
        let r = reqwest::Client::new()
            .get(format!("{n}/v2/team/app/blobs/{}", app.blobs[1]))
            .send()
            .await
            .expect("GET from a node");
        assert_eq!(r.status(), 401, "{n}");
    }

    // The real clients.
    docker_login_push_pull(&dev.host(), "team/docker", "bob", "bob-pw", tmp.path()).await;
    let layout = layout_with_image(tmp.path());
    let dest = format!("docker://{}/team/skopeo:v1", dev.host());
    let (ok, err) = skopeo_push(&layout, dest.clone(), Some("bob:bob-pw")).await;
    assert!(ok, "skopeo --dest-creds bob: {err}");
    let (ok, err) = skopeo_push(&layout, dest.replace(":v1", ":v2"), Some("carol:carol-pw")).await;
    assert!(!ok && err.contains("denied"), "carol may not push: {err}");
    let (ok, err) = skopeo_push(&layout, dest.replace(":v1", ":v3"), None).await;
    assert!(!ok, "anonymous skopeo push must fail: {err}");
    podman_login_push_pull(
        &dev.host(),
        "team/skopeo:v1",
        "team/podman",
        "bob",
        "bob-pw",
    )
    .await;

    // A user added to the file can sign in without a restart.
    let dave = authed(&url, &basic("dave", "dave-pw"));
    assert_eq!(dave.get("/v2/").await.status(), 401);
    htpasswd(&users, "dave", "dave-pw");
    // Polled once a second, the pace the file is re-read at: each refusal before the reload
    // is a failed password, and those are budgeted per address.
    let mut accepted = false;
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(1100)).await;
        if dave.get("/v2/").await.status() == 200 {
            accepted = true;
            break;
        }
    }
    assert!(accepted, "dave accepted within 10 s of the file changing");

    // Guessing passwords is throttled per address (last: it closes this address for 60 s),
    // while signed-in users already checked keep working.
    let guesser = authed(&url, &basic("alice", "guess"));
    let mut throttled = None;
    for _ in 0..20 {
        let r = guesser.get("/v2/").await;
        if r.status() == 429 {
            throttled = Some(r);
            break;
        }
        assert_eq!(r.status(), 401);
    }
    let r = throttled.expect("wrong passwords throttled within 20 tries");
    let wait: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&wait), "{wait}");
    assert_eq!(error_code(r).await, "TOOMANYREQUESTS", "the spec's code");
    assert_eq!(
        bob.get("/v2/").await.status(),
        200,
        "a cached login is not throttled"
    );
}

/// An EC P-256 key and a self-signed certificate for it (what an external issuer publishes).
fn signing_key(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let (key, crt) = (format!("{name}.pem"), format!("{name}.crt"));
    crate::tls::openssl(
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
            "-subj",
            &format!("/CN={name}"),
            "-keyout",
            &key,
            "-out",
            &crt,
        ],
        dir,
    );
    (dir.join(key), dir.join(crt))
}

/// A token the test signs itself with `key` (as a misbehaving or foreign issuer would).
fn forged(key: &Path, iss: &str, aud: &str, exp_from_now: i64, access: Value) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let claims = serde_json::json!({
        "iss": iss, "sub": "bob", "aud": aud, "exp": now + exp_from_now,
        "nbf": now - 300, "iat": now - 300, "jti": unique(), "access": access,
    });
    let pem = std::fs::read(key).expect("key");
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256),
        &claims,
        &jsonwebtoken::EncodingKey::from_ec_pem(&pem).expect("EC key"),
    )
    .expect("sign")
}

async fn token(base: &str, basic_auth: Option<&str>, scope: &str) -> (u16, Value) {
    let mut req = reqwest::Client::new()
        .get(format!("{base}/auth/token"))
        .query(&[("service", "flotilla"), ("scope", scope)]);
    if let Some(b) = basic_auth {
        req = req.header("authorization", b);
    }
    let r = req.send().await.expect("token GET");
    let s = r.status().as_u16();
    (s, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread")]
async fn tokens_issued_by_the_router_and_by_an_external_issuer_are_checked_for_every_claim() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (users, policy) = auth_files(tmp.path());
    let (key, crt) = signing_key(tmp.path(), "issuer");
    let (foreign_key, _) = signing_key(tmp.path(), "foreign");

    // The issuer: authenticates users (Basic at its realm) and signs their tokens.
    let issuer = Dev::start(
        tmp.path(),
        &[
            "--htpasswd",
            users.to_str().unwrap(),
            "--access",
            policy.to_str().unwrap(),
            "--token-key",
            key.to_str().unwrap(),
        ],
    )
    .await;
    let url = issuer.url();
    let anon = anonymous(&url);
    let r = anon.get("/v2/team/app/manifests/v1").await;
    let (s, ch, code) = refusal(r).await;
    assert_eq!((s, code.as_str()), (401, "UNAUTHORIZED"));
    assert_eq!(
        ch,
        format!("Bearer realm=\"{url}/auth/token\",service=\"flotilla\",scope=\"repository:team/app:pull\"")
    );

    // The token endpoint cuts scopes down to the policy.
    let (s, t) = token(
        &url,
        Some(&basic("bob", "bob-pw")),
        "repository:team/app:pull,push",
    )
    .await;
    assert_eq!(s, 200, "{t}");
    let bob_rw = t["token"].as_str().expect("token").to_owned();
    assert_eq!(t["access_token"], t["token"]);
    assert!(t["expires_in"].as_u64().is_some_and(|e| e > 0));
    let (_, t) = token(
        &url,
        Some(&basic("carol", "carol-pw")),
        "repository:team/app:pull,push",
    )
    .await;
    let carol_ro = t["token"].as_str().expect("token").to_owned();
    let (s, _) = token(
        &url,
        Some(&basic("carol", "wrong")),
        "repository:team/app:pull",
    )
    .await;
    assert_eq!(s, 401, "the realm refuses a wrong password");
    let bob = authed(&url, &format!("Bearer {bob_rw}"));
    let app = push_image(&bob, "team/app", "v1").await;
    let carol = authed(&url, &format!("Bearer {carol_ro}"));
    try_pull(&carol, &app)
        .await
        .expect("carol's token grants pull");
    let r = carol
        .http
        .post(carol.url("/v2/team/app/blobs/uploads/"))
        .send()
        .await
        .expect("POST");
    let (s, ch, code) = refusal(r).await;
    assert_eq!((s, code.as_str()), (401, "UNAUTHORIZED"));
    assert!(
        ch.contains("error=\"insufficient_scope\"")
            && ch.contains("scope=\"repository:team/app:pull,push\""),
        "{ch}"
    );
    // A token for one repository is nothing in another; nor for the admin API.
    let r = bob
        .get(&format!("/v2/team/other/manifests/{}", app.manifest))
        .await;
    assert!(www_authenticate(&r).contains("insufficient_scope"));
    assert_eq!(refusal(bob.get("/admin/v1/nodes").await).await.0, 401);
    let (_, t) = token(&url, Some(&basic("alice", "alice-pw")), "registry:admin:*").await;
    let admin = authed(&url, &format!("Bearer {}", t["token"].as_str().unwrap()));
    assert_eq!(admin.get("/admin/v1/nodes").await.status(), 200);
    let (_, t) = token(&url, Some(&basic("bob", "bob-pw")), "registry:admin:*").await;
    let not_admin = authed(&url, &format!("Bearer {}", t["token"].as_str().unwrap()));
    assert_eq!(refusal(not_admin.get("/admin/v1/nodes").await).await.0, 401);

    // Tokens that do not verify: expired, for another service, from another issuer name,
    // signed by a key nobody trusts, or garbage.
    let pull = serde_json::json!([{"type": "repository", "name": "team/app", "actions": ["pull"]}]);
    let cases = [
        (
            "expired",
            forged(&key, "flotilla", "flotilla", -120, pull.clone()),
            "expired",
        ),
        (
            "wrong audience",
            forged(&key, "flotilla", "elsewhere", 300, pull.clone()),
            "service",
        ),
        (
            "wrong issuer",
            forged(&key, "mallory", "flotilla", 300, pull.clone()),
            "issuer",
        ),
        (
            "foreign key",
            forged(&foreign_key, "flotilla", "flotilla", 300, pull.clone()),
            "signature",
        ),
        ("garbage", "not.a.token".to_owned(), "malformed"),
    ];
    for (what, t, why) in cases {
        let c = authed(&url, &format!("Bearer {t}"));
        let r = c
            .get(&format!("/v2/team/app/manifests/{}", app.manifest))
            .await;
        let status = r.status().as_u16();
        let ch = www_authenticate(&r);
        let body = r.text().await.unwrap_or_default();
        assert_eq!(status, 401, "{what}: {body}");
        assert!(ch.contains("error=\"invalid_token\""), "{what}: {ch}");
        assert!(
            body.contains("UNAUTHORIZED") && body.contains(why),
            "{what}: {body}"
        );
    }
    // The same claims signed right are accepted (so the refusals above were the claims').
    let good = authed(
        &url,
        &format!("Bearer {}", forged(&key, "flotilla", "flotilla", 300, pull)),
    );
    assert_eq!(
        good.get(&format!("/v2/team/app/manifests/{}", app.manifest))
            .await
            .status(),
        200
    );

    // Real clients through the token flow.
    docker_login_push_pull(&issuer.host(), "team/docker", "bob", "bob-pw", tmp.path()).await;
    let layout = layout_with_image(tmp.path());
    let dest = format!("docker://{}/team/skopeo:v1", issuer.host());
    let (ok, err) = skopeo_push(&layout, dest.clone(), Some("bob:bob-pw")).await;
    assert!(ok, "skopeo with a token: {err}");
    let (ok, err) = skopeo_push(&layout, dest.replace(":v1", ":v2"), Some("carol:carol-pw")).await;
    assert!(!ok, "carol's token cannot push: {err}");
    podman_login_push_pull(
        &issuer.host(),
        "team/skopeo:v1",
        "team/podman",
        "bob",
        "bob-pw",
    )
    .await;

    // A registry that only verifies: it trusts the issuer's certificate and sends clients
    // to the issuer's realm; it has no users of its own.
    let verifier = Dev::start(
        tmp.path(),
        &[
            "--token-realm",
            &format!("{url}/auth/token"),
            "--token-cert",
            crt.to_str().unwrap(),
            "--access",
            policy.to_str().unwrap(),
        ],
    )
    .await;
    let v = anonymous(&verifier.url());
    let r = v.get("/v2/").await;
    assert_eq!(
        www_authenticate(&r),
        format!("Bearer realm=\"{url}/auth/token\",service=\"flotilla\"")
    );
    let r = authed(&verifier.url(), &basic("bob", "bob-pw"))
        .get("/v2/")
        .await;
    assert_eq!(r.status(), 401, "no Basic users on a verify-only registry");
    let vb = authed(&verifier.url(), &format!("Bearer {bob_rw}"));
    let pushed = push_image(&vb, "team/app", "external").await;
    try_pull(&vb, &pushed)
        .await
        .expect("pull with the external token");
    let fb = authed(
        &verifier.url(),
        &format!(
            "Bearer {}",
            forged(
                &foreign_key,
                "flotilla",
                "flotilla",
                300,
                serde_json::json!([])
            )
        ),
    );
    assert_eq!(fb.get("/v2/").await.status(), 401);
    docker_login_push_pull(
        &verifier.host(),
        "team/external",
        "bob",
        "bob-pw",
        tmp.path(),
    )
    .await;
}

/// Two routers, two pushes racing to create the same immutable tag with different
/// manifests: exactly one wins, everywhere, and the tag names the winner afterwards (the
/// bind is a create-only write in the metadata store; a check of the replicas alone lets
/// both through).
#[tokio::test(flavor = "multi_thread")]
async fn racing_pushes_to_an_immutable_tag_through_two_routers_have_one_winner() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (users, policy) = auth_files(tmp.path());
    let mut c = crate::cluster_support::ClusterProc::start_with(
        0,
        crate::cluster_support::ClusterOpts {
            admin_authorization: Some(basic("alice", "alice-pw")),
            ..Default::default()
        },
    )
    .await;
    let args = [
        "--htpasswd",
        users.to_str().unwrap(),
        "--access",
        policy.to_str().unwrap(),
    ];
    let routers: Vec<Oci> = {
        let a = c.add_router(&args).await;
        let b = c.add_router(&args).await;
        [a, b]
            .iter()
            .map(|&r| authed(&c.router(r).base, &basic("bob", "bob-pw")))
            .collect()
    };
    let manifest_of = |oci: &Oci, tag: String| {
        let oci = oci.clone();
        async move {
            let r = oci
                .http
                .get(oci.url(&format!("/v2/team/race/manifests/{tag}")))
                .header("accept", OCI_MANIFEST)
                .send()
                .await
                .expect("GET manifest");
            assert_eq!(r.status(), 200);
            r.bytes().await.expect("manifest").to_vec()
        }
    };
    for i in 0..8 {
        // Both images' blobs and manifests exist first, so only the tag writes race.
        let a = try_push_image(
            &routers[0],
            "team/race",
            &format!("a{i}"),
            &layer_for(&format!("a{i}"), 1024),
        )
        .await
        .expect("push a");
        let b = try_push_image(
            &routers[1],
            "team/race",
            &format!("b{i}"),
            &layer_for(&format!("b{i}"), 1024),
        )
        .await
        .expect("push b");
        let (ma, mb) = (
            manifest_of(&routers[0], a.tag.clone()).await,
            manifest_of(&routers[1], b.tag.clone()).await,
        );
        let tag = format!("release-{i}");
        let (ra, rb) = tokio::join!(
            routers[0].put_manifest("team/race", &tag, OCI_MANIFEST, &ma),
            routers[1].put_manifest("team/race", &tag, OCI_MANIFEST, &mb),
        );
        let statuses = [ra.status().as_u16(), rb.status().as_u16()];
        let winner = match statuses {
            [201, 403] => &a.manifest,
            [403, 201] => &b.manifest,
            other => panic!("{tag}: exactly one push may create an immutable tag: {other:?}"),
        };
        for oci in &routers {
            let got = manifest_of(oci, tag.clone()).await;
            assert_eq!(
                &sha256(&got),
                winner,
                "{tag} names the winner on every router"
            );
        }
    }
}

/// The deploy agent's sources endpoint sits behind the blob's own pull permission: anonymous
/// and wrong-password requests get the 401 and no signed URL; a user who may pull gets a URL
/// per replica that a node honours without the cluster secret. `flotilla agent pull` signs
/// in with `--user`/`--password-file`, and without them is refused.
#[tokio::test(flavor = "multi_thread")]
async fn the_agents_blob_sources_need_the_blobs_pull_permission() {
    require_tool("docker");
    let tmp = tempfile::tempdir().expect("tempdir");
    let (users, policy) = auth_files(tmp.path());
    let dev = Dev::start(
        tmp.path(),
        &[
            "--htpasswd",
            users.to_str().unwrap(),
            "--access",
            policy.to_str().unwrap(),
        ],
    )
    .await;
    let url = dev.url();
    let bob = authed(&url, &basic("bob", "bob-pw"));
    let p = crate::agent::push_tar_image(&bob, "team/agent", "v1").await;
    let sources = format!("/v2/team/agent/blobs/{}?flotilla-sources", p.blobs[1]);
    for c in [&anonymous(&url), &authed(&url, &basic("carol", "wrong"))] {
        let r = c.get(&sources).await;
        assert_eq!(r.status(), 401);
        let body = r.text().await.expect("body");
        assert!(!body.contains("flotilla-signature"), "{body}");
    }
    let r = authed(&url, &basic("carol", "carol-pw"))
        .get(&sources)
        .await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.expect("sources JSON");
    assert_eq!(v["key"], "team/agent");
    let list = v["sources"].as_array().expect("sources");
    assert_eq!(list.len(), 2, "{v}");
    for s in list {
        let signed = s["url"].as_str().expect("url");
        let got = anonymous(&url).http.get(signed).send().await.expect("GET");
        assert_eq!(got.status(), 200, "{signed}");
        assert_eq!(sha256(&got.bytes().await.expect("bytes")), p.blobs[1]);
        // The same path without the signature is refused.
        let bare = signed.split_once('?').expect("query").0;
        let got = anonymous(&url).http.get(bare).send().await.expect("GET");
        assert_eq!(got.status(), 401, "{bare}");
    }

    let name = format!("{}/team/agent:v1", dev.host());
    let guard = DockerImages(vec![name.clone()]);
    let image = "team/agent:v1";
    let (out, _) = crate::agent::agent_pull(std::slice::from_ref(&url), image, &[]).await;
    assert!(!out.status.success(), "anonymous agent pull must fail");
    assert!(String::from_utf8_lossy(&out.stderr).contains("401"));
    assert_eq!(crate::agent::engine_image_id(&name).await, None);
    let pw = tmp.path().join("carol.pw");
    std::fs::write(&pw, "carol-pw\n").expect("password file");
    let pw = pw.to_str().unwrap();
    let (out, _) = crate::agent::agent_pull(
        std::slice::from_ref(&url),
        image,
        &["--user", "carol", "--password-file", pw],
    )
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        crate::agent::engine_image_id(&name).await.as_deref(),
        Some(p.blobs[0].as_str())
    );
    crate::clients::guard_cleanup(guard).await;
}
