//! What one run measured, as a serialisable record and as a text table.

use std::fmt::Write as _;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Latency quantiles in milliseconds (recorded in microseconds, so sub-ms values are exact
/// to three significant digits).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Latency {
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
}

impl Latency {
    /// Summarise a histogram of microsecond samples.
    pub fn from_histogram(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Latency::default();
        }
        let ms = |us: u64| us as f64 / 1000.0;
        Latency {
            p50_ms: ms(h.value_at_quantile(0.50)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            p999_ms: ms(h.value_at_quantile(0.999)),
            max_ms: ms(h.max()),
            mean_ms: h.mean() / 1000.0,
        }
    }
}

/// The result of one workload against one registry.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    /// Free-form label for the registry under test (e.g. `flotilla`, `distribution-fs`).
    pub target: String,
    pub url: String,
    pub workload: String,
    pub concurrency: usize,
    /// Blob size for blob workloads; `None` for metadata workloads and mixes.
    pub blob_size_bytes: Option<u64>,
    /// Wall time from the first request to the last response (in-flight requests at the
    /// deadline are allowed to finish, and are counted).
    pub elapsed_secs: f64,
    /// Successful operations.
    pub requests: u64,
    pub errors: u64,
    /// Payload bytes moved by successful operations (blob bodies only).
    pub bytes: u64,
    pub mib_per_sec: f64,
    pub requests_per_sec: f64,
    /// Latency of successful operations. One operation is everything a client does for the
    /// workload's unit of work, e.g. POST+PATCH…+PUT for a chunked push.
    pub latency: Latency,
    /// First few distinct error messages, to make failures diagnosable.
    pub error_samples: Vec<String>,
    /// How the run was done where it matters for comparison (e.g. monolithic push mode).
    pub notes: Vec<String>,
    /// Peak RSS of the benchmark process itself, to show the client stayed small.
    pub client_peak_rss_kib: Option<u64>,
}

impl Report {
    /// Header line matching [`Report::table_row`].
    pub fn table_header() -> String {
        format!(
            "{:<16} {:<13} {:>4} {:>9} {:>8} {:>6} {:>10} {:>10} {:>9} {:>9} {:>9}",
            "target",
            "workload",
            "conc",
            "size",
            "ok",
            "err",
            "MiB/s",
            "req/s",
            "p50 ms",
            "p99 ms",
            "p999 ms"
        )
    }

    /// One aligned line of the text table.
    pub fn table_row(&self) -> String {
        let size = self
            .blob_size_bytes
            .map(crate::format_size)
            .unwrap_or_else(|| "-".into());
        format!(
            "{:<16} {:<13} {:>4} {:>9} {:>8} {:>6} {:>10.1} {:>10.1} {:>9.2} {:>9.2} {:>9.2}",
            self.target,
            self.workload,
            self.concurrency,
            size,
            self.requests,
            self.errors,
            self.mib_per_sec,
            self.requests_per_sec,
            self.latency.p50_ms,
            self.latency.p99_ms,
            self.latency.p999_ms
        )
    }

    /// The table plus notes and error samples, for humans.
    pub fn to_text(&self) -> String {
        let mut s = format!("{}\n{}\n", Self::table_header(), self.table_row());
        for n in &self.notes {
            let _ = writeln!(s, "  note: {n}");
        }
        for e in &self.error_samples {
            let _ = writeln!(s, "  error: {e}");
        }
        if let Some(kib) = self.client_peak_rss_kib {
            let _ = writeln!(s, "  client peak RSS: {:.1} MiB", kib as f64 / 1024.0);
        }
        s
    }
}

/// Peak resident set size of this process (`VmHWM`), in KiB; `None` off Linux.
pub fn own_peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}
