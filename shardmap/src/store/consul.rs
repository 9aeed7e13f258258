//! Consul KV backend (`consul://HOST:PORT`): a thin client over Consul's HTTP API.
//!
//! Why not a client crate: `consulrs` saw a single release in 2021, is unmaintained and pulls
//! in OpenSSL; `rs-consul` would add a second HTTP stack next to the `reqwest` the rest of the
//! workspace already uses. The handful of endpoints we need is easier to own:
//!
//! - reads: `GET /v1/kv/<key>` (`?recurse` for prefixes), values base64, version = `ModifyIndex`;
//! - writes: `PUT /v1/txn` with verbs `set`, `cas` (`Index` 0 = create only) and `lock`, because
//!   a txn answers with the new `ModifyIndex` while a plain `PUT /v1/kv` answers only `true`;
//! - delete: `DELETE /v1/kv/<key>`;
//! - watch: blocking queries `?recurse&index=N&wait=…`, diffing successive snapshots;
//! - leases: sessions (`/v1/session/create` with `Behavior=delete` and `LockDelay=0s`,
//!   `renew`, `destroy`); locks: `PUT /v1/kv/<key>?acquire=<session>` / `?release=`.
//!
//! Consul clamps session TTLs to at least 10 s, so leases shorter than that are rounded up.
//! A watch resumed with `from` replays puts newer than `from` but cannot replay deletes that
//! happened while it was away (Consul keeps no queryable history); callers resync with `list`.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use bytes::Bytes;
use reqwest::{Method, RequestBuilder, Response};
use serde::Deserialize;
use serde_json::json;

use super::{Conflict, Entry, Lease, MetaStore, StoreError, Version, WatchEvent, WatchStream};

/// Minimum TTL Consul accepts for a session.
pub const MIN_SESSION_TTL: Duration = Duration::from_secs(10);
/// How long one blocking query waits for a change.
const BLOCK: Duration = Duration::from_secs(5);

/// The Consul backend. Cheap to clone.
#[derive(Clone, Debug)]
pub struct ConsulStore {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct KvPair {
    key: String,
    value: Option<String>,
    modify_index: u64,
}

impl ConsulStore {
    /// `addr` is `HOST:PORT`; `token` is sent as `X-Consul-Token`.
    pub fn new(addr: &str, token: Option<String>) -> Result<Self, StoreError> {
        Self::with_tls(addr, token, None)
    }

    /// As [`ConsulStore::new`], over HTTPS when `tls` is given (trusting its CA file too).
    pub(crate) fn with_tls(
        addr: &str,
        token: Option<String>,
        tls: Option<&super::url::Tls>,
    ) -> Result<Self, StoreError> {
        if addr.is_empty() || addr.contains('/') {
            return Err(StoreError::BadUrl(format!("consul://{addr}")));
        }
        let ca = tls.and_then(|t| t.ca.as_deref());
        let http = super::http_client(addr, Duration::from_secs(2), ca)?;
        let scheme = if tls.is_some() { "https" } else { "http" };
        Ok(ConsulStore {
            http,
            base: format!("{scheme}://{addr}"),
            token,
        })
    }

    fn req(&self, method: Method, path: &str) -> RequestBuilder {
        let mut r = self
            .http
            .request(method, format!("{}{path}", self.base))
            .timeout(Duration::from_secs(10));
        if let Some(t) = &self.token {
            r = r.header("X-Consul-Token", t);
        }
        r
    }

    async fn send(&self, r: RequestBuilder) -> Result<Response, StoreError> {
        r.send().await.map_err(|e| StoreError::Unreachable {
            endpoint: self.base.clone(),
            source: e,
        })
    }

    async fn body<T: serde::de::DeserializeOwned>(&self, resp: Response) -> Result<T, StoreError> {
        let status = resp.status();
        let text = resp.text().await.map_err(|e| StoreError::Unreachable {
            endpoint: self.base.clone(),
            source: e,
        })?;
        if !status.is_success() {
            return Err(self.status(status.as_u16(), text));
        }
        serde_json::from_str(&text)
            .map_err(|e| StoreError::Protocol(format!("consul: {e}: {text:.200}")))
    }

    fn status(&self, status: u16, body: String) -> StoreError {
        StoreError::Status {
            endpoint: self.base.clone(),
            status,
            body: body.chars().take(300).collect(),
        }
    }

