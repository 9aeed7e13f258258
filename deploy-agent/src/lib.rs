//! The deploy agent: `flotilla agent pull` pulls an image into the local Docker engine so
//! that a dead or corrupt registry node costs a deploy well under a second, not a failure.
//!
//! How a pull goes ([`pull`]): the engine's platform (`engine`); the tag resolved once
//! through the routers (`fetch::Registry::manifest`), an index narrowed to that platform;
//! then every blob fetched from the key's replicas directly, by the signed URLs a router
//! hands out for them, then from the routers, each copy hashed as it streams and kept only
//! when it matches (`fetch`); finally the engine pulls the image from a loopback registry
//! serving only those verified files (`loopback`), and the image is named as a `docker pull`
//! through the first router would have named it. Unverified bytes never reach the engine.

pub mod engine;
pub mod fetch;
mod loopback;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use flotilla_core::{Digest, Reference, RepoName};
use futures::{StreamExt, TryStreamExt};

pub use engine::{Engine, EngineError, Platform};
pub use fetch::{Credentials, FetchError, Registry};

/// Blobs fetched at once: layers of one image in parallel, as engines do.
const PARALLEL_BLOBS: usize = 3;

/// An image as `flotilla agent pull` takes it: `REPO:TAG`, `REPO@DIGEST` or `REPO`
/// (`:latest`), with no registry host (the routers are the registry).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    pub repo: RepoName,
    pub reference: Reference,
}

impl std::str::FromStr for ImageRef {
    type Err = flotilla_core::ParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (repo, reference) = match s.split_once('@') {
            Some((r, d)) => (r, d),
            None => match s.rsplit_once(':') {
                Some((r, t)) if !t.contains('/') => (r, t),
                _ => (s, "latest"),
            },
        };
        Ok(ImageRef {
            repo: repo.parse()?,
            reference: reference.parse()?,
        })
    }
}

impl std::fmt::Display for ImageRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.reference {
            Reference::Tag(t) => write!(f, "{}:{t}", self.repo),
            Reference::Digest(d) => write!(f, "{}@{d}", self.repo),
        }
    }
}

/// What `flotilla agent pull` was told.
#[derive(Debug, Clone)]
pub struct PullConfig {
    /// Router base URLs, tried in order.
    pub routers: Vec<String>,
    pub image: ImageRef,
    pub docker_socket: PathBuf,
    pub credentials: Credentials,
    /// Where verified blobs wait for the engine (a temporary directory inside it).
    pub work_dir: PathBuf,
}

/// What a pull left in the engine.
#[derive(Debug, Clone)]
pub struct Pulled {
    /// The manifest the reference names (an index when the image is multi-arch).
    pub digest: Digest,
    /// The platform's image manifest (equal to `digest` for a single-arch image).
    pub image_manifest: Digest,
    /// The engine's image id (the config digest).
    pub image_id: String,
    /// The name the image carries in the engine: `ROUTER_HOST/REPO:TAG`.
    pub name: String,
}

#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error("no router resolved {image}: {}", .failures.join("; "))]
    Resolve {
        image: String,
        failures: Vec<String>,
    },
    #[error("{image}: {message}")]
    Manifest { image: String, message: String },
    #[error("{image}: the index has no manifest for {os}/{architecture}")]
    NoPlatform {
        image: String,
        os: String,
        architecture: String,
    },
    #[error("no source delivered verified bytes of blob {digest} (key {key}): {}", .tried.join("; "))]
    NoSource {
        key: String,
        digest: Digest,
        tried: Vec<String>,
    },
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Fetch(#[from] FetchError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("a router URL without a host: {0}")]
    RouterUrl(String),
}

#[derive(serde::Deserialize)]
struct Descriptor {
    digest: Digest,
    size: u64,
    #[serde(default)]
    platform: Option<PlatformBody>,
}

#[derive(serde::Deserialize)]
struct PlatformBody {
    os: String,
    architecture: String,
}

#[derive(serde::Deserialize)]
struct IndexBody {
    manifests: Vec<Descriptor>,
}

#[derive(serde::Deserialize)]
struct ImageBody {
    config: Descriptor,
    #[serde(default)]
    layers: Vec<Descriptor>,
}

