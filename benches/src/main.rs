//! `flotilla-bench`: `run` drives a registry, `limits` measures the machine.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use flotilla_bench::limits::{measure, LimitsConfig};
use flotilla_bench::{parse_size, run_workload, BenchArgs};

#[derive(Parser, Debug)]
#[command(
    name = "flotilla-bench",
    version,
    about = "Benchmark any OCI registry, and this machine's limits"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run one workload against a registry: `flotilla-bench run URL WORKLOAD [options]`.
    Run(BenchArgs),
    /// Measure sha256, disk write + fdatasync and loopback TCP throughput.
    Limits(LimitsArgs),
}

#[derive(clap::Args, Debug)]
struct LimitsArgs {
    /// Directory for the disk test (put it on the registries' data filesystem).
    #[arg(long, default_value = ".")]
    dir: PathBuf,
    #[arg(long, default_value = "1GiB", value_parser = parse_size)]
    sha_bytes: u64,
    #[arg(long, default_value = "1GiB", value_parser = parse_size)]
    disk_bytes: u64,
    #[arg(long, default_value = "2GiB", value_parser = parse_size)]
    tcp_bytes: u64,
    /// Also write the result as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

fn write_json(path: &PathBuf, value: &impl serde::Serialize) -> anyhow::Result<()> {
    let s = serde_json::to_string_pretty(value)?;
    std::fs::write(path, s + "\n").with_context(|| format!("writing {}", path.display()))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Run(args) => {
            let report = run_workload(args.to_config()).await?;
            print!("{}", report.to_text());
            if let Some(p) = &args.json {
                write_json(p, &report)?;
            }
        }
        Cmd::Limits(a) => {
            let mut cfg = LimitsConfig::new(&a.dir);
            cfg.sha_bytes = a.sha_bytes;
            cfg.disk_bytes = a.disk_bytes;
            cfg.tcp_bytes = a.tcp_bytes;
            let report = measure(&cfg).await?;
            print!("{}", report.to_text());
            if let Some(p) = &a.json {
                write_json(p, &report)?;
            }
        }
    }
    Ok(())
}
