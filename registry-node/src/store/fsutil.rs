//! The two durable-write primitives everything else is built on.

use std::io::{self, Write};
use std::path::Path;

/// fsync a directory so a rename or create inside it survives power loss.
pub(crate) async fn fsync_dir(dir: &Path) -> io::Result<()> {
    let dir = dir.to_owned();
    tokio::task::spawn_blocking(move || std::fs::File::open(&dir)?.sync_all())
        .await
        .map_err(io::Error::other)?
}

/// Write `bytes` to `dest` so that readers see either the old file or the whole new one:
/// temp file in `tmp_dir` (same filesystem), fsync, rename, fsync the parent.
pub(crate) async fn write_atomic(tmp_dir: &Path, dest: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = tmp_dir.join(uuid::Uuid::new_v4().simple().to_string());
    let dest = dest.to_owned();
    let bytes = bytes.to_vec();
    tokio::task::spawn_blocking(move || {
        let parent = dest
            .parent()
            .ok_or_else(|| io::Error::other("destination has no parent"))?;
        std::fs::create_dir_all(parent)?;
        let result = (|| {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &dest)?;
            std::fs::File::open(parent)?.sync_all()
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    })
    .await
    .map_err(io::Error::other)?
}
