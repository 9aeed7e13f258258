//! The loopback registry the engine pulls from (Kraken's agent does the same): a read-only
//! `/v2` on `127.0.0.1:0` serving one manifest and the blobs the agent has already verified,
//! for the few seconds of one pull. The engine treats loopback registries as insecure (plain
//! HTTP) by default, verifies digests again itself, and ends with exactly the image
//! `docker pull` would give (same id, same layers), which an archive load would not promise.

use std::path::PathBuf;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use flotilla_core::{Digest, Reference, RepoName};
use http::{header, Method, StatusCode};
use registry_client::OciRoute;

use crate::fetch::Manifest;

/// What the loopback registry serves.
#[derive(Debug)]
pub(crate) struct Served {
    pub(crate) repo: RepoName,
    /// The tag the manifest is served under (besides its digest).
    pub(crate) tag: String,
    pub(crate) manifest: Manifest,
    /// Verified blobs, `DIR/HEX` per digest.
    pub(crate) blobs: PathBuf,
}

pub(crate) fn app(served: Arc<Served>) -> axum::Router {
    axum::Router::new().fallback(handle).with_state(served)
}

fn not_found() -> Response {
    StatusCode::NOT_FOUND.into_response()
}

async fn handle(State(s): State<Arc<Served>>, req: Request) -> Response {
    let head = req.method() == Method::HEAD;
    if req.method() != Method::GET && !head {
        return StatusCode::METHOD_NOT_ALLOWED.into_response();
    }
    let route = match OciRoute::parse(req.uri().path()) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    match route {
        OciRoute::Base => StatusCode::OK.into_response(),
        OciRoute::Manifest { repo, reference } if repo == s.repo => {
            let m = &s.manifest;
            let matches = match &reference {
                Reference::Tag(t) => t.as_str() == s.tag,
                Reference::Digest(d) => d == &m.digest,
            };
            if !matches {
                return not_found();
            }
            let body = if head {
                Body::empty()
            } else {
                Body::from(m.bytes.clone())
            };
            Response::builder()
                .header(header::CONTENT_TYPE, &m.media_type)
                .header(header::CONTENT_LENGTH, m.bytes.len())
                .header("docker-content-digest", m.digest.to_string())
                .body(body)
                .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
        }
        OciRoute::Blob { repo, digest } if repo == s.repo => blob(&s, &digest, head).await,
        _ => not_found(),
    }
}

async fn blob(s: &Served, digest: &Digest, head: bool) -> Response {
    // Only files the agent verified exist under this directory.
    let path = s.blobs.join(digest.hex());
    let Ok(file) = tokio::fs::File::open(&path).await else {
        return not_found();
    };
    let Ok(meta) = file.metadata().await else {
        return not_found();
    };
    let body = if head {
        Body::empty()
    } else {
        Body::from_stream(tokio_util::io::ReaderStream::with_capacity(
            file,
            256 * 1024,
        ))
    };
    Response::builder()
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::CONTENT_LENGTH, meta.len())
        .header("docker-content-digest", digest.to_string())
        .body(body)
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}
