//! The storage layout, local and remote: the only module that turns identifiers into keys.
//!
//! Layout version 1. Changing any key below is a data migration; the golden test pins them.
//! Keys are types ([`LocalKey`], [`RemoteKey`], [`RemoteDir`]) whose only constructors are
//! the functions here, and the local store and the object store take nothing else, so the
//! compiler keeps "no other code formats a storage path" true.
//!
//! Local, under a node's data directory:
//! ```text
//! node.json                                      identity (id, rack) of the node owning the dir
//! blobs/<alg>/<hex[0..2]>/<hex>                  immutable blob bytes, manifests included
//! uploads/<upload-id>                            bytes of an upload in progress
//! tmp/                                           temp files, renamed into place when complete
//! quarantine/<alg>-<hex>-<uuid>                  blobs that failed verification (never served)
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
//! catalog/<name>/_repo                           empty; written before the repository's
//!                                                first object, so `_catalog` is one listing
//! meta/catalog-v1-complete                       empty; every repository has its entry
//! ```
//! Repository names cannot contain components starting with `_` (see [`RepoName`]), so the
//! `_manifests`, `_layers`, `_referrers` and `_repo` names never collide with a nested name.

use std::fmt;

use crate::{Algorithm, Digest, RepoName, ShardKey, Tag, UploadId};

pub const LAYOUT_VERSION: u32 = 1;

/// Digest algorithms whose directories a listing walks, in layout order.
pub const ALGORITHMS: [Algorithm; 2] = [Algorithm::Sha256, Algorithm::Sha512];

macro_rules! key_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        impl $name {
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

key_type!(
    /// A path relative to a node's data directory (file or directory).
    LocalKey
);
key_type!(
    /// The key of one object in object storage, relative to the store's prefix.
    RemoteKey
);
key_type!(
    /// A "directory" of object storage: the keys below it are listed (no trailing `/`).
    RemoteDir
);

/// Joined onto a data directory (`root.join(key)`); no I/O happens here.
impl AsRef<std::path::Path> for LocalKey {
    fn as_ref(&self) -> &std::path::Path {
        std::path::Path::new(&self.0)
    }
}

fn local(s: String) -> LocalKey {
    LocalKey(s)
}

fn remote(s: String) -> RemoteKey {
    RemoteKey(s)
}

fn dir(s: String) -> RemoteDir {
    RemoteDir(s)
}

// ---- local ---------------------------------------------------------------------------

pub fn local_identity() -> LocalKey {
    local("node.json".into())
}

pub fn local_blob(d: &Digest) -> LocalKey {
    local(format!(
        "blobs/{}/{}/{}",
        d.algorithm(),
        &d.hex()[..2],
        d.hex()
    ))
}

/// Root of the blob tree (`blobs/`).
pub fn local_blobs_root() -> LocalKey {
    local("blobs".into())
}

/// Where blobs of one algorithm live (`blobs/<alg>`; below it, two-hex fan-out directories).
pub fn local_blobs_dir(alg: Algorithm) -> LocalKey {
    local(format!("blobs/{alg}"))
}

pub fn local_upload(id: &UploadId) -> LocalKey {
    local(format!("uploads/{id}"))
}

pub fn local_uploads_dir() -> LocalKey {
    local("uploads".into())
}

pub fn local_tmp_dir() -> LocalKey {
    local("tmp".into())
}

pub fn local_quarantine_dir() -> LocalKey {
    local("quarantine".into())
}

/// Where a blob that failed verification is moved; `unique` keeps several failures of the
/// same digest apart.
pub fn local_quarantined(d: &Digest, unique: &str) -> LocalKey {
    local(format!("quarantine/{}-{}-{unique}", d.algorithm(), d.hex()))
}

pub fn local_repos_root() -> LocalKey {
    local("repos".into())
}

pub fn local_repo(name: &RepoName) -> LocalKey {
    local(format!("repos/{name}"))
}

/// The marker directory whose presence makes a directory under `repos/` a repository.
pub const LOCAL_REPO_MARKER: &str = "_manifests";
/// A repository's blob-membership directory.
pub const LOCAL_LAYERS: &str = "_layers";
/// A repository's referrer index.
pub const LOCAL_REFERRERS: &str = "_referrers";
/// A repository's own directories, the marker first (it is what makes a repository visible;
/// it is dropped first and created first). Everything else under `repos/` is a nested name.
pub const LOCAL_REPO_DIRS: [&str; 3] = [LOCAL_REPO_MARKER, LOCAL_LAYERS, LOCAL_REFERRERS];
/// Below `_manifests`, the directory of manifest revisions (`<alg>/<hex>`).
pub const LOCAL_REVISIONS: &str = "revisions";

pub fn local_repo_marker(name: &RepoName) -> LocalKey {
    local(format!("repos/{name}/{LOCAL_REPO_MARKER}"))
}

pub fn local_tags_dir(name: &RepoName) -> LocalKey {
    local(format!("repos/{name}/_manifests/tags"))
}

pub fn local_tag(name: &RepoName, tag: &Tag) -> LocalKey {
    local(format!("repos/{name}/_manifests/tags/{tag}"))
}

pub fn local_manifest_link(name: &RepoName, d: &Digest) -> LocalKey {
    local(format!(
        "repos/{name}/_manifests/revisions/{}/{}",
        d.algorithm(),
        d.hex()
    ))
}

pub fn local_layer_link(name: &RepoName, d: &Digest) -> LocalKey {
    local(format!(
        "repos/{name}/_layers/{}/{}",
        d.algorithm(),
        d.hex()
    ))
}

/// The two kinds of membership a repository records: the manifests it holds (revisions)
/// and the blobs it may serve (layers, configs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkKind {
    Manifest,
    Blob,
}

