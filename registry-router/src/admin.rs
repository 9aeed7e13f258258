//! The admin API (`/admin/v1`, JSON) and the router's health and metrics endpoints.
//! Described in `docs/openapi.yaml` (a test holds the document to these routes and types).
//! Every admin error, including a refused path or body, is the OCI error body
//! `{"errors":[{"code","message","detail"}]}` the registry API uses, so clients need one
//! error parser.

use std::collections::HashSet;
use std::str::FromStr;

use axum::extract::{FromRequest, FromRequestParts, Path, Request, State};
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, MethodRouter};
use axum::{Json, Router};
use flotilla_core::{ErrorCode, NodeId, RackId, ShardKey};
use http::StatusCode;
use registry_client::ApiError;
use serde::{Deserialize, Serialize};
use shardmap::{
    MoveRecord, NodeRecord, NodeState, Record, ReseedRecord, SeederLeader, ShardRecord, Versioned,
};

use crate::Cluster;

/// Compare-and-swap attempts before an update gives up with a 503.
const CAS_ATTEMPTS: usize = 5;

/// Every admin route (paths relative to `/admin/v1`) with its handlers. One table, so the
/// OpenAPI test checks the document against exactly what [`routes`] registers.
fn table() -> [(&'static str, MethodRouter<Cluster>); 11] {
    [
        ("/nodes", get(nodes)),
        ("/shards", get(shards)),
        ("/unreadable", get(unreadable)),
        ("/shards/{*key}", get(shard).put(pin_shard)),
        ("/nodes/{id}/drain", post(drain)),
        ("/nodes/{id}/undrain", post(undrain)),
        ("/reseed", get(reseed)),
        ("/events", get(events)),
        ("/events/sinks", get(event_sinks)),
        ("/deployments", get(deployments)),
        (
            "/deployments/{*key}",
            get(deployment)
                .put(put_deployment)
                .delete(delete_deployment),
        ),
    ]
}

pub fn routes() -> Router<Cluster> {
    table()
        .into_iter()
        .fold(Router::new(), |r, (path, m)| r.route(path, m))
        .fallback(|| async { ApiError::unknown_route() })
        .method_not_allowed_fallback(|| async { ApiError::method_not_allowed() })
}

/// A request the admin API refuses: the spec's `UNSUPPORTED` ("invalid set of parameters"),
/// with the 400 the admin API has always answered.
fn invalid(msg: impl Into<String>) -> ApiError {
    ApiError::new(ErrorCode::Unsupported)
        .with_status(StatusCode::BAD_REQUEST)
        .message(msg)
}

/// The metadata store failed. The operator asking is the one who can fix it, so the
/// message carries the store's error (unlike the registry API's 5xx).
fn unavailable(e: impl std::fmt::Display) -> ApiError {
    tracing::warn!(error = %e, "admin request failed on the metadata store");
    ApiError::new(ErrorCode::Unavailable).message(e.to_string())
}

/// A path parameter type and how its refusal reads.
trait Param: FromStr {
    fn refused(raw: &str) -> ApiError;
}

impl Param for ShardKey {
    fn refused(raw: &str) -> ApiError {
        ApiError::new(ErrorCode::NameInvalid).message(format!("{raw:?} is not a valid shard key"))
    }
}

impl Param for NodeId {
    fn refused(raw: &str) -> ApiError {
        invalid(format!("{raw:?} is not a valid node id"))
    }
}

/// The route's one path parameter, parsed; refused in the OCI error shape instead of axum's
/// plain-text rejection.
struct PathParam<T>(T);

impl<S: Send + Sync, T: Param> FromRequestParts<S> for PathParam<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let Path(raw) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|e| invalid(e.body_text()).with_status(e.status()))?;
        raw.parse().map(PathParam).map_err(|_| T::refused(&raw))
    }
}

/// Body of `PUT /shards/{key}`.
#[derive(Debug, Serialize, Deserialize)]
struct PinRequest {
    /// Node ids, primary first. Strings rather than `NodeId`s so a bad id is named in the
    /// error instead of failing the whole body.
    replicas: Vec<String>,
}

/// Any body that does not decode (not JSON, wrong content type, wrong shape) gets the same
/// 400 naming the expected shape, with axum's reason as the detail.
impl<S: Send + Sync> FromRequest<S> for PinRequest {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        match Json::<PinRequest>::from_request(req, state).await {
            Ok(Json(body)) => Ok(body),
            Err(e) => Err(
                invalid(r#"body must be JSON: {"replicas": ["node-id", ...]}"#)
                    .detail(e.body_text()),
            ),
        }
    }
}

/// Body of `PUT /deployments/{key}`: `tag` or `digest` (a digest pins it), the hosts, and
/// how the container runs (`shardmap::ContainerSpec`, every field optional).
#[derive(Debug, Serialize, Deserialize)]
struct DeploymentRequest {
    /// The repository under the key the image comes from (default: the key itself).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    repository: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tag: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    digest: Option<String>,
    hosts: Vec<String>,
    #[serde(default)]
    container: shardmap::ContainerSpec,
}

