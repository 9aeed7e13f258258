//! The router's manifest cache: manifest GETs and HEADs answered from memory, without a hop
//! to a node, while staying exactly as fresh as the shard map.
//!
//! Why it is safe: every entry is labelled with the `epoch` of its shard record read
//! *before* the upstream request, and every manifest or tag write through any router bumps
//! that epoch (compare-and-swap) before the client gets its acknowledgement. An entry is
//! served only while the router's record still has the label's epoch, and the router's view
//! of a record never moves back to an older epoch. So the router that took a write serves
//! the new content at once, and any other router does so as soon as the metadata-store watch
//! delivers the bump. Two fallbacks bound staleness when that chain breaks (a bump that
//! could not be written, a router cut off from the store, a write made directly to a node):
//! entries expire after a TTL, and a failed bump clears this router's cache.
//!
//! Only 200 answers to GET are stored, and only when the body hashes to the digest the node
//! reported (and requested), so the cache can never hold bytes a node would not serve.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use flotilla_core::{Digest, Reference, RepoName};
use http::{HeaderMap, StatusCode};

/// One cached answer: the node's headers and body as they were served.
#[derive(Debug)]
pub struct Entry {
    pub epoch: u64,
    pub headers: HeaderMap,
    pub body: Bytes,
    filled: Instant,
}

#[derive(Clone)]
struct ByBytes;

impl quick_cache::Weighter<String, Arc<Entry>> for ByBytes {
    fn weight(&self, key: &String, val: &Arc<Entry>) -> u64 {
        // Headers are small; count them at a flat rate so tiny manifests still weigh.
        (key.len() + val.body.len() + 512) as u64
    }
}

/// Bounded by bytes; CLOCK-Pro eviction (quick_cache) keeps the hot manifests.
pub struct ManifestCache {
    entries: Option<quick_cache::sync::Cache<String, Arc<Entry>, ByBytes>>,
    ttl: Duration,
}

impl std::fmt::Debug for ManifestCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ManifestCache")
            .field("enabled", &self.entries.is_some())
            .field("ttl", &self.ttl)
            .finish()
    }
}

/// What a cached answer is for. Everything here changes only through a manifest or tag
/// write in the repository's shard, so the shard epoch invalidates all of it.
#[derive(Debug)]
pub enum Cacheable<'a> {
    /// A manifest by tag or digest: stored only if its body hashes to its digest.
    Manifest(&'a RepoName, &'a Reference),
    /// A tag or referrers listing, by its full path and query (pagination included).
    Listing(&'a str),
}

impl Cacheable<'_> {
    fn key(&self) -> String {
        match self {
            Cacheable::Manifest(repo, reference) => format!("m:{repo}:{reference}"),
            Cacheable::Listing(path_and_query) => format!("l:{path_and_query}"),
        }
    }
}

impl ManifestCache {
    /// `capacity_bytes == 0` or a zero `ttl` disables caching.
    pub fn new(capacity_bytes: u64, ttl: Duration) -> Self {
        let entries = (capacity_bytes > 0 && !ttl.is_zero()).then(|| {
            // quick_cache sizes its tables from an item estimate; manifests are ~1–4 KiB.
            let items = (capacity_bytes / 2048).clamp(16, 1 << 20) as usize;
            quick_cache::sync::Cache::with_weighter(items, capacity_bytes, ByBytes)
        });
        ManifestCache { entries, ttl }
    }

    pub fn enabled(&self) -> bool {
        self.entries.is_some()
    }

    /// The entry for `what` if it was filled under `epoch` and is within its TTL.
    pub fn get(&self, what: &Cacheable<'_>, epoch: u64) -> Option<Arc<Entry>> {
        let entries = self.entries.as_ref()?;
        let k = what.key();
        let e = entries.get(&k)?;
        if e.epoch == epoch && e.filled.elapsed() < self.ttl {
            return Some(e);
        }
        entries.remove(&k);
        None
    }

