//! Request forwarding: one typed route decides where a request goes and how it may be
//! retried. Reads fail over across replicas; manifest and tag writes go to the primary and
//! then synchronously to the live partner; blob bytes stream to one node, and the partner
//! is warmed asynchronously (it reads through object storage until then).

use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use flotilla_core::{ErrorCode, RepoName, UploadId};
use futures::{StreamExt, TryStreamExt};
use http::{HeaderMap, HeaderValue, Method, StatusCode};
use registry_client::{ApiError, OciRoute, API_VERSION_HEADER};
use shardmap::NodeRecord;

use crate::cluster::{ReplicaOrder, Unplaced};
use crate::manifest_cache::Cacheable;
use crate::Cluster;

const MANIFEST_LIMIT: usize = 4 * 1024 * 1024;
/// One attempt of a manifest or tag write (or delete) on one replica: a few small objects
/// written through to object storage. A replica slower than this is failed over (primary)
/// or marked lagging (the others) and catches up by itself: a slow copy costs its own
/// freshness, not the client's write.
const WRITE_ATTEMPT: std::time::Duration = std::time::Duration::from_secs(5);
/// How long before an attempt's timeout the node must have stopped trying to apply it: the
/// time its last visible step (one small object-storage PUT, then a local rename) may take.
const FENCE_MARGIN: std::time::Duration = std::time::Duration::from_millis(500);
/// A metadata read (manifest, tags, referrers) not answered by the first replica within
/// this is also sent to the next one, and the first answer wins: a frozen replica costs a
/// client this much, not the upstream timeout.
const HEDGE_AFTER: std::time::Duration = std::time::Duration::from_millis(300);

/// Headers that describe one hop, never forwarded.
fn hop_by_hop(name: &http::HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "transfer-encoding"
            | "te"
            | "trailer"
            | "upgrade"
            | "host"
            | "proxy-connection"
            // Between node and router only (see `VERIFIED_HEADER`).
            | registry_client::VERIFIED_HEADER
    )
}

/// The client's credentials are the router's to check, never a node's to see.
fn client_credential(name: &http::HeaderName) -> bool {
    matches!(
        name.as_str(),
        "authorization" | "cookie" | "proxy-authorization"
    )
}

fn finish(mut resp: Response) -> Response {
    resp.headers_mut()
        .insert(API_VERSION_HEADER, HeaderValue::from_static("registry/2.0"));
    resp
}

pub async fn handle(State(cluster): State<Cluster>, mut req: Request) -> Response {
    let started = Instant::now();
    // The guard has parsed it when authentication is on.
    let route = match req
        .extensions_mut()
        .get_mut::<crate::auth::Authorized>()
        .and_then(|a| a.route.take())
    {
        Some(route) => Ok(route),
        None => OciRoute::parse_for(req.method(), req.uri().path()),
    };
    let label = route.as_ref().map(OciRoute::label).unwrap_or("invalid");
    let method = req.method().clone();
    let resp = match route {
        Ok(route) => dispatch(&cluster, route, req)
            .await
            .unwrap_or_else(IntoResponse::into_response),
        Err(e) => e.into_response(),
    };
    metrics::counter!("flotilla_router_requests_total",
        "route" => label, "method" => registry_client::method_label(&method), "status" => resp.status().as_u16().to_string())
    .increment(1);
    metrics::histogram!("flotilla_router_request_seconds", "route" => label)
        .record(started.elapsed().as_secs_f64());
    finish(resp)
}

fn unavailable(what: &str) -> ApiError {
    ApiError::new(ErrorCode::Unavailable).message(what.to_owned())
}

fn shard_error(e: crate::RouterError) -> ApiError {
    tracing::error!(error = %e, "shard map unavailable");
    unavailable("the shard map is unavailable; retry later")
}

async fn dispatch(cluster: &Cluster, route: OciRoute, req: Request) -> Result<Response, ApiError> {
    let depth = cluster.config().shard_key_depth;
    let method = req.method().clone();
    let kind = if matches!(route, OciRoute::Blob { .. }) {
        ReadKind::Blob
    } else {
        ReadKind::Metadata
    };
    let redirect = cluster.config().blob_redirect
        && method == Method::GET
        && matches!(route, OciRoute::Blob { .. });
    match route {
        OciRoute::Base => Ok(StatusCode::OK.into_response()),
        OciRoute::Catalog => read(cluster, cluster.any_live(), ReadKind::Metadata, req).await,
        OciRoute::Upload { repo, id } => forward_upload(cluster, &repo, &id, req).await,
        OciRoute::UploadStart { repo } => {
            let rec = cluster
                .shard(&repo.shard_key(depth), Unplaced::Place)
                .await
                .map_err(shard_error)?
                .ok_or_else(|| unavailable("no placement for this repository"))?;
            let nodes = cluster.candidates(&rec, ReplicaOrder::PrimaryFirst);
            let node = nodes
                .first()
                .ok_or_else(|| unavailable("no live replica"))?;
            let resp = forward_streaming(cluster, node, req).await?;
            Ok(after_blob_write(cluster, &repo, node, &nodes, resp))
        }
        OciRoute::Manifest { repo, reference }
            if method == Method::PUT || method == Method::DELETE =>
        {
            // A manifest PUT may be the repository's first write; a DELETE never places.
            let unplaced = if method == Method::PUT {
                Unplaced::Place
            } else {
                Unplaced::Check
            };
            let immutable = match &reference {
                flotilla_core::Reference::Tag(t)
                    if method == Method::PUT
                        && cluster
                            .auth()
                            .is_some_and(|a| a.immutable(repo.as_str(), t.as_str())) =>
                {
                    Some(t.clone())
                }
                _ => None,
            };
            let event = WriteEvent {
                actor: req
                    .extensions()
                    .get::<crate::auth::Authorized>()
                    .and_then(|a| a.user.clone()),
                reference,
            };
            replicated_write(cluster, &repo, unplaced, immutable, Some(event), req).await
        }
        OciRoute::Manifest { repo, reference } if cluster.manifests().enabled() => {
            read_cached(cluster, &repo, Cacheable::Manifest(&repo, &reference), req).await
        }
        OciRoute::Tags { repo } | OciRoute::Referrers { repo, .. }
            if method == Method::GET && cluster.manifests().enabled() =>
        {
            let pq = path_and_query(&req);
            read_cached(cluster, &repo, Cacheable::Listing(&pq), req).await
        }
        OciRoute::Blob { repo, .. } if method == Method::DELETE => {
            replicated_write(cluster, &repo, Unplaced::Check, None, None, req).await
        }
        OciRoute::Blob { repo, digest }
            if method == Method::GET && wants_sources(req.uri().query()) =>
        {
            blob_sources(cluster, &repo, &digest).await
        }
        OciRoute::Tags { repo }
        | OciRoute::Manifest { repo, .. }
        | OciRoute::Blob { repo, .. }
        | OciRoute::Referrers { repo, .. } => {
            let (nodes, epoch) = match cluster
                .shard(&repo.shard_key(depth), Unplaced::Absent)
                .await
            {
                Ok(Some(rec)) => (
                    cluster.candidates(&rec, ReplicaOrder::Spread),
                    Some(rec.epoch),
                ),
                // Unknown key: any node answers correctly (from object storage, or 404).
                Ok(None) => (cluster.any_live(), None),
                Err(e) => return Err(shard_error(e)),
            };
            if redirect {
                return redirect_blob(cluster, nodes, req).await;
            }
            let resp = read(cluster, nodes, kind, req).await?;
            Ok(match epoch {
                Some(e) if kind == ReadKind::Metadata => with_epoch(resp, e),
                _ => resp,
            })
        }
    }
}

