//! The router: Flotilla's front door.
//!
//! Brief overview:
//! - [`cluster::Cluster`] keeps a snapshot of nodes and shard records from the metadata store
//!   (refreshed in the background; served from cache when the store is unreachable), places
//!   new keys with `shardmap::place` under compare-and-swap, and ejects failing nodes.
//! - [`proxy`] forwards each OCI request to the right node: reads to any live replica with
//!   failover, writes to the primary, manifest/tag writes synchronously to the live partner
//!   as well, upload sessions to the node that holds them (`<node>.<uuid>` in `Location`).
//!   Bodies stream both ways; only manifests (capped at 4 MiB) are collected.
//! - [`admin`] is the JSON admin API under `/admin/v1`.
//!
//! The router stores no blob bytes and keeps no state of its own besides caches.

pub mod admin;
pub mod auth;
pub mod cluster;
pub mod manifest_cache;
pub mod proxy;

use std::future::Future;
use std::num::NonZeroUsize;
use std::time::Duration;

use axum::routing::{any, get};
use axum::Router;

pub use cluster::Cluster;

#[derive(Clone, Debug)]
pub struct RouterConfig {
    pub meta_url: shardmap::MetaUrl,
    pub replication_factor: usize,
    pub shard_key_depth: NonZeroUsize,
    /// How often the node and shard snapshot is refreshed from the metadata store.
    pub refresh_interval: Duration,
    /// How long a node that failed a request is skipped before it is tried again.
    pub eject_for: Duration,
    /// Per-attempt timeout for reads forwarded to a node (headers, not the whole body).
    pub upstream_timeout: Duration,
    pub metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    /// Shared secret for the node-internal API (health probes).
    pub secret: Option<String>,
    /// How often every registered node is probed; a failed probe ejects it before any
    /// client request has to fail, a successful one lifts an ejection early.
    pub probe_interval: Duration,
    /// Bytes of manifests kept in memory (0 disables the cache; see `manifest_cache`).
    pub manifest_cache_bytes: u64,
    /// Longest a cached manifest is served without a newer epoch being seen.
    pub manifest_cache_ttl: Duration,
    /// Answer blob GETs with a 307 to a live replica instead of proxying the bytes.
    pub blob_redirect: bool,
    /// How long in-flight requests may take to finish once shutdown began.
    pub drain_timeout: Duration,
    /// The listener: TLS, connection cap, timeouts.
    pub serve: flotilla_serve::ServeConfig,
    /// Upload requests in flight per client (user, or peer address without auth).
    pub max_uploads_per_client: usize,
    /// Extra root certificates (PEM) trusted when calling nodes over `https://`.
    pub tls_ca: Option<std::path::PathBuf>,
    /// Who may do what (off unless a flag asks for it: the first `flotilla dev` stays open).
    pub auth: flotilla_auth::AuthConfig,
    /// The events outbox and its sinks (`--webhook`, `--events-dir`).
    pub events: Option<flotilla_events::OutboxConfig>,
}

