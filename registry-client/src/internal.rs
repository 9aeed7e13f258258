//! The node-internal API (`/internal/v1`): what routers and seeders ask of a node beyond the
//! OCI API. Every request carries the cluster's shared secret in [`SECRET_HEADER`].
//!
//! The paths, headers and bodies are defined here once: the node's handlers deserialize the
//! same types [`NodeClient`] serializes, so the two sides cannot drift apart.

use std::time::Duration;

use flotilla_core::{NodeId, RackId, RepoName};
use serde::{Deserialize, Serialize};

/// Header carrying the cluster's shared secret on every internal request.
pub const SECRET_HEADER: &str = "x-flotilla-secret";

/// Where the internal API is mounted on a node.
pub const PREFIX: &str = "/internal/v1";
/// `GET`: [`NodeStatus`].
pub const STATUS: &str = "/status";
/// `POST`: bring tags and links in line with object storage; [`CatchUp`].
pub const CATCH_UP: &str = "/catch-up";
/// `POST` [`SeedRequest`]: copy one repository from object storage; [`SeedStats`].
pub const SEED: &str = "/seed";
/// `POST`: the seeder finished this node's disk; [`Seeded`].
pub const SEEDED: &str = "/seeded";

/// What `GET /internal/v1/status` answers.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NodeStatus {
    pub id: NodeId,
    pub rack: RackId,
    pub ready: bool,
    /// The disk still waits for a seeder (new or wiped).
    #[serde(default)]
    pub needs_seed: bool,
    /// Names the reseed this disk waits for (empty when none), so a seeder resuming a reseed
    /// can tell a disk wiped again from the one it was filling.
    #[serde(default)]
    pub seed_id: String,
}

/// Body of `POST /internal/v1/seed`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SeedRequest {
    pub repo: RepoName,
    /// Re-hash blobs already on disk (the first pass); a final catch-up pass skips it.
    #[serde(default = "yes")]
    pub verify: bool,
}

fn yes() -> bool {
    true
}

/// What seeding one repository did (the answer of `POST /internal/v1/seed`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeedStats {
    /// Objects of the repository now present and verified locally (tags, manifests, blobs).
    pub objects: u64,
    /// Bytes of blobs and manifests now present and verified locally.
    pub bytes: u64,
    /// Of those, bytes fetched from object storage by this call.
    pub fetched_bytes: u64,
    /// Links whose blob object storage does not hold (reported, not fatal).
    pub missing: u64,
}

impl SeedStats {
    /// Count one object: `(size, bytes fetched)` when present, `None` when object storage
    /// lacks it.
    pub fn count(&mut self, got: Option<(u64, u64)>) {
        match got {
            Some((size, fetched)) => {
                self.objects += 1;
                self.bytes += size;
                self.fetched_bytes += fetched;
            }
            None => self.missing += 1,
        }
    }
}

/// Answer of `POST /internal/v1/catch-up`.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct CatchUp {
    /// Local entries changed to match object storage.
    pub changed: usize,
}

/// Answer of `POST /internal/v1/seeded`.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct Seeded {
    pub needs_seed: bool,
}

