//! The node's background loops (upload purge and quarantine trim, catch-up with object
//! storage, the scrubber),
//! all tracked and cancelled together: no task outlives `BackgroundTasks::shutdown`.

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::NodeService;

/// Handle on the node's background tasks; `shutdown` cancels and awaits them all.
#[derive(Debug)]
pub(crate) struct BackgroundTasks {
    cancel: CancellationToken,
    tasks: TaskTracker,
}

/// How soon a failed full catch-up (object storage unreachable) is tried again.
const CATCH_UP_RETRY: std::time::Duration = std::time::Duration::from_secs(5);

impl BackgroundTasks {
    pub(crate) async fn shutdown(self) {
        self.cancel.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }
}

impl NodeService {
    /// Keep the quarantine within its retention and size bounds (see `read::verify`).
    async fn trim_quarantine(&self) {
        let dir = self
            .inner
            .store
            .path(&flotilla_core::layout::local_quarantine_dir());
        let (retention, max) = (
            self.inner.cfg.quarantine_retention,
            self.inner.cfg.quarantine_max_bytes,
        );
        let trimmed = tokio::task::spawn_blocking(move || {
            crate::read::verify::trim_quarantine(&dir, retention, max)
        })
        .await;
        match trimmed {
            Ok(Ok(t)) => {
                metrics::gauge!("flotilla_node_quarantine_bytes").set(t.kept_bytes as f64);
                if t.files > 0 {
                    metrics::counter!("flotilla_node_quarantine_deleted_total").increment(t.files);
                    tracing::info!(
                        files = t.files,
                        bytes = t.bytes,
                        "quarantined files past retention or size cap deleted"
                    );
                }
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "could not trim the quarantine"),
            Err(e) => tracing::warn!(error = %e, "quarantine trim task failed"),
        }
    }

    /// Start the housekeeping loops.
    pub(crate) fn start_background(&self) -> BackgroundTasks {
        // One token for every loop: `BackgroundTasks::shutdown` cancels it and awaits them.
        let cancel = self.inner.cancel.child_token();
        let me = self.clone();
        let c = cancel.clone();
        self.inner.tasks.spawn(async move {
            // Cheap (one statvfs), and what decides whether a push is refused with 507.
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = c.cancelled() => break,
                    _ = tick.tick() => me.check_disk().await,
                }
            }
        });
        let me = self.clone();
        let c = cancel.clone();
        self.inner.tasks.spawn(async move {
            let mut tick = tokio::time::interval(me.inner.cfg.upload_purge_interval);
            loop {
                tokio::select! {
                    _ = c.cancelled() => break,
                    _ = tick.tick() => {
                        me.inner.uploads.purge_idle(me.inner.cfg.upload_max_age).await;
                        me.trim_quarantine().await;
                    }
                }
            }
        });
        let me = self.clone();
        let c = cancel.clone();
        self.inner.tasks.spawn(async move {
            // First pass until it succeeds (the node reports ready only after it), then a
            // rare guard: in-sync replicas get every write from the routers and lagging
            // ones catch up exactly the keys they missed (`in_sync`), so a full scan of
            // object storage is no longer how a node learns what it missed.
            loop {
                let wait = match me.catch_up().await {
                    Ok(_) => me.inner.cfg.catch_up_interval,
                    Err(e) => {
                        tracing::warn!(error = %e, "catch-up with object storage failed; will retry");
                        me.inner.cfg.catch_up_interval.min(CATCH_UP_RETRY)
                    }
                };
                tokio::select! {
                    _ = c.cancelled() => break,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        });
        if self.inner.cfg.scrub_bytes_per_sec > 0 {
            let me = self.clone();
            let c = cancel.clone();
            self.inner
                .tasks
                .spawn(async move { crate::scrub::scrub_loop(me, c).await });
        }
        BackgroundTasks {
            cancel,
            tasks: self.inner.tasks.clone(),
        }
    }
}
