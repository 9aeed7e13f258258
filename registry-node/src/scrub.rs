//! The scrubber: every stored blob re-hashed at a modest pace, pass after pass; a mismatch
//! is quarantined and fetched again from object storage, so the node heals without a client
//! ever seeing it.

use std::io;
use std::path::{Path, PathBuf};

use flotilla_core::{layout, Digest};
use tokio_util::sync::CancellationToken;

use crate::read::verify::{file_matches, quarantine, repair};
use crate::NodeService;

/// Every blob file under `blobs/` with the digest its path names.
pub(crate) fn list_blob_files(root: &Path) -> io::Result<Vec<(PathBuf, Digest)>> {
    let mut out = Vec::new();
    for alg in layout::ALGORITHMS {
        let dir = root.join(layout::local_blobs_dir(alg));
        let rd = match std::fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for sub in rd {
            let sub = sub?;
            if !sub.file_type()?.is_dir() {
                continue;
            }
            for f in std::fs::read_dir(sub.path())? {
                let f = f?;
                let name = f.file_name();
                let Some(hex) = name.to_str() else { continue };
                if let Ok(d) = format!("{alg}:{hex}").parse() {
                    out.push((f.path(), d));
                }
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Whether pass `pass` checks `d`'s object-storage copy: a fixed slice of the digest space
/// per pass, so every blob is checked once in `every` passes (`--scrub-remote-check-every`).
fn remote_check_due(d: &Digest, pass: u64, every: u64) -> bool {
    let h = d
        .hex()
        .bytes()
        .take(8)
        .fold(0u64, |acc, b| acc.wrapping_mul(31).wrapping_add(b as u64));
    let every = every.max(1);
    h % every == pass % every
}

/// The scrubber: re-hash every stored blob at `scrub_bytes_per_sec`, one pass after another
/// (pausing `scrub_interval` between passes); a mismatch is quarantined and fetched again
/// from object storage (verified), so the node heals without a client ever seeing it.
pub(crate) async fn scrub_loop(node: NodeService, cancel: CancellationToken) {
    let rate = node.config().scrub_bytes_per_sec;
    let pause = node.config().scrub_interval;
    let mut pass = 0u64;
    loop {
        pass += 1;
        let root = node.store().root().to_owned();
        let files = tokio::task::spawn_blocking(move || list_blob_files(&root)).await;
        let files = match files {
            Ok(Ok(f)) => f,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "scrubber could not list blobs");
                Vec::new()
            }
            Err(e) => {
                tracing::warn!(error = %e, "scrubber listing task failed");
                Vec::new()
            }
        };
        let mut checked = 0u64;
        for (path, d) in files {
            if cancel.is_cancelled() {
                return;
            }
            match file_matches(&node, &path, &d, rate, Some(&cancel)).await {
                Ok(Some(true)) => {
                    // The local copy is good; object storage must hold it too. Checked for
                    // a slice of the blobs per pass (which ones rotates with the pass), so
                    // an idle node's requests to the store stay a small constant per blob
                    // per day instead of one per blob per pass.
                    if remote_check_due(&d, pass, node.config().scrub_remote_every) {
                        if let Err(e) = node.check_remote_blob(&d, true).await {
                            tracing::warn!(digest = %d, error = %e, "scrubber could not check object storage");
                        }
                    }
                }
                Ok(None) => {}
                Ok(Some(false)) => {
                    metrics::counter!("flotilla_node_scrub_corrupt_total").increment(1);
                    tracing::error!(digest = %d, "scrubber found a corrupt blob");
                    if let Err(e) = quarantine(&node, &d).await {
                        tracing::warn!(digest = %d, error = %e, "quarantine failed");
                        continue;
                    }
                    match repair(&node, &d).await {
                        Ok(()) => {
                            metrics::counter!("flotilla_node_scrub_repaired_total").increment(1);
                            tracing::info!(digest = %d, "corrupt blob repaired from object storage");
                        }
                        Err(e) => {
                            tracing::warn!(digest = %d, error = %e, "repair failed; the next read or pass retries")
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "scrubber read failed")
                }
            }
            checked += 1;
            metrics::counter!("flotilla_node_scrub_blobs_total").increment(1);
        }
        metrics::gauge!("flotilla_node_scrub_last_pass_blobs").set(checked as f64);
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(pause) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::remote_check_due;
    use flotilla_core::Digest;

    /// Every blob is checked exactly once in `every` consecutive passes, and about
    /// 1/`every` of the blobs in each pass.
    #[test]
    fn each_blob_is_checked_once_per_cycle_of_passes() {
        let digests: Vec<Digest> = (0..480)
            .map(|i| Digest::of(flotilla_core::Algorithm::Sha256, format!("b{i}").as_bytes()))
            .collect();
        for d in &digests {
            let hits = (1..=24).filter(|p| remote_check_due(d, *p, 24)).count();
            assert_eq!(hits, 1, "{d}");
            assert!((1..=5).all(|p| remote_check_due(d, p, 1)));
        }
        let first = digests
            .iter()
            .filter(|d| remote_check_due(d, 1, 24))
            .count();
        assert!((5..=45).contains(&first), "pass 1 checked {first} of 480");
    }
}
