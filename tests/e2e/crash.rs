//! Crash safety: concurrent pushes (monolithic and chunked blobs of 0 B to a few MiB,
//! tagged manifests), `kill -9` at a random moment mid-push, restart on the same data dir,
//! then every acknowledged write must read back byte-identical, no file under a final name
//! may be corrupt, every tag on disk must resolve, and the restart must have swept the
//! leftovers. Content and op choice come from a seeded generator (`FLOTILLA_CRASH_SEED`
//! overrides); only the kill moment varies between runs, and assertions cover only writes
//! the server acknowledged, so the outcome does not depend on it.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sha2::Digest as _;

use crate::support::*;

const ROUNDS: usize = 8;
const WORKERS: usize = 4;
const REPOS: [&str; 3] = ["crash/a", "crash/b/c", "crash/d"];
const DEFAULT_SEED: u64 = 0x00f1_0771_1a5e_ed01;

/// splitmix64: tiny, seedable, good enough to pick sizes and ops.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    /// Mostly small, sometimes empty, sometimes up to 3 MiB.
    fn size(&mut self) -> usize {
        match self.below(10) {
            0 => 0,
            1..=4 => self.below(4096) as usize + 1,
            5..=7 => self.below(256 * 1024) as usize + 1,
            _ => self.below(3 * 1024 * 1024) as usize + 1,
        }
    }

    /// `len` bytes of sha256 in counter mode from a fresh seed.
    fn bytes(&mut self, len: usize) -> Vec<u8> {
        let seed = self.next().to_le_bytes();
        let mut out = Vec::with_capacity(len + 32);
        let mut i = 0u64;
        while out.len() < len {
            let mut h = sha2::Sha256::new();
            h.update(seed);
            h.update(i.to_le_bytes());
            out.extend_from_slice(&h.finalize());
            i += 1;
        }
        out.truncate(len);
        out
    }
}

/// Writes the server acknowledged with 201.
#[derive(Default)]
struct Acked {
    blobs: Vec<(String, String, usize)>,  // repo, digest, size
    tags: Vec<(String, String, Vec<u8>)>, // repo, tag, manifest bytes
}

type Res<T> = Result<T, String>;

/// Fallible pushes: after the kill every request may fail, and only 201s count.
struct Pusher {
    c: Oci,
}

impl Pusher {
    async fn monolithic(&self, repo: &str, bytes: &[u8]) -> Res<String> {
        let d = sha256(bytes);
        let r = self
            .c
            .post_blob(repo, &d, bytes.to_vec())
            .await
            .map_err(|e| e.to_string())?;
        if r.status() == 201 {
            Ok(d)
        } else {
            Err(format!("monolithic push: {}", r.status()))
        }
    }

    async fn chunked(&self, repo: &str, bytes: &[u8], chunk: usize) -> Res<String> {
        let d = sha256(bytes);
        let r = self
            .c
            .http
            .post(self.c.url(&format!("/v2/{repo}/blobs/uploads/")))
            .send()
            .await
            .map_err(|e| e.to_string())?;
        if r.status() != 202 {
            return Err(format!("start upload: {}", r.status()));
        }
        let mut loc = location(&r)?;
        let mut at = 0usize;
        for part in bytes.chunks(chunk.max(1)) {
            let r = self
                .c
                .http
                .patch(self.c.url(&loc))
                .header("content-type", "application/octet-stream")
                .header("content-range", format!("{}-{}", at, at + part.len() - 1))
                .body(part.to_vec())
                .send()
                .await
                .map_err(|e| e.to_string())?;
            if r.status() != 202 {
                return Err(format!("PATCH: {}", r.status()));
            }
            loc = location(&r)?;
            at += part.len();
        }
        let r = self
            .c
            .close_upload(&loc, &d, Vec::new())
            .await
            .map_err(|e| e.to_string())?;
        if r.status() == 201 {
            Ok(d)
        } else {
            Err(format!("PUT: {}", r.status()))
        }
    }

    async fn manifest(&self, repo: &str, tag: &str, body: &[u8]) -> Res<()> {
        let r = self
            .c
            .http
            .put(self.c.url(&format!("/v2/{repo}/manifests/{tag}")))
            .header("content-type", OCI_MANIFEST)
            .body(body.to_vec())
            .send()
            .await
            .map_err(|e| e.to_string())?;
        if r.status() == 201 {
            Ok(())
        } else {
            Err(format!("PUT manifest: {}", r.status()))
        }
    }
}

fn location(r: &reqwest::Response) -> Res<String> {
    r.headers()
        .get("location")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .ok_or_else(|| "no Location".to_owned())
}

