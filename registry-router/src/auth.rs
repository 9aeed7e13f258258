//! The router's trust boundary: every `/v2` and `/admin/v1` request is authenticated and
//! authorized here ([`guard`]) before any handler runs, and the Docker token endpoint
//! ([`token`]) lives here. The decisions are `flotilla_auth`'s; this module maps routes to
//! what they need and refusals to the spec's answers: 401 with the `WWW-Authenticate`
//! challenge and `UNAUTHORIZED`, 403 `DENIED` for an authenticated user the policy refuses,
//! 429 after too many failed passwords.

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use flotilla_auth::{Action, Need, Principal, Refusal};
use flotilla_core::ErrorCode;
use http::{HeaderValue, Method, StatusCode};
use registry_client::{ApiError, OciRoute};

use crate::Cluster;

/// Where the router serves tokens when it issues them (`--token-key`).
pub const TOKEN_PATH: &str = "/auth/token";

/// What a request needs, or `None` when it is not guarded (health, metrics, the token
/// endpoint, which authenticates by itself).
fn need(req: &Request) -> Option<Need> {
    let path = req.uri().path();
    if path == "/admin/v1" || path.starts_with("/admin/v1/") {
        return Some(Need::Admin);
    }
    if !(path == "/v2" || path.starts_with("/v2/")) {
        return None;
    }
    let method = req.method();
    let write = |repo: &flotilla_core::RepoName, a: Action| Need::Repo {
        repo: repo.to_string(),
        action: a,
    };
    Some(match OciRoute::parse(path) {
        // Unparseable paths get the handler's error; they touch no repository.
        Err(_) => Need::Base,
        Ok(OciRoute::Base) => Need::Base,
        Ok(OciRoute::Catalog) => Need::Catalog,
        Ok(OciRoute::UploadStart { repo } | OciRoute::Upload { repo, .. }) => {
            write(&repo, Action::Push)
        }
        Ok(
            OciRoute::Manifest { repo, .. }
            | OciRoute::Blob { repo, .. }
            | OciRoute::Tags { repo }
            | OciRoute::Referrers { repo, .. },
        ) => match *method {
            Method::GET | Method::HEAD => write(&repo, Action::Pull),
            Method::DELETE => write(&repo, Action::Delete),
            _ => write(&repo, Action::Push),
        },
    })
}

fn https(cluster: &Cluster) -> bool {
    cluster.config().serve.tls.is_some()
}

fn host(req: &Request) -> String {
    req.headers()
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("localhost")
        .to_string()
}

fn unauthorized(
    auth: &flotilla_auth::Auth,
    need: &Need,
    host: &str,
    https: bool,
    error: Option<&str>,
    message: String,
) -> Response {
    let mut resp = ApiError::new(ErrorCode::Unauthorized)
        .message(message)
        .into_response();
    if let Ok(v) = HeaderValue::from_str(&auth.challenge(need, host, https, error)) {
        resp.headers_mut().insert(http::header::WWW_AUTHENTICATE, v);
    }
    resp
}

fn too_many(wait: std::time::Duration) -> Response {
    let mut resp = ApiError::new(ErrorCode::TooManyRequests)
        .message("too many failed logins from this address; wait and retry")
        .into_response();
    resp.headers_mut().insert(
        http::header::RETRY_AFTER,
        HeaderValue::from(wait.as_secs().max(1)),
    );
    resp
}

fn peer(req: &Request) -> Option<std::net::IpAddr> {
    req.extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(a)| a.ip())
}

