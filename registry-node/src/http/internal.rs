//! The node-internal API's handlers (`/internal/v1`; paths, header and bodies are the wire
//! types of `registry_client::internal`). Every request must carry the cluster's shared
//! secret; a node started without a secret refuses all of them.

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use flotilla_core::ErrorCode;
use http::StatusCode;

use registry_client::internal::{
    self as wire, CatchUp, NodeStatus, SeedRequest, Seeded, SECRET_HEADER,
};

use super::ApiError;
use crate::NodeService;

pub(crate) fn routes(node: NodeService) -> Router<NodeService> {
    Router::new()
        .route(wire::STATUS, get(status))
        .route(wire::CATCH_UP, post(catch_up))
        .route(wire::SEED, post(seed))
        .route(wire::SEEDED, post(seeded))
        .layer(axum::middleware::from_fn_with_state(node, require_secret))
}

/// Constant-time comparison, so the secret cannot be guessed byte by byte from timing.
pub(crate) fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn require_secret(State(node): State<NodeService>, req: Request, next: Next) -> Response {
    let given = req.headers().get(SECRET_HEADER).map(|v| v.as_bytes());
    let ok = match (&node.config().secret, given) {
        (Some(secret), Some(given)) => same(secret.as_bytes(), given),
        _ => false,
    };
    if !ok {
        tracing::warn!(
            path = %req.uri().path(),
            secret_sent = given.is_some(),
            "refused an internal request: missing or wrong cluster secret (--secret/FLOTILLA_SECRET must agree on every component)"
        );
        return ApiError::new(ErrorCode::Unauthorized)
            .message("the node-internal API requires the cluster's shared secret")
            .into_response();
    }
    next.run(req).await
}

async fn status(State(node): State<NodeService>) -> Response {
    let cfg = node.config();
    Json(NodeStatus {
        id: cfg.id.clone(),
        rack: cfg.rack.clone(),
        ready: node.is_ready(),
        needs_seed: node.needs_seed(),
        seed_id: node.seed_id().to_owned(),
    })
    .into_response()
}

async fn catch_up(State(node): State<NodeService>) -> Response {
    match node.catch_up().await {
        Ok(changed) => Json(CatchUp { changed }).into_response(),
        Err(e) => ApiError::from(e)
            .with_status(StatusCode::SERVICE_UNAVAILABLE)
            .into_response(),
    }
}

/// Copy one repository from object storage onto this disk, verified (see `seed`). The
/// seeder calls it per repository so its progress record advances in small, resumable steps.
async fn seed(
    State(node): State<NodeService>,
    body: Result<Json<SeedRequest>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Ok(Json(req)) = body else {
        return ApiError::new(ErrorCode::Unsupported)
            .with_status(StatusCode::BAD_REQUEST)
            .message("body must be JSON: {\"repo\": \"name\"}")
            .into_response();
    };
    let concurrency = node.config().seed_concurrency;
    match crate::seed::seed_repo(&node, &req.repo, concurrency, req.verify).await {
        Ok(stats) => Json(stats).into_response(),
        Err(e) => {
            tracing::warn!(repo = %req.repo, error = %e, "seeding a repository failed");
            ApiError::from(e)
                .with_status(StatusCode::SERVICE_UNAVAILABLE)
                .into_response()
        }
    }
}

/// The seeder finished this node: clear the reseed flag (durably) so the membership loop
/// reports the node ready from its next heartbeat on.
async fn seeded(State(node): State<NodeService>) -> Response {
    match node.mark_seeded().await {
        Ok(()) => Json(Seeded { needs_seed: false }).into_response(),
        Err(e) => ApiError::from(e)
            .with_status(StatusCode::SERVICE_UNAVAILABLE)
            .into_response(),
    }
}
