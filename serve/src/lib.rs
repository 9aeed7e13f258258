//! The serving layer routers and nodes share: a bound listener, through (optional) TLS and
//! hyper's HTTP/1 connection, to an axum app, with the limits a hostile client meets before
//! any handler runs.
//!
//! Brief overview:
//! - [`serve`] accepts until shutdown, then stops accepting and lets every connection finish
//!   its in-flight requests (as `axum::serve` with graceful shutdown did): the callers bound
//!   the drain themselves.
//! - Per connection: the TLS handshake and every request head must arrive within
//!   [`ServeConfig::header_read_timeout`]; a connection with no request in flight for
//!   [`ServeConfig::idle_timeout`] is closed. Heads over [`ServeConfig::max_header_bytes`]
//!   get 431 with the OCI JSON body.
//! - At most [`ServeConfig::max_connections`] are open (default: half the open-file limit,
//!   since each proxied request may hold an upstream socket too). At the cap the oldest idle
//!   connection is evicted for the newcomer (`conns`); if every connection is busy the
//!   newcomer gets 429 with `Retry-After`. The server never stops answering because it ran
//!   out of file descriptors, and says when it is at its cap.
//! - [`limits`]: request-level limits a server opts into (concurrent uploads per client).
//!
//! Metrics (labels bounded): `flotilla_connections_open{role}`,
//! `flotilla_connections_rejected_total{role,reason}`,
//! `flotilla_connection_timeouts_total{role,kind}`, `flotilla_requests_rejected_total{role,reason}`,
//! `flotilla_accept_errors_total{role}`, `flotilla_tls_reloads_total{result}`.

mod conns;
pub mod limits;
mod tls;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::response::{IntoResponse, Response};
use axum::Router;
use flotilla_core::ErrorCode;
use http::StatusCode;
use hyper_util::rt::{TokioIo, TokioTimer};
use registry_client::ApiError;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

pub use tls::{TlsError, TlsFiles};

/// Seconds a client told "too many requests" is asked to wait.
pub const RETRY_AFTER_SECS: u64 = 1;

/// How long an evicted or idle connection may take to finish writing before it is dropped.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// hyper's own bound on a request head (its read buffer). Heads between
/// [`ServeConfig::max_header_bytes`] and this get our 431 with a JSON body; larger ones get
/// hyper's bare 431 and the connection closed.
const HYPER_MAX_HEAD: usize = 256 * 1024;

/// How a listener serves; every field already validated (`src/config.rs`).
#[derive(Clone, Debug)]
pub struct ServeConfig {
    /// `router` or `node`: the `role` label of the metrics and the logs' context.
    pub role: &'static str,
    /// The TLS handshake and each request head (first byte to last) must arrive within this.
    pub header_read_timeout: Duration,
    /// A connection with no request in flight this long is closed.
    pub idle_timeout: Duration,
    /// Open connections; `None` picks half the process's open-file limit.
    pub max_connections: Option<usize>,
    /// Largest request head (request line and headers) answered normally.
    pub max_header_bytes: usize,
    /// Serve HTTPS with this certificate (reloaded on SIGHUP or change).
    pub tls: Option<TlsFiles>,
}

impl ServeConfig {
    pub fn new(role: &'static str) -> Self {
        ServeConfig {
            role,
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_connections: None,
            max_header_bytes: 64 * 1024,
            tls: None,
        }
    }

    /// The connection cap this config resolves to in this process.
    pub fn connection_cap(&self) -> usize {
        self.max_connections.unwrap_or_else(default_cap)
    }
}

/// Half the soft open-file limit (at least 16): every proxied request may hold an upstream
/// socket besides the client's, and the process needs descriptors for files and stores.
fn default_cap() -> usize {
    let lim = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    let soft = lim.current.unwrap_or(1 << 16).min(1 << 20) as usize;
    (soft / 2).max(16)
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("TLS: {0}")]
    Tls(#[from] TlsError),
}

/// Everything a connection task needs, shared.
#[derive(Debug)]
struct Shared {
    cfg: ServeConfig,
    registry: conns::Registry,
    stop: CancellationToken,
    /// Milliseconds since `epoch` of the last "at connection cap" log line (one per 10 s).
    last_cap_log: AtomicU64,
    epoch: Instant,
}

