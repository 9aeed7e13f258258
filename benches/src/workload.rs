//! The load loop: seed what the workload reads, then let `concurrency` workers repeat one
//! operation until the stop condition, each recording latency in its own histogram (merged at
//! the end, so recording never contends).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use reqwest::{header, Client, Method, StatusCode};
use sha2::{Digest as _, Sha256};

use crate::gen::{Blob, BlobGen};
use crate::report::{own_peak_rss_kib, Latency, Report};
use crate::{BenchConfig, BenchError, MonolithicMode, StopAfter, Workload};

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// What `docker pull` sends, so registries that negotiate content types serve the same bytes.
const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, \
    application/vnd.docker.distribution.manifest.v2+json, \
    application/vnd.oci.image.index.v1+json, \
    application/vnd.docker.distribution.manifest.list.v2+json";
const TAG: &str = "bench";
/// At most this many distinct error messages are kept in a report.
const MAX_ERROR_SAMPLES: usize = 5;
/// Blob ids at or above this are reserved for setup (probe, manifest layers) so they never
/// collide with ids handed out to measured pushes.
const SETUP_IDS: u64 = 1 << 62;

/// Shared, read-only state of one run.
struct Ctx {
    client: Client,
    base: String,
    repo: String,
    gen: BlobGen,
    cfg: BenchConfig,
    /// Resolved form of a monolithic push (never `Auto`).
    mode: MonolithicMode,
    next_id: AtomicU64,
}

/// A pre-seeded blob: its description and digest.
type Seeded = (Blob, String);

/// What the workers operate on, prepared before the clock starts.
enum Plan {
    Push,
    PushChunked,
    Pull(Vec<Seeded>),
    MixedPull(Vec<(u32, Vec<Seeded>)>),
    ManifestGet,
    ManifestHead,
    /// The seeded image's manifest, put under a new tag by every operation.
    ManifestPut(Bytes),
    TagsList,
    Catalog,
}

#[derive(Default)]
struct WorkerStats {
    ok: u64,
    errors: u64,
    bytes: u64,
    samples: Vec<String>,
}

fn op_err(what: &str, e: impl std::fmt::Display) -> String {
    format!("{what}: {e}")
}

impl Ctx {
    fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// Resolve a `Location` header (absolute or relative) against the base URL.
    fn location(&self, resp: &reqwest::Response) -> Result<String, String> {
        let loc = resp
            .headers()
            .get(header::LOCATION)
            .ok_or("response has no Location")?
            .to_str()
            .map_err(|e| op_err("Location", e))?;
        Ok(
            if loc.starts_with("http://") || loc.starts_with("https://") {
                loc.to_owned()
            } else {
                self.url(loc)
            },
        )
    }

    fn with_digest(loc: &str, digest: &str) -> String {
        let sep = if loc.contains('?') { '&' } else { '?' };
        format!("{loc}{sep}digest={digest}")
    }

    /// Fail with status and a body snippet unless `resp` has status `want`.
    async fn expect(
        resp: reqwest::Response,
        want: StatusCode,
        what: &str,
    ) -> Result<reqwest::Response, String> {
        if resp.status() == want {
            return Ok(resp);
        }
        let status = resp.status();
        let body = resp.text().await.unwrap_or_default();
        let body: String = body.chars().take(200).collect();
        Err(format!("{what}: want {want}, got {status}: {body}"))
    }

    async fn open_session(&self, repo: &str) -> Result<String, String> {
        let resp = self
            .client
            .post(self.url(&format!("/v2/{repo}/blobs/uploads/")))
            .header(header::CONTENT_LENGTH, 0)
            .send()
            .await
            .map_err(|e| op_err("POST upload", e))?;
        let resp = Self::expect(resp, StatusCode::ACCEPTED, "POST upload").await?;
        self.location(&resp)
    }

