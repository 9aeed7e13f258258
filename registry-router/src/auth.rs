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

/// What the guard established, handed on in one request extension (one insertion per
/// request): the user, for the upload limits ([`user_of`]) and the handlers, and the route
/// it parsed, so the proxy does not parse it again.
#[derive(Clone, Debug)]
pub struct Authorized {
    pub user: Option<std::sync::Arc<str>>,
    pub route: Option<OciRoute>,
}

/// Where the upload limiter finds the user.
pub fn user_of(ext: &http::Extensions) -> Option<std::sync::Arc<str>> {
    ext.get::<Authorized>().and_then(|a| a.user.clone())
}

/// What a `/v2` request needs (`route`: `None` when the path does not parse; such requests
/// get the handler's error and touch no repository).
fn need<'a>(method: &Method, route: Option<&'a OciRoute>) -> Need<'a> {
    let repo = |repo: &'a flotilla_core::RepoName, action: Action| Need::Repo {
        repo: repo.as_str(),
        action,
    };
    match route {
        None | Some(OciRoute::Base) => Need::Base,
        Some(OciRoute::Catalog) => Need::Catalog,
        Some(OciRoute::UploadStart { repo: r } | OciRoute::Upload { repo: r, .. }) => {
            repo(r, Action::Push)
        }
        Some(
            OciRoute::Manifest { repo: r, .. }
            | OciRoute::Blob { repo: r, .. }
            | OciRoute::Tags { repo: r }
            | OciRoute::Referrers { repo: r, .. },
        ) => match *method {
            Method::GET | Method::HEAD => repo(r, Action::Pull),
            Method::DELETE => repo(r, Action::Delete),
            _ => repo(r, Action::Push),
        },
    }
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
    need: &Need<'_>,
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

/// The middleware: authenticate, authorize, then hand the request on with the user and the
/// parsed route ([`Authorized`]; limits then follow users, not addresses).
pub async fn guard(State(cluster): State<Cluster>, mut req: Request, next: Next) -> Response {
    let Some(auth) = cluster.auth() else {
        return next.run(req).await;
    };
    let path = req.uri().path();
    let admin = path == "/admin/v1" || path.starts_with("/admin/v1/");
    if !(admin || path == "/v2" || path.starts_with("/v2/")) {
        // Health, metrics and the token endpoint (which authenticates by itself).
        return next.run(req).await;
    }
    let route = if admin {
        None
    } else {
        OciRoute::parse(path).ok()
    };
    let need = if admin {
        Need::Admin
    } else {
        need(req.method(), route.as_ref())
    };
    let (user, uri) = match decide(auth, &cluster, &req, need) {
        Ok(d) => d,
        Err(refused) => return *refused,
    };
    if let Some(uri) = uri {
        *req.uri_mut() = uri;
    }
    req.extensions_mut().insert(Authorized { user, route });
    next.run(req).await
}

/// A request let through: its user, and the URI to use instead of its own (a mount turned
/// into a plain upload).
type Decision = (Option<std::sync::Arc<str>>, Option<http::Uri>);

/// The decision for one request: the authenticated user (if any) and, for a mount from a
/// repository the user may not pull, the request's URI turned into a plain upload; or the
/// refusal to send.
fn decide(
    auth: &flotilla_auth::Auth,
    cluster: &Cluster,
    req: &Request,
    need: Need<'_>,
) -> Result<Decision, Box<Response>> {
    // Host and scheme only build a refusal's challenge: not computed on the success path.
    let refuse = |error: Option<&str>, message: String| {
        unauthorized(auth, &need, &host(req), https(cluster), error, message)
    };
    let principal = match auth.authenticate(
        req.headers()
            .get(http::header::AUTHORIZATION)
            .map(|v| v.as_bytes()),
        peer(req),
    ) {
        Ok(p) => p,
        Err(Refusal::TooManyFailures(wait)) => return Err(Box::new(too_many(wait))),
        Err(Refusal::BadCredentials(m)) => return Err(Box::new(refuse(None, m))),
        Err(Refusal::InvalidToken(m)) => return Err(Box::new(refuse(Some("invalid_token"), m))),
    };
    if !auth.allows(&principal, &need) {
        metrics::counter!("flotilla_auth_refused_total", "reason" => "not_allowed").increment(1);
        let what = match &need {
            Need::Base => "this registry".to_string(),
            Need::Repo { repo, action } => format!("{} on {repo}", action.as_str()),
            Need::Catalog => "the catalog".into(),
            Need::Admin => "the admin API".into(),
        };
        return Err(Box::new(match &principal {
            Principal::Anonymous => refuse(None, format!("authentication required for {what}")),
            Principal::Token(_) => refuse(
                Some("insufficient_scope"),
                format!("the token does not grant {what}"),
            ),
            Principal::User(u) => {
                tracing::info!(user = %u, %what, "denied by the access policy");
                ApiError::new(ErrorCode::Denied)
                    .message(format!("user {u:?} may not use {what}"))
                    .into_response()
            }
        }));
    }
    Ok((
        principal.user_shared(),
        mount_without_pull(auth, &principal, need, req),
    ))
}

/// A cross-repository mount reads the source: without pull there, the spec's fallback (an
/// ordinary upload session) instead of a mount, by dropping `from` and `mount`.
fn mount_without_pull(
    auth: &flotilla_auth::Auth,
    principal: &Principal,
    need: Need<'_>,
    req: &Request,
) -> Option<http::Uri> {
    let (Need::Repo { .. }, Some(q)) = (need, req.uri().query()) else {
        return None;
    };
    if !(q.contains("from=") && q.contains("mount=")) {
        return None;
    }
    let from = form_urlencoded::parse(q.as_bytes())
        .find(|(k, _)| k == "from")
        .map(|(_, v)| v.into_owned())?;
    let source = Need::Repo {
        repo: &from,
        action: Action::Pull,
    };
    if auth.allows(principal, &source) {
        return None;
    }
    let rest: String = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(
            form_urlencoded::parse(q.as_bytes()).filter(|(k, _)| k != "from" && k != "mount"),
        )
        .finish();
    let pq = if rest.is_empty() {
        req.uri().path().to_string()
    } else {
        format!("{}?{rest}", req.uri().path())
    };
    pq.parse().ok()
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
    let Some(auth) = cluster.auth().filter(|a| a.issues_tokens()) else {
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
                issued_at: flotilla_core::rfc3339(std::time::SystemTime::now()),
            })
            .into_response()
        }
        Err(e) => ApiError::new(ErrorCode::Denied)
            .with_status(StatusCode::BAD_REQUEST)
            .message(e.to_string())
            .into_response(),
    }
}
