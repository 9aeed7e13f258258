//! The drop step of a move, on the donor: repositories of shards this node no longer holds
//! (moved away by a rebalance, a drain or a replacement) are removed from its disk once they
//! have been orphaned for a grace period, and blobs that no remaining repository links are
//! deleted with them.
//!
//! Why on the node, after a grace period, rather than a seeder command at swap time: routers
//! keep sending reads to the old replica until they see the swapped record, so the bytes
//! must outlive every router's snapshot; the node can tell from the shard map alone what it
//! still holds, so a crashed seeder or a missed command leaves nothing behind. Object storage
//! stays the truth: a wrong drop costs a re-fetch (reads fall through to it), never data.
//! Keys the shard map does not know are never touched, and blobs younger than the grace
//! period are kept (a push links its blobs moments after committing them).

use std::collections::{HashMap, HashSet};
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use flotilla_core::{layout, Digest, RepoName};
use shardmap::ShardMap;
use tokio_util::sync::CancellationToken;

use crate::NodeService;

/// What one pass removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Dropped {
    pub repos: u64,
    pub blobs: u64,
    pub bytes: u64,
}

/// The sweeper's memory between passes: since when each repository has been orphaned.
#[derive(Debug, Default)]
pub(crate) struct Sweeper {
    orphaned_since: HashMap<RepoName, Instant>,
}

/// Every repository on disk (any of its link directories present) and every digest some
/// repository links, as a layer or a manifest revision.
fn scan_repos(root: &Path) -> io::Result<(HashSet<RepoName>, HashSet<Digest>)> {
    fn digests_under(dir: &Path, out: &mut HashSet<Digest>) -> io::Result<()> {
        for alg in layout::ALGORITHMS {
            let rd = match std::fs::read_dir(dir.join(alg.as_str())) {
                Ok(rd) => rd,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            for f in rd {
                let name = f?.file_name();
                if let Some(d) = name
                    .to_str()
                    .and_then(|h| format!("{alg}:{h}").parse().ok())
                {
                    out.insert(d);
                }
            }
        }
        Ok(())
    }
    let (mut repos, mut refs) = (HashSet::new(), HashSet::new());
    crate::store::visit_repo_dirs(root, &mut |repo, dir, name| {
        repos.insert(repo);
        match name {
            layout::LOCAL_LAYERS => digests_under(dir, &mut refs),
            layout::LOCAL_REPO_MARKER => {
                digests_under(&dir.join(layout::LOCAL_REVISIONS), &mut refs)
            }
            _ => Ok(()),
        }
    })?;
    Ok((repos, refs))
}

/// The shard key `repo` belongs to, among the keys the map knows: the longest one that is
/// a whole-component prefix of the name (a cluster uses one key depth, so at most one fits
/// unless keys of several depths were pinned by hand, when the most specific wins).
fn key_of<'a>(repo: &RepoName, keys: &'a HashSet<String>) -> Option<&'a str> {
    let name = repo.as_str();
    let mut ends: Vec<usize> = name.match_indices('/').map(|(i, _)| i).collect();
    ends.push(name.len());
    ends.iter()
        .rev()
        .find_map(|&end| keys.get(&name[..end]).map(String::as_str))
}

