//! The storage layout, local and remote: the only module that turns identifiers into keys.
//!
//! Layout version 1. Changing any key below is a data migration; the golden test pins them.
//!
//! Local, under a node's data directory:
//! ```text
//! node.json                                      identity (id, rack) of the node owning the dir
//! blobs/<alg>/<hex[0..2]>/<hex>                  immutable blob bytes, manifests included
//! uploads/<upload-id>                            bytes of an upload in progress
//! tmp/                                           temp files, renamed into place when complete
//! repos/<name>/_manifests/tags/<tag>             current digest of a tag (text)
//! repos/<name>/_manifests/revisions/<alg>/<hex>  manifest membership; holds its media type
//! repos/<name>/_layers/<alg>/<hex>               blob membership (empty file)
//! repos/<name>/_referrers/<alg>/<subject-hex>/<alg>-<hex>
//!                                                descriptor (JSON) of a manifest whose
//!                                                `subject` is the given digest
//! ```
//! Remote (object storage; each blob once, deduplicated across repositories):
//! ```text
//! blobs/<alg>/<hex>
//! repos/<name>/tags/<tag>                        digest text
//! repos/<name>/manifests/<alg>/<hex>             media type text
//! repos/<name>/blobs/<alg>/<hex>                 empty
//! ```
//! Repository names cannot contain components starting with `_` (see [`RepoName`]), so the
//! `_manifests`, `_layers` and `_referrers` directories never collide with a nested name.

use crate::{Digest, RepoName, Tag, UploadId};

pub const LAYOUT_VERSION: u32 = 1;

pub fn local_identity() -> &'static str {
    "node.json"
}

pub fn local_blob(d: &Digest) -> String {
    format!("blobs/{}/{}/{}", d.algorithm(), &d.hex()[..2], d.hex())
}

pub fn local_upload(id: &UploadId) -> String {
    format!("uploads/{id}")
}

pub fn local_uploads_dir() -> &'static str {
    "uploads"
}

pub fn local_tmp_dir() -> &'static str {
    "tmp"
}

pub fn local_repos_root() -> &'static str {
    "repos"
}

pub fn local_repo(name: &RepoName) -> String {
    format!("repos/{name}")
}

/// The marker directory whose presence makes a directory under `repos/` a repository.
pub fn local_repo_marker() -> &'static str {
    "_manifests"
}

pub fn local_tags_dir(name: &RepoName) -> String {
    format!("repos/{name}/_manifests/tags")
}

pub fn local_tag(name: &RepoName, tag: &Tag) -> String {
    format!("repos/{name}/_manifests/tags/{tag}")
}

pub fn local_manifest_link(name: &RepoName, d: &Digest) -> String {
    format!(
        "repos/{name}/_manifests/revisions/{}/{}",
        d.algorithm(),
        d.hex()
    )
}

pub fn local_layer_link(name: &RepoName, d: &Digest) -> String {
    format!("repos/{name}/_layers/{}/{}", d.algorithm(), d.hex())
}

pub fn local_referrers_dir(name: &RepoName, subject: &Digest) -> String {
    format!(
        "repos/{name}/_referrers/{}/{}",
        subject.algorithm(),
        subject.hex()
    )
}

pub fn local_referrer(name: &RepoName, subject: &Digest, referrer: &Digest) -> String {
    format!(
        "{}/{}-{}",
        local_referrers_dir(name, subject),
        referrer.algorithm(),
        referrer.hex()
    )
}

pub fn remote_blob(d: &Digest) -> String {
    format!("blobs/{}/{}", d.algorithm(), d.hex())
}

pub fn remote_repo_prefix(name: &RepoName) -> String {
    format!("repos/{name}/")
}

pub fn remote_tag(name: &RepoName, tag: &Tag) -> String {
    format!("repos/{name}/tags/{tag}")
}

pub fn remote_manifest_link(name: &RepoName, d: &Digest) -> String {
    format!("repos/{name}/manifests/{}/{}", d.algorithm(), d.hex())
}

pub fn remote_blob_link(name: &RepoName, d: &Digest) -> String {
    format!("repos/{name}/blobs/{}/{}", d.algorithm(), d.hex())
}

pub fn remote_repos_root() -> &'static str {
    "repos/"
}

