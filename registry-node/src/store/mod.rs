//! The node's local store: content-addressed blobs and per-repository links on disk.
//!
//! Write discipline (the write order and what a crash leaves are in the `write` module): every file that becomes visible
//! under its final name was first written in full to a temp file, fsynced, then renamed, and
//! the parent directory fsynced. So after a `kill -9` at any instant a final path holds either
//! nothing or complete, verified content; leftovers live only under `tmp/` and `uploads/`,
//! which startup sweeps. Order of visibility for a manifest push is blob, revision link,
//! referrer entry, tag: a tag can never point at a manifest that is not there.

mod fsutil;
mod verified;

use std::collections::BTreeSet;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use flotilla_core::layout::{self, LinkKind, LocalKey};
use flotilla_core::{Digest, RepoName, Tag};
use serde::{Deserialize, Serialize};

pub(crate) use fsutil::{fsync_dir, write_atomic};
pub(crate) use verified::FileStamp;
use verified::VerifiedMemo;

/// Blobs remembered as verified (see `verified`): ~100 bytes each, so about 6 MiB at most.
const VERIFIED_MEMO_CAP: usize = 65_536;

/// Failures of local store operations, with the identifiers callers branch on.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("blob {0} unknown")]
    BlobUnknown(Digest),
    #[error("manifest {0} unknown")]
    ManifestUnknown(String),
    #[error("repository {0} unknown")]
    NameUnknown(RepoName),
    #[error("corrupt store entry {path}: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("i/o on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

pub(crate) fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_owned(),
        source,
    }
}

/// What we record about a manifest that names another manifest as its `subject`; exactly the
/// descriptor the referrers API returns.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ReferrerDescriptor {
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub annotations: Option<serde_json::Map<String, serde_json::Value>>,
}

/// Handle on a node's data directory. Cheap to clone.
#[derive(Clone, Debug)]
pub(crate) struct LocalStore {
    root: PathBuf,
    verified: std::sync::Arc<VerifiedMemo>,
}

impl LocalStore {
    /// Open (creating if needed) the directory tree and sweep leftovers of a previous run:
    /// temp files and upload sessions cannot be resumed after a restart.
    pub(crate) async fn open(root: PathBuf) -> Result<Self, StoreError> {
        let store = LocalStore {
            root,
            verified: std::sync::Arc::new(VerifiedMemo::new(VERIFIED_MEMO_CAP)),
        };
        let swept = [layout::local_tmp_dir(), layout::local_uploads_dir()];
        for dir in swept
            .iter()
            .chain(&[layout::local_blobs_root(), layout::local_repos_root()])
        {
            let p = store.path(dir);
            if swept.contains(dir) {
                match tokio::fs::remove_dir_all(&p).await {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(io_err(&p)(e)),
                }
            }
            tokio::fs::create_dir_all(&p).await.map_err(io_err(&p))?;
        }
        Ok(store)
    }

    /// Remember that the blob file whose metadata was `stamp` before hashing matched `d`.
    pub(crate) fn mark_verified(&self, d: &Digest, stamp: FileStamp) {
        self.verified.mark(d, stamp);
    }

    /// True when `d`'s file still has exactly the metadata it had when it last verified.
    pub(crate) fn is_verified(&self, d: &Digest, stamp: FileStamp) -> bool {
        self.verified.is_verified(d, stamp)
    }

    pub(crate) fn forget_verified(&self, d: &Digest) {
        self.verified.forget(d);
    }

    pub(crate) fn root(&self) -> &Path {
        &self.root
    }

    pub(crate) fn path(&self, rel: &LocalKey) -> PathBuf {
        self.root.join(rel.as_str())
    }

    pub(crate) fn tmp_dir(&self) -> PathBuf {
        self.path(&layout::local_tmp_dir())
    }

