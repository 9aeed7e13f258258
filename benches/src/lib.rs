//! `flotilla-bench`: a load generator for any OCI Distribution registry, and a measurement of
//! the machine's own limits (hashing, disk, loopback), so registry figures can be read as a
//! fraction of what the hardware allows.
//!
//! The core is [`run_workload`], kept independent of the command line so the `flotilla`
//! binary can offer it as `flotilla bench URL ...` by flattening [`BenchArgs`].

pub mod gen;
pub mod limits;
pub mod report;
mod workload;

use std::time::Duration;

pub use report::{Latency, Report};
pub use workload::run_workload;

/// The unit of work a run repeats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Workload {
    /// Monolithic blob upload (single `POST ?digest=`, or `POST` then `PUT ?digest=`).
    Push,
    /// `POST`, then `PATCH` per chunk, then `PUT ?digest=`.
    PushChunked,
    /// `GET` of pre-seeded blobs of one size.
    Pull,
    /// `GET` of pre-seeded blobs drawn from a weighted size mix.
    MixedPull,
    /// `GET /v2/<repo>/manifests/<tag>` of a pre-seeded OCI image manifest.
    ManifestGet,
    /// `HEAD` of the same manifest.
    ManifestHead,
    /// `PUT /v2/<repo>/manifests/<new tag>` of one small image's manifest: the tag write path
    /// (replication, commit, events).
    ManifestPut,
    /// `GET /v2/<repo>/tags/list` on a repository with pre-seeded tags.
    TagsList,
    /// `GET /v2/_catalog`.
    Catalog,
}

impl Workload {
    /// The kebab-case name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Workload::Push => "push",
            Workload::PushChunked => "push-chunked",
            Workload::Pull => "pull",
            Workload::MixedPull => "mixed-pull",
            Workload::ManifestGet => "manifest-get",
            Workload::ManifestPut => "manifest-put",
            Workload::ManifestHead => "manifest-head",
            Workload::TagsList => "tags-list",
            Workload::Catalog => "catalog",
        }
    }
}

/// How a monolithic push is sent. Single-`POST` upload is optional in the OCI spec and CNCF
/// Distribution 2.8 ignores `?digest=` on `POST`, so `auto` probes once with a tiny blob and
/// falls back to the `POST` + `PUT` form every client also knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum MonolithicMode {
    Auto,
    /// `POST /v2/<name>/blobs/uploads/?digest=` with the body.
    Post,
    /// `POST` to open a session, then `PUT <location>?digest=` with the body.
    PostPut,
}

/// When a run stops.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum StopAfter {
    /// Start no new operation after this long; in-flight ones finish and count.
    Duration(Duration),
    /// Exactly this many operations in total, across all workers.
    Requests(u64),
}

/// Everything [`run_workload`] needs.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// Registry base URL, e.g. `http://127.0.0.1:5000` (no `/v2`).
    pub url: String,
    /// Label for the report.
    pub target: String,
    pub workload: Workload,
    pub concurrency: usize,
    pub stop: StopAfter,
    /// Blob size for push/pull.
    pub size: u64,
    /// Chunk size for `push-chunked`.
    pub chunk_size: u64,
    /// `(size, weight)` pairs for `mixed-pull`.
    pub mix: Vec<(u64, u32)>,
    /// Repository to use; default `flotilla-bench/<workload>`.
    pub repo: Option<String>,
    pub monolithic: MonolithicMode,
    /// Hash pulled bodies and compare with the digest (costs client CPU).
    pub verify: bool,
    /// Makes this run's blobs unique; default derived from the clock and pid.
    pub nonce: u64,
    /// Per-operation timeout.
    pub timeout: Duration,
    /// Number of distinct blobs seeded per size for pull workloads (default: concurrency, max 8).
    pub seed_blobs: Option<usize>,
    /// Tags seeded for `tags-list`.
    pub tags: usize,
    /// `Authorization` value sent on every request (`Basic ...`, `Bearer ...`); dropped on
    /// redirects to another host or port, as clients do, so a node's signed URL is not sent
    /// the client's credentials.
    pub authorization: Option<String>,
}

impl BenchConfig {
    /// Defaults for a workload against `url`.
    pub fn new(url: impl Into<String>, workload: Workload) -> Self {
        BenchConfig {
            url: url.into(),
            target: "registry".into(),
            workload,
            concurrency: 1,
            stop: StopAfter::Duration(Duration::from_secs(10)),
            size: 10 << 20,
            chunk_size: 5 << 20,
            mix: default_mix(),
            repo: None,
            monolithic: MonolithicMode::Auto,
            verify: false,
            nonce: default_nonce(),
            timeout: Duration::from_secs(600),
            seed_blobs: None,
            tags: 50,
            authorization: None,
        }
    }
}

/// 20% 1 MiB, 70% 10 MiB, 10% 100 MiB: roughly the layer-size spread of service images.
pub fn default_mix() -> Vec<(u64, u32)> {
    vec![(1 << 20, 20), (10 << 20, 70), (100 << 20, 10)]
}

fn default_nonce() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    t ^ (u64::from(std::process::id()) << 48)
}

/// Failures that stop a run before it measures anything (setup, seeding, bad arguments).
/// Errors of individual measured operations are counted in the [`Report`] instead.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("invalid argument: {0}")]
    Invalid(String),
    #[error("setup against {url} failed: {msg}")]
    Setup { url: String, msg: String },
    #[error("http client: {0}")]
    Client(#[from] reqwest::Error),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

/// Parse `10MiB`, `1GiB`, `512KiB`, `100MB`, `4096` (bytes).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().map_err(|_| format!("bad size {s:?}"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        u => return Err(format!("unknown size unit {u:?} in {s:?}")),
    };
    Ok((n * mult as f64).round() as u64)
}