impl Shared {
    fn log_at_cap(&self, what: &'static str) {
        let now = self.epoch.elapsed().as_millis() as u64 + 10_000;
        let last = self.last_cap_log.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= 10_000
            && self
                .last_cap_log
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(
                role = self.cfg.role,
                cap = self.registry.cap(),
                open = self.registry.len(),
                what,
                "at the connection cap (--max-connections)"
            );
        }
    }
}

/// Load the TLS files once, so a server fails on a bad certificate before it opens its
/// data or its stores (`serve` loads them again, as they may change in between).
pub fn preflight(cfg: &ServeConfig) -> Result<(), ServeError> {
    if let Some(files) = &cfg.tls {
        tls::load(files)?;
    }
    Ok(())
}

/// Serve `app` on `listener` until `shutdown` resolves, then stop accepting and wait for
/// every open connection to finish its in-flight requests.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    cfg: ServeConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let tls = cfg.tls.as_ref().map(tls::Tls::new).transpose()?;
    let cap = cfg.connection_cap();
    let role = cfg.role;
    tracing::info!(
        role,
        max_connections = cap,
        tls = tls.is_some(),
        header_read_timeout_ms = cfg.header_read_timeout.as_millis() as u64,
        idle_timeout_ms = cfg.idle_timeout.as_millis() as u64,
        "serving"
    );
    let shared = Arc::new(Shared {
        registry: conns::Registry::new(cap),
        cfg,
        stop: CancellationToken::new(),
        last_cap_log: AtomicU64::new(0),
        epoch: Instant::now(),
    });
    let tracker = TaskTracker::new();
    if let Some(t) = &tls {
        tracker.spawn(t.clone().watch(shared.stop.clone()));
    }
    let stop = shared.stop.clone();
    tokio::spawn(async move {
        shutdown.await;
        stop.cancel();
    });
    loop {
        let (stream, peer) = tokio::select! {
            _ = shared.stop.cancelled() => break,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    accept_error(role, e).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let admit = shared.registry.admit();
        let slot = match admit {
            conns::Admit::Open(s) => s,
            conns::Admit::Evicted(s) => {
                metrics::counter!("flotilla_connections_rejected_total", "role" => role, "reason" => "evicted_idle").increment(1);
                shared.log_at_cap("closing the longest-idle connection");
                s
            }
            conns::Admit::Full => {
                metrics::counter!("flotilla_connections_rejected_total", "role" => role, "reason" => "overloaded").increment(1);
                shared.log_at_cap("every connection busy; answering 429");
                tracker.spawn(refuse(shared.clone(), tls.clone(), stream));
                continue;
            }
        };
        metrics::gauge!("flotilla_connections_open", "role" => role)
            .set(shared.registry.len() as f64);
        let shared = shared.clone();
        let app = app.clone();
        let tls = tls.clone();
        tracker.spawn(async move {
            connection(&shared, tls, stream, peer, &slot, app).await;
            shared.registry.remove(&slot);
            metrics::gauge!("flotilla_connections_open", "role" => shared.cfg.role)
                .set(shared.registry.len() as f64);
        });
    }
    drop(listener);
    tracker.close();
    tracker.wait().await;
    Ok(())
}

/// An accept that failed: per-connection errors (the peer gave up) are ignored; anything
/// else (descriptors exhausted) is logged and counted and the loop pauses briefly instead
/// of spinning.
async fn accept_error(role: &'static str, e: std::io::Error) {
    use std::io::ErrorKind::*;
    if matches!(
        e.kind(),
        ConnectionAborted | ConnectionReset | ConnectionRefused | Interrupted
    ) {
        return;
    }
    metrics::counter!("flotilla_accept_errors_total", "role" => role).increment(1);
    tracing::error!(role, error = %e, "accept failed (open-file limit?); pausing 50 ms");
    tokio::time::sleep(Duration::from_millis(50)).await;
}