/// Failures of an internal call, with the node's answer when there was one.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("building the HTTP client: {0}")]
    Build(#[source] reqwest::Error),
    #[error("{0}")]
    Ca(#[from] crate::tls::CaError),
    #[error("{url}: {source}")]
    Transport {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("{url}: {status}: {body}")]
    Status {
        url: String,
        status: http::StatusCode,
        body: String,
    },
    #[error("{url}: undecodable answer: {source}")]
    Decode {
        url: String,
        #[source]
        source: reqwest::Error,
    },
}

impl ClientError {
    /// The node answered 401/403: the secret is missing or wrong, which retrying cannot fix.
    pub fn is_auth(&self) -> bool {
        matches!(self, ClientError::Status { status, .. }
            if *status == http::StatusCode::UNAUTHORIZED || *status == http::StatusCode::FORBIDDEN)
    }
}

/// Calls of the node-internal API, each with a deadline that fits its work.
#[derive(Clone, Debug)]
pub struct NodeClient {
    http: reqwest::Client,
    secret: Option<String>,
}

/// A status probe is tiny; a node that cannot answer it in this long is not serving.
pub const STATUS_TIMEOUT: Duration = Duration::from_secs(5);
/// One seeding call copies a whole repository; large ones take minutes.
pub const SEED_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// Clearing the seed flag is one durable file write.
pub const SEEDED_TIMEOUT: Duration = Duration::from_secs(10);
/// A catch-up lists the node's repositories in object storage.
pub const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(60);

impl NodeClient {
    /// A client with its own connection pool (short connect timeout: a dead node must cost
    /// well under a second to notice).
    pub fn new(secret: Option<String>) -> Result<Self, ClientError> {
        Self::with_ca(secret, None)
    }

    /// As [`NodeClient::new`], also trusting the roots in the PEM file `ca` (nodes serving
    /// TLS with a private CA).
    pub fn with_ca(
        secret: Option<String>,
        ca: Option<&std::path::Path>,
    ) -> Result<Self, ClientError> {
        // Pooled connections are dropped before a node's idle timeout (60 s by default)
        // would close them under a request.
        let b = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(2))
            .pool_idle_timeout(Duration::from_secs(30));
        let http = crate::tls::trust(b, ca)?
            .build()
            .map_err(ClientError::Build)?;
        Ok(NodeClient { http, secret })
    }

    /// Share an existing client's pool (the router keeps one for all node traffic).
    pub fn with_http(http: reqwest::Client, secret: Option<String>) -> Self {
        NodeClient { http, secret }
    }

    fn url(base: &str, path: &str) -> String {
        format!("{}{PREFIX}{path}", base.trim_end_matches('/'))
    }

    fn request(&self, method: http::Method, url: &str) -> reqwest::RequestBuilder {
        let b = self.http.request(method, url);
        match &self.secret {
            Some(s) => b.header(SECRET_HEADER, s),
            None => b,
        }
    }

    async fn call<T: serde::de::DeserializeOwned>(
        &self,
        b: reqwest::RequestBuilder,
        url: String,
    ) -> Result<T, ClientError> {
        let r = b.send().await.map_err(|source| ClientError::Transport {
            url: url.clone(),
            source,
        })?;
        let status = r.status();
        if !status.is_success() {
            let body = r.text().await.unwrap_or_default();
            return Err(ClientError::Status { url, status, body });
        }
        r.json()
            .await
            .map_err(|source| ClientError::Decode { url, source })
    }

    /// `GET /internal/v1/status` of the node at `base`.
    pub async fn status(&self, base: &str) -> Result<NodeStatus, ClientError> {
        self.status_within(base, STATUS_TIMEOUT).await
    }

    /// [`Self::status`] with a caller's deadline (the router's liveness probe is tighter).
    pub async fn status_within(
        &self,
        base: &str,
        timeout: Duration,
    ) -> Result<NodeStatus, ClientError> {
        let url = Self::url(base, STATUS);
        let b = self.request(http::Method::GET, &url).timeout(timeout);
        self.call(b, url).await
    }

    /// Whether the node at `base` answers at all within `timeout`: any HTTP status but a
    /// 5xx means the process is up (a 401 from a misconfigured secret included).
    pub async fn probe(
        &self,
        base: &str,
        timeout: Duration,
    ) -> Result<http::StatusCode, ClientError> {
        let url = Self::url(base, STATUS);
        let b = self.request(http::Method::GET, &url).timeout(timeout);
        b.send()
            .await
            .map(|r| r.status())
            .map_err(|source| ClientError::Transport { url, source })
    }

    /// Make the node copy `repo` from object storage (verified; idempotent).
    pub async fn seed(
        &self,
        base: &str,
        repo: &RepoName,
        verify: bool,
    ) -> Result<SeedStats, ClientError> {
        let url = Self::url(base, SEED);
        let body = SeedRequest {
            repo: repo.clone(),
            verify,
        };
        let b = self
            .request(http::Method::POST, &url)
            .json(&body)
            .timeout(SEED_TIMEOUT);
        self.call(b, url).await
    }

    /// Tell the node its disk is complete; it reports ready from its next heartbeat.
    pub async fn seeded(&self, base: &str) -> Result<Seeded, ClientError> {
        let url = Self::url(base, SEEDED);
        let b = self
            .request(http::Method::POST, &url)
            .timeout(SEEDED_TIMEOUT);
        self.call(b, url).await
    }

    /// Ask the node to catch up with object storage now.
    pub async fn catch_up(&self, base: &str) -> Result<CatchUp, ClientError> {
        let url = Self::url(base, CATCH_UP);
        let b = self
            .request(http::Method::POST, &url)
            .timeout(CATCH_UP_TIMEOUT);
        self.call(b, url).await
    }
}