    /// GET a key or (with `recurse`) a prefix; returns the pairs and `X-Consul-Index`.
    async fn read(
        &self,
        key: &str,
        recurse: bool,
        block: Option<(u64, Duration)>,
    ) -> Result<(Vec<KvPair>, u64), StoreError> {
        let mut q: Vec<(&str, String)> = Vec::new();
        if recurse {
            q.push(("recurse", "true".into()));
        }
        let mut r = self.req(Method::GET, &format!("/v1/kv/{key}"));
        if let Some((index, wait)) = block {
            q.push(("index", index.to_string()));
            q.push(("wait", format!("{}s", wait.as_secs().max(1))));
            r = r.timeout(wait + Duration::from_secs(5));
        }
        let resp = self.send(r.query(&q)).await?;
        let index = resp
            .headers()
            .get("X-Consul-Index")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        if resp.status() == reqwest::StatusCode::NOT_FOUND {
            return Ok((Vec::new(), index));
        }
        Ok((self.body(resp).await?, index))
    }

    /// Run a one-operation txn; `Ok(None)` when Consul rejected it (a CAS or lock conflict).
    async fn txn(&self, op: serde_json::Value) -> Result<Option<u64>, StoreError> {
        #[derive(Deserialize)]
        #[serde(rename_all = "PascalCase")]
        struct TxnResult {
            #[serde(rename = "KV")]
            kv: KvPair,
        }
        #[derive(Deserialize)]
        #[serde(rename_all = "PascalCase")]
        struct TxnResponse {
            results: Option<Vec<TxnResult>>,
        }
        let resp = self
            .send(
                self.req(Method::PUT, "/v1/txn")
                    .json(&json!([{ "KV": op }])),
            )
            .await?;
        if resp.status() == reqwest::StatusCode::CONFLICT {
            return Ok(None);
        }
        let body: TxnResponse = self.body(resp).await?;
        body.results
            .and_then(|r| r.into_iter().next())
            .map(|r| Some(r.kv.modify_index))
            .ok_or_else(|| StoreError::Protocol("consul txn returned no result".into()))
    }

    async fn bool_put(&self, path: &str, body: String) -> Result<bool, StoreError> {
        let resp = self.send(self.req(Method::PUT, path).body(body)).await?;
        self.body(resp).await
    }
}

fn value_of(p: &KvPair) -> Result<Bytes, StoreError> {
    match &p.value {
        None => Ok(Bytes::new()),
        Some(v) => B64
            .decode(v)
            .map(Bytes::from)
            .map_err(|e| StoreError::Protocol(format!("consul value of {}: {e}", p.key))),
    }
}

#[async_trait::async_trait]
impl MetaStore for ConsulStore {
    async fn get(&self, key: &str) -> Result<Option<(Bytes, Version)>, StoreError> {
        let (pairs, _) = self.read(key, false, None).await?;
        match pairs.into_iter().find(|p| p.key == key) {
            None => Ok(None),
            Some(p) => Ok(Some((value_of(&p)?, p.modify_index))),
        }
    }

    async fn put(&self, key: &str, value: Bytes) -> Result<Version, StoreError> {
        self.txn(json!({"Verb": "set", "Key": key, "Value": B64.encode(&value)}))
            .await?
            .ok_or_else(|| StoreError::Protocol(format!("consul refused to set {key}")))
    }

    async fn cas(
        &self,
        key: &str,
        expected: Option<Version>,
        value: Bytes,
    ) -> Result<Result<Version, Conflict>, StoreError> {
        let op = json!({
            "Verb": "cas", "Key": key, "Value": B64.encode(&value), "Index": expected.unwrap_or(0)
        });
        match self.txn(op).await? {
            Some(v) => Ok(Ok(v)),
            None => {
                let current = self.get(key).await?.map(|(_, v)| v);
                Ok(Err(Conflict { current }))
            }
        }
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        let resp = self
            .send(self.req(Method::DELETE, &format!("/v1/kv/{key}")))
            .await?;
        let _: bool = self.body(resp).await?;
        Ok(())
    }

