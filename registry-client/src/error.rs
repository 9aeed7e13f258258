//! `ApiError`: the one way a request fails, rendered as the spec's
//! `{"errors":[{"code","message","detail"}]}` body with the status its code implies. The
//! conversions from each server's own error types live in that server (the node's
//! `http::error`), so this crate knows no server internals. Details of a 5xx are logged and
//! never sent to the client.

use axum::response::{IntoResponse, Response};
use flotilla_core::ErrorCode;
use http::{HeaderName, HeaderValue, StatusCode};

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
