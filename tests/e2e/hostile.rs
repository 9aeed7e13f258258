//! Hostile input: traversal in names and upload ids, malformed and unsupported digests,
//! oversize and invalid manifests, lying digests, unknown sessions, unknown routes and
//! methods. Every request is sent over a raw socket (no client-side URL normalisation) and
//! must be refused with the spec's status and JSON error code; afterwards nothing may exist
//! outside the data directory, no stored name may contain `..`, and the node still serves.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::support::*;

/// The node under attack, its data dir inside a temp dir next to a sentinel area.
struct Target {
    node: NodeProc,
    root: tempfile::TempDir,
}

impl Target {
    async fn start() -> Target {
        let root = tempfile::tempdir().expect("tempdir");
        let sentinel = root.path().join("sentinel");
        std::fs::create_dir_all(sentinel.join("etc")).expect("sentinel dir");
        std::fs::write(
            sentinel.join("etc/passwd"),
            b"sentinel: must stay untouched\n",
        )
        .expect("sentinel file");
        std::fs::write(root.path().join("node.json"), b"{\"sentinel\":true}")
            .expect("sentinel node.json");
        let node = NodeProc::spawn(root.path().join("data"), free_port(), "n1", Vec::new());
        node.wait_ready().await;
        Target { node, root }
    }

    fn data(&self) -> PathBuf {
        self.node.data.clone()
    }

    /// One request, answered with its status and the OCI error code of its body (the
    /// body's shape is asserted by `error_code_raw`).
    async fn check(
        &self,
        method: &str,
        path: &str,
        body: &[u8],
        headers: &[(&str, &str)],
    ) -> (u16, String) {
        let r = raw_request(&self.node.host(), method, path, headers, body).await;
        let code = error_code_raw(&r);
        (r.status, code)
    }

    async fn status(&self, method: &str, path: &str, body: &[u8]) -> RawResponse {
        raw_request(&self.node.host(), method, path, &[], body).await
    }
}

/// Every file under `dir` with its content, to prove an area untouched.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    files_under(dir)
        .into_iter()
        .map(|rel| {
            let bytes = std::fs::read(dir.join(&rel)).expect("read snapshot file");
            (rel, bytes)
        })
        .collect()
}

struct Case {
    method: &'static str,
    path: String,
    body: Vec<u8>,
    headers: Vec<(&'static str, String)>,
    status: u16,
    code: &'static str,
}

fn case(method: &'static str, path: impl Into<String>, status: u16, code: &'static str) -> Case {
    Case {
        method,
        path: path.into(),
        body: Vec::new(),
        headers: Vec::new(),
        status,
        code,
    }
}

impl Case {
    fn body(mut self, b: impl Into<Vec<u8>>) -> Case {
        self.body = b.into();
        self
    }
    fn header(mut self, k: &'static str, v: impl Into<String>) -> Case {
        self.headers.push((k, v.into()));
        self
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_requests_refused_with_oci_errors() {
    let t = Target::start().await;
    let host = t.node.host();
    let root = t.root.path().to_owned();
    let before = snapshot(&root.join("sentinel"));
    let before_root: Vec<_> = std::fs::read_dir(&root)
        .expect("read root")
        .flatten()
        .map(|e| e.file_name())
        .collect();

    // Some real state to aim at: a repository with an image, and open upload sessions.
    let c = t.node.client();
    let good_layer = b"hostile-test layer".to_vec();
    c.push_image("h/ok", "v1", &good_layer).await;
    let layer_digest = sha256(&good_layer);
    let start_session = |repo: &'static str| {
        let c = c.clone();
        async move {
            let r = c
                .http
                .post(c.url(&format!("/v2/{repo}/blobs/uploads/")))
                .send()
                .await
                .expect("start upload");
            assert_eq!(r.status(), 202);
            r.headers()["location"]
                .to_str()
                .expect("location")
                .to_owned()
        }
    };
    let session = start_session("h/ok").await;
    let session_id = session.rsplit('/').next().expect("upload id").to_owned();

    let hex64 = "0123456789abcdef".repeat(4);
    let upper = format!("sha256:{}", hex64.to_uppercase());
    let short = format!("sha256:{}", &hex64[..63]);
    let long = format!("sha256:{hex64}0");
    let md5 = "md5:d41d8cd98f00b204e9800998ecf8427e".to_owned();
    let sha1 = "sha1:da39a3ee5e6b4b0d3255bfef95601890afd80709".to_owned();
    let unknown = format!("sha256:{hex64}");
    let big_manifest = {
        let pad = "x".repeat(5 * 1024 * 1024);
        format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","annotations":{{"pad":"{pad}"}}}}"#
        )
    };
    let orphan_manifest = image_manifest(&unknown, 2, &layer_digest, good_layer.len());
    let lying_body = b"these are not the bytes you hashed".to_vec();
    let lied_digest = sha256(b"something else entirely");

