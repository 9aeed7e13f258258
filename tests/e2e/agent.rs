//! `flotilla agent pull` against the real Docker engine: through a cluster whose key loses
//! its primary, then has its partner's copy of the layer corrupted on disk, then loses both
//! replicas; and through a hostile registry (a real server in this process) whose sources
//! serve corrupt bytes, first with one honest source among them, then with none. Each time
//! the engine ends with the pushed image (compared by image id, the config digest), or the
//! command fails and the engine holds nothing new.

use std::collections::HashMap;
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Path as AxPath, State};
use axum::response::{IntoResponse, Response};

use crate::clients::{blocking, unique, DockerImages};
use crate::cluster_support::{poll, try_push_image, ClusterProc, Pushed};
use crate::support::*;

/// Run `flotilla agent pull`; its output and how long it took.
pub(crate) async fn agent_pull(
    routers: &[String],
    image: &str,
    extra: &[&str],
) -> (Output, Duration) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_flotilla"));
    cmd.args(["agent", "pull", "--router", &routers.join(",")])
        .args(extra)
        .arg(image)
        .env("RUST_LOG", "info");
    blocking(move || {
        let t = Instant::now();
        let out = cmd.output().expect("run flotilla agent pull");
        (out, t.elapsed())
    })
    .await
}

/// The engine's image id for `name`, if it has the image.
pub(crate) async fn engine_image_id(name: &str) -> Option<String> {
    let name = name.to_owned();
    blocking(move || {
        let out = Command::new("docker")
            .args(["image", "inspect", "--format", "{{.Id}}", &name])
            .output()
            .expect("docker image inspect");
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
    })
    .await
}

async fn docker_rmi(name: &str) {
    let name = name.to_owned();
    blocking(move || {
        let _ = Command::new("docker")
            .args(["rmi", "--force", &name])
            .output();
    })
    .await
}