/// The directory of a repository's links of one kind and algorithm (names are hex).
pub fn local_links_dir(name: &RepoName, kind: LinkKind, alg: Algorithm) -> LocalKey {
    match kind {
        LinkKind::Manifest => local(format!("repos/{name}/_manifests/revisions/{alg}")),
        LinkKind::Blob => local(format!("repos/{name}/_layers/{alg}")),
    }
}

pub fn local_referrers_dir(name: &RepoName, subject: &Digest) -> LocalKey {
    local(format!(
        "repos/{name}/_referrers/{}/{}",
        subject.algorithm(),
        subject.hex()
    ))
}

pub fn local_referrer(name: &RepoName, subject: &Digest, referrer: &Digest) -> LocalKey {
    local(format!(
        "{}/{}-{}",
        local_referrers_dir(name, subject),
        referrer.algorithm(),
        referrer.hex()
    ))
}

// ---- remote --------------------------------------------------------------------------

pub fn remote_blob(d: &Digest) -> RemoteKey {
    remote(format!("blobs/{}/{}", d.algorithm(), d.hex()))
}

/// Everything of one repository (nested repositories' keys are below it too: filter with
/// [`parse_remote_repo_key`]).
pub fn remote_repo_dir(name: &RepoName) -> RemoteDir {
    dir(format!("repos/{name}"))
}

/// Every repository whose name starts with the shard key's components (deeper keys'
/// repositories included when the key has fewer components than the depth).
pub fn remote_shard_dir(key: &ShardKey) -> RemoteDir {
    dir(format!("repos/{key}"))
}

pub fn remote_tags_dir(name: &RepoName) -> RemoteDir {
    dir(format!("repos/{name}/tags"))
}

pub fn remote_tag(name: &RepoName, tag: &Tag) -> RemoteKey {
    remote(format!("repos/{name}/tags/{tag}"))
}

pub fn remote_manifest_link(name: &RepoName, d: &Digest) -> RemoteKey {
    remote(format!(
        "repos/{name}/manifests/{}/{}",
        d.algorithm(),
        d.hex()
    ))
}

