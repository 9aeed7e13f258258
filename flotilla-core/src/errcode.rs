//! The OCI Distribution error codes, registered once with their message and HTTP status.

/// One entry per code of the distribution-spec's error table (plus the two the reference
/// implementation added and clients expect: `TOO_MANY_REQUESTS`, `UNAVAILABLE`, and our
/// `INTERNAL_ERROR` for 5xx). Handlers return codes; one function renders the JSON body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorCode {
    BlobUnknown,
    BlobUploadInvalid,
    BlobUploadUnknown,
    DigestInvalid,
    ManifestBlobUnknown,
    ManifestInvalid,
    ManifestUnknown,
    NameInvalid,
    NameUnknown,
    SizeInvalid,
    Unauthorized,
    Denied,
    Unsupported,
    TooManyRequests,
    Unavailable,
    InternalError,
}

impl ErrorCode {
    /// The wire identifier, e.g. `BLOB_UNKNOWN`.
    pub fn as_str(self) -> &'static str {
        self.entry().0
    }

    /// The spec's default human message for the code.
    pub fn message(self) -> &'static str {
        self.entry().1
    }

    /// The HTTP status the spec pairs with this code.
    pub fn status(self) -> u16 {
        self.entry().2
    }

    fn entry(self) -> (&'static str, &'static str, u16) {
        use ErrorCode::*;
        match self {
            BlobUnknown => ("BLOB_UNKNOWN", "blob unknown to registry", 404),
            BlobUploadInvalid => ("BLOB_UPLOAD_INVALID", "blob upload invalid", 400),
            BlobUploadUnknown => (
                "BLOB_UPLOAD_UNKNOWN",
                "blob upload unknown to registry",
                404,
            ),
            DigestInvalid => (
                "DIGEST_INVALID",
                "provided digest did not match uploaded content",
                400,
            ),
            ManifestBlobUnknown => (
                "MANIFEST_BLOB_UNKNOWN",
                "manifest references a manifest or blob unknown to registry",
                400,
            ),
            ManifestInvalid => ("MANIFEST_INVALID", "manifest invalid", 400),
            ManifestUnknown => ("MANIFEST_UNKNOWN", "manifest unknown to registry", 404),
            NameInvalid => ("NAME_INVALID", "invalid repository name", 400),
            NameUnknown => ("NAME_UNKNOWN", "repository name not known to registry", 404),
            SizeInvalid => (
                "SIZE_INVALID",
                "provided length did not match content length",
                400,
            ),
            Unauthorized => ("UNAUTHORIZED", "authentication required", 401),
            Denied => ("DENIED", "requested access to the resource is denied", 403),
            Unsupported => ("UNSUPPORTED", "the operation is unsupported", 405),
            TooManyRequests => ("TOOMANYREQUESTS", "too many requests", 429),
            Unavailable => ("UNAVAILABLE", "service unavailable", 503),
            InternalError => ("INTERNAL_ERROR", "internal server error", 500),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::ErrorCode::*;

    #[test]
    fn table() {
        for (code, id, status) in [
            (BlobUnknown, "BLOB_UNKNOWN", 404),
            (BlobUploadUnknown, "BLOB_UPLOAD_UNKNOWN", 404),
            (DigestInvalid, "DIGEST_INVALID", 400),
            (ManifestBlobUnknown, "MANIFEST_BLOB_UNKNOWN", 400),
            (NameInvalid, "NAME_INVALID", 400),
            (NameUnknown, "NAME_UNKNOWN", 404),
            (Unsupported, "UNSUPPORTED", 405),
            (Unavailable, "UNAVAILABLE", 503),
        ] {
            assert_eq!(code.as_str(), id);
            assert_eq!(code.status(), status);
            assert!(!code.message().is_empty());
        }
    }
}