    let mut cases = vec![
        // Traversal and invalid repository names, on every kind of route.
        case("GET", "/v2/../../etc/manifests/x", 400, "NAME_INVALID"),
        case("GET", "/v2/h/../../etc/manifests/x", 400, "NAME_INVALID"),
        case("PUT", "/v2/../sentinel/manifests/x", 400, "NAME_INVALID")
            .header("content-type", OCI_MANIFEST)
            .body("{}"),
        case("GET", "/v2/%2e%2e/%2e%2e/etc/manifests/x", 400, "NAME_INVALID"),
        case("GET", "/v2/%2E%2E/sentinel/tags/list", 400, "NAME_INVALID"),
        case("GET", "/v2/a%2Fb/manifests/x", 400, "NAME_INVALID"),
        case("GET", "/v2/a%2f..%2f..%2fsentinel/manifests/x", 400, "NAME_INVALID"),
        case("POST", "/v2/..%2F..%2Fsentinel/blobs/uploads/", 400, "NAME_INVALID"),
        case("GET", "/v2/a%5C..%5Cb/manifests/x", 400, "NAME_INVALID"),
        case("GET", "/v2/a\\..\\b/manifests/x", 400, "NAME_INVALID"),
        case("GET", "/v2/Billing/api/manifests/x", 400, "NAME_INVALID"),
        case("POST", "/v2/BILLING/blobs/uploads/", 400, "NAME_INVALID"),
        case("GET", "/v2/a//b/manifests/x", 400, "NAME_INVALID"),
        case("GET", "/v2/./a/manifests/x", 400, "NAME_INVALID"),
        case("GET", "/v2/a/_manifests/manifests/x", 400, "NAME_INVALID"),
        case("GET", "/v2/a%00b/manifests/x", 400, "NAME_INVALID"),
        // Invalid or unsupported digests: blob GET/HEAD/DELETE, manifest by digest.
        case("GET", format!("/v2/h/ok/blobs/{md5}"), 400, "DIGEST_INVALID"),
        case("GET", format!("/v2/h/ok/blobs/{sha1}"), 400, "DIGEST_INVALID"),
        case("GET", format!("/v2/h/ok/blobs/{short}"), 400, "DIGEST_INVALID"),
        case("GET", format!("/v2/h/ok/blobs/{long}"), 400, "DIGEST_INVALID"),
        case("GET", format!("/v2/h/ok/blobs/{upper}"), 400, "DIGEST_INVALID"),
        case("GET", "/v2/h/ok/blobs/SHA256:abc", 400, "DIGEST_INVALID"),
        case("GET", "/v2/h/ok/blobs/sha256:..%2f..%2fnode.json", 400, "DIGEST_INVALID"),
        case("DELETE", format!("/v2/h/ok/blobs/{md5}"), 400, "DIGEST_INVALID"),
        case("GET", format!("/v2/h/ok/manifests/{short}"), 400, "DIGEST_INVALID"),
        case("GET", format!("/v2/h/ok/manifests/{md5}"), 400, "DIGEST_INVALID"),
        case("GET", format!("/v2/h/ok/referrers/{upper}"), 400, "DIGEST_INVALID"),
        // ... on monolithic upload, upload completion and mount.
        case("POST", format!("/v2/h/ok/blobs/uploads/?digest={md5}"), 400, "DIGEST_INVALID")
            .body("abc"),
        case("POST", format!("/v2/h/ok/blobs/uploads/?digest={upper}"), 400, "DIGEST_INVALID")
            .body("abc"),
        case("PUT", format!("{session}?digest={short}"), 400, "DIGEST_INVALID"),
        case("PUT", format!("{session}?digest={md5}"), 400, "DIGEST_INVALID"),
        case("POST", format!("/v2/h/x/blobs/uploads/?mount={md5}&from=h/ok"), 400, "DIGEST_INVALID"),
        case("POST", format!("/v2/h/x/blobs/uploads/?mount={long}&from=h/ok"), 400, "DIGEST_INVALID"),
        case("POST", format!("/v2/h/x/blobs/uploads/?mount={layer_digest}&from=../h/ok"), 400, "NAME_INVALID"),
        case("POST", format!("/v2/h/x/blobs/uploads/?mount={layer_digest}&from=H/OK"), 400, "NAME_INVALID"),
        // Manifests: too large (declared and chunked), not JSON, naming unknown content,
        // invalid tag, digest reference that does not match the body.
        case("PUT", "/v2/h/ok/manifests/big", 413, "SIZE_INVALID")
            .header("content-type", OCI_MANIFEST)
            .body(big_manifest.clone()),
        case("PUT", "/v2/h/ok/manifests/bigchunked", 413, "SIZE_INVALID")
            .header("content-type", OCI_MANIFEST)
            .header("transfer-encoding", "chunked")
            .body(chunked_body(big_manifest.as_bytes(), 64 * 1024)),
        case("PUT", "/v2/h/ok/manifests/bad", 400, "MANIFEST_INVALID")
            .header("content-type", OCI_MANIFEST)
            .body("{not json"),
        case("PUT", "/v2/h/ok/manifests/bad", 400, "MANIFEST_INVALID")
            .header("content-type", OCI_MANIFEST)
            .body(r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":"nope"}"#),
        case("PUT", "/v2/h/ok/manifests/orphan", 400, "MANIFEST_BLOB_UNKNOWN")
            .header("content-type", OCI_MANIFEST)
            .body(orphan_manifest.clone()),
        case("PUT", "/v2/h/ok/manifests/..", 400, "MANIFEST_INVALID")
            .header("content-type", OCI_MANIFEST)
            .body("{}"),
        // A read of a reference no manifest can have is unknown, not invalid (Distribution's
        // answer, and what conformance tools expect).
        case("GET", "/v2/h/ok/manifests/.INVALID_MANIFEST_NAME", 404, "MANIFEST_UNKNOWN"),
        case("PUT", format!("/v2/h/ok/manifests/{unknown}"), 400, "DIGEST_INVALID")
            .header("content-type", OCI_MANIFEST)
            .body(image_manifest(&layer_digest, good_layer.len(), &layer_digest, good_layer.len())),
        // Bytes that do not match the digest the client claims.
        case("POST", format!("/v2/h/ok/blobs/uploads/?digest={lied_digest}"), 400, "DIGEST_INVALID")
            .body(lying_body.clone()),
        // Unknown and hostile upload ids.
        case("GET", "/v2/h/ok/blobs/uploads/0000-not-a-session", 404, "BLOB_UPLOAD_UNKNOWN"),
        case("PATCH", "/v2/h/ok/blobs/uploads/0000-not-a-session", 404, "BLOB_UPLOAD_UNKNOWN")
            .body("abc"),
        case("PUT", format!("/v2/h/ok/blobs/uploads/0000-not-a-session?digest={unknown}"), 404, "BLOB_UPLOAD_UNKNOWN"),
        case("DELETE", "/v2/h/ok/blobs/uploads/0000-not-a-session", 404, "BLOB_UPLOAD_UNKNOWN"),
        case("PATCH", "/v2/h/ok/blobs/uploads/..", 404, "BLOB_UPLOAD_UNKNOWN").body("abc"),
        case("PATCH", "/v2/h/ok/blobs/uploads/%2e%2e%2fnode.json", 404, "BLOB_UPLOAD_UNKNOWN")
            .body("abc"),
        case("PUT", format!("/v2/h/ok/blobs/uploads/..%2F..%2Fnode.json?digest={unknown}"), 404, "BLOB_UPLOAD_UNKNOWN"),
        case("GET", "/v2/h/ok/blobs/uploads/a.b", 404, "BLOB_UPLOAD_UNKNOWN"),
        // A live session id is bound to its repository.
        case("PATCH", format!("/v2/h/other/blobs/uploads/{session_id}"), 404, "BLOB_UPLOAD_UNKNOWN")
            .body("abc"),
        case("GET", format!("/v2/h/other/blobs/uploads/{session_id}"), 404, "BLOB_UPLOAD_UNKNOWN"),
        // Unknown routes under /v2/: 404 with a JSON body.
        case("GET", "/v2/h/ok/nothing/here", 404, "UNSUPPORTED"),
        case("GET", "/v2/tags/list", 404, "UNSUPPORTED"),
        case("GET", "/v2/h/ok/blobs/uploads/../../../../node.json", 404, "UNSUPPORTED"),
        case("GET", "/v2/h/ok/manifests", 404, "UNSUPPORTED"),
        case("GET", "/v2//", 404, "UNSUPPORTED"),
        // Methods a route does not take: 405 with a JSON body.
        case("POST", "/v2/h/ok/manifests/v1", 405, "UNSUPPORTED"),
        case("PATCH", "/v2/", 405, "UNSUPPORTED"),
        case("DELETE", "/v2/_catalog", 405, "UNSUPPORTED"),
        case("PUT", "/v2/h/ok/tags/list", 405, "UNSUPPORTED"),
        case("POST", format!("/v2/h/ok/blobs/{layer_digest}"), 405, "UNSUPPORTED"),
        case("PUT", "/v2/h/ok/blobs/uploads/", 405, "UNSUPPORTED"),
    ];
    // A bogus session then the real one with a lying digest: both end in DIGEST_INVALID and
    // the real session is gone afterwards.
    let s2 = start_session("h/ok").await;
    cases.push(case("PATCH", s2.clone(), 202, "").body(lying_body.clone()));
    cases.push(case(
        "PUT",
        format!("{s2}?digest={lied_digest}"),
        400,
        "DIGEST_INVALID",
    ));
    cases.push(case("GET", s2.clone(), 404, "BLOB_UPLOAD_UNKNOWN"));

    let mut failures = Vec::new();
    for c in &cases {
        let headers: Vec<(&str, &str)> = c.headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let (status, code) = if c.code.is_empty() {
            let r = raw_request(&host, c.method, &c.path, &headers, &c.body).await;
            (r.status, String::new())
        } else {
            t.check(c.method, &c.path, &c.body, &headers).await
        };
        let shown = if c.path.len() > 120 {
            &c.path[..120]
        } else {
            &c.path
        };
        if status != c.status || code != c.code {
            failures.push(format!(
                "{} {shown}: got {status} {code}, want {} {}",
                c.method, c.status, c.code
            ));
        }
    }

    // The lying uploads left nothing behind, neither under the claimed nor the real digest.
    for d in [&lied_digest, &sha256(&lying_body)] {
        let r = t.status("GET", &format!("/v2/h/ok/blobs/{d}"), b"").await;
        if r.status != 404 || error_code_raw(&r) != "BLOB_UNKNOWN" {
            failures.push(format!("blob {d} of a failed upload: got {}", r.status));
        }
        let hex = d.trim_start_matches("sha256:");
        let on_disk = t.data().join("blobs/sha256").join(&hex[..2]).join(hex);
        if on_disk.exists() {
            failures.push(format!("{} exists after DIGEST_INVALID", on_disk.display()));
        }
    }
    // None of the refused manifests or tags exist.
    for tag in ["big", "bigchunked", "bad", "orphan"] {
        let r = t
            .status("GET", &format!("/v2/h/ok/manifests/{tag}"), b"")
            .await;
        if r.status != 404 {
            failures.push(format!("tag {tag} of a refused manifest: got {}", r.status));
        }
    }
    // The good session and image are intact and the node still serves.
    let r = t.status("GET", &session, b"").await;
    if r.status != 204 {
        failures.push(format!("GET {session} after the attack: {}", r.status));
    }
    let r = t.status("GET", "/v2/h/ok/manifests/v1", b"").await;
    if r.status != 200 {
        failures.push(format!("GET h/ok:v1 after the attack: {}", r.status));
    }
    let r = t.status("GET", "/v2/", b"").await;
    if r.status != 200 {
        failures.push(format!("GET /v2/ after the attack: {}", r.status));
    }

    // Nothing written outside the data dir; nothing inside named with `..`.
    assert_eq!(
        snapshot(&root.join("sentinel")),
        before,
        "sentinel area changed"
    );
    let mut after_root: Vec<_> = std::fs::read_dir(&root)
        .expect("read root")
        .flatten()
        .map(|e| e.file_name())
        .collect();
    let mut want_root = before_root.clone();
    want_root.sort();
    after_root.sort();
    assert_eq!(
        after_root, want_root,
        "entries appeared next to the data dir"
    );
    assert_eq!(
        std::fs::read(root.join("node.json")).expect("sentinel node.json"),
        b"{\"sentinel\":true}"
    );
    for f in files_under(&t.data()) {
        let s = f.to_string_lossy();
        assert!(!s.contains(".."), "stored path with `..`: {s}");
        assert!(!s.contains('\\'), "stored path with a backslash: {s}");
        let top = f
            .components()
            .next()
            .map(|c| c.as_os_str().to_string_lossy().into_owned());
        assert!(
            matches!(
                top.as_deref(),
                Some("blobs" | "repos" | "uploads" | "tmp" | "node.json")
            ),
            "unexpected file in the data dir: {s}"
        );
    }
    assert!(
        failures.is_empty(),
        "{} hostile cases failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