/// The middleware: authenticate, authorize, then hand the request on with the user set
/// (`flotilla_serve::limits::AuthenticatedUser`, so limits follow users, not addresses).
pub async fn guard(State(cluster): State<Cluster>, mut req: Request, next: Next) -> Response {
    let Some(auth) = cluster.auth().cloned() else {
        return next.run(req).await;
    };
    let Some(need) = need(&req) else {
        return next.run(req).await;
    };
    // Host and scheme only build a refusal's challenge: not computed on the success path.
    let refuse = |req: &Request, error: Option<&str>, message: String| {
        unauthorized(&auth, &need, &host(req), https(&cluster), error, message)
    };
    let principal = match auth.authenticate(
        req.headers()
            .get(http::header::AUTHORIZATION)
            .map(|v| v.as_bytes()),
        peer(&req),
    ) {
        Ok(p) => p,
        Err(Refusal::TooManyFailures(wait)) => return too_many(wait),
        Err(Refusal::BadCredentials(m)) => return refuse(&req, None, m),
        Err(Refusal::InvalidToken(m)) => return refuse(&req, Some("invalid_token"), m),
    };
    if !auth.allows(&principal, &need) {
        metrics::counter!("flotilla_auth_refused_total", "reason" => "not_allowed").increment(1);
        let what = match &need {
            Need::Base => "this registry".to_string(),
            Need::Repo { repo, action } => format!("{} on {repo}", action.as_str()),
            Need::Catalog => "the catalog".into(),
            Need::Admin => "the admin API".into(),
        };
        return match &principal {
            Principal::Anonymous => {
                refuse(&req, None, format!("authentication required for {what}"))
            }
            Principal::Token(_) => refuse(
                &req,
                Some("insufficient_scope"),
                format!("the token does not grant {what}"),
            ),
            Principal::User(u) => {
                tracing::info!(user = %u, %what, "denied by the access policy");
                ApiError::new(ErrorCode::Denied)
                    .message(format!("user {u:?} may not use {what}"))
                    .into_response()
            }
        };
    }
    // A cross-repository mount reads the source: without pull there, the spec's fallback
    // (an ordinary upload session) instead of a mount.
    if let (Need::Repo { .. }, Some(q)) = (&need, req.uri().query()) {
        if q.contains("from=") && q.contains("mount=") {
            let from = form_urlencoded::parse(q.as_bytes())
                .find(|(k, _)| k == "from")
                .map(|(_, v)| v.into_owned());
            if let Some(from) = from {
                let source = Need::Repo {
                    repo: from,
                    action: Action::Pull,
                };
                if !auth.allows(&principal, &source) {
                    let rest: String = form_urlencoded::Serializer::new(String::new())
                        .extend_pairs(
                            form_urlencoded::parse(q.as_bytes())
                                .filter(|(k, _)| k != "from" && k != "mount"),
                        )
                        .finish();
                    let pq = if rest.is_empty() {
                        req.uri().path().to_string()
                    } else {
                        format!("{}?{rest}", req.uri().path())
                    };
                    if let Ok(uri) = pq.parse() {
                        *req.uri_mut() = uri;
                    }
                }
            }
        }
    }
    if let Some(u) = principal.user() {
        req.extensions_mut()
            .insert(flotilla_serve::limits::AuthenticatedUser(u.to_string()));
    }
    next.run(req).await
}

#[derive(serde::Serialize)]
struct TokenBody {
    token: String,
    access_token: String,
    expires_in: u64,
    issued_at: String,
}

/// `GET /auth/token?service=...&scope=...`: a token for the Basic user (or anonymous), with
/// the scopes cut down to what the policy allows.
pub async fn token(State(cluster): State<Cluster>, req: Request) -> Response {
    let Some(auth) = cluster.auth().cloned().filter(|a| a.issues_tokens()) else {
        return ApiError::unknown_route().into_response();
    };
    if req.method() != Method::GET {
        return ApiError::new(ErrorCode::Unsupported)
            .with_status(StatusCode::METHOD_NOT_ALLOWED)
            .message("the token endpoint answers GET (Basic credentials, ?service=&scope=)")
            .into_response();
    }
    let (mut service, mut scopes) = (None, Vec::new());
    for (k, v) in form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes()) {
        match &*k {
            "service" => service = Some(v.into_owned()),
            "scope" => scopes.push(v.into_owned()),
            _ => {}
        }
    }
    let basic_only = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .filter(|v| {
            v.as_bytes()
                .get(..6)
                .is_some_and(|s| s.eq_ignore_ascii_case(b"basic "))
        })
        .map(|v| v.as_bytes());
    if req.headers().contains_key(http::header::AUTHORIZATION) && basic_only.is_none() {
        return ApiError::new(ErrorCode::Unauthorized)
            .message("the token endpoint takes Basic credentials")
            .into_response();
    }
    let who = match auth.authenticate(basic_only, peer(&req)) {
        Ok(p) => p,
        Err(Refusal::TooManyFailures(w)) => return too_many(w),
        Err(Refusal::BadCredentials(m) | Refusal::InvalidToken(m)) => {
            let mut resp = ApiError::new(ErrorCode::Unauthorized)
                .message(m)
                .into_response();
            resp.headers_mut().insert(
                http::header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"flotilla\""),
            );
            return resp;
        }
    };
    let service = service.unwrap_or_else(|| auth.config().token_service.clone());
    match auth.issue(&who, &service, &scopes) {
        Ok(t) => {
            metrics::counter!("flotilla_auth_tokens_issued_total").increment(1);
            axum::Json(TokenBody {
                access_token: t.token.clone(),
                token: t.token,
                expires_in: t.expires_in,
                issued_at: rfc3339_now(),
            })
            .into_response()
        }
        Err(e) => ApiError::new(ErrorCode::Denied)
            .with_status(StatusCode::BAD_REQUEST)
            .message(e.to_string())
            .into_response(),
    }
}

/// `issued_at` in RFC 3339 (UTC), from the civil-from-days algorithm: one timestamp does not
/// justify a date crate.
fn rfc3339_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn rfc3339_is_well_formed() {
        let s = super::rfc3339_now();
        assert_eq!(s.len(), 20, "{s}");
        assert!(s.starts_with("20") && s.ends_with('Z'));
    }
}