/// The catalog entry of a repository: an empty object written before the first object of
/// the repository, so `_catalog` lists `catalog/` (one key per repository) instead of every
/// key under `repos/`. The `_repo` leaf cannot be a name component (components never start
/// with `_`), and keeps a name from being both an object and a "directory" of a nested name.
pub fn remote_catalog_entry(name: &RepoName) -> String {
    format!("catalog/{name}/_repo")
}

pub fn remote_catalog_root() -> &'static str {
    "catalog/"
}

/// Present once every repository in object storage has its catalog entry (entries were
/// backfilled from `repos/` for data written before the catalog existed).
pub fn remote_catalog_complete() -> &'static str {
    "meta/catalog-v1-complete"
}

/// The repository a `catalog/` key names.
pub fn repo_of_catalog_key(key: &str) -> Option<RepoName> {
    key.strip_prefix("catalog/")?
        .strip_suffix("/_repo")?
        .parse()
        .ok()
}

/// The repository a remote key under `repos/` belongs to. Parsed from the right, because a
/// name may itself contain `tags`, `manifests` or `blobs` components: a tag key ends in
/// `tags/<tag>`, a link key in `manifests|blobs/<alg>/<hex>`.
pub fn repo_of_remote_key(key: &str) -> Option<RepoName> {
    let rest = key.strip_prefix("repos/")?;
    let comps: Vec<&str> = rest.split('/').collect();
    let n = comps.len();
    let name_end = if n >= 3 && comps[n - 2] == "tags" {
        n - 2
    } else if n >= 4 && matches!(comps[n - 3], "manifests" | "blobs") {
        n - 3
    } else {
        return None;
    };
    comps[..name_end].join("/").parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn golden_keys() {
        let d: Digest = format!("sha256:ab{}", "0".repeat(62)).parse().unwrap();
        let n: RepoName = "billing/api".parse().unwrap();
        let t: Tag = "v1".parse().unwrap();
        let u: UploadId = "u-1".parse().unwrap();
        let h = d.hex();
        let cases = [
            (local_blob(&d), format!("blobs/sha256/ab/{h}")),
            (local_upload(&u), "uploads/u-1".to_owned()),
            (
                local_tag(&n, &t),
                "repos/billing/api/_manifests/tags/v1".to_owned(),
            ),
            (
                local_manifest_link(&n, &d),
                format!("repos/billing/api/_manifests/revisions/sha256/{h}"),
            ),
            (
                local_layer_link(&n, &d),
                format!("repos/billing/api/_layers/sha256/{h}"),
            ),
            (
                local_referrer(&n, &d, &d),
                format!("repos/billing/api/_referrers/sha256/{h}/sha256-{h}"),
            ),
            (remote_blob(&d), format!("blobs/sha256/{h}")),
            (remote_tag(&n, &t), "repos/billing/api/tags/v1".to_owned()),
            (
                remote_manifest_link(&n, &d),
                format!("repos/billing/api/manifests/sha256/{h}"),
            ),
            (
                remote_blob_link(&n, &d),
                format!("repos/billing/api/blobs/sha256/{h}"),
            ),
            (
                remote_catalog_entry(&n),
                "catalog/billing/api/_repo".to_owned(),
            ),
        ];
        assert_eq!(
            repo_of_catalog_key("catalog/billing/api/_repo"),
            Some(n.clone())
        );
        assert_eq!(repo_of_catalog_key("catalog/billing/api"), None);
        assert_eq!(repo_of_catalog_key("repos/billing/api/_repo"), None);
        for (got, want) in cases {
            assert_eq!(got, want);
        }
        assert_eq!(LAYOUT_VERSION, 1);
    }

    #[test]
    fn repo_of_remote_keys() {
        let h = "0".repeat(64);
        for (key, want) in [
            ("repos/a/b/tags/v1".to_owned(), Some("a/b")),
            ("repos/a/tags/tags/tags".to_owned(), Some("a/tags")),
            (
                format!("repos/x/manifests/manifests/sha256/{h}"),
                Some("x/manifests"),
            ),
            (format!("repos/y/blobs/sha256/{h}"), Some("y")),
            ("repos/y".to_owned(), None),
            (format!("blobs/sha256/{h}"), None),
        ] {
            assert_eq!(
                repo_of_remote_key(&key).map(|r| r.to_string()).as_deref(),
                want,
                "{key}"
            );
        }
    }
}