    /// Upload `len` bytes produced by `body` with the given digest, in the resolved
    /// monolithic form.
    async fn push_body(
        &self,
        repo: &str,
        digest: &str,
        len: u64,
        body: reqwest::Body,
        mode: MonolithicMode,
    ) -> Result<(), String> {
        let req = if mode == MonolithicMode::Post {
            self.client
                .post(self.url(&format!("/v2/{repo}/blobs/uploads/?digest={digest}")))
        } else {
            let loc = self.open_session(repo).await?;
            self.client.put(Self::with_digest(&loc, digest))
        };
        let resp = req
            .header(header::CONTENT_TYPE, "application/octet-stream")
            .header(header::CONTENT_LENGTH, len)
            .body(body)
            .send()
            .await
            .map_err(|e| op_err("upload", e))?;
        Self::expect(resp, StatusCode::CREATED, "monolithic upload").await?;
        Ok(())
    }

    async fn push_blob(
        &self,
        repo: &str,
        blob: &Blob,
        digest: &str,
        mode: MonolithicMode,
    ) -> Result<(), String> {
        let body = self.gen.body(blob, 0..blob.len());
        self.push_body(repo, digest, blob.len(), body, mode).await
    }

    async fn push_bytes(&self, repo: &str, bytes: Bytes) -> Result<String, String> {
        let digest = format!("sha256:{}", hex::encode(Sha256::digest(&bytes)));
        let len = bytes.len() as u64;
        self.push_body(repo, &digest, len, bytes.into(), MonolithicMode::PostPut)
            .await?;
        Ok(digest)
    }

    async fn push_chunked(&self, blob: &Blob, digest: &str) -> Result<(), String> {
        let mut loc = self.open_session(&self.repo).await?;
        let chunk = self.cfg.chunk_size.max(1);
        let mut at = 0;
        while at < blob.len() {
            let end = (at + chunk).min(blob.len());
            let resp = self
                .client
                .patch(&loc)
                .header(header::CONTENT_TYPE, "application/octet-stream")
                .header(header::CONTENT_RANGE, format!("{}-{}", at, end - 1))
                .header(header::CONTENT_LENGTH, end - at)
                .body(self.gen.body(blob, at..end))
                .send()
                .await
                .map_err(|e| op_err("PATCH", e))?;
            let resp = Self::expect(resp, StatusCode::ACCEPTED, "PATCH").await?;
            loc = self.location(&resp)?;
            at = end;
        }
        let resp = self
            .client
            .put(Self::with_digest(&loc, digest))
            .header(header::CONTENT_LENGTH, 0)
            .send()
            .await
            .map_err(|e| op_err("PUT", e))?;
        Self::expect(resp, StatusCode::CREATED, "PUT").await?;
        Ok(())
    }

    /// GET a blob, streaming the body (never buffering it) and counting bytes.
    async fn pull(&self, blob: &Blob, digest: &str) -> Result<u64, String> {
        let resp = self
            .client
            .get(self.url(&format!("/v2/{}/blobs/{digest}", self.repo)))
            .send()
            .await
            .map_err(|e| op_err("GET blob", e))?;
        let mut resp = Self::expect(resp, StatusCode::OK, "GET blob").await?;
        let mut n = 0u64;
        let mut hasher = self.cfg.verify.then(Sha256::new);
        while let Some(c) = resp.chunk().await.map_err(|e| op_err("GET body", e))? {
            n += c.len() as u64;
            if let Some(h) = hasher.as_mut() {
                h.update(&c);
            }
        }
        if n != blob.len() {
            return Err(format!("GET blob: got {n} bytes, want {}", blob.len()));
        }
        if let Some(h) = hasher {
            let got = format!("sha256:{}", hex::encode(h.finalize()));
            if got != digest {
                return Err(format!("GET blob: digest {got}, want {digest}"));
            }
        }
        Ok(n)
    }

