//! The OCI HTTP surface of a node: one catch-all under `/v2/`, parsed into an [`OciRoute`]
//! and dispatched by a short `match` to one module per resource.

pub(crate) mod access;
pub(crate) mod blobs;
pub(crate) mod error;
pub(crate) mod internal;
pub(crate) mod listing;
pub(crate) mod manifests;
pub(crate) mod params;
pub(crate) mod uploads;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use axum::Router;
use http::{HeaderMap, Method, StatusCode};

use self::params::{Page, RawQuery, ReferrersFilter};
use crate::NodeService;
pub(crate) use registry_client::{ApiError, OciRoute, API_VERSION_HEADER};

/// The node's router. Built apart from `run` so tests can drive it directly.
pub(crate) fn app(node: NodeService) -> Router {
    Router::new()
        .route("/v2", any(dispatch))
        .route("/v2/", any(dispatch))
        .route("/v2/{*rest}", any(dispatch))
        .route_layer(axum::middleware::from_fn_with_state(
            node.clone(),
            access::guard,
        ))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .nest("/internal/v1", internal::routes(node.clone()))
        .with_state(node)
}

/// Ready once caught up with object storage (reads are correct from then on); the body
/// says whether object storage answers now, which decides whether writes can succeed.
async fn readyz(State(node): State<NodeService>) -> Response {
    let ready = node.is_ready();
    let store = match (
        node.config().store_url.is_some(),
        node.object_store_healthy(),
    ) {
        (false, _) => "none",
        (true, true) => "up",
        (true, false) => "unreachable",
    };
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let (free, floor) = node.disk_figures();
    let body = serde_json::json!({
        "ready": ready,
        "detail": if ready { "serving" } else { "catching up with object storage" },
        "object_store": store,
        "writable": node.writable(),
        "disk_free_bytes": free,
        "min_free_bytes": floor,
    });
    (status, axum::Json(body)).into_response()
}

async fn metrics_text(State(node): State<NodeService>) -> Response {
    match &node.config().metrics {
        Some(h) => h.render().into_response(),
        None => (StatusCode::NOT_FOUND, "metrics recorder not installed").into_response(),
    }
}

/// The parts of a request a handler may need once the route is known: the query is parsed
/// into typed parameters per route in [`handle`], never read as strings by a handler.
pub(crate) struct Req {
    pub(crate) method: Method,
    pub(crate) headers: HeaderMap,
    pub(crate) query: RawQuery,
    pub(crate) body: Body,
}

async fn dispatch(State(node): State<NodeService>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let route = OciRoute::parse_for(&parts.method, parts.uri.path());
    let query = RawQuery::of(&parts.uri);
    let req = Req {
        method: parts.method,
        headers: parts.headers,
        query,
        body,
    };
    let label = route.as_ref().map(OciRoute::label).unwrap_or("invalid");
    let method = req.method.clone();
    let mut resp = match route {
        Ok(route) => handle(node, route, req)
            .await
            .unwrap_or_else(|e| e.into_response()),
        Err(e) => e.into_response(),
    };
    resp.headers_mut().insert(
        API_VERSION_HEADER,
        http::HeaderValue::from_static("registry/2.0"),
    );
    metrics::counter!("flotilla_node_requests_total",
        "route" => label, "method" => registry_client::method_label(&method), "status" => resp.status().as_u16().to_string())
    .increment(1);
    resp
}

async fn handle(node: NodeService, route: OciRoute, req: Req) -> Result<Response, ApiError> {
    use OciRoute::*;
    match (route, req.method.clone()) {
        (Base, Method::GET | Method::HEAD) => Ok(StatusCode::OK.into_response()),
        (Catalog, Method::GET) => listing::catalog(&node, Page::parse(&req.query)?).await,
        (Tags { repo }, Method::GET) => listing::tags(&node, &repo, Page::parse(&req.query)?).await,
        (Referrers { repo, digest }, Method::GET) => {
            let filter = ReferrersFilter::parse(&req.query);
            listing::referrers(&node, &repo, &digest, filter).await
        }
        (Manifest { repo, reference }, Method::GET | Method::HEAD) => {
            manifests::get(&node, &repo, &reference, req.method == Method::HEAD).await
        }
        (Manifest { repo, reference }, Method::PUT) => {
            manifests::put(&node, &repo, &reference, req).await
        }
        (Manifest { repo, reference }, Method::DELETE) => {
            manifests::delete(&node, &repo, &reference, &req.headers).await
        }
        (Blob { repo, digest }, Method::GET | Method::HEAD) => {
            blobs::get(
                &node,
                &repo,
                &digest,
                &req.headers,
                req.method == Method::HEAD,
            )
            .await
        }
        (Blob { repo, digest }, Method::DELETE) => blobs::delete(&node, &repo, &digest).await,
        (UploadStart { repo }, Method::POST) => {
            let what = params::UploadStart::parse(&req.query)?;
            uploads::start(&node, &repo, what, req.body).await
        }
        (Upload { repo, id }, Method::PATCH) => uploads::patch(&node, &repo, &id, req).await,
        (Upload { repo, id }, Method::PUT) => {
            let digest = params::closing_digest(&req.query)?;
            uploads::put(&node, &repo, &id, &digest, req.body).await
        }
        (Upload { repo, id }, Method::GET) => uploads::status(&node, &repo, &id).await,
        (Upload { repo, id }, Method::DELETE) => uploads::cancel(&node, &repo, &id).await,
        _ => Err(ApiError::method_not_allowed()),
    }
}

/// The `Range` value of an upload holding `size` bytes: inclusive end, `0-0` when empty
/// (what Distribution sends and every client expects).
pub(crate) fn upload_range(size: u64) -> String {
    format!("0-{}", size.saturating_sub(1))
}

pub(crate) fn header_str<'a>(headers: &'a HeaderMap, name: &http::HeaderName) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

pub(crate) fn content_length(headers: &HeaderMap) -> Option<u64> {
    header_str(headers, &http::header::CONTENT_LENGTH).and_then(|v| v.parse().ok())
}