fn text(out: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A pull that must succeed and leave `p` in the engine under `host/repo:tag`.
async fn assert_pulled(routers: &[String], host: &str, p: &Pushed, what: &str) -> Duration {
    let name = format!("{host}/{}:{}", p.repo, p.tag);
    docker_rmi(&name).await;
    let (out, took) = agent_pull(routers, &format!("{}:{}", p.repo, p.tag), &[]).await;
    assert!(out.status.success(), "{what}: {}", text(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        p.manifest,
        "{what}: the manifest digest on stdout"
    );
    assert_eq!(
        engine_image_id(&name).await.as_deref(),
        Some(p.blobs[0].as_str()),
        "{what}: the engine holds the pushed image"
    );
    took
}

/// A one-file image pushed through `c` (config + one uncompressed tar layer), runnable
/// metadata included, so the engine can load it.
pub(crate) async fn push_tar_image(c: &Oci, repo: &str, tag: &str) -> Pushed {
    let layer = tar_bytes(&[(
        "app/README",
        format!("flotilla agent e2e {repo}:{tag} {}\n", unique()).as_bytes(),
    )]);
    try_push_image(c, repo, tag, &layer)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn agent_pull_fails_over_past_a_dead_primary_and_a_corrupt_partner() {
    require_tool("docker");
    let mut cluster = ClusterProc::start(1).await;
    let routers = vec![cluster.routers[0].url()];
    let host = cluster.routers[0].host();
    let key = format!("agent-{}/pull", std::process::id());
    let p = push_tar_image(&cluster.router(0), &format!("{key}/app"), "v1").await;
    let guard = DockerImages(vec![format!("{host}/{}:{}", p.repo, p.tag)]);
    let layer = p.blobs[1].clone();

    assert_pulled(&routers, &host, &p, "healthy").await;
    // A dead router first in --router: the next one resolves and hands out the sources (the
    // image is still named after the first, as configured).
    let dead = format!("127.0.0.1:{}", free_port());
    let both = vec![format!("http://{dead}"), routers[0].clone()];
    let took = assert_pulled(&both, &dead, &p, "first router dead").await;
    assert!(
        took < Duration::from_secs(10),
        "first router dead: took {took:?}"
    );
    docker_rmi(&format!("{dead}/{}:{}", p.repo, p.tag)).await;

    let replicas = cluster.replicas(0, &key).await;
    let (primary, partner) = (replicas[0].clone(), replicas[1].clone());
    cluster.kill9(&primary);
    let took = assert_pulled(&routers, &host, &p, "primary dead").await;
    assert!(
        took < Duration::from_secs(10),
        "primary dead: took {took:?}"
    );

    // The partner's copy of the layer, corrupted on disk (same length, one byte off): the
    // pull still ends with the pushed image.
    let node = cluster.node(&partner);
    poll(
        "the partner's copy of the layer",
        Duration::from_secs(30),
        || async { node.has_blob(&layer).then_some(()) },
    )
    .await;
    let hex = layer.strip_prefix("sha256:").expect("sha256");
    let path = node.data.join("blobs/sha256").join(&hex[..2]).join(hex);
    let mut bytes = std::fs::read(&path).expect("read the partner's layer");
    bytes[600] ^= 0xff;
    std::fs::write(&path, &bytes).expect("corrupt the partner's layer");
    assert_pulled(&routers, &host, &p, "primary dead, partner's layer corrupt").await;

    // Both replicas gone: a clear failure within seconds, naming the key; nothing loaded.
    cluster.kill9(&partner);
    let name = format!("{host}/{}:{}", p.repo, p.tag);
    docker_rmi(&name).await;
    let (out, took) = agent_pull(&routers, &format!("{}:{}", p.repo, p.tag), &[]).await;
    assert!(!out.status.success(), "both replicas dead: {}", text(&out));
    assert!(
        took < Duration::from_secs(10),
        "both replicas dead: took {took:?}"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&key), "the error names the key {key}: {err}");
    assert_eq!(engine_image_id(&name).await, None);
    crate::clients::guard_cleanup(guard).await;
}

/// A registry that lies: it answers the manifest honestly, hands out `sources` pointing
/// back at itself, and serves each blob corrupt from every source but `honest` (if any).
struct Hostile {
    repo: String,
    tag: String,
    manifest: Vec<u8>,
    blobs: HashMap<String, Vec<u8>>,
    port: u16,
    honest: Option<usize>,
}

fn corrupt(b: &[u8]) -> Vec<u8> {
    let mut b = b.to_vec();
    let i = b.len() / 2;
    b[i] ^= 0x01;
    b
}

async fn hostile_v2(State(h): State<Arc<Hostile>>, AxPath(rest): AxPath<String>) -> Response {
    let (manifest_path, tag_path) = (
        format!("{}/manifests/{}", h.repo, sha256(&h.manifest)),
        format!("{}/manifests/{}", h.repo, h.tag),
    );
    if rest == manifest_path || rest == tag_path {
        return ([("content-type", OCI_MANIFEST)], h.manifest.clone()).into_response();
    }
    if let Some(digest) = rest.strip_prefix(&format!("{}/blobs/", h.repo)) {
        if let Some(b) = h.blobs.get(digest) {
            return corrupt(b).into_response(); // the router's own copy: corrupt too
        }
    }
    axum::http::StatusCode::NOT_FOUND.into_response()
}

async fn hostile_source(
    State(h): State<Arc<Hostile>>,
    AxPath((i, digest)): AxPath<(usize, String)>,
) -> Response {
    match h.blobs.get(&digest) {
        Some(b) if h.honest == Some(i) => b.clone().into_response(),
        Some(b) => corrupt(b).into_response(),
        None => axum::http::StatusCode::NOT_FOUND.into_response(),
    }
}

/// The sources answer, as the router gives it, when the query asks for it.
async fn hostile_blob(
    State(h): State<Arc<Hostile>>,
    AxPath(rest): AxPath<String>,
    q: axum::extract::RawQuery,
) -> Response {
    let Some(digest) = rest.rsplit('/').next().map(str::to_owned) else {
        return axum::http::StatusCode::NOT_FOUND.into_response();
    };
    if q.0.as_deref() == Some("flotilla-sources") {
        let sources: Vec<_> = (0..2)
            .map(|i| {
                serde_json::json!({"node": format!("h{i}"),
                    "url": format!("http://127.0.0.1:{}/source/{i}/{digest}", h.port)})
            })
            .collect();
        return axum::Json(serde_json::json!({"key": "hostile/key", "digest": digest,
            "expires_in_secs": 300, "sources": sources}))
        .into_response();
    }
    hostile_v2(State(h), AxPath(rest)).await
}

impl Hostile {
    /// The image's config digest: the id the engine gives the image once loaded.
    fn config_digest(&self) -> String {
        let (_, config) = self
            .blobs
            .iter()
            .find(|(_, b)| b.starts_with(b"{"))
            .expect("a config blob");
        sha256(config)
    }
}

async fn start_hostile(
    seed: &str,
    honest: Option<usize>,
) -> (Arc<Hostile>, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let layer = tar_bytes(&[(
        "app/README",
        format!("hostile {seed} {}\n", unique()).as_bytes(),
    )]);
    let config = format!(
        r#"{{"architecture":"amd64","os":"linux","rootfs":{{"type":"layers","diff_ids":["{}"]}}}}"#,
        sha256(&layer)
    );
    let (cd, ld) = (sha256(config.as_bytes()), sha256(&layer));
    let manifest = image_manifest(&cd, config.len(), &ld, layer.len()).into_bytes();
    let h = Arc::new(Hostile {
        repo: "hostile/key/app".into(),
        tag: seed.into(),
        manifest,
        blobs: HashMap::from([(cd, config.into_bytes()), (ld, layer)]),
        port,
        honest,
    });
    let app = axum::Router::new()
        .route("/v2/", axum::routing::get(|| async { "" }))
        .route("/source/{i}/{digest}", axum::routing::get(hostile_source))
        .route("/v2/{*rest}", axum::routing::get(hostile_blob))
        .with_state(h.clone());
    // Aborted when the test ends (the handle is dropped with the runtime).
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (h, task)
}

#[tokio::test(flavor = "multi_thread")]
async fn agent_pull_loads_only_verified_bytes() {
    require_tool("docker");
    // One honest source among corrupt ones: the pull moves past the corrupt copies.
    let (h, task) = start_hostile("one-honest", Some(1)).await;
    let router = format!("http://127.0.0.1:{}", h.port);
    let name = format!("127.0.0.1:{}/{}:{}", h.port, h.repo, h.tag);
    let guard = DockerImages(vec![name.clone()]);
    let config_digest = h.config_digest();
    let (out, _) = agent_pull(
        std::slice::from_ref(&router),
        &format!("{}:{}", h.repo, h.tag),
        &[],
    )
    .await;
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        engine_image_id(&name).await.as_deref(),
        Some(config_digest.as_str())
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("digest mismatch"),
        "the corrupt copies were refused: {err}"
    );
    task.abort();
    crate::clients::guard_cleanup(guard).await;

    // Every source corrupt: the command fails and the engine holds nothing new.
    let (h, task) = start_hostile("all-corrupt", None).await;
    let router = format!("http://127.0.0.1:{}", h.port);
    let name = format!("127.0.0.1:{}/{}:{}", h.port, h.repo, h.tag);
    let config_digest = h.config_digest();
    let (out, took) = agent_pull(
        std::slice::from_ref(&router),
        &format!("{}:{}", h.repo, h.tag),
        &[],
    )
    .await;
    assert!(!out.status.success(), "{}", text(&out));
    assert!(took < Duration::from_secs(10), "took {took:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no source delivered verified bytes") && err.contains("hostile/key"),
        "{err}"
    );
    assert_eq!(engine_image_id(&name).await, None);
    assert_eq!(
        engine_image_id(&config_digest).await,
        None,
        "no image of that id"
    );
    task.abort();
}

