//! The `flotilla` binary: parses the command line once, builds each component's config and
//! calls that component's `run`. No logic lives here beyond wiring.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use flotilla_core::{NodeId, RackId};

#[derive(Parser, Debug)]
#[command(
    name = "flotilla",
    version,
    about = "A distributed, sharded OCI container registry"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run the embedded cluster in one process (today: one node on --listen).
    Dev {
        #[arg(long, default_value = "127.0.0.1:5000")]
        listen: SocketAddr,
        #[arg(long, default_value = "./flotilla-data")]
        data: PathBuf,
    },
    /// Run one registry node serving the OCI API.
    Node(NodeArgs),
}

#[derive(clap::Args, Debug)]
struct NodeArgs {
    #[arg(long)]
    id: NodeId,
    #[arg(long, default_value = "r1")]
    rack: RackId,
    #[arg(long, default_value = "127.0.0.1:5001")]
    listen: SocketAddr,
    #[arg(long)]
    data: PathBuf,
    /// Metadata store URL (file:///DIR, consul://HOST:PORT, etcd://HOST:PORT,...).
    #[arg(long)]
    meta: Option<String>,
    /// Object store URL (s3://BUCKET/PREFIX?endpoint=..., file:///DIR).
    #[arg(long)]
    store: Option<String>,
    /// Idle upload sessions older than this many seconds are purged.
    #[arg(long, default_value_t = 3600)]
    upload_max_age_secs: u64,
    /// Seconds to wait for in-flight requests on shutdown.
    #[arg(long, default_value_t = 30)]
    drain_secs: u64,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .context("installing the metrics recorder")?;
    rt.block_on(async move {
        match cli.cmd {
            Cmd::Dev { listen, data } => {
                let cfg =
                    registry_node::NodeConfig::new("n1".parse()?, "r1".parse()?, data.join("n1"));
                serve_node(listen, cfg).await
            }
            Cmd::Node(a) => {
                if a.meta.is_some() {
                    tracing::warn!("--meta is accepted but not used yet");
                }
                let mut cfg = registry_node::NodeConfig::new(a.id, a.rack, a.data);
                cfg.store_url = a.store;
                cfg.metrics = Some(metrics);
                cfg.upload_max_age = Duration::from_secs(a.upload_max_age_secs);
                cfg.upload_purge_interval = cfg.upload_max_age.min(Duration::from_secs(60));
                cfg.drain_timeout = Duration::from_secs(a.drain_secs);
                serve_node(a.listen, cfg).await
            }
        }
    })
}

async fn serve_node(listen: SocketAddr, cfg: registry_node::NodeConfig) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    registry_node::run(listener, cfg, shutdown_signal()).await?;
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
    tracing::info!("shutdown signal received");
}