    /// A request whose body is read and discarded; returns body bytes (not counted as
    /// payload throughput).
    async fn simple(
        &self,
        method: Method,
        path: &str,
        accept: Option<&str>,
    ) -> Result<u64, String> {
        let mut req = self.client.request(method.clone(), self.url(path));
        if let Some(a) = accept {
            req = req.header(header::ACCEPT, a);
        }
        let resp = req.send().await.map_err(|e| op_err(method.as_str(), e))?;
        let resp = Self::expect(resp, StatusCode::OK, method.as_str()).await?;
        let body = resp.bytes().await.map_err(|e| op_err("body", e))?;
        if method == Method::GET && body.is_empty() {
            return Err(format!("{method} {path}: empty body"));
        }
        Ok(body.len() as u64)
    }

    /// Push a small image (config + 5 layers of 1 KiB) to `repo` and tag it with each tag.
    /// Pushes a small image under `tags`; returns its manifest.
    async fn seed_image(&self, repo: &str, tags: &[String]) -> Result<Bytes, String> {
        let mut layers = Vec::new();
        for i in 0..5 {
            let b = self.gen.blob(
                SETUP_IDS + self.next_id.fetch_add(1, Ordering::Relaxed) + i,
                1024,
            );
            let d = self.gen.digest(&b);
            self.push_blob(repo, &b, &d, MonolithicMode::PostPut)
                .await?;
            layers.push(serde_json::json!({
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": d,
                "size": 1024,
            }));
        }
        let diff_ids: Vec<_> = layers.iter().map(|l| l["digest"].clone()).collect();
        let config = serde_json::to_vec(&serde_json::json!({
            "architecture": "amd64",
            "os": "linux",
            "config": {},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        }))
        .map_err(|e| e.to_string())?;
        let config_len = config.len();
        let config_digest = self.push_bytes(repo, Bytes::from(config)).await?;
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": config_digest,
                "size": config_len,
            },
            "layers": layers,
        }))
        .map_err(|e| e.to_string())?;
        let manifest = Bytes::from(manifest);
        for tag in tags {
            let resp = self
                .client
                .put(self.url(&format!("/v2/{repo}/manifests/{tag}")))
                .header(header::CONTENT_TYPE, OCI_MANIFEST)
                .body(manifest.clone())
                .send()
                .await
                .map_err(|e| op_err("PUT manifest", e))?;
            Self::expect(resp, StatusCode::CREATED, "PUT manifest").await?;
        }
        Ok(manifest)
    }

    /// Seed `count` blobs of `size` in the run's repository.
    async fn seed_blobs(&self, size: u64, count: usize) -> Result<Vec<Seeded>, String> {
        let mut out = Vec::with_capacity(count);
        for _ in 0..count {
            let b = self.gen.blob(
                SETUP_IDS + self.next_id.fetch_add(1, Ordering::Relaxed),
                size,
            );
            let d = self.digest(&b).await;
            self.push_blob(&self.repo, &b, &d, MonolithicMode::PostPut)
                .await?;
            out.push((b, d));
        }
        // Measure steady-state serving: pull every blob twice before the clock starts, so a
        // registry that replicates or caches asynchronously (Flotilla's partner replica warms
        // in the background after a push) is not timed while it is still catching up.
        for (b, d) in &out {
            for _ in 0..2 {
                self.pull(b, d).await?;
            }
        }
        Ok(out)
    }

    /// Digest off the async threads: the first call per size hashes the whole common part.
    async fn digest(&self, b: &Blob) -> String {
        let gen = self.gen.clone();
        let b2 = b.clone();
        tokio::task::spawn_blocking(move || gen.digest(&b2))
            .await
            .expect("digest task panicked")
    }

    /// Decide the monolithic form by pushing a tiny probe blob as a single POST.
    async fn probe_single_post(&self) -> MonolithicMode {
        let b = self.gen.blob(SETUP_IDS - 1, 1024);
        let d = self.gen.digest(&b);
        match self
            .push_blob(&self.repo, &b, &d, MonolithicMode::Post)
            .await
        {
            Ok(()) => MonolithicMode::Post,
            Err(_) => MonolithicMode::PostPut,
        }
    }
}

