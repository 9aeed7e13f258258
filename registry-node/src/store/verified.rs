//! Which stored blobs have been hashed against their digest since their bytes last changed.
//!
//! Re-hashing every byte of every read caps a pull at sha256 speed (one core, ~1.7 GiB/s
//! here), below what a disk and a loopback socket sustain. The kernel already tells us when a
//! file's bytes may have changed: a write, truncate or replacement moves its ctime (which no
//! userspace call can set back) or its inode. So a read serves without re-hashing only a file
//! whose `(dev, inode, size, mtime, ctime)` is exactly the one it had when it last verified;
//! anything else is verified again (or refused). Silent media corruption that changes no
//! metadata is what the scrubber's periodic re-hash is for.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::sync::Mutex;

use flotilla_core::Digest;

/// The metadata that changes whenever a file's content may have.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct FileStamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl FileStamp {
    pub(crate) fn of(m: &std::fs::Metadata) -> Self {
        FileStamp {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        }
    }
}

/// Bounded: beyond `cap` entries an arbitrary one is forgotten, which only costs that blob
/// one more verification on its next read.
#[derive(Debug)]
pub(super) struct VerifiedMemo {
    cap: usize,
    map: Mutex<HashMap<Digest, FileStamp>>,
}

impl VerifiedMemo {
    pub(super) fn new(cap: usize) -> Self {
        VerifiedMemo {
            cap: cap.max(1),
            map: Mutex::new(HashMap::new()),
        }
    }

    /// Record that the file whose metadata was `stamp` *before* it was hashed matched `d`.
    pub(super) fn mark(&self, d: &Digest, stamp: FileStamp) {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= self.cap && !map.contains_key(d) {
            if let Some(victim) = map.keys().next().cloned() {
                map.remove(&victim);
            }
        }
        map.insert(d.clone(), stamp);
    }

    pub(super) fn is_verified(&self, d: &Digest, stamp: FileStamp) -> bool {
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        map.get(d) == Some(&stamp)
    }

    pub(super) fn forget(&self, d: &Digest) {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        map.remove(d);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn digest(n: u8) -> Digest {
        Digest::of(flotilla_core::Algorithm::Sha256, &[n])
    }

    #[test]
    fn any_write_invalidates_even_with_mtime_restored() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("b");
        std::fs::write(&p, b"hello").unwrap();
        let memo = VerifiedMemo::new(4);
        let before = FileStamp::of(&std::fs::metadata(&p).unwrap());
        memo.mark(&digest(1), before);
        assert!(memo.is_verified(&digest(1), before));
        // Same length, bytes changed in place, mtime put back: ctime still moves.
        std::thread::sleep(std::time::Duration::from_millis(20));
        let mut f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        f.write_all(b"jello").unwrap();
        let mtime = std::fs::metadata(&p).unwrap().modified().unwrap();
        f.set_modified(mtime).unwrap();
        drop(f);
        let after = FileStamp::of(&std::fs::metadata(&p).unwrap());
        assert!(!memo.is_verified(&digest(1), after));
        // Another digest never borrows a stamp.
        assert!(!memo.is_verified(&digest(2), before));
    }

    #[test]
    fn bounded() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("b");
        std::fs::write(&p, b"x").unwrap();
        let s = FileStamp::of(&std::fs::metadata(&p).unwrap());
        let memo = VerifiedMemo::new(3);
        for n in 0..10 {
            memo.mark(&digest(n), s);
        }
        let held = (0..10).filter(|n| memo.is_verified(&digest(*n), s)).count();
        assert_eq!(held, 3);
        assert!(memo.is_verified(&digest(9), s), "the newest entry is kept");
        memo.forget(&digest(9));
        assert!(!memo.is_verified(&digest(9), s));
    }
}
