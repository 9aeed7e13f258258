//! TLS with rustls (the ring provider reqwest already brings). The certificate is reloaded
//! on SIGHUP and when either file changes (polled: a certificate renewer replaces files by
//! rename, which a path poll sees and needs no watcher dependency); a reload that fails is
//! logged and the previous certificate keeps serving, so a half-written renewal never takes
//! the listener down.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio_util::sync::CancellationToken;

/// How often the certificate files are checked for a change.
const POLL: Duration = Duration::from_secs(2);

/// The certificate chain and key a listener serves, as PEM files.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: no PEM certificate found")]
    NoCert { path: PathBuf },
    #[error("{path}: {message}")]
    Pem { path: PathBuf, message: String },
    #[error("certificate {cert} and key {key}: {source}")]
    Key {
        cert: PathBuf,
        key: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("TLS configuration: {0}")]
    Config(#[source] rustls::Error),
}

/// The process's one crypto provider: ring, the one reqwest's rustls already uses.
pub(crate) fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Load and check one certificate chain and its key.
pub(crate) fn load(files: &TlsFiles) -> Result<CertifiedKey, TlsError> {
    let pem = |path: &Path, e: rustls::pki_types::pem::Error| TlsError::Pem {
        path: path.to_owned(),
        message: e.to_string(),
    };
    let cert_pem = read(&files.cert)?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem(&files.cert, e))?;
    if chain.is_empty() {
        return Err(TlsError::NoCert {
            path: files.cert.clone(),
        });
    }
    let key_pem = read(&files.key)?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| pem(&files.key, e))?;
    CertifiedKey::from_der(chain, key, &provider()).map_err(|source| TlsError::Key {
        cert: files.cert.clone(),
        key: files.key.clone(),
        source,
    })
}

/// Hands rustls whatever certificate was loaded last.
#[derive(Debug)]
struct Reloading {
    current: RwLock<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for Reloading {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current.read().ok().map(|c| c.clone())
    }
}

/// A listener's TLS: the acceptor, and the loop that keeps its certificate current.
#[derive(Clone)]
pub(crate) struct Tls {
    pub(crate) acceptor: tokio_rustls::TlsAcceptor,
    resolver: Arc<Reloading>,
    files: TlsFiles,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").field("files", &self.files).finish()
    }
}

impl Tls {
    pub(crate) fn new(files: &TlsFiles) -> Result<Tls, TlsError> {
        let resolver = Arc::new(Reloading {
            current: RwLock::new(Arc::new(load(files)?)),
        });
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(TlsError::Config)?
            .with_no_client_auth()
            .with_cert_resolver(resolver.clone());
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Tls {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(cfg)),
            resolver,
            files: files.clone(),
        })
    }

    fn reload(&self, why: &'static str) {
        match load(&self.files) {
            Ok(k) => {
                if let Ok(mut cur) = self.resolver.current.write() {
                    *cur = Arc::new(k);
                }
                metrics::counter!("flotilla_tls_reloads_total", "result" => "ok").increment(1);
                tracing::info!(cert = %self.files.cert.display(), why, "TLS certificate reloaded");
            }
            Err(e) => {
                metrics::counter!("flotilla_tls_reloads_total", "result" => "error").increment(1);
                tracing::error!(error = %e, why, "TLS certificate reload failed; still serving the previous one");
            }
        }
    }

    /// Reload on SIGHUP or when a file's modification time or size changes, until `stop`.
    pub(crate) async fn watch(self, stop: CancellationToken) {
        let stamp = |p: &Path| -> Option<(SystemTime, u64)> {
            let m = std::fs::metadata(p).ok()?;
            Some((m.modified().ok()?, m.len()))
        };
        let stamps = |t: &Tls| (stamp(&t.files.cert), stamp(&t.files.key));
        let mut last = stamps(&self);
        #[cfg(unix)]
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        let mut tick = tokio::time::interval(POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            #[cfg(unix)]
            let sighup = async {
                match hup.as_mut() {
                    Some(s) => {
                        s.recv().await;
                    }
                    None => std::future::pending().await,
                }
            };
            #[cfg(not(unix))]
            let sighup = std::future::pending::<()>();
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = sighup => {
                    last = stamps(&self);
                    self.reload("SIGHUP");
                }
                _ = tick.tick() => {
                    let now = stamps(&self);
                    if now != last {
                        last = now;
                        self.reload("file changed");
                    }
                }
            }
        }
    }
}