/// Move a repository's link directories out of `repos/` (each one rename, so a reader sees
/// the repository whole or not at all), then delete them; nested repositories stay.
fn drop_repo(root: &Path, repo: &RepoName) -> io::Result<()> {
    let dir = root.join(layout::local_repo(repo));
    let tmp = root.join(layout::local_tmp_dir());
    std::fs::create_dir_all(&tmp)?;
    // `_manifests` first: it is what makes a repository visible.
    for sub in layout::LOCAL_REPO_DIRS {
        let from = dir.join(sub);
        let to: PathBuf = tmp.join(format!("drop-{}", uuid::Uuid::new_v4().simple()));
        match std::fs::rename(&from, &to) {
            Ok(()) => std::fs::remove_dir_all(&to)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    // Remove now-empty directories up to `repos/` (a parent holding another repo stays).
    let stop = root.join(layout::local_repos_root());
    let mut d = dir.as_path();
    while d != stop && std::fs::remove_dir(d).is_ok() {
        match d.parent() {
            Some(p) => d = p,
            None => break,
        }
    }
    Ok(())
}

impl Sweeper {
    /// One pass: drop repositories orphaned for at least `grace`, then delete blobs older
    /// than `grace` that nothing links. `held` are the keys listing this node (replica or
    /// joining), `known` every key in the map.
    pub(crate) fn pass(
        &mut self,
        root: &Path,
        held: &HashSet<String>,
        known: &HashSet<String>,
        grace: Duration,
        now: Instant,
    ) -> io::Result<Dropped> {
        let mut out = Dropped::default();
        let (repos, _) = scan_repos(root)?;
        let mut orphans = HashSet::new();
        for repo in repos {
            let Some(key) = key_of(&repo, known) else {
                continue; // unknown to the map: not ours to judge
            };
            if held.contains(key) {
                continue;
            }
            let since = *self.orphaned_since.entry(repo.clone()).or_insert(now);
            if now.duration_since(since) < grace {
                orphans.insert(repo);
                continue;
            }
            drop_repo(root, &repo)?;
            tracing::info!(%repo, %key, "dropped a repository of a shard this node no longer holds");
            out.repos += 1;
        }
        self.orphaned_since.retain(|r, _| orphans.contains(r));
        if out.repos == 0 {
            return Ok(out);
        }
        // Rescan after dropping: the links that remain are the references.
        let (_, refs) = scan_repos(root)?;
        let cutoff = SystemTime::now()
            .checked_sub(grace)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        for (path, d) in crate::scrub::list_blob_files(root)? {
            if refs.contains(&d) {
                continue;
            }
            let meta = match std::fs::metadata(&path) {
                Ok(m) => m,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            if meta.modified()? > cutoff {
                continue; // possibly a push or fetch about to link it
            }
            match std::fs::remove_file(&path) {
                Ok(()) => {
                    out.blobs += 1;
                    out.bytes += meta.len();
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }
}

/// Sweep every `interval` until cancelled (only while the node is ready: a node being seeded
/// is still filling its disk).
pub(crate) async fn gc_loop(node: NodeService, map: ShardMap, cancel: CancellationToken) {
    let (interval, grace) = (node.config().gc_interval, node.config().gc_grace);
    let id = node.config().id.clone();
    let mut sweeper = Sweeper::default();
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
        if !node.is_ready() {
            continue;
        }
        let (shards, unreadable) = match map.list_shards_checked().await {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(error = %e, "shard map unavailable; sweep skipped");
                continue;
            }
        };
        let known: HashSet<String> = shards.iter().map(|(s, _)| s.key.to_string()).collect();
        let mut known = known;
        let mut held: HashSet<String> = shards
            .iter()
            .filter(|(s, _)| s.replicas.contains(&id) || s.joining.contains(&id))
            .map(|(s, _)| s.key.to_string())
            .collect();
        // A key whose record this build cannot read may well be ours: never swept.
        for u in &unreadable {
            if let Some(k) = map.keys().shard_key_of(&u.key) {
                known.insert(k.to_string());
                held.insert(k.to_string());
            }
        }
        let root = node.store().root().to_owned();
        let mut moved = std::mem::take(&mut sweeper);
        let result = tokio::task::spawn_blocking(move || {
            let r = moved.pass(&root, &held, &known, grace, Instant::now());
            (moved, r)
        })
        .await;
        match result {
            Ok((s, Ok(d))) => {
                sweeper = s;
                if d != Dropped::default() {
                    tracing::info!(
                        repos = d.repos,
                        blobs = d.blobs,
                        bytes = d.bytes,
                        "dropped data of shards moved away"
                    );
                    metrics::counter!("flotilla_node_gc_repos_dropped_total").increment(d.repos);
                    metrics::counter!("flotilla_node_gc_blobs_deleted_total").increment(d.blobs);
                    metrics::counter!("flotilla_node_gc_bytes_deleted_total").increment(d.bytes);
                }
            }
            Ok((s, Err(e))) => {
                sweeper = s;
                tracing::warn!(error = %e, "sweep failed; retried next interval");
            }
            Err(e) => tracing::warn!(error = %e, "sweep task failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(root: &Path, rel: &layout::LocalKey, bytes: &[u8]) {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, bytes).unwrap();
    }

    fn blob(root: &Path, bytes: &[u8]) -> Digest {
        let d = Digest::of(flotilla_core::Algorithm::Sha256, bytes);
        write(root, &layout::local_blob(&d), bytes);
        d
    }

    fn link(root: &Path, repo: &str, d: &Digest, manifest: bool) {
        let r: RepoName = repo.parse().unwrap();
        let rel = if manifest {
            layout::local_manifest_link(&r, d)
        } else {
            layout::local_layer_link(&r, d)
        };
        write(root, &rel, d.to_string().as_bytes());
    }

    fn set(keys: &[&str]) -> HashSet<String> {
        keys.iter().map(|k| k.to_string()).collect()
    }

    #[test]
    fn drops_orphans_after_grace_and_only_unshared_blobs() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let shared = blob(root, b"shared layer");
        let moved_only = blob(root, b"moved layer");
        let manifest = blob(root, b"moved manifest");
        let kept_only = blob(root, b"kept layer");
        let unknown_only = blob(root, b"unknown layer");
        link(root, "moved/prod", &shared, false);
        link(root, "moved/prod", &moved_only, false);
        link(root, "moved/prod", &manifest, true);
        // A nested repository of the moved key, and one of a held key nested under it.
        link(root, "moved/prod/worker", &moved_only, false);
        link(root, "kept/prod", &shared, false);
        link(root, "kept/prod", &kept_only, false);
        link(root, "stray/x", &unknown_only, false);
        let known = set(&["moved/prod", "kept/prod"]);
        let held = set(&["kept/prod"]);
        let grace = Duration::from_secs(60);
        let t0 = Instant::now();
        let mut s = Sweeper::default();
        // First sight of the orphans: nothing is dropped inside the grace period.
        assert_eq!(
            s.pass(root, &held, &known, grace, t0).unwrap(),
            Dropped::default()
        );
        assert!(root.join("repos/moved/prod/_manifests").exists());
        // After the grace period both repositories of the moved key go; blobs are all young
        // (just written), so they stay for now.
        let later = t0 + grace;
        let d = s.pass(root, &held, &known, grace, later).unwrap();
        assert_eq!((d.repos, d.blobs), (2, 0));
        assert!(!root.join("repos/moved").exists(), "empty parents removed");
        assert!(root.join("repos/kept/prod/_layers").exists());
        assert!(
            root.join("repos/stray/x/_layers").exists(),
            "unknown keys are left alone"
        );
        // With a zero grace the unlinked blobs go, shared and unknown-key blobs stay.
        link(root, "moved/prod", &moved_only, false);
        let d = s.pass(root, &held, &known, Duration::ZERO, later).unwrap();
        assert_eq!(d.repos, 1);
        assert_eq!(d.blobs, 2, "the moved layer and the moved manifest");
        for (d, present) in [
            (&shared, true),
            (&kept_only, true),
            (&unknown_only, true),
            (&moved_only, false),
            (&manifest, false),
        ] {
            assert_eq!(root.join(layout::local_blob(d)).exists(), present, "{d}");
        }
    }

    #[test]
    fn an_orphan_that_is_held_again_restarts_its_grace() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let b = blob(root, b"layer");
        link(root, "svc/prod", &b, false);
        let known = set(&["svc/prod"]);
        let grace = Duration::from_secs(60);
        let t0 = Instant::now();
        let mut s = Sweeper::default();
        s.pass(root, &set(&[]), &known, grace, t0).unwrap();
        // Held again (a move back): the orphan clock is forgotten.
        s.pass(root, &known, &known, grace, t0 + grace / 2).unwrap();
        let d = s.pass(root, &set(&[]), &known, grace, t0 + grace).unwrap();
        assert_eq!(d.repos, 0, "grace restarts from the second orphaning");
        assert!(root.join("repos/svc/prod/_layers").exists());
    }

    #[test]
    fn key_of_takes_the_longest_known_prefix() {
        let keys = set(&["a", "a/b"]);
        let r = |s: &str| s.parse::<RepoName>().unwrap();
        assert_eq!(key_of(&r("a/b/c"), &keys), Some("a/b"));
        assert_eq!(
            key_of(&r("a/bc"), &keys),
            Some("a"),
            "whole components only"
        );
        assert_eq!(key_of(&r("a"), &keys), Some("a"));
        assert_eq!(key_of(&r("z/y"), &keys), None);
    }
}
