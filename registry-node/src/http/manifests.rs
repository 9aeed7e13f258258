//! `PUT`/`GET`/`HEAD`/`DELETE /v2/<name>/manifests/<reference>`.

use axum::response::{IntoResponse, Response};
use flotilla_core::{ErrorCode, Reference, RepoName};
use http::{header, HeaderName, StatusCode};

use super::{content_length, header_str, ApiError, Req};
use crate::NodeService;

pub(crate) async fn get(
    node: &NodeService,
    repo: &RepoName,
    reference: &Reference,
    head: bool,
) -> Result<Response, ApiError> {
    let m = node.get_manifest(repo, reference).await?;
    let headers = [
        (header::CONTENT_TYPE, m.media_type),
        (header::CONTENT_LENGTH, m.bytes.len().to_string()),
        (header::ETAG, format!("\"{}\"", m.digest)),
        (
            HeaderName::from_static("docker-content-digest"),
            m.digest.to_string(),
        ),
    ];
    Ok(if head {
        (StatusCode::OK, headers).into_response()
    } else {
        (StatusCode::OK, headers, m.bytes).into_response()
    })
}

pub(crate) async fn put(
    node: &NodeService,
    repo: &RepoName,
    reference: &Reference,
    req: Req,
) -> Result<Response, ApiError> {
    let limit = node.config().manifest_max_bytes;
    let too_large = |size: String| {
        ApiError::new(ErrorCode::SizeInvalid)
            .with_status(StatusCode::PAYLOAD_TOO_LARGE)
            .message(format!(
                "manifest of {size} bytes exceeds the limit of {limit}"
            ))
    };
    if let Some(len) = content_length(&req.headers) {
        if len > limit as u64 {
            return Err(too_large(len.to_string()));
        }
    }
    let content_type = header_str(&req.headers, &header::CONTENT_TYPE).map(str::to_owned);
    let bytes = axum::body::to_bytes(req.body, limit)
        .await
        .map_err(|_| too_large(format!("more than {limit}")))?;
    let put = node
        .put_manifest(
            repo,
            reference,
            content_type.as_deref(),
            bytes,
            crate::write::Deadline::from_headers(&req.headers),
        )
        .await?;
    let mut resp = (
        StatusCode::CREATED,
        [
            (
                header::LOCATION,
                format!("/v2/{repo}/manifests/{}", put.digest),
            ),
            (
                HeaderName::from_static("docker-content-digest"),
                put.digest.to_string(),
            ),
            (header::CONTENT_LENGTH, "0".to_owned()),
        ],
    )
        .into_response();
    if let Some(subject) = put.subject {
        if let Ok(v) = subject.to_string().parse() {
            resp.headers_mut().insert("oci-subject", v);
        }
    }
    Ok(resp)
}

pub(crate) async fn delete(
    node: &NodeService,
    repo: &RepoName,
    reference: &Reference,
    headers: &http::HeaderMap,
) -> Result<Response, ApiError> {
    node.delete_manifest(
        repo,
        reference,
        crate::write::Deadline::from_headers(headers),
    )
    .await?;
    Ok(StatusCode::ACCEPTED.into_response())
}
