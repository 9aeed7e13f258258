//! Root certificates a client trusts besides the system's: `--tls-ca`, for nodes (and
//! metadata stores) serving TLS under a private CA. Read once at start; a bad file fails the
//! start naming the flag.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("--tls-ca {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("--tls-ca {path}: not a PEM certificate bundle: {source}")]
    Pem {
        path: PathBuf,
        #[source]
        source: reqwest::Error,
    },
    #[error("--tls-ca {path}: no certificate in the file")]
    Empty { path: PathBuf },
}

/// The PEM bundle at `path` as reqwest roots.
pub fn load(path: &Path) -> Result<Vec<reqwest::Certificate>, CaError> {
    let pem = std::fs::read(path).map_err(|source| CaError::Read {
        path: path.to_owned(),
        source,
    })?;
    let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|source| CaError::Pem {
        path: path.to_owned(),
        source,
    })?;
    if certs.is_empty() {
        return Err(CaError::Empty {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

/// `b`, also trusting every root in `ca` when given.
pub fn trust(
    mut b: reqwest::ClientBuilder,
    ca: Option<&Path>,
) -> Result<reqwest::ClientBuilder, CaError> {
    if let Some(path) = ca {
        for c in load(path)? {
            b = b.add_root_certificate(c);
        }
    }
    Ok(b)
}
