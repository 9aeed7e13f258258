//! etcd v3 backend (`etcd://HOST:PORT[,HOST:PORT...]`) over etcd's JSON gRPC gateway with
//! `reqwest`, so the workspace needs no protoc, tonic or second HTTP stack.
//!
//! Keys and values travel base64-encoded and 64-bit integers as JSON strings. Version =
//! `mod_revision`. CAS is a txn comparing `mod_revision` (or `create_revision == 0` for "must
//! not exist"); watch is the streaming `/v3/watch` (one JSON object per message) resumed from
//! `start_revision`; leases are `/v3/lease/{grant,keepalive,revoke}` and locks are a key bound
//! to the lease, created only if absent. Each request goes to the endpoint that last
//! answered; on a connection failure or an "unavailable" answer (no leader yet) it tries the
//! others, for up to [`RETRY_FOR`]. Retrying a CAS is safe: if the first attempt did apply,
//! the retry's comparison fails and the caller sees a conflict and re-reads.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use serde_json::{json, Value};

use super::{
    prefix_end, Conflict, Entry, Lease, MetaStore, StoreError, Version, WatchEvent, WatchStream,
};

/// How long a request keeps trying other endpoints (covers a leader election).
pub const RETRY_FOR: Duration = Duration::from_secs(15);

/// The etcd backend. Cheap to clone.
#[derive(Clone, Debug)]
pub struct EtcdStore {
    http: reqwest::Client,
    endpoints: Arc<Vec<String>>,
    current: Arc<AtomicUsize>,
}

/// Which keys a range request covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Span {
    /// Exactly the key.
    Key,
    /// Every key starting with it.
    Prefix,
}

fn b64(s: &str) -> String {
    B64.encode(s.as_bytes())
}

/// An int64 field: the gateway writes them as strings and omits zero values.
fn num(v: &Value) -> u64 {
    match v {
        Value::String(s) => s.parse().unwrap_or(0),
        Value::Number(n) => n.as_u64().unwrap_or(0),
        _ => 0,
    }
}

fn unb64(v: &Value) -> Result<Vec<u8>, StoreError> {
    match v.as_str() {
        None => Ok(Vec::new()),
        Some(s) => B64
            .decode(s)
            .map_err(|e| StoreError::Protocol(format!("etcd base64: {e}"))),
    }
}

fn kv_entry(kv: &Value) -> Result<Entry, StoreError> {
    let key = String::from_utf8(unb64(&kv["key"])?)
        .map_err(|e| StoreError::Protocol(format!("etcd key is not UTF-8: {e}")))?;
    Ok(Entry {
        key,
        value: Bytes::from(unb64(&kv["value"])?),
        version: num(&kv["mod_revision"]),
    })
}

impl EtcdStore {
    /// `addrs` is a comma-separated list of `HOST:PORT`.
    pub fn new(addrs: &str) -> Result<Self, StoreError> {
        Self::with_tls(addrs, None)
    }

    /// As [`EtcdStore::new`], over HTTPS when `tls` is given (trusting its CA file too).
    pub(crate) fn with_tls(addrs: &str, tls: Option<&super::url::Tls>) -> Result<Self, StoreError> {
        let scheme = if tls.is_some() { "https" } else { "http" };
        let endpoints: Vec<String> = addrs
            .split(',')
            .map(str::trim)
            .filter(|a| !a.is_empty())
            .map(|a| format!("{scheme}://{a}"))
            .collect();
        if endpoints.is_empty() || addrs.contains('/') {
            return Err(StoreError::BadUrl(format!("etcd://{addrs}")));
        }
        let ca = tls.and_then(|t| t.ca.as_deref());
        let http = super::http_client(addrs, Duration::from_secs(1), ca)?;
        Ok(EtcdStore {
            http,
            endpoints: Arc::new(endpoints),
            current: Arc::new(AtomicUsize::new(0)),
        })
    }

