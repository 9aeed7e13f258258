//! Reading from the registry: manifests through the routers (in order, the next on any
//! failure), blobs from the key's replicas directly by the signed URLs a router hands out
//! (`GET /v2/REPO/blobs/DIGEST?flotilla-sources`), then from the routers. Every blob is
//! hashed as it streams into a temporary file and renamed to its final name only when the
//! digest and size match, so a final file is always verified. Failing over is cheap by
//! construction: a connect must succeed within [`DIAL`], a response head arrive within
//! [`HEAD`], and every body chunk within [`IDLE`].

use std::path::{Path, PathBuf};
use std::time::Duration;

use flotilla_core::{Digest, DigestHasher, RepoName};
use futures::StreamExt;
use http::StatusCode;
use tokio::io::AsyncWriteExt;

/// Connect deadline per source: a dead node on a LAN refuses or times out well under it.
pub const DIAL: Duration = Duration::from_millis(300);
/// Response head deadline per source (a frozen node accepts, then never answers).
pub const HEAD: Duration = Duration::from_secs(3);
/// Longest wait for the next body chunk.
pub const IDLE: Duration = Duration::from_secs(10);

/// Manifest types the agent accepts, indexes included (it picks a platform itself).
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json";

/// Largest manifest accepted (the registry's own cap).
const MANIFEST_LIMIT: usize = 4 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("{0}")]
    Http(String),
    #[error("digest mismatch: got {got}")]
    Mismatch { got: Digest },
    #[error("size mismatch: got {got} bytes, the manifest says {want}")]
    Size { got: u64, want: u64 },
    #[error("writing {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A manifest as the registry holds it: its bytes, media type and (verified) digest.
#[derive(Debug, Clone)]
pub struct Manifest {
    pub bytes: bytes::Bytes,
    pub media_type: String,
    pub digest: Digest,
}

/// How the agent signs in to the routers.
#[derive(Clone)]
pub enum Credentials {
    None,
    Basic { user: String, password: String },
    Bearer(String),
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secret itself.
        f.write_str(match self {
            Credentials::None => "None",
            Credentials::Basic { .. } => "Basic",
            Credentials::Bearer(_) => "Bearer",
        })
    }
}

impl Credentials {
    fn header(&self) -> Option<String> {
        use base64::Engine as _;
        match self {
            Credentials::None => None,
            Credentials::Basic { user, password } => Some(format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
            )),
            Credentials::Bearer(t) => Some(format!("Bearer {t}")),
        }
    }
}

/// One place a blob may be read from.
#[derive(Debug, Clone)]
pub struct Source {
    /// `n1`, or `router http://...`: for logs and errors.
    pub name: String,
    pub url: String,
    /// Routers get the credentials; nodes get a signed URL and nothing else.
    pub router: bool,
}

#[derive(serde::Deserialize)]
struct SourcesBody {
    key: String,
    sources: Vec<SourceBody>,
}

#[derive(serde::Deserialize)]
struct SourceBody {
    node: String,
    url: String,
}

/// The registry as the agent sees it: routers in order, and its two HTTP clients.
#[derive(Debug, Clone)]
pub struct Registry {
    routers: Vec<String>,
    credentials: Credentials,
    http: reqwest::Client,
}

impl Registry {
    pub fn new(routers: Vec<String>, credentials: Credentials) -> Result<Registry, FetchError> {
        let http = reqwest::Client::builder()
            .connect_timeout(DIAL)
            // A redirect would carry the request to a node the agent already tried.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| FetchError::Http(e.to_string()))?;
        Ok(Registry {
            routers: routers
                .into_iter()
                .map(|r| r.trim_end_matches('/').to_owned())
                .collect(),
            credentials,
            http,
        })
    }

    fn get(&self, url: &str, router: bool) -> reqwest::RequestBuilder {
        let mut rb = self.http.get(url);
        if router {
            if let Some(h) = self.credentials.header() {
                rb = rb.header(http::header::AUTHORIZATION, h);
            }
        }
        rb
    }

    /// Send with the head deadline; any non-2xx is an error naming its status and OCI code.
    async fn send(&self, rb: reqwest::RequestBuilder) -> Result<reqwest::Response, FetchError> {
        let resp = tokio::time::timeout(HEAD, rb.send())
            .await
            .map_err(|_| FetchError::Http(format!("no response within {HEAD:?}")))?
            .map_err(|e| FetchError::Http(describe(e)))?;
        if !resp.status().is_success() {
            let status = resp.status();
            let body = tokio::time::timeout(IDLE, resp.text())
                .await
                .ok()
                .and_then(Result::ok)
                .unwrap_or_default();
            return Err(FetchError::Http(status_text(status, &body)));
        }
        Ok(resp)
    }