/// Run one workload and report what it measured.
///
/// Setup (seeding blobs, manifests and tags; probing the push form) happens before the clock
/// starts and fails the whole run with a [`BenchError`]; failures of measured operations are
/// counted in [`Report::errors`] with a few samples.
pub async fn run_workload(cfg: BenchConfig) -> Result<Report, BenchError> {
    if cfg.concurrency == 0 {
        return Err(BenchError::Invalid("concurrency must be at least 1".into()));
    }
    if cfg.workload == Workload::MixedPull && cfg.mix.iter().all(|(_, w)| *w == 0) {
        return Err(BenchError::Invalid("mix has no positive weight".into()));
    }
    let mut headers = header::HeaderMap::new();
    if let Some(a) = &cfg.authorization {
        let mut v = header::HeaderValue::from_str(a)
            .map_err(|e| BenchError::Invalid(format!("--authorization: {e}")))?;
        v.set_sensitive(true);
        headers.insert(header::AUTHORIZATION, v);
    }
    let client = Client::builder()
        .default_headers(headers)
        .pool_max_idle_per_host(cfg.concurrency * 2)
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(10))
        .build()?;
    let base = cfg.url.trim_end_matches('/').to_owned();
    let repo = cfg
        .repo
        .clone()
        .unwrap_or_else(|| format!("flotilla-bench/{}", cfg.workload.name()));
    let setup_err = |msg: String| BenchError::Setup {
        url: base.clone(),
        msg,
    };
    let mut ctx = Ctx {
        client,
        base: base.clone(),
        repo: repo.clone(),
        gen: BlobGen::new(cfg.nonce),
        mode: cfg.monolithic,
        cfg: cfg.clone(),
        next_id: AtomicU64::new(0),
    };
    let mut notes = Vec::new();

    let seed_count = cfg
        .seed_blobs
        .unwrap_or_else(|| cfg.concurrency.min(8))
        .max(1);
    let plan = match cfg.workload {
        Workload::Push => {
            if ctx.mode == MonolithicMode::Auto {
                ctx.mode = ctx.probe_single_post().await;
            }
            notes.push(match ctx.mode {
                MonolithicMode::Post => "monolithic push as a single POST ?digest=".to_owned(),
                _ => "monolithic push as POST then PUT ?digest= (single POST unsupported or not chosen)".to_owned(),
            });
            // Warm the per-size digest midstate before the clock starts.
            ctx.digest(&ctx.gen.blob(0, cfg.size)).await;
            Plan::Push
        }
        Workload::PushChunked => {
            notes.push(format!(
                "chunked push: POST, PATCH x{}, PUT",
                cfg.size.div_ceil(cfg.chunk_size.max(1))
            ));
            ctx.digest(&ctx.gen.blob(0, cfg.size)).await;
            Plan::PushChunked
        }
        Workload::Pull => {
            notes.push(format!("{seed_count} distinct blob(s) seeded"));
            Plan::Pull(
                ctx.seed_blobs(cfg.size, seed_count)
                    .await
                    .map_err(setup_err)?,
            )
        }
        Workload::MixedPull => {
            let mut buckets = Vec::new();
            for &(size, w) in &cfg.mix {
                let blobs = ctx.seed_blobs(size, seed_count).await.map_err(setup_err)?;
                buckets.push((w, blobs));
            }
            let mix: Vec<String> = cfg
                .mix
                .iter()
                .map(|(s, w)| format!("{}:{w}", crate::format_size(*s)))
                .collect();
            notes.push(format!(
                "mix {}; {seed_count} blob(s) seeded per size",
                mix.join(",")
            ));
            Plan::MixedPull(buckets)
        }
        Workload::ManifestGet | Workload::ManifestHead => {
            ctx.seed_image(&repo, &[TAG.to_owned()])
                .await
                .map_err(setup_err)?;
            if cfg.workload == Workload::ManifestGet {
                Plan::ManifestGet
            } else {
                Plan::ManifestHead
            }
        }
        Workload::ManifestPut => {
            let m = ctx
                .seed_image(&repo, &[TAG.to_owned()])
                .await
                .map_err(setup_err)?;
            notes.push("each operation puts the seeded manifest under a new tag".into());
            Plan::ManifestPut(m)
        }
        Workload::TagsList => {
            let tags: Vec<String> = (0..cfg.tags.max(1)).map(|i| format!("t{i:04}")).collect();
            ctx.seed_image(&repo, &tags).await.map_err(setup_err)?;
            notes.push(format!("{} tags seeded", tags.len()));
            Plan::TagsList
        }
        Workload::Catalog => {
            for i in 0..10 {
                ctx.seed_image(&format!("{repo}-{i}"), &[TAG.to_owned()])
                    .await
                    .map_err(setup_err)?;
            }
            notes.push(
                "10 repositories seeded (the catalog also lists anything already there)".into(),
            );
            Plan::Catalog
        }
    };

    let ctx = Arc::new(ctx);
    let plan = Arc::new(plan);
    let issued = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = match cfg.stop {
        StopAfter::Duration(d) => Some(start + d),
        StopAfter::Requests(_) => None,
    };
    let mut handles = Vec::with_capacity(cfg.concurrency);
    for w in 0..cfg.concurrency {
        let (ctx, plan, issued) = (ctx.clone(), plan.clone(), issued.clone());
        handles.push(tokio::spawn(async move {
            worker(ctx, plan, w, deadline, issued).await
        }));
    }
    let mut hist = new_histogram();
    let mut total = WorkerStats::default();
    for h in handles {
        let (s, wh) = h.await.expect("worker panicked");
        hist.add(&wh).expect("histograms share bounds");
        total.ok += s.ok;
        total.errors += s.errors;
        total.bytes += s.bytes;
        for e in s.samples {
            if total.samples.len() < MAX_ERROR_SAMPLES && !total.samples.contains(&e) {
                total.samples.push(e);
            }
        }
    }
    let elapsed = start.elapsed().as_secs_f64().max(1e-9);
    let blob_size = matches!(
        cfg.workload,
        Workload::Push | Workload::PushChunked | Workload::Pull
    )
    .then_some(cfg.size);
    Ok(Report {
        target: cfg.target.clone(),
        url: base,
        workload: cfg.workload.name().to_owned(),
        concurrency: cfg.concurrency,
        blob_size_bytes: blob_size,
        elapsed_secs: elapsed,
        requests: total.ok,
        errors: total.errors,
        bytes: total.bytes,
        mib_per_sec: total.bytes as f64 / (1 << 20) as f64 / elapsed,
        requests_per_sec: total.ok as f64 / elapsed,
        latency: Latency::from_histogram(&hist),
        error_samples: total.samples,
        notes,
        client_peak_rss_kib: own_peak_rss_kib(),
    })
}