fn http1(cfg: &ServeConfig) -> hyper::server::conn::http1::Builder {
    let mut b = hyper::server::conn::http1::Builder::new();
    // hyper's own header timer would start whenever a kept-alive connection waits for its
    // next request, making the idle timeout moot; `drive` times heads from their first byte.
    b.timer(TokioTimer::new())
        .header_read_timeout(None)
        .max_buf_size(HYPER_MAX_HEAD.max(cfg.max_header_bytes + 8192))
        // Our own check (in `guarded`) answers heads with too many headers with the JSON
        // body; hyper's bound is only the backstop.
        .max_headers(1000);
    b
}

/// The TLS handshake, bounded by the header read timeout: a client that opens a socket
/// and never says hello must not hold it.
async fn handshake(
    shared: &Shared,
    tls: &tls::Tls,
    stream: tokio::net::TcpStream,
) -> Option<tokio_rustls::server::TlsStream<tokio::net::TcpStream>> {
    let role = shared.cfg.role;
    tokio::select! {
        r = tokio::time::timeout(shared.cfg.header_read_timeout, tls.acceptor.accept(stream)) => match r {
            Ok(Ok(s)) => Some(s),
            Ok(Err(e)) => {
                tracing::debug!(role, error = %e, "TLS handshake failed");
                None
            }
            Err(_) => {
                metrics::counter!("flotilla_connection_timeouts_total", "role" => role, "kind" => "tls_handshake").increment(1);
                None
            }
        },
        _ = shared.stop.cancelled() => None,
    }
}

/// Serve one connection until it closes, is idle too long, is evicted, or the server stops.
async fn connection(
    shared: &Arc<Shared>,
    tls: Option<tls::Tls>,
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    slot: &Arc<conns::Slot>,
    app: Router,
) {
    match tls {
        Some(t) => {
            let evicted = slot.evicted.clone();
            let s = tokio::select! {
                s = handshake(shared, &t, stream) => s,
                _ = evicted.cancelled() => None,
            };
            if let Some(s) = s {
                drive(shared, s, peer, slot, app).await;
            }
        }
        None => drive(shared, stream, peer, slot, app).await,
    }
}

async fn drive<IO>(
    shared: &Arc<Shared>,
    io: IO,
    peer: SocketAddr,
    slot: &Arc<conns::Slot>,
    app: Router,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let role = shared.cfg.role;
    let max_head = shared.cfg.max_header_bytes;
    let svc_slot = slot.clone();
    let svc = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
        let busy = svc_slot.begin();
        let app = app.clone();
        async move {
            let resp = guarded(app, req, peer, role, max_head).await;
            Ok::<_, std::convert::Infallible>(resp.map(|b| {
                Body::new(Tracked {
                    inner: b,
                    _busy: busy,
                })
            }))
        }
    });
    let builder = http1(&shared.cfg);
    let io = Watched {
        io,
        slot: slot.clone(),
    };
    let conn = builder.serve_connection(TokioIo::new(io), svc);
    tokio::pin!(conn);
    let idle_timeout = shared.cfg.idle_timeout;
    let header_timeout = shared.cfg.header_read_timeout;
    let mut tick = tokio::time::interval(
        (idle_timeout.min(header_timeout) / 4)
            .clamp(Duration::from_millis(50), Duration::from_secs(1)),
    );
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Set once the connection was asked to close: shutdown waits for in-flight requests
    // (the drain); eviction and idleness allow only `CLOSE_GRACE`.
    let mut closing = false;
    let mut hard_deadline: Option<tokio::time::Instant> = None;
    loop {
        let dl = hard_deadline;
        let deadline = async move {
            match dl {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(role, %peer, error = %e, "connection ended with an error");
                }
                return;
            }
            _ = shared.stop.cancelled(), if !closing => {
                closing = true;
                conn.as_mut().graceful_shutdown();
            }
            _ = slot.evicted.cancelled(), if hard_deadline.is_none() => {
                closing = true;
                conn.as_mut().graceful_shutdown();
                hard_deadline = Some(tokio::time::Instant::now() + CLOSE_GRACE);
            }
            _ = tick.tick(), if hard_deadline.is_none() => {
                if slot.head_pending_for().is_some_and(|d| d >= header_timeout) {
                    // Mid-head: no response can be in progress, so nothing is cut.
                    metrics::counter!("flotilla_connection_timeouts_total", "role" => role, "kind" => "header_read").increment(1);
                    tracing::debug!(role, %peer, "request head not received within the header read timeout; closed");
                    return;
                }
                if slot.head_pending_for().is_none() && slot.idle_for() >= idle_timeout {
                    metrics::counter!("flotilla_connection_timeouts_total", "role" => role, "kind" => "idle").increment(1);
                    closing = true;
                    conn.as_mut().graceful_shutdown();
                    hard_deadline = Some(tokio::time::Instant::now() + CLOSE_GRACE);
                }
            }
            _ = deadline => return,
        }
    }
}