/// `--blob-redirect`: send the client to a replica for the bytes (307), as registries backed
/// by S3 or a CDN do, so blob bytes never cross the router. A HEAD to each replica in turn
/// first, so a node that is down or failing is skipped exactly as for a proxied read, and a
/// missing blob gets the node's 404 from the router itself.
async fn redirect_blob(
    cluster: &Cluster,
    nodes: Vec<NodeRecord>,
    req: Request,
) -> Result<Response, ApiError> {
    let pq = path_and_query(&req);
    let (probe, i) = read_from(
        cluster,
        &nodes,
        ReadKind::Blob,
        &Method::HEAD,
        &pq,
        req.headers(),
    )
    .await?;
    if probe.status().is_server_error() {
        return Ok(probe); // every replica failed
    }
    if !probe.status().is_success() {
        // The node's own answer (404, 416...): proxied with its body, as a read gives it.
        return read(cluster, vec![nodes[i].clone()], ReadKind::Metadata, req).await;
    }
    metrics::counter!("flotilla_router_blob_redirects_total").increment(1);
    Response::builder()
        .status(StatusCode::TEMPORARY_REDIRECT)
        .header(http::header::LOCATION, {
            // Nodes serve reads to routers and to URLs a router signed: the redirect is
            // good for this one blob, for minutes.
            let path = req.uri().path();
            let target = match &cluster.config().secret {
                Some(secret) => registry_client::signed::sign(
                    secret,
                    path,
                    registry_client::signed::REDIRECT_TTL,
                ),
                None => pq.clone(),
            };
            format!("{}{}", nodes[i].url.trim_end_matches('/'), target)
        })
        .header(http::header::CONTENT_LENGTH, 0)
        .body(Body::empty())
        .map_err(ApiError::internal)
}

/// The query parameter that turns a blob GET into [`blob_sources`].
pub const SOURCES_PARAM: &str = "flotilla-sources";

fn wants_sources(query: Option<&str>) -> bool {
    query.is_some_and(|q| {
        q.split('&')
            .any(|p| p == SOURCES_PARAM || p.starts_with(&format!("{SOURCES_PARAM}=")))
    })
}

/// One replica a client may read a blob from directly.
#[derive(Debug, serde::Serialize)]
struct BlobSource {
    node: String,
    url: String,
}

/// What `GET /v2/REPO/blobs/DIGEST?flotilla-sources` answers.
#[derive(Debug, serde::Serialize)]
struct BlobSources {
    key: String,
    digest: String,
    expires_in_secs: u64,
    sources: Vec<BlobSource>,
}

/// `GET /v2/REPO/blobs/DIGEST?flotilla-sources`: a signed URL for each in-sync replica of the
/// key, primary first (live ones before the rest), so a client without the cluster secret
/// (the deploy agent) can fetch the blob from the replicas itself, failing over on its own
/// terms, and come back to the router last. It is the blob's own path, so the trust
/// boundary (`auth::guard`) asks exactly the blob's pull permission; it grants no more than
/// the `--blob-redirect` 307 would, for every replica instead of one. Nothing is probed: the
/// client verifies what it reads, and a replica without the blob answers 404 by itself. An
/// unplaced key has no sources (the router itself remains).
async fn blob_sources(
    cluster: &Cluster,
    repo: &RepoName,
    digest: &flotilla_core::Digest,
) -> Result<Response, ApiError> {
    let key = repo.shard_key(cluster.config().shard_key_depth);
    let nodes = match cluster.shard(&key, Unplaced::Absent).await {
        Ok(Some(rec)) => cluster.candidates(&rec, ReplicaOrder::PrimaryFirst),
        Ok(None) => Vec::new(),
        Err(e) => return Err(shard_error(e)),
    };
    let path = format!("/v2/{repo}/blobs/{digest}");
    let ttl = registry_client::signed::REDIRECT_TTL;
    let target = match &cluster.config().secret {
        Some(secret) => registry_client::signed::sign(secret, &path, ttl),
        None => path,
    };
    let body = BlobSources {
        key: key.to_string(),
        digest: digest.to_string(),
        expires_in_secs: ttl.as_secs(),
        sources: nodes
            .iter()
            .map(|n| BlobSource {
                node: n.id.to_string(),
                url: format!("{}{target}", n.url.trim_end_matches('/')),
            })
            .collect(),
    };
    metrics::counter!("flotilla_router_blob_sources_total").increment(1);
    Ok(axum::Json(body).into_response())
}

