//! `GET`/`HEAD`/`DELETE /v2/<name>/blobs/<digest>`, with single-range requests.

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use flotilla_core::{Digest, ErrorCode, RepoName};
use http::{header, StatusCode};

use super::{header_str, ApiError};
use crate::read::verify::file_stream;
use crate::read::BlobBody;
use crate::NodeService;

/// A parsed `Range: bytes=...` against a blob of `size` bytes: `Ok(None)` means serve it
/// whole (no header, or a multi-range we choose to ignore as RFC 9110 allows).
/// The `Range` header cannot be satisfied for this blob (answered with 416).
#[derive(Debug, PartialEq, Eq)]
pub struct Unsatisfiable;

pub fn parse_range(value: Option<&str>, size: u64) -> Result<Option<(u64, u64)>, Unsatisfiable> {
    let Some(v) = value else { return Ok(None) };
    let spec = v.trim().strip_prefix("bytes=").ok_or(Unsatisfiable)?;
    if spec.contains(',') {
        return Ok(None);
    }
    let (a, b) = spec.split_once('-').ok_or(Unsatisfiable)?;
    let (start, end) = match (a.trim(), b.trim()) {
        ("", suffix) => {
            let n: u64 = suffix.parse().map_err(|_| Unsatisfiable)?;
            if n == 0 || size == 0 {
                return Err(Unsatisfiable);
            }
            (size.saturating_sub(n), size - 1)
        }
        (s, "") => (
            s.parse().map_err(|_| Unsatisfiable)?,
            size.saturating_sub(1),
        ),
        (s, e) => {
            let s: u64 = s.parse().map_err(|_| Unsatisfiable)?;
            let e: u64 = e.parse().map_err(|_| Unsatisfiable)?;
            (s, e.min(size.saturating_sub(1)))
        }
    };
    if start >= size || end < start {
        return Err(Unsatisfiable);
    }
    Ok(Some((start, end)))
}

pub(crate) async fn get(
    node: &NodeService,
    repo: &RepoName,
    digest: &Digest,
    headers: &http::HeaderMap,
    head: bool,
) -> Result<Response, ApiError> {
    let digest_hdr = digest.to_string();
    if head {
        let size = node.stat_blob(repo, digest).await?;
        return Ok((
            StatusCode::OK,
            [
                (header::CONTENT_LENGTH, size.to_string()),
                (header::CONTENT_TYPE, "application/octet-stream".to_owned()),
                (header::ACCEPT_RANGES, "bytes".to_owned()),
                (header::ETAG, format!("\"{digest_hdr}\"")),
                (
                    header::HeaderName::from_static("docker-content-digest"),
                    digest_hdr,
                ),
            ],
        )
            .into_response());
    }
    let range_hdr = header_str(headers, &header::RANGE);
    let (blob, size) = node.open_blob(repo, digest, range_hdr.is_none()).await?;
    let range = parse_range(range_hdr, size).map_err(|Unsatisfiable| {
        ApiError::new(ErrorCode::SizeInvalid)
            .with_status(StatusCode::RANGE_NOT_SATISFIABLE)
            .message("requested range not satisfiable")
            .header(header::CONTENT_RANGE, format!("bytes */{size}"))
    })?;
    let (status, start, len) = match range {
        Some((s, e)) => (StatusCode::PARTIAL_CONTENT, s, e - s + 1),
        None => (StatusCode::OK, 0, size),
    };
    let verified = matches!(blob, BlobBody::File(_) | BlobBody::Bytes(_));
    let body = match blob {
        BlobBody::File(file) => Body::from_stream(file_stream(file, start, len, None)),
        BlobBody::Checked(file, check) => Body::from_stream(file_stream(file, 0, len, Some(check))),
        BlobBody::Bytes(bytes) => {
            // Verified whole; a range is a slice of it.
            let from = start as usize;
            let to = (start + len) as usize;
            Body::from(bytes.slice(from.min(bytes.len())..to.min(bytes.len())))
        }
        // Only ever handed out for whole-blob requests.
        BlobBody::Fetch(stream) => Body::from_stream(stream),
    };
    metrics::counter!("flotilla_node_blob_bytes_out_total").increment(len);
    let mut resp = Response::builder()
        .status(status)
        .header(header::CONTENT_LENGTH, len)
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::ACCEPT_RANGES, "bytes")
        .header(header::ETAG, format!("\"{digest_hdr}\""))
        .header("docker-content-digest", &digest_hdr);
    if verified {
        resp = resp.header(registry_client::VERIFIED_HEADER, "1");
    }
    if status == StatusCode::PARTIAL_CONTENT {
        resp = resp.header(
            header::CONTENT_RANGE,
            format!("bytes {}-{}/{}", start, start + len - 1, size),
        );
    }
    resp.body(body).map_err(ApiError::internal)
}

pub(crate) async fn delete(
    node: &NodeService,
    repo: &RepoName,
    digest: &Digest,
) -> Result<Response, ApiError> {
    node.delete_blob(repo, digest).await?;
    Ok(StatusCode::ACCEPTED.into_response())
}

#[cfg(test)]
mod tests {
    use super::{parse_range, Unsatisfiable};

    #[test]
    fn ranges() {
        let check = |v: Option<&str>, size, want| assert_eq!(parse_range(v, size), want, "{v:?}");
        check(None, 10, Ok(None));
        check(Some("bytes=0-4"), 10, Ok(Some((0, 4))));
        check(Some("bytes=5-"), 10, Ok(Some((5, 9))));
        check(Some("bytes=-3"), 10, Ok(Some((7, 9))));
        check(Some("bytes=8-100"), 10, Ok(Some((8, 9))));
        check(Some("bytes=10-"), 10, Err(Unsatisfiable));
        check(Some("bytes=5-4"), 10, Err(Unsatisfiable));
        check(Some("bytes=0-0"), 0, Err(Unsatisfiable));
        check(Some("items=0-1"), 10, Err(Unsatisfiable));
        check(Some("bytes=0-1,3-4"), 10, Ok(None));
    }
}