#[tokio::test(flavor = "multi_thread")]
async fn agent_pull_picks_the_engines_platform_from_an_index() {
    require_tool("docker");
    let arch = blocking(|| {
        run(Command::new("docker").args(["version", "--format", "{{.Server.Arch}}"]))
            .trim()
            .to_owned()
    })
    .await;
    let cluster = ClusterProc::start(1).await;
    let c = cluster.router(0);
    let host = cluster.routers[0].host();
    let repo = format!("agent-{}/multi/app", std::process::id());
    let (mut entries, mut want) = (Vec::new(), None);
    // The engine's own architecture last, so a pick of the first entry would be caught.
    let mut arches = vec!["riscv64".to_owned(), "s390x".to_owned(), arch.clone()];
    arches.dedup();
    for a in &arches {
        let layer = tar_bytes(&[("app/ARCH", format!("{a} {}\n", unique()).as_bytes())]);
        let config = format!(
            r#"{{"architecture":"{a}","os":"linux","rootfs":{{"type":"layers","diff_ids":["{}"]}}}}"#,
            sha256(&layer)
        );
        let cd = c.push_blob(&repo, config.as_bytes()).await;
        let ld = c.push_blob(&repo, &layer).await;
        let m = image_manifest(&cd, config.len(), &ld, layer.len());
        let md = sha256(m.as_bytes());
        let r = c.put_manifest(&repo, &md, OCI_MANIFEST, m.as_bytes()).await;
        assert_eq!(r.status(), 201, "{}", r.text().await.unwrap_or_default());
        entries.push(serde_json::json!({"mediaType": OCI_MANIFEST, "digest": md,
            "size": m.len(), "platform": {"os": "linux", "architecture": a}}));
        if *a == arch {
            want = Some(cd);
        }
    }
    let index = serde_json::json!({"schemaVersion": 2, "mediaType": OCI_INDEX,
        "manifests": entries})
    .to_string();
    let r = c
        .put_manifest(&repo, "v1", OCI_INDEX, index.as_bytes())
        .await;
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap_or_default());
    let name = format!("{host}/{repo}:v1");
    let guard = DockerImages(vec![name.clone()]);
    let (out, _) = agent_pull(&[cluster.routers[0].url()], &format!("{repo}:v1"), &[]).await;
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        sha256(index.as_bytes()),
        "stdout names the index the tag points at"
    );
    assert_eq!(
        engine_image_id(&name).await,
        want,
        "the engine's platform ({arch})"
    );
    crate::clients::guard_cleanup(guard).await;
}