    async fn list(&self, prefix: &str) -> Result<Vec<Entry>, StoreError> {
        let (pairs, _) = self.read(prefix, true, None).await?;
        let mut out = pairs
            .iter()
            .filter(|p| p.key.starts_with(prefix))
            .map(|p| {
                Ok(Entry {
                    key: p.key.clone(),
                    value: value_of(p)?,
                    version: p.modify_index,
                })
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    async fn watch(&self, prefix: &str, from: Option<Version>) -> Result<WatchStream, StoreError> {
        let (pairs, index) = self.read(prefix, true, None).await?;
        let mut snapshot: BTreeMap<String, (u64, Bytes)> = BTreeMap::new();
        let mut queue = VecDeque::new();
        for p in pairs.iter().filter(|p| p.key.starts_with(prefix)) {
            let value = value_of(p)?;
            if from.is_some_and(|f| p.modify_index > f) {
                queue.push_back(WatchEvent::Put {
                    key: p.key.clone(),
                    value: value.clone(),
                    version: p.modify_index,
                });
            }
            snapshot.insert(p.key.clone(), (p.modify_index, value));
        }
        let init = (
            self.clone(),
            prefix.to_owned(),
            index,
            snapshot,
            queue,
            false,
        );
        let stream = futures::stream::unfold(
            init,
            |(store, prefix, mut index, mut snapshot, mut queue, done)| async move {
                if done {
                    return None;
                }
                loop {
                    if let Some(ev) = queue.pop_front() {
                        return Some((Ok(ev), (store, prefix, index, snapshot, queue, false)));
                    }
                    let (pairs, new_index) = match store
                        .read(&prefix, true, Some((index, BLOCK)))
                        .await
                    {
                        Ok(r) => r,
                        Err(e) => {
                            return Some((Err(e), (store, prefix, index, snapshot, queue, true)))
                        }
                    };
                    let mut next = BTreeMap::new();
                    for p in pairs.iter().filter(|p| p.key.starts_with(&prefix)) {
                        let value = match value_of(p) {
                            Ok(v) => v,
                            Err(e) => {
                                return Some((
                                    Err(e),
                                    (store, prefix, index, snapshot, queue, true),
                                ))
                            }
                        };
                        if snapshot.get(&p.key).map(|(v, _)| *v) != Some(p.modify_index) {
                            queue.push_back(WatchEvent::Put {
                                key: p.key.clone(),
                                value: value.clone(),
                                version: p.modify_index,
                            });
                        }
                        next.insert(p.key.clone(), (p.modify_index, value));
                    }
                    for k in snapshot.keys().filter(|k| !next.contains_key(*k)) {
                        queue.push_back(WatchEvent::Delete {
                            key: k.clone(),
                            version: new_index,
                        });
                    }
                    let mut events: Vec<WatchEvent> = queue.drain(..).collect();
                    events.sort_by_key(WatchEvent::version);
                    queue.extend(events);
                    snapshot = next;
                    // An index that goes backwards means Consul state was reset: start over.
                    index = if new_index < index { 0 } else { new_index };
                }
            },
        );
        Ok(Box::pin(stream))
    }

    async fn lease(&self, ttl: Duration) -> Result<Lease, StoreError> {
        #[derive(Deserialize)]
        struct Created {
            #[serde(rename = "ID")]
            id: String,
        }
        let ttl = ttl.max(MIN_SESSION_TTL);
        let body = json!({
            "Name": "flotilla", "TTL": format!("{}s", ttl.as_secs()),
            "Behavior": "delete", "LockDelay": "0s"
        });
        let resp = self
            .send(self.req(Method::PUT, "/v1/session/create").json(&body))
            .await?;
        let created: Created = self.body(resp).await?;
        Ok(Lease {
            id: created.id,
            ttl,
        })
    }

    async fn keepalive(&self, lease: &Lease) -> Result<(), StoreError> {
        let resp = self
            .send(self.req(Method::PUT, &format!("/v1/session/renew/{}", lease.id)))
            .await?;
        if resp.status() == reqwest::StatusCode::NOT_FOUND {
            return Err(StoreError::LeaseExpired(lease.id.clone()));
        }
        let _: serde_json::Value = self.body(resp).await?;
        Ok(())
    }

    async fn revoke(&self, lease: &Lease) -> Result<(), StoreError> {
        let _ = self
            .bool_put(&format!("/v1/session/destroy/{}", lease.id), String::new())
            .await?;
        Ok(())
    }

    async fn put_with_lease(
        &self,
        key: &str,
        value: Bytes,
        lease: &Lease,
    ) -> Result<Version, StoreError> {
        let op = json!({
            "Verb": "lock", "Key": key, "Value": B64.encode(&value), "Session": lease.id
        });
        self.txn(op).await?.ok_or_else(|| {
            StoreError::Protocol(format!(
                "consul refused to bind {key} to session {} (held by another session, or the session is gone)",
                lease.id
            ))
        })
    }

    async fn try_lock(&self, key: &str, lease: &Lease) -> Result<bool, StoreError> {
        let path = format!("/v1/kv/{key}?acquire={}", lease.id);
        match self.bool_put(&path, lease.id.clone()).await {
            Err(StoreError::Status {
                status: 500, body, ..
            }) if body.contains("invalid session") => {
                Err(StoreError::LeaseExpired(lease.id.clone()))
            }
            other => other,
        }
    }

    async fn unlock(&self, key: &str, lease: &Lease) -> Result<(), StoreError> {
        let path = format!("/v1/kv/{key}?release={}", lease.id);
        let _ = self.bool_put(&path, lease.id.clone()).await?;
        Ok(())
    }
}
