//! The router's view of the cluster: node and shard snapshots from the metadata store,
//! swapped whole (readers never lock across an await), plus placement of new keys and
//! passive ejection of nodes that fail requests.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use flotilla_core::{NodeId, ShardKey};
use shardmap::{
    Keyspace, Loads, NodeInfo, NodeRecord, NodeState, Record, ShardMap, ShardRecord, WatchEvent,
};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::manifest_cache::ManifestCache;
use crate::{RouterConfig, RouterError};

type Snapshot<K, V> = Arc<HashMap<K, V>>;

/// Full refresh period while the watch is healthy: only a guard against a missed event.
const WATCHED_REFRESH: std::time::Duration = std::time::Duration::from_secs(30);
/// A manifest or tag write waits at most this long for its commit (store reads, CAS and any
/// late replica writes); past it the client gets 503 and retries.
const COMMIT_DEADLINE: std::time::Duration = std::time::Duration::from_secs(3);
/// How long a key found unplaced is answered as such without asking the store again, while
/// the watch is down (a wrong answer only sends a read to any node, which is still right).
const ABSENT_TTL: std::time::Duration = std::time::Duration::from_secs(2);
/// Entries the negative cache holds at most (then it is emptied: bounded memory under a
/// scan of random names).
const ABSENT_MAX: usize = 100_000;
/// Lost compare-and-swap races a commit tolerates before it gives up (503).
const COMMIT_ATTEMPTS: usize = 16;
/// Reads of the metadata store on a request path (an unknown key's record, a placement)
/// give up after this and answer 503.
const LOOKUP_DEADLINE: std::time::Duration = std::time::Duration::from_secs(2);
/// The manifest cache is trusted only while the router heard from the metadata store this
/// recently (node heartbeats arrive as watch events every few seconds): a router that
/// cannot see epoch bumps must not answer from what they would have invalidated.
pub const CACHE_TRUST: std::time::Duration = std::time::Duration::from_secs(5);

#[derive(Debug)]
struct Inner {
    cfg: RouterConfig,
    map: ShardMap,
    http: reqwest::Client,
    /// The node-internal API over the same pool (liveness probes).
    internal: registry_client::internal::NodeClient,
    nodes: RwLock<Snapshot<NodeId, NodeRecord>>,
    /// Updated in place, one entry per watch event (O(change), not a copy of every key);
    /// readers take the lock only to clone the one record they need.
    shards: RwLock<HashMap<ShardKey, ShardRecord>>,
    ejected: Mutex<HashMap<NodeId, Instant>>,
    rr: AtomicUsize,
    store_ok: AtomicBool,
    /// Whether the metadata-store watch is established (events reach the snapshots).
    watch_ok: AtomicBool,
    /// When the router last heard from the metadata store (ms since the Unix epoch): a watch
    /// event, a refresh or an epoch bump. Zero after a failed bump.
    contact_ms: std::sync::atomic::AtomicU64,
    manifests: ManifestCache,
    /// Records the last refresh could not read (corrupt or from a newer version): skipped,
    /// never rewritten, shown by the admin API.
    unreadable: Mutex<Vec<shardmap::Unreadable>>,
    /// Keys recently looked up and found unplaced (used only while the watch is down).
    absent: Mutex<HashMap<ShardKey, Instant>>,
    /// One commit at a time per key in this router: concurrent tag writes to one repository
    /// would otherwise race each other's compare-and-swap on the same record until they ran
    /// out of attempts (8 concurrent PUTs to one repository got 503s); in line they each
    /// take one read and one CAS, and only other routers' commits can still conflict.
    commit_locks: Mutex<HashMap<ShardKey, std::sync::Weak<tokio::sync::Mutex<()>>>>,
    /// Authentication and the access policy (`None`: the registry is open).
    auth: Option<Arc<flotilla_auth::Auth>>,
    events: Option<Arc<flotilla_events::Outbox>>,
    source: flotilla_events::Source,
    cancel: CancellationToken,
    tasks: TaskTracker,
}

