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

/// The scrubber: re-hash every stored blob at `scrub_bytes_per_sec`, one pass after another
/// (pausing `scrub_interval` between passes); a mismatch is quarantined and fetched again
/// from object storage (verified), so the node heals without a client ever seeing it.
pub(crate) async fn scrub_loop(node: NodeService, cancel: CancellationToken) {
    let rate = node.config().scrub_bytes_per_sec;
    let pause = node.config().scrub_interval;
    loop {
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
                    // The local copy is good; object storage must hold it too.
                    if let Err(e) = node.check_remote_blob(&d, true).await {
                        tracing::warn!(digest = %d, error = %e, "scrubber could not check object storage");
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