/// A frozen replica (SIGSTOP: it accepts connections and never answers), the one the router
/// lists first, costs the pull seconds at most, never the engine's 30 s dial: either the
/// router's manifest read hedges past it (300 ms) and ejects it, so the sources list it last
/// (what happens here), or the agent's response-head deadline (`deploy_agent::fetch::HEAD`,
/// 3 s, blobs in parallel) moves on from it.
#[tokio::test(flavor = "multi_thread")]
async fn agent_pull_moves_past_a_frozen_replica_within_seconds() {
    require_tool("docker");
    let cluster = ClusterProc::start(1).await;
    let routers = vec![cluster.routers[0].url()];
    let host = cluster.routers[0].host();
    let key = format!("agent-{}/frozen", std::process::id());
    let p = push_tar_image(&cluster.router(0), &format!("{key}/app"), "v1").await;
    let guard = DockerImages(vec![format!("{host}/{}:{}", p.repo, p.tag)]);
    let r = cluster
        .router(0)
        .get(&format!(
            "/v2/{}/blobs/{}?flotilla-sources",
            p.repo, p.blobs[1]
        ))
        .await;
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().await.expect("sources");
    let first = v["sources"][0]["node"]
        .as_str()
        .expect("a source")
        .to_owned();
    let pid = cluster.node(&first).pid();
    signal(pid, "-STOP");
    let name = format!("{host}/{}:{}", p.repo, p.tag);
    let (out, took) = agent_pull(&routers, &format!("{}:{}", p.repo, p.tag), &[]).await;
    signal(pid, "-CONT");
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        engine_image_id(&name).await.as_deref(),
        Some(p.blobs[0].as_str())
    );
    assert!(
        took < Duration::from_secs(8),
        "frozen {first}: took {took:?}"
    );
    crate::clients::guard_cleanup(guard).await;
}
