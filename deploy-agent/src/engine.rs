//! The Docker Engine API over its Unix socket, hand-written over hyper: the agent needs five
//! calls (version, pull, tag, inspect, remove), and bollard, the well-kept client, brings a
//! generated model of the whole API (serde_with, chrono and their trees) for them. One
//! connection per call (the engine is local, a connect costs microseconds), each call under
//! a deadline.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

/// A call's deadline (all but pulls): the engine answers these from memory.
const CALL: Duration = Duration::from_secs(30);
/// A pull from the agent's loopback registry: local copies, bounded by disk speed.
const PULL: Duration = Duration::from_secs(600);

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("cannot reach the Docker engine at {socket}: {source}")]
    Connect {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Docker engine {what}: {source}")]
    Http {
        what: String,
        #[source]
        source: hyper::Error,
    },
    #[error("Docker engine {what}: no answer within {0:?}", .timeout)]
    Timeout { what: String, timeout: Duration },
    #[error("Docker engine {what}: {status} {body}")]
    Status {
        what: String,
        status: StatusCode,
        body: String,
    },
    #[error("Docker engine {what}: {message}")]
    Failed { what: String, message: String },
}

/// The engine's platform, as an image index names platforms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
}

/// A handle on one engine socket.
#[derive(Debug, Clone)]
pub struct Engine {
    socket: PathBuf,
}

impl Engine {
    pub fn new(socket: &Path) -> Engine {
        Engine {
            socket: socket.to_owned(),
        }
    }

    async fn call(
        &self,
        method: Method,
        path_and_query: &str,
        what: &str,
        timeout: Duration,
    ) -> Result<(StatusCode, Bytes), EngineError> {
        let work = async {
            let stream = tokio::net::UnixStream::connect(&self.socket)
                .await
                .map_err(|source| EngineError::Connect {
                    socket: self.socket.clone(),
                    source,
                })?;
            let http = |source| EngineError::Http {
                what: what.to_owned(),
                source,
            };
            let (mut sender, conn) =
                hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(stream))
                    .await
                    .map_err(http)?;
            let req = Request::builder()
                .method(method)
                .uri(path_and_query)
                .header(http::header::HOST, "docker")
                .body(Full::new(Bytes::new()))
                .map_err(|e| EngineError::Failed {
                    what: what.to_owned(),
                    message: e.to_string(),
                })?;
            // The connection is driven beside the request; dropping the sender once the
            // body is read lets it finish, so nothing outlives the call.
            let exchange = async move {
                let resp = sender.send_request(req).await?;
                let status = resp.status();
                let body = resp.into_body().collect().await?.to_bytes();
                drop(sender);
                Ok::<_, hyper::Error>((status, body))
            };
            let (result, _) = tokio::join!(exchange, conn);
            result.map_err(http)
        };
        tokio::time::timeout(timeout, work)
            .await
            .map_err(|_| EngineError::Timeout {
                what: what.to_owned(),
                timeout,
            })?
    }

    async fn ok(
        &self,
        method: Method,
        path_and_query: &str,
        what: &str,
        timeout: Duration,
    ) -> Result<Bytes, EngineError> {
        let (status, body) = self.call(method, path_and_query, what, timeout).await?;
        if !status.is_success() {
            return Err(EngineError::Status {
                what: what.to_owned(),
                status,
                body: String::from_utf8_lossy(&body).trim().to_owned(),
            });
        }
        Ok(body)
    }

    /// `GET /version`: the platform images are chosen for.
    pub async fn platform(&self) -> Result<Platform, EngineError> {
        let body = self.ok(Method::GET, "/version", "version", CALL).await?;
        #[derive(serde::Deserialize)]
        struct Version {
            #[serde(rename = "Os")]
            os: String,
            #[serde(rename = "Arch")]
            arch: String,
        }
        let v: Version = serde_json::from_slice(&body).map_err(|e| EngineError::Failed {
            what: "version".into(),
            message: e.to_string(),
        })?;
        Ok(Platform {
            os: v.os,
            architecture: v.arch,
        })
    }

    /// `POST /images/create`: pull `image` at `reference` (a tag or a digest). The engine
    /// answers 200 and reports a failure inside its progress stream, so the stream is read.
    pub async fn pull(&self, image: &str, reference: &str) -> Result<(), EngineError> {
        let q = format!(
            "/images/create?fromImage={}&tag={}",
            encode(image),
            encode(reference)
        );
        let what = format!("pull {image}:{reference}");
        let body = self.ok(Method::POST, &q, &what, PULL).await?;
        for line in body.split(|b| *b == b'\n') {
            let Ok(v) = serde_json::from_slice::<serde_json::Value>(line) else {
                continue;
            };
            if let Some(e) = v.get("error").and_then(|e| e.as_str()) {
                return Err(EngineError::Failed {
                    what,
                    message: e.to_owned(),
                });
            }
        }
        Ok(())
    }

    /// `POST /images/{image}/tag`: name `image` also `repo:tag`.
    pub async fn tag(&self, image: &str, repo: &str, tag: &str) -> Result<(), EngineError> {
        let q = format!(
            "/images/{}/tag?repo={}&tag={}",
            encode(image),
            encode(repo),
            encode(tag)
        );
        self.ok(
            Method::POST,
            &q,
            &format!("tag {image} as {repo}:{tag}"),
            CALL,
        )
        .await
        .map(|_| ())
    }

    /// `GET /images/{name}/json`: the image id, or `None` when the engine has no such image.
    pub async fn image_id(&self, name: &str) -> Result<Option<String>, EngineError> {
        let what = format!("inspect {name}");
        let (status, body) = self
            .call(
                Method::GET,
                &format!("/images/{}/json", encode(name)),
                &what,
                CALL,
            )
            .await?;
        if status == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !status.is_success() {
            return Err(EngineError::Status {
                what,
                status,
                body: String::from_utf8_lossy(&body).into_owned(),
            });
        }
        let v: serde_json::Value =
            serde_json::from_slice(&body).map_err(|e| EngineError::Failed {
                what,
                message: e.to_string(),
            })?;
        Ok(v.get("Id").and_then(|i| i.as_str()).map(str::to_owned))
    }

    /// `DELETE /images/{name}?noprune=true`: drop one name (the image stays while another
    /// name holds it).
    pub async fn untag(&self, name: &str) -> Result<(), EngineError> {
        self.ok(
            Method::DELETE,
            &format!("/images/{}?noprune=true", encode(name)),
            &format!("remove {name}"),
            CALL,
        )
        .await
        .map(|_| ())
    }
}

/// Percent-encoding for a query value or a path segment holding an image name (`/` and `:`
/// included: the engine decodes both).
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            // The engine routes /images/{name:.*}/json: slashes may stay in a path.
            b'/' => out.push('/'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}
