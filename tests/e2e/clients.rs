//! Real clients against a real node: skopeo (OCI layouts built by hand, single-arch,
//! multi-arch index, Docker schema 2 conversion, registry-to-registry copy with mounts),
//! podman (pull, tag, push) and the Docker engine (import, push, rmi, pull). A missing tool
//! fails the test. Nothing comes from a public registry; every local image, temp dir and
//! podman root is removed at the end, also when a test fails.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{json, Value};

use crate::support::*;

const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub(crate) const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json";

/// Run blocking commands off the async workers.
pub(crate) async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("blocking task")
}

pub(crate) fn skopeo() -> Command {
    Command::new(require_tool("skopeo"))
}

/// `skopeo copy` from a plain-HTTP registry `src` to `dest` (`oci:DIR:TAG`, `dir:DIR`), off
/// the async runtime; panics with skopeo's output on failure.
pub(crate) async fn skopeo_copy_from(src: String, dest: String) {
    blocking(move || {
        run(skopeo()
            .args(["copy", "--src-tls-verify=false"])
            .arg(src)
            .arg(dest))
    })
    .await;
}

/// A unique suffix for names that outlive the node (Docker tags).
pub(crate) fn unique() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_nanos();
    format!("{}-{nanos}", std::process::id())
}

/// One content-addressed object with its bytes.
#[derive(Clone, Debug)]
pub(crate) struct Blob {
    pub(crate) digest: String,
    pub(crate) bytes: Vec<u8>,
}

impl Blob {
    fn new(bytes: Vec<u8>) -> Blob {
        Blob {
            digest: sha256(&bytes),
            bytes,
        }
    }

    pub(crate) fn hex(&self) -> &str {
        self.digest.trim_start_matches("sha256:")
    }

    fn descriptor(&self, media_type: &str) -> Value {
        json!({"mediaType": media_type, "digest": self.digest, "size": self.bytes.len()})
    }
}

/// A single-platform image: manifest, config and layers.
#[derive(Clone, Debug)]
pub(crate) struct Image {
    pub(crate) manifest: Blob,
    pub(crate) config: Blob,
    pub(crate) layers: Vec<Blob>,
}

impl Image {
    /// One gzip layer holding `files`, its config naming `arch`. gzip layers, because a
    /// docker:// destination compresses uncompressed layers and the digests would change.
    fn build(arch: &str, files: &[(&str, &[u8])]) -> Image {
        let tar = tar_bytes(files);
        let diff_id = sha256(&tar);
        let layer = Blob::new(gzip_bytes(&tar));
        let config = Blob::new(
            serde_json::to_vec(&json!({
                "architecture": arch,
                "os": "linux",
                "config": {"Env": ["PATH=/usr/bin:/bin"]},
                "rootfs": {"type": "layers", "diff_ids": [diff_id]},
            }))
            .expect("config json"),
        );
        let manifest = Blob::new(
            serde_json::to_vec(&json!({
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": config.descriptor(OCI_CONFIG),
                "layers": [layer.descriptor(OCI_LAYER_GZIP)],
            }))
            .expect("manifest json"),
        );
        Image {
            manifest,
            config,
            layers: vec![layer],
        }
    }

    pub(crate) fn blobs(&self) -> impl Iterator<Item = &Blob> {
        std::iter::once(&self.config).chain(self.layers.iter())
    }
}

/// An OCI image layout directory written by hand.
pub(crate) struct Layout {
    dir: PathBuf,
    refs: Vec<Value>,
}

impl Layout {
    pub(crate) fn new(dir: &Path) -> Layout {
        std::fs::create_dir_all(dir.join("blobs/sha256")).expect("layout dir");
        std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)
            .expect("oci-layout");
        let l = Layout {
            dir: dir.to_owned(),
            refs: Vec::new(),
        };
        l.write_index();
        l
    }

    fn put(&self, b: &Blob) {
        std::fs::write(self.dir.join("blobs/sha256").join(b.hex()), &b.bytes).expect("blob");
    }

    pub(crate) fn put_image(&self, img: &Image) {
        self.put(&img.manifest);
        for b in img.blobs() {
            self.put(b);
        }
    }

    pub(crate) fn tag(&mut self, name: &str, media_type: &str, b: &Blob) {
        let mut d = b.descriptor(media_type);
        d["annotations"] = json!({"org.opencontainers.image.ref.name": name});
        self.refs.push(d);
        self.write_index();
    }

    fn write_index(&self) {
        let index = json!({"schemaVersion": 2, "manifests": self.refs});
        std::fs::write(self.dir.join("index.json"), index.to_string()).expect("index.json");
    }
}

