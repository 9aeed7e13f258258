//! The machine's own ceilings, measured with the same building blocks a registry uses, so a
//! registry figure can be read as a fraction of what is physically possible here:
//!
//! * SHA-256 (the workspace's `sha2`) over an in-memory stream: every byte pushed is hashed
//!   once, so one core's hashing rate bounds a single upload stream.
//! * Sequential file write ending in `fdatasync`: a registry must not acknowledge a blob that
//!   is not durable, so this bounds push throughput to local disk.
//! * Loopback TCP between a tokio server and client: the HTTP transport cannot beat it.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::gen::BlobGen;
use crate::BenchError;

/// What to measure and how much.
#[derive(Debug, Clone)]
pub struct LimitsConfig {
    /// Directory for the disk test (use the registry's data directory's filesystem).
    pub dir: PathBuf,
    pub sha_bytes: u64,
    pub disk_bytes: u64,
    pub tcp_bytes: u64,
}

impl LimitsConfig {
    /// 1 GiB hashed, 1 GiB written, 2 GiB over loopback.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        LimitsConfig {
            dir: dir.into(),
            sha_bytes: 1 << 30,
            disk_bytes: 1 << 30,
            tcp_bytes: 2 << 30,
        }
    }
}

/// One measured ceiling.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Limit {
    pub name: String,
    pub bytes: u64,
    pub secs: f64,
    pub mib_per_sec: f64,
}

impl Limit {
    fn new(name: &str, bytes: u64, secs: f64) -> Self {
        Limit {
            name: name.to_owned(),
            bytes,
            secs,
            mib_per_sec: bytes as f64 / (1 << 20) as f64 / secs.max(1e-9),
        }
    }
}

/// All ceilings of one machine.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LimitsReport {
    pub sha256: Limit,
    pub disk_write_fdatasync: Limit,
    pub loopback_tcp: Limit,
    pub cpus: usize,
}

impl LimitsReport {
    /// A small text table.
    pub fn to_text(&self) -> String {
        let mut s = format!(
            "{:<24} {:>10} {:>8} {:>10}\n",
            "limit", "bytes", "secs", "MiB/s"
        );
        for l in [&self.sha256, &self.disk_write_fdatasync, &self.loopback_tcp] {
            s.push_str(&format!(
                "{:<24} {:>10} {:>8.2} {:>10.1}\n",
                l.name,
                crate::format_size(l.bytes),
                l.secs,
                l.mib_per_sec
            ));
        }
        s.push_str(&format!("cpus: {}\n", self.cpus));
        s
    }
}

/// Hash `bytes` of the repeating 1 MiB pattern on one core.
pub fn sha256_throughput(bytes: u64) -> Limit {
    let gen = BlobGen::new(0);
    let pattern = gen.pattern().clone();
    let t = Instant::now();
    let mut h = Sha256::new();
    let mut left = bytes;
    while left > 0 {
        let n = left.min(pattern.len() as u64) as usize;
        h.update(&pattern[..n]);
        left -= n as u64;
    }
    std::hint::black_box(h.finalize());
    Limit::new("sha256 (1 core)", bytes, t.elapsed().as_secs_f64())
}

/// Write `bytes` sequentially in 1 MiB writes to a new file in `dir`, then `fdatasync`; the
/// time includes the sync. The file is removed afterwards.
pub fn disk_write(dir: &Path, bytes: u64) -> Result<Limit, BenchError> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join(format!(".flotilla-bench-disk-{}", std::process::id()));
    let gen = BlobGen::new(0);
    let pattern = gen.pattern().clone();
    let result = (|| {
        let mut f = std::fs::File::create(&path)?;
        let t = Instant::now();
        let mut left = bytes;
        while left > 0 {
            let n = left.min(pattern.len() as u64) as usize;
            f.write_all(&pattern[..n])?;
            left -= n as u64;
        }
        f.sync_data()?;
        Ok::<_, std::io::Error>(t.elapsed().as_secs_f64())
    })();
    let _ = std::fs::remove_file(&path);
    Ok(Limit::new("disk write + fdatasync", bytes, result?))
}

/// Push `bytes` from a tokio client to a tokio server over 127.0.0.1; timed until the server
/// has read the last byte.
pub async fn loopback_tcp(bytes: u64) -> Result<Limit, BenchError> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server = tokio::spawn(async move {
        let (mut sock, _) = listener.accept().await?;
        let mut buf = vec![0u8; 1 << 20];
        let mut n = 0u64;
        loop {
            let r = sock.read(&mut buf).await?;
            if r == 0 {
                break;
            }
            n += r as u64;
        }
        Ok::<_, std::io::Error>((n, Instant::now()))
    });
    let gen = BlobGen::new(0);
    let pattern = gen.pattern().clone();
    let mut sock = tokio::net::TcpStream::connect(addr).await?;
    sock.set_nodelay(true)?;
    let t = Instant::now();
    let mut left = bytes;
    while left > 0 {
        let n = left.min(pattern.len() as u64) as usize;
        sock.write_all(&pattern[..n]).await?;
        left -= n as u64;
    }
    sock.shutdown().await?;
    let (got, end) = server
        .await
        .map_err(|e| BenchError::Invalid(format!("loopback server task: {e}")))??;
    if got != bytes {
        return Err(BenchError::Invalid(format!(
            "loopback server read {got} bytes, want {bytes}"
        )));
    }
    Ok(Limit::new(
        "loopback TCP",
        bytes,
        end.duration_since(t).as_secs_f64(),
    ))
}

/// Measure everything, one at a time so the measurements do not compete for cores.
pub async fn measure(cfg: &LimitsConfig) -> Result<LimitsReport, BenchError> {
    let sha_bytes = cfg.sha_bytes;
    let sha256 = tokio::task::spawn_blocking(move || sha256_throughput(sha_bytes))
        .await
        .map_err(|e| BenchError::Invalid(format!("sha task: {e}")))?;
    let (dir, disk_bytes) = (cfg.dir.clone(), cfg.disk_bytes);
    let disk = tokio::task::spawn_blocking(move || disk_write(&dir, disk_bytes))
        .await
        .map_err(|e| BenchError::Invalid(format!("disk task: {e}")))??;
    let tcp = loopback_tcp(cfg.tcp_bytes).await?;
    Ok(LimitsReport {
        sha256,
        disk_write_fdatasync: disk,
        loopback_tcp: tcp,
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
    })
}