pub fn remote_blob_link(name: &RepoName, d: &Digest) -> RemoteKey {
    remote(format!("repos/{name}/blobs/{}/{}", d.algorithm(), d.hex()))
}

/// A repository's links of one kind and algorithm in object storage (names are hex).
pub fn remote_links_dir(name: &RepoName, kind: LinkKind, alg: Algorithm) -> RemoteDir {
    match kind {
        LinkKind::Manifest => dir(format!("repos/{name}/manifests/{alg}")),
        LinkKind::Blob => dir(format!("repos/{name}/blobs/{alg}")),
    }
}

pub fn remote_repos_root() -> RemoteDir {
    dir("repos".into())
}

/// The catalog entry of a repository: an empty object written before the first object of
/// the repository, so `_catalog` lists `catalog/` (one key per repository) instead of every
/// key under `repos/`. The `_repo` leaf cannot be a name component (components never start
/// with `_`), and keeps a name from being both an object and a "directory" of a nested name.
pub fn remote_catalog_entry(name: &RepoName) -> RemoteKey {
    remote(format!("catalog/{name}/_repo"))
}

pub fn remote_catalog_root() -> RemoteDir {
    dir("catalog".into())
}

/// Present once every repository in object storage has its catalog entry (entries were
/// backfilled from `repos/` for data written before the catalog existed).
pub fn remote_catalog_complete() -> RemoteKey {
    remote("meta/catalog-v1-complete".into())
}

// ---- parsing keys read back from a listing -------------------------------------------

/// The repository a `catalog/` key names.
pub fn repo_of_catalog_key(key: &str) -> Option<RepoName> {
    key.strip_prefix("catalog/")?
        .strip_suffix("/_repo")?
        .parse()
        .ok()
}

/// What one key under `repos/` records.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RemoteRepoObject {
    Tag(Tag),
    ManifestLink(Digest),
    BlobLink(Digest),
}

/// The repository a remote key under `repos/` belongs to, and what the key records. Parsed
/// from the right, because a name may itself contain `tags`, `manifests` or `blobs`
/// components: a tag key ends in `tags/<tag>`, a link key in `manifests|blobs/<alg>/<hex>`.
pub fn parse_remote_repo_key(key: &str) -> Option<(RepoName, RemoteRepoObject)> {
    let rest = key.strip_prefix("repos/")?;
    let comps: Vec<&str> = rest.split('/').collect();
    let n = comps.len();
    let (name_end, object) = if n >= 3 && comps[n - 2] == "tags" {
        (n - 2, RemoteRepoObject::Tag(comps[n - 1].parse().ok()?))
    } else if n >= 4 && matches!(comps[n - 3], "manifests" | "blobs") {
        let d: Digest = format!("{}:{}", comps[n - 2], comps[n - 1]).parse().ok()?;
        let object = if comps[n - 3] == "manifests" {
            RemoteRepoObject::ManifestLink(d)
        } else {
            RemoteRepoObject::BlobLink(d)
        };
        (n - 3, object)
    } else {
        return None;
    };
    Some((comps[..name_end].join("/").parse().ok()?, object))
}

