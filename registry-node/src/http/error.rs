//! `ApiError`: the one way a request fails, rendered as the spec's
//! `{"errors":[{"code","message","detail"}]}` body. Every `From<...Error>` lives here. Details
//! of a 5xx are logged and never sent to the client.

use axum::response::{IntoResponse, Response};
use flotilla_core::ErrorCode;
use http::{HeaderName, HeaderValue, StatusCode};

use crate::manifest::ManifestError;
use crate::service::ServiceError;
use crate::store::StoreError;
use crate::write::uploads::UploadError;

#[derive(Debug)]
pub struct ApiError {
    code: ErrorCode,
    status: StatusCode,
    message: String,
    detail: Option<serde_json::Value>,
    headers: Vec<(HeaderName, HeaderValue)>,
}

impl ApiError {
    pub fn new(code: ErrorCode) -> Self {
        ApiError {
            code,
            status: StatusCode::from_u16(code.status()).unwrap_or(StatusCode::BAD_REQUEST),
            message: code.message().to_owned(),
            detail: None,
            headers: Vec::new(),
        }
    }

    pub fn code(&self) -> ErrorCode {
        self.code
    }

    pub fn status(&self) -> StatusCode {
        self.status
    }

    pub fn message(mut self, m: impl Into<String>) -> Self {
        self.message = m.into();
        self
    }

    pub fn detail(mut self, d: impl serde::Serialize) -> Self {
        self.detail = serde_json::to_value(d).ok();
        self
    }

    pub fn with_status(mut self, s: StatusCode) -> Self {
        self.status = s;
        self
    }

    pub fn header(mut self, name: HeaderName, value: impl AsRef<str>) -> Self {
        if let Ok(v) = HeaderValue::from_str(value.as_ref()) {
            self.headers.push((name, v));
        }
        self
    }

    /// Anything under `/v2/` that is not an API route.
    pub fn unknown_route() -> Self {
        ApiError::new(ErrorCode::Unsupported)
            .with_status(StatusCode::NOT_FOUND)
            .message("no such API endpoint")
    }

    pub fn method_not_allowed() -> Self {
        ApiError::new(ErrorCode::Unsupported)
            .with_status(StatusCode::METHOD_NOT_ALLOWED)
            .message("method not allowed on this endpoint")
    }

    /// A failure whose cause is ours: log it in full, tell the client only that it happened.
    pub fn internal(e: impl std::fmt::Display) -> Self {
        tracing::error!(error = %e, "internal error");
        ApiError::new(ErrorCode::InternalError)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        metrics::counter!("flotilla_node_errors_total", "code" => self.code.as_str()).increment(1);
        let mut err = serde_json::json!({"code": self.code.as_str(), "message": self.message});
        if let Some(d) = self.detail {
            err["detail"] = d;
        }
        let body = serde_json::json!({ "errors": [err] }).to_string();
        let mut resp = (
            self.status,
            [(http::header::CONTENT_TYPE, "application/json")],
            body,
        )
            .into_response();
        for (k, v) in self.headers {
            resp.headers_mut().append(k, v);
        }
        resp
    }
}

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
        }
    }
}

impl From<ServiceError> for ApiError {
    fn from(e: ServiceError) -> Self {
        match e {
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
