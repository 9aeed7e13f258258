//! What each fuzz target asserts, beyond "never panics": whatever a parser accepts is in
//! canonical form and survives a round trip (`Display` then parse gives the same value), and
//! no accepted name can climb out of a directory. Shared verbatim by the cargo-fuzz targets
//! and by `tests/fuzz_corpus.rs`, which replays `fuzz/corpus/<target>/*` on stable in CI.
//!
//! Still to come from the auth branch (targets to add there, same pattern): htpasswd lines,
//! bearer-token (JWT) parsing, `WWW-Authenticate`/scope strings, access-policy files.

use std::str::FromStr;

use flotilla_core::{Digest, Reference, RepoName, Tag, UploadId};
use registry_client::OciRoute;

/// One target's check.
pub type Check = fn(&[u8]);

/// Every target, by name, for the corpus replay.
pub const TARGETS: &[(&str, Check)] = &[
    ("route", route),
    ("reference", reference),
    ("digest", digest),
    ("manifest", manifest),
    ("content_range", content_range),
];

fn round_trips<T>(v: &T)
where
    T: FromStr + std::fmt::Display + PartialEq + std::fmt::Debug,
    T::Err: std::fmt::Debug,
{
    let s = v.to_string();
    let again: T = s
        .parse()
        .unwrap_or_else(|e| panic!("{v:?} displays as {s:?}, which does not parse: {e:?}"));
    assert_eq!(&again, v, "round trip of {s:?}");
}

fn safe_name(repo: &RepoName) {
    round_trips(repo);
    for c in repo.as_str().split('/') {
        assert!(
            !c.is_empty() && c != "." && c != "..",
            "component {c:?} in {repo:?}"
        );
        assert!(
            !c.contains(['%', '\\', '\0']),
            "component {c:?} in {repo:?}"
        );
    }
}

/// The `/v2/...` route parser: an accepted route rebuilt as a path parses to itself.
pub fn route(data: &[u8]) {
    let Ok(path) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(r) = OciRoute::parse(path) else {
        return;
    };
    let rebuilt = match &r {
        OciRoute::Base => "/v2/".to_owned(),
        OciRoute::Catalog => "/v2/_catalog".to_owned(),
        OciRoute::Tags { repo } => {
            safe_name(repo);
            format!("/v2/{repo}/tags/list")
        }
        OciRoute::Manifest { repo, reference } => {
            safe_name(repo);
            round_trips(reference);
            format!("/v2/{repo}/manifests/{reference}")
        }
        OciRoute::Blob { repo, digest } => {
            safe_name(repo);
            format!("/v2/{repo}/blobs/{digest}")
        }
        OciRoute::UploadStart { repo } => {
            safe_name(repo);
            format!("/v2/{repo}/blobs/uploads/")
        }
        OciRoute::Upload { repo, id } => {
            safe_name(repo);
            round_trips(id);
            format!("/v2/{repo}/blobs/uploads/{id}")
        }
        OciRoute::Referrers { repo, digest } => {
            safe_name(repo);
            format!("/v2/{repo}/referrers/{digest}")
        }
    };
    let again = OciRoute::parse(&rebuilt)
        .unwrap_or_else(|e| panic!("{r:?} rebuilt as {rebuilt:?} does not parse: {e:?}"));
    assert_eq!(again, r, "{path:?} -> {rebuilt:?}");
}

/// Names, tags, references and upload ids: accepted means canonical.
pub fn reference(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(r) = s.parse::<Reference>() {
        round_trips(&r);
        assert_eq!(r.to_string(), s, "a reference is kept as sent");
    }
    if let Ok(n) = s.parse::<RepoName>() {
        safe_name(&n);
    }
    if let Ok(t) = s.parse::<Tag>() {
        round_trips(&t);
        assert!(!t.as_str().contains(['/', ':']), "tag {t:?}");
    }
    if let Ok(u) = s.parse::<UploadId>() {
        round_trips(&u);
        assert!(
            !u.as_str().contains(['/', '\\']) && u.as_str() != "..",
            "upload id {u:?}"
        );
    }
}

/// Digests: accepted means `algorithm:hex` of the right length, lowercase, as sent.
pub fn digest(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(d) = s.parse::<Digest>() {
        round_trips(&d);
        assert_eq!(d.to_string(), s);
        assert!(d
            .hex()
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
    }
}

/// Manifest parsing under each content type a client may send: never a panic, and what is
/// accepted references only valid digests.
pub fn manifest(data: &[u8]) {
    for ct in [
        None,
        Some("application/vnd.oci.image.manifest.v1+json"),
        Some("application/vnd.oci.image.index.v1+json"),
        Some("application/vnd.docker.distribution.manifest.v2+json"),
        Some("application/json; charset=utf-8"),
    ] {
        if let Ok(m) = registry_node::manifest::parse(data, ct) {
            for d in m.blobs.iter().chain(&m.manifests).chain(&m.subject) {
                round_trips(d);
            }
        }
    }
}

/// `Content-Range` (uploads) and `Range` (blob reads): accepted ranges are ordered and, for
/// reads, inside the blob.
pub fn content_range(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let _ = registry_node::headers::parse_content_range(s);
    for size in [0u64, 1, 2, 100, 1 << 40, u64::MAX] {
        if let Ok(Some((start, end))) = registry_node::headers::parse_range(Some(s), size) {
            assert!(start <= end && end < size, "{s:?} of {size}: {start}-{end}");
        }
    }
}
