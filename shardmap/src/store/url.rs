//! [`MetaUrl`], the metadata-store URL, checked when it is parsed so that a typo fails at the
//! command line instead of after a process has created its data directory.
//!
//! Grammar: `file://DIR` (embedded; the rest of the URL is the directory, so `file:///abs`
//! is absolute), `consul://HOST:PORT`, `etcd://HOST:PORT[,HOST:PORT...]`.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

/// Why a string is not a [`MetaUrl`]; every variant quotes the whole URL so the message
/// stands on its own after the flag name.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MetaUrlError {
    #[error("invalid metadata store URL {url:?}: no scheme (expected file:///DIR, consul://HOST:PORT or etcd://HOST:PORT[,HOST:PORT...])")]
    NoScheme { url: String },
    #[error("invalid metadata store URL {url:?}: unsupported scheme {scheme:?} (expected file, consul or etcd)")]
    UnsupportedScheme { url: String, scheme: String },
    #[error("invalid metadata store URL {url:?}: this build has no {scheme} backend (cargo feature {scheme:?})")]
    NotCompiledIn { url: String, scheme: String },
    #[error("invalid metadata store URL {url:?}: missing directory")]
    MissingDir { url: String },
    #[error("invalid metadata store URL {url:?}: missing HOST:PORT")]
    MissingAddress { url: String },
    #[error("invalid metadata store URL {url:?}: {addr:?} is not HOST:PORT")]
    BadAddress { url: String, addr: String },
}

/// A metadata-store URL that names a backend this build has and everything that backend
/// needs to connect. Only parsing (or [`MetaUrl::file`]) builds one, so [`crate::open`]
/// never sees a malformed URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetaUrl(pub(crate) Backend);

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Backend {
    File(PathBuf),
    #[cfg(feature = "consul")]
    Consul(String),
    /// Never empty.
    #[cfg(feature = "etcd")]
    Etcd(Vec<String>),
}

impl MetaUrl {
    /// The embedded store in `dir`; callers that own a directory (`flotilla dev`, tests)
    /// need not format and re-parse a URL.
    pub fn file(dir: impl Into<PathBuf>) -> Result<MetaUrl, MetaUrlError> {
        let dir = dir.into();
        if dir.as_os_str().is_empty() {
            return Err(MetaUrlError::MissingDir {
                url: "file://".to_owned(),
            });
        }
        Ok(MetaUrl(Backend::File(dir)))
    }
}

/// `HOST:PORT` with a numeric port: a bare host would silently mean port 80, which no
/// metadata store listens on.
#[cfg(any(feature = "consul", feature = "etcd"))]
fn address(url: &str, addr: &str) -> Result<String, MetaUrlError> {
    let bad = || MetaUrlError::BadAddress {
        url: url.to_owned(),
        addr: addr.to_owned(),
    };
    let (host, port) = addr.rsplit_once(':').ok_or_else(bad)?;
    if host.is_empty()
        || addr.contains(['/', '?', '#', '@'])
        || addr.contains(char::is_whitespace)
        || port.parse::<u16>().is_err()
    {
        return Err(bad());
    }
    Ok(addr.to_owned())
}

impl FromStr for MetaUrl {
    type Err = MetaUrlError;

    fn from_str(url: &str) -> Result<MetaUrl, MetaUrlError> {
        let Some((scheme, rest)) = url.split_once("://") else {
            return Err(MetaUrlError::NoScheme {
                url: url.to_owned(),
            });
        };
        match scheme {
            "file" if rest.is_empty() => Err(MetaUrlError::MissingDir {
                url: url.to_owned(),
            }),
            "file" => Ok(MetaUrl(Backend::File(PathBuf::from(rest)))),
            #[cfg(feature = "consul")]
            "consul" if rest.is_empty() => Err(MetaUrlError::MissingAddress {
                url: url.to_owned(),
            }),
            #[cfg(feature = "consul")]
            "consul" => Ok(MetaUrl(Backend::Consul(address(url, rest)?))),
            #[cfg(feature = "etcd")]
            "etcd" => {
                let addrs = rest
                    .split(',')
                    .map(str::trim)
                    .filter(|a| !a.is_empty())
                    .map(|a| address(url, a))
                    .collect::<Result<Vec<_>, _>>()?;
                if addrs.is_empty() {
                    return Err(MetaUrlError::MissingAddress {
                        url: url.to_owned(),
                    });
                }
                Ok(MetaUrl(Backend::Etcd(addrs)))
            }
            #[cfg(not(feature = "consul"))]
            "consul" => Err(MetaUrlError::NotCompiledIn {
                url: url.to_owned(),
                scheme: scheme.to_owned(),
            }),
            #[cfg(not(feature = "etcd"))]
            "etcd" => Err(MetaUrlError::NotCompiledIn {
                url: url.to_owned(),
                scheme: scheme.to_owned(),
            }),
            other => Err(MetaUrlError::UnsupportedScheme {
                url: url.to_owned(),
                scheme: other.to_owned(),
            }),
        }
    }
}

impl fmt::Display for MetaUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Backend::File(dir) => write!(f, "file://{}", dir.display()),
            #[cfg(feature = "consul")]
            Backend::Consul(addr) => write!(f, "consul://{addr}"),
            #[cfg(feature = "etcd")]
            Backend::Etcd(addrs) => write!(f, "etcd://{}", addrs.join(",")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(url: &str, expected: Result<&str, &str>) {
        match (url.parse::<MetaUrl>(), expected) {
            (Ok(u), Ok(canonical)) => assert_eq!(u.to_string(), canonical, "{url}"),
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
        check("file:///var/lib/meta", Ok("file:///var/lib/meta"));
        check("file://rel/meta", Ok("file://rel/meta"));
        check("file://", Err("missing directory"));
        check("consul://127.0.0.1:8500", Ok("consul://127.0.0.1:8500"));
        check("consul://[::1]:8500", Ok("consul://[::1]:8500"));
        check("consul://", Err("missing HOST:PORT"));
        check("consul://host", Err("\"host\" is not HOST:PORT"));
        check("consul://host:8500/kv", Err("is not HOST:PORT"));
        check("consul://host:port", Err("is not HOST:PORT"));
        check("etcd://a:2379, b:2379,", Ok("etcd://a:2379,b:2379"));
        check("etcd://a:2379,b", Err("\"b\" is not HOST:PORT"));
        check("etcd://,", Err("missing HOST:PORT"));
        check("zk://x", Err("unsupported scheme \"zk\""));
        check("/var/lib/meta", Err("no scheme"));
    }

    #[test]
    fn display_round_trips() {
        for url in ["file:///m", "consul://h:1", "etcd://a:1,b:2"] {
            let u: MetaUrl = url.parse().unwrap();
            assert_eq!(u.to_string().parse::<MetaUrl>().unwrap(), u);
        }
    }

    #[test]
    fn file_constructor_rejects_an_empty_path() {
        assert!(MetaUrl::file("").is_err());
        assert_eq!(
            MetaUrl::file("/m").unwrap(),
            "file:///m".parse::<MetaUrl>().unwrap()
        );
    }
}