/// Manifest GET/HEAD and tag/referrer listings through the router's cache (see
/// `manifest_cache` for why a hit is as fresh as the shard map). A miss is an ordinary read
/// that fills the cache on a 200.
async fn read_cached(
    cluster: &Cluster,
    repo: &RepoName,
    what: Cacheable<'_>,
    req: Request,
) -> Result<Response, ApiError> {
    let depth = cluster.config().shard_key_depth;
    // The epoch is read before the upstream request, so an answer that raced a write is
    // labelled with the epoch that write's bump supersedes.
    let rec = match cluster
        .shard(&repo.shard_key(depth), Unplaced::Absent)
        .await
    {
        Ok(Some(rec)) => rec,
        Ok(None) => return read(cluster, cluster.any_live(), ReadKind::Metadata, req).await,
        Err(e) => return Err(shard_error(e)),
    };
    let head = req.method() == Method::HEAD;
    let cache = cluster.manifests();
    // Only while the router would have seen an epoch bump made through another router.
    let hit = if cluster.cache_trusted() {
        cache.get(&what, rec.epoch)
    } else {
        metrics::counter!("flotilla_router_manifest_cache_untrusted_total").increment(1);
        None
    };
    if let Some(hit) = hit {
        metrics::counter!("flotilla_router_manifest_cache_hits_total").increment(1);
        let body = if head {
            Body::empty()
        } else {
            Body::from(hit.body.clone())
        };
        let mut out = Response::new(body);
        *out.headers_mut() = hit.headers.clone();
        return Ok(with_epoch(out, rec.epoch));
    }
    metrics::counter!("flotilla_router_manifest_cache_misses_total").increment(1);
    // A HEAD miss asks the node for the whole answer (small, bounded), so the cache fills on
    // the HEAD that starts every pull as well as on GETs.
    let (mut parts, body) = req.into_parts();
    parts.method = Method::GET;
    let req = Request::from_parts(parts, body);
    let resp = read(
        cluster,
        cluster.candidates(&rec, ReplicaOrder::Spread),
        ReadKind::Metadata,
        req,
    )
    .await?;
    let bounded = resp
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
        .is_some_and(|n| n <= MANIFEST_LIMIT);
    let (parts, body) = resp.into_parts();
    if parts.status != StatusCode::OK || !bounded {
        let body = if head { Body::empty() } else { body };
        return Ok(with_epoch(Response::from_parts(parts, body), rec.epoch));
    }
    let bytes = axum::body::to_bytes(body, MANIFEST_LIMIT)
        .await
        .map_err(|_| unavailable("the replica's response broke off; retry"))?;
    cache.fill(&what, rec.epoch, parts.status, &parts.headers, &bytes);
    let body = if head {
        Body::empty()
    } else {
        Body::from(bytes)
    };
    Ok(with_epoch(Response::from_parts(parts, body), rec.epoch))
}

/// Label a response with the shard epoch it is consistent with ([`EPOCH_HEADER`]).
fn with_epoch(mut resp: Response, epoch: u64) -> Response {
    if let Ok(v) = HeaderValue::from_str(&epoch.to_string()) {
        resp.headers_mut().insert(EPOCH_HEADER, v);
    }
    resp
}

/// Build the upstream request: same method, path and query, end-to-end headers.
fn upstream(
    cluster: &Cluster,
    node: &NodeRecord,
    method: &Method,
    path_and_query: &str,
    headers: &HeaderMap,
    body: reqwest::Body,
) -> reqwest::RequestBuilder {
    let mut b = cluster.http().request(
        method.clone(),
        format!("{}{}", node.url.trim_end_matches('/'), path_and_query),
    );
    for (k, v) in headers {
        // `x-flotilla-*` headers are the router's to set (write deadlines, the internal
        // secret): a client's are dropped, never passed on to a node.
        if !hop_by_hop(k) && !client_credential(k) && !k.as_str().starts_with("x-flotilla-") {
            b = b.header(k, v);
        }
    }
    b.body(body)
}

/// Whether an upstream answer's body reaches the client: a HEAD's must not, its
/// `Content-Length` describes a body that is not sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum UpstreamBody {
    Stream,
    Omit,
}

/// Turn an upstream response into ours, streaming its body.
fn downstream(resp: reqwest::Response, body: UpstreamBody) -> Response {
    let status = resp.status();
    let mut headers = HeaderMap::new();
    for (k, v) in resp.headers() {
        if !hop_by_hop(k) {
            headers.append(k.clone(), v.clone());
        }
    }
    let body = match body {
        UpstreamBody::Omit => Body::empty(),
        UpstreamBody::Stream => Body::from_stream(idle_bounded(resp.bytes_stream().boxed())),
    };
    let mut out = Response::new(body);
    *out.status_mut() = status;
    *out.headers_mut() = headers;
    out
}

/// How long an upstream body may go without delivering a byte before it counts as stalled
/// (a frozen node): progress, not total time, bounds a stream.
const STREAM_IDLE: std::time::Duration = std::time::Duration::from_secs(10);

type ByteStream = futures::stream::BoxStream<'static, Result<Bytes, reqwest::Error>>;

/// `s`, ended with an error when no chunk arrives within [`STREAM_IDLE`].
fn idle_bounded(
    s: ByteStream,
) -> impl futures::Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static {
    futures::stream::unfold(Some(s), |s| async move {
        let mut s = s?;
        match tokio::time::timeout(STREAM_IDLE, s.next()).await {
            Ok(Some(Ok(b))) => Some((Ok(b), Some(s))),
            Ok(Some(Err(e))) => {
                metrics::counter!("flotilla_router_upstream_bodies_cut_total").increment(1);
                Some((Err(std::io::Error::other(e)), None))
            }
            Ok(None) => None,
            Err(_) => {
                metrics::counter!("flotilla_router_upstream_bodies_cut_total").increment(1);
                Some((
                    Err(std::io::Error::other("upstream stalled mid-body")),
                    None,
                ))
            }
        }
    })
}

/// A whole-blob GET being relayed, and what it takes to resume it elsewhere.
///
/// Blobs are content-addressed, so byte `n` of a blob is the same on every replica: when the
/// replica serving a client dies or stalls mid-body, the router asks the next replica for
/// `Range: bytes=n-` and carries on, and the client never sees the cut. Only a body the
/// node marked as verified before it started (`VERIFIED_HEADER`) is carried on, and only
/// with a verified 206 starting exactly at `n`; otherwise the stream ends in an error (the
/// client sees an aborted transfer, never a complete wrong blob) and a metric counts it.
struct Resume {
    cluster: Cluster,
    nodes: Vec<NodeRecord>,
    pq: String,
    headers: HeaderMap,
}

struct Relay {
    resume: Resume,
    stream: ByteStream,
    sent: u64,
    /// Replicas already used (the current one included).
    tried: Vec<usize>,
}

