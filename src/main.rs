//! The `flotilla` binary: parses the command line once (`cli`), validates it into each
//! component's config (`config`) and calls that component's `run`. No logic lives here
//! beyond wiring.

mod cli;
mod config;

use std::net::SocketAddr;

use anyhow::Context;
use clap::Parser;

use config::{DevConfig, Run};

fn main() -> anyhow::Result<()> {
    // Logs on stderr: stdout is for what a command prints (a digest, a table).
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let cli = cli::Cli::parse();
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .context("installing the metrics recorder")?;
    let run = config::validate(&cli, &metrics)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    rt.block_on(async move {
        match run {
            Run::Dev(cfg) => dev(*cfg).await,
            Run::Router { listen, cfg } => {
                let listener = tokio::net::TcpListener::bind(listen)
                    .await
                    .with_context(|| format!("binding {listen}"))?;
                registry_router::run(listener, cfg, shutdown_signal()).await?;
                Ok(())
            }
            Run::Node { listen, cfg } => serve_node(listen, cfg).await,
            Run::AgentPull(cfg) => {
                let pulled = deploy_agent::pull(&cfg).await?;
                // stdout carries the digest alone, for scripts.
                println!("{}", pulled.digest);
                Ok(())
            }
            Run::Seeder {
                metrics_listen,
                cfg,
            } => {
                let Some(addr) = metrics_listen else {
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
async fn dev(cfg: DevConfig) -> anyhow::Result<()> {
    let DevConfig {
        listen,
        data,
        meta,
        nodes,
        seeder,
        router,
    } = cfg;
    std::fs::create_dir_all(&data).with_context(|| format!("creating {}", data.display()))?;
    let node_count = nodes.len();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let mut tasks = tokio::task::JoinSet::new();
    for cfg in nodes {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let stop = shutdown.clone();
        tasks.spawn(async move {
            registry_node::run(listener, cfg, async move { stop.cancelled().await })
                .await
                .map_err(anyhow::Error::from)
        });
    }
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
        if ready >= node_count {
            break;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "only {ready} of {node_count} nodes became ready within 60 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    let stop = shutdown.clone();
    tasks.spawn(async move {
        registry_router::run(listener, router, async move { stop.cancelled().await })
            .await
            .map_err(anyhow::Error::from)
    });
    tracing::info!(%listen, nodes = node_count, data = %data.display(), "flotilla dev: cluster starting");
    // A component that stops on its own is a failure of the whole dev cluster: exit non-zero.
    let failed = tokio::select! {
        _ = shutdown_signal() => None,
        Some(r) = tasks.join_next() => {
            tracing::error!(result = ?r, "a component stopped unexpectedly; shutting down");
            Some(match r {
                Ok(Err(e)) => e,
                Ok(Ok(())) => anyhow::anyhow!("a component stopped unexpectedly"),
                Err(e) => anyhow::anyhow!("a component panicked: {e}"),
            })
        }
    };
    shutdown.cancel();
    while let Some(r) = tasks.join_next().await {
        if let Ok(Err(e)) = r {
            tracing::warn!(error = %e, "component ended with an error");
        }
    }
    match failed {
        Some(e) => Err(e),
        None => Ok(()),
    }
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
