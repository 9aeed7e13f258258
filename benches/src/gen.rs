//! Deterministic blob contents that never exist in memory as a whole.
//!
//! A benchmark client that allocates a 256 MiB `Vec` per in-flight upload measures its own
//! allocator and page faults, not the registry. Every blob here is the same 1 MiB pseudo-random
//! pattern repeated, except a short tail (64..128 bytes) that carries the run nonce and the blob
//! id, so digests differ between blobs and between runs. The body is streamed as zero-copy
//! [`Bytes`] slices of the shared pattern.
//!
//! Putting the unique bytes at the *end* (not the start) lets the digest reuse work: SHA-256
//! processes 64-byte blocks left to right, so the hasher state after the common, block-aligned
//! part is the same for every blob of one size. That state is computed once per size by a first
//! pass over the very same chunk generator and then cloned; each blob's digest costs only its
//! tail. Without this, client-side hashing (about 1.5 GiB/s per core here) would compete with
//! the server for the machine's two cores.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use sha2::{Digest as _, Sha256};

/// Length of the repeating pattern. Large enough that compression or dedup at the page level
/// cannot make the body trivially cheap, small enough to stay in L2/L3.
pub const PATTERN_LEN: usize = 1 << 20;

/// Shortest unique tail; the real tail is 64..128 bytes so the common part is block-aligned.
const MIN_TAIL: u64 = 64;

/// The shared generator: the pattern plus a cache of per-size hasher midstates.
#[derive(Clone)]
pub struct BlobGen {
    pattern: Bytes,
    nonce: u64,
    midstates: Arc<Mutex<HashMap<u64, Sha256>>>,
}

impl std::fmt::Debug for BlobGen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlobGen")
            .field("pattern_len", &self.pattern.len())
            .field("nonce", &self.nonce)
            .finish_non_exhaustive()
    }
}

/// One blob: which bytes it holds is a pure function of `(generator nonce, id, size)`.
#[derive(Clone, Debug)]
pub struct Blob {
    pub size: u64,
    pub id: u64,
    /// The last bytes of the blob, unique per (nonce, id).
    tail: Bytes,
    /// `size - tail.len()`, a multiple of 64.
    common_len: u64,
}

impl Blob {
    /// Total length in bytes.
    pub fn len(&self) -> u64 {
        self.size
    }

    /// True for a zero-length blob.
    pub fn is_empty(&self) -> bool {
        self.size == 0
    }
}