/// 1 µs .. 1 h at three significant digits.
fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("static histogram bounds are valid")
}

/// Pick an index by weight with a per-worker SplitMix64 stream (deterministic per worker, no
/// shared RNG to contend on).
fn pick(weights: &[(u32, Vec<Seeded>)], state: &mut u64) -> usize {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    let total: u64 = weights.iter().map(|(w, _)| u64::from(*w)).sum();
    let mut r = z % total.max(1);
    for (i, (w, _)) in weights.iter().enumerate() {
        if r < u64::from(*w) {
            return i;
        }
        r -= u64::from(*w);
    }
    weights.len() - 1
}

async fn worker(
    ctx: Arc<Ctx>,
    plan: Arc<Plan>,
    w: usize,
    deadline: Option<Instant>,
    issued: Arc<AtomicU64>,
) -> (WorkerStats, Histogram<u64>) {
    let mut stats = WorkerStats::default();
    let mut hist = new_histogram();
    let mut rng = w as u64 * 0x1234_5678_9abc_def1 + 1;
    let mut iter = w;
    loop {
        match (deadline, ctx.cfg.stop) {
            (Some(d), _) if Instant::now() >= d => break,
            (None, StopAfter::Requests(n)) if issued.fetch_add(1, Ordering::Relaxed) >= n => break,
            _ => {}
        }
        let t0 = Instant::now();
        let op = one_op(&ctx, &plan, iter, &mut rng);
        let res = match tokio::time::timeout(ctx.cfg.timeout, op).await {
            Ok(r) => r,
            Err(_) => Err(format!("timed out after {:?}", ctx.cfg.timeout)),
        };
        match res {
            Ok(bytes) => {
                hist.saturating_record(t0.elapsed().as_micros().max(1) as u64);
                stats.ok += 1;
                stats.bytes += bytes;
            }
            Err(e) => {
                stats.errors += 1;
                if stats.samples.len() < MAX_ERROR_SAMPLES && !stats.samples.contains(&e) {
                    stats.samples.push(e);
                }
            }
        }
        iter += ctx.cfg.concurrency;
    }
    (stats, hist)
}