impl Resume {
    fn respond(self, resp: reqwest::Response, served_by: usize) -> Response {
        let status = resp.status();
        let mut headers = HeaderMap::new();
        for (k, v) in resp.headers() {
            if !hop_by_hop(k) {
                headers.append(k.clone(), v.clone());
            }
        }
        let relay = Relay {
            resume: self,
            stream: resp.bytes_stream().boxed(),
            sent: 0,
            tried: vec![served_by],
        };
        let body = futures::stream::unfold(Some(relay), |relay| async move {
            let mut relay = relay?;
            loop {
                match tokio::time::timeout(STREAM_IDLE, relay.stream.next()).await {
                    Ok(Some(Ok(b))) => {
                        relay.sent += b.len() as u64;
                        return Some((Ok(b), Some(relay)));
                    }
                    Ok(None) => return None,
                    Ok(Some(Err(_))) | Err(_) => {
                        if relay.resume_elsewhere().await {
                            continue;
                        }
                        metrics::counter!("flotilla_router_blob_streams_cut_total").increment(1);
                        let e = std::io::Error::other("every replica failed mid-body");
                        return Some((Err(e), None));
                    }
                }
            }
        });
        let mut out = Response::new(Body::from_stream(body));
        *out.status_mut() = status;
        *out.headers_mut() = headers;
        out
    }
}

impl Relay {
    /// Continue from byte `sent` on a replica not tried yet; false when none can.
    async fn resume_elsewhere(&mut self) -> bool {
        let r = &self.resume;
        for (i, node) in r.nodes.iter().enumerate() {
            if self.tried.contains(&i) {
                continue;
            }
            self.tried.push(i);
            let mut headers = r.headers.clone();
            let range = format!("bytes={}-", self.sent);
            if let Ok(v) = HeaderValue::from_str(&range) {
                headers.insert(http::header::RANGE, v);
            }
            let attempt = upstream(
                &r.cluster,
                node,
                &Method::GET,
                &r.pq,
                &headers,
                reqwest::Body::from(Bytes::new()),
            );
            let got =
                tokio::time::timeout(r.cluster.config().upstream_timeout, attempt.send()).await;
            let Ok(Ok(resp)) = got else {
                r.cluster.eject(&node.id);
                continue;
            };
            let starts_here = resp
                .headers()
                .get(http::header::CONTENT_RANGE)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("bytes "))
                .and_then(|v| v.split('-').next())
                .and_then(|v| v.parse::<u64>().ok())
                == Some(self.sent);
            let verified = resp
                .headers()
                .contains_key(registry_client::VERIFIED_HEADER);
            if resp.status() != StatusCode::PARTIAL_CONTENT || !starts_here || !verified {
                continue;
            }
            tracing::warn!(node = %node.id, offset = self.sent, path = r.pq, "blob stream cut; resumed from another replica");
            metrics::counter!("flotilla_router_blob_streams_resumed_total").increment(1);
            self.stream = resp.bytes_stream().boxed();
            return true;
        }
        false
    }
}

fn path_and_query(req: &Request) -> String {
    req.uri()
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| req.uri().path().to_owned())
}

/// A metadata read sent to `nodes` in order, the next one joining whenever no answer came
/// within [`HEDGE_AFTER`] (or the last attempt failed); the first good answer wins and the
/// others are dropped. A replica beaten by a hedge is ejected, as a failed one is.
///
/// A 404 is an answer only once every replica gave it: an in-sync replica may lack a tag
/// written while it lagged (its catch-up takes deletions and re-points, and reads the rest
/// through object storage on demand), and when object storage has lost that tag the
/// partner holds the only copy. Found by the compose S3 kill drill (`tests/e2e/drills.rs`).
async fn read_hedged(
    cluster: &Cluster,
    nodes: &[NodeRecord],
    method: &Method,
    pq: &str,
    headers: &HeaderMap,
    body: UpstreamBody,
) -> Result<(Response, usize), ApiError> {
    use futures::stream::FuturesUnordered;
    let attempt = |i: usize| {
        let send = upstream(
            cluster,
            &nodes[i],
            method,
            pq,
            headers,
            reqwest::Body::from(Bytes::new()),
        )
        .send();
        let limit = cluster.config().upstream_timeout;
        async move { (i, tokio::time::timeout(limit, send).await) }
    };
    let mut pending = FuturesUnordered::new();
    pending.push(attempt(0));
    let mut next = 1;
    // Attempts launched and not answered yet.
    let mut waiting = vec![0usize];
    let mut last: Option<(Response, usize)> = None;
    let mut not_found: Option<(Response, usize)> = None;
    loop {
        let hedge = tokio::time::sleep(HEDGE_AFTER);
        tokio::select! {
            done = pending.next() => {
                let Some((i, result)) = done else { break };
                waiting.retain(|&w| w != i);
                let node = &nodes[i];
                match result {
                    Ok(Ok(r)) if r.status() == StatusCode::NOT_FOUND => {
                        if not_found.is_none() && (next < nodes.len() || !waiting.is_empty()) {
                            metrics::counter!("flotilla_router_metadata_404_retries_total").increment(1);
                            tracing::debug!(node = %node.id, path = pq, "a replica answered 404; asking the partner");
                        }
                        not_found.get_or_insert((downstream(r, body), i));
                    }
                    Ok(Ok(r)) if !r.status().is_server_error() => {
                        // Whoever is still waiting was slower than a whole answer.
                        for &slow in &waiting {
                            tracing::warn!(node = %nodes[slow].id, "beaten by a hedged read; ejecting");
                            cluster.eject(&nodes[slow].id);
                        }
                        return Ok((downstream(r, body), i));
                    }
                    failed => {
                        if let Some(r) = failed_read(cluster, node, failed, body) {
                            last = Some((r, i));
                        }
                    }
                }
                if next < nodes.len() {
                    metrics::counter!("flotilla_router_failovers_total").increment(1);
                    pending.push(attempt(next));
                    waiting.push(next);
                    next += 1;
                }
            }
            _ = hedge, if next < nodes.len() => {
                metrics::counter!("flotilla_router_hedged_reads_total").increment(1);
                pending.push(attempt(next));
                waiting.push(next);
                next += 1;
            }
        }
    }
    not_found
        .or(last)
        .ok_or_else(|| unavailable("no replica of this repository is reachable"))
}