/// One worker's pushes until `stop` or the first failure (the node died).
async fn worker(
    c: Oci,
    mut rng: Rng,
    round: usize,
    w: usize,
    acked: Arc<Mutex<Acked>>,
    count: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
) {
    let p = Pusher { c };
    let ack_blob = |repo: &str, d: String, size: usize| {
        acked
            .lock()
            .expect("acked")
            .blobs
            .push((repo.to_owned(), d, size));
        count.fetch_add(1, Ordering::SeqCst);
    };
    let mut seq = 0usize;
    while !stop.load(Ordering::SeqCst) {
        seq += 1;
        let repo = REPOS[rng.below(REPOS.len() as u64) as usize];
        let op = rng.below(3);
        let result: Res<()> = async {
            match op {
                0 => {
                    let n = rng.size();
                    let b = rng.bytes(n);
                    let d = p.monolithic(repo, &b).await?;
                    ack_blob(repo, d, b.len());
                }
                1 => {
                    let n = rng.size();
                    let b = rng.bytes(n);
                    let chunk = [1024, 64 * 1024, 1024 * 1024][rng.below(3) as usize];
                    let d = p.chunked(repo, &b, chunk).await?;
                    ack_blob(repo, d, b.len());
                }
                _ => {
                    let n = rng.size();
                    let layer = rng.bytes(n);
                    let config = format!(
                        r#"{{"architecture":"amd64","os":"linux","rootfs":{{"type":"layers","diff_ids":["{}"]}},"round":{round},"worker":{w},"seq":{seq}}}"#,
                        sha256(&layer)
                    );
                    let ld = if rng.below(2) == 0 {
                        p.monolithic(repo, &layer).await?
                    } else {
                        p.chunked(repo, &layer, 256 * 1024).await?
                    };
                    ack_blob(repo, ld.clone(), layer.len());
                    let cd = p.monolithic(repo, config.as_bytes()).await?;
                    ack_blob(repo, cd.clone(), config.len());
                    let m = image_manifest(&cd, config.len(), &ld, layer.len());
                    // A tag per push: an unacknowledged later write can never shadow an
                    // acknowledged one.
                    let tag = format!("r{round}-w{w}-s{seq}");
                    p.manifest(repo, &tag, m.as_bytes()).await?;
                    acked
                        .lock()
                        .expect("acked")
                        .tags
                        .push((repo.to_owned(), tag, m.into_bytes()));
                    count.fetch_add(1, Ordering::SeqCst);
                }
            }
            Ok(())
        }
        .await;
        if result.is_err() {
            // Only the kill makes requests fail; stop quietly, the check comes later.
            return;
        }
    }
}

/// Everything acknowledged so far reads back exactly.
async fn verify_acked(c: &Oci, acked: &Acked) {
    for (repo, d, size) in &acked.blobs {
        let r = c.get(&format!("/v2/{repo}/blobs/{d}")).await;
        assert_eq!(r.status(), 200, "acknowledged blob {repo}@{d} lost");
        let body = r.bytes().await.expect("blob body");
        assert_eq!(body.len(), *size, "acknowledged blob {repo}@{d}: size");
        assert_eq!(&sha256(&body), d, "acknowledged blob {repo}@{d}: content");
    }
    for (repo, tag, bytes) in &acked.tags {
        let r = c.get(&format!("/v2/{repo}/manifests/{tag}")).await;
        assert_eq!(r.status(), 200, "acknowledged tag {repo}:{tag} lost");
        let body = r.bytes().await.expect("manifest body");
        assert_eq!(
            &body[..],
            &bytes[..],
            "acknowledged tag {repo}:{tag}: bytes differ"
        );
        let by_digest = c
            .get(&format!("/v2/{repo}/manifests/{}", sha256(bytes)))
            .await;
        assert_eq!(by_digest.status(), 200, "{repo}@{}", sha256(bytes));
    }
}