impl<S: Send + Sync> FromRequest<S> for DeploymentRequest {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        match Json::<DeploymentRequest>::from_request(req, state).await {
            Ok(Json(body)) => Ok(body),
            Err(e) => Err(invalid(
                r#"body must be JSON: {"tag": "v1" | "digest": "sha256:...", "hosts": ["host", ...], "container": {...}}"#,
            )
            .detail(e.body_text())),
        }
    }
}

/// A deploy host's name: what `flotilla agent --host` takes and container names carry.
fn valid_host(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 63
        && h.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

fn no_deployment(key: &ShardKey) -> ApiError {
    ApiError::new(ErrorCode::NameUnknown)
        .message("no deployment for this key")
        .detail(key.as_str())
}

/// Every desired deployment, by key.
async fn deployments(
    State(c): State<Cluster>,
) -> Result<Json<Vec<shardmap::DeploymentRecord>>, ApiError> {
    let mut out: Vec<_> = c
        .map()
        .list_deployments()
        .await
        .map_err(unavailable)?
        .into_iter()
        .map(|(r, _)| r)
        .collect();
    out.sort_by(|a, b| a.key.cmp(&b.key));
    Ok(Json(out))
}

async fn deployment(
    State(c): State<Cluster>,
    PathParam(key): PathParam<ShardKey>,
) -> Result<Json<shardmap::DeploymentRecord>, ApiError> {
    match c.map().get_deployment(&key).await.map_err(unavailable)? {
        Some((rec, _)) => Ok(Json(rec)),
        None => Err(no_deployment(&key)),
    }
}

/// Set what the deploy agents run for `key` (a whole key: `service/mode`), checked before it
/// is stored: a tag or a digest, hosts named as agents name themselves, distinct host ports,
/// a repository under the key.
async fn put_deployment(
    State(c): State<Cluster>,
    PathParam(key): PathParam<ShardKey>,
    req: DeploymentRequest,
) -> Result<Json<shardmap::DeploymentRecord>, ApiError> {
    let depth = c.config().shard_key_depth.get();
    if key.as_str().split('/').count() != depth {
        return Err(invalid(format!(
            "{key} is not a shard key: deployments are per key ({depth} components)"
        )));
    }
    let repository: flotilla_core::RepoName = req
        .repository
        .as_deref()
        .unwrap_or(key.as_str())
        .parse()
        .map_err(|e| invalid(format!("repository: {e}")))?;
    if repository.shard_key(c.config().shard_key_depth) != key {
        return Err(invalid(format!(
            "repository {repository} is not under {key}"
        )));
    }
    let tag = req
        .tag
        .as_deref()
        .map(str::parse::<flotilla_core::Tag>)
        .transpose()
        .map_err(|e| invalid(format!("tag: {e}")))?;
    let digest = req
        .digest
        .as_deref()
        .map(str::parse::<flotilla_core::Digest>)
        .transpose()
        .map_err(|e| invalid(format!("digest: {e}")))?;
    if tag.is_none() && digest.is_none() {
        return Err(invalid("a deployment needs a tag or a digest"));
    }
    if req.hosts.is_empty() {
        return Err(invalid("hosts must name at least one host"));
    }
    let mut hosts = Vec::new();
    for h in &req.hosts {
        if !valid_host(h) {
            return Err(invalid(format!("host {h:?}: 1 to 63 of A-Z a-z 0-9 . _ -")));
        }
        if hosts.contains(h) {
            return Err(invalid(format!("host {h} is listed twice")));
        }
        hosts.push(h.clone());
    }
    let mut ports = HashSet::new();
    for p in &req.container.ports {
        if p.host == 0 || p.container == 0 || !ports.insert(p.host) {
            return Err(invalid(format!(
                "port {}:{}: ports are 1-65535, each host port once",
                p.host, p.container
            )));
        }
    }
    if let Some(h) = &req.container.health {
        if h.command.trim().is_empty() || h.interval_secs == 0 || h.timeout_secs == 0 {
            return Err(invalid(
                "health: a command, and interval_secs and timeout_secs above 0",
            ));
        }
    }
    let rec = shardmap::DeploymentRecord {
        key,
        repository,
        tag,
        digest,
        hosts,
        container: req.container,
        updated_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0),
    };
    c.map().put_deployment(&rec).await.map_err(unavailable)?;
    tracing::info!(key = %rec.key, tag = ?rec.tag.as_ref().map(|t| t.to_string()),
        digest = ?rec.digest.as_ref().map(|d| d.to_string()), hosts = ?rec.hosts, "deployment set");
    Ok(Json(rec))
}

/// Remove a key's deployment; the answer is what was removed.
async fn delete_deployment(
    State(c): State<Cluster>,
    PathParam(key): PathParam<ShardKey>,
) -> Result<Json<shardmap::DeploymentRecord>, ApiError> {
    let Some((rec, _)) = c.map().get_deployment(&key).await.map_err(unavailable)? else {
        return Err(no_deployment(&key));
    };
    c.map().delete_deployment(&key).await.map_err(unavailable)?;
    tracing::info!(key = %key, "deployment removed");
    Ok(Json(rec))
}

