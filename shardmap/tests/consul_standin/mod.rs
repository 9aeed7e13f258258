//! A Consul **stand-in** (used by the shardmap conformance suite and by the end-to-end
//! tests, which run routers, nodes and seeders on it): Consul's server cannot be installed
//! here, so this file implements the slice of its HTTP API the backend uses, following
//! Consul's documented semantics (KV, txn, sessions, blocking queries). It is not Consul; it
//! exists so the client's protocol handling is exercised end to end over real HTTP.
//!
//! Faithful: `CreateIndex`/`ModifyIndex`/`LockIndex`, `X-Consul-Index` on reads, 404 for a
//! missing key or empty prefix, `?cas=N` (`0` = create only) answering `false` on a lost race,
//! txn verbs `set`/`cas`/`lock` (409 with `Errors` on failure), `?acquire`/`?release`,
//! sessions with TTL, `Behavior=delete` (invalidation deletes the held keys, otherwise
//! releases them), renew answering 404 for an unknown session, blocking queries that return
//! when the index passes `index` or `wait` elapses.
//! Simplified: the index is one global counter (real Consul may report a per-prefix index;
//! both are allowed by its docs, which tell clients to expect spurious wake-ups), sessions
//! expire at exactly their TTL (Consul may wait up to 2×TTL), there is no lock-delay, and ACLs
//! are one optional token with every right ([`standin_app`]): a request without it gets
//! Consul's 403 `Permission denied` (as a cluster with `acl.default_policy = "deny"` answers
//! an anonymous client).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::{Json, Router};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde_json::{json, Value};

#[derive(Clone)]
struct Kv {
    value: Vec<u8>,
    create: u64,
    modify: u64,
    lock_index: u64,
    session: Option<String>,
}

struct Session {
    ttl: Duration,
    expires: Instant,
    delete: bool,
}

#[derive(Default)]
struct St {
    index: u64,
    kv: BTreeMap<String, Kv>,
    sessions: HashMap<String, Session>,
    next_session: u64,
}

#[derive(Clone)]
struct Standin {
    st: Arc<Mutex<St>>,
    changed: Arc<tokio::sync::watch::Sender<u64>>,
}

impl Standin {
    /// Mutate under the lock (after expiring sessions) and wake blocking queries.
    fn with<T>(&self, f: impl FnOnce(&mut St) -> T) -> T {
        let mut st = self.st.lock().unwrap();
        expire(&mut st);
        let out = f(&mut st);
        self.changed.send_replace(st.index);
        out
    }
}

fn expire(st: &mut St) {
    let now = Instant::now();
    let dead: Vec<String> = st
        .sessions
        .iter()
        .filter(|(_, s)| s.expires <= now)
        .map(|(id, _)| id.clone())
        .collect();
    for id in dead {
        invalidate(st, &id);
    }
}

fn invalidate(st: &mut St, id: &str) {
    let Some(sess) = st.sessions.remove(id) else {
        return;
    };
    let held: Vec<String> = st
        .kv
        .iter()
        .filter(|(_, kv)| kv.session.as_deref() == Some(id))
        .map(|(k, _)| k.clone())
        .collect();
    for k in held {
        st.index += 1;
        if sess.delete {
            st.kv.remove(&k);
        } else if let Some(kv) = st.kv.get_mut(&k) {
            kv.session = None;
            kv.modify = st.index;
        }
    }
}

fn render(key: &str, kv: &Kv) -> Value {
    json!({
        "Key": key, "Flags": 0, "LockIndex": kv.lock_index,
        "CreateIndex": kv.create, "ModifyIndex": kv.modify,
        "Value": if kv.value.is_empty() { Value::Null } else { B64.encode(&kv.value).into() },
        "Session": kv.session,
    })
}

