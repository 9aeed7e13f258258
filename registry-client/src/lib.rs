//! The registry node's wire contract, kept beside the server as Kraken keeps a client next
//! to each server: routers, seeders and nodes all speak through these types, so none of them
//! imports another's internals.
//!
//! Brief overview:
//! - [`OciRoute`]: one parser from a `/v2/...` path to a typed route, shared by the node
//!   (which serves it) and the router (which forwards it).
//! - [`ApiError`]: the spec's `{"errors":[{"code","message","detail"}]}` body, the one way a
//!   request fails on every component.
//! - [`internal`]: the node-internal API (`/internal/v1`): paths, the secret header, request
//!   and response types, and [`internal::NodeClient`], the only code that formats its URLs.
//! - [`tls`]: the extra root certificates (`--tls-ca`) clients of TLS nodes trust.

mod error;
pub mod internal;
mod route;
pub mod signed;
pub mod tls;

pub use error::ApiError;
pub use route::OciRoute;

/// Sent on every `/v2/` answer, as clients probe for it.
pub const API_VERSION_HEADER: &str = "docker-distribution-api-version";

/// The `method` label of request metrics: the methods the API knows, and `other` for
/// anything a client invents, so no client can create a new time series per request.
pub fn method_label(m: &http::Method) -> &'static str {
    match *m {
        http::Method::GET => "GET",
        http::Method::HEAD => "HEAD",
        http::Method::PUT => "PUT",
        http::Method::POST => "POST",
        http::Method::PATCH => "PATCH",
        http::Method::DELETE => "DELETE",
        http::Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

/// Set by a node on a blob body every byte of which verified against the digest before the
/// first one was sent (a file verified in its current state). Only such a body may be
/// carried on from another replica after a cut: bytes of a body still being verified may be
/// the corrupt ones, and a resumed tail would make a complete-looking wrong blob.
pub const VERIFIED_HEADER: &str = "x-flotilla-verified";

/// Sent by routers with every manifest or tag write: the time (ms since the Unix epoch)
/// after which the node must not make the write visible, a little before the router stops
/// waiting for it. A write that reaches a node late (the node was frozen, the request sat in
/// a queue) is refused instead of landing after newer writes the router committed without
/// it: a timed-out attempt must never apply later and overwrite them.
pub const WRITE_DEADLINE_HEADER: &str = "x-flotilla-write-deadline";

#[cfg(test)]
mod tests {
    #[test]
    fn method_labels_are_bounded() {
        for (m, want) in [
            ("GET", "GET"),
            ("PATCH", "PATCH"),
            ("FOOBAR", "other"),
            ("get", "other"),
        ] {
            let m = http::Method::from_bytes(m.as_bytes()).unwrap();
            assert_eq!(super::method_label(&m), want, "{m}");
        }
    }
}
