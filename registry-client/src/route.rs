//! One parser from a `/v2/...` path to a typed route. OCI names contain `/`, so no router
//! pattern can match them; instead the reference-like tail (`manifests/<ref>`,
//! `blobs/<digest>`, `blobs/uploads/<id>`, `tags/list`, `referrers/<digest>`) is recognised
//! from the right and everything before it must be a valid repository name. The raw (still
//! percent-encoded) path is parsed, so an encoded slash or dot can never form a component.

use flotilla_core::{Digest, ErrorCode, ParseError, Reference, RepoName, UploadId};

use crate::ApiError;

#[derive(Debug, Clone, PartialEq)]
pub enum OciRoute {
    Base,
    Catalog,
    Tags {
        repo: RepoName,
    },
    Manifest {
        repo: RepoName,
        reference: Reference,
    },
    Blob {
        repo: RepoName,
        digest: Digest,
    },
    UploadStart {
        repo: RepoName,
    },
    Upload {
        repo: RepoName,
        id: UploadId,
    },
    Referrers {
        repo: RepoName,
        digest: Digest,
    },
}

fn name(s: &str) -> Result<RepoName, ApiError> {
    s.parse()
        .map_err(|e: ParseError| ApiError::new(ErrorCode::NameInvalid).message(e.to_string()))
}

fn digest(s: &str) -> Result<Digest, ApiError> {
    s.parse()
        .map_err(|e: ParseError| ApiError::new(ErrorCode::DigestInvalid).message(e.to_string()))
}

impl OciRoute {
    /// Parse the path (as sent, without the query). Unknown shapes are 404 `UNSUPPORTED`,
    /// so every answer under `/v2/` carries the OCI error body.
    pub fn parse(path: &str) -> Result<OciRoute, ApiError> {
        let rest = path
            .strip_prefix("/v2")
            .ok_or_else(ApiError::unknown_route)?;
        if rest.is_empty() || rest == "/" {
            return Ok(OciRoute::Base);
        }
        let rest = rest.strip_prefix('/').ok_or_else(ApiError::unknown_route)?;
        if rest == "_catalog" {
            return Ok(OciRoute::Catalog);
        }
        // `blobs/uploads/` (trailing slash) starts a session.
        if let Some(repo) = rest
            .strip_suffix("/blobs/uploads/")
            .or_else(|| rest.strip_suffix("/blobs/uploads"))
        {
            return Ok(OciRoute::UploadStart { repo: name(repo)? });
        }
        let segs: Vec<&str> = rest.rsplitn(3, '/').collect();
        // segs = [last, second_last, everything_before]
        match segs.as_slice() {
            ["list", "tags", repo] => Ok(OciRoute::Tags { repo: name(repo)? }),
            [reference, "manifests", repo] => {
                let repo = name(repo)?;
                let reference = reference.parse().map_err(|e: ParseError| {
                    let code = if reference.contains(':') {
                        ErrorCode::DigestInvalid
                    } else {
                        ErrorCode::ManifestInvalid
                    };
                    ApiError::new(code).message(e.to_string())
                })?;
                Ok(OciRoute::Manifest { repo, reference })
            }
            [d, "blobs", repo] => {
                let repo = name(repo)?;
                Ok(OciRoute::Blob {
                    repo,
                    digest: digest(d)?,
                })
            }
            [d, "referrers", repo] => {
                let repo = name(repo)?;
                Ok(OciRoute::Referrers {
                    repo,
                    digest: digest(d)?,
                })
            }
            [id, "uploads", before] => {
                let repo = before
                    .strip_suffix("/blobs")
                    .ok_or_else(ApiError::unknown_route)?;
                let repo = name(repo)?;
                let id = id.parse().map_err(|e: ParseError| {
                    ApiError::new(ErrorCode::BlobUploadUnknown).message(e.to_string())
                })?;
                Ok(OciRoute::Upload { repo, id })
            }
            _ => Err(ApiError::unknown_route()),
        }
    }

    /// [`OciRoute::parse`] for a request with this method. A `GET`/`HEAD` of a manifest by a
    /// reference that is neither a tag nor digest-shaped asks for something that cannot exist: 404
    /// `MANIFEST_UNKNOWN`, as Distribution answers and conformance tools expect (a `PUT` to
    /// it keeps its 400: the client tried to create an invalid name).
    pub fn parse_for(method: &http::Method, path: &str) -> Result<OciRoute, ApiError> {
        OciRoute::parse(path).map_err(|e| {
            let read = *method == http::Method::GET || *method == http::Method::HEAD;
            // A digest-shaped reference (`algo:hex`) that does not parse keeps its 400
            // `DIGEST_INVALID`: the client meant a digest and got it wrong.
            let bad_ref = e.code() == ErrorCode::ManifestInvalid;
            let manifests = path.rsplit('/').nth(1) == Some("manifests");
            if read && bad_ref && manifests {
                ApiError::new(ErrorCode::ManifestUnknown).message(
                    "no manifest can have this reference: it is neither a tag nor a digest",
                )
            } else {
                e
            }
        })
    }