/// One read attempt that did not give a usable answer: a 5xx is kept as the answer of last
/// resort; a transport error or a timeout ejects the node. Either way the caller moves on.
fn failed_read(
    cluster: &Cluster,
    node: &NodeRecord,
    result: Result<reqwest::Result<reqwest::Response>, tokio::time::error::Elapsed>,
    body: UpstreamBody,
) -> Option<Response> {
    match result {
        Ok(Ok(r)) => {
            tracing::warn!(node = %node.id, status = %r.status(), "read failed upstream; trying the partner");
            Some(downstream(r, body))
        }
        Ok(Err(e)) => {
            tracing::warn!(node = %node.id, error = %e, "read failed upstream; trying the partner");
            cluster.eject(&node.id);
            None
        }
        Err(_) => {
            tracing::warn!(node = %node.id, "read timed out upstream; trying the partner");
            cluster.eject(&node.id);
            None
        }
    }
}

/// What a read fetches, which decides how hard the router tries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ReadKind {
    /// Manifests, tags, listings: the first good answer stands; a 404 asks the partner
    /// first (see [`read_hedged`]).
    Metadata,
    /// Blob bytes: a 404 asks the partner too (one replica's hole must never reach a client),
    /// and a whole-blob body cut mid-stream is resumed from another replica.
    Blob,
}

/// A body-less request tried on each node in turn; a connection error, timeout or 5xx moves
/// on to the next before the client sees anything.
async fn read(
    cluster: &Cluster,
    nodes: Vec<NodeRecord>,
    kind: ReadKind,
    req: Request,
) -> Result<Response, ApiError> {
    let pq = path_and_query(&req);
    let (mut resp, i) = read_from(cluster, &nodes, kind, req.method(), &pq, req.headers()).await?;
    // Which replica answered: for operators and the history checker, when a copy is wrong.
    if let Some(v) = nodes
        .get(i)
        .and_then(|n| HeaderValue::from_str(n.id.as_str()).ok())
    {
        resp.headers_mut().insert(SERVED_BY_HEADER, v);
    }
    Ok(resp)
}

/// The node that answered a proxied read.
pub const SERVED_BY_HEADER: &str = "x-flotilla-node";

/// [`read`] as `method` on `pq`, also saying which of `nodes` gave the answer. Each attempt
/// must produce its response head within the upstream timeout; the body is then held to
/// progress ([`STREAM_IDLE`]), not to a total, so a large blob is never cut for being large.
async fn read_from(
    cluster: &Cluster,
    nodes: &[NodeRecord],
    kind: ReadKind,
    method: &Method,
    pq: &str,
    headers: &HeaderMap,
) -> Result<(Response, usize), ApiError> {
    let body = if method == Method::HEAD {
        UpstreamBody::Omit
    } else {
        UpstreamBody::Stream
    };
    if kind == ReadKind::Metadata && nodes.len() > 1 {
        return read_hedged(cluster, nodes, method, pq, headers, body).await;
    }
    let mut last: Option<(Response, usize)> = None;
    for (i, node) in nodes.iter().enumerate() {
        let attempt = upstream(
            cluster,
            node,
            method,
            pq,
            headers,
            reqwest::Body::from(Bytes::new()),
        );
        let started = Instant::now();
        let result = tokio::time::timeout(cluster.config().upstream_timeout, attempt.send()).await;
        metrics::histogram!("flotilla_router_upstream_seconds", "node" => node.id.to_string())
            .record(started.elapsed().as_secs_f64());
        match result {
            Ok(Ok(r))
                if kind == ReadKind::Blob
                    && r.status() == StatusCode::NOT_FOUND
                    && i + 1 < nodes.len() =>
            {
                metrics::counter!("flotilla_router_blob_404_retries_total").increment(1);
                tracing::warn!(node = %node.id, path = pq, "a replica lacks a blob; asking the partner");
                last = Some((downstream(r, body), i));
            }
            Ok(Ok(r))
                if kind == ReadKind::Blob
                    && r.status() == StatusCode::OK
                    && r.headers().contains_key(registry_client::VERIFIED_HEADER)
                    && body == UpstreamBody::Stream
                    && !headers.contains_key(http::header::RANGE) =>
            {
                let resume = Resume {
                    cluster: cluster.clone(),
                    nodes: nodes.to_vec(),
                    pq: pq.to_owned(),
                    headers: headers.clone(),
                };
                return Ok((resume.respond(r, i), i));
            }
            Ok(Ok(r)) if !r.status().is_server_error() => return Ok((downstream(r, body), i)),
            failed => {
                if let Some(r) = failed_read(cluster, node, failed, body) {
                    last = Some((r, i));
                }
            }
        }
        if i + 1 < nodes.len() {
            metrics::counter!("flotilla_router_failovers_total").increment(1);
        }
    }
    last.ok_or_else(|| unavailable("no replica of this repository is reachable"))
}

/// Stream a request with a body to one node (uploads); no retry, the body is consumed.
async fn forward_streaming(
    cluster: &Cluster,
    node: &NodeRecord,
    req: Request,
) -> Result<Response, ApiError> {
    let pq = path_and_query(&req);
    let (parts, body) = req.into_parts();
    let progress = Arc::new(Progress::default());
    let seen = progress.clone();
    let failed = progress.clone();
    let stream = body
        .into_data_stream()
        .map_err(std::io::Error::other)
        .inspect_ok(move |b| seen.moved(b.len()))
        .inspect_err(move |_| failed.client_failed());
    let tracked = progress.clone();
    let stream = stream.chain(futures::stream::once(async move {
        tracked.finished();
        Ok(Bytes::new())
    }));
    let send = upstream(
        cluster,
        node,
        &parts.method,
        &pq,
        &parts.headers,
        reqwest::Body::wrap_stream(stream),
    )
    .send();
    let r = match watch_progress(send, &progress).await {
        Ok(r) => r,
        // The client's body broke off (it hung up mid-upload): the node is not at fault,
        // and ejecting it would let any client take replicas out of service.
        Err(why) if progress.client_gone() => {
            tracing::info!(node = %node.id, error = %why, "client body ended early; upload forwarding abandoned");
            return Err(
                ApiError::new(ErrorCode::BlobUploadInvalid).message("request body ended early")
            );
        }
        Err(why) => {
            cluster.eject(&node.id);
            tracing::warn!(node = %node.id, error = %why, "upload forwarding failed");
            return Err(unavailable(
                "the replica holding this upload is unreachable; retry the upload",
            ));
        }
    };
    Ok(rewrite_location(
        downstream(r, UpstreamBody::Stream),
        &node.id,
    ))
}

