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
    /// Run the embedded cluster in one process: nodes in racks, the router on --listen, the
    /// seeder, the embedded metadata store and a file:// object store under --data.
    Dev {
        #[arg(long, default_value = "127.0.0.1:5000")]
        listen: SocketAddr,
        #[arg(long, default_value = "./flotilla-data")]
        data: PathBuf,
        /// Number of nodes.
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        /// Rack of each node in order, comma-separated (default: n1,n2 in r1; n3 in r2).
        #[arg(long, value_delimiter = ',', default_value = "r1,r1,r2")]
        racks: Vec<RackId>,
        /// Blob GETs answered with a 307 to a live replica (`router --blob-redirect`) instead
        /// of proxied: `auto` does so when --listen is a loopback address, since every client
        /// can then reach the nodes (which listen on loopback too).
        #[arg(long, value_enum, default_value_t = Redirect::Auto)]
        blob_redirect: Redirect,
    },
    /// Run one registry node serving the OCI API.
    Node(NodeArgs),
    /// Run the router: the front door mapping each service/mode to its replica pair.
    Router {
        #[arg(long, default_value = "127.0.0.1:5000")]
        listen: SocketAddr,
        /// Metadata store URL (file:///DIR, consul://HOST:PORT, etcd://HOST:PORT,...).
        #[arg(long)]
        meta: String,
        /// Replication factor for newly placed keys.
        #[arg(long, default_value_t = 2)]
        replicas: usize,
        /// Shared secret for the node-internal API.
        #[arg(long, env = "FLOTILLA_SECRET", hide_env_values = true)]
        secret: Option<String>,
        /// MiB of manifests answered from the router's memory (0 disables the cache).
        #[arg(long, default_value_t = 64)]
        manifest_cache_mib: u64,
        /// Longest a cached manifest is served when no newer shard epoch has been seen (a
        /// bound for writes this router cannot observe, e.g. while the metadata store is away).
        #[arg(long, default_value_t = 10)]
        manifest_cache_ttl_secs: u64,
        /// Answer blob GETs with a 307 to a live replica (probed first) instead of proxying
        /// the bytes: the router leaves the data path, clients must reach the nodes' URLs.
        #[arg(long)]
        blob_redirect: bool,
    },
    /// Run a seeder: reseeds empty nodes from object storage, replaces dead nodes, rebalances.
    /// Any number may run; one (leader-elected through the metadata store) acts.
    Seeder(SeederArgs),
}

/// `flotilla dev --blob-redirect`.
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum Redirect {
    Auto,
    Always,
    Never,
}