/// set / cas / acquire on one key; `Ok(new entry)` or `Err(reason)`.
fn write(
    st: &mut St,
    key: &str,
    value: Vec<u8>,
    cas: Option<u64>,
    acquire: Option<&str>,
) -> Result<Value, String> {
    let cur = st.kv.get(key).cloned();
    if let Some(c) = cas {
        let ok = match &cur {
            None => c == 0,
            Some(kv) => kv.modify == c,
        };
        if !ok {
            return Err(format!("failed to set key {key:?}, index is stale"));
        }
    }
    let mut lock_index = cur.as_ref().map_or(0, |k| k.lock_index);
    let mut session = cur.as_ref().and_then(|k| k.session.clone());
    if let Some(s) = acquire {
        if !st.sessions.contains_key(s) {
            return Err(format!("invalid session {s:?}"));
        }
        match &session {
            Some(holder) if holder != s => return Err(format!("key {key:?} is locked")),
            Some(_) => {}
            None => {
                lock_index += 1;
                session = Some(s.to_owned());
            }
        }
    }
    st.index += 1;
    let kv = Kv {
        value,
        create: cur.as_ref().map_or(st.index, |k| k.create),
        modify: st.index,
        lock_index,
        session,
    };
    let out = render(key, &kv);
    st.kv.insert(key.to_owned(), kv);
    Ok(out)
}

async fn kv_get(
    State(s): State<Standin>,
    Path(key): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    if let Some(index) = q.get("index").and_then(|i| i.parse::<u64>().ok()) {
        let wait = q
            .get("wait")
            .and_then(|w| w.trim_end_matches('s').parse().ok())
            .map_or(Duration::from_secs(300), Duration::from_secs);
        let mut rx = s.changed.subscribe();
        let _ = tokio::time::timeout(wait, rx.wait_for(|i| *i > index)).await;
    }
    let (items, index) = s.with(|st| {
        let items: Vec<Value> = if q.contains_key("recurse") {
            st.kv
                .range(key.clone()..)
                .take_while(|(k, _)| k.starts_with(&key))
                .map(|(k, kv)| render(k, kv))
                .collect()
        } else {
            st.kv
                .get(&key)
                .map(|kv| render(&key, kv))
                .into_iter()
                .collect()
        };
        (items, st.index)
    });
    let mut h = HeaderMap::new();
    h.insert("X-Consul-Index", index.to_string().parse().unwrap());
    if items.is_empty() {
        return (StatusCode::NOT_FOUND, h).into_response();
    }
    (h, Json(Value::Array(items))).into_response()
}

async fn kv_put(
    State(s): State<Standin>,
    Path(key): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    body: Bytes,
) -> Response {
    let cas = q.get("cas").and_then(|c| c.parse().ok());
    s.with(|st| {
        if let Some(id) = q.get("release") {
            let held = st
                .kv
                .get(&key)
                .is_some_and(|kv| kv.session.as_deref() == Some(id));
            if held {
                st.index += 1;
                let idx = st.index;
                if let Some(kv) = st.kv.get_mut(&key) {
                    kv.session = None;
                    kv.modify = idx;
                }
            }
            return Json(held).into_response();
        }
        match write(
            st,
            &key,
            body.to_vec(),
            cas,
            q.get("acquire").map(String::as_str),
        ) {
            Ok(_) => Json(true).into_response(),
            Err(e) if e.starts_with("invalid session") => {
                (StatusCode::INTERNAL_SERVER_ERROR, e).into_response()
            }
            Err(_) => Json(false).into_response(),
        }
    })
}

async fn kv_delete(State(s): State<Standin>, Path(key): Path<String>) -> Json<bool> {
    s.with(|st| {
        if st.kv.remove(&key).is_some() {
            st.index += 1;
        }
    });
    Json(true)
}