/// Human-readable size (`256MiB`, `1.5KiB`, `17B`).
pub fn format_size(n: u64) -> String {
    for (unit, shift) in [("GiB", 30), ("MiB", 20), ("KiB", 10)] {
        if n >= 1 << shift {
            let v = n as f64 / (1u64 << shift) as f64;
            return if v.fract() == 0.0 {
                format!("{v}{unit}")
            } else {
                format!("{v:.1}{unit}")
            };
        }
    }
    format!("{n}B")
}

/// Parse `1MiB:20,10MiB:70,100MiB:10`.
pub fn parse_mix(s: &str) -> Result<Vec<(u64, u32)>, String> {
    s.split(',')
        .map(|part| {
            let (size, w) = part
                .split_once(':')
                .ok_or_else(|| format!("mix entry {part:?} is not SIZE:WEIGHT"))?;
            let w: u32 = w.trim().parse().map_err(|_| format!("bad weight {w:?}"))?;
            Ok((parse_size(size)?, w))
        })
        .collect()
}

/// A parsed `--mix` (a newtype so clap treats it as one value, not a list).
#[derive(Debug, Clone, PartialEq)]
pub struct Mix(pub Vec<(u64, u32)>);

fn parse_mix_arg(s: &str) -> Result<Mix, String> {
    parse_mix(s).map(Mix)
}

/// Command-line arguments for one run; `flatten` this into another CLI to reuse it.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Registry base URL, e.g. http://127.0.0.1:5000
    pub url: String,
    /// What to repeat.
    #[arg(value_enum)]
    pub workload: Workload,
    /// Parallel clients (each keeps one request in flight).
    #[arg(short, long, default_value_t = 1)]
    pub concurrency: usize,
    /// Run for this many seconds (default 10 unless --requests is given).
    #[arg(short, long, conflicts_with = "requests")]
    pub duration: Option<f64>,
    /// Run exactly this many operations.
    #[arg(short = 'n', long)]
    pub requests: Option<u64>,
    /// Blob size for push/pull (e.g. 1MiB, 10MiB, 100MiB).
    #[arg(short, long, default_value = "10MiB", value_parser = parse_size)]
    pub size: u64,
    /// Chunk size for push-chunked.
    #[arg(long, default_value = "5MiB", value_parser = parse_size)]
    pub chunk_size: u64,
    /// Size mix for mixed-pull, SIZE:WEIGHT,...
    #[arg(long, default_value = "1MiB:20,10MiB:70,100MiB:10", value_parser = parse_mix_arg)]
    pub mix: Mix,
    /// Repository (default flotilla-bench/<workload>).
    #[arg(long)]
    pub repo: Option<String>,
    /// Label for the registry in reports.
    #[arg(long, default_value = "registry")]
    pub target: String,
    /// Monolithic push form.
    #[arg(long, value_enum, default_value_t = MonolithicMode::Auto)]
    pub monolithic: MonolithicMode,
    /// Verify digests of pulled blobs (costs client CPU).
    #[arg(long)]
    pub verify: bool,
    /// Distinct blobs seeded per size for pulls (default: concurrency, at most 8).
    #[arg(long)]
    pub seed_blobs: Option<usize>,
    /// Per-operation timeout in seconds.
    #[arg(long, default_value_t = 600.0)]
    pub timeout: f64,
    /// Send this as the Authorization header on every request, e.g. "Basic dTpw" or
    /// "Bearer <token>".
    #[arg(long, value_name = "HEADER_VALUE")]
    pub authorization: Option<String>,
    /// Seed of the generated blob contents (default: from the clock and pid). A fixed value
    /// makes repeated runs push identical blobs, so a registry that deduplicates stores them
    /// once.
    #[arg(long)]
    pub nonce: Option<u64>,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
}

impl BenchArgs {
    /// The library configuration these arguments describe.
    pub fn to_config(&self) -> BenchConfig {
        let mut c = BenchConfig::new(self.url.trim_end_matches('/'), self.workload);
        c.target = self.target.clone();
        c.concurrency = self.concurrency.max(1);
        c.stop = match (self.requests, self.duration) {
            (Some(n), _) => StopAfter::Requests(n),
            (None, Some(d)) => StopAfter::Duration(Duration::from_secs_f64(d)),
            (None, None) => StopAfter::Duration(Duration::from_secs(10)),
        };
        c.size = self.size;
        c.chunk_size = self.chunk_size;
        c.mix = self.mix.0.clone();
        c.repo = self.repo.clone();
        c.monolithic = self.monolithic;
        c.verify = self.verify;
        c.seed_blobs = self.seed_blobs;
        c.timeout = Duration::from_secs_f64(self.timeout);
        c.authorization = self.authorization.clone();
        if let Some(n) = self.nonce {
            c.nonce = n;
        }
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_and_format() {
        assert_eq!(parse_size("10MiB"), Ok(10 << 20));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("1.5KiB"), Ok(1536));
        assert!(parse_size("3 parsecs").is_err());
        assert_eq!(format_size(256 << 20), "256MiB");
        assert_eq!(format_size(17), "17B");
        assert_eq!(
            parse_mix("1MiB:20,10MiB:80"),
            Ok(vec![(1 << 20, 20), (10 << 20, 80)])
        );
    }
}