/// One entry of `GET /nodes`: the node record as routing sees it.
#[derive(Debug, Serialize)]
struct NodeView {
    id: NodeId,
    url: String,
    rack: RackId,
    state: NodeState,
    live: bool,
    /// Shard keys listing the node as a replica.
    shards: usize,
    heartbeat_ms: u64,
    /// The node reached its object store at its last heartbeat.
    store_ok: bool,
    /// The node takes new data (false: its disk is below its free-space floor).
    writable: bool,
}

/// `GET /reseed`. Records are shown as stored, `"v"` included.
#[derive(Debug, Serialize)]
struct ReseedReport {
    leader: Option<SeederLeader>,
    reseeds: Vec<Versioned<ReseedRecord>>,
    moves: Vec<Versioned<MoveRecord>>,
}

pub async fn readyz(State(c): State<Cluster>) -> Response {
    if c.store_ok() && !c.nodes().is_empty() {
        "ready".into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "no metadata store or no nodes yet",
        )
            .into_response()
    }
}

pub async fn metrics_text(State(c): State<Cluster>) -> Response {
    match &c.config().metrics {
        Some(h) => h.render().into_response(),
        None => (StatusCode::NOT_FOUND, "metrics recorder not installed").into_response(),
    }
}

async fn nodes(State(c): State<Cluster>) -> Json<Vec<NodeView>> {
    let shards = c.shards();
    let mut out: Vec<NodeView> = c
        .nodes()
        .values()
        .map(|n| NodeView {
            id: n.id.clone(),
            url: n.url.clone(),
            rack: n.rack.clone(),
            state: n.state,
            live: c.is_live(n),
            shards: shards.iter().filter(|s| s.replicas.contains(&n.id)).count(),
            heartbeat_ms: n.heartbeat_ms,
            store_ok: n.store_ok,
            writable: n.writable,
        })
        .collect();
    out.sort_by(|a, b| a.id.cmp(&b.id));
    Json(out)
}

async fn shards(State(c): State<Cluster>) -> Json<Vec<ShardRecord>> {
    let mut out: Vec<ShardRecord> = c.shards();
    out.sort_by(|a, b| a.key.cmp(&b.key));
    Json(out)
}

/// Records the router skipped because this build cannot read them (corrupt, or written by a
/// newer version): everything else keeps working, and these wait for an operator.
async fn unreadable(State(c): State<Cluster>) -> Json<Vec<shardmap::Unreadable>> {
    Json(c.unreadable())
}

async fn shard(
    State(c): State<Cluster>,
    PathParam(key): PathParam<ShardKey>,
) -> Result<Json<ShardRecord>, ApiError> {
    match c.map().get_shard(&key).await.map_err(unavailable)? {
        Some((rec, _)) => Ok(Json(rec)),
        None => Err(ApiError::new(ErrorCode::NameUnknown)
            .message("no such shard key")
            .detail(key.as_str())),
    }
}