    /// Store a node's 200 answer to a GET; a manifest only if its body is the manifest it
    /// claims (and was asked) to be. Returns whether it was stored.
    pub fn fill(
        &self,
        what: &Cacheable<'_>,
        epoch: u64,
        status: StatusCode,
        headers: &HeaderMap,
        body: &Bytes,
    ) -> bool {
        let Some(entries) = &self.entries else {
            return false;
        };
        if status != StatusCode::OK {
            return false;
        }
        if let Cacheable::Manifest(repo, reference) = what {
            let Some(claimed) = headers
                .get("docker-content-digest")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<Digest>().ok())
            else {
                return false;
            };
            if let Reference::Digest(asked) = reference {
                if *asked != claimed {
                    return false;
                }
            }
            if Digest::of(claimed.algorithm(), body) != claimed {
                tracing::warn!(%repo, %reference, "a node served a manifest that does not match its digest; not cached");
                return false;
            }
        }
        let mut headers = headers.clone();
        headers.remove(http::header::DATE);
        entries.insert(
            what.key(),
            Arc::new(Entry {
                epoch,
                headers,
                body: body.clone(),
                filled: Instant::now(),
            }),
        );
        true
    }

    /// Forget everything (a write whose epoch bump could not be recorded).
    pub fn clear(&self) {
        if let Some(e) = &self.entries {
            e.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(n: u8) -> (Bytes, HeaderMap, Digest) {
        let body = Bytes::from(format!("{{\"schemaVersion\":2,\"n\":{n}}}"));
        let d = Digest::of(flotilla_core::Algorithm::Sha256, &body);
        let mut h = HeaderMap::new();
        h.insert("docker-content-digest", d.to_string().parse().unwrap());
        h.insert(
            http::header::DATE,
            "Thu, 01 Jan 2026 00:00:00 GMT".parse().unwrap(),
        );
        (body, h, d)
    }

    #[test]
    fn served_only_under_its_epoch_and_ttl() {
        let c = ManifestCache::new(1 << 20, Duration::from_millis(200));
        let repo: RepoName = "a/b/c".parse().unwrap();
        let tag: Reference = "t".parse().unwrap();
        let (body, h, _) = manifest(1);
        assert!(c.fill(
            &Cacheable::Manifest(&repo, &tag),
            7,
            StatusCode::OK,
            &h,
            &body
        ));
        let e = c
            .get(&Cacheable::Manifest(&repo, &tag), 7)
            .expect("hit under the same epoch");
        assert_eq!(e.body, body);
        assert!(
            e.headers.get(http::header::DATE).is_none(),
            "per-response headers are dropped"
        );
        assert!(
            c.get(&Cacheable::Manifest(&repo, &tag), 8).is_none(),
            "a newer epoch invalidates"
        );
        assert!(
            c.get(&Cacheable::Manifest(&repo, &tag), 7).is_none(),
            "and the stale entry is gone"
        );
        assert!(c.fill(
            &Cacheable::Manifest(&repo, &tag),
            8,
            StatusCode::OK,
            &h,
            &body
        ));
        std::thread::sleep(Duration::from_millis(250));
        assert!(
            c.get(&Cacheable::Manifest(&repo, &tag), 8).is_none(),
            "expired by TTL"
        );
    }

    #[test]
    fn refuses_what_a_node_should_not_have_served() {
        let c = ManifestCache::new(1 << 20, Duration::from_secs(60));
        let repo: RepoName = "a/b".parse().unwrap();
        let (body, h, d) = manifest(1);
        let (other_body, _, other) = manifest(2);
        let tag: Reference = "t".parse().unwrap();
        assert!(
            !c.fill(
                &Cacheable::Manifest(&repo, &tag),
                1,
                StatusCode::OK,
                &h,
                &other_body
            ),
            "body/digest mismatch"
        );
        let by_other: Reference = other.to_string().parse().unwrap();
        assert!(
            !c.fill(
                &Cacheable::Manifest(&repo, &by_other),
                1,
                StatusCode::OK,
                &h,
                &body
            ),
            "not the digest asked for"
        );
        assert!(!c.fill(
            &Cacheable::Manifest(&repo, &tag),
            1,
            StatusCode::NOT_FOUND,
            &h,
            &body
        ));
        assert!(
            !c.fill(
                &Cacheable::Manifest(&repo, &tag),
                1,
                StatusCode::OK,
                &HeaderMap::new(),
                &body
            ),
            "no digest header"
        );
        let by_d: Reference = d.to_string().parse().unwrap();
        assert!(c.fill(
            &Cacheable::Manifest(&repo, &by_d),
            1,
            StatusCode::OK,
            &h,
            &body
        ));
        assert!(c.get(&Cacheable::Manifest(&repo, &by_d), 1).is_some());
        c.clear();
        assert!(c.get(&Cacheable::Manifest(&repo, &by_d), 1).is_none());
    }

    #[test]
    fn listings_are_kept_apart_from_manifests_and_need_no_digest() {
        let c = ManifestCache::new(1 << 20, Duration::from_secs(60));
        let body = Bytes::from_static(br#"{"name":"a/b","tags":["t"]}"#);
        let list = Cacheable::Listing("/v2/a/b/tags/list?n=1");
        assert!(c.fill(&list, 3, StatusCode::OK, &HeaderMap::new(), &body));
        assert_eq!(c.get(&list, 3).expect("hit").body, body);
        assert!(
            c.get(&Cacheable::Listing("/v2/a/b/tags/list"), 3).is_none(),
            "query is part of the key"
        );
        assert!(c.get(&list, 4).is_none());
    }

    #[test]
    fn disabled_stores_nothing() {
        let c = ManifestCache::new(0, Duration::from_secs(60));
        let repo: RepoName = "a/b".parse().unwrap();
        let tag: Reference = "t".parse().unwrap();
        let (body, h, _) = manifest(1);
        assert!(!c.fill(
            &Cacheable::Manifest(&repo, &tag),
            1,
            StatusCode::OK,
            &h,
            &body
        ));
        assert!(!c.enabled());
    }

    #[test]
    fn bounded_by_bytes() {
        let c = ManifestCache::new(64 * 1024, Duration::from_secs(60));
        let repo: RepoName = "a/b".parse().unwrap();
        for n in 0..200u32 {
            let body = Bytes::from(vec![b'x'; 1024 + n as usize]);
            let d = Digest::of(flotilla_core::Algorithm::Sha256, &body);
            let mut h = HeaderMap::new();
            h.insert("docker-content-digest", d.to_string().parse().unwrap());
            let r: Reference = d.to_string().parse().unwrap();
            c.fill(
                &Cacheable::Manifest(&repo, &r),
                1,
                StatusCode::OK,
                &h,
                &body,
            );
        }
        let weight = c.entries.as_ref().unwrap().weight();
        assert!(
            weight <= 64 * 1024,
            "cache holds {weight} bytes over its 64 KiB bound"
        );
    }
}
