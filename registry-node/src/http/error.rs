//! How the node's errors become the OCI error body: every `From<...Error> for ApiError`
//! lives here (`ApiError` itself is the wire type in `registry_client`). Details of a 5xx
//! are logged and never sent to the client.

use flotilla_core::ErrorCode;
use http::StatusCode;
use registry_client::ApiError;

use crate::manifest::ManifestError;
use crate::service::ServiceError;
use crate::store::StoreError;
use crate::write::uploads::UploadError;

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::BlobUnknown(d) => ApiError::new(ErrorCode::BlobUnknown).detail(d),
            StoreError::ManifestUnknown(r) => ApiError::new(ErrorCode::ManifestUnknown)
                .detail(serde_json::json!({"reference": r})),
            StoreError::NameUnknown(n) => {
                ApiError::new(ErrorCode::NameUnknown).detail(serde_json::json!({"name": n}))
            }
            other => ApiError::internal(other),
        }
    }
}

impl From<UploadError> for ApiError {
    fn from(e: UploadError) -> Self {
        match e {
            UploadError::Unknown(id) => ApiError::new(ErrorCode::BlobUploadUnknown).detail(id),
            UploadError::OutOfOrder { have, got } => ApiError::new(ErrorCode::BlobUploadInvalid)
                .with_status(StatusCode::RANGE_NOT_SATISFIABLE)
                .message(format!("chunk starts at {got}, upload holds {have} bytes"))
                .header(http::header::RANGE, super::upload_range(have)),
            UploadError::Body(m) => ApiError::new(ErrorCode::BlobUploadInvalid)
                .message(format!("request body ended early: {m}")),
            UploadError::Io(e) => ApiError::internal(e),
            e @ UploadError::TooLarge { .. } => ApiError::new(ErrorCode::SizeInvalid)
                .with_status(StatusCode::PAYLOAD_TOO_LARGE)
                .message(e.to_string()),
        }
    }
}

/// 507: the node's disk is full (or below its floor); nothing was acknowledged.
fn disk_full(detail: serde_json::Value) -> ApiError {
    ApiError::new(ErrorCode::Unavailable)
        .with_status(StatusCode::INSUFFICIENT_STORAGE)
        .message("the node's disk is full: nothing was acknowledged and the partial upload was removed; retry (new data goes to nodes with room)")
        .detail(detail)
}

impl From<ServiceError> for ApiError {
    fn from(e: ServiceError) -> Self {
        if e.is_disk_full() {
            tracing::warn!(error = %e, "write refused: disk full");
            let detail = match &e {
                ServiceError::NotWritable { free, floor } => {
                    serde_json::json!({"free_bytes": free, "min_free_bytes": floor})
                }
                _ => serde_json::json!({"free_bytes": 0}),
            };
            return disk_full(detail);
        }
        match e {
            ServiceError::NotWritable { free, floor } => {
                disk_full(serde_json::json!({"free_bytes": free, "min_free_bytes": floor}))
            }
            ServiceError::DeadlinePassed => ApiError::new(ErrorCode::Unavailable)
                .message("the router's deadline for this write passed before it was applied; the tag was not changed"),
            ServiceError::Store(e) => e.into(),
            ServiceError::Upload(e) => e.into(),
            ServiceError::DigestMismatch { expected, actual } => {
                ApiError::new(ErrorCode::DigestInvalid).detail(serde_json::json!({
                    "expected": expected, "actual": actual
                }))
            }
            ServiceError::Manifest(ManifestError::Json(m)) => {
                ApiError::new(ErrorCode::ManifestInvalid).message(format!("manifest invalid: {m}"))
            }
            ServiceError::Manifest(ManifestError::Invalid(m)) => {
                ApiError::new(ErrorCode::ManifestInvalid).message(format!("manifest invalid: {m}"))
            }
            ServiceError::ManifestBlobUnknown(d) => ApiError::new(ErrorCode::ManifestBlobUnknown)
                .detail(serde_json::json!({"digest": d})),
            ServiceError::ManifestTooLarge { size, limit } => ApiError::new(ErrorCode::SizeInvalid)
                .with_status(StatusCode::PAYLOAD_TOO_LARGE)
                .message(format!(
                    "manifest of {size} bytes exceeds the limit of {limit}"
                )),
            ServiceError::SizeInvalid(m) => ApiError::new(ErrorCode::SizeInvalid).message(m),
            ServiceError::Remote(e) => {
                tracing::error!(error = %e, "object storage unavailable");
                ApiError::new(ErrorCode::Unavailable)
                    .message("object storage is unavailable; nothing was acknowledged, retry later")
            }
            ServiceError::CorruptRemote(d) => {
                tracing::error!(digest = %d, "object storage returned content that fails verification");
                ApiError::new(ErrorCode::Unavailable)
                    .message("stored content failed digest verification and was not served")
                    .detail(serde_json::json!({"digest": d}))
            }
        }
    }
}
