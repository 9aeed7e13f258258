//! The node's background loops (upload purge, catch-up with object storage, the scrubber),
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

impl BackgroundTasks {
    pub(crate) async fn shutdown(self) {
        self.cancel.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }
}

impl NodeService {
    /// Start the upload purger (and, later, the other housekeeping loops).
    pub(crate) fn start_background(&self) -> BackgroundTasks {
        let me = self.clone();
        let cancel = self.inner.cancel.child_token();
        let c = cancel.clone();
        self.inner.tasks.spawn(async move {
            let mut tick = tokio::time::interval(me.inner.cfg.upload_purge_interval);
            loop {
                tokio::select! {
                    _ = c.cancelled() => break,
                    _ = tick.tick() => { me.inner.uploads.purge_idle(me.inner.cfg.upload_max_age).await; }
                }
            }
        });
        let me = self.clone();
        let c = cancel.clone();
        self.inner.tasks.spawn(async move {
            // First pass until it succeeds (the node reports ready only after it), then a
            // periodic pass that closes the window of writes missed while unreachable.
            let mut tick = tokio::time::interval(me.inner.cfg.catch_up_interval);
            loop {
                tokio::select! {
                    _ = c.cancelled() => break,
                    _ = tick.tick() => {
                        if let Err(e) = me.catch_up().await {
                            tracing::warn!(error = %e, "catch-up with object storage failed; will retry");
                        }
                    }
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