    /// POST `body` to `path`, failing over between endpoints. Returns the response so that
    /// streaming callers can read it incrementally.
    async fn post_raw(
        &self,
        path: &str,
        body: &Value,
        timeout: Option<Duration>,
    ) -> Result<reqwest::Response, StoreError> {
        let deadline = Instant::now() + RETRY_FOR;
        let n = self.endpoints.len();
        let mut attempt = 0usize;
        loop {
            let i = (self.current.load(Ordering::Relaxed) + attempt) % n;
            let endpoint = &self.endpoints[i];
            let mut req = self.http.post(format!("{endpoint}{path}")).json(body);
            if let Some(t) = timeout {
                req = req.timeout(t);
            }
            let err = match req.send().await {
                Ok(resp) if resp.status().is_success() => {
                    self.current.store(i, Ordering::Relaxed);
                    return Ok(resp);
                }
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    let text = resp.text().await.unwrap_or_default();
                    let e = StoreError::Status {
                        endpoint: endpoint.clone(),
                        status,
                        body: text.chars().take(300).collect(),
                    };
                    // gRPC Unavailable (14) / leader changes are worth retrying elsewhere.
                    let retry = status == 503
                        || text.contains("\"code\":14")
                        || text.contains("leader changed")
                        || text.contains("no leader");
                    if !retry {
                        return Err(e);
                    }
                    e
                }
                Err(e) => StoreError::Unreachable {
                    endpoint: endpoint.clone(),
                    source: e,
                },
            };
            attempt += 1;
            if Instant::now() >= deadline {
                return Err(err);
            }
            tracing::debug!(error = %err, "etcd endpoint failed, trying the next");
            // Pause after each full round; `is_multiple_of` is newer than the workspace MSRV.
            #[allow(clippy::manual_is_multiple_of)]
            if attempt % n == 0 {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }

    async fn post(&self, path: &str, body: Value) -> Result<Value, StoreError> {
        let resp = self
            .post_raw(path, &body, Some(Duration::from_secs(10)))
            .await?;
        let endpoint = resp.url().to_string();
        let bytes = resp.bytes().await.map_err(|e| StoreError::Unreachable {
            endpoint,
            source: e,
        })?;
        // Streaming endpoints (lease keepalive) wrap the message in {"result": ...}.
        let mut it = serde_json::Deserializer::from_slice(&bytes).into_iter::<Value>();
        match it.next() {
            Some(Ok(v)) => Ok(v.get("result").cloned().unwrap_or(v)),
            Some(Err(e)) => Err(StoreError::Protocol(format!("etcd: {e}"))),
            None => Err(StoreError::Protocol("etcd: empty response".into())),
        }
    }

    async fn range(&self, key: &str, span: Span) -> Result<Vec<Entry>, StoreError> {
        let mut body = json!({ "key": b64(key) });
        if span == Span::Prefix {
            body["range_end"] = B64.encode(prefix_end(key.as_bytes())).into();
        }
        let v = self.post("/v3/kv/range", body).await?;
        v["kvs"]
            .as_array()
            .map(|kvs| kvs.iter().map(kv_entry).collect())
            .unwrap_or(Ok(Vec::new()))
    }

    /// A txn that puts `key` if `compare` holds; on failure returns the key's current version.
    async fn put_if(
        &self,
        key: &str,
        compare: Value,
        value: &[u8],
        lease: Option<&str>,
    ) -> Result<Result<Version, Conflict>, StoreError> {
        let mut put = json!({ "key": b64(key), "value": B64.encode(value) });
        if let Some(l) = lease {
            put["lease"] = l.into();
        }
        let body = json!({
            "compare": [compare],
            "success": [{ "request_put": put }],
            "failure": [{ "request_range": { "key": b64(key) } }],
        });
        let v = self.post("/v3/kv/txn", body).await?;
        if v["succeeded"].as_bool().unwrap_or(false) {
            return Ok(Ok(num(&v["header"]["revision"])));
        }
        let current = v["responses"][0]["response_range"]["kvs"][0]
            .get("mod_revision")
            .map(num);
        Ok(Err(Conflict { current }))
    }
}

#[async_trait::async_trait]
impl MetaStore for EtcdStore {
    async fn get(&self, key: &str) -> Result<Option<(Bytes, Version)>, StoreError> {
        Ok(self
            .range(key, Span::Key)
            .await?
            .into_iter()
            .next()
            .map(|e| (e.value, e.version)))
    }

