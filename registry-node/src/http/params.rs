//! Query parameters, parsed once per request into typed values before a handler runs: a
//! malformed digest or name is refused here with its OCI code, so handlers never see a string.

use std::collections::HashMap;

use flotilla_core::{Digest, ErrorCode, ParseError, RepoName};

use super::ApiError;

/// The raw query string, decoded into pairs (the last of a repeated key wins).
#[derive(Debug, Default)]
pub(crate) struct RawQuery(HashMap<String, String>);

impl RawQuery {
    pub(crate) fn of(uri: &http::Uri) -> Self {
        RawQuery(
            axum::extract::Query::<HashMap<String, String>>::try_from_uri(uri)
                .map(|q| q.0)
                .unwrap_or_default(),
        )
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    fn digest(&self, key: &str) -> Result<Option<Digest>, ApiError> {
        self.get(key)
            .map(|s| {
                s.parse().map_err(|e: ParseError| {
                    ApiError::new(ErrorCode::DigestInvalid).message(e.to_string())
                })
            })
            .transpose()
    }
}

/// `n` and `last` of the tag and catalog listings.
#[derive(Debug, Default)]
pub(crate) struct Page {
    pub(crate) n: Option<usize>,
    pub(crate) last: Option<String>,
}

impl Page {
    pub(crate) fn parse(q: &RawQuery) -> Result<Self, ApiError> {
        let n = q
            .get("n")
            .map(|v| {
                v.parse::<usize>().map_err(|_| {
                    ApiError::new(ErrorCode::SizeInvalid)
                        .message("n must be a non-negative integer")
                })
            })
            .transpose()?;
        Ok(Page {
            n,
            last: q.get("last").map(str::to_owned),
        })
    }
}

/// `artifactType` of a referrers listing.
#[derive(Debug, Default)]
pub(crate) struct ReferrersFilter {
    pub(crate) artifact_type: Option<String>,
}

impl ReferrersFilter {
    pub(crate) fn parse(q: &RawQuery) -> Self {
        ReferrersFilter {
            artifact_type: q.get("artifactType").map(str::to_owned),
        }
    }
}

/// What a `POST .../blobs/uploads/` asks for: a cross-repository mount, a monolithic upload,
/// or (neither) a new session.
#[derive(Debug)]
pub(crate) enum UploadStart {
    /// `?mount=D[&from=R]`; a `from` that does not parse is refused, not ignored.
    Mount {
        digest: Digest,
        from: Option<RepoName>,
    },
    /// `?digest=D`: the whole blob is this request's body.
    Monolithic(Digest),
    Session,
}

impl UploadStart {
    pub(crate) fn parse(q: &RawQuery) -> Result<Self, ApiError> {
        if let Some(digest) = q.digest("mount")? {
            let from = q
                .get("from")
                .map(|f| {
                    f.parse::<RepoName>()
                        .map_err(|e| ApiError::new(ErrorCode::NameInvalid).message(e.to_string()))
                })
                .transpose()?;
            return Ok(UploadStart::Mount { digest, from });
        }
        Ok(match q.digest("digest")? {
            Some(d) => UploadStart::Monolithic(d),
            None => UploadStart::Session,
        })
    }
}

/// The `digest` a closing `PUT` of an upload must carry.
pub(crate) fn closing_digest(q: &RawQuery) -> Result<Digest, ApiError> {
    q.digest("digest")?.ok_or_else(|| {
        ApiError::new(ErrorCode::DigestInvalid).message("the digest query parameter is required")
    })
}