/// SplitMix64: tiny, deterministic, good enough to make the pattern incompressible.
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl BlobGen {
    /// `nonce` makes this run's blobs distinct from any earlier run's, so a registry never
    /// answers "already exists" for a blob pushed by a previous benchmark.
    pub fn new(nonce: u64) -> Self {
        let mut state = 0x466c_6f74_696c_6c61; // "Flotilla": the pattern itself is fixed.
        let mut buf = Vec::with_capacity(PATTERN_LEN);
        while buf.len() < PATTERN_LEN {
            buf.extend_from_slice(&splitmix64(&mut state).to_le_bytes());
        }
        BlobGen {
            pattern: Bytes::from(buf),
            nonce,
            midstates: Arc::default(),
        }
    }

    /// The shared pattern (also used by the machine-limit measurements).
    pub fn pattern(&self) -> &Bytes {
        &self.pattern
    }

    /// Describe blob `id` of `size` bytes.
    pub fn blob(&self, id: u64, size: u64) -> Blob {
        let tail_len = if size < 2 * MIN_TAIL {
            size
        } else {
            // Round the common part down to a whole number of SHA-256 blocks.
            size - ((size - MIN_TAIL) & !63)
        };
        let common_len = size - tail_len;
        let mut tail: Vec<u8> = (common_len..size)
            .map(|o| self.pattern[(o % PATTERN_LEN as u64) as usize])
            .collect();
        let stamp = format!("fbench:{:016x}:{:016x}:", self.nonce, id);
        let n = stamp.len().min(tail.len());
        tail[..n].copy_from_slice(&stamp.as_bytes()[..n]);
        Blob {
            size,
            id,
            tail: Bytes::from(tail),
            common_len,
        }
    }

    /// The bytes of `blob` in `range`, as zero-copy slices of at most [`PATTERN_LEN`] bytes.
    pub fn chunks(&self, blob: &Blob, range: Range<u64>) -> impl Iterator<Item = Bytes> + Send {
        let pattern = self.pattern.clone();
        let tail = blob.tail.clone();
        let common_len = blob.common_len;
        let end = range.end.min(blob.size);
        let mut at = range.start.min(end);
        std::iter::from_fn(move || {
            if at >= end {
                return None;
            }
            let piece = if at < common_len {
                let off = (at % PATTERN_LEN as u64) as usize;
                let n = ((PATTERN_LEN - off) as u64)
                    .min(common_len - at)
                    .min(end - at) as usize;
                pattern.slice(off..off + n)
            } else {
                let s = (at - common_len) as usize;
                let e = (end - common_len) as usize;
                tail.slice(s..e)
            };
            at += piece.len() as u64;
            Some(piece)
        })
    }

    /// A request body stream over `range` of `blob`.
    pub fn body(&self, blob: &Blob, range: Range<u64>) -> reqwest::Body {
        let it = self.chunks(blob, range).map(Ok::<Bytes, std::io::Error>);
        reqwest::Body::wrap_stream(futures::stream::iter(it))
    }

    /// `sha256:<hex>` of `blob`. The first call per size walks the common part once through
    /// [`BlobGen::chunks`]; later calls clone the cached midstate (see the module docs).
    /// Blocking: call from `spawn_blocking` for large sizes.
    pub fn digest(&self, blob: &Blob) -> String {
        let cached = self
            .midstates
            .lock()
            .expect("midstate cache poisoned")
            .get(&blob.common_len)
            .cloned();
        let mut h = match cached {
            Some(h) => h,
            None => {
                let mut h = Sha256::new();
                for c in self.chunks(blob, 0..blob.common_len) {
                    h.update(&c);
                }
                self.midstates
                    .lock()
                    .expect("midstate cache poisoned")
                    .insert(blob.common_len, h.clone());
                h
            }
        };
        h.update(&blob.tail);
        format!("sha256:{}", hex::encode(h.finalize()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn materialise(g: &BlobGen, b: &Blob) -> Vec<u8> {
        g.chunks(b, 0..b.size).flat_map(|c| c.to_vec()).collect()
    }

    #[test]
    fn digest_matches_a_full_pass_for_awkward_sizes() {
        let g = BlobGen::new(7);
        for size in [
            0,
            1,
            63,
            64,
            127,
            128,
            129,
            1000,
            PATTERN_LEN as u64 + 77,
            3 << 20,
        ] {
            let b = g.blob(3, size);
            let bytes = materialise(&g, &b);
            assert_eq!(bytes.len() as u64, size);
            let want = format!("sha256:{}", hex::encode(Sha256::digest(&bytes)));
            assert_eq!(g.digest(&b), want, "size {size}");
            // Second call uses the cached midstate.
            assert_eq!(g.digest(&b), want, "size {size} (cached)");
        }
    }

    #[test]
    fn blobs_differ_by_id_and_nonce() {
        let g = BlobGen::new(1);
        let h = BlobGen::new(2);
        let size = 5 << 20;
        let a = g.digest(&g.blob(1, size));
        assert_ne!(a, g.digest(&g.blob(2, size)));
        assert_ne!(a, h.digest(&h.blob(1, size)));
    }

    #[test]
    fn ranges_concatenate_to_the_whole() {
        let g = BlobGen::new(9);
        let b = g.blob(1, 2 * PATTERN_LEN as u64 + 500);
        let whole = materialise(&g, &b);
        let mut parts = Vec::new();
        let step = 777_777;
        let mut at = 0;
        while at < b.size {
            let end = (at + step).min(b.size);
            parts.extend(g.chunks(&b, at..end).flat_map(|c| c.to_vec()));
            at = end;
        }
        assert_eq!(parts, whole);
    }
}