/// On-disk invariants after a crash and restart.
async fn verify_disk(c: &Oci, data: &Path) {
    // Every file under a final blob name holds exactly the content it is named after.
    for rel in files_under(&data.join("blobs")) {
        let parts: Vec<String> = rel
            .components()
            .map(|p| p.as_os_str().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            parts.len(),
            3,
            "unexpected path under blobs/: {}",
            rel.display()
        );
        let (alg, prefix, hex) = (&parts[0], &parts[1], &parts[2]);
        let bytes = std::fs::read(data.join("blobs").join(&rel)).expect("read blob file");
        let actual = match alg.as_str() {
            "sha256" => sha256(&bytes),
            "sha512" => sha512(&bytes),
            other => panic!("unknown algorithm dir blobs/{other}"),
        };
        assert_eq!(
            actual,
            format!("{alg}:{hex}"),
            "corrupt blob file blobs/{}",
            rel.display()
        );
        assert!(
            hex.starts_with(prefix.as_str()),
            "misplaced blob file blobs/{}",
            rel.display()
        );
    }
    // The restart swept temp files and dead upload sessions.
    for dir in ["tmp", "uploads"] {
        let left = files_under(&data.join(dir));
        assert!(left.is_empty(), "{dir}/ not swept at startup: {left:?}");
    }
    // Every layer link names a blob that exists; every tag on disk (acknowledged or not)
    // resolves to a manifest whose bytes match its digest.
    let repos_root = data.join("repos");
    for rel in files_under(&repos_root) {
        let s = rel.to_string_lossy().into_owned();
        if let Some((repo, link)) = s.split_once("/_layers/") {
            let (alg, hex) = link.split_once('/').expect("layer link alg/hex");
            assert!(
                data.join("blobs")
                    .join(alg)
                    .join(&hex[..2])
                    .join(hex)
                    .is_file(),
                "repos/{repo} links {alg}:{hex}, which is not stored"
            );
        } else if let Some((repo, tag)) = s.split_once("/_manifests/tags/") {
            let r = c.get(&format!("/v2/{repo}/manifests/{tag}")).await;
            assert_eq!(r.status(), 200, "tag {repo}:{tag} on disk does not resolve");
            let dcd = r.headers()["docker-content-digest"]
                .to_str()
                .expect("digest header")
                .to_owned();
            let body = r.bytes().await.expect("manifest body");
            assert_eq!(
                sha256(&body),
                dcd,
                "tag {repo}:{tag}: manifest bytes vs digest"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn kill9_mid_push_loses_no_acknowledged_write() {
    let seed = std::env::var("FLOTILLA_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(DEFAULT_SEED);
    eprintln!("crash test seed {seed} (FLOTILLA_CRASH_SEED)");
    let mut master = Rng(seed);
    let mut node = NodeProc::start().await;
    let mut total_kills_mid_push = 0;

    // The edges, acknowledged before any crash: empty blobs both ways, a tagged image.
    let edges = {
        let p = Pusher { c: node.client() };
        let mut a = Acked::default();
        let d = p
            .monolithic("crash/a", b"")
            .await
            .expect("empty monolithic");
        a.blobs.push(("crash/a".into(), d, 0));
        let d = p
            .chunked("crash/d", b"", 1024)
            .await
            .expect("empty chunked");
        a.blobs.push(("crash/d".into(), d, 0));
        let layer = master.bytes(100_000);
        let ld = p.chunked("crash/a", &layer, 30_000).await.expect("layer");
        let config =
            br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
        let cd = p.monolithic("crash/a", config).await.expect("config");
        let m = image_manifest(&cd, config.len(), &ld, layer.len());
        p.manifest("crash/a", "base", m.as_bytes())
            .await
            .expect("manifest");
        a.blobs.push(("crash/a".into(), ld, layer.len()));
        a.blobs.push(("crash/a".into(), cd, config.len()));
        a.tags
            .push(("crash/a".into(), "base".into(), m.into_bytes()));
        a
    };
    let acked = Arc::new(Mutex::new(edges));

    for round in 0..ROUNDS {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("client");
        let c = Oci {
            base: node.url(),
            http,
        };
        let count = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let tasks: Vec<_> = (0..WORKERS)
            .map(|w| {
                tokio::spawn(worker(
                    c.clone(),
                    Rng(master.next()),
                    round,
                    w,
                    acked.clone(),
                    count.clone(),
                    stop.clone(),
                ))
            })
            .collect();

        // Kill once this round has had `target` acknowledgements: the workers are busy, so
        // the kill lands mid-request; which request varies, the assertions do not.
        let target = 2 + master.below(12) as usize;
        let deadline = Instant::now() + Duration::from_secs(60);
        while count.load(Ordering::SeqCst) < target {
            assert!(
                Instant::now() < deadline,
                "round {round}: only {} acknowledgements in 60s",
                count.load(Ordering::SeqCst)
            );
            assert!(
                !tasks.iter().all(|t| t.is_finished()),
                "round {round}: every worker stopped before the kill (node failing?)"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let busy = tasks.iter().filter(|t| !t.is_finished()).count();
        if busy > 0 {
            total_kills_mid_push += 1;
        }
        node.kill9();
        stop.store(true, Ordering::SeqCst);
        for t in tasks {
            tokio::time::timeout(Duration::from_secs(60), t)
                .await
                .expect("worker did not stop after the kill")
                .expect("worker panicked");
        }

        node.restart().await;
        let c = node.client();
        let snapshot = {
            let a = acked.lock().expect("acked");
            Acked {
                blobs: a.blobs.clone(),
                tags: a.tags.clone(),
            }
        };
        eprintln!(
            "round {round}: killed after {} acks ({} workers busy); verifying {} blobs, {} tags",
            count.load(Ordering::SeqCst),
            busy,
            snapshot.blobs.len(),
            snapshot.tags.len()
        );
        verify_disk(&c, &node.data).await;
        verify_acked(&c, &snapshot).await;
    }
    assert!(
        total_kills_mid_push > 0,
        "no kill landed while pushes were in flight"
    );
}