    /// `GET /v2/REPO/manifests/REFERENCE` through each router in turn. The digest is
    /// computed from the bytes; a digest reference must match it, and so must the
    /// router's `Docker-Content-Digest`.
    pub async fn manifest(
        &self,
        repo: &RepoName,
        reference: &str,
    ) -> Result<Manifest, Vec<String>> {
        let mut failures = Vec::new();
        for router in &self.routers {
            let url = format!("{router}/v2/{repo}/manifests/{reference}");
            let attempt = async {
                let resp = self
                    .send(
                        self.get(&url, true)
                            .header(http::header::ACCEPT, MANIFEST_ACCEPT),
                    )
                    .await?;
                let media_type = resp
                    .headers()
                    .get(http::header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_owned();
                let claimed = resp
                    .headers()
                    .get("docker-content-digest")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned);
                let bytes = read_capped(resp, MANIFEST_LIMIT).await?;
                let digest = Digest::sha256_of(&bytes);
                let want = reference
                    .parse::<Digest>()
                    .ok()
                    .or_else(|| claimed.and_then(|c| c.parse().ok()));
                if want.is_some_and(|w| w != digest) {
                    return Err(FetchError::Mismatch { got: digest });
                }
                Ok(Manifest {
                    bytes,
                    media_type,
                    digest,
                })
            };
            match attempt.await {
                Ok(m) => return Ok(m),
                Err(e) => {
                    tracing::warn!(%router, %repo, %reference, error = %e, "manifest read failed");
                    failures.push(format!("router {router}: {e}"));
                }
            }
        }
        Err(failures)
    }

    /// The blob's sources: each replica's signed URL (from the first router that answers),
    /// then every router. Also the key, as the router names it.
    pub async fn sources(&self, repo: &RepoName, digest: &Digest) -> (Option<String>, Vec<Source>) {
        let mut out = Vec::new();
        let mut key = None;
        for router in &self.routers {
            let url = format!("{router}/v2/{repo}/blobs/{digest}?flotilla-sources");
            let attempt = async {
                let resp = self.send(self.get(&url, true)).await?;
                let bytes = read_capped(resp, 1024 * 1024).await?;
                serde_json::from_slice::<SourcesBody>(&bytes)
                    .map_err(|e| FetchError::Http(format!("bad sources answer: {e}")))
            };
            match attempt.await {
                Ok(body) => {
                    key = Some(body.key);
                    out.extend(body.sources.into_iter().map(|s| Source {
                        name: s.node,
                        url: s.url,
                        router: false,
                    }));
                    break;
                }
                Err(e) => {
                    tracing::warn!(%router, %digest, error = %e, "no sources from this router")
                }
            }
        }
        out.extend(self.routers.iter().map(|r| Source {
            name: format!("router {r}"),
            url: format!("{r}/v2/{repo}/blobs/{digest}"),
            router: true,
        }));
        (key, out)
    }

    /// Stream one source's copy of `digest` into `dest`, verified: hashed as it arrives into
    /// a temporary file beside `dest`, renamed only when digest and size match.
    pub async fn fetch_to(
        &self,
        source: &Source,
        digest: &Digest,
        size: u64,
        dest: &Path,
    ) -> Result<(), FetchError> {
        let resp = self.send(self.get(&source.url, source.router)).await?;
        let dir = dest.parent().unwrap_or(Path::new("."));
        let io = |source| FetchError::Io {
            path: dest.to_owned(),
            source,
        };
        let tmp = tempfile::NamedTempFile::new_in(dir).map_err(io)?;
        let (std_file, tmp_path) = tmp.into_parts();
        let mut file = tokio::fs::File::from_std(std_file);
        let mut hasher = DigestHasher::new(digest.algorithm());
        let mut got = 0u64;
        let mut body = resp.bytes_stream();
        loop {
            let chunk = match tokio::time::timeout(IDLE, body.next()).await {
                Err(_) => return Err(FetchError::Http(format!("no body bytes for {IDLE:?}"))),
                Ok(None) => break,
                Ok(Some(Err(e))) => return Err(FetchError::Http(describe(e))),
                Ok(Some(Ok(c))) => c,
            };
            got += chunk.len() as u64;
            if got > size {
                return Err(FetchError::Size { got, want: size });
            }
            hasher.update(&chunk);
            file.write_all(&chunk).await.map_err(io)?;
        }
        if got != size {
            return Err(FetchError::Size { got, want: size });
        }
        let computed = hasher.finish();
        if &computed != digest {
            return Err(FetchError::Mismatch { got: computed });
        }
        file.flush().await.map_err(io)?;
        drop(file);
        tmp_path.persist(dest).map_err(|e| io(e.error))?;
        Ok(())
    }
}

async fn read_capped(resp: reqwest::Response, limit: usize) -> Result<bytes::Bytes, FetchError> {
    let mut out = Vec::new();
    let mut body = resp.bytes_stream();
    loop {
        match tokio::time::timeout(IDLE, body.next()).await {
            Err(_) => return Err(FetchError::Http(format!("no body bytes for {IDLE:?}"))),
            Ok(None) => return Ok(out.into()),
            Ok(Some(Err(e))) => return Err(FetchError::Http(describe(e))),
            Ok(Some(Ok(c))) => {
                out.extend_from_slice(&c);
                if out.len() > limit {
                    return Err(FetchError::Http(format!("body over {limit} bytes")));
                }
            }
        }
    }
}

fn status_text(status: StatusCode, body: &str) -> String {
    let code = serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["errors"][0]["code"].as_str().map(str::to_owned));
    match code {
        Some(c) => format!("{status} {c}"),
        None => status.to_string(),
    }
}

/// reqwest's error with its causes (a bare "error sending request" says nothing), without
/// the URL: a signed URL is a read grant, not for logs.
fn describe(e: reqwest::Error) -> String {
    let e = e.without_url();
    let mut s = e.to_string();
    let mut cur = std::error::Error::source(&e);
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