async fn txn(State(s): State<Standin>, Json(ops): Json<Vec<Value>>) -> Response {
    s.with(|st| {
        let mut results = Vec::new();
        for (i, op) in ops.iter().enumerate() {
            let kv = &op["KV"];
            let key = kv["Key"].as_str().unwrap_or_default();
            let value = B64
                .decode(kv["Value"].as_str().unwrap_or_default())
                .unwrap_or_default();
            let r = match kv["Verb"].as_str() {
                Some("set") => write(st, key, value, None, None),
                Some("cas") => write(
                    st,
                    key,
                    value,
                    Some(kv["Index"].as_u64().unwrap_or(0)),
                    None,
                ),
                Some("lock") => write(st, key, value, None, kv["Session"].as_str()),
                other => Err(format!("unsupported verb {other:?}")),
            };
            match r {
                Ok(v) => results.push(json!({ "KV": v })),
                Err(what) => {
                    let body =
                        json!({ "Results": null, "Errors": [{ "OpIndex": i, "What": what }] });
                    return (StatusCode::CONFLICT, Json(body)).into_response();
                }
            }
        }
        Json(json!({ "Results": results, "Errors": null })).into_response()
    })
}

async fn session_create(State(s): State<Standin>, Json(b): Json<Value>) -> Json<Value> {
    let ttl = b["TTL"]
        .as_str()
        .and_then(|t| t.trim_end_matches('s').parse().ok())
        .map_or(Duration::from_secs(86400), Duration::from_secs);
    let delete = b["Behavior"].as_str() == Some("delete");
    s.with(|st| {
        st.next_session += 1;
        let id = format!("00000000-0000-0000-0000-{:012}", st.next_session);
        st.sessions.insert(
            id.clone(),
            Session {
                ttl,
                expires: Instant::now() + ttl,
                delete,
            },
        );
        Json(json!({ "ID": id }))
    })
}

async fn session_renew(State(s): State<Standin>, Path(id): Path<String>) -> Response {
    s.with(|st| match st.sessions.get_mut(&id) {
        Some(sess) => {
            sess.expires = Instant::now() + sess.ttl;
            Json(json!([{ "ID": id, "TTL": format!("{}s", sess.ttl.as_secs()) }])).into_response()
        }
        None => (
            StatusCode::NOT_FOUND,
            format!("Session id '{id}' not found"),
        )
            .into_response(),
    })
}

async fn session_destroy(State(s): State<Standin>, Path(id): Path<String>) -> Json<bool> {
    s.with(|st| invalidate(st, &id));
    Json(true)
}

/// Start the stand-in on a free loopback port; returns `HOST:PORT`.
pub(crate) async fn start_standin() -> String {
    let app = standin_app(None);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr.to_string()
}

/// The stand-in's routes, for callers that serve it themselves (over TLS, say). With
/// `token`, every request must carry it in `X-Consul-Token` (or `Authorization: Bearer`).
#[allow(dead_code)]
pub(crate) fn standin_app(token: Option<String>) -> Router {
    let (tx, _) = tokio::sync::watch::channel(0);
    let s = Standin {
        st: Arc::default(),
        changed: Arc::new(tx),
    };
    // Expire sessions even when nobody calls in, like Consul's TTL timers.
    let reaper = s.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            reaper.with(|_| ());
        }
    });
    let app = Router::new()
        .route("/v1/kv/{*key}", get(kv_get).put(kv_put).delete(kv_delete))
        .route("/v1/txn", put(txn))
        .route("/v1/session/create", put(session_create))
        .route("/v1/session/renew/{id}", put(session_renew))
        .route("/v1/session/destroy/{id}", put(session_destroy))
        .with_state(s);
    let Some(token) = token else {
        return app;
    };
    app.layer(axum::middleware::from_fn(
        move |req: axum::extract::Request, next: axum::middleware::Next| {
            let token = token.clone();
            async move {
                let h = req.headers();
                let given = h
                    .get("x-consul-token")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned)
                    .or_else(|| {
                        h.get("authorization")
                            .and_then(|v| v.to_str().ok())
                            .and_then(|v| v.strip_prefix("Bearer "))
                            .map(str::to_owned)
                    });
                if given.as_deref() == Some(token.as_str()) {
                    next.run(req).await
                } else {
                    (StatusCode::FORBIDDEN, "Permission denied").into_response()
                }
            }
        },
    ))
}