    /// A short label for metrics and logs (never includes user-controlled text).
    pub fn label(&self) -> &'static str {
        match self {
            OciRoute::Base => "base",
            OciRoute::Catalog => "catalog",
            OciRoute::Tags { .. } => "tags",
            OciRoute::Manifest { .. } => "manifest",
            OciRoute::Blob { .. } => "blob",
            OciRoute::UploadStart { .. } => "upload_start",
            OciRoute::Upload { .. } => "upload",
            OciRoute::Referrers { .. } => "referrers",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_of_impossible_manifest_references_are_unknown_and_writes_invalid() {
        let code = |m: http::Method, p: &str| OciRoute::parse_for(&m, p).unwrap_err().code();
        let p = "/v2/a/b/manifests/.INVALID_MANIFEST_NAME";
        assert_eq!(code(http::Method::GET, p), ErrorCode::ManifestUnknown);
        assert_eq!(code(http::Method::HEAD, p), ErrorCode::ManifestUnknown);
        assert_eq!(code(http::Method::PUT, p), ErrorCode::ManifestInvalid);
        let d = "/v2/a/b/manifests/sha256:nothex";
        assert_eq!(code(http::Method::GET, d), ErrorCode::DigestInvalid);
        assert_eq!(code(http::Method::PUT, d), ErrorCode::DigestInvalid);
        // Other errors are untouched: a bad name is still NAME_INVALID, a bad blob digest
        // still DIGEST_INVALID.
        assert_eq!(
            code(http::Method::GET, "/v2/A/manifests/latest"),
            ErrorCode::NameInvalid
        );
        assert_eq!(
            code(http::Method::GET, "/v2/a/blobs/sha256:nothex"),
            ErrorCode::DigestInvalid
        );
    }

    fn check(path: &str, want: Result<&str, ErrorCode>) {
        match (OciRoute::parse(path), want) {
            (Ok(r), Ok(label)) => assert_eq!(r.label(), label, "{path}"),
            (Err(e), Err(code)) => assert_eq!(e.code(), code, "{path}"),
            (got, want) => panic!("{path}: got {got:?}, want {want:?}"),
        }
    }

    #[test]
    fn table() {
        let d = format!("sha256:{}", "a".repeat(64));
        check("/v2/", Ok("base"));
        check("/v2", Ok("base"));
        check("/v2/_catalog", Ok("catalog"));
        check("/v2/a/b/tags/list", Ok("tags"));
        check("/v2/a/manifests/latest", Ok("manifest"));
        check(&format!("/v2/a/b/c/manifests/{d}"), Ok("manifest"));
        check(&format!("/v2/a/blobs/{d}"), Ok("blob"));
        check("/v2/a/b/blobs/uploads/", Ok("upload_start"));
        check("/v2/a/b/blobs/uploads/3f2a-11", Ok("upload"));
        check(&format!("/v2/a/referrers/{d}"), Ok("referrers"));
        // A repository may itself be called "manifests" or "blobs".
        check("/v2/manifests/manifests/v1", Ok("manifest"));
        check(&format!("/v2/blobs/blobs/{d}"), Ok("blob"));
        // Hostile input.
        check("/v2/../etc/manifests/x", Err(ErrorCode::NameInvalid));
        check("/v2/a%2f..%2fb/manifests/x", Err(ErrorCode::NameInvalid));
        check("/v2/A/manifests/x", Err(ErrorCode::NameInvalid));
        check("/v2/a/blobs/sha256:xyz", Err(ErrorCode::DigestInvalid));
        check("/v2/a/blobs/md5:abc", Err(ErrorCode::DigestInvalid));
        check("/v2/a/manifests/sha256:xyz", Err(ErrorCode::DigestInvalid));
        check("/v2/a/manifests/-bad", Err(ErrorCode::ManifestInvalid));
        check("/v2/a/blobs/uploads/..", Err(ErrorCode::BlobUploadUnknown));
        check("/v2/a/nothing/here", Err(ErrorCode::Unsupported));
        check("/v2/tags/list", Err(ErrorCode::Unsupported));
        check("/v3/", Err(ErrorCode::Unsupported));
    }
}