/// What [`Cluster::shard`] does about a key that has no record yet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unplaced {
    /// Place it now (a first push creates the key).
    Place,
    /// Answer `None`: a read of an unknown key must not create it.
    Absent,
    /// As `Absent`, but asking the store even when the snapshot is trusted: a delete must
    /// not act on a key placed elsewhere a moment ago as if it were unplaced.
    Check,
}

/// How [`Cluster::candidates`] orders the live replicas.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplicaOrder {
    /// Rotated on every call, so reads share the load over every copy.
    Spread,
    /// As the record lists them: writes go to the primary first.
    PrimaryFirst,
}

/// Cheap `Clone` handle shared by every request.
#[derive(Clone, Debug)]
pub struct Cluster {
    inner: Arc<Inner>,
}

fn read<T: Clone>(l: &RwLock<T>) -> T {
    l.read().unwrap_or_else(|p| p.into_inner()).clone()
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Cluster {
    pub async fn open(mut cfg: RouterConfig) -> Result<Cluster, RouterError> {
        let store = shardmap::open(&cfg.meta_url)?;
        // The key depth is the shard map's: a router that guessed would route a repository
        // to another key than the seeder and the other routers. Waited for (bounded per
        // attempt) rather than assumed.
        let probe = ShardMap::new(store.clone(), Keyspace::new(shardmap::DEFAULT_PREFIX));
        cfg.shard_key_depth = loop {
            match tokio::time::timeout(LOOKUP_DEADLINE, probe.key_depth(cfg.shard_key_depth)).await
            {
                Ok(Ok(d)) => break d,
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "cannot read the shard key depth yet; retrying")
                }
                Err(_) => tracing::warn!(
                    "metadata store did not answer for the shard key depth; retrying"
                ),
            }
            tokio::time::sleep(cfg.refresh_interval).await;
        };
        let auth = if cfg.auth.enabled() {
            Some(Arc::new(flotilla_auth::Auth::load(cfg.auth.clone())?))
        } else {
            None
        };
        let events = match &cfg.events {
            Some(e) if !e.sinks.is_empty() => {
                Some(Arc::new(flotilla_events::Outbox::open(e.clone())?))
            }
            _ => None,
        };
        let source = flotilla_events::Source {
            addr: std::env::var("HOSTNAME")
                .ok()
                .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
                .map(|h| h.trim().to_string())
                .unwrap_or_default(),
            instance_id: uuid::Uuid::new_v4().to_string(),
        };
        // Every request to a node carries the cluster secret: nodes take `/v2` writes (and
        // unsigned reads) only from routers.
        let mut node_headers = http::HeaderMap::new();
        if let Some(secret) = &cfg.secret {
            let mut v = http::HeaderValue::from_str(secret)
                .map_err(|_| RouterError::Config("--secret must be printable ASCII".into()))?;
            v.set_sensitive(true);
            node_headers.insert(registry_client::internal::SECRET_HEADER, v);
        }
        let http = reqwest::Client::builder()
            .default_headers(node_headers)
            .pool_max_idle_per_host(256)
            // Below the nodes' idle timeout (60 s by default): the router, not the node,
            // should be the one to drop a quiet pooled connection, so no request is sent on
            // a connection the node is closing.
            .pool_idle_timeout(std::time::Duration::from_secs(30))
            .connect_timeout(std::time::Duration::from_secs(2))
            .redirect(reqwest::redirect::Policy::none());
        let http = registry_client::tls::trust(http, cfg.tls_ca.as_deref())?.build()?;
        let manifests = ManifestCache::new(cfg.manifest_cache_bytes, cfg.manifest_cache_ttl);
        let internal =
            registry_client::internal::NodeClient::with_http(http.clone(), cfg.secret.clone());
        let c = Cluster {
            inner: Arc::new(Inner {
                map: ShardMap::new(store, Keyspace::new(shardmap::DEFAULT_PREFIX)),
                cfg,
                http,
                internal,
                nodes: RwLock::default(),
                shards: RwLock::default(),
                ejected: Mutex::default(),
                rr: AtomicUsize::new(0),
                store_ok: AtomicBool::new(false),
                watch_ok: AtomicBool::new(false),
                contact_ms: std::sync::atomic::AtomicU64::new(0),
                manifests,
                unreadable: Mutex::default(),
                absent: Mutex::default(),
                commit_locks: Mutex::default(),
                auth,
                events,
                source,
                cancel: CancellationToken::new(),
                tasks: TaskTracker::new(),
            }),
        };
        if let Err(e) = c.refresh().await {
            tracing::warn!(error = %e, "metadata store not reachable at start; will retry");
        }
        Ok(c)
    }

    pub fn config(&self) -> &RouterConfig {
        &self.inner.cfg
    }

    /// The authentication state, when auth is on.
    pub fn auth(&self) -> Option<&Arc<flotilla_auth::Auth>> {
        self.inner.auth.as_ref()
    }

    /// The events outbox, when sinks are configured.
    pub fn events(&self) -> Option<&Arc<flotilla_events::Outbox>> {
        self.inner.events.as_ref()
    }

    /// This router, as events name their source.
    pub fn source(&self) -> &flotilla_events::Source {
        &self.inner.source
    }

    pub fn http(&self) -> &reqwest::Client {
        &self.inner.http
    }

    pub fn map(&self) -> &ShardMap {
        &self.inner.map
    }

    pub fn manifests(&self) -> &ManifestCache {
        &self.inner.manifests
    }

    pub fn tasks(&self) -> &TaskTracker {
        &self.inner.tasks
    }

    /// Whether the last refresh reached the metadata store.
    pub fn store_ok(&self) -> bool {
        self.inner.store_ok.load(Ordering::Relaxed)
    }

    /// Reload nodes and shards. On failure the old snapshot stays in use.
    pub async fn refresh(&self) -> Result<(), RouterError> {
        let result = async {
            let (nodes, bad_nodes) = self.inner.map.list_nodes_checked().await?;
            let (shards, bad_shards) = self.inner.map.list_shards_checked().await?;
            Ok::<_, RouterError>((nodes, shards, bad_nodes, bad_shards))
        }
        .await;
        match result {
            Ok((nodes, shards, mut bad, bad_shards)) => {
                bad.extend(bad_shards);
                *self
                    .inner
                    .unreadable
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()) = bad;
                let nodes: HashMap<_, _> =
                    nodes.into_iter().map(|(n, _)| (n.id.clone(), n)).collect();
                // Never step a record back to an older epoch: a slow refresh can land after a
                // newer record was cached, and the manifest cache relies on epochs only
                // moving forward.
                // The merge happens under the write lock, so a record cached concurrently (a
                // commit's) is never replaced by this listing's older copy.
                let mut guard = self.inner.shards.write().unwrap_or_else(|p| p.into_inner());
                let shards: HashMap<_, _> = shards
                    .into_iter()
                    .map(|(s, _)| match guard.get(&s.key) {
                        Some(c) if c.epoch > s.epoch => (s.key.clone(), c.clone()),
                        _ => (s.key.clone(), s),
                    })
                    .collect();
                metrics::gauge!("flotilla_router_nodes").set(nodes.len() as f64);
                metrics::gauge!("flotilla_router_shards").set(shards.len() as f64);
                *guard = shards;
                drop(guard);
                *self.inner.nodes.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(nodes);
                self.inner.store_ok.store(true, Ordering::Relaxed);
                self.heard_from_store();
                Ok(())
            }
            Err(e) => {
                self.inner.store_ok.store(false, Ordering::Relaxed);
                Err(e)
            }
        }
    }

    /// Periodic refresh until cancelled. Returns the token that stops it.
    pub fn start_background(&self) -> CancellationToken {
        let cancel = self.inner.cancel.child_token();
        let (me, c) = (self.clone(), cancel.clone());
        self.inner.tasks.spawn(async move {
            let mut tick = tokio::time::interval(me.inner.cfg.probe_interval);
            loop {
                tokio::select! {
                    _ = c.cancelled() => break,
                    _ = tick.tick() => me.probe_all().await,
                }
            }
        });
        // A watch on the whole keyspace applies each change to the snapshots as it happens
        // (no listing: a heartbeat or a manifest write's epoch bump costs one decode); a full
        // refresh runs when the watch is (re)established, to cover what happened while it
        // was down, and whenever an event cannot be applied.
        let (me, c) = (self.clone(), cancel.clone());
        self.inner.tasks.spawn(async move {
            use futures::StreamExt;
            while !c.is_cancelled() {
                let prefix = me.inner.map.keys().prefix().to_owned();
                match me.inner.map.store().watch(&prefix, None).await {
                    Ok(mut events) => {
                        let _ = me.refresh().await;
                        me.inner.watch_ok.store(true, Ordering::Relaxed);
                        loop {
                            tokio::select! {
                                _ = c.cancelled() => return,
                                ev = events.next() => match ev {
                                    Some(Ok(ev)) => {
                                        me.heard_from_store();
                                        if !me.apply_event(&ev) {
                                            let _ = me.refresh().await;
                                        }
                                    }
                                    Some(Err(e)) => { tracing::debug!(error = %e, "shard map watch broke; re-watching"); break; }
                                    None => break,
                                }
                            }
                        }
                        me.inner.watch_ok.store(false, Ordering::Relaxed);
                    }
                    Err(e) => tracing::debug!(error = %e, "shard map watch unavailable"),
                }
                tokio::select! {
                    _ = c.cancelled() => return,
                    _ = tokio::time::sleep(me.inner.cfg.refresh_interval) => {}
                }
            }
        });
        // The fallback: a full refresh every few intervals while the watch is down, and a
        // slow one while it is up (a guard against a missed event, not the normal path).
        let me = self.clone();
        let c = cancel.clone();
        self.inner.tasks.spawn(async move {
            let mut tick = tokio::time::interval(me.inner.cfg.refresh_interval * 4);
            let mut last = Instant::now();
            loop {
                tokio::select! {
                    _ = c.cancelled() => break,
                    _ = tick.tick() => {
                        let healthy = me.inner.watch_ok.load(Ordering::Relaxed);
                        if healthy && last.elapsed() < WATCHED_REFRESH {
                            continue;
                        }
                        last = Instant::now();
                        if let Err(e) = me.refresh().await {
                            tracing::debug!(error = %e, "shard map refresh failed; serving from cache");
                        }
                    }
                }
            }
        });
        cancel
    }

    /// Records skipped by the last refresh because this build cannot read them.
    pub fn unreadable(&self) -> Vec<shardmap::Unreadable> {
        self.inner
            .unreadable
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn nodes(&self) -> Snapshot<NodeId, NodeRecord> {
        read(&self.inner.nodes)
    }

    /// Every cached shard record (a copy: for listings, not for the request path).
    pub fn shards(&self) -> Vec<ShardRecord> {
        self.with_shards(|m| m.values().cloned().collect())
    }

    /// The cached record of `key`.
    pub fn cached_shard(&self, key: &ShardKey) -> Option<ShardRecord> {
        self.with_shards(|m| m.get(key).cloned())
    }

    /// Run `f` over the cached records under the read lock (no await inside).
    pub fn with_shards<T>(&self, f: impl FnOnce(&HashMap<ShardKey, ShardRecord>) -> T) -> T {
        f(&self.inner.shards.read().unwrap_or_else(|p| p.into_inner()))
    }

    pub fn node(&self, id: &NodeId) -> Option<NodeRecord> {
        self.nodes().get(id).cloned()
    }

    /// Probe every registered node once (`GET /internal/v1/status`). Any HTTP answer means
    /// the process is up; a connection error or timeout ejects the node.
    pub async fn probe_all(&self) {
        let nodes = self.nodes();
        let probes = nodes.values().map(|n| async move {
            let status = self
                .inner
                .internal
                .probe(&n.url, std::time::Duration::from_secs(1))
                .await;
            (n.id.clone(), status)
        });
        for (id, result) in futures::future::join_all(probes).await {
            match result {
                Ok(status) if !status.is_server_error() => {
                    let lifted = self
                        .inner
                        .ejected
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&id)
                        .is_some();
                    if lifted {
                        tracing::info!(node = %id, "probe succeeded; node back in rotation");
                    }
                }
                _ => {
                    if !self.is_ejected(&id) {
                        metrics::counter!("flotilla_router_probe_failures_total", "node" => id.to_string()).increment(1);
                        self.eject(&id);
                    }
                }
            }
        }
    }

    /// Skip `id` for a while: it just failed a request (passive health checking).
    pub fn eject(&self, id: &NodeId) {
        tracing::warn!(node = %id, "ejecting node after a failed request");
        metrics::counter!("flotilla_router_ejections_total", "node" => id.to_string()).increment(1);
        self.inner
            .ejected
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.clone(), Instant::now() + self.inner.cfg.eject_for);
    }

    fn is_ejected(&self, id: &NodeId) -> bool {
        let mut e = self.inner.ejected.lock().unwrap_or_else(|p| p.into_inner());
        match e.get(id) {
            Some(until) if *until > Instant::now() => true,
            Some(_) => {
                e.remove(id);
                false
            }
            None => false,
        }
    }

    /// A node takes traffic when it is registered, ready and not ejected.
    pub fn is_live(&self, n: &NodeRecord) -> bool {
        n.state == NodeState::Ready && !self.is_ejected(&n.id)
    }

    /// Nodes to try for `rec`, best first. Live in-sync replicas come first (rotated for
    /// reads so both copies share the load), then the other in-sync ones as a last resort:
    /// the record decides which nodes may answer, liveness only the order. A lagging replica
    /// is never a candidate: its copy may be older than an acknowledged write.
    pub fn candidates(&self, rec: &ShardRecord, order: ReplicaOrder) -> Vec<NodeRecord> {
        let nodes = self.nodes();
        let (mut live, rest): (Vec<NodeRecord>, Vec<NodeRecord>) = rec
            .in_sync()
            .filter_map(|id| nodes.get(id).cloned())
            .partition(|n| self.is_live(n));
        if order == ReplicaOrder::Spread && live.len() > 1 {
            let k = self.inner.rr.fetch_add(1, Ordering::Relaxed) % live.len();
            live.rotate_left(k);
        }
        // Stable: within each class the order above stands. Nodes that reach object storage
        // first (only they can read a miss through); for the primary of a write, nodes that
        // take new data first as well.
        match order {
            ReplicaOrder::Spread => live.sort_by_key(|n| !n.store_ok),
            ReplicaOrder::PrimaryFirst => live.sort_by_key(|n| (!n.writable, !n.store_ok)),
        }
        live.extend(rest);
        live
    }

    /// Nodes that take a shard's synchronous writes without serving its reads: joining
    /// nodes, replicas catching up after a missed write, and replicas still being seeded
    /// (registered and not ejected).
    pub fn sync_only(&self, rec: &ShardRecord) -> Vec<NodeRecord> {
        let nodes = self.nodes();
        let joining = rec
            .joining
            .iter()
            .chain(rec.syncing.iter())
            .filter_map(|id| nodes.get(id))
            .filter(|n| {
                matches!(n.state, NodeState::Ready | NodeState::Seeding) && !self.is_ejected(&n.id)
            });
        let seeding = rec
            .replicas
            .iter()
            .filter_map(|id| nodes.get(id))
            .filter(|n| n.state == NodeState::Seeding && !self.is_ejected(&n.id));
        let mut out: Vec<NodeRecord> = Vec::new();
        for n in joining.chain(seeding) {
            if !out.iter().any(|o| o.id == n.id) {
                out.push(n.clone());
            }
        }
        out
    }

    /// Any live node (for requests not tied to a shard, such as the catalog).
    pub fn any_live(&self) -> Vec<NodeRecord> {
        let mut live: Vec<NodeRecord> = self
            .nodes()
            .values()
            .filter(|n| self.is_live(n))
            .cloned()
            .collect();
        live.sort_by(|a, b| a.id.cmp(&b.id));
        if live.len() > 1 {
            let k = self.inner.rr.fetch_add(1, Ordering::Relaxed) % live.len();
            live.rotate_left(k);
        }
        live
    }

    fn heard_from_store(&self) {
        self.inner.contact_ms.store(now_ms(), Ordering::Relaxed);
    }

    /// Whether cached manifests may be served: the watch is up and the store was heard from
    /// within [`CACHE_TRUST`], so an epoch bump made elsewhere would have reached us.
    pub fn cache_trusted(&self) -> bool {
        let last = self.inner.contact_ms.load(Ordering::Relaxed);
        self.inner.watch_ok.load(Ordering::Relaxed)
            && now_ms().saturating_sub(last) < CACHE_TRUST.as_millis() as u64
    }

    /// The shard record of `key`; with [`Unplaced::Place`], place a new key (first push).
    /// Concurrent routers agree through compare-and-swap: the loser adopts the winner's
    /// record. A key the snapshot lacks costs metadata-store calls, bounded by
    /// [`LOOKUP_DEADLINE`].
    pub async fn shard(
        &self,
        key: &ShardKey,
        unplaced: Unplaced,
    ) -> Result<Option<ShardRecord>, RouterError> {
        if let Some(r) = self.cached_shard(key) {
            return Ok(Some(r));
        }
        // A read of a key the snapshot lacks: while the watch is live the snapshot is the
        // store (a key placed elsewhere arrives within the watch's delay, and until then any
        // node answers such a read correctly from object storage), so a scan of random names
        // costs the store nothing; without the watch, a short negative cache bounds it.
        if unplaced == Unplaced::Absent {
            if self.cache_trusted() {
                metrics::counter!("flotilla_router_unknown_key_lookups_total", "from" => "snapshot")
                    .increment(1);
                return Ok(None);
            }
            if self.recently_absent(key) {
                metrics::counter!("flotilla_router_unknown_key_lookups_total", "from" => "negative_cache")
                    .increment(1);
                return Ok(None);
            }
            metrics::counter!("flotilla_router_unknown_key_lookups_total", "from" => "store")
                .increment(1);
        }
        match tokio::time::timeout(LOOKUP_DEADLINE, self.lookup_or_place(key, unplaced)).await {
            Ok(r) => r,
            Err(_) => Err(RouterError::Meta(shardmap::StoreError::Protocol(format!(
                "metadata store did not answer within {LOOKUP_DEADLINE:?}"
            )))),
        }
    }

    async fn lookup_or_place(
        &self,
        key: &ShardKey,
        unplaced: Unplaced,
    ) -> Result<Option<ShardRecord>, RouterError> {
        if let Some((r, _)) = self.inner.map.get_shard(key).await? {
            self.cache_shard(r.clone());
            return Ok(Some(r));
        }
        if unplaced != Unplaced::Place {
            self.note_absent(key);
            return Ok(None);
        }
        let nodes: Vec<NodeInfo> = self
            .nodes()
            .values()
            .filter(|n| !self.is_ejected(&n.id))
            .map(NodeInfo::from)
            .collect();
        let loads = self.with_shards(|m| Loads::from_shards(m.values()));
        let placement = shardmap::place(key, self.inner.cfg.replication_factor, &nodes, &loads)
            .map_err(|e| RouterError::Meta(shardmap::StoreError::Protocol(e.to_string())))?;
        let rec = ShardRecord {
            key: key.clone(),
            replicas: placement.replicas,
            joining: Vec::new(),
            lagging: Vec::new(),
            syncing: Vec::new(),
            epoch: 1,
            pinned: false,
            rack_relaxed: placement.rack_relaxed,
            created_ms: now_ms(),
        };
        let (won, _) = self.inner.map.create_shard(&rec).await?;
        tracing::info!(key = %key, replicas = ?won.replicas, "placed new shard key");
        metrics::counter!("flotilla_router_placements_total").increment(1);
        self.cache_shard(won.clone());
        Ok(Some(won))
    }

    fn recently_absent(&self, key: &ShardKey) -> bool {
        let absent = self.inner.absent.lock().unwrap_or_else(|p| p.into_inner());
        absent.get(key).is_some_and(|at| at.elapsed() < ABSENT_TTL)
    }

    fn note_absent(&self, key: &ShardKey) {
        let mut absent = self.inner.absent.lock().unwrap_or_else(|p| p.into_inner());
        if absent.len() >= ABSENT_MAX {
            absent.retain(|_, at| at.elapsed() < ABSENT_TTL);
            if absent.len() >= ABSENT_MAX {
                absent.clear();
            }
        }
        absent.insert(key.clone(), Instant::now());
    }

    /// Apply one watch event to the snapshots. False when it cannot be (a record that does
    /// not decode), so the caller refreshes instead; keys that do not affect routing (locks,
    /// seeder progress, moves) are ignored.
    fn apply_event(&self, ev: &WatchEvent) -> bool {
        let keys = self.inner.map.keys();
        let key = ev.key();
        if let Some(shard) = keys.shard_key_of(key) {
            match ev {
                WatchEvent::Put { value, .. } => match ShardRecord::decode(key, value) {
                    Ok(rec) => self.cache_shard(rec),
                    Err(_) => return false,
                },
                WatchEvent::Delete { .. } => {
                    self.inner
                        .shards
                        .write()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&shard);
                }
            }
            return true;
        }
        let Some(id) = key.strip_prefix(&keys.nodes()) else {
            return true;
        };
        let mut guard = self.inner.nodes.write().unwrap_or_else(|p| p.into_inner());
        let mut next = (**guard).clone();
        match ev {
            WatchEvent::Put { value, .. } => match NodeRecord::decode(key, value) {
                Ok(rec) => {
                    next.insert(rec.id.clone(), rec);
                }
                Err(_) => return false,
            },
            WatchEvent::Delete { .. } => match id.parse::<NodeId>() {
                Ok(id) => {
                    next.remove(&id);
                }
                Err(_) => return false,
            },
        }
        *guard = Arc::new(next);
        true
    }

    /// Adopt `rec` unless a newer epoch of it is already known.
    pub fn cache_shard(&self, rec: ShardRecord) {
        let mut guard = self.inner.shards.write().unwrap_or_else(|p| p.into_inner());
        if guard.get(&rec.key).is_some_and(|c| c.epoch > rec.epoch) {
            return;
        }
        guard.insert(rec.key.clone(), rec);
    }

    /// Commit a manifest or tag write that `acks` records: re-read the shard record (fresh,
    /// from the store), send the write to any in-sync or joining node this router's view
    /// missed (`send`), mark every in-sync replica that did not take it as lagging, and bump
    /// the epoch, all in one compare-and-swap. Only then may the client hear 2xx: a router
    /// reading the new record never reads a replica that lacks the write, and one reading an
    /// older record sees its cached manifests for the key invalidated by the bump. A lost
    /// race re-reads and repeats (another write, a move's swap or a replica's rejoin landed
    /// in between). Returns the committed epoch.
    fn commit_lock(&self, key: &ShardKey) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self
            .inner
            .commit_locks
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(l) = locks.get(key).and_then(std::sync::Weak::upgrade) {
            return l;
        }
        if locks.len() >= 1024 {
            locks.retain(|_, w| w.strong_count() > 0);
        }
        let l = Arc::new(tokio::sync::Mutex::new(()));
        locks.insert(key.clone(), Arc::downgrade(&l));
        l
    }

    pub async fn commit<F, Fut>(
        &self,
        key: &ShardKey,
        acks: &mut crate::proxy::Acks,
        send: F,
    ) -> Result<u64, CommitError>
    where
        F: Fn(NodeRecord) -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let lock = self.commit_lock(key);
        let work = async {
            let _turn = lock.lock().await;
            for _ in 0..COMMIT_ATTEMPTS {
                let Some((cur, version)) = self.inner.map.get_shard(key).await? else {
                    // The record is gone (an operator deleted it): nothing left to keep in
                    // sync, and the write is durable in object storage.
                    return Ok(0);
                };
                let nodes = self.nodes();
                let pending: Vec<NodeId> = cur
                    .in_sync()
                    .chain(cur.joining.iter())
                    .chain(cur.syncing.iter())
                    .filter(|n| !acks.acked.contains(*n) && !acks.missed.contains(*n))
                    .cloned()
                    .collect();
                for id in pending {
                    let took = match nodes.get(&id) {
                        Some(n) if self.is_live(n) => send(n.clone()).await,
                        _ => false,
                    };
                    if took {
                        acks.acked.insert(id);
                    } else {
                        acks.missed.insert(id);
                    }
                }
                if cur.in_sync().all(|r| acks.missed.contains(r)) {
                    return Err(CommitError::NoReplica);
                }
                let mut next = cur.clone();
                let newly: Vec<NodeId> = cur
                    .in_sync()
                    .filter(|r| acks.missed.contains(*r))
                    .cloned()
                    .collect();
                if !newly.is_empty() {
                    tracing::warn!(%key, lagging = ?newly, "replicas missed a write; marked lagging until they catch up");
                    metrics::counter!("flotilla_router_replicas_lagged_total")
                        .increment(newly.len() as u64);
                }
                next.lagging.extend(newly);
                // A replica catching up that missed this write starts its catch-up over.
                let demoted: Vec<NodeId> = cur
                    .syncing
                    .iter()
                    .filter(|r| acks.missed.contains(*r))
                    .cloned()
                    .collect();
                next.syncing.retain(|r| !demoted.contains(r));
                next.lagging.extend(demoted);
                next.epoch += 1;
                match self.inner.map.cas_shard(&next, Some(version)).await? {
                    Ok(_) => {
                        self.heard_from_store();
                        let epoch = next.epoch;
                        self.cache_shard(next);
                        return Ok(epoch);
                    }
                    Err(_) => continue,
                }
            }
            Err(CommitError::Contended)
        };
        let result = match tokio::time::timeout(COMMIT_DEADLINE, work).await {
            Ok(r) => r,
            Err(_) => Err(CommitError::Timeout),
        };
        if result.is_err() {
            // Other routers may not hear of this write: drop our own entries and stop
            // trusting the cache until the store is heard from again.
            self.inner.contact_ms.store(0, Ordering::Relaxed);
            metrics::counter!("flotilla_router_manifest_cache_clears_total").increment(1);
            self.inner.manifests.clear();
        }
        result
    }
}

/// Why a write could not be committed; the client gets 503 and retries (the write is
/// durable in object storage and on the replicas that took it, so a retry is cheap).
#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    #[error("metadata store: {0}")]
    Store(#[from] shardmap::StoreError),
    #[error("the metadata store did not answer within {COMMIT_DEADLINE:?}")]
    Timeout,
    #[error("no in-sync replica took the write")]
    NoReplica,
    #[error("the shard record kept changing ({COMMIT_ATTEMPTS} attempts)")]
    Contended,
}