/// The checks every request passes before the app sees it, and the peer address handlers
/// (and the upload limiter) read through `ConnectInfo`.
async fn guarded(
    app: Router,
    req: http::Request<hyper::body::Incoming>,
    peer: SocketAddr,
    role: &'static str,
    max_head: usize,
) -> Response {
    let (mut parts, body) = req.into_parts();
    let head = head_bytes(&parts);
    if head > max_head || parts.headers.len() > 100 {
        metrics::counter!("flotilla_requests_rejected_total", "role" => role, "reason" => "header_too_large").increment(1);
        let mut r = ApiError::new(ErrorCode::SizeInvalid)
            .with_status(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE)
            .message(format!(
                "request head of {head} bytes in {} headers exceeds the limit of {max_head} bytes in 100 headers",
                parts.headers.len()
            ))
            .into_response();
        // The rest of what the client sends is not worth reading.
        r.headers_mut().insert(
            http::header::CONNECTION,
            http::HeaderValue::from_static("close"),
        );
        return r;
    }
    parts.extensions.insert(ConnectInfo(peer));
    let req = http::Request::from_parts(parts, Body::new(body));
    match app.oneshot(req).await {
        Ok(r) => r,
        Err(never) => match never {},
    }
}

/// The request line and headers as sent, near enough (names, values, separators).
fn head_bytes(parts: &http::request::Parts) -> usize {
    let line = parts.method.as_str().len() + parts.uri.to_string().len() + 12;
    parts
        .headers
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 4)
        .sum::<usize>()
        + line
}

/// A 429 with `Retry-After` on a connection the server has no room for, then close: the
/// client is told, not left hanging in the accept queue.
async fn refuse(shared: Arc<Shared>, tls: Option<tls::Tls>, stream: tokio::net::TcpStream) {
    let svc = hyper::service::service_fn(|_req: http::Request<hyper::body::Incoming>| async {
        let mut r = too_many("the server is at its connection limit; retry shortly");
        r.headers_mut().insert(
            http::header::CONNECTION,
            http::HeaderValue::from_static("close"),
        );
        Ok::<_, std::convert::Infallible>(r)
    });
    let mut b = http1(&shared.cfg);
    b.keep_alive(false);
    let bound = shared.cfg.header_read_timeout + CLOSE_GRACE;
    match tls {
        Some(t) => {
            if let Some(s) = handshake(&shared, &t, stream).await {
                let _ = tokio::time::timeout(bound, b.serve_connection(TokioIo::new(s), svc)).await;
            }
        }
        None => {
            let _ =
                tokio::time::timeout(bound, b.serve_connection(TokioIo::new(stream), svc)).await;
        }
    }
}

/// 429 `TOOMANYREQUESTS` with `Retry-After`, the one overload answer.
pub fn too_many(message: &str) -> Response {
    ApiError::new(ErrorCode::TooManyRequests)
        .message(message)
        .header(http::header::RETRY_AFTER, RETRY_AFTER_SECS.to_string())
        .into_response()
}

/// The connection's transport, telling its slot when bytes arrive (the start of a request
/// head when no request is in flight).
struct Watched<IO> {
    io: IO,
    slot: Arc<conns::Slot>,
}

impl<IO: AsyncRead + Unpin> AsyncRead for Watched<IO> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.slot.bytes_read();
        }
        r
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Watched<IO> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// A response body that holds its connection's busy mark until it ends or is dropped, so
/// a long blob download is never mistaken for an idle connection.
struct Tracked {
    inner: Body,
    _busy: conns::Busy,
}

impl http_body::Body for Tracked {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        std::pin::Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