/// The repository a remote key under `repos/` belongs to.
pub fn repo_of_remote_key(key: &str) -> Option<RepoName> {
    parse_remote_repo_key(key).map(|(repo, _)| repo)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn golden_keys() {
        let d: Digest = format!("sha256:ab{}", "0".repeat(62)).parse().unwrap();
        let n: RepoName = "billing/api".parse().unwrap();
        let k: ShardKey = n.shard_key(std::num::NonZeroUsize::new(2).unwrap());
        let t: Tag = "v1".parse().unwrap();
        let u: UploadId = "u-1".parse().unwrap();
        let h = d.hex();
        let local_cases = [
            (local_identity(), "node.json".to_owned()),
            (local_blob(&d), format!("blobs/sha256/ab/{h}")),
            (local_blobs_root(), "blobs".to_owned()),
            (
                local_blobs_dir(Algorithm::Sha512),
                "blobs/sha512".to_owned(),
            ),
            (local_upload(&u), "uploads/u-1".to_owned()),
            (local_uploads_dir(), "uploads".to_owned()),
            (local_tmp_dir(), "tmp".to_owned()),
            (local_quarantine_dir(), "quarantine".to_owned()),
            (
                local_quarantined(&d, "x1"),
                format!("quarantine/sha256-{h}-x1"),
            ),
            (local_repos_root(), "repos".to_owned()),
            (local_repo(&n), "repos/billing/api".to_owned()),
            (
                local_repo_marker(&n),
                "repos/billing/api/_manifests".to_owned(),
            ),
            (
                local_tags_dir(&n),
                "repos/billing/api/_manifests/tags".to_owned(),
            ),
            (
                local_tag(&n, &t),
                "repos/billing/api/_manifests/tags/v1".to_owned(),
            ),
            (
                local_manifest_link(&n, &d),
                format!("repos/billing/api/_manifests/revisions/sha256/{h}"),
            ),
            (
                local_links_dir(&n, LinkKind::Manifest, Algorithm::Sha256),
                "repos/billing/api/_manifests/revisions/sha256".to_owned(),
            ),
            (
                local_layer_link(&n, &d),
                format!("repos/billing/api/_layers/sha256/{h}"),
            ),
            (
                local_links_dir(&n, LinkKind::Blob, Algorithm::Sha256),
                "repos/billing/api/_layers/sha256".to_owned(),
            ),
            (
                local_referrer(&n, &d, &d),
                format!("repos/billing/api/_referrers/sha256/{h}/sha256-{h}"),
            ),
        ];
        for (got, want) in local_cases {
            assert_eq!(got.as_str(), want);
        }
        let remote_cases = [
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
            (
                remote_catalog_complete(),
                "meta/catalog-v1-complete".to_owned(),
            ),
        ];
        for (got, want) in remote_cases {
            assert_eq!(got.as_str(), want);
        }
        let dir_cases = [
            (remote_repo_dir(&n), "repos/billing/api"),
            (remote_shard_dir(&k), "repos/billing/api"),
            (remote_tags_dir(&n), "repos/billing/api/tags"),
            (
                remote_links_dir(&n, LinkKind::Manifest, Algorithm::Sha256),
                "repos/billing/api/manifests/sha256",
            ),
            (
                remote_links_dir(&n, LinkKind::Blob, Algorithm::Sha512),
                "repos/billing/api/blobs/sha512",
            ),
            (remote_repos_root(), "repos"),
            (remote_catalog_root(), "catalog"),
        ];
        for (got, want) in dir_cases {
            assert_eq!(got.as_str(), want);
        }
        assert_eq!(LOCAL_REPO_DIRS, ["_manifests", "_layers", "_referrers"]);
        assert_eq!(
            repo_of_catalog_key("catalog/billing/api/_repo"),
            Some(n.clone())
        );
        assert_eq!(repo_of_catalog_key("catalog/billing/api"), None);
        assert_eq!(repo_of_catalog_key("repos/billing/api/_repo"), None);
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

    #[test]
    fn remote_repo_keys_say_what_they_record() {
        let d: Digest = format!("sha256:{}", "1".repeat(64)).parse().unwrap();
        let n: RepoName = "a/b".parse().unwrap();
        let t: Tag = "v1".parse().unwrap();
        for (key, want) in [
            (remote_tag(&n, &t), RemoteRepoObject::Tag(t.clone())),
            (
                remote_manifest_link(&n, &d),
                RemoteRepoObject::ManifestLink(d.clone()),
            ),
            (
                remote_blob_link(&n, &d),
                RemoteRepoObject::BlobLink(d.clone()),
            ),
        ] {
            assert_eq!(
                parse_remote_repo_key(key.as_str()),
                Some((n.clone(), want)),
                "{key}"
            );
        }
        // A link key whose digest does not parse is no object of the layout.
        assert_eq!(parse_remote_repo_key("repos/a/blobs/sha256/xyz"), None);
    }
}
