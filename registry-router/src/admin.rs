//! The admin API (`/admin/v1`, JSON) and the router's health and metrics endpoints.
//! Described in `docs/openapi.yaml`.

use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use flotilla_core::{NodeId, ShardKey};
use http::StatusCode;
use serde::Deserialize;
use shardmap::{NodeState, ShardRecord};

use crate::Cluster;

pub fn routes() -> Router<Cluster> {
    Router::new()
        .route("/nodes", get(nodes))
        .route("/shards", get(shards))
        .route("/shards/{*key}", get(shard).put(pin_shard))
        .route("/nodes/{id}/drain", post(drain))
        .route("/nodes/{id}/undrain", post(undrain))
        .route("/reseed", get(reseed))
}

fn bad_request(msg: impl Into<String>) -> Response {
    (
        StatusCode::BAD_REQUEST,
        Json(serde_json::json!({"error": msg.into()})),
    )
        .into_response()
}

fn unavailable(e: impl std::fmt::Display) -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(serde_json::json!({"error": e.to_string()})),
    )
        .into_response()
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

async fn nodes(State(c): State<Cluster>) -> Response {
    let shards = c.shards();
    let mut out: Vec<serde_json::Value> = c
        .nodes()
        .values()
        .map(|n| {
            let held: Vec<&str> = shards
                .values()
                .filter(|s| s.replicas.contains(&n.id))
                .map(|s| s.key.as_str())
                .collect();
            serde_json::json!({
                "id": n.id, "url": n.url, "rack": n.rack, "state": n.state,
                "live": c.is_live(n), "shards": held.len(), "heartbeat_ms": n.heartbeat_ms,
            })
        })
        .collect();
    out.sort_by(|a, b| a["id"].as_str().cmp(&b["id"].as_str()));
    Json(out).into_response()
}

async fn shards(State(c): State<Cluster>) -> Response {
    let mut out: Vec<ShardRecord> = c.shards().values().cloned().collect();
    out.sort_by(|a, b| a.key.cmp(&b.key));
    Json(out).into_response()
}

async fn shard(State(c): State<Cluster>, Path(key): Path<String>) -> Response {
    let Ok(key) = key.parse::<ShardKey>() else {
        return bad_request(format!("{key:?} is not a valid shard key"));
    };
    match c.map().get_shard(&key).await {
        Ok(Some((rec, _))) => Json(rec).into_response(),
        Ok(None) => (
            StatusCode::NOT_FOUND,
            Json(serde_json::json!({"error": "no such shard key"})),
        )
            .into_response(),
        Err(e) => unavailable(e),
    }
}

#[derive(Deserialize)]
struct PinRequest {
    replicas: Vec<String>,
}

/// Pin a key to operator-chosen nodes: distinct, registered, in distinct racks when the
/// cluster has enough racks.
async fn pin_shard(
    State(c): State<Cluster>,
    Path(key): Path<String>,
    body: Result<Json<PinRequest>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Ok(key) = key.parse::<ShardKey>() else {
        return bad_request(format!("{key:?} is not a valid shard key"));
    };
    let Ok(Json(req)) = body else {
        return bad_request("body must be JSON: {\"replicas\": [\"node-id\", ...]}");
    };
    let nodes = c.nodes();
    let mut ids = Vec::new();
    for r in &req.replicas {
        let Ok(id) = r.parse::<NodeId>() else {
            return bad_request(format!("{r:?} is not a valid node id"));
        };
        if !nodes.contains_key(&id) {
            return bad_request(format!("node {id} is not registered"));
        }
        if ids.contains(&id) {
            return bad_request(format!("node {id} is listed twice"));
        }
        ids.push(id);
    }
    if ids.is_empty() {
        return bad_request("at least one replica is required");
    }
    let racks: std::collections::HashSet<_> = ids
        .iter()
        .filter_map(|i| nodes.get(i))
        .map(|n| &n.rack)
        .collect();
    let cluster_racks: std::collections::HashSet<_> = nodes.values().map(|n| &n.rack).collect();
    if racks.len() < ids.len() && cluster_racks.len() >= ids.len() {
        return bad_request("replicas must be in distinct racks when the cluster has enough racks");
    }
    let map = c.map();
    for _ in 0..5 {
        let current = match map.get_shard(&key).await {
            Ok(cur) => cur,
            Err(e) => return unavailable(e),
        };
        let (epoch, created, version) = match &current {
            Some((r, v)) => (r.epoch + 1, r.created_ms, Some(*v)),
            None => (1, 0, None),
        };
        let rec = ShardRecord {
            key: key.clone(),
            replicas: ids.clone(),
            joining: Vec::new(),
            epoch,
            pinned: true,
            rack_relaxed: racks.len() < ids.len(),
            created_ms: created,
        };
        match map.cas_shard(&rec, version).await {
            Ok(Ok(_)) => {
                c.cache_shard(rec.clone());
                return Json(rec).into_response();
            }
            Ok(Err(_)) => continue,
            Err(e) => return unavailable(e),
        }
    }
    unavailable("the shard record kept changing; retry")
}

async fn set_state(c: &Cluster, id: &str, state: NodeState) -> Response {
    let Ok(id) = id.parse::<NodeId>() else {
        return bad_request(format!("{id:?} is not a valid node id"));
    };
    let key = c.map().keys().node(&id);
    let store = c.map().store();
    for _ in 0..5 {
        let (mut rec, version) = match c.map().get_node(&id).await {
            Ok(Some(r)) => r,
            Ok(None) => {
                return (
                    StatusCode::NOT_FOUND,
                    Json(serde_json::json!({"error": "no such node"})),
                )
                    .into_response()
            }
            Err(e) => return unavailable(e),
        };
        rec.state = state;
        let bytes = shardmap::Record::encode(&rec);
        match store.cas(&key, Some(version), bytes.into()).await {
            Ok(Ok(_)) => {
                let _ = c.refresh().await;
                return Json(rec).into_response();
            }
            Ok(Err(_)) => continue,
            Err(e) => return unavailable(e),
        }
    }
    unavailable("the node record kept changing; retry")
}

async fn drain(State(c): State<Cluster>, Path(id): Path<String>) -> Response {
    set_state(&c, &id, NodeState::Draining).await
}

async fn undrain(State(c): State<Cluster>, Path(id): Path<String>) -> Response {
    set_state(&c, &id, NodeState::Ready).await
}

/// Recovery progress as the seeder records it in the metadata store: the acting leader,
/// every node's reseed (shards, objects, bytes, rate, ETA) and the replica moves in flight.
/// Read from the store on each call (not the router's cache) so it is current.
async fn reseed(State(c): State<Cluster>) -> Response {
    let keys = c.map().keys().clone();
    let store = c.map().store().clone();
    let decode = |v: &[u8]| serde_json::from_slice::<serde_json::Value>(v).ok();
    let leader = match store.get(&keys.seeder_leader()).await {
        Ok(v) => v.and_then(|(b, _)| decode(&b)),
        Err(e) => return unavailable(e),
    };
    let mut lists = Vec::new();
    for prefix in [keys.reseeds(), keys.moves()] {
        match store.list(&prefix).await {
            Ok(entries) => lists.push(
                entries
                    .iter()
                    .filter_map(|e| decode(&e.value))
                    .collect::<Vec<_>>(),
            ),
            Err(e) => return unavailable(e),
        }
    }
    let moves = lists.pop().unwrap_or_default();
    let reseeds = lists.pop().unwrap_or_default();
    Json(serde_json::json!({ "leader": leader, "reseeds": reseeds, "moves": moves }))
        .into_response()
}
