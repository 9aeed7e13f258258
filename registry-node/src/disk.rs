//! Disk pressure: the node stops taking new data before its disk is full, and says so.
//!
//! A full disk used to fail every later push with a generic 500 while the node still looked
//! ready. Now free space is checked every second against the configured floor
//! (`--min-free-bytes`; by default the smaller of 2 GiB and 5% of the filesystem): below it
//! the node refuses uploads and manifest writes with 507 and an OCI body naming the cause,
//! reports `writable: false` in `/readyz` and in its shard-map record (routers then give it
//! no new keys), and becomes writable again by itself when space returns. Reads keep
//! working. A write that hits ENOSPC anyway flips the state at once, and the failed upload's
//! bytes are deleted at once.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::NodeService;

/// Default floor: the smaller of this and [`DEFAULT_MIN_FREE_FRACTION`] of the disk.
const DEFAULT_MIN_FREE_BYTES: u64 = 2 << 30;
const DEFAULT_MIN_FREE_FRACTION: f64 = 0.05;

/// What the node last measured of its data directory's filesystem.
#[derive(Debug)]
pub(crate) struct DiskState {
    writable: AtomicBool,
    free: AtomicU64,
    floor: AtomicU64,
}

impl Default for DiskState {
    fn default() -> Self {
        DiskState {
            writable: AtomicBool::new(true),
            free: AtomicU64::new(u64::MAX),
            floor: AtomicU64::new(0),
        }
    }
}

/// Whether an I/O error means the disk (or the quota) is full.
pub(crate) fn is_disk_full(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
    )
}

impl crate::service::ServiceError {
    /// Whether this failure is a full disk (ENOSPC or quota) anywhere below.
    pub(crate) fn is_disk_full(&self) -> bool {
        use crate::service::ServiceError as S;
        use crate::store::StoreError;
        use crate::write::uploads::UploadError;
        match self {
            S::NotWritable { .. } => true,
            S::Upload(UploadError::Io(e)) => is_disk_full(e),
            S::Store(StoreError::Io { source, .. }) => is_disk_full(source),
            _ => false,
        }
    }
}

impl NodeService {
    /// Refuse new data while the disk is nearly full.
    pub(crate) fn ensure_writable(&self) -> crate::service::Result<()> {
        if self.writable() {
            return Ok(());
        }
        let (free, floor) = self.disk_figures();
        Err(crate::service::ServiceError::NotWritable { free, floor })
    }

    /// Pass `r` through, noting a full disk on the way (the state flips at once).
    pub(crate) fn note_disk<T>(&self, r: crate::service::Result<T>) -> crate::service::Result<T> {
        if let Err(e) = &r {
            if e.is_disk_full() && self.writable() {
                self.disk_full();
            }
        }
        r
    }

    /// Whether the node takes new data now.
    pub(crate) fn writable(&self) -> bool {
        self.inner.disk.writable.load(Ordering::Relaxed)
    }

    /// Free bytes and the floor, as last measured.
    pub(crate) fn disk_figures(&self) -> (u64, u64) {
        let d = &self.inner.disk;
        (
            d.free.load(Ordering::Relaxed),
            d.floor.load(Ordering::Relaxed),
        )
    }

    /// Measure free space and update the writable state; a change is logged and sent to the
    /// shard map at once.
    pub(crate) async fn check_disk(&self) {
        let dir = self.inner.cfg.data_dir.clone();
        let configured = self.inner.cfg.min_free_bytes;
        let stats = tokio::task::spawn_blocking(move || fs4::statvfs(&dir)).await;
        let (free, total) = match stats {
            Ok(Ok(s)) => (s.available_space(), s.total_space()),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "could not measure free disk space");
                return;
            }
            Err(_) => return,
        };
        let floor = configured.unwrap_or_else(|| {
            DEFAULT_MIN_FREE_BYTES.min((total as f64 * DEFAULT_MIN_FREE_FRACTION) as u64)
        });
        let d = &self.inner.disk;
        d.free.store(free, Ordering::Relaxed);
        d.floor.store(floor, Ordering::Relaxed);
        metrics::gauge!("flotilla_node_disk_free_bytes").set(free as f64);
        self.set_writable(free >= floor, "free space");
    }

    /// A write just failed with ENOSPC: stop taking data until the next check finds room.
    pub(crate) fn disk_full(&self) {
        self.inner.disk.free.store(0, Ordering::Relaxed);
        self.set_writable(false, "a write hit a full disk");
    }

    fn set_writable(&self, writable: bool, why: &str) {
        let was = self.inner.disk.writable.swap(writable, Ordering::Relaxed);
        metrics::gauge!("flotilla_node_writable").set(if writable { 1.0 } else { 0.0 });
        if was != writable {
            let (free, floor) = self.disk_figures();
            if writable {
                tracing::info!(free, floor, "disk has room again; taking new data");
            } else {
                tracing::error!(
                    free,
                    floor,
                    why,
                    "disk nearly full; refusing new data until space returns"
                );
            }
            self.inner.beat.notify_one();
        }
    }
}
