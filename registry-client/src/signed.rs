//! Router-signed read URLs for nodes. A node serves `/v2` reads only to callers holding the
//! cluster secret, or holding a URL the router signed with it: how a blob redirect (307)
//! reaches a node without opening the node to anonymous reads, and without the node having
//! to know users, policies or token keys. The signature is an HMAC-SHA256 (ring, already in
//! the TLS stack) over the path and an expiry, so it grants one object, for minutes, reads only.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Query parameters a signed URL carries.
pub const EXPIRES_PARAM: &str = "flotilla-expires";
pub const SIGNATURE_PARAM: &str = "flotilla-signature";

/// How long a redirect stays usable: enough for a client to follow it (and retry once).
pub const REDIRECT_TTL: Duration = Duration::from_secs(300);

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn mac(secret: &str, path: &str, expires: u64) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    let tag = ring::hmac::sign(&key, format!("GET\n{path}\n{expires}").as_bytes());
    hex::encode(tag.as_ref())
}

/// `path` (no query) with the parameters that let a node serve it until `ttl` from now.
pub fn sign(secret: &str, path: &str, ttl: Duration) -> String {
    let expires = now() + ttl.as_secs();
    format!(
        "{path}?{EXPIRES_PARAM}={expires}&{SIGNATURE_PARAM}={}",
        mac(secret, path, expires)
    )
}

/// Why a signed URL is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignError {
    #[error("no signature")]
    Missing,
    #[error("the signed URL expired")]
    Expired,
    #[error("the signature does not match")]
    Mismatch,
}

/// Checks `query` (the raw query string) signs `path` and has not expired.
pub fn verify(secret: &str, path: &str, query: Option<&str>) -> Result<(), SignError> {
    let (mut expires, mut sig) = (None, None);
    for pair in query.unwrap_or("").split('&') {
        match pair.split_once('=') {
            Some((EXPIRES_PARAM, v)) => expires = v.parse::<u64>().ok(),
            Some((SIGNATURE_PARAM, v)) => sig = Some(v),
            _ => {}
        }
    }
    let (Some(expires), Some(sig)) = (expires, sig) else {
        return Err(SignError::Missing);
    };
    if expires < now() {
        return Err(SignError::Expired);
    }
    let want = mac(secret, path, expires);
    // Constant time: the signature must not be guessable byte by byte.
    let same = want.len() == sig.len()
        && want
            .bytes()
            .zip(sig.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0;
    if !same {
        return Err(SignError::Mismatch);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signed_path_verifies_only_for_its_path_secret_and_time() {
        let url = sign("s", "/v2/a/b/blobs/sha256:x", REDIRECT_TTL);
        let (path, query) = url.split_once('?').unwrap();
        assert_eq!(verify("s", path, Some(query)), Ok(()));
        assert_eq!(verify("other", path, Some(query)), Err(SignError::Mismatch));
        assert_eq!(
            verify("s", "/v2/a/c/blobs/sha256:x", Some(query)),
            Err(SignError::Mismatch)
        );
        assert_eq!(verify("s", path, None), Err(SignError::Missing));
        let stale = format!(
            "{EXPIRES_PARAM}=10&{SIGNATURE_PARAM}={}",
            mac("s", path, 10)
        );
        assert_eq!(verify("s", path, Some(&stale)), Err(SignError::Expired));
    }
}
