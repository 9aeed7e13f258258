//! [`MetaUrl`], the metadata-store URL, checked when it is parsed so that a typo fails at the
//! command line instead of after a process has created its data directory.
//!
//! Grammar: `file://DIR` (embedded; the rest of the URL is the directory, so `file:///abs`
//! is absolute), `consul://HOST:PORT`, `etcd://HOST:PORT[,HOST:PORT...]`, and their TLS
//! forms `consuls://...` and `etcds://...`, each optionally ending in `?ca=PATH` (a PEM
//! bundle of roots to trust besides the system's). Consul's own `CONSUL_HTTP_SSL=true` and
//! `CONSUL_CACERT` also switch a `consul://` URL to TLS (read when the store is opened).

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
    #[error("invalid metadata store URL {url:?}: {detail} (the only option is ?ca=PATH, on consuls:// and etcds://)")]
    BadOption { url: String, detail: String },
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
    Consul {
        addr: String,
        tls: Option<Tls>,
    },
    /// `addrs` is never empty.
    #[cfg(feature = "etcd")]
    Etcd {
        addrs: Vec<String>,
        tls: Option<Tls>,
    },
}

/// HTTPS to the metadata store.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Tls {
    /// Extra roots (PEM) to trust, for a store behind a private CA.
    pub(crate) ca: Option<PathBuf>,
}

impl Tls {
    fn suffix(tls: &Option<Tls>) -> String {
        match tls.as_ref().and_then(|t| t.ca.as_ref()) {
            Some(ca) => format!("?ca={}", ca.display()),
            None => String::new(),
        }
    }
}

/// Split `rest` at `?`: the address part, and the TLS options (only `ca=PATH`, only when
/// `tls`).
#[cfg(any(feature = "consul", feature = "etcd"))]
fn options<'a>(
    url: &str,
    rest: &'a str,
    tls: bool,
) -> Result<(&'a str, Option<Tls>), MetaUrlError> {
    let bad = |detail: &str| MetaUrlError::BadOption {
        url: url.to_owned(),
        detail: detail.to_owned(),
    };
    let (addrs, query) = match rest.split_once('?') {
        Some((a, q)) => (a, Some(q)),
        None => (rest, None),
    };
    if !tls {
        return match query {
            None => Ok((addrs, None)),
            Some(_) => Err(bad("options need a TLS scheme")),
        };
    }
    let mut t = Tls::default();
    for kv in query.into_iter().flat_map(|q| q.split('&')) {
        match kv.split_once('=') {
            Some(("ca", p)) if !p.is_empty() => t.ca = Some(PathBuf::from(p)),
            _ => return Err(bad(&format!("unknown option {kv:?}"))),
        }
    }
    Ok((addrs, Some(t)))
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
            "consul" | "consuls" => {
                let (addr, tls) = options(url, rest, scheme == "consuls")?;
                if addr.is_empty() {
                    return Err(MetaUrlError::MissingAddress {
                        url: url.to_owned(),
                    });
                }
                Ok(MetaUrl(Backend::Consul {
                    addr: address(url, addr)?,
                    tls,
                }))
            }
            #[cfg(feature = "etcd")]
            "etcd" | "etcds" => {
                let (rest, tls) = options(url, rest, scheme == "etcds")?;
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
                Ok(MetaUrl(Backend::Etcd { addrs, tls }))
            }
            #[cfg(not(feature = "consul"))]
            "consul" | "consuls" => Err(MetaUrlError::NotCompiledIn {
                url: url.to_owned(),
                scheme: scheme.to_owned(),
            }),
            #[cfg(not(feature = "etcd"))]
            "etcd" | "etcds" => Err(MetaUrlError::NotCompiledIn {
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
            Backend::Consul { addr, tls } => {
                let s = if tls.is_some() { "consuls" } else { "consul" };
                write!(f, "{s}://{addr}{}", Tls::suffix(tls))
            }
            #[cfg(feature = "etcd")]
            Backend::Etcd { addrs, tls } => {
                let s = if tls.is_some() { "etcds" } else { "etcd" };
                write!(f, "{s}://{}{}", addrs.join(","), Tls::suffix(tls))
            }
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
        check("etcds://a:2379,b:2379", Ok("etcds://a:2379,b:2379"));
        check(
            "etcds://a:2379?ca=/etc/ca.pem",
            Ok("etcds://a:2379?ca=/etc/ca.pem"),
        );
        check(
            "consuls://h:8501?ca=/ca.pem",
            Ok("consuls://h:8501?ca=/ca.pem"),
        );
        check("consuls://h:8501", Ok("consuls://h:8501"));
        check("etcd://a:2379?ca=/x", Err("options need a TLS scheme"));
        check(
            "etcds://a:2379?verify=no",
            Err("unknown option \"verify=no\""),
        );
        check("etcds://a:2379?ca=", Err("unknown option \"ca=\""));
        check("consuls://?ca=/x", Err("missing HOST:PORT"));
        check("/var/lib/meta", Err("no scheme"));
    }

    #[test]
    fn display_round_trips() {
        for url in [
            "file:///m",
            "consul://h:1",
            "etcd://a:1,b:2",
            "etcds://a:1?ca=/c.pem",
            "consuls://h:1",
        ] {
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
