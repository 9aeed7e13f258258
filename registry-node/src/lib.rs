//! A Flotilla registry node: the OCI Distribution v1.1 API over a crash-safe local
//! content-addressed store.
//!
//! Brief overview, each layer knowing only the one below it:
//! - [`http`]: parses every `/v2/...` request into a typed [`http::route::OciRoute`] once,
//!   dispatches to one module per resource, and renders every failure as the spec's JSON
//!   error body ([`http::error::ApiError`]).
//! - [`service::NodeService`]: the operations (push a blob, put a manifest, list tags ...);
//!   a cheap `Clone` handle shared by all handlers.
//! - [`uploads`]: upload sessions in progress, hashed as the bytes stream in.
//! - [`store::LocalStore`]: the on-disk layout from `flotilla_core::layout`, with the
//!   write-temp/fsync/rename discipline that makes a `kill -9` at any moment safe.
//!
//! [`run`] serves a bound listener until the shutdown future resolves, then drains.

mod anti_entropy;
pub mod config;
mod disk;
mod durable;
mod gc;
mod http;
mod identity;
mod in_sync;
mod listing;
pub mod manifest;
mod membership;
mod read;
mod scrub;
mod seed;
mod service;
mod store;
mod tasks;
mod write;

use std::future::Future;

pub use config::NodeConfig;

/// The request-header grammars the node parses, public for the fuzz targets (`fuzz/`) and
/// the corpus replay that runs them in CI.
pub mod headers {
    pub use crate::http::blobs::{parse_range, Unsatisfiable};
    pub use crate::http::uploads::parse_content_range;
}
use service::NodeService;

/// Errors that stop a node from starting or serving.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("data directory {path}: {source}")]
    DataDir {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("data directory belongs to node {found}, not {expected}; refusing to start")]
    IdentityMismatch { expected: String, found: String },
    #[error("object store: {0}")]
    Store(String),
    #[error("metadata store: {0}")]
    Meta(#[from] shardmap::StoreError),
    #[error("serving HTTP: {0}")]
    Serve(#[from] flotilla_serve::ServeError),
}

/// Serve the OCI API on `listener` until `shutdown` resolves; in-flight requests are allowed
/// to finish (bounded by the config's drain timeout) and background tasks are stopped.
pub async fn run(
    listener: tokio::net::TcpListener,
    cfg: NodeConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), NodeError> {
    flotilla_serve::preflight(&cfg.serve)?;
    let node = NodeService::open(cfg.clone()).await?;
    node.check_disk().await;
    let app = http::app(node.clone());
    let tasks = node.start_background();
    let addr = listener.local_addr().ok();
    tracing::info!(node = %cfg.id, ?addr, "registry node serving");

    // One shard-map client for the background loops that need the map and object storage:
    // the donor's sweep (`gc`) and the rejoin of lagging keys (`in_sync`; without a store
    // there is nothing to catch up from).
    let gc_cancel = tokio_util::sync::CancellationToken::new();
    let (gc_task, rejoin_task) = match (&cfg.meta_url, &cfg.store_url) {
        (Some(url), Some(_)) => {
            let map = shardmap::ShardMap::new(
                shardmap::open(url)?,
                shardmap::Keyspace::new(shardmap::DEFAULT_PREFIX),
            );
            let gc = (!cfg.gc_interval.is_zero())
                .then(|| tokio::spawn(gc::gc_loop(node.clone(), map.clone(), gc_cancel.clone())));
            let rejoin = tokio::spawn(in_sync::rejoin_loop(node.clone(), map, gc_cancel.clone()));
            (gc, Some(rejoin))
        }
        _ => (None, None),
    };
    let member_cancel = tokio_util::sync::CancellationToken::new();
    let member_task = match &cfg.meta_url {
        Some(url) => {
            let advertise = cfg
                .advertise
                .clone()
                .or_else(|| {
                    let scheme = if cfg.serve.tls.is_some() {
                        "https"
                    } else {
                        "http"
                    };
                    addr.map(|a| format!("{scheme}://{a}"))
                })
                .unwrap_or_default();
            let m = membership::Membership::open(&cfg, url, advertise)?;
            Some(tokio::spawn(m.run(node.clone(), member_cancel.clone())))
        }
        None => None,
    };

    let (drain_tx, drain_rx) = tokio::sync::oneshot::channel::<()>();
    let server = flotilla_serve::serve(listener, app, cfg.serve.clone(), async move {
        shutdown.await;
        // Leave the shard map first (draining, then deregistered) so routers stop sending
        // new requests here before we stop accepting them.
        member_cancel.cancel();
        if let Some(t) = member_task {
            let _ = tokio::time::timeout(std::time::Duration::from_secs(5), t).await;
        }
        let _ = drain_tx.send(());
    });
    let drain_timeout = cfg.drain_timeout;
    let result = tokio::select! {
        r = server => r.map_err(NodeError::Serve),
        _ = async {
            // Only starts counting once shutdown began; bounds how long draining may take.
            let _ = drain_rx.await;
            tokio::time::sleep(drain_timeout).await;
        } => {
            tracing::warn!("drain timeout elapsed with requests still in flight");
            Ok(())
        }
    };
    gc_cancel.cancel();
    if let Some(t) = gc_task {
        let _ = t.await;
    }
    if let Some(t) = rejoin_task {
        let _ = t.await;
    }
    tasks.shutdown().await;
    tracing::info!(node = %cfg.id, "registry node stopped");
    result
}
