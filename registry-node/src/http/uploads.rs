//! `/v2/<name>/blobs/uploads/...`: start (plain, monolithic, mount), PATCH, PUT, GET, DELETE.

use axum::response::{IntoResponse, Response};
use flotilla_core::{Digest, ErrorCode, RepoName, UploadId};
use http::{header, HeaderName, StatusCode};

use axum::body::Body;

use super::params::UploadStart;
use super::{content_length, header_str, upload_range, ApiError, Req};
use crate::NodeService;

fn location(repo: &RepoName, id: &UploadId) -> String {
    format!("/v2/{repo}/blobs/uploads/{id}")
}

fn session_response(status: StatusCode, repo: &RepoName, id: &UploadId, size: u64) -> Response {
    (
        status,
        [
            (header::LOCATION, location(repo, id)),
            (header::RANGE, upload_range(size)),
            (
                HeaderName::from_static("docker-upload-uuid"),
                id.to_string(),
            ),
            (header::CONTENT_LENGTH, "0".to_owned()),
        ],
    )
        .into_response()
}

fn created(repo: &RepoName, d: &Digest) -> Response {
    (
        StatusCode::CREATED,
        [
            (header::LOCATION, format!("/v2/{repo}/blobs/{d}")),
            (
                HeaderName::from_static("docker-content-digest"),
                d.to_string(),
            ),
            (header::CONTENT_LENGTH, "0".to_owned()),
        ],
    )
        .into_response()
}

pub(crate) async fn start(
    node: &NodeService,
    repo: &RepoName,
    what: UploadStart,
    body: Body,
) -> Result<Response, ApiError> {
    match what {
        UploadStart::Mount { digest, from } => {
            if node.mount_blob(repo, &digest, from.as_ref()).await? {
                return Ok(created(repo, &digest));
            }
        }
        UploadStart::Monolithic(d) => {
            node.upload_monolithic(repo, &d, body.into_data_stream())
                .await?;
            return Ok(created(repo, &d));
        }
        UploadStart::Session => {}
    }
    let id = node.start_upload(repo).await?;
    Ok(session_response(StatusCode::ACCEPTED, repo, &id, 0))
}

/// `Content-Range` as sent by clients: `start-end`, optionally prefixed with `bytes ` or
/// `bytes=` and suffixed with `/total`.
pub fn parse_content_range(v: &str) -> Option<(u64, u64)> {
    let v = v.trim();
    let v = v
        .strip_prefix("bytes=")
        .or_else(|| v.strip_prefix("bytes "))
        .unwrap_or(v);
    let v = v.split('/').next()?;
    let (a, b) = v.split_once('-')?;
    Some((a.trim().parse().ok()?, b.trim().parse().ok()?))
}

pub(crate) async fn patch(
    node: &NodeService,
    repo: &RepoName,
    id: &UploadId,
    req: Req,
) -> Result<Response, ApiError> {
    let range = match header_str(&req.headers, &header::CONTENT_RANGE) {
        None => None,
        Some(v) => Some(parse_content_range(v).ok_or_else(|| {
            ApiError::new(ErrorCode::BlobUploadInvalid)
                .with_status(StatusCode::RANGE_NOT_SATISFIABLE)
                .message("malformed Content-Range")
        })?),
    };
    let len = content_length(&req.headers);
    let size = node
        .upload_chunk(repo, id, range, len, req.body.into_data_stream())
        .await
        .map_err(|e| {
            let e = ApiError::from(e);
            if e.status() == StatusCode::RANGE_NOT_SATISFIABLE {
                e.header(header::LOCATION, location(repo, id))
            } else {
                e
            }
        })?;
    Ok(session_response(StatusCode::ACCEPTED, repo, id, size))
}

pub(crate) async fn put(
    node: &NodeService,
    repo: &RepoName,
    id: &UploadId,
    d: &Digest,
    body: Body,
) -> Result<Response, ApiError> {
    node.upload_complete(repo, id, d, Some(body.into_data_stream()))
        .await?;
    Ok(created(repo, d))
}

pub(crate) async fn status(
    node: &NodeService,
    repo: &RepoName,
    id: &UploadId,
) -> Result<Response, ApiError> {
    let size = node.upload_status(repo, id).await?;
    Ok(session_response(StatusCode::NO_CONTENT, repo, id, size))
}

pub(crate) async fn cancel(
    node: &NodeService,
    repo: &RepoName,
    id: &UploadId,
) -> Result<Response, ApiError> {
    node.cancel_upload(repo, id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[cfg(test)]
mod tests {
    #[test]
    fn content_range_forms() {
        for (v, want) in [
            ("0-9", Some((0, 9))),
            ("bytes 10-19/100", Some((10, 19))),
            ("bytes=5-5", Some((5, 5))),
            ("x", None),
            ("1-", None),
        ] {
            assert_eq!(super::parse_content_range(v), want, "{v}");
        }
    }
}