    /// Size of a stored blob, or `None` if absent.
    pub(crate) async fn blob_size(&self, d: &Digest) -> Result<Option<u64>, StoreError> {
        let p = self.path(&layout::local_blob(d));
        match tokio::fs::metadata(&p).await {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(&p)(e)),
        }
    }

    /// Open a blob; its size and its metadata stamp (for [`Self::is_verified`]) are taken from
    /// the open descriptor, so they describe exactly the file that will be read.
    pub(crate) async fn open_blob(
        &self,
        d: &Digest,
    ) -> Result<(tokio::fs::File, u64, FileStamp), StoreError> {
        let p = self.path(&layout::local_blob(d));
        let f = match tokio::fs::File::open(&p).await {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(StoreError::BlobUnknown(d.clone()))
            }
            Err(e) => return Err(io_err(&p)(e)),
        };
        let meta = f.metadata().await.map_err(io_err(&p))?;
        Ok((f, meta.len(), FileStamp::of(&meta)))
    }

    /// Move a complete, verified, fsynced file to its content-addressed path. Concurrent
    /// commits of the same digest are harmless: the bytes are identical and rename is atomic.
    pub(crate) async fn commit_blob(
        &self,
        verified_file: &Path,
        d: &Digest,
    ) -> Result<(), StoreError> {
        let dest = self.path(&layout::local_blob(d));
        let parent = dest.parent().map(Path::to_owned).unwrap_or_default();
        tokio::fs::create_dir_all(&parent)
            .await
            .map_err(io_err(&parent))?;
        let meta = tokio::fs::metadata(verified_file)
            .await
            .map_err(io_err(verified_file))?;
        tokio::fs::rename(verified_file, &dest)
            .await
            .map_err(io_err(&dest))?;
        fsync_dir(&parent).await.map_err(io_err(&parent))?;
        // Rename keeps the inode and moves only the ctime, so take the stamp at the final
        // path (the bytes are the ones the caller hashed: nothing else writes there).
        let meta = match tokio::fs::metadata(&dest).await {
            Ok(m) if m.ino() == meta.ino() => m,
            _ => return Ok(()), // replaced by a concurrent commit: it will be verified on read
        };
        self.mark_verified(d, FileStamp::of(&meta));
        Ok(())
    }

    /// Store small content (a manifest) under its digest, atomically.
    pub(crate) async fn put_blob_bytes(&self, d: &Digest, bytes: &[u8]) -> Result<(), StoreError> {
        if self.blob_size(d).await? == Some(bytes.len() as u64) {
            return Ok(());
        }
        self.write_atomic(&layout::local_blob(d), bytes).await
    }

    pub(crate) async fn read_blob_bytes(
        &self,
        d: &Digest,
        limit: u64,
    ) -> Result<Vec<u8>, StoreError> {
        let p = self.path(&layout::local_blob(d));
        match tokio::fs::metadata(&p).await {
            Ok(m) if m.len() > limit => {
                return Err(StoreError::Corrupt {
                    path: p,
                    reason: "manifest larger than the limit".into(),
                })
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(StoreError::BlobUnknown(d.clone()))
            }
            Err(e) => return Err(io_err(&p)(e)),
        }
        tokio::fs::read(&p).await.map_err(io_err(&p))
    }

    async fn write_atomic(&self, rel: &LocalKey, bytes: &[u8]) -> Result<(), StoreError> {
        let p = self.path(rel);
        write_atomic(&self.tmp_dir(), &p, bytes)
            .await
            .map_err(io_err(&p))
    }

    async fn remove(&self, rel: &LocalKey) -> Result<bool, StoreError> {
        let p = self.path(rel);
        match tokio::fs::remove_file(&p).await {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io_err(&p)(e)),
        }
    }

    async fn exists(&self, rel: &LocalKey) -> Result<bool, StoreError> {
        let p = self.path(rel);
        tokio::fs::try_exists(&p).await.map_err(io_err(&p))
    }

    async fn read_string(&self, rel: &LocalKey) -> Result<Option<String>, StoreError> {
        let p = self.path(rel);
        match tokio::fs::read_to_string(&p).await {
            Ok(s) => Ok(Some(s)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(&p)(e)),
        }
    }

    // ---- repository membership -------------------------------------------------------

    pub(crate) async fn repo_exists(&self, repo: &RepoName) -> Result<bool, StoreError> {
        self.exists(&layout::local_repo_marker(repo)).await
    }

    /// Make sure the repository marker exists, so a repository with only blobs is listed.
    async fn ensure_repo(&self, repo: &RepoName) -> Result<(), StoreError> {
        let p = self.path(&layout::local_tags_dir(repo));
        tokio::fs::create_dir_all(&p).await.map_err(io_err(&p))
    }

    pub(crate) async fn link_layer(&self, repo: &RepoName, d: &Digest) -> Result<(), StoreError> {
        self.ensure_repo(repo).await?;
        let rel = layout::local_layer_link(repo, d);
        if self.exists(&rel).await? {
            return Ok(());
        }
        self.write_atomic(&rel, b"").await
    }

    pub(crate) async fn has_layer(&self, repo: &RepoName, d: &Digest) -> Result<bool, StoreError> {
        self.exists(&layout::local_layer_link(repo, d)).await
    }

    pub(crate) async fn unlink_layer(
        &self,
        repo: &RepoName,
        d: &Digest,
    ) -> Result<bool, StoreError> {
        self.remove(&layout::local_layer_link(repo, d)).await
    }

    pub(crate) async fn link_manifest(
        &self,
        repo: &RepoName,
        d: &Digest,
        media_type: &str,
    ) -> Result<(), StoreError> {
        self.ensure_repo(repo).await?;
        self.write_atomic(&layout::local_manifest_link(repo, d), media_type.as_bytes())
            .await
    }

    /// The media type recorded when the manifest was pushed to this repository, or `None`
    /// if the repository does not hold it.
    pub(crate) async fn manifest_media_type(
        &self,
        repo: &RepoName,
        d: &Digest,
    ) -> Result<Option<String>, StoreError> {
        self.read_string(&layout::local_manifest_link(repo, d))
            .await
    }

    pub(crate) async fn unlink_manifest(
        &self,
        repo: &RepoName,
        d: &Digest,
    ) -> Result<bool, StoreError> {
        self.remove(&layout::local_manifest_link(repo, d)).await
    }

    pub(crate) async fn put_tag(
        &self,
        repo: &RepoName,
        tag: &Tag,
        d: &Digest,
    ) -> Result<(), StoreError> {
        self.write_atomic(&layout::local_tag(repo, tag), d.to_string().as_bytes())
            .await
    }

    pub(crate) async fn get_tag(
        &self,
        repo: &RepoName,
        tag: &Tag,
    ) -> Result<Option<Digest>, StoreError> {
        let rel = layout::local_tag(repo, tag);
        match self.read_string(&rel).await? {
            None => Ok(None),
            Some(s) => s.trim().parse().map(Some).map_err(|_| StoreError::Corrupt {
                path: self.path(&rel),
                reason: "tag file does not hold a digest".into(),
            }),
        }
    }

    pub(crate) async fn delete_tag(&self, repo: &RepoName, tag: &Tag) -> Result<bool, StoreError> {
        self.remove(&layout::local_tag(repo, tag)).await
    }

    /// All tags of a repository in lexical order; `NameUnknown` if there is no repository.
    pub(crate) async fn list_tags(&self, repo: &RepoName) -> Result<Vec<Tag>, StoreError> {
        if !self.repo_exists(repo).await? {
            return Err(StoreError::NameUnknown(repo.clone()));
        }
        let dir = self.path(&layout::local_tags_dir(repo));
        let names = list_dir(&dir).await?;
        let mut tags: Vec<Tag> = names.into_iter().filter_map(|n| n.parse().ok()).collect();
        tags.sort();
        Ok(tags)
    }

    /// Every tag of `repo` that points at `d`.
    pub(crate) async fn tags_pointing_at(
        &self,
        repo: &RepoName,
        d: &Digest,
    ) -> Result<Vec<Tag>, StoreError> {
        let mut out = Vec::new();
        for tag in self.list_tags(repo).await.unwrap_or_default() {
            if self.get_tag(repo, &tag).await?.as_ref() == Some(d) {
                out.push(tag);
            }
        }
        Ok(out)
    }

    pub(crate) async fn put_referrer(
        &self,
        repo: &RepoName,
        subject: &Digest,
        desc: &ReferrerDescriptor,
    ) -> Result<(), StoreError> {
        let json = serde_json::to_vec(desc).map_err(|e| StoreError::Corrupt {
            path: PathBuf::new(),
            reason: e.to_string(),
        })?;
        self.write_atomic(&layout::local_referrer(repo, subject, &desc.digest), &json)
            .await
    }

    pub(crate) async fn delete_referrer(
        &self,
        repo: &RepoName,
        subject: &Digest,
        referrer: &Digest,
    ) -> Result<bool, StoreError> {
        self.remove(&layout::local_referrer(repo, subject, referrer))
            .await
    }

    pub(crate) async fn list_referrers(
        &self,
        repo: &RepoName,
        subject: &Digest,
    ) -> Result<Vec<ReferrerDescriptor>, StoreError> {
        let dir = self.path(&layout::local_referrers_dir(repo, subject));
        let mut out = Vec::new();
        for name in list_dir(&dir).await? {
            let p = dir.join(&name);
            let bytes = match tokio::fs::read(&p).await {
                Ok(b) => b,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err(&p)(e)),
            };
            match serde_json::from_slice::<ReferrerDescriptor>(&bytes) {
                Ok(d) => out.push(d),
                Err(e) => {
                    tracing::warn!(path = %p.display(), error = %e, "skipping corrupt referrer entry")
                }
            }
        }
        out.sort_by(|a, b| a.digest.cmp(&b.digest));
        Ok(out)
    }

    /// Digests of the manifests or blobs linked into `repo`.
    pub(crate) async fn list_links(
        &self,
        repo: &RepoName,
        kind: LinkKind,
    ) -> Result<Vec<Digest>, StoreError> {
        let mut out = Vec::new();
        for alg in layout::ALGORITHMS {
            let dir = layout::local_links_dir(repo, kind, alg);
            for name in list_dir(&self.path(&dir)).await? {
                if let Ok(d) = format!("{alg}:{name}").parse() {
                    out.push(d);
                }
            }
        }
        Ok(out)
    }

    /// Every repository on this node, in lexical order. A directory under `repos/` is a
    /// repository when it holds the `_manifests` marker; names nest, so we keep descending.
    pub(crate) async fn list_repos(&self) -> Result<Vec<RepoName>, StoreError> {
        let root = self.root.clone();
        tokio::task::spawn_blocking(move || {
            let mut out = BTreeSet::new();
            visit_repo_dirs(&root, &mut |repo, _, name| {
                if name == layout::LOCAL_REPO_MARKER {
                    out.insert(repo);
                }
                Ok(())
            })
            .map_err(io_err(&root))?;
            Ok(out.into_iter().collect())
        })
        .await
        .map_err(|e| StoreError::Io {
            path: PathBuf::new(),
            source: io::Error::other(e),
        })?
    }

    /// Whether any blob with this digest exists on the node, whichever repository holds it.
    pub(crate) async fn has_blob(&self, d: &Digest) -> Result<bool, StoreError> {
        Ok(self.blob_size(d).await?.is_some())
    }
}

