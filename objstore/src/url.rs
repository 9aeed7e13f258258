//! The object-store URL, parsed and validated once at the edge (no I/O), so a process
//! refuses a bad `--store` before it creates anything on disk.

use std::fmt;
use std::path::{Path as FsPath, PathBuf};
use std::str::FromStr;

/// Why a string is not a [`StoreUrl`]; every variant quotes the whole URL so the message
/// stands on its own after the flag name.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StoreUrlError {
    #[error("invalid store URL {url:?}: {error}")]
    Syntax { url: String, error: url::ParseError },
    #[error("invalid store URL {url:?}: unsupported scheme {scheme:?} (expected s3, gs, az, file or memory)")]
    UnsupportedScheme { url: String, scheme: String },
    #[error("invalid store URL {url:?}: missing {part}")]
    Missing { url: String, part: &'static str },
    #[error("invalid store URL {url:?}: file:// needs a local absolute directory (file:///DIR)")]
    NotLocal { url: String },
    #[error("invalid store URL {url:?}: unknown parameter {param:?} (s3 takes endpoint and region; other schemes none)")]
    UnknownParameter { url: String, param: String },
    #[error("invalid store URL {url:?}: endpoint {endpoint:?} is not an http:// or https:// URL")]
    Endpoint { url: String, endpoint: String },
}

/// An object-store URL: `s3://BUCKET[/PREFIX][?endpoint=http://HOST:PORT&region=R]`,
/// `gs://BUCKET[/PREFIX]`, `az://CONTAINER[/PREFIX]`, `file:///DIR`, `memory://`.
///
/// Parsing checks the scheme, the bucket or directory and the query without any I/O, so a
/// process rejects a bad URL before it creates anything on disk; [`Remote::open`] then only
/// fails for reasons of the store itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreUrl {
    url: url::Url,
    pub(crate) backend: Backend,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Backend {
    S3 {
        bucket: String,
        endpoint: Option<String>,
        region: Option<String>,
    },
    Gcs {
        bucket: String,
    },
    Azure {
        container: String,
    },
    File(PathBuf),
    Memory,
}

impl StoreUrl {
    /// A `file://` store in `dir`, for callers that own a directory (`flotilla dev`, tests)
    /// and should not have to get percent-encoding right by hand.
    pub fn file(dir: &FsPath) -> Result<StoreUrl, StoreUrlError> {
        let url = url::Url::from_directory_path(dir).map_err(|()| StoreUrlError::NotLocal {
            url: format!("file://{}", dir.display()),
        })?;
        url.as_str().parse()
    }

    /// The key prefix inside the bucket (empty for `file://`, whose directory is the root).
    pub(crate) fn prefix(&self) -> String {
        match self.backend {
            Backend::File(_) => String::new(),
            _ => self.url.path().trim_matches('/').to_owned(),
        }
    }
}

impl FromStr for StoreUrl {
    type Err = StoreUrlError;

    fn from_str(s: &str) -> Result<StoreUrl, StoreUrlError> {
        let url = url::Url::parse(s).map_err(|error| StoreUrlError::Syntax {
            url: s.to_owned(),
            error,
        })?;
        let missing = |part| StoreUrlError::Missing {
            url: s.to_owned(),
            part,
        };
        let host = || url.host_str().filter(|h| !h.is_empty()).map(str::to_owned);
        let allowed: &[&str] = if url.scheme() == "s3" {
            &["endpoint", "region"]
        } else {
            &[]
        };
        if let Some((param, _)) = url
            .query_pairs()
            .find(|(k, _)| !allowed.contains(&k.as_ref()))
        {
            return Err(StoreUrlError::UnknownParameter {
                url: s.to_owned(),
                param: param.into_owned(),
            });
        }
        let query = |k: &str| {
            url.query_pairs()
                .find(|(q, _)| q == k)
                .map(|(_, v)| v.into_owned())
        };
        let backend = match url.scheme() {
            "s3" => {
                let endpoint = query("endpoint");
                if let Some(e) = &endpoint {
                    let ok = url::Url::parse(e)
                        .is_ok_and(|e| matches!(e.scheme(), "http" | "https") && e.has_host());
                    if !ok {
                        return Err(StoreUrlError::Endpoint {
                            url: s.to_owned(),
                            endpoint: e.clone(),
                        });
                    }
                }
                Backend::S3 {
                    bucket: host().ok_or_else(|| missing("bucket"))?,
                    endpoint,
                    region: query("region"),
                }
            }
            "gs" => Backend::Gcs {
                bucket: host().ok_or_else(|| missing("bucket"))?,
            },
            "az" => Backend::Azure {
                container: host().ok_or_else(|| missing("container"))?,
            },
            "file" => {
                let dir = url
                    .to_file_path()
                    .map_err(|()| StoreUrlError::NotLocal { url: s.to_owned() })?;
                if dir.parent().is_none() {
                    return Err(missing("directory"));
                }
                Backend::File(dir)
            }
            "memory" => Backend::Memory,
            other => {
                return Err(StoreUrlError::UnsupportedScheme {
                    url: s.to_owned(),
                    scheme: other.to_owned(),
                })
            }
        };
        Ok(StoreUrl { url, backend })
    }
}

impl fmt::Display for StoreUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.url.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(url: &str, expected: Result<&str, &str>) {
        match (url.parse::<StoreUrl>(), expected) {
            (Ok(u), Ok(prefix)) => {
                assert_eq!(u.prefix(), prefix, "{url}");
                assert_eq!(u.to_string().parse::<StoreUrl>().as_ref(), Ok(&u), "{url}");
            }
            (Err(e), Err(needle)) => {
                let msg = e.to_string();
                assert!(msg.contains(needle), "{url}: {msg:?} lacks {needle:?}");
                assert!(msg.contains(&format!("{url:?}")), "{url}: {msg:?}");
            }
            (got, want) => panic!("{url}: got {got:?}, want {want:?}"),
        }
    }

    #[test]
    fn grammar() {
        check(
            "s3://b/p/q?endpoint=http://127.0.0.1:9000&region=us-east-1",
            Ok("p/q"),
        );
        check("s3://b", Ok(""));
        check("gs://b/p", Ok("p"));
        check("az://c/p/", Ok("p"));
        check("file:///var/lib/objects", Ok(""));
        check("memory://", Ok(""));
        check("s4://x", Err("unsupported scheme \"s4\""));
        check("s3:///p", Err("missing bucket"));
        check("gs://", Err("missing bucket"));
        check("az://", Err("missing container"));
        check("file:///", Err("missing directory"));
        check("file://host/dir", Err("local absolute directory"));
        check(
            "s3://b?endpiont=http://x",
            Err("unknown parameter \"endpiont\""),
        );
        check("gs://b?region=x", Err("unknown parameter \"region\""));
        check(
            "s3://b?endpoint=127.0.0.1:9000",
            Err("is not an http:// or https:// URL"),
        );
        check("bucket/prefix", Err("relative URL without a base"));
    }

    #[test]
    fn file_constructor_encodes_the_path() {
        let u = StoreUrl::file(FsPath::new("/tmp/a b")).unwrap();
        assert_eq!(u.backend, Backend::File(PathBuf::from("/tmp/a b/")));
        assert!(StoreUrl::file(FsPath::new("relative")).is_err());
    }
}