/// `host:port` of a router URL: the registry part of the name the image gets.
fn router_host(url: &str) -> Result<String, PullError> {
    let rest = url
        .split_once("://")
        .map(|(_, r)| r)
        .unwrap_or(url)
        .split('/')
        .next()
        .unwrap_or_default();
    if rest.is_empty() {
        return Err(PullError::RouterUrl(url.to_owned()));
    }
    Ok(rest.to_owned())
}

/// Pull `cfg.image` into the engine (module doc). Fails only when no source delivered
/// verified bytes of something the image needs, or the engine refused.
pub async fn pull(cfg: &PullConfig) -> Result<Pulled, PullError> {
    let started = Instant::now();
    let image = cfg.image.to_string();
    let host = router_host(cfg.routers.first().map(String::as_str).unwrap_or(""))?;
    let engine = Engine::new(&cfg.docker_socket);
    let platform = engine.platform().await?;
    let registry = Registry::new(cfg.routers.clone(), cfg.credentials.clone())?;
    let repo = &cfg.image.repo;

    let top = registry
        .manifest(repo, &cfg.image.reference.to_string())
        .await
        .map_err(|failures| PullError::Resolve {
            image: image.clone(),
            failures,
        })?;
    let bad = |message: String| PullError::Manifest {
        image: image.clone(),
        message,
    };
    let manifest = if flotilla_core::media::is_index(&top.media_type) {
        let index: IndexBody = serde_json::from_slice(&top.bytes)
            .map_err(|e| bad(format!("unreadable index: {e}")))?;
        let pick = index
            .manifests
            .iter()
            .find(|m| {
                m.platform
                    .as_ref()
                    .is_some_and(|p| p.os == platform.os && p.architecture == platform.architecture)
            })
            .ok_or_else(|| PullError::NoPlatform {
                image: image.clone(),
                os: platform.os.clone(),
                architecture: platform.architecture.clone(),
            })?;
        tracing::info!(%image, platform = %format!("{}/{}", platform.os, platform.architecture),
            manifest = %pick.digest, "picked the engine's platform from the index");
        registry
            .manifest(repo, &pick.digest.to_string())
            .await
            .map_err(|failures| PullError::Resolve {
                image: format!("{repo}@{}", pick.digest),
                failures,
            })?
    } else {
        top.clone()
    };
    let body: ImageBody = serde_json::from_slice(&manifest.bytes)
        .map_err(|e| bad(format!("unreadable image manifest: {e}")))?;
    let mut blobs = BTreeMap::new();
    for d in std::iter::once(&body.config).chain(&body.layers) {
        blobs.insert(d.digest.clone(), d.size);
    }

    std::fs::create_dir_all(&cfg.work_dir).map_err(|source| PullError::Io {
        what: format!("creating {}", cfg.work_dir.display()),
        source,
    })?;
    let work = tempfile::Builder::new()
        .prefix("pull-")
        .tempdir_in(&cfg.work_dir)
        .map_err(|source| PullError::Io {
            what: format!("a temporary directory in {}", cfg.work_dir.display()),
            source,
        })?;
    let blob_dir = work.path().join("blobs");
    std::fs::create_dir_all(&blob_dir).map_err(|source| PullError::Io {
        what: format!("creating {}", blob_dir.display()),
        source,
    })?;
    futures::stream::iter(blobs.iter().map(|(digest, size)| {
        let (registry, blob_dir) = (&registry, &blob_dir);
        async move { fetch_blob(registry, repo, digest, *size, blob_dir).await }
    }))
    .buffer_unordered(PARALLEL_BLOBS)
    .try_collect::<Vec<()>>()
    .await?;
    let fetched = started.elapsed();

    // Every byte is verified: now the engine may have it.
    let (tag, engine_ref) = match &cfg.image.reference {
        Reference::Tag(t) => (t.to_string(), t.to_string()),
        Reference::Digest(d) => (
            format!("flotilla-{}", &d.hex()[..12]),
            manifest.digest.to_string(),
        ),
    };
    let served = Arc::new(loopback::Served {
        repo: repo.clone(),
        tag: tag.clone(),
        manifest: manifest.clone(),
        blobs: blob_dir.clone(),
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|source| PullError::Io {
            what: "binding the loopback registry".into(),
            source,
        })?;
    let port = listener
        .local_addr()
        .map_err(|source| PullError::Io {
            what: "the loopback registry's address".into(),
            source,
        })?
        .port();
    let loop_repo = format!("127.0.0.1:{port}/{repo}");
    let stop = tokio_util::sync::CancellationToken::new();
    let server = axum::serve(listener, loopback::app(served))
        .with_graceful_shutdown(stop.clone().cancelled_owned());
    let pulling = async {
        let r = engine.pull(&loop_repo, &engine_ref).await;
        stop.cancel();
        r
    };
    let (pulled, served) = tokio::join!(pulling, server);
    if let Err(e) = served {
        tracing::warn!(error = %e, "loopback registry");
    }
    pulled?;

    let loop_name = match &cfg.image.reference {
        Reference::Tag(_) => format!("{loop_repo}:{tag}"),
        Reference::Digest(_) => format!("{loop_repo}@{engine_ref}"),
    };
    let name = format!("{host}/{repo}");
    engine.tag(&loop_name, &name, &tag).await?;
    let image_id = engine
        .image_id(&format!("{name}:{tag}"))
        .await?
        .unwrap_or_default();
    // The loopback names die with this process's port: drop them, the image keeps its name.
    for n in [
        format!("{loop_repo}:{tag}"),
        format!("{loop_repo}@{}", manifest.digest),
    ] {
        if let Err(e) = engine.untag(&n).await {
            tracing::debug!(name = %n, error = %e, "loopback name not removed");
        }
    }
    tracing::info!(%image, digest = %top.digest, %image_id, blobs = blobs.len(),
        fetch_ms = fetched.as_millis() as u64, total_ms = started.elapsed().as_millis() as u64,
        "pulled");
    metrics::counter!("flotilla_agent_pulls_total").increment(1);
    Ok(Pulled {
        digest: top.digest,
        image_manifest: manifest.digest,
        image_id,
        name: format!("{name}:{tag}"),
    })
}

/// One blob: every source in turn until one copy verifies.
async fn fetch_blob(
    registry: &Registry,
    repo: &RepoName,
    digest: &Digest,
    size: u64,
    dir: &std::path::Path,
) -> Result<(), PullError> {
    let dest = dir.join(digest.hex());
    let (key, sources) = registry.sources(repo, digest).await;
    let mut tried = Vec::new();
    for source in &sources {
        let t = Instant::now();
        match registry.fetch_to(source, digest, size, &dest).await {
            Ok(()) => {
                tracing::debug!(%digest, source = %source.name, ms = t.elapsed().as_millis() as u64, "blob verified");
                return Ok(());
            }
            Err(e) => {
                metrics::counter!("flotilla_agent_source_failures_total").increment(1);
                tracing::warn!(%digest, source = %source.name, error = %e,
                    ms = t.elapsed().as_millis() as u64, "source failed; next one");
                tried.push(format!("{}: {e}", source.name));
            }
        }
    }
    Err(PullError::NoSource {
        key: key.unwrap_or_else(|| format!("of {repo}")),
        digest: digest.clone(),
        tried,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_references_parse_as_the_cli_takes_them() {
        let check = |s: &str, repo: &str, reference: &str| {
            let r: ImageRef = s.parse().unwrap_or_else(|e| panic!("{s}: {e}"));
            assert_eq!(
                (r.repo.as_str(), r.reference.to_string().as_str()),
                (repo, reference)
            );
            assert_eq!(r.to_string().parse::<ImageRef>().unwrap(), r);
        };
        check("billing/api:v1", "billing/api", "v1");
        check("billing/api/worker", "billing/api/worker", "latest");
        let d = format!("sha256:{}", "a".repeat(64));
        check(&format!("billing/api@{d}"), "billing/api", &d);
        assert!("Billing/api:v1".parse::<ImageRef>().is_err());
        assert!("billing/api@sha256:xyz".parse::<ImageRef>().is_err());
    }

    #[test]
    fn the_image_is_named_after_the_first_router() {
        assert_eq!(
            router_host("http://127.0.0.1:5000/").unwrap(),
            "127.0.0.1:5000"
        );
        assert_eq!(
            router_host("https://reg.example:443").unwrap(),
            "reg.example:443"
        );
        assert!(router_host("http://").is_err());
    }
}