#[derive(clap::Args, Debug)]
struct SeederArgs {
    /// Metadata store URL (file:///DIR, consul://HOST:PORT, etcd://HOST:PORT,...).
    #[arg(long)]
    meta: String,
    /// Object store URL, the one the nodes use (s3://BUCKET/PREFIX?endpoint=..., file:///DIR).
    #[arg(long)]
    store: String,
    /// Shared secret for the node-internal API.
    #[arg(long, env = "FLOTILLA_SECRET", hide_env_values = true)]
    secret: Option<String>,
    /// Replace a node missing from the map this many seconds, shard by shard.
    #[arg(long, default_value_t = 600)]
    replace_after_secs: u64,
    /// This instance's name (default: random).
    #[arg(long)]
    id: Option<String>,
    /// Repositories seeded in parallel per node.
    #[arg(long, default_value_t = 4)]
    seed_concurrency: usize,
    /// Pace of each seeding job in bytes per second (0 = unpaced).
    #[arg(long, default_value_t = 0)]
    seed_bytes_per_sec: u64,
    /// Replica moves in flight at once.
    #[arg(long, default_value_t = 2)]
    max_moves: usize,
    /// Minimum seconds between starting two rebalance moves.
    #[arg(long, default_value_t = 2)]
    rebalance_interval_secs: u64,
    /// Serve `/metrics` (Prometheus) and `/healthz` on this address.
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
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
    /// URL routers use to reach this node (default: http://LISTEN).
    #[arg(long)]
    advertise: Option<String>,
    /// Shared secret required on the node-internal API (`/internal/v1`).
    #[arg(long, env = "FLOTILLA_SECRET", hide_env_values = true)]
    secret: Option<String>,
    /// Idle upload sessions older than this many seconds are purged.
    #[arg(long, default_value_t = 3600)]
    upload_max_age_secs: u64,
    /// Seconds to wait for in-flight requests on shutdown.
    #[arg(long, default_value_t = 30)]
    drain_secs: u64,
    /// Scrubber pace: stored blob bytes re-hashed per second (0 disables scrubbing).
    #[arg(long, default_value_t = 8 * 1024 * 1024)]
    scrub_bytes_per_sec: u64,
    /// Seconds between two scrub passes.
    #[arg(long, default_value_t = 60)]
    scrub_interval_secs: u64,
    /// Seconds between two sweeps for data of shards moved away (0 disables; needs --meta
    /// and --store).
    #[arg(long, default_value_t = 60)]
    gc_interval_secs: u64,
    /// Seconds a repository stays orphaned (and an unlinked blob unmodified) before deletion.
    #[arg(long, default_value_t = 600)]
    gc_grace_secs: u64,
    /// Quarantined blobs older than this many seconds are deleted.
    #[arg(long, default_value_t = 7 * 24 * 3600)]
    quarantine_retention_secs: u64,
    /// The quarantine is trimmed, oldest first, to at most this many bytes.
    #[arg(long, default_value_t = 1 << 30)]
    quarantine_max_bytes: u64,
    /// Seconds a successful upload or HEAD proves object storage holds an object; a push
    /// that depends on an older proof checks again (0: always check).
    #[arg(long, default_value_t = 60)]
    remote_confirm_secs: u64,
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
            Cmd::Dev {
                listen,
                data,
                nodes,
                racks,
                blob_redirect,
            } => {
                let redirect = match blob_redirect {
                    Redirect::Auto => listen.ip().is_loopback(),
                    Redirect::Always => true,
                    Redirect::Never => false,
                };
                dev(listen, data, nodes, racks, redirect, metrics).await
            }
            Cmd::Router {
                listen,
                meta,
                replicas,
                secret,
                manifest_cache_mib,
                manifest_cache_ttl_secs,
                blob_redirect,
            } => {
                let mut cfg = registry_router::RouterConfig::new(meta);
                cfg.replication_factor = replicas;
                cfg.secret = secret;
                cfg.manifest_cache_bytes = manifest_cache_mib * 1024 * 1024;
                cfg.manifest_cache_ttl = Duration::from_secs(manifest_cache_ttl_secs);
                cfg.blob_redirect = blob_redirect;
                cfg.metrics = Some(metrics);
                let listener = tokio::net::TcpListener::bind(listen)
                    .await
                    .with_context(|| format!("binding {listen}"))?;
                registry_router::run(listener, cfg, shutdown_signal()).await?;
                Ok(())
            }
            Cmd::Node(a) => {
                let mut cfg = registry_node::NodeConfig::new(a.id, a.rack, a.data);
                cfg.store_url = a.store;
                cfg.meta_url = a.meta;
                cfg.advertise = a.advertise;
                cfg.secret = a.secret;
                cfg.metrics = Some(metrics);
                cfg.upload_max_age = Duration::from_secs(a.upload_max_age_secs);
                cfg.upload_purge_interval = cfg.upload_max_age.min(Duration::from_secs(60));
                cfg.drain_timeout = Duration::from_secs(a.drain_secs);
                cfg.scrub_bytes_per_sec = a.scrub_bytes_per_sec;
                cfg.scrub_interval = Duration::from_secs(a.scrub_interval_secs);
                cfg.gc_interval = Duration::from_secs(a.gc_interval_secs);
                cfg.gc_grace = Duration::from_secs(a.gc_grace_secs);
                cfg.quarantine_retention = Duration::from_secs(a.quarantine_retention_secs);
                cfg.quarantine_max_bytes = a.quarantine_max_bytes;
                cfg.remote_confirm_ttl = Duration::from_secs(a.remote_confirm_secs);
                serve_node(a.listen, cfg).await
            }
            Cmd::Seeder(a) => {
                let mut cfg = s3_seeder::SeederConfig::new(a.meta, a.store);
                if let Some(id) = a.id {
                    cfg.id = id;
                }
                cfg.secret = a.secret;
                cfg.replace_after = Duration::from_secs(a.replace_after_secs);
                cfg.seed_concurrency = a.seed_concurrency;
                cfg.seed_bytes_per_sec = a.seed_bytes_per_sec;
                cfg.max_moves = a.max_moves;
                cfg.rebalance_interval = Duration::from_secs(a.rebalance_interval_secs);
                let Some(addr) = a.metrics_listen else {
                    s3_seeder::run(cfg, shutdown_signal()).await?;
                    return Ok(());
                };
                // The seeder has no HTTP API of its own; this small listener exposes its
                // metrics and stops with it.
                let listener = tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("binding {addr}"))?;
                let app = axum::Router::new()
                    .route(
                        "/metrics",
                        axum::routing::get(move || {
                            let h = metrics.clone();
                            async move { h.render() }
                        }),
                    )
                    .route("/healthz", axum::routing::get(|| async { "ok" }));
                let stop = tokio_util::sync::CancellationToken::new();
                let server = axum::serve(listener, app)
                    .with_graceful_shutdown(stop.clone().cancelled_owned());
                let seeder = async {
                    let r = s3_seeder::run(cfg, shutdown_signal()).await;
                    stop.cancel();
                    r
                };
                let (seeded, served) = tokio::join!(seeder, server);
                seeded?;
                served?;
                Ok(())
            }
        }
    })
}

