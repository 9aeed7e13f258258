//! The OCI Distribution v1.1 spec suite, against a real node process over HTTP: every
//! endpoint, header and error code the node implements, edge cases included.

use std::time::{Duration, Instant};

use crate::support::*;

const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

fn hdr<'a>(r: &'a reqwest::Response, name: &str) -> &'a str {
    r.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_else(|| panic!("missing header {name} in {:?}", r.headers()))
}

#[tokio::test]
async fn base_endpoint() {
    let n = NodeProc::start().await;
    let r = n.client().get("/v2/").await;
    assert_eq!(r.status(), 200);
    assert_eq!(hdr(&r, "docker-distribution-api-version"), "registry/2.0");
}

#[tokio::test]
async fn blob_monolithic_get_head_range_delete() {
    let n = NodeProc::start().await;
    let c = n.client();
    let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let d = c.push_blob("a/b", &data).await;

    let r = c
        .http
        .head(c.url(&format!("/v2/a/b/blobs/{d}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(hdr(&r, "content-length"), "100000");
    assert_eq!(hdr(&r, "docker-content-digest"), d);

    let r = c.get(&format!("/v2/a/b/blobs/{d}")).await;
    assert_eq!(r.status(), 200);
    assert_eq!(hdr(&r, "content-length"), "100000");
    assert_eq!(r.bytes().await.unwrap().as_ref(), &data[..]);

    // Ranges: explicit, open-ended, suffix; 416 past the end.
    for (range, lo, hi) in [
        ("bytes=10-19", 10, 19),
        ("bytes=99990-", 99990, 99999),
        ("bytes=-5", 99995, 99999),
    ] {
        let r = c
            .http
            .get(c.url(&format!("/v2/a/b/blobs/{d}")))
            .header("range", range)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 206, "{range}");
        assert_eq!(hdr(&r, "content-range"), format!("bytes {lo}-{hi}/100000"));
        assert_eq!(r.bytes().await.unwrap().as_ref(), &data[lo..=hi]);
    }
    let r = c
        .http
        .get(c.url(&format!("/v2/a/b/blobs/{d}")))
        .header("range", "bytes=100000-")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 416);
    assert_eq!(hdr(&r, "content-range"), "bytes */100000");

    // Not in another repository, even though the bytes are on the node.
    let r = c.get(&format!("/v2/other/blobs/{d}")).await;
    assert_eq!(r.status(), 404);
    assert_eq!(error_code(r).await, "BLOB_UNKNOWN");

    let r = c
        .http
        .delete(c.url(&format!("/v2/a/b/blobs/{d}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let r = c.get(&format!("/v2/a/b/blobs/{d}")).await;
    assert_eq!(error_code(r).await, "BLOB_UNKNOWN");
}

#[tokio::test]
async fn empty_blob_and_sha512() {
    let n = NodeProc::start().await;
    let c = n.client();
    let d = c.push_blob("e", b"").await;
    let r = c.get(&format!("/v2/e/blobs/{d}")).await;
    assert_eq!(r.status(), 200);
    assert_eq!(hdr(&r, "content-length"), "0");

    // sha512, monolithic.
    let data = b"sha512 content".to_vec();
    let d512 = sha512(&data);
    let r = c.post_blob("e", &d512, data.clone()).await.unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(hdr(&r, "docker-content-digest"), d512);
    let r = c.get(&format!("/v2/e/blobs/{d512}")).await;
    assert_eq!(r.bytes().await.unwrap().as_ref(), &data[..]);

    // sha512, chunked: the algorithm is only named at the final PUT.
    let data2 = b"another sha512 blob, chunked".to_vec();
    let d2 = sha512(&data2);
    let loc = start_session(&c, "e").await;
    let r = c.patch(&loc, data2.clone()).await.unwrap();
    assert_eq!(r.status(), 202);
    let loc = hdr(&r, "location").to_owned();
    let r = c.close_upload(&loc, &d2, Vec::new()).await.unwrap();
    assert_eq!(r.status(), 201);
    let r = c.get(&format!("/v2/e/blobs/{d2}")).await;
    assert_eq!(r.bytes().await.unwrap().as_ref(), &data2[..]);
}

async fn start_session(c: &Oci, repo: &str) -> String {
    let r = c
        .http
        .post(c.url(&format!("/v2/{repo}/blobs/uploads/")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(hdr(&r, "range"), "0-0");
    assert!(!hdr(&r, "docker-upload-uuid").is_empty());
    hdr(&r, "location").to_owned()
}

#[tokio::test]
async fn chunked_upload_with_ranges_and_416() {
    let n = NodeProc::start().await;
    let c = n.client();
    let data: Vec<u8> = (0..30_000u32).map(|i| (i * 7 % 256) as u8).collect();
    let d = sha256(&data);
    let loc = start_session(&c, "chunks").await;

    let patch = |loc: String, range: String, body: Vec<u8>| {
        let c = c.clone();
        async move {
            c.http
                .patch(c.url(&loc))
                .header("content-range", range)
                .header("content-length", body.len())
                .body(body)
                .send()
                .await
                .unwrap()
        }
    };
    let r = patch(loc.clone(), "0-9999".into(), data[..10_000].to_vec()).await;
    assert_eq!(r.status(), 202);
    assert_eq!(hdr(&r, "range"), "0-9999");
    let loc = hdr(&r, "location").to_owned();

    // A repeated chunk and an out-of-order chunk are refused with the current range.
    for range in ["0-9999", "20000-29999"] {
        let (a, b): (usize, usize) = {
            let (a, b) = range.split_once('-').unwrap();
            (a.parse().unwrap(), b.parse().unwrap())
        };
        let r = patch(loc.clone(), range.into(), data[a..=b].to_vec()).await;
        assert_eq!(r.status(), 416, "{range}");
        assert_eq!(hdr(&r, "range"), "0-9999");
        assert_eq!(error_code(r).await, "BLOB_UPLOAD_INVALID");
    }

    // Status of the session.
    let r = c.get(&loc).await;
    assert_eq!(r.status(), 204);
    assert_eq!(hdr(&r, "range"), "0-9999");
    assert!(hdr(&r, "location").contains("/blobs/uploads/"));

    let r = patch(
        loc.clone(),
        "10000-19999".into(),
        data[10_000..20_000].to_vec(),
    )
    .await;
    assert_eq!(r.status(), 202);
    assert_eq!(hdr(&r, "range"), "0-19999");

    // The final chunk travels with the PUT.
    let r = c
        .close_upload(&loc, &d, data[20_000..].to_vec())
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(hdr(&r, "location"), format!("/v2/chunks/blobs/{d}"));
    let r = c.get(&format!("/v2/chunks/blobs/{d}")).await;
    assert_eq!(r.bytes().await.unwrap().as_ref(), &data[..]);

    // The session is gone after completion.
    let r = c.get(&loc).await;
    assert_eq!(r.status(), 404);
    assert_eq!(error_code(r).await, "BLOB_UPLOAD_UNKNOWN");
}

#[tokio::test]
async fn streamed_patch_then_put_without_body_and_bad_digest() {
    let n = NodeProc::start().await;
    let c = n.client();
    let data = vec![42u8; 70_000];
    let d = sha256(&data);
    let loc = start_session(&c, "s").await;
    // Streamed PATCH: no Content-Range.
    let r = c.patch(&loc, data.clone()).await.unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(hdr(&r, "range"), "0-69999");
    let loc = hdr(&r, "location").to_owned();
    let wrong = sha256(b"something else");
    let r = c.close_upload(&loc, &wrong, Vec::new()).await.unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(error_code(r).await, "DIGEST_INVALID");
    let r = c.get(&format!("/v2/s/blobs/{wrong}")).await;
    assert_eq!(r.status(), 404, "mismatched content must not be stored");

    // A fresh session with the right digest and no final body works.
    let loc = start_session(&c, "s").await;
    let r = c.patch(&loc, data.clone()).await.unwrap();
    let loc = hdr(&r, "location").to_owned();
    let r = c.close_upload(&loc, &d, Vec::new()).await.unwrap();
    assert_eq!(r.status(), 201);

    // Cancel.
    let loc = start_session(&c, "s").await;
    let r = c.http.delete(c.url(&loc)).send().await.unwrap();
    assert_eq!(r.status(), 204);
    let r = c.get(&loc).await;
    assert_eq!(error_code(r).await, "BLOB_UPLOAD_UNKNOWN");
    // A session of one repository is unknown to another.
    let loc = start_session(&c, "s").await;
    let other = loc.replace("/v2/s/", "/v2/t/");
    let r = c.get(&other).await;
    assert_eq!(error_code(r).await, "BLOB_UPLOAD_UNKNOWN");
}

#[tokio::test]
async fn stale_sessions_are_purged() {
    let tmp = tempfile::tempdir().unwrap();
    let n = NodeProc::spawn(
        tmp.path().join("d"),
        free_port(),
        "n1",
        vec!["--upload-max-age-secs".into(), "1".into()],
    );
    n.wait_ready().await;
    let c = n.client();
    let loc = start_session(&c, "p").await;
    let r = c.patch(&loc, vec![1u8; 10]).await.unwrap();
    assert_eq!(r.status(), 202);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let r = c.get(&loc).await;
        if r.status() == 404 {
            assert_eq!(error_code(r).await, "BLOB_UPLOAD_UNKNOWN");
            break;
        }
        assert!(Instant::now() < deadline, "idle session never purged");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let uploads = files_under(&n.data.join("uploads"));
    assert!(uploads.is_empty(), "purged session left bytes: {uploads:?}");
}

#[tokio::test]
async fn cross_repository_mount() {
    let n = NodeProc::start().await;
    let c = n.client();
    let d = c.push_blob("src/repo", b"mount me").await;
    let r = c
        .http
        .post(c.url(&format!(
            "/v2/dst/repo/blobs/uploads/?mount={d}&from=src/repo"
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(hdr(&r, "location"), format!("/v2/dst/repo/blobs/{d}"));
    assert_eq!(
        c.get(&format!("/v2/dst/repo/blobs/{d}")).await.status(),
        200
    );

    // Without `from`: found automatically.
    let r = c
        .http
        .post(c.url(&format!("/v2/third/blobs/uploads/?mount={d}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    // From a repository that does not hold it: a normal session instead.
    let r = c
        .http
        .post(c.url(&format!("/v2/fourth/blobs/uploads/?mount={d}&from=nothere")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    // Unknown blob: a session.
    let unknown = sha256(b"never pushed");
    let r = c
        .http
        .post(c.url(&format!("/v2/fourth/blobs/uploads/?mount={unknown}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    assert!(hdr(&r, "location").contains("/blobs/uploads/"));
}

#[tokio::test]
async fn manifests_by_tag_and_digest() {
    let n = NodeProc::start().await;
    let c = n.client();
    let cfg = c.push_blob("m/r", b"{}").await;
    let layer = c.push_blob("m/r", b"layer").await;
    // Odd whitespace: bytes must come back exactly as pushed.
    let body = format!(
        "{{ \"schemaVersion\": 2, \"mediaType\": \"{DOCKER_MANIFEST}\",\n \"config\": {{\"mediaType\":\"application/vnd.docker.container.image.v1+json\",\"digest\":\"{cfg}\",\"size\":2}}, \"layers\":[{{\"mediaType\":\"application/vnd.docker.image.rootfs.diff.tar.gzip\",\"digest\":\"{layer}\",\"size\":5}}] }}"
    );
    let d = sha256(body.as_bytes());
    let r = c
        .put_manifest("m/r", "v1", DOCKER_MANIFEST, body.as_bytes())
        .await;
    assert_eq!(r.status(), 201);
    assert_eq!(hdr(&r, "docker-content-digest"), d);
    assert_eq!(hdr(&r, "location"), format!("/v2/m/r/manifests/{d}"));

    for reference in ["v1", d.as_str()] {
        let r = c.get(&format!("/v2/m/r/manifests/{reference}")).await;
        assert_eq!(r.status(), 200);
        assert_eq!(hdr(&r, "content-type"), DOCKER_MANIFEST);
        assert_eq!(hdr(&r, "docker-content-digest"), d);
        assert_eq!(r.bytes().await.unwrap().as_ref(), body.as_bytes());
        let r = c
            .http
            .head(c.url(&format!("/v2/m/r/manifests/{reference}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(hdr(&r, "content-length"), body.len().to_string());
    }

    // Push by digest; a digest that does not match the body is refused.
    let r = c
        .put_manifest("m/r", &d, DOCKER_MANIFEST, body.as_bytes())
        .await;
    assert_eq!(r.status(), 201);
    let r = c
        .put_manifest("m/r", &sha256(b"x"), DOCKER_MANIFEST, body.as_bytes())
        .await;
    assert_eq!(error_code(r).await, "DIGEST_INVALID");

    // Manifest list referencing it, and one referencing an unknown child.
    let list = format!(
        r#"{{"schemaVersion":2,"mediaType":"{DOCKER_LIST}","manifests":[{{"mediaType":"{DOCKER_MANIFEST}","digest":"{d}","size":{},"platform":{{"architecture":"amd64","os":"linux"}}}}]}}"#,
        body.len()
    );
    let r = c
        .put_manifest("m/r", "list", DOCKER_LIST, list.as_bytes())
        .await;
    assert_eq!(r.status(), 201);
    let bad = list.replace(&d, &sha256(b"missing child"));
    let r = c
        .put_manifest("m/r", "bad", DOCKER_LIST, bad.as_bytes())
        .await;
    assert_eq!(r.status(), 400);
    assert_eq!(error_code(r).await, "MANIFEST_BLOB_UNKNOWN");
    // Image manifest with a layer the repository lacks (exists elsewhere only).
    let elsewhere = c.push_blob("elsewhere", b"other layer").await;
    let m = image_manifest(&cfg, 2, &elsewhere, 11);
    let r = c
        .put_manifest("m/r", "nolayer", OCI_MANIFEST, m.as_bytes())
        .await;
    assert_eq!(error_code(r).await, "MANIFEST_BLOB_UNKNOWN");
    // Content-Type contradicting the body.
    let r = c
        .put_manifest("m/r", "ct", OCI_INDEX, body.as_bytes())
        .await;
    assert_eq!(error_code(r).await, "MANIFEST_INVALID");

    // Unknown tag / digest.
    let r = c.get("/v2/m/r/manifests/nope").await;
    assert_eq!(r.status(), 404);
    assert_eq!(error_code(r).await, "MANIFEST_UNKNOWN");

    // DELETE by tag untags only.
    let r = c
        .http
        .delete(c.url("/v2/m/r/manifests/v1"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(c.get("/v2/m/r/manifests/v1").await.status(), 404);
    assert_eq!(c.get(&format!("/v2/m/r/manifests/{d}")).await.status(), 200);
    // DELETE by digest removes it and its tags.
    let r = c
        .put_manifest("m/r", "again", DOCKER_MANIFEST, body.as_bytes())
        .await;
    assert_eq!(r.status(), 201);
    let r = c
        .http
        .delete(c.url(&format!("/v2/m/r/manifests/{d}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(c.get(&format!("/v2/m/r/manifests/{d}")).await.status(), 404);
    assert_eq!(c.get("/v2/m/r/manifests/again").await.status(), 404);
    let r = c
        .http
        .delete(c.url(&format!("/v2/m/r/manifests/{d}")))
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(r).await, "MANIFEST_UNKNOWN");
}

#[tokio::test]
async fn referrers_with_filtering() {
    let n = NodeProc::start().await;
    let c = n.client();
    let subject = c.push_image("ref/app", "v1", b"app layer").await;
    let subject_len = c
        .get(&format!("/v2/ref/app/manifests/{subject}"))
        .await
        .bytes()
        .await
        .unwrap()
        .len();
    let empty = c.push_blob("ref/app", b"{}").await;
    let mut digests = Vec::new();
    for (i, at) in [
        "application/vnd.example.sbom",
        "application/vnd.example.sig",
    ]
    .iter()
    .enumerate()
    {
        let blob = c
            .push_blob("ref/app", format!("payload {i}").as_bytes())
            .await;
        let m = format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","artifactType":"{at}","config":{{"mediaType":"application/vnd.oci.empty.v1+json","digest":"{empty}","size":2}},"layers":[{{"mediaType":"application/octet-stream","digest":"{blob}","size":9}}],"subject":{{"mediaType":"{OCI_MANIFEST}","digest":"{subject}","size":{subject_len}}},"annotations":{{"n":"{i}"}}}}"#
        );
        let r = c
            .put_manifest("ref/app", &sha256(m.as_bytes()), OCI_MANIFEST, m.as_bytes())
            .await;
        assert_eq!(r.status(), 201);
        assert_eq!(hdr(&r, "oci-subject"), subject);
        digests.push(sha256(m.as_bytes()));
    }
    let r = c.get(&format!("/v2/ref/app/referrers/{subject}")).await;
    assert_eq!(r.status(), 200);
    assert_eq!(hdr(&r, "content-type"), OCI_INDEX);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["mediaType"], OCI_INDEX);
    let got: Vec<&str> = v["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["digest"].as_str().unwrap())
        .collect();
    assert_eq!(got.len(), 2);
    for d in &digests {
        assert!(got.contains(&d.as_str()));
    }
    assert!(v["manifests"][0]["annotations"]["n"].as_str().is_some());

    let r = c
        .get(&format!(
            "/v2/ref/app/referrers/{subject}?artifactType=application/vnd.example.sig"
        ))
        .await;
    assert_eq!(hdr(&r, "oci-filters-applied"), "artifactType");
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["manifests"].as_array().unwrap().len(), 1);
    assert_eq!(
        v["manifests"][0]["artifactType"],
        "application/vnd.example.sig"
    );
    assert_eq!(v["manifests"][0]["digest"], digests[1].as_str());

    // Deleting a referrer removes it from the list.
    let r = c
        .http
        .delete(c.url(&format!("/v2/ref/app/manifests/{}", digests[0])))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let v: serde_json::Value = c
        .get(&format!("/v2/ref/app/referrers/{subject}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["manifests"].as_array().unwrap().len(), 1);

    // Unknown subject: an empty index, 200.
    let r = c
        .get(&format!("/v2/ref/app/referrers/{}", sha256(b"nothing")))
        .await;
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["manifests"].as_array().unwrap().len(), 0);
}

#[tokio::test]
async fn tags_and_catalog_pagination() {
    let n = NodeProc::start().await;
    let c = n.client();
    for repo in ["zeta", "alpha/one", "alpha/one/nested", "beta"] {
        c.push_image(repo, "t", repo.as_bytes()).await;
    }
    let m = c.get("/v2/beta/manifests/t").await.bytes().await.unwrap();
    for tag in ["b", "a", "c", "D", "e"] {
        let r = c.put_manifest("beta", tag, OCI_MANIFEST, &m).await;
        assert_eq!(r.status(), 201);
    }
    let v: serde_json::Value = c.get("/v2/beta/tags/list").await.json().await.unwrap();
    assert_eq!(v["name"], "beta");
    assert_eq!(v["tags"], serde_json::json!(["D", "a", "b", "c", "e", "t"]));

    let r = c.get("/v2/beta/tags/list?n=2").await;
    assert_eq!(
        hdr(&r, "link"),
        "</v2/beta/tags/list?n=2&last=a>; rel=\"next\""
    );
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["tags"], serde_json::json!(["D", "a"]));
    let r = c.get("/v2/beta/tags/list?n=2&last=c").await;
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["tags"], serde_json::json!(["e", "t"]));
    let r = c.get("/v2/beta/tags/list?n=10&last=c").await;
    assert!(r.headers().get("link").is_none());
    let r = c.get("/v2/beta/tags/list?n=0").await;
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["tags"], serde_json::json!([]));
    let r = c.get("/v2/nope/tags/list").await;
    assert_eq!(r.status(), 404);
    assert_eq!(error_code(r).await, "NAME_UNKNOWN");

    let v: serde_json::Value = c.get("/v2/_catalog").await.json().await.unwrap();
    assert_eq!(
        v["repositories"],
        serde_json::json!(["alpha/one", "alpha/one/nested", "beta", "zeta"])
    );
    let r = c.get("/v2/_catalog?n=3").await;
    assert_eq!(
        hdr(&r, "link"),
        "</v2/_catalog?n=3&last=beta>; rel=\"next\""
    );
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(
        v["repositories"],
        serde_json::json!(["alpha/one", "alpha/one/nested", "beta"])
    );
    let v: serde_json::Value = c
        .get("/v2/_catalog?n=3&last=beta")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["repositories"], serde_json::json!(["zeta"]));
}

#[tokio::test]
async fn oci_index_and_errors_everywhere() {
    let n = NodeProc::start().await;
    let c = n.client();
    let a = c.push_image("multi", "amd64", b"amd64 layer").await;
    let b = c.push_image("multi", "arm64", b"arm64 layer").await;
    let idx = format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[{{"mediaType":"{OCI_MANIFEST}","digest":"{a}","size":1,"platform":{{"architecture":"amd64","os":"linux"}}}},{{"mediaType":"{OCI_MANIFEST}","digest":"{b}","size":1,"platform":{{"architecture":"arm64","os":"linux"}}}}]}}"#
    );
    let r = c
        .put_manifest("multi", "latest", OCI_INDEX, idx.as_bytes())
        .await;
    assert_eq!(r.status(), 201);
    let r = c.get("/v2/multi/manifests/latest").await;
    assert_eq!(hdr(&r, "content-type"), OCI_INDEX);

    // Every 4xx under /v2/ carries the JSON error body.
    for (method, path, code) in [
        ("GET", "/v2/UPPER/tags/list", "NAME_INVALID"),
        ("GET", "/v2/x/blobs/sha256:abc", "DIGEST_INVALID"),
        ("GET", "/v2/x/what/ever", "UNSUPPORTED"),
        ("POST", "/v2/x/tags/list", "UNSUPPORTED"),
        ("GET", "/v2/x/blobs/uploads/nosuchid", "BLOB_UPLOAD_UNKNOWN"),
        ("PUT", "/v2/x/blobs/uploads/nosuchid?digest=sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855", "BLOB_UPLOAD_UNKNOWN"),
        ("PATCH", "/v2/x/blobs/uploads/nosuchid", "BLOB_UPLOAD_UNKNOWN"),
    ] {
        let r = c.http.request(method.parse().unwrap(), c.url(path)).send().await.unwrap();
        assert!(r.status().is_client_error(), "{method} {path}: {}", r.status());
        assert_eq!(error_code(r).await, code, "{method} {path}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_pushes_of_the_same_blob_and_tag_are_safe() {
    let n = NodeProc::start().await;
    let c = n.client();
    let data: Vec<u8> = (0..2_000_000u32).map(|i| (i % 241) as u8).collect();
    let d = sha256(&data);
    // Ten clients push the same blob at once, half monolithic, half chunked.
    let mut tasks = Vec::new();
    for i in 0..10 {
        let (c, data, d) = (c.clone(), data.clone(), d.clone());
        tasks.push(tokio::spawn(async move {
            if i % 2 == 0 {
                c.post_blob("race", &d, data).await.unwrap().status()
            } else {
                let r = c
                    .http
                    .post(c.url("/v2/race/blobs/uploads/"))
                    .send()
                    .await
                    .unwrap();
                let loc = hdr(&r, "location").to_owned();
                let r = c.patch(&loc, data).await.unwrap();
                let loc = hdr(&r, "location").to_owned();
                c.close_upload(&loc, &d, Vec::new()).await.unwrap().status()
            }
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 201);
    }
    let r = c.get(&format!("/v2/race/blobs/{d}")).await;
    assert_eq!(sha256(&r.bytes().await.unwrap()), d);
    // Ten clients tag different manifests with the same tag at once: the tag ends up
    // naming one of them, whole.
    let mut digests = Vec::new();
    let mut tasks = Vec::new();
    for i in 0..10u8 {
        let layer = c.push_blob("race", &[i; 100]).await;
        let m = image_manifest(&d, data.len(), &layer, 100);
        digests.push(sha256(m.as_bytes()));
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            c.put_manifest("race", "latest", OCI_MANIFEST, m.as_bytes())
                .await
                .status()
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 201);
    }
    let r = c.get("/v2/race/manifests/latest").await;
    assert_eq!(r.status(), 200);
    let got = sha256(&r.bytes().await.unwrap());
    assert!(digests.contains(&got), "tag names a manifest nobody pushed");
    let leftovers = files_under(&n.data.join("tmp"));
    assert!(
        leftovers.is_empty(),
        "temp files left behind: {leftovers:?}"
    );
}