/// Walk `repos/` under the data directory `root`: `visit(repo, dir, name)` for every
/// repository's own `_`-prefixed directory (`_manifests`, `_layers`, `_referrers`); nested
/// repositories are visited too.
pub(crate) fn visit_repo_dirs(
    root: &Path,
    visit: &mut dyn FnMut(RepoName, &Path, &str) -> io::Result<()>,
) -> io::Result<()> {
    fn walk(
        base: &Path,
        dir: &Path,
        visit: &mut dyn FnMut(RepoName, &Path, &str) -> io::Result<()>,
    ) -> io::Result<()> {
        let rd = match std::fs::read_dir(dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        for entry in rd {
            let entry = entry?;
            if !entry.file_type()?.is_dir() {
                continue;
            }
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if !name.starts_with('_') {
                walk(base, &entry.path(), visit)?;
                continue;
            }
            let repo = dir
                .strip_prefix(base)
                .ok()
                .and_then(|p| p.to_str())
                .and_then(|p| p.parse().ok());
            if let Some(repo) = repo {
                visit(repo, &entry.path(), name)?;
            }
        }
        Ok(())
    }
    let base = root.join(layout::local_repos_root().as_str());
    walk(&base, &base, visit)
}

async fn list_dir(dir: &Path) -> Result<Vec<String>, StoreError> {
    let mut rd = match tokio::fs::read_dir(dir).await {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err(dir)(e)),
    };
    let mut out = Vec::new();
    while let Some(e) = rd.next_entry().await.map_err(io_err(dir))? {
        if let Some(n) = e.file_name().to_str() {
            out.push(n.to_owned());
        }
    }
    Ok(out)
}