/// Pin a key to operator-chosen nodes: distinct, registered, in distinct racks when the
/// cluster has enough racks.
async fn pin_shard(
    State(c): State<Cluster>,
    PathParam(key): PathParam<ShardKey>,
    req: PinRequest,
) -> Result<Json<ShardRecord>, ApiError> {
    let nodes = c.nodes();
    let mut ids = Vec::new();
    for r in &req.replicas {
        let id: NodeId = r.parse().map_err(|_| NodeId::refused(r))?;
        if !nodes.contains_key(&id) {
            return Err(invalid(format!("node {id} is not registered")));
        }
        if ids.contains(&id) {
            return Err(invalid(format!("node {id} is listed twice")));
        }
        ids.push(id);
    }
    if ids.is_empty() {
        return Err(invalid("at least one replica is required"));
    }
    let racks: HashSet<_> = ids
        .iter()
        .filter_map(|i| nodes.get(i))
        .map(|n| &n.rack)
        .collect();
    let cluster_racks: HashSet<_> = nodes.values().map(|n| &n.rack).collect();
    if racks.len() < ids.len() && cluster_racks.len() >= ids.len() {
        return Err(invalid(
            "replicas must be in distinct racks when the cluster has enough racks",
        ));
    }
    let map = c.map();
    for _ in 0..CAS_ATTEMPTS {
        let current = map.get_shard(&key).await.map_err(unavailable)?;
        let (epoch, created, version) = match &current {
            Some((r, v)) => (r.epoch + 1, r.created_ms, Some(*v)),
            None => (1, 0, None),
        };
        // A replica that stays keeps its lag (one catching up starts over): pinning does
        // not make its copy current.
        let lagging = current
            .as_ref()
            .map(|(r, _)| {
                r.lagging
                    .iter()
                    .chain(r.syncing.iter())
                    .filter(|l| ids.contains(l))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        let rec = ShardRecord {
            key: key.clone(),
            replicas: ids.clone(),
            joining: Vec::new(),
            lagging,
            syncing: Vec::new(),
            epoch,
            pinned: true,
            rack_relaxed: racks.len() < ids.len(),
            created_ms: created,
        };
        if map
            .cas_shard(&rec, version)
            .await
            .map_err(unavailable)?
            .is_ok()
        {
            c.cache_shard(rec.clone());
            return Ok(Json(rec));
        }
    }
    Err(unavailable("the shard record kept changing; retry"))
}

async fn set_state(
    c: &Cluster,
    id: &NodeId,
    state: NodeState,
) -> Result<Json<NodeRecord>, ApiError> {
    let key = c.map().keys().node(id);
    let store = c.map().store();
    for _ in 0..CAS_ATTEMPTS {
        let Some((mut rec, version)) = c.map().get_node(id).await.map_err(unavailable)? else {
            return Err(ApiError::new(ErrorCode::NameUnknown)
                .message("no such node")
                .detail(id.as_str()));
        };
        rec.state = state;
        let bytes = rec.encode();
        if store
            .cas(&key, Some(version), bytes.into())
            .await
            .map_err(unavailable)?
            .is_ok()
        {
            let _ = c.refresh().await;
            return Ok(Json(rec));
        }
    }
    Err(unavailable("the node record kept changing; retry"))
}

async fn drain(
    State(c): State<Cluster>,
    PathParam(id): PathParam<NodeId>,
) -> Result<Json<NodeRecord>, ApiError> {
    set_state(&c, &id, NodeState::Draining).await
}

async fn undrain(
    State(c): State<Cluster>,
    PathParam(id): PathParam<NodeId>,
) -> Result<Json<NodeRecord>, ApiError> {
    set_state(&c, &id, NodeState::Ready).await
}

/// Recovery progress as the seeder records it in the metadata store: the acting leader,
/// every node's reseed (shards, objects, bytes, rate, ETA) and the replica moves in flight.
/// Read from the store on each call (not the router's cache) so it is current.
async fn reseed(State(c): State<Cluster>) -> Result<Json<ReseedReport>, ApiError> {
    let keys = c.map().keys();
    let store = c.map().store();
    let leader = store
        .get(&keys.seeder_leader())
        .await
        .map_err(unavailable)?
        .and_then(|(b, _)| SeederLeader::decode(&b));
    Ok(Json(ReseedReport {
        leader,
        reseeds: stored(&c, &keys.reseeds()).await?,
        moves: stored(&c, &keys.moves()).await?,
    }))
}

/// The records under `prefix`. One that does not decode (corrupt, or a newer format) is
/// left out rather than failing the whole report, as the seeder itself skips it.
async fn stored<T: Record>(c: &Cluster, prefix: &str) -> Result<Vec<Versioned<T>>, ApiError> {
    let entries = c.map().store().list(prefix).await.map_err(unavailable)?;
    Ok(entries
        .iter()
        .filter_map(|e| match T::decode(&e.key, &e.value) {
            Ok(rec) => Some(Versioned::current(rec)),
            Err(err) => {
                tracing::debug!(error = %err, "admin reseed report skips a record");
                None
            }
        })
        .collect())
}

/// `?since=SEQ&limit=N` of `GET /events`.
#[derive(serde::Deserialize)]
struct EventsQuery {
    #[serde(default)]
    since: u64,
    limit: Option<usize>,
}

/// One entry of `GET /events`: an event and its place in the journal.
#[derive(serde::Serialize)]
struct TimelineEntry {
    seq: u64,
    event: flotilla_events::Event,
}

/// `GET /events?since=SEQ&limit=N`: the events recorded after `since`, oldest first (page
/// by passing the last `seq` back). Without sinks there is no outbox and the list is empty.
async fn events(
    State(c): State<Cluster>,
    axum::extract::Query(q): axum::extract::Query<EventsQuery>,
) -> Result<Json<Vec<TimelineEntry>>, ApiError> {
    let Some(outbox) = c.events() else {
        return Ok(Json(Vec::new()));
    };
    let limit = q.limit.unwrap_or(100).min(1000);
    let outbox = outbox.clone();
    let got = tokio::task::spawn_blocking(move || outbox.since(q.since, limit))
        .await
        .map_err(|e| ApiError::new(ErrorCode::Unavailable).message(e.to_string()))?
        .map_err(|e| {
            tracing::error!(error = %e, "reading the events journal");
            ApiError::new(ErrorCode::Unavailable).message(e.to_string())
        })?;
    Ok(Json(
        got.into_iter()
            .map(|(seq, event)| TimelineEntry { seq, event })
            .collect(),
    ))
}

/// `GET /events/sinks`: each sink's queue depth, last success and last error.
async fn event_sinks(State(c): State<Cluster>) -> Json<Vec<flotilla_events::SinkStatus>> {
    Json(c.events().map(|o| o.sinks()).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use axum::body::Body;
    use serde_json::Value;
    use shardmap::{MoveReason, ReseedStatus};
    use tower::ServiceExt;

    use super::*;
    use crate::RouterConfig;

    const DOC: &str = include_str!("../../docs/openapi.yaml");
    const METHODS: [&str; 7] = ["get", "put", "post", "delete", "patch", "head", "options"];

    fn doc() -> Value {
        serde_yaml_ng::from_str(DOC).expect("docs/openapi.yaml parses")
    }

    /// The document's path for a registered axum path.
    fn doc_path(axum_path: &str) -> String {
        format!("/admin/v1{}", axum_path.replace("{*key}", "{key}"))
    }

    /// A concrete request path for a documented one.
    fn concrete(doc_path: &str) -> String {
        doc_path
            .replace("{key}", "billing/prod")
            .replace("{id}", "n1")
    }

    async fn cluster() -> (tempfile::TempDir, Cluster) {
        let dir = tempfile::tempdir().unwrap();
        let cfg = RouterConfig::new(shardmap::MetaUrl::file(dir.path()).unwrap());
        let c = Cluster::open(cfg).await.unwrap();
        (dir, c)
    }

    async fn call(c: &Cluster, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
        let mut req = Request::builder()
            .method(method.to_uppercase().as_str())
            .uri(path);
        if body.is_some() {
            req = req.header("content-type", "application/json");
        }
        let req = req
            .body(Body::from(body.unwrap_or_default().to_owned()))
            .unwrap();
        let resp = crate::app(c.clone()).oneshot(req).await.unwrap();
        let status = resp.status().as_u16();
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .unwrap();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    /// `(status, code, message)` of an OCI error body; panics on any other shape.
    fn oci_error(status: u16, v: &Value) -> (u16, String, String) {
        let e = &v["errors"][0];
        let code = e["code"]
            .as_str()
            .unwrap_or_else(|| panic!("{status}: {v}"));
        let message = e["message"]
            .as_str()
            .unwrap_or_else(|| panic!("{status}: {v}"));
        (status, code.to_owned(), message.to_owned())
    }

    fn documented_methods(doc: &Value, path: &str) -> BTreeSet<String> {
        let item = doc["paths"][path].as_object().cloned().unwrap_or_default();
        item.keys()
            .filter(|k| METHODS.contains(&k.as_str()))
            .cloned()
            .collect()
    }

    #[tokio::test]
    async fn every_route_is_documented_with_its_methods() {
        let doc = doc();
        let registered: BTreeSet<String> = table().iter().map(|(p, _)| doc_path(p)).collect();
        let documented: BTreeSet<String> =
            doc["paths"].as_object().unwrap().keys().cloned().collect();
        assert_eq!(
            registered, documented,
            "admin routes vs docs/openapi.yaml paths"
        );

        let (_dir, c) = cluster().await;
        for path in &registered {
            let methods = documented_methods(&doc, path);
            assert!(!methods.is_empty(), "{path} documents no method");
            for m in ["get", "put", "post", "delete", "patch"] {
                let (s, v) = call(&c, m, &concrete(path), None).await;
                if methods.contains(m) {
                    assert_ne!(s, 405, "{m} {path} is documented but not routed: {v}");
                } else {
                    assert_eq!(s, 405, "{m} {path} is routed but not documented: {v}");
                    assert_eq!(oci_error(s, &v).1, "UNSUPPORTED");
                }
            }
        }
        let (s, v) = call(&c, "get", "/admin/v1/nope", None).await;
        assert_eq!(
            oci_error(s, &v),
            (404, "UNSUPPORTED".into(), "no such API endpoint".into())
        );
    }

    /// A deployment with every optional field set, so the document must describe them all.
    fn deployment_record() -> shardmap::DeploymentRecord {
        shardmap::DeploymentRecord {
            key: "billing/prod".parse().unwrap(),
            repository: "billing/prod/api".parse().unwrap(),
            tag: Some("v1".parse().unwrap()),
            digest: Some(format!("sha256:{}", "a".repeat(64)).parse().unwrap()),
            hosts: vec!["h1".into()],
            container: shardmap::ContainerSpec {
                command: vec!["/app".into()],
                env: [("MODE".to_string(), "prod".to_string())].into(),
                ports: vec![shardmap::PortSpec {
                    host: 8080,
                    container: 80,
                }],
                health: Some(shardmap::HealthSpec {
                    command: "true".into(),
                    interval_secs: 1,
                    timeout_secs: 60,
                }),
                drain_secs: 30,
            },
            updated_ms: 1,
        }
    }

    fn node_record() -> NodeRecord {
        NodeRecord {
            id: "n1".parse().unwrap(),
            url: "http://10.0.0.5:5001".into(),
            rack: "r1".parse().unwrap(),
            state: NodeState::Ready,
            heartbeat_ms: 1,
            weight: 1,
            store_ok: true,
            writable: true,
        }
    }

    fn shard_record() -> ShardRecord {
        ShardRecord {
            key: "billing/prod".parse().unwrap(),
            replicas: vec!["n1".parse().unwrap()],
            joining: vec!["n2".parse().unwrap()],
            lagging: vec!["n3".parse().unwrap()],
            syncing: vec!["n4".parse().unwrap()],
            epoch: 1,
            pinned: true,
            rack_relaxed: false,
            created_ms: 1,
        }
    }

    /// Every optional field set, so every documented property has a value to check.
    fn reseed_report() -> ReseedReport {
        ReseedReport {
            leader: Some(SeederLeader {
                id: "seeder-1".into(),
                since_ms: 1,
            }),
            reseeds: vec![Versioned::current(ReseedRecord {
                node: "n1".parse().unwrap(),
                seed_id: "s".into(),
                status: ReseedStatus::Done,
                started_ms: 1,
                updated_ms: 2,
                finished_ms: Some(3),
                shards_total: 1,
                shards_done: vec!["billing/prod".parse().unwrap()],
                repos_done: vec!["billing/prod/api".parse().unwrap()],
                objects_total: 1,
                objects_done: 1,
                bytes_done: 1,
                bytes_per_sec: 1.5,
                objects_per_sec: 1.5,
                eta_secs: Some(0.5),
                seeder: "seeder-1".into(),
                last_error: Some("boom".into()),
            })],
            moves: vec![Versioned::current(MoveRecord {
                key: "billing/prod".parse().unwrap(),
                from: "n1".parse().unwrap(),
                to: "n2".parse().unwrap(),
                reason: MoveReason::Rebalance,
                started_ms: 1,
                updated_ms: 2,
                joined_ms: Some(2),
                repos_total: 1,
                repos_done: 1,
                objects_done: 1,
                bytes_done: 1,
                seeder: "seeder-1".into(),
                last_error: Some("boom".into()),
            })],
        }
    }

    /// What the handler of `method path` serialises on success.
    fn success_sample(method: &str, path: &str) -> Value {
        let v = match (method, path) {
            ("get", "/admin/v1/nodes") => serde_json::to_value(vec![NodeView {
                id: "n1".parse().unwrap(),
                url: "http://10.0.0.5:5001".into(),
                rack: "r1".parse().unwrap(),
                state: NodeState::Ready,
                live: true,
                shards: 1,
                heartbeat_ms: 1,
                store_ok: true,
                writable: true,
            }]),
            ("get", "/admin/v1/shards") => serde_json::to_value(vec![shard_record()]),
            ("get" | "put", "/admin/v1/shards/{key}") => serde_json::to_value(shard_record()),
            ("post", "/admin/v1/nodes/{id}/drain" | "/admin/v1/nodes/{id}/undrain") => {
                serde_json::to_value(node_record())
            }
            ("get", "/admin/v1/reseed") => serde_json::to_value(reseed_report()),
            ("get", "/admin/v1/unreadable") => serde_json::to_value(vec![shardmap::Unreadable {
                key: "flotilla/shards/billing~prod".into(),
                error: "record has format version 9".into(),
            }]),
            ("get", "/admin/v1/events") => serde_json::to_value(vec![TimelineEntry {
                seq: 7,
                event: flotilla_events::Event::new(
                    "push",
                    flotilla_events::Target {
                        media_type: "application/vnd.oci.image.manifest.v1+json".into(),
                        size: 528,
                        digest: format!("sha256:{}", "a".repeat(64)),
                        length: 528,
                        repository: "billing/api".into(),
                        tag: Some("v1".into()),
                    },
                    Some("bob".into()),
                    flotilla_events::Source {
                        addr: "router-1".into(),
                        instance_id: "7f1c".into(),
                    },
                ),
            }]),
            ("get", "/admin/v1/events/sinks") => {
                serde_json::to_value(vec![flotilla_events::SinkStatus {
                    name: "hook".into(),
                    url: "http://hooks.example:8080/registry".into(),
                    pending: 3,
                    delivered_through: 41,
                    last_success: Some("2026-12-02T18:00:00.000Z".into()),
                    last_error: Some("the receiver answered 500".into()),
                    consecutive_failures: 2,
                }])
            }
            ("get", "/admin/v1/deployments") => serde_json::to_value(vec![deployment_record()]),
            ("get" | "put" | "delete", "/admin/v1/deployments/{key}") => {
                serde_json::to_value(deployment_record())
            }
            other => panic!("no sample for {other:?}: add one with the new endpoint"),
        };
        v.unwrap()
    }

    fn resolve<'a>(doc: &'a Value, schema: &'a Value) -> &'a Value {
        match schema["$ref"].as_str() {
            Some(r) => {
                let name = r.strip_prefix("#/components/schemas/").unwrap_or(r);
                let target = &doc["components"]["schemas"][name];
                assert!(target.is_object(), "unresolved $ref {r}");
                resolve(doc, target)
            }
            None => schema,
        }
    }

    /// Differences between `schema` and the serialised `value`, with their JSON path.
    fn mismatches(doc: &Value, schema: &Value, value: &Value, at: &str, out: &mut Vec<String>) {
        let schema = resolve(doc, schema);
        if value.is_null() {
            if schema["nullable"] != true {
                out.push(format!("{at}: null, but the schema is not nullable"));
            }
            return;
        }
        if let Some(props) = schema["properties"].as_object() {
            let Some(obj) = value.as_object() else {
                out.push(format!(
                    "{at}: the schema has properties, the value is {value}"
                ));
                return;
            };
            let want: BTreeSet<&String> = props.keys().collect();
            let have: BTreeSet<&String> = obj.keys().collect();
            if want != have {
                out.push(format!(
                    "{at}: documented properties {want:?}, serialised fields {have:?}"
                ));
            }
            for r in schema["required"].as_array().into_iter().flatten() {
                let r = r.as_str().unwrap_or_default();
                if !props.contains_key(r) {
                    out.push(format!("{at}: required {r:?} is not a property"));
                }
            }
            for (k, sub) in props {
                if let Some(v) = obj.get(k) {
                    mismatches(doc, sub, v, &format!("{at}.{k}"), out);
                }
            }
            return;
        }
        let ok = match schema["type"].as_str() {
            Some("array") => {
                let Some(items) = value.as_array() else {
                    out.push(format!("{at}: documented array, serialised {value}"));
                    return;
                };
                if items.is_empty() {
                    out.push(format!("{at}: the sample array is empty, nothing checked"));
                }
                for (i, v) in items.iter().enumerate() {
                    mismatches(doc, &schema["items"], v, &format!("{at}[{i}]"), out);
                }
                true
            }
            Some("string") => value.is_string(),
            Some("integer") => value.is_u64() || value.is_i64(),
            Some("number") => value.is_number(),
            Some("boolean") => value.is_boolean(),
            Some("object") => value.is_object(),
            // OpenAPI's "any value" (the error body's `detail`).
            None => true,
            Some(other) => {
                out.push(format!("{at}: unknown schema type {other:?}"));
                true
            }
        };
        if !ok {
            out.push(format!(
                "{at}: documented {}, serialised {value}",
                schema["type"]
            ));
        }
        if let Some(allowed) = schema["enum"].as_array() {
            if !allowed.contains(value) {
                out.push(format!(
                    "{at}: {value} is not in the documented enum {allowed:?}"
                ));
            }
        }
    }

    fn json_schema(content_holder: &Value) -> &Value {
        &content_holder["content"]["application/json"]["schema"]
    }

    #[tokio::test]
    async fn documented_bodies_match_the_types() {
        let doc = doc();
        let error_body = {
            let resp = invalid("x").detail("d").into_response();
            let bytes = axum::body::to_bytes(resp.into_body(), 1 << 16)
                .await
                .unwrap();
            serde_json::from_slice::<Value>(&bytes).unwrap()
        };
        let mut out = Vec::new();
        for (axum_path, _) in table() {
            let path = doc_path(axum_path);
            for method in documented_methods(&doc, &path) {
                let op = &doc["paths"][&path][&method];
                let at = format!("{method} {path}");
                let responses = op["responses"].as_object().unwrap();
                assert!(responses.contains_key("200"), "{at}: no 200 documented");
                for (status, resp) in responses {
                    let schema = json_schema(resp);
                    let sample = if status == "200" {
                        success_sample(&method, &path)
                    } else {
                        error_body.clone()
                    };
                    mismatches(&doc, schema, &sample, &format!("{at} {status}"), &mut out);
                }
                if op.get("requestBody").is_some() {
                    let sample = if path.starts_with("/admin/v1/deployments") {
                        serde_json::to_value(DeploymentRequest {
                            repository: Some("billing/prod/api".into()),
                            tag: Some("v1".into()),
                            digest: Some(format!("sha256:{}", "a".repeat(64))),
                            hosts: vec!["h1".into()],
                            container: deployment_record().container,
                        })
                    } else {
                        serde_json::to_value(PinRequest {
                            replicas: vec!["n1".into()],
                        })
                    }
                    .unwrap();
                    let schema = json_schema(&op["requestBody"]);
                    mismatches(&doc, schema, &sample, &format!("{at} body"), &mut out);
                }
            }
        }
        assert!(
            out.is_empty(),
            "docs/openapi.yaml drifted:\n{}",
            out.join("\n")
        );
    }

    #[tokio::test]
    async fn refusals_are_oci_error_bodies() {
        let (_dir, c) = cluster().await;
        let cases = [
            (
                "get",
                "/admin/v1/shards/Bad",
                None,
                400,
                "NAME_INVALID",
                "\"Bad\" is not a valid shard key",
            ),
            (
                "put",
                "/admin/v1/shards/Bad",
                Some(r#"{"replicas":["n1"]}"#),
                400,
                "NAME_INVALID",
                "is not a valid shard key",
            ),
            (
                "get",
                "/admin/v1/shards/billing/prod",
                None,
                404,
                "NAME_UNKNOWN",
                "no such shard key",
            ),
            (
                "put",
                "/admin/v1/shards/billing/prod",
                Some("{not json"),
                400,
                "UNSUPPORTED",
                "body must be JSON",
            ),
            (
                "put",
                "/admin/v1/shards/billing/prod",
                None,
                400,
                "UNSUPPORTED",
                "body must be JSON",
            ),
            (
                "put",
                "/admin/v1/shards/billing/prod",
                Some(r#"{"replicas":["N!"]}"#),
                400,
                "UNSUPPORTED",
                "\"N!\" is not a valid node id",
            ),
            (
                "put",
                "/admin/v1/shards/billing/prod",
                Some(r#"{"replicas":["n1"]}"#),
                400,
                "UNSUPPORTED",
                "node n1 is not registered",
            ),
            (
                "put",
                "/admin/v1/shards/billing/prod",
                Some(r#"{"replicas":[]}"#),
                400,
                "UNSUPPORTED",
                "at least one replica",
            ),
            (
                "post",
                "/admin/v1/nodes/Bad/drain",
                None,
                400,
                "UNSUPPORTED",
                "\"Bad\" is not a valid node id",
            ),
            (
                "post",
                "/admin/v1/nodes/n9/undrain",
                None,
                404,
                "NAME_UNKNOWN",
                "no such node",
            ),
            (
                "delete",
                "/admin/v1/reseed",
                None,
                405,
                "UNSUPPORTED",
                "method not allowed",
            ),
        ];
        for (method, path, body, status, code, msg) in cases {
            let (s, v) = call(&c, method, path, body).await;
            let (s, got_code, got_msg) = oci_error(s, &v);
            assert_eq!(
                (s, got_code.as_str()),
                (status, code),
                "{method} {path}: {v}"
            );
            assert!(
                got_msg.contains(msg),
                "{method} {path}: {got_msg:?} lacks {msg:?}"
            );
        }
        let (s, v) = call(&c, "get", "/admin/v1/reseed", None).await;
        assert_eq!(s, 200, "{v}");
        assert_eq!(
            v,
            serde_json::json!({"leader": null, "reseeds": [], "moves": []})
        );
    }

    #[tokio::test]
    async fn deployments_are_set_read_listed_and_removed_and_bad_bodies_are_refused() {
        let (_dir, c) = cluster().await;
        let path = "/admin/v1/deployments/billing/prod";
        let (s, v) = call(&c, "get", path, None).await;
        assert_eq!(oci_error(s, &v).1, "NAME_UNKNOWN");

        let body = r#"{"tag":"v1","hosts":["h1","h2"],"container":{"ports":[{"host":8080,"container":80}]}}"#;
        let (s, v) = call(&c, "put", path, Some(body)).await;
        assert_eq!(s, 200, "{v}");
        assert_eq!(v["repository"], "billing/prod");
        assert_eq!(v["container"]["drain_secs"], 30, "the default drain");
        let (s, got) = call(&c, "get", path, None).await;
        assert_eq!((s, &got), (200, &v));
        let (s, list) = call(&c, "get", "/admin/v1/deployments", None).await;
        assert_eq!((s, list), (200, Value::Array(vec![v.clone()])));

        let check = |body: &'static str, want: &'static str| {
            let c = c.clone();
            async move {
                let (s, v) = call(&c, "put", path, Some(body)).await;
                let (status, code, message) = oci_error(s, &v);
                assert_eq!((status, code.as_str()), (400, "UNSUPPORTED"), "{body}: {v}");
                assert!(message.contains(want), "{body}: {message}");
            }
        };
        check(r#"{"hosts":["h1"]}"#, "a tag or a digest").await;
        check(r#"{"tag":"v1","hosts":[]}"#, "at least one host").await;
        check(r#"{"tag":"v1","hosts":["h1","h1"]}"#, "listed twice").await;
        check(r#"{"tag":"v1","hosts":["a b"]}"#, "host").await;
        check(r#"{"tag":"Bad Tag","hosts":["h1"]}"#, "tag").await;
        check(r#"{"digest":"sha256:xyz","hosts":["h1"]}"#, "digest").await;
        check(
            r#"{"tag":"v1","repository":"other/prod/api","hosts":["h1"]}"#,
            "not under",
        )
        .await;
        check(
            r#"{"tag":"v1","hosts":["h1"],"container":{"ports":[{"host":1,"container":2},{"host":1,"container":3}]}}"#,
            "each host port once",
        )
        .await;
        check(r#"{"tag":1}"#, "body must be JSON").await;
        let (s, v) = call(&c, "put", "/admin/v1/deployments/billing", Some(body)).await;
        assert_eq!(oci_error(s, &v).1, "UNSUPPORTED", "not a whole key: {v}");
        // A refused PUT left the stored deployment alone.
        let (_, still) = call(&c, "get", path, None).await;
        assert_eq!(still["hosts"], serde_json::json!(["h1", "h2"]));

        let (s, gone) = call(&c, "delete", path, None).await;
        assert_eq!((s, gone["key"].as_str()), (200, Some("billing/prod")));
        let (s, v) = call(&c, "get", path, None).await;
        assert_eq!(oci_error(s, &v).1, "NAME_UNKNOWN");
        let (s, v) = call(&c, "delete", path, None).await;
        assert_eq!(oci_error(s, &v).1, "NAME_UNKNOWN");
    }
}