    async fn put(&self, key: &str, value: Bytes) -> Result<Version, StoreError> {
        let v = self
            .post(
                "/v3/kv/put",
                json!({ "key": b64(key), "value": B64.encode(&value) }),
            )
            .await?;
        Ok(num(&v["header"]["revision"]))
    }

    async fn cas(
        &self,
        key: &str,
        expected: Option<Version>,
        value: Bytes,
    ) -> Result<Result<Version, Conflict>, StoreError> {
        let compare = match expected {
            None => {
                json!({ "key": b64(key), "target": "CREATE", "result": "EQUAL", "create_revision": "0" })
            }
            Some(v) => {
                json!({ "key": b64(key), "target": "MOD", "result": "EQUAL", "mod_revision": v.to_string() })
            }
        };
        self.put_if(key, compare, &value, None).await
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.post("/v3/kv/deleterange", json!({ "key": b64(key) }))
            .await?;
        Ok(())
    }

    async fn list(&self, prefix: &str) -> Result<Vec<Entry>, StoreError> {
        let mut out = self.range(prefix, Span::Prefix).await?;
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    async fn watch(&self, prefix: &str, from: Option<Version>) -> Result<WatchStream, StoreError> {
        let start = match from {
            Some(v) => v + 1,
            None => {
                // Pin the start now so events between this call and the stream opening count.
                let v = self
                    .post("/v3/kv/range", json!({ "key": b64(prefix), "limit": "1" }))
                    .await?;
                num(&v["header"]["revision"]) + 1
            }
        };
        struct W {
            store: EtcdStore,
            prefix: String,
            next: u64,
            body: Option<futures::stream::BoxStream<'static, reqwest::Result<Bytes>>>,
            buf: BytesMut,
            queue: VecDeque<WatchEvent>,
            done: bool,
        }
        let init = W {
            store: self.clone(),
            prefix: prefix.to_owned(),
            next: start,
            body: None,
            buf: BytesMut::new(),
            queue: VecDeque::new(),
            done: false,
        };
        let stream = futures::stream::unfold(init, |mut w| async move {
            if w.done {
                return None;
            }
            loop {
                if let Some(ev) = w.queue.pop_front() {
                    w.next = ev.version() + 1;
                    return Some((Ok(ev), w));
                }
                let Some(body) = w.body.as_mut() else {
                    let req = json!({ "create_request": {
                        "key": b64(&w.prefix),
                        "range_end": B64.encode(prefix_end(w.prefix.as_bytes())),
                        "start_revision": w.next.to_string(),
                    }});
                    match w.store.post_raw("/v3/watch", &req, None).await {
                        Ok(resp) => {
                            w.body = Some(resp.bytes_stream().boxed());
                            w.buf.clear();
                        }
                        Err(e) => {
                            w.done = true;
                            return Some((Err(e), w));
                        }
                    }
                    continue;
                };
                match body.next().await {
                    Some(Ok(chunk)) => w.buf.extend_from_slice(&chunk),
                    Some(Err(e)) => {
                        // The member went away: reconnect (to another) from where we are.
                        tracing::debug!(error = %e, "etcd watch stream broke, reconnecting");
                        w.body = None;
                        continue;
                    }
                    None => {
                        w.body = None;
                        continue;
                    }
                }
                // Decode every complete JSON message in the buffer.
                let mut consumed = 0;
                let mut it = serde_json::Deserializer::from_slice(&w.buf).into_iter::<Value>();
                let mut failure = None;
                while let Some(msg) = it.next() {
                    let Ok(msg) = msg else { break };
                    consumed = it.byte_offset();
                    let r = &msg["result"];
                    if r.is_null() {
                        failure = Some(StoreError::Protocol(format!("etcd watch: {msg}")));
                        break;
                    }
                    let compact = num(&r["compact_revision"]);
                    if compact > 0 {
                        failure = Some(StoreError::Compacted {
                            from: w.next.saturating_sub(1),
                            oldest: compact,
                        });
                        break;
                    }
                    for ev in r["events"].as_array().into_iter().flatten() {
                        let entry = match kv_entry(&ev["kv"]) {
                            Ok(e) => e,
                            Err(e) => {
                                failure = Some(e);
                                break;
                            }
                        };
                        w.queue.push_back(if ev["type"].as_str() == Some("DELETE") {
                            WatchEvent::Delete {
                                key: entry.key,
                                version: entry.version,
                            }
                        } else {
                            WatchEvent::Put {
                                key: entry.key,
                                value: entry.value,
                                version: entry.version,
                            }
                        });
                    }
                }
                let _ = w.buf.split_to(consumed);
                if let Some(e) = failure {
                    w.done = true;
                    return Some((Err(e), w));
                }
            }
        });
        Ok(Box::pin(stream))
    }

    async fn lease(&self, ttl: Duration) -> Result<Lease, StoreError> {
        let v = self
            .post(
                "/v3/lease/grant",
                json!({ "TTL": ttl.as_secs().max(1).to_string() }),
            )
            .await?;
        let id = v["ID"]
            .as_str()
            .map(str::to_owned)
            .or_else(|| v["ID"].as_i64().map(|i| i.to_string()))
            .ok_or_else(|| StoreError::Protocol(format!("etcd lease grant: {v}")))?;
        Ok(Lease { id, ttl })
    }

    async fn keepalive(&self, lease: &Lease) -> Result<(), StoreError> {
        let v = self
            .post("/v3/lease/keepalive", json!({ "ID": lease.id }))
            .await?;
        if num(&v["TTL"]) == 0 {
            return Err(StoreError::LeaseExpired(lease.id.clone()));
        }
        Ok(())
    }

    async fn revoke(&self, lease: &Lease) -> Result<(), StoreError> {
        match self
            .post("/v3/lease/revoke", json!({ "ID": lease.id }))
            .await
        {
            Err(StoreError::Status { body, .. }) if body.contains("not found") => Ok(()),
            other => other.map(|_| ()),
        }
    }

    async fn put_with_lease(
        &self,
        key: &str,
        value: Bytes,
        lease: &Lease,
    ) -> Result<Version, StoreError> {
        let body = json!({ "key": b64(key), "value": B64.encode(&value), "lease": lease.id });
        match self.post("/v3/kv/put", body).await {
            Ok(v) => Ok(num(&v["header"]["revision"])),
            Err(StoreError::Status { body, .. }) if body.contains("lease not found") => {
                Err(StoreError::LeaseExpired(lease.id.clone()))
            }
            Err(e) => Err(e),
        }
    }

    async fn try_lock(&self, key: &str, lease: &Lease) -> Result<bool, StoreError> {
        let compare = json!({ "key": b64(key), "target": "CREATE", "result": "EQUAL", "create_revision": "0" });
        match self
            .put_if(key, compare, lease.id.as_bytes(), Some(&lease.id))
            .await
        {
            Ok(Ok(_)) => Ok(true),
            Ok(Err(_)) => Ok(self
                .get(key)
                .await?
                .is_some_and(|(v, _)| v == lease.id.as_bytes())),
            Err(StoreError::Status { body, .. }) if body.contains("lease not found") => {
                Err(StoreError::LeaseExpired(lease.id.clone()))
            }
            Err(e) => Err(e),
        }
    }

    async fn unlock(&self, key: &str, lease: &Lease) -> Result<(), StoreError> {
        let body = json!({
            "compare": [{ "key": b64(key), "target": "VALUE", "result": "EQUAL", "value": b64(&lease.id) }],
            "success": [{ "request_delete_range": { "key": b64(key) } }],
            "failure": [],
        });
        self.post("/v3/kv/txn", body).await?;
        Ok(())
    }
}