/// How far a forwarded upload got, for [`watch_progress`].
#[derive(Debug, Default)]
struct Progress {
    /// Milliseconds (since `START`) of the last byte moved, or of the body's end.
    last_ms: std::sync::atomic::AtomicU64,
    bytes: std::sync::atomic::AtomicU64,
    done: std::sync::atomic::AtomicBool,
    /// The client's body failed (it hung up or sent a malformed chunk).
    client_failed: std::sync::atomic::AtomicBool,
}

static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();

fn mono_ms() -> u64 {
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

impl Progress {
    fn moved(&self, n: usize) {
        use std::sync::atomic::Ordering::Relaxed;
        self.bytes.fetch_add(n as u64, Relaxed);
        self.last_ms.store(mono_ms(), Relaxed);
    }

    fn client_failed(&self) {
        self.client_failed
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    fn client_gone(&self) -> bool {
        self.client_failed
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    fn finished(&self) {
        use std::sync::atomic::Ordering::Relaxed;
        self.done.store(true, Relaxed);
        self.last_ms.store(mono_ms(), Relaxed);
    }

    /// How long the node may go without visible progress: while the body flows, an idle
    /// bound; once it has all been sent, time for the node to hash, fsync and write it
    /// through to object storage (at 1 MiB/s at worst) before it answers.
    fn allowance(&self) -> std::time::Duration {
        use std::sync::atomic::Ordering::Relaxed;
        if self.done.load(Relaxed) {
            UPLOAD_IDLE + std::time::Duration::from_secs(self.bytes.load(Relaxed) >> 20)
        } else {
            UPLOAD_IDLE
        }
    }

    fn stalled(&self) -> bool {
        let since =
            mono_ms().saturating_sub(self.last_ms.load(std::sync::atomic::Ordering::Relaxed));
        std::time::Duration::from_millis(since) > self.allowance()
    }
}

/// A forwarded upload may go this long without a byte moving (a frozen node stops taking
/// bytes; a client that stops sending is held to the same bound).
const UPLOAD_IDLE: std::time::Duration = std::time::Duration::from_secs(30);

/// Await `send` while `progress` moves; an error when it stalls past its allowance.
async fn watch_progress(
    send: impl std::future::Future<Output = reqwest::Result<reqwest::Response>>,
    progress: &Progress,
) -> Result<reqwest::Response, String> {
    progress.moved(0);
    tokio::pin!(send);
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(500));
    loop {
        tokio::select! {
            r = &mut send => return r.map_err(|e| e.to_string()),
            _ = tick.tick() => {
                if progress.stalled() {
                    return Err(format!("no progress within {:?}", progress.allowance()));
                }
            }
        }
    }
}

/// Prefix upload-session `Location`s with the owning node, so later requests find it.
fn rewrite_location(mut resp: Response, node: &flotilla_core::NodeId) -> Response {
    let Some(loc) = resp
        .headers()
        .get(http::header::LOCATION)
        .and_then(|v| v.to_str().ok())
    else {
        return resp;
    };
    if let Some((base, id)) = loc.rsplit_once("/blobs/uploads/") {
        let (id, query) = id
            .split_once('?')
            .map(|(a, b)| (a, Some(b)))
            .unwrap_or((id, None));
        let mut new = format!("{base}/blobs/uploads/{node}.{id}");
        if let Some(q) = query {
            new.push('?');
            new.push_str(q);
        }
        if let Ok(v) = HeaderValue::from_str(&new) {
            resp.headers_mut().insert(http::header::LOCATION, v);
        }
    }
    resp
}

/// PATCH/PUT/GET/DELETE on a session go to the node encoded in its id.
async fn forward_upload(
    cluster: &Cluster,
    repo: &RepoName,
    id: &UploadId,
    req: Request,
) -> Result<Response, ApiError> {
    let unknown = || ApiError::new(ErrorCode::BlobUploadUnknown).detail(id.to_string());
    let (node_id, inner) = id.as_str().split_once('.').ok_or_else(unknown)?;
    let node = node_id
        .parse()
        .ok()
        .and_then(|n| cluster.node(&n))
        .filter(|n| cluster.is_live(n))
        .ok_or_else(unknown)?;
    let pq = path_and_query(&req).replacen(
        &format!("/blobs/uploads/{id}"),
        &format!("/blobs/uploads/{inner}"),
        1,
    );
    let (mut parts, body) = req.into_parts();
    parts.uri = pq.parse().map_err(|_| unknown())?;
    let req = Request::from_parts(parts, body);
    let completes = req.method() == Method::PUT;
    let resp = forward_streaming(cluster, &node, req).await?;
    if completes {
        let depth = cluster.config().shard_key_depth;
        if let Ok(Some(rec)) = cluster
            .shard(&repo.shard_key(depth), Unplaced::Absent)
            .await
        {
            let nodes = cluster.candidates(&rec, ReplicaOrder::PrimaryFirst);
            return Ok(after_blob_write(cluster, repo, &node, &nodes, resp));
        }
    }
    Ok(resp)
}

/// After a blob is committed on one replica, warm the others in the background: a GET makes
/// them read it through object storage into their cache.
fn after_blob_write(
    cluster: &Cluster,
    repo: &RepoName,
    written: &NodeRecord,
    nodes: &[NodeRecord],
    resp: Response,
) -> Response {
    if resp.status() != StatusCode::CREATED {
        return resp;
    }
    let Some(digest) = resp
        .headers()
        .get("docker-content-digest")
        .and_then(|v| v.to_str().ok())
    else {
        return resp;
    };
    for n in nodes
        .iter()
        .filter(|n| n.id != written.id && cluster.is_live(n))
    {
        let url = format!("{}/v2/{repo}/blobs/{digest}", n.url.trim_end_matches('/'));
        let http = cluster.http().clone();
        let node = n.id.clone();
        cluster.tasks().spawn(async move {
            let started = Instant::now();
            match http.get(&url).send().await {
                Ok(r) => {
                    let ok = r.status().is_success();
                    let drained = r.bytes_stream().try_for_each(|_| async { Ok(()) }).await;
                    if ok && drained.is_ok() {
                        metrics::histogram!("flotilla_router_replication_lag_seconds").record(started.elapsed().as_secs_f64());
                    }
                }
                Err(e) => tracing::warn!(%node, error = %e, "asynchronous blob replication failed; the partner will read through object storage"),
            }
        });
    }
    resp
}

/// Manifest/tag writes and deletes: to every in-sync replica (primary first, failing over
/// past unreachable ones), then committed in the shard record ([`Cluster::commit`]): a
/// replica that missed the write is marked lagging there before the client hears 2xx, so no
/// replica any router reads from can contradict an acknowledged write.
/// What a manifest write's event names besides the write itself.
struct WriteEvent {
    actor: Option<std::sync::Arc<str>>,
    reference: flotilla_core::Reference,
}

/// Starts recording a manifest write in the events outbox as soon as the primary replica has
/// taken it (the write is then durable in object storage), alongside the partners' copies and
/// the commit; the client's 201 waits for it, so a crash after the 201 cannot lose the event.
/// A write that then fails to commit (503) keeps its event: the manifest is stored, and the
/// client's retry is a second event with another id. A journal that cannot be written is
/// logged and counted; the write itself stands.
fn record_event(
    cluster: &Cluster,
    repo: &RepoName,
    write: &BufferedWrite,
    event: WriteEvent,
    resp: &reqwest::Response,
) -> Option<tokio::task::JoinHandle<()>> {
    let outbox = cluster.events()?.clone();
    let tag = match &event.reference {
        flotilla_core::Reference::Tag(t) => Some(t.to_string()),
        flotilla_core::Reference::Digest(_) => None,
    };
    let push = write.method != Method::DELETE;
    let digest = resp
        .headers()
        .get("docker-content-digest")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .or_else(|| match &event.reference {
            flotilla_core::Reference::Digest(d) => Some(d.to_string()),
            flotilla_core::Reference::Tag(_) => None,
        })
        .unwrap_or_default();
    let target = flotilla_events::Target {
        media_type: if push {
            write
                .headers
                .get(http::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string()
        } else {
            String::new()
        },
        size: if push { write.bytes.len() as u64 } else { 0 },
        length: if push { write.bytes.len() as u64 } else { 0 },
        digest,
        repository: repo.to_string(),
        tag,
    };
    let ev = flotilla_events::Event::new(
        if push { "push" } else { "delete" },
        target,
        event.actor.map(|a| a.to_string()),
        cluster.source().clone(),
    );
    let repo = repo.to_string();
    Some(tokio::spawn(async move {
        if let Err(e) = outbox.record(ev).await {
            tracing::error!(%repo, error = %e, "the write's event could not be recorded");
            metrics::counter!("flotilla_events_record_failures_total").increment(1);
        }
    }))
}

async fn replicated_write(
    cluster: &Cluster,
    repo: &RepoName,
    unplaced: Unplaced,
    immutable: Option<flotilla_core::Tag>,
    event: Option<WriteEvent>,
    req: Request,
) -> Result<Response, ApiError> {
    let depth = cluster.config().shard_key_depth;
    let key = repo.shard_key(depth);
    let write = BufferedWrite::collect(req).await?;
    let Some(rec) = cluster.shard(&key, unplaced).await.map_err(shard_error)? else {
        // Nothing was ever placed here: let any node give the authoritative 404.
        let mut last = None;
        for node in cluster.any_live() {
            match write.send(cluster, &node).await {
                Ok(r) => return Ok(downstream(r, UpstreamBody::Stream)),
                Err(e) => last = Some(e),
            }
        }
        tracing::warn!(error = ?last, "no node answered a write to an unplaced key");
        return Err(unavailable("no node is reachable"));
    };
    let nodes = cluster.candidates(&rec, ReplicaOrder::PrimaryFirst);
    if let Some(tag) = &immutable {
        refuse_moving(cluster, repo, tag, &nodes, &write).await?;
    }
    let mut acks = Acks::default();
    // Every in-sync replica the snapshot does not consider live missed the write already.
    for n in rec.in_sync() {
        if !nodes.iter().any(|c| c.id == *n && cluster.is_live(c)) {
            acks.missed.insert(n.clone());
        }
    }
    let mut primary: Option<(NodeRecord, reqwest::Response)> = None;
    for (i, node) in nodes.iter().enumerate() {
        if !cluster.is_live(node) && i + 1 < nodes.len() {
            continue;
        }
        match write.send(cluster, node).await {
            Ok(r) => {
                primary = Some((node.clone(), r));
                break;
            }
            Err(e) => {
                tracing::warn!(node = %node.id, error = %e, "write failed on primary; failing over");
                cluster.eject(&node.id);
                acks.missed.insert(node.id.clone());
                metrics::counter!("flotilla_router_failovers_total").increment(1);
            }
        }
    }
    let (pnode, resp) =
        primary.ok_or_else(|| unavailable("no replica of this repository is reachable"))?;
    if !resp.status().is_success() {
        // Refused (or failed) on the primary: nothing was acknowledged, nothing to commit.
        return Ok(downstream(resp, UpstreamBody::Stream));
    }
    acks.missed.remove(&pnode.id);
    acks.acked.insert(pnode.id.clone());
    let recording = event.and_then(|e| record_event(cluster, repo, &write, e, &resp));
    // The rest in parallel: every other live in-sync replica, and the nodes being seeded for
    // this key (joining, or a replica rebuilding its disk), so no write lands between the
    // seeder's last pass and the node taking traffic.
    let mut others: Vec<NodeRecord> = nodes
        .iter()
        .filter(|n| n.id != pnode.id && cluster.is_live(n))
        .cloned()
        .collect();
    for n in cluster.sync_only(&rec) {
        if n.id != pnode.id && !others.iter().any(|o| o.id == n.id) {
            others.push(n);
        }
    }
    let results =
        futures::future::join_all(others.iter().map(|n| write.replicate(cluster, n))).await;
    for (n, ok) in others.iter().zip(results) {
        if ok {
            acks.missed.remove(&n.id);
            acks.acked.insert(n.id.clone());
        } else {
            acks.missed.insert(n.id.clone());
        }
    }
    let epoch = cluster
        .commit(&key, &mut acks, |n| {
            let write = &write;
            async move { write.replicate(cluster, &n).await }
        })
        .await
        .map_err(|e| {
            tracing::warn!(%key, error = %e, "write applied but not committed; answering 503");
            metrics::counter!("flotilla_router_uncommitted_writes_total").increment(1);
            unavailable(&format!(
                "the write could not be committed to every in-sync replica ({e}); retry"
            ))
        })?;
    if let Some(r) = recording {
        let _ = r.await;
    }
    Ok(with_epoch(downstream(resp, UpstreamBody::Stream), epoch))
}

/// An immutable tag (the access policy's `immutable_tags`) may be created, and pushed again
/// with the same manifest, but never moved. The tag's digest is bound in the metadata store
/// by a create-only write before the manifest is written, so of two pushes racing to create
/// it through any routers exactly one digest wins; the replicas are asked first, so a tag
/// that existed before its pattern became immutable is bound to what it already names. A
/// push that fails after the bind leaves the tag reserved for that digest (a retry works).
async fn refuse_moving(
    cluster: &Cluster,
    repo: &RepoName,
    tag: &flotilla_core::Tag,
    nodes: &[NodeRecord],
    write: &BufferedWrite,
) -> Result<(), ApiError> {
    let new = flotilla_core::Digest::sha256_of(&write.bytes).to_string();
    let refuse = |current: &str| {
        metrics::counter!("flotilla_router_immutable_refusals_total").increment(1);
        Err(ApiError::new(ErrorCode::Denied).message(format!(
            "tag {tag:?} of {repo} is immutable (access policy) and points to {current}; push a new tag instead"
        )))
    };
    let pq = format!("/v2/{repo}/manifests/{tag}");
    let mut headers = HeaderMap::new();
    headers.insert(http::header::ACCEPT, HeaderValue::from_static("*/*"));
    let (resp, _) = read_from(
        cluster,
        nodes,
        ReadKind::Metadata,
        &Method::HEAD,
        &pq,
        &headers,
    )
    .await?;
    let existing = match resp.status() {
        StatusCode::NOT_FOUND => None,
        s if s.is_success() => resp
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        _ => {
            return Err(unavailable(
                "cannot tell whether the immutable tag exists; retry",
            ))
        }
    };
    let bind_to = existing.as_deref().unwrap_or(&new);
    let bound = tokio::time::timeout(
        META_LOOKUP_TIMEOUT,
        cluster
            .map()
            .bind_immutable_tag(repo.as_str(), tag.as_str(), bind_to),
    )
    .await;
    match bound {
        Ok(Ok(Ok(()))) if bind_to == new => Ok(()),
        Ok(Ok(Ok(()))) => refuse(bind_to),
        Ok(Ok(Err(current))) => refuse(&current),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, %repo, %tag, "cannot bind an immutable tag");
            Err(unavailable("the metadata store did not answer; retry"))
        }
        Err(_) => Err(unavailable(
            "the metadata store did not answer in time; retry",
        )),
    }
}

/// Metadata-store lookups on a request path (ARCHITECTURE.md, timeouts).
const META_LOOKUP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// The shard record epoch a response is consistent with: a write's commit epoch, or the
/// epoch of the record a read was routed by. A read labelled with an epoch at least a
/// write's commit epoch reflects that write (what the history checker verifies).
pub const EPOCH_HEADER: &str = "x-flotilla-epoch";

/// Which replicas took a write and which missed it (failed, refused, timed out, or were
/// not live), by node id.
#[derive(Debug, Default)]
pub struct Acks {
    pub acked: std::collections::HashSet<flotilla_core::NodeId>,
    pub missed: std::collections::HashSet<flotilla_core::NodeId>,
}

/// A manifest PUT or DELETE (or blob DELETE) collected once (capped at the manifest
/// limit), so the same request can go to every replica.
struct BufferedWrite {
    method: Method,
    pq: String,
    headers: HeaderMap,
    bytes: Bytes,
}

impl BufferedWrite {
    async fn collect(req: Request) -> Result<Self, ApiError> {
        let pq = path_and_query(&req);
        let (parts, body) = req.into_parts();
        let bytes = axum::body::to_bytes(body, MANIFEST_LIMIT + 1)
            .await
            .map_err(|_| {
                ApiError::new(ErrorCode::SizeInvalid)
                    .with_status(StatusCode::PAYLOAD_TOO_LARGE)
                    .message("manifest exceeds the 4 MiB limit")
            })?;
        Ok(BufferedWrite {
            method: parts.method,
            pq,
            headers: parts.headers,
            bytes,
        })
    }

    /// One attempt on `node` within [`WRITE_ATTEMPT`]: a frozen replica must not hold the
    /// client's write (a PUT is idempotent, so a timed-out attempt that did apply is
    /// harmless when the next one applies it too).
    async fn send(
        &self,
        cluster: &Cluster,
        node: &NodeRecord,
    ) -> Result<reqwest::Response, String> {
        // The node refuses to apply the write past this (see `WRITE_DEADLINE_HEADER`): a
        // little before this attempt's timeout, so a late apply cannot follow our giving up.
        let deadline = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| (d + WRITE_ATTEMPT - FENCE_MARGIN).as_millis() as u64)
            .unwrap_or(0);
        let attempt = upstream(
            cluster,
            node,
            &self.method,
            &self.pq,
            &self.headers,
            reqwest::Body::from(self.bytes.clone()),
        )
        .header(registry_client::WRITE_DEADLINE_HEADER, deadline)
        .send();
        match tokio::time::timeout(WRITE_ATTEMPT, attempt).await {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(_) => Err(format!("no answer within {WRITE_ATTEMPT:?}")),
        }
    }

    /// The write on a replica after the primary took it: true when the replica has it
    /// (2xx, or 404 for a delete of what it never had).
    async fn replicate(&self, cluster: &Cluster, node: &NodeRecord) -> bool {
        let started = Instant::now();
        match self.send(cluster, node).await {
            Ok(r) if r.status().is_success() || r.status() == StatusCode::NOT_FOUND => {
                metrics::histogram!("flotilla_router_sync_replication_seconds")
                    .record(started.elapsed().as_secs_f64());
                true
            }
            Ok(r) => {
                tracing::warn!(node = %node.id, status = %r.status(), "replica refused a replicated write; marking it lagging");
                false
            }
            Err(e) => {
                tracing::warn!(node = %node.id, error = %e, "replica unreachable for a replicated write; marking it lagging");
                cluster.eject(&node.id);
                false
            }
        }
    }
}