impl RouterConfig {
    pub fn new(meta_url: shardmap::MetaUrl) -> Self {
        RouterConfig {
            meta_url,
            replication_factor: 2,
            shard_key_depth: shardmap::DEFAULT_KEY_DEPTH,
            refresh_interval: Duration::from_millis(500),
            eject_for: Duration::from_secs(5),
            upstream_timeout: Duration::from_secs(10),
            metrics: None,
            secret: None,
            probe_interval: Duration::from_secs(1),
            manifest_cache_bytes: 64 * 1024 * 1024,
            manifest_cache_ttl: Duration::from_secs(10),
            blob_redirect: false,
            drain_timeout: Duration::from_secs(30),
            serve: flotilla_serve::ServeConfig::new("router"),
            max_uploads_per_client: 16,
            tls_ca: None,
            auth: flotilla_auth::AuthConfig::default(),
            events: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    #[error("metadata store: {0}")]
    Meta(#[from] shardmap::StoreError),
    #[error("http client: {0}")]
    Client(#[from] reqwest::Error),
    #[error("serving HTTP: {0}")]
    Serve(#[from] flotilla_serve::ServeError),
    #[error("the listening socket: {0}")]
    Io(std::io::Error),
    #[error("{0}")]
    Ca(#[from] registry_client::tls::CaError),
    #[error("authentication: {0}")]
    Auth(#[from] flotilla_auth::AuthError),
    #[error("events: {0}")]
    Events(#[from] flotilla_events::EventsError),
    #[error("{0}")]
    Config(String),
}

/// The router's HTTP app, built apart from `run` so tests can drive it.
pub fn app(cluster: Cluster) -> Router {
    let uploads = flotilla_serve::limits::UploadLimiter::new(
        cluster.config().max_uploads_per_client,
        "router",
    )
    .with_user_of(auth::user_of);
    Router::new()
        .route("/v2", any(proxy::handle))
        .route("/v2/", any(proxy::handle))
        .route("/v2/{*rest}", any(proxy::handle))
        .nest("/admin/v1", admin::routes())
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(admin::readyz))
        .route("/metrics", get(admin::metrics_text))
        .route(auth::TOKEN_PATH, any(auth::token))
        .with_state(cluster.clone())
        // The limit holds whatever the route; authentication runs outside it and inserts
        // the user (`auth::Authorized`).
        .layer(axum::middleware::from_fn_with_state(
            uploads,
            flotilla_serve::limits::UploadLimiter::middleware,
        ))
        // Outside the limiter, so it counts users rather than addresses once they are known.
        .layer(axum::middleware::from_fn_with_state(cluster, auth::guard))
}

/// Serve until `shutdown` resolves; in-flight requests finish first.
/// What the router answers while it waits for the metadata store at start: alive, not
/// ready, and every registry request a 503 the client may retry.
fn starting_app() -> axum::Router {
    use axum::response::IntoResponse as _;
    axum::Router::new()
        .route("/healthz", axum::routing::get(|| async { "ok" }))
        .fallback(|| async {
            registry_client::ApiError::new(flotilla_core::ErrorCode::Unavailable)
                .message("the router is starting: the metadata store has not answered yet")
                .header(http::header::RETRY_AFTER, "1")
                .into_response()
        })
}

pub async fn run(
    listener: tokio::net::TcpListener,
    cfg: RouterConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RouterError> {
    flotilla_serve::preflight(&cfg.serve)?;
    // Until the metadata store has answered, the same socket answers 503 (never a hang in
    // the accept backlog): a second handle on it takes over once the cluster is open.
    let std_listener = listener.into_std().map_err(RouterError::Io)?;
    let main_listener = std_listener.try_clone().map_err(RouterError::Io)?;
    let starting = tokio::net::TcpListener::from_std(std_listener).map_err(RouterError::Io)?;
    let (started_tx, started_rx) = tokio::sync::oneshot::channel::<()>();
    let starting = tokio::spawn(flotilla_serve::serve(
        starting,
        starting_app(),
        cfg.serve.clone(),
        async move {
            let _ = started_rx.await;
        },
    ));
    let cluster = Cluster::open(cfg).await;
    let _ = started_tx.send(());
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), starting).await;
    let cluster = cluster?;
    let listener = tokio::net::TcpListener::from_std(main_listener).map_err(RouterError::Io)?;
    let bg = cluster.start_background();
    tracing::info!(addr = ?listener.local_addr().ok(), "router serving");
    match cluster.auth() {
        None => tracing::warn!(
            "authentication is off: anyone who reaches this router may push, delete and use the admin API (see --htpasswd, --token-key, --access)"
        ),
        Some(a) => tracing::info!(
            basic = a.config().htpasswd.is_some(),
            tokens = a.bearer_scheme(),
            issues_tokens = a.issues_tokens(),
            policy = a.config().access.is_some(),
            "authentication on"
        ),
    }
    // Graceful, but bounded: a client that never finishes (a stalled pull) must not keep
    // the router from exiting past the drain timeout.
    let (drain_tx, drain_rx) = tokio::sync::oneshot::channel::<()>();
    let serve = cluster.config().serve.clone();
    let server = flotilla_serve::serve(listener, app(cluster.clone()), serve, async move {
        shutdown.await;
        let _ = drain_tx.send(());
    });
    let drain_timeout = cluster.config().drain_timeout;
    let result = tokio::select! {
        r = server => r.map_err(RouterError::Serve),
        _ = async {
            if drain_rx.await.is_err() {
                // The server ended on its own; its branch answers.
                std::future::pending::<()>().await;
            }
            tokio::time::sleep(drain_timeout).await;
        } => {
            tracing::warn!(?drain_timeout, "drain timeout elapsed with requests still in flight");
            Ok(())
        }
    };
    bg.cancel();
    cluster.tasks().close();
    cluster.tasks().wait().await;
    tracing::info!("router stopped");
    result
}
