//! Who may use a node's `/v2`: a node with a cluster secret takes writes only from routers
//! (they present the secret) and serves reads to routers and to URLs a router signed
//! (`registry_client::signed`, what a blob redirect carries), so clients that reach a node
//! directly can neither write around replication nor read around the router's access
//! policy. `GET /v2/` stays open: it only says this is a registry.

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use flotilla_core::ErrorCode;
use http::Method;
use registry_client::internal::SECRET_HEADER;
use registry_client::ApiError;

use crate::NodeService;

pub(crate) async fn guard(State(node): State<NodeService>, req: Request, next: Next) -> Response {
    let Some(secret) = node.config().secret.as_deref() else {
        return next.run(req).await;
    };
    let path = req.uri().path();
    if path == "/v2" || path == "/v2/" {
        return next.run(req).await;
    }
    if let Some(given) = req.headers().get(SECRET_HEADER) {
        if super::internal::same(secret.as_bytes(), given.as_bytes()) {
            return next.run(req).await;
        }
        tracing::warn!(path, "refused a /v2 request: wrong cluster secret");
        metrics::counter!("flotilla_node_refused_total", "reason" => "secret").increment(1);
        return ApiError::new(ErrorCode::Unauthorized)
            .message(
                "wrong cluster secret (--secret/FLOTILLA_SECRET must agree on every component)",
            )
            .into_response();
    }
    let read = matches!(*req.method(), Method::GET | Method::HEAD);
    if !read {
        metrics::counter!("flotilla_node_refused_total", "reason" => "direct_write").increment(1);
        tracing::info!(path, method = %req.method(), "refused a direct write: writes go through a router");
        return ApiError::new(ErrorCode::Denied)
            .message("this node takes writes only from routers: push through the router")
            .into_response();
    }
    match registry_client::signed::verify(secret, path, req.uri().query()) {
        Ok(()) => next.run(req).await,
        Err(e) => {
            metrics::counter!("flotilla_node_refused_total", "reason" => "unsigned_read")
                .increment(1);
            ApiError::new(ErrorCode::Unauthorized)
                .message(format!(
                    "this node serves reads to routers and router-signed URLs only ({e}): pull through the router"
                ))
                .into_response()
        }
    }
}