/// The blob a layout written by skopeo holds under `digest`.
pub(crate) fn layout_blob(dir: &Path, digest: &str) -> Vec<u8> {
    let p = dir
        .join("blobs/sha256")
        .join(digest.trim_start_matches("sha256:"));
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The descriptor `index.json` of a layout gives for `tag`.
pub(crate) fn layout_ref(dir: &Path, tag: &str) -> Value {
    let index: Value =
        serde_json::from_slice(&std::fs::read(dir.join("index.json")).expect("index.json"))
            .expect("index.json is JSON");
    index["manifests"]
        .as_array()
        .expect("manifests array")
        .iter()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == tag)
        .unwrap_or_else(|| panic!("no ref {tag} in {index}"))
        .clone()
}

/// GET a manifest: (content type, docker-content-digest, bytes); asserts 200 and that the
/// digest header is the digest of the bytes.
pub(crate) async fn get_manifest(
    c: &Oci,
    repo: &str,
    reference: &str,
) -> (String, String, Vec<u8>) {
    let r = c
        .http
        .get(c.url(&format!("/v2/{repo}/manifests/{reference}")))
        .header("accept", MANIFEST_ACCEPT)
        .send()
        .await
        .expect("GET manifest");
    assert_eq!(r.status(), 200, "GET {repo}:{reference}");
    let h = |n: &str| {
        r.headers()
            .get(n)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    let (ct, dcd) = (h("content-type"), h("docker-content-digest"));
    let bytes = r.bytes().await.expect("manifest body").to_vec();
    assert_eq!(
        dcd,
        sha256(&bytes),
        "{repo}:{reference}: digest header vs body"
    );
    (ct, dcd, bytes)
}

/// GET a blob of `repo` and check its bytes hash to its digest.
pub(crate) async fn assert_blob(c: &Oci, repo: &str, digest: &str) -> Vec<u8> {
    let r = c.get(&format!("/v2/{repo}/blobs/{digest}")).await;
    assert_eq!(r.status(), 200, "GET {repo}@{digest}");
    let bytes = r.bytes().await.expect("blob body").to_vec();
    assert_eq!(
        sha256(&bytes),
        digest,
        "{repo}@{digest}: bytes do not hash to digest"
    );
    bytes
}

/// Every blob a schema-2-shaped manifest names is served by `repo` with the right bytes.
pub(crate) async fn assert_manifest_blobs(c: &Oci, repo: &str, manifest: &[u8]) {
    let m: Value = serde_json::from_slice(manifest).expect("manifest JSON");
    let mut digests = vec![m["config"]["digest"].as_str().expect("config digest")];
    for l in m["layers"].as_array().expect("layers") {
        digests.push(l["digest"].as_str().expect("layer digest"));
    }
    for d in digests {
        assert_blob(c, repo, d).await;
    }
}

pub(crate) fn single_image() -> Image {
    Image::build(
        "amd64",
        &[
            ("hello.txt", b"hello from flotilla e2e\n"),
            ("etc/os-release", b"ID=flotilla-test\n"),
        ],
    )
}

/// Push the single-arch image from a hand-made layout with skopeo; returns the image.
pub(crate) async fn skopeo_push_single(host: &str, tmp: &Path, repo_tag: &str) -> Image {
    let img = single_image();
    let dir = tmp.join("layout-single");
    let mut l = Layout::new(&dir);
    l.put_image(&img);
    l.tag("v1", OCI_MANIFEST, &img.manifest);
    let dest = format!("docker://{host}/{repo_tag}");
    blocking(move || {
        run(skopeo()
            .args(["copy", "--dest-tls-verify=false"])
            .arg(format!("oci:{}:v1", dir.display()))
            .arg(dest))
    })
    .await;
    img
}

#[tokio::test(flavor = "multi_thread")]
async fn skopeo_single_arch_roundtrip_and_schema2() {
    let node = NodeProc::start().await;
    let c = node.client();
    let tmp = tempfile::tempdir().expect("tempdir");
    let host = node.host();

    // In: OCI layout -> registry, manifest bytes preserved.
    let img = skopeo_push_single(&node.host(), tmp.path(), "clients/single:v1").await;
    let (ct, digest, bytes) = get_manifest(&c, "clients/single", "v1").await;
    assert_eq!(ct, OCI_MANIFEST);
    assert_eq!(digest, img.manifest.digest);
    assert_eq!(bytes, img.manifest.bytes);
    for b in img.blobs() {
        assert_eq!(assert_blob(&c, "clients/single", &b.digest).await, b.bytes);
    }
    let src = format!("docker://{host}/clients/single:v1");
    let raw = {
        let src = src.clone();
        blocking(move || {
            run_out(
                skopeo()
                    .args(["inspect", "--raw", "--tls-verify=false"])
                    .arg(src),
            )
            .stdout
        })
        .await
    };
    assert_eq!(
        sha256(&raw),
        img.manifest.digest,
        "skopeo inspect --raw digest"
    );

    // Out: registry -> new OCI layout and dir:, digests unchanged.
    let out_oci = tmp.path().join("out-oci");
    let out_dir = tmp.path().join("out-dir");
    {
        let (src, o, d) = (src.clone(), out_oci.clone(), out_dir.clone());
        blocking(move || {
            run(skopeo()
                .args(["copy", "--src-tls-verify=false"])
                .arg(&src)
                .arg(format!("oci:{}:back", o.display())));
            run(skopeo()
                .args(["copy", "--src-tls-verify=false"])
                .arg(&src)
                .arg(format!("dir:{}", d.display())));
        })
        .await;
    }
    let r = layout_ref(&out_oci, "back");
    assert_eq!(r["digest"], img.manifest.digest.as_str());
    assert_eq!(
        layout_blob(&out_oci, &img.manifest.digest),
        img.manifest.bytes
    );
    for b in img.blobs() {
        assert_eq!(layout_blob(&out_oci, &b.digest), b.bytes);
    }
    assert_eq!(
        std::fs::read(out_dir.join("manifest.json")).expect("dir: manifest.json"),
        img.manifest.bytes
    );
    for b in img.blobs() {
        assert_eq!(
            std::fs::read(out_dir.join(b.hex())).expect("dir: blob"),
            b.bytes
        );
    }

    // Docker schema 2: converted by skopeo, stored and served as such, and copied back out
    // with the digest the registry reports.
    let dir = tmp.path().join("layout-single");
    let dest = format!("docker://{host}/clients/v2s2:v1");
    blocking(move || {
        run(skopeo()
            .args(["copy", "--format", "v2s2", "--dest-tls-verify=false"])
            .arg(format!("oci:{}:v1", dir.display()))
            .arg(dest))
    })
    .await;
    let (ct, v2_digest, v2_bytes) = get_manifest(&c, "clients/v2s2", "v1").await;
    assert_eq!(ct, DOCKER_MANIFEST);
    let m: Value = serde_json::from_slice(&v2_bytes).expect("schema 2 JSON");
    assert_eq!(m["schemaVersion"], 2);
    assert_eq!(m["mediaType"], DOCKER_MANIFEST);
    assert_eq!(m["config"]["digest"], img.config.digest.as_str());
    assert_eq!(m["layers"][0]["digest"], img.layers[0].digest.as_str());
    assert_eq!(
        m["layers"][0]["mediaType"],
        "application/vnd.docker.image.rootfs.diff.tar.gzip"
    );
    assert_manifest_blobs(&c, "clients/v2s2", &v2_bytes).await;
    let by_digest = get_manifest(&c, "clients/v2s2", &v2_digest).await;
    assert_eq!(by_digest.2, v2_bytes);
    let out_v2 = tmp.path().join("out-v2s2");
    skopeo_copy_from(
        format!("docker://{host}/clients/v2s2:v1"),
        format!("dir:{}", out_v2.display()),
    )
    .await;
    let back = std::fs::read(out_v2.join("manifest.json")).expect("v2s2 manifest.json");
    assert_eq!(sha256(&back), v2_digest);
}

#[tokio::test(flavor = "multi_thread")]
async fn skopeo_multi_arch_index_all() {
    let node = NodeProc::start().await;
    let c = node.client();
    let tmp = tempfile::tempdir().expect("tempdir");
    let host = node.host();

    let amd = Image::build("amd64", &[("arch", b"amd64\n")]);
    let arm = Image::build("arm64", &[("arch", b"arm64\n")]);
    let index = Blob::new(
        serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                {"mediaType": OCI_MANIFEST, "digest": amd.manifest.digest, "size": amd.manifest.bytes.len(),
                 "platform": {"architecture": "amd64", "os": "linux"}},
                {"mediaType": OCI_MANIFEST, "digest": arm.manifest.digest, "size": arm.manifest.bytes.len(),
                 "platform": {"architecture": "arm64", "os": "linux", "variant": "v8"}},
            ],
        }))
        .expect("index json"),
    );
    let dir = tmp.path().join("layout-multi");
    let mut l = Layout::new(&dir);
    l.put_image(&amd);
    l.put_image(&arm);
    l.put(&index);
    l.tag("multi", OCI_INDEX, &index);

    let dest = format!("docker://{host}/clients/multi:v1");
    {
        let (dir, dest) = (dir.clone(), dest.clone());
        blocking(move || {
            run(skopeo()
                .args(["copy", "--all", "--dest-tls-verify=false"])
                .arg(format!("oci:{}:multi", dir.display()))
                .arg(dest))
        })
        .await;
    }
    let (ct, digest, bytes) = get_manifest(&c, "clients/multi", "v1").await;
    assert_eq!(ct, OCI_INDEX);
    assert_eq!(digest, index.digest, "index digest changed on the way in");
    assert_eq!(bytes, index.bytes);
    for img in [&amd, &arm] {
        let (ct, d, b) = get_manifest(&c, "clients/multi", &img.manifest.digest).await;
        assert_eq!(
            (ct.as_str(), d.as_str()),
            (OCI_MANIFEST, img.manifest.digest.as_str())
        );
        assert_eq!(b, img.manifest.bytes);
        for blob in img.blobs() {
            assert_eq!(
                assert_blob(&c, "clients/multi", &blob.digest).await,
                blob.bytes
            );
        }
    }
    let raw = {
        let dest = dest.clone();
        blocking(move || {
            run_out(
                skopeo()
                    .args(["inspect", "--raw", "--tls-verify=false"])
                    .arg(dest),
            )
            .stdout
        })
        .await
    };
    assert_eq!(sha256(&raw), index.digest);

    // Back out with --all: the index and both children, byte for byte.
    let out = tmp.path().join("out-multi");
    {
        let (out, src) = (out.clone(), dest.clone());
        blocking(move || {
            run(skopeo()
                .args(["copy", "--all", "--src-tls-verify=false"])
                .arg(src)
                .arg(format!("oci:{}:back", out.display())))
        })
        .await;
    }
    let r = layout_ref(&out, "back");
    assert_eq!(r["digest"], index.digest.as_str());
    assert_eq!(r["mediaType"], OCI_INDEX);
    assert_eq!(layout_blob(&out, &index.digest), index.bytes);
    for img in [&amd, &arm] {
        assert_eq!(layout_blob(&out, &img.manifest.digest), img.manifest.bytes);
        for b in img.blobs() {
            assert_eq!(layout_blob(&out, &b.digest), b.bytes);
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn skopeo_registry_to_registry_mounts_blobs() {
    let node = NodeProc::start().await;
    let c = node.client();
    let tmp = tempfile::tempdir().expect("tempdir");
    let host = node.host();
    let img = skopeo_push_single(&node.host(), tmp.path(), "clients/a:1").await;

    let (src, dst) = (
        format!("docker://{host}/clients/a:1"),
        format!("docker://{host}/clients/b:1"),
    );
    let out = blocking(move || {
        run_out(skopeo().args([
            "--debug",
            "copy",
            "--src-tls-verify=false",
            "--dest-tls-verify=false",
            &src,
            &dst,
        ]))
    })
    .await;
    let log = String::from_utf8_lossy(&out.stderr);

    // skopeo asked to mount the layer from clients/a and the registry said 201.
    let layer = &img.layers[0];
    let mount_req = format!("from=clients%2Fa&mount=sha256%3A{}", layer.hex());
    let lines: Vec<&str> = log.lines().collect();
    let at = lines
        .iter()
        .position(|l| l.contains("Trying to mount") && l.contains(&mount_req))
        .unwrap_or_else(|| panic!("skopeo did not try to mount {}:\n{log}", layer.digest));
    let outcome = lines[at + 1..]
        .iter()
        .find(|l| {
            l.contains("mount OK")
                || l.contains("mount") && l.contains("failed")
                || l.contains("Uploading")
        })
        .unwrap_or_else(|| panic!("no outcome for the mount of {}:\n{log}", layer.digest));
    assert!(
        outcome.contains("mount OK"),
        "mount of {} not accepted: {outcome}\n{log}",
        layer.digest
    );
    assert!(
        !log.contains(&format!("Upload of layer {} complete", layer.digest)),
        "layer {} was uploaded again instead of mounted:\n{log}",
        layer.digest
    );

    // The destination serves the same manifest and every blob.
    let (_, digest, bytes) = get_manifest(&c, "clients/b", "1").await;
    assert_eq!(digest, img.manifest.digest);
    assert_eq!(bytes, img.manifest.bytes);
    for b in img.blobs() {
        assert_eq!(assert_blob(&c, "clients/b", &b.digest).await, b.bytes);
    }
}

/// podman with its own storage under a temp dir, so no global state is touched.
pub(crate) struct Podman {
    root: tempfile::TempDir,
}

impl Podman {
    /// Pull `src` and check podman's image id is the config digest it was pushed with.
    pub(crate) fn pull_checked(&self, src: &str, config_hex: &str) {
        let mut pull = self.cmd();
        pull.args(["pull", "--tls-verify=false", src]);
        self.pull_checked_with(pull, src, config_hex);
    }

    /// Run `pull` (a podman pull command with whatever auth it needs), then check the
    /// image id of `reference` is the config digest.
    pub(crate) fn pull_checked_with(&self, mut pull: Command, reference: &str, config_hex: &str) {
        run(&mut pull);
        let id = run(self
            .cmd()
            .args(["image", "inspect", "--format", "{{.Id}}", reference]));
        assert_eq!(
            id.trim(),
            config_hex,
            "podman image id is the config digest"
        );
    }

    pub(crate) fn new() -> Podman {
        require_tool("podman");
        Podman {
            root: tempfile::tempdir().expect("podman tempdir"),
        }
    }

    pub(crate) fn cmd(&self) -> Command {
        let r = self.root.path();
        for d in ["root", "runroot", "tmp"] {
            std::fs::create_dir_all(r.join(d)).expect("podman dir");
        }
        let mut c = Command::new("podman");
        c.arg("--root")
            .arg(r.join("root"))
            .arg("--runroot")
            .arg(r.join("runroot"))
            .arg("--tmpdir")
            .arg(r.join("tmp"))
            .args([
                "--storage-driver",
                "vfs",
                "--cgroup-manager=cgroupfs",
                "--events-backend=file",
            ])
            .env("TMPDIR", r.join("tmp"));
        c
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        // Images first (vfs layers are plain directories the temp dir removal also handles).
        let _ = self.cmd().args(["rmi", "--all", "--force"]).output();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn podman_pull_tag_push() {
    let node = NodeProc::start().await;
    let c = node.client();
    let tmp = tempfile::tempdir().expect("tempdir");
    let host = node.host();
    let img = skopeo_push_single(&node.host(), tmp.path(), "clients/podsrc:v1").await;

    let src = format!("{host}/clients/podsrc:v1");
    let dst = format!("{host}/clients/podman-pushed:v2");
    let pm = Podman::new();
    let config_hex = img.config.hex().to_owned();
    let pm = blocking(move || {
        pm.pull_checked(&src, &config_hex);
        run(pm.cmd().args(["tag", &src, &dst]));
        run(pm.cmd().args(["push", "--tls-verify=false", &dst]));
        pm
    })
    .await;

    let r = c.get("/v2/clients/podman-pushed/tags/list").await;
    assert_eq!(r.status(), 200);
    let tags: Value = r.json().await.expect("tags JSON");
    assert!(
        tags["tags"]
            .as_array()
            .is_some_and(|t| t.iter().any(|t| t == "v2")),
        "{tags}"
    );
    let (_, digest, bytes) = get_manifest(&c, "clients/podman-pushed", "v2").await;
    let m: Value = serde_json::from_slice(&bytes).expect("manifest JSON");
    assert_eq!(m["config"]["digest"], img.config.digest.as_str());
    assert_manifest_blobs(&c, "clients/podman-pushed", &bytes).await;
    let by_digest = get_manifest(&c, "clients/podman-pushed", &digest).await;
    assert_eq!(by_digest.2, bytes);
    drop(pm);
}

/// Local Docker images made by the test, removed whatever happens.
pub(crate) struct DockerImages(pub(crate) Vec<String>);

impl Drop for DockerImages {
    fn drop(&mut self) {
        for r in &self.0 {
            let _ = Command::new("docker").args(["rmi", "--force", r]).output();
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn docker_import_push_rmi_pull() {
    require_tool("docker");
    let node = NodeProc::start().await;
    let c = node.client();
    let tmp = tempfile::tempdir().expect("tempdir");
    let tag = format!("e2e-{}", unique());
    let repo = format!("{}/billing/api", node.host());
    let reference = format!("{repo}:{tag}");

    let tarball = tmp.path().join("rootfs.tar");
    std::fs::write(
        &tarball,
        tar_bytes(&[
            ("app/README", format!("flotilla e2e {tag}\n").as_bytes()),
            ("app/config.json", br#"{"port":8080}"#),
        ]),
    )
    .expect("write tarball");

    let mut guard = DockerImages(vec![reference.clone()]);
    let (r2, repo2) = (reference.clone(), repo.clone());
    let (id, pushed_digest, guard) = blocking(move || {
        run(Command::new("docker").arg("import").arg(&tarball).arg(&r2));
        let inspect = |r: &str, f: &str| {
            run(Command::new("docker").args(["image", "inspect", "--format", f, r]))
                .trim()
                .to_owned()
        };
        let id = inspect(&r2, "{{.Id}}");
        let push = run(Command::new("docker").args(["push", &r2]));
        let pushed_digest = push
            .split_whitespace()
            .skip_while(|w| *w != "digest:")
            .nth(1)
            .unwrap_or_else(|| panic!("no digest in docker push output:\n{push}"))
            .to_owned();
        guard.0.push(format!("{repo2}@{pushed_digest}"));
        let digests = inspect(&r2, "{{json .RepoDigests}}");
        assert!(
            digests.contains(&format!("{repo2}@{pushed_digest}")),
            "RepoDigests {digests} lacks {pushed_digest}"
        );
        run(Command::new("docker").args(["rmi", &r2]));
        let gone = Command::new("docker")
            .args(["image", "inspect", &r2])
            .output()
            .expect("docker inspect");
        assert!(!gone.status.success(), "{r2} still present after rmi");
        (id, pushed_digest, guard)
    })
    .await;

    // The registry holds what docker says it pushed.
    let (ct, digest, bytes) = get_manifest(&c, "billing/api", &tag).await;
    assert_eq!(ct, DOCKER_MANIFEST);
    assert_eq!(digest, pushed_digest);
    assert_manifest_blobs(&c, "billing/api", &bytes).await;
    let m: Value = serde_json::from_slice(&bytes).expect("manifest JSON");
    assert_eq!(
        m["config"]["digest"].as_str(),
        Some(id.as_str()),
        "config digest is the image id"
    );

    let (r2, repo2) = (reference.clone(), repo.clone());
    let guard = blocking(move || {
        let inspect = |r: &str, f: &str| {
            run(Command::new("docker").args(["image", "inspect", "--format", f, r]))
                .trim()
                .to_owned()
        };
        run(Command::new("docker").args(["pull", &r2]));
        assert_eq!(inspect(&r2, "{{.Id}}"), id, "pulled image id");
        let digests = inspect(&r2, "{{json .RepoDigests}}");
        assert!(
            digests.contains(&format!("{repo2}@{pushed_digest}")),
            "RepoDigests {digests} lacks {pushed_digest}"
        );
        // And by digest.
        let by_digest = format!("{repo2}@{pushed_digest}");
        run(Command::new("docker").args(["pull", &by_digest]));
        assert_eq!(inspect(&by_digest, "{{.Id}}"), id);
        guard
    })
    .await;
    guard_cleanup(guard).await;
}

/// Remove the test's Docker images now (not only on drop) and check they are gone.
pub(crate) async fn guard_cleanup(mut guard: DockerImages) {
    let refs = std::mem::take(&mut guard.0);
    blocking(move || {
        for r in &refs {
            let _ = Command::new("docker").args(["rmi", "--force", r]).output();
        }
        for r in &refs {
            let out = Command::new("docker")
                .args(["image", "inspect", r])
                .output()
                .expect("docker inspect");
            assert!(!out.status.success(), "{r} still present after cleanup");
        }
    })
    .await;
}

/// An image `docker push`ed to a registry and removed from the engine.
pub(crate) struct DockerPushed {
    pub(crate) reference: String,
    pub(crate) tag: String,
    pub(crate) id: String,
    pub(crate) digest: String,
    pub(crate) guard: DockerImages,
}

/// `docker import` a fresh one-file image as `{host}/{repo}:<unique tag>`, push it, `rmi` it.
pub(crate) async fn docker_push_fresh(
    host: &str,
    repo: &str,
    tmp: &std::path::Path,
) -> DockerPushed {
    let tag = format!("e2e-{}", unique());
    let reference = format!("{host}/{repo}:{tag}");
    let tarball = tmp.join(format!("rootfs-{tag}.tar"));
    std::fs::write(
        &tarball,
        tar_bytes(&[(
            "app/README",
            format!("flotilla cluster e2e {tag}\n").as_bytes(),
        )]),
    )
    .expect("write tarball");
    let guard = DockerImages(vec![reference.clone()]);
    let r2 = reference.clone();
    let (id, digest, guard) = blocking(move || {
        let mut guard = guard;
        run(Command::new("docker").arg("import").arg(&tarball).arg(&r2));
        let id = run(Command::new("docker").args(["image", "inspect", "--format", "{{.Id}}", &r2]))
            .trim()
            .to_owned();
        let push = run(Command::new("docker").args(["push", &r2]));
        let digest = push
            .split_whitespace()
            .skip_while(|w| *w != "digest:")
            .nth(1)
            .unwrap_or_else(|| panic!("no digest in docker push output:\n{push}"))
            .to_owned();
        guard
            .0
            .push(format!("{}@{digest}", r2.rsplit_once(':').unwrap().0));
        run(Command::new("docker").args(["rmi", &r2]));
        (id, digest, guard)
    })
    .await;
    DockerPushed {
        reference,
        tag,
        id,
        digest,
        guard,
    }
}

/// `docker pull` what [`docker_push_fresh`] pushed: the engine must end up with the same
/// image id. Cleans the engine up afterwards.
pub(crate) async fn docker_pull_same(p: DockerPushed) {
    let r2 = p.reference.clone();
    let pulled_id = blocking(move || {
        run(Command::new("docker").args(["pull", &r2]));
        run(Command::new("docker").args(["image", "inspect", "--format", "{{.Id}}", &r2]))
            .trim()
            .to_owned()
    })
    .await;
    assert_eq!(pulled_id, p.id, "docker pulled the image it pushed");
    let mut guard = p.guard;
    guard.0.dedup();
    guard_cleanup(guard).await;
}