/// `flotilla dev`: every component in one process, sharing one shutdown signal.
async fn dev(
    listen: SocketAddr,
    data: PathBuf,
    nodes: usize,
    racks: Vec<RackId>,
    blob_redirect: bool,
    metrics: metrics_exporter_prometheus::PrometheusHandle,
) -> anyhow::Result<()> {
    anyhow::ensure!(nodes >= 1, "--nodes must be at least 1");
    std::fs::create_dir_all(&data).with_context(|| format!("creating {}", data.display()))?;
    let data = std::path::absolute(&data)?;
    let meta = format!("file://{}", data.join("meta").display());
    let store = format!("file://{}", data.join("objects").display());
    let shutdown = tokio_util::sync::CancellationToken::new();
    let mut tasks = tokio::task::JoinSet::new();
    // One process: a fresh random secret per run guards the node-internal API.
    let secret = std::env::var("FLOTILLA_SECRET")
        .unwrap_or_else(|_| uuid::Uuid::new_v4().simple().to_string());
    for i in 0..nodes {
        let id: NodeId = format!("n{}", i + 1).parse()?;
        let rack = racks.get(i).cloned().unwrap_or_else(|| {
            racks
                .last()
                .cloned()
                .unwrap_or_else(|| "r1".parse().expect("valid rack"))
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let mut cfg = registry_node::NodeConfig::new(id.clone(), rack, data.join(id.as_str()));
        cfg.store_url = Some(store.clone());
        cfg.meta_url = Some(meta.clone());
        cfg.metrics = Some(metrics.clone());
        cfg.secret = Some(secret.clone());
        let stop = shutdown.clone();
        tasks.spawn(async move {
            registry_node::run(listener, cfg, async move { stop.cancelled().await })
                .await
                .map_err(anyhow::Error::from)
        });
    }
    let mut seeder = s3_seeder::SeederConfig::new(meta.clone(), store.clone());
    seeder.id = "dev-seeder".to_owned();
    seeder.secret = Some(secret.clone());
    let stop = shutdown.clone();
    tasks.spawn(async move {
        s3_seeder::run(seeder, async move { stop.cancelled().await })
            .await
            .map_err(anyhow::Error::from)
    });
    // Open the front door only once every node is registered and ready, so the first push
    // after `flotilla dev` prints its address can always be placed.
    let map = shardmap::ShardMap::new(
        shardmap::open(&meta)?,
        shardmap::Keyspace::new(shardmap::DEFAULT_PREFIX),
    );
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let ready = map
            .list_nodes()
            .await
            .map(|n| {
                n.iter()
                    .filter(|(r, _)| r.state == shardmap::NodeState::Ready)
                    .count()
            })
            .unwrap_or(0);
        if ready >= nodes {
            break;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "only {ready} of {nodes} nodes became ready within 60 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let mut cfg = registry_router::RouterConfig::new(meta);
    cfg.metrics = Some(metrics);
    cfg.secret = Some(secret);
    cfg.blob_redirect = blob_redirect;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    let stop = shutdown.clone();
    tasks.spawn(async move {
        registry_router::run(listener, cfg, async move { stop.cancelled().await })
            .await
            .map_err(anyhow::Error::from)
    });
    tracing::info!(%listen, nodes, data = %data.display(), "flotilla dev: cluster starting");
    tokio::select! {
        _ = shutdown_signal() => {}
        Some(r) = tasks.join_next() => {
            tracing::error!(result = ?r, "a component stopped unexpectedly; shutting down");
        }
    }
    shutdown.cancel();
    while let Some(r) = tasks.join_next().await {
        if let Ok(Err(e)) = r {
            tracing::warn!(error = %e, "component ended with an error");
        }
    }
    Ok(())
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
