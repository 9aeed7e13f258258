//! Listings: tags, the catalog and referrers. With object storage its listing is the
//! authority (every write landed there first); the local store answers without one.

use flotilla_core::{layout, Digest, RepoName, Tag};

use crate::service::Result;
use crate::store::{ReferrerDescriptor, StoreError};
use crate::NodeService;
use flotilla_objstore::Remote;

impl NodeService {
    /// Tags in lexical order. With object storage, its listing is authoritative: every tag
    /// write lands there before it is acknowledged, and a rebuilt node's disk may be partial.
    pub(crate) async fn list_tags(&self, repo: &RepoName) -> Result<Vec<Tag>> {
        let Some(r) = &self.inner.remote else {
            return Ok(self.inner.store.list_tags(repo).await?);
        };
        let mut tags: Vec<Tag> = r
            .list_names(&layout::remote_tags_dir(repo))
            .await?
            .into_iter()
            .filter_map(|t| t.parse().ok())
            .collect();
        if tags.is_empty()
            && r.list_keys(&layout::remote_repo_dir(repo))
                .await?
                .is_empty()
        {
            return Err(StoreError::NameUnknown(repo.clone()).into());
        }
        tags.sort();
        Ok(tags)
    }

    /// Every repository, from object storage when configured: its catalog entries (one key
    /// per repository) once they are complete, else every key under `repos/`.
    pub(crate) async fn list_repos(&self) -> Result<Vec<RepoName>> {
        let Some(r) = &self.inner.remote else {
            return Ok(self.inner.store.list_repos().await?);
        };
        let mut repos: Vec<RepoName> = if self.catalog_is_complete(r).await? {
            r.list_keys(&layout::remote_catalog_root())
                .await?
                .iter()
                .filter_map(|k| layout::repo_of_catalog_key(k))
                .collect()
        } else {
            self.repos_from_keys(r).await?
        };
        repos.sort();
        repos.dedup();
        Ok(repos)
    }

    pub(crate) async fn repos_from_keys(&self, r: &Remote) -> Result<Vec<RepoName>> {
        Ok(r.list_keys(&layout::remote_repos_root())
            .await?
            .iter()
            .filter_map(|k| layout::repo_of_remote_key(k))
            .collect())
    }

    /// Whether every repository has its catalog entry; asked of object storage only until
    /// the answer is yes (the marker is never removed).
    pub(crate) async fn catalog_is_complete(&self, r: &Remote) -> Result<bool> {
        use std::sync::atomic::Ordering;
        if self.inner.catalog_complete.load(Ordering::Relaxed) {
            return Ok(true);
        }
        let done = r.head(&layout::remote_catalog_complete()).await?.is_some();
        self.inner.catalog_complete.store(done, Ordering::Relaxed);
        Ok(done)
    }

    /// Referrers of `subject` still present in the repository, optionally filtered.
    pub(crate) async fn referrers(
        &self,
        repo: &RepoName,
        subject: &Digest,
        artifact_type: Option<&str>,
    ) -> Result<Vec<ReferrerDescriptor>> {
        let mut out = Vec::new();
        for desc in self.inner.store.list_referrers(repo, subject).await? {
            if artifact_type.is_some_and(|a| desc.artifact_type.as_deref() != Some(a)) {
                continue;
            }
            if self
                .inner
                .store
                .manifest_media_type(repo, &desc.digest)
                .await?
                .is_some()
            {
                out.push(desc);
            }
        }
        Ok(out)
    }
}
