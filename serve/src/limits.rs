//! Request-level limits a server opts into: concurrent uploads per client. A client is the
//! authenticated user once authentication has run (it inserts [`AuthenticatedUser`] into the
//! request's extensions before this layer), else the peer's IP address; the limit is a
//! count of upload requests in flight, answered over the cap with 429 and `Retry-After`.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use axum::extract::{ConnectInfo, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use registry_client::OciRoute;

/// The user an authentication layer established for this request. This is the seam where
/// authentication plugs in: insert it as a request extension before the limiter runs and
/// limits follow the user instead of the address.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct AuthenticatedUser(pub std::sync::Arc<str>);

/// Who a request counts against.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ClientId {
    User(Arc<str>),
    Peer(IpAddr),
}

/// Where a limiter finds the authenticated user among a request's extensions.
pub type UserOf = fn(&http::Extensions) -> Option<Arc<str>>;

fn authenticated_user(ext: &http::Extensions) -> Option<Arc<str>> {
    ext.get::<AuthenticatedUser>()
        .map(|AuthenticatedUser(u)| u.clone())
}

/// The request's client: its user if authenticated, else its peer address (set by
/// [`crate::serve`]); `None` only for requests that did not come through a listener.
pub fn client_id<B>(req: &http::Request<B>) -> Option<ClientId> {
    client_id_with(req, authenticated_user)
}

fn client_id_with<B>(req: &http::Request<B>, user_of: UserOf) -> Option<ClientId> {
    if let Some(u) = user_of(req.extensions()) {
        return Some(ClientId::User(u));
    }
    req.extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(a)| ClientId::Peer(a.ip()))
}

/// Whether a request writes upload bytes (or opens a session): the requests the per-client
/// cap counts.
fn is_upload<B>(req: &http::Request<B>) -> bool {
    matches!(
        *req.method(),
        http::Method::POST | http::Method::PATCH | http::Method::PUT
    ) && matches!(
        OciRoute::parse(req.uri().path()),
        Ok(OciRoute::UploadStart { .. } | OciRoute::Upload { .. })
    )
}

/// Caps the upload requests in flight per client.
#[derive(Clone, Debug)]
pub struct UploadLimiter {
    max: usize,
    role: &'static str,
    user_of: UserOf,
    inflight: Arc<Mutex<HashMap<ClientId, usize>>>,
}

/// One upload in flight; gives its place back when dropped.
#[derive(Debug)]
pub struct UploadPermit {
    id: ClientId,
    role: &'static str,
    inflight: Arc<Mutex<HashMap<ClientId, usize>>>,
}

/// `flotilla_uploads_in_flight{role}`: every client's uploads together.
fn publish(role: &'static str, m: &HashMap<ClientId, usize>) {
    metrics::gauge!("flotilla_uploads_in_flight", "role" => role)
        .set(m.values().sum::<usize>() as f64);
}

impl Drop for UploadPermit {
    fn drop(&mut self) {
        if let Ok(mut m) = self.inflight.lock() {
            if let Some(n) = m.get_mut(&self.id) {
                *n -= 1;
                if *n == 0 {
                    m.remove(&self.id);
                }
            }
            publish(self.role, &m);
        }
    }
}

impl UploadLimiter {
    /// `max` uploads in flight per client (at least one).
    pub fn new(max: usize, role: &'static str) -> Self {
        UploadLimiter {
            max: max.max(1),
            role,
            user_of: authenticated_user,
            inflight: Arc::default(),
        }
    }

    /// Read the user from another extension than [`AuthenticatedUser`]: a server whose
    /// authentication hands on more than the user (the router's route and user travel in
    /// one extension, one insertion per request) says where.
    pub fn with_user_of(mut self, user_of: UserOf) -> Self {
        self.user_of = user_of;
        self
    }

    /// A permit, or `None` when `id` already has `max` uploads in flight.
    pub fn try_acquire(&self, id: ClientId) -> Option<UploadPermit> {
        let mut m = self.inflight.lock().ok()?;
        let n = m.entry(id.clone()).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        publish(self.role, &m);
        Some(UploadPermit {
            id,
            role: self.role,
            inflight: self.inflight.clone(),
        })
    }

    /// The axum middleware (`axum::middleware::from_fn_with_state`).
    pub async fn middleware(
        State(lim): State<UploadLimiter>,
        req: Request,
        next: Next,
    ) -> Response {
        if !is_upload(&req) {
            return next.run(req).await;
        }
        let Some(id) = client_id_with(&req, lim.user_of) else {
            return next.run(req).await;
        };
        let Some(_permit) = lim.try_acquire(id.clone()) else {
            metrics::counter!("flotilla_requests_rejected_total", "role" => lim.role, "reason" => "uploads_per_client").increment(1);
            tracing::info!(client = ?id, max = lim.max, "too many concurrent uploads from one client; 429");
            return crate::too_many(&format!(
                "at most {} uploads in flight per client; retry shortly",
                lim.max
            ));
        };
        next.run(req).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permits_are_per_client_and_returned_on_drop() {
        let l = UploadLimiter::new(2, "test");
        let a = ClientId::Peer("10.0.0.1".parse().unwrap());
        let b = ClientId::User("alice".into());
        let p1 = l.try_acquire(a.clone()).unwrap();
        let _p2 = l.try_acquire(a.clone()).unwrap();
        assert!(l.try_acquire(a.clone()).is_none());
        assert!(l.try_acquire(b.clone()).is_some());
        drop(p1);
        assert!(l.try_acquire(a).is_some());
    }

    #[test]
    fn user_wins_over_peer_and_only_uploads_count() {
        let mut req = http::Request::post("/v2/a/b/blobs/uploads/")
            .body(())
            .unwrap();
        req.extensions_mut()
            .insert(ConnectInfo::<SocketAddr>("10.0.0.1:5".parse().unwrap()));
        assert_eq!(
            client_id(&req),
            Some(ClientId::Peer("10.0.0.1".parse().unwrap()))
        );
        assert!(is_upload(&req));
        req.extensions_mut().insert(AuthenticatedUser("bob".into()));
        assert_eq!(client_id(&req), Some(ClientId::User("bob".into())));
        let get = http::Request::get("/v2/a/b/blobs/uploads/x")
            .body(())
            .unwrap();
        assert!(!is_upload(&get));
    }
}
