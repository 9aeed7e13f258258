//! Anti-entropy: the node's local tags and links brought in line with object storage, which
//! every acknowledged write reached first; and the one-time backfill of catalog entries for
//! stores written before the catalog existed.

use bytes::Bytes;
use flotilla_core::layout::{self, LinkKind};
use flotilla_core::Digest;

use crate::service::Result;
use crate::NodeService;
use flotilla_objstore::Remote;

impl NodeService {
    /// Anti-entropy: bring local tags and links in line with object storage, which every
    /// acknowledged write reached first. Catches what this node missed while it was down or
    /// unreachable: re-pointed or deleted tags, deleted manifests and blob links. What it
    /// merely lacks needs no work here; reads fetch it through on demand. A repository the
    /// store has lost altogether is not taken for deleted (`catch_up_repo`). Returns how
    /// many local entries changed.
    pub(crate) async fn catch_up(&self) -> Result<usize> {
        let Some(r) = &self.inner.remote else {
            self.inner
                .ready
                .store(true, std::sync::atomic::Ordering::Release);
            return Ok(0);
        };
        self.backfill_catalog(r).await?;
        let mut changed = 0;
        for repo in self.inner.store.list_repos().await? {
            changed += self.catch_up_repo(r, &repo).await?;
        }
        self.inner
            .ready
            .store(true, std::sync::atomic::Ordering::Release);
        if changed > 0 {
            tracing::info!(changed, "caught up with object storage");
        }
        metrics::counter!("flotilla_node_catch_up_changes_total").increment(changed as u64);
        Ok(changed)
    }

    /// Catch up every local repository of shard key `key` (the repository is the key, or
    /// lies under it): what a replica marked lagging for the key runs before it takes
    /// itself off the lagging list. `None` without object storage, the only truth to catch
    /// up from.
    pub(crate) async fn catch_up_key(
        &self,
        key: &flotilla_core::ShardKey,
    ) -> Result<Option<usize>> {
        let Some(r) = &self.inner.remote else {
            return Ok(None);
        };
        let prefix = format!("{key}/");
        let mut changed = 0;
        for repo in self.inner.store.list_repos().await? {
            if repo.as_str() == key.as_str() || repo.as_str().starts_with(&prefix) {
                changed += self.catch_up_repo(r, &repo).await?;
            }
        }
        metrics::counter!("flotilla_node_catch_up_changes_total").increment(changed as u64);
        Ok(Some(changed))
    }

    /// One repository's tags and links brought in line with object storage; returns how
    /// many local entries changed.
    async fn catch_up_repo(&self, r: &Remote, repo: &flotilla_core::RepoName) -> Result<usize> {
        let store = &self.inner.store;
        let repo = repo.clone();
        let mut changed = 0;
        // An absence is a deletion only where object storage still knows the repository.
        // Its catalog entry is written before the repository's first object and removed by
        // no delete, so without it the store lost the repository (emptied, recreated, a bad
        // restore) and deleted nothing: only re-pointed tags are taken from it then, and
        // what this node holds is kept, for reads and for pushes to restore from.
        let known = r
            .head(&layout::remote_catalog_entry(&repo))
            .await?
            .is_some();
        let mut kept = 0;
        // Per tag, under its lock, against what object storage holds now: a write on this
        // node cannot slip between the look and the change (see `TagLocks`).
        for tag in store.list_tags(&repo).await.unwrap_or_default() {
            let _guard = self.inner.tag_locks.lock(&repo, &tag).await;
            let local = store.get_tag(&repo, &tag).await?;
            let remote = r
                .get_bytes(&layout::remote_tag(&repo, &tag), 1024)
                .await?
                .and_then(|b| String::from_utf8_lossy(&b).trim().parse::<Digest>().ok());
            match remote {
                Some(d) if Some(&d) != local.as_ref() => {
                    store.put_tag(&repo, &tag, &d).await?;
                    changed += 1;
                }
                None if known => {
                    store.delete_tag(&repo, &tag).await?;
                    changed += 1;
                }
                None => kept += 1,
                _ => {}
            }
        }
        if !known {
            if kept > 0 {
                tracing::warn!(%repo, tags = kept, "object storage has lost this repository (no catalog entry); keeping the local tags and links instead of deleting them");
                metrics::counter!("flotilla_node_catch_up_kept_total").increment(kept as u64);
            }
            return Ok(changed);
        }
        for kind in [LinkKind::Manifest, LinkKind::Blob] {
            let mut remote_links = std::collections::HashSet::new();
            for alg in layout::ALGORITHMS {
                for n in r
                    .list_names(&layout::remote_links_dir(&repo, kind, alg))
                    .await?
                {
                    remote_links.insert(format!("{alg}:{n}"));
                }
            }
            for d in store.list_links(&repo, kind).await? {
                if !remote_links.contains(&d.to_string()) {
                    match kind {
                        LinkKind::Manifest => store.unlink_manifest(&repo, &d).await?,
                        LinkKind::Blob => store.unlink_layer(&repo, &d).await?,
                    };
                    changed += 1;
                }
            }
        }
        Ok(changed)
    }

    /// Give every repository in object storage its catalog entry, once per store: data
    /// written before the catalog existed has none. Idempotent, so nodes starting together
    /// may all run it.
    pub(crate) async fn backfill_catalog(&self, r: &Remote) -> Result<()> {
        if self.catalog_is_complete(r).await? {
            return Ok(());
        }
        let mut repos = self.repos_from_keys(r).await?;
        repos.sort();
        repos.dedup();
        for repo in &repos {
            self.catalog(r, repo).await?;
        }
        r.put_bytes(&layout::remote_catalog_complete(), Bytes::new())
            .await?;
        self.inner
            .catalog_complete
            .store(true, std::sync::atomic::Ordering::Relaxed);
        tracing::info!(repos = repos.len(), "catalog entries backfilled");
        Ok(())
    }
}