/// One measured operation; returns the payload bytes it moved.
async fn one_op(ctx: &Ctx, plan: &Plan, iter: usize, rng: &mut u64) -> Result<u64, String> {
    match plan {
        Plan::Push | Plan::PushChunked => {
            let b = ctx
                .gen
                .blob(ctx.next_id.fetch_add(1, Ordering::Relaxed), ctx.cfg.size);
            // Cheap: the midstate was warmed during setup.
            let d = ctx.gen.digest(&b);
            if matches!(plan, Plan::Push) {
                ctx.push_blob(&ctx.repo, &b, &d, ctx.mode).await?;
            } else {
                ctx.push_chunked(&b, &d).await?;
            }
            Ok(b.len())
        }
        Plan::Pull(blobs) => {
            let (b, d) = &blobs[iter % blobs.len()];
            ctx.pull(b, d).await
        }
        Plan::MixedPull(buckets) => {
            let blobs = &buckets[pick(buckets, rng)].1;
            let (b, d) = &blobs[iter % blobs.len()];
            ctx.pull(b, d).await
        }
        Plan::ManifestGet => ctx
            .simple(
                Method::GET,
                &format!("/v2/{}/manifests/{TAG}", ctx.repo),
                Some(MANIFEST_ACCEPT),
            )
            .await
            .map(|_| 0),
        Plan::ManifestHead => ctx
            .simple(
                Method::HEAD,
                &format!("/v2/{}/manifests/{TAG}", ctx.repo),
                Some(MANIFEST_ACCEPT),
            )
            .await
            .map(|_| 0),
        Plan::ManifestPut(m) => {
            let tag = format!("p{}", ctx.next_id.fetch_add(1, Ordering::Relaxed));
            let resp = ctx
                .client
                .put(ctx.url(&format!("/v2/{}/manifests/{tag}", ctx.repo)))
                .header(header::CONTENT_TYPE, OCI_MANIFEST)
                .body(m.clone())
                .send()
                .await
                .map_err(|e| op_err("PUT manifest", e))?;
            Ctx::expect(resp, StatusCode::CREATED, "PUT manifest").await?;
            Ok(m.len() as u64)
        }
        Plan::TagsList => ctx
            .simple(Method::GET, &format!("/v2/{}/tags/list", ctx.repo), None)
            .await
            .map(|_| 0),
        Plan::Catalog => ctx
            .simple(Method::GET, "/v2/_catalog", None)
            .await
            .map(|_| 0),
    }
}
