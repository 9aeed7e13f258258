//! The leader's work: one reconcile pass per tick decides what should be running, and each
//! piece of work (a node's reseed, a shard's move) runs as a tracked job that reads and
//! writes its progress record in the metadata store. A job is idempotent from any point, so
//! a new leader simply starts the same jobs again and they resume where the records say.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use flotilla_core::{NodeId, RepoName, ShardKey};
use flotilla_objstore::Remote;
use futures::StreamExt;
use shardmap::{
    plan_add_node, plan_remove_node, Loads, Move, MoveReason, MoveRecord, NodeInfo, NodeRecord,
    NodeState, Record, ReseedRecord, ReseedStatus, ShardMap, ShardRecord,
};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::nodes::{shard_repos, NodeClient};
use crate::{now_ms, sleep_or, SeederConfig, SeederError};

/// Final passes a move makes before it gives up for this round (writes kept landing in the
/// key during each pass); the move stays recorded and is driven again.
const SWAP_ATTEMPTS: usize = 8;

/// Progress records are rewritten at most this often (plus at every shard boundary).
const SAVE_EVERY: Duration = Duration::from_millis(500);

/// The leader's state for one term. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Ctx {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    cfg: SeederConfig,
    map: ShardMap,
    remote: Remote,
    client: NodeClient,
    term: CancellationToken,
    tasks: TaskTracker,
    active: Mutex<HashSet<String>>,
    last_rebalance: Mutex<Option<Instant>>,
}

impl Ctx {
    pub fn new(
        cfg: SeederConfig,
        map: ShardMap,
        remote: Remote,
        client: NodeClient,
        term: CancellationToken,
    ) -> Self {
        Ctx {
            inner: Arc::new(Inner {
                cfg,
                map,
                remote,
                client,
                term,
                tasks: TaskTracker::new(),
                active: Mutex::default(),
                last_rebalance: Mutex::default(),
            }),
        }
    }

    /// Stop every job of this term and wait for them.
    pub async fn stop(&self) {
        self.inner.term.cancel();
        self.inner.tasks.close();
        self.inner.tasks.wait().await;
    }

    fn active(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.inner.active.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Start `job` under `name` unless a job of that name is running.
    fn ensure_job<F>(&self, name: String, job: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        if !self.active().insert(name.clone()) {
            return;
        }
        let me = self.clone();
        self.inner.tasks.spawn(async move {
            job.await;
            me.active().remove(&name);
        });
    }

    /// One pass: start whatever work the map calls for and is not already running.
    pub async fn reconcile(&self) -> Result<(), SeederError> {
        let cfg = &self.inner.cfg;
        let map = &self.inner.map;
        let keys = map.keys().clone();
        let store = map.store().clone();
        let nodes: Vec<NodeRecord> = map
            .list_nodes()
            .await?
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        let shards: Vec<ShardRecord> = map
            .list_shards()
            .await?
            .into_iter()
            .map(|(s, _)| s)
            .collect();
        let by_id: HashMap<&NodeId, &NodeRecord> = nodes.iter().map(|n| (&n.id, n)).collect();

        // 1. Reseed nodes that came back with an empty or partial disk.
        let seeding: Vec<NodeId> = nodes
            .iter()
            .filter(|n| n.state == NodeState::Seeding)
            .map(|n| n.id.clone())
            .collect();
        for id in &seeding {
            let me = self.clone();
            let id2 = id.clone();
            self.ensure_job(
                format!("reseed:{id}"),
                async move { me.reseed_job(id2).await },
            );
        }
        metrics::gauge!("flotilla_seeder_nodes_seeding").set(seeding.len() as f64);

        // 2. Resume moves in flight; abort half-started ones that lost their record.
        let mut moving: HashSet<ShardKey> = HashSet::new();
        for e in store.list(&keys.moves()).await? {
            match MoveRecord::decode(&e.key, &e.value) {
                Ok(m) => {
                    moving.insert(m.key.clone());
                    let me = self.clone();
                    let name = format!("move:{}", m.key);
                    self.ensure_job(name, async move { me.move_job(m).await });
                }
                Err(err) => tracing::error!(key = %e.key, error = %err, "unreadable move record"),
            }
        }
        for s in shards.iter().filter(|s| !s.joining.is_empty()) {
            if !moving.contains(&s.key) && !self.active().contains(&format!("move:{}", s.key)) {
                tracing::warn!(key = %s.key, joining = ?s.joining, "joining replica without a move record; clearing it");
                self.update_shard(&s.key, |r| {
                    r.joining.clear();
                    true
                })
                .await?;
            }
        }
        metrics::gauge!("flotilla_seeder_moves_in_flight").set(moving.len() as f64);
        let mut budget = cfg.max_moves.saturating_sub(moving.len());
        let infos: Vec<NodeInfo> = nodes.iter().map(NodeInfo::from).collect();

        // 3. Replace nodes missing from `nodes/` longer than replace_after.
        let mut dead: Vec<NodeId> = shards
            .iter()
            .flat_map(|s| s.replicas.iter())
            .filter(|id| !by_id.contains_key(id))
            .cloned()
            .collect();
        dead.sort();
        dead.dedup();
        for e in store.list(&keys.seeder_absents()).await? {
            let id = e.key.rsplit('/').next().unwrap_or_default();
            if !dead.iter().any(|d| d.as_str() == id) {
                store.delete(&e.key).await?;
            }
        }
        let now = now_ms();
        let mut due: Vec<NodeId> = Vec::new();
        for d in &dead {
            let k = keys.seeder_absent(d);
            let since = match store.get(&k).await? {
                Some((b, _)) => String::from_utf8_lossy(&b).trim().parse().unwrap_or(now),
                None => {
                    tracing::warn!(node = %d, "node missing from the map; replacing it after {:?}", cfg.replace_after);
                    store.put(&k, Bytes::from(now.to_string())).await?;
                    now
                }
            };
            if now.saturating_sub(since) >= cfg.replace_after.as_millis() as u64 {
                due.push(d.clone());
            }
        }
        for d in &due {
            for m in plan_remove_node(d, &infos, &shards) {
                if budget == 0 {
                    break;
                }
                if !moving.contains(&m.key) && self.start_move(&m, MoveReason::Replace).await? {
                    moving.insert(m.key.clone());
                    budget -= 1;
                }
            }
        }

        // 4. Drain: move everything off nodes an operator drained.
        for n in nodes.iter().filter(|n| n.state == NodeState::Draining) {
            for m in plan_remove_node(&n.id, &infos, &shards) {
                if budget == 0 {
                    break;
                }
                if !moving.contains(&m.key) && self.start_move(&m, MoveReason::Drain).await? {
                    moving.insert(m.key.clone());
                    budget -= 1;
                }
            }
        }

        // 5. Rebalance onto nodes below their fair share, one move at a time, only in a calm
        // cluster (nothing moving, seeding, draining or dead).
        let calm = moving.is_empty()
            && seeding.is_empty()
            && dead.is_empty()
            && nodes.iter().all(|n| n.state == NodeState::Ready);
        let spaced = self
            .inner
            .last_rebalance
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_none_or(|t| t.elapsed() >= cfg.rebalance_interval);
        if calm && spaced && budget > 0 {
            let loads = Loads::from_shards(&shards);
            let mut order: Vec<&NodeInfo> = infos.iter().filter(|n| n.placeable()).collect();
            order.sort_by(|a, b| {
                loads
                    .node(&a.id)
                    .cmp(&loads.node(&b.id))
                    .then(a.id.cmp(&b.id))
            });
            for n in order {
                if let Some(m) = plan_add_node(&n.id, &infos, &shards).into_iter().next() {
                    if self.start_move(&m, MoveReason::Rebalance).await? {
                        *self
                            .inner
                            .last_rebalance
                            .lock()
                            .unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
                    }
                    break;
                }
            }
        }
        Ok(())
    }

    /// Record a move (create-only, so two leaders cannot both start it) and run it.
    async fn start_move(&self, m: &Move, reason: MoveReason) -> Result<bool, SeederError> {
        let now = now_ms();
        let rec = MoveRecord {
            key: m.key.clone(),
            from: m.from.clone(),
            to: m.to.clone(),
            reason,
            started_ms: now,
            updated_ms: now,
            joined_ms: None,
            repos_total: 0,
            repos_done: 0,
            objects_done: 0,
            bytes_done: 0,
            seeder: self.inner.cfg.id.clone(),
            last_error: None,
        };
        let k = self.inner.map.keys().shard_move(&m.key);
        match self
            .inner
            .map
            .store()
            .cas(&k, None, rec.encode().into())
            .await?
        {
            Ok(_) => {
                tracing::info!(key = %m.key, from = %m.from, to = %m.to, reason = reason.as_str(), "starting a replica move");
                metrics::counter!("flotilla_seeder_moves_started_total", "reason" => reason.as_str()).increment(1);
                let me = self.clone();
                self.ensure_job(
                    format!("move:{}", m.key),
                    async move { me.move_job(rec).await },
                );
                Ok(true)
            }
            Err(_) => Ok(false),
        }
    }

    /// Apply `f` to the shard record under CAS (epoch bumped), retrying lost races. `f`
    /// returns false to leave the record alone. Returns the record as stored afterwards.
    async fn update_shard(
        &self,
        key: &ShardKey,
        mut f: impl FnMut(&mut ShardRecord) -> bool,
    ) -> Result<Option<ShardRecord>, SeederError> {
        for _ in 0..10 {
            let Some((mut rec, v)) = self.inner.map.get_shard(key).await? else {
                return Ok(None);
            };
            if !f(&mut rec) {
                return Ok(Some(rec));
            }
            rec.epoch += 1;
            if self.inner.map.cas_shard(&rec, Some(v)).await?.is_ok() {
                return Ok(Some(rec));
            }
        }
        Err(SeederError::Meta(shardmap::StoreError::Protocol(format!(
            "shard {key} kept changing under the seeder"
        ))))
    }

    async fn put_record<R: Record>(&self, key: &str, rec: &R) -> Result<(), SeederError> {
        self.inner.map.store().put(key, rec.encode().into()).await?;
        Ok(())
    }

    /// Seed `repos` onto `node` with bounded concurrency, pacing to the configured rate,
    /// calling `done` after each repository; what `done` returns (a progress record and its
    /// key) is written to the store before the next result is taken.
    async fn seed_repos(
        &self,
        node: &NodeRecord,
        repos: Vec<RepoName>,
        verify: bool,
        mut done: impl FnMut(
            &RepoName,
            registry_client::internal::SeedStats,
        ) -> Option<(String, Vec<u8>)>,
    ) -> Result<(), SeederError> {
        let client = &self.inner.client;
        let rate = self.inner.cfg.seed_bytes_per_sec;
        let started = Instant::now();
        let mut fetched = 0u64;
        let mut results = futures::stream::iter(repos.into_iter().map(|repo| async move {
            let stats = client.seed(node, &repo, verify).await;
            (repo, stats)
        }))
        .buffer_unordered(self.inner.cfg.seed_concurrency.max(1));
        while let Some((repo, stats)) = results.next().await {
            if self.inner.term.is_cancelled() {
                return Err(SeederError::LostLeadership);
            }
            let stats = stats?;
            if stats.missing > 0 {
                // Never "done" with a hole: the repository stays pending and is asked again
                // (a node that still holds the object restores it to object storage).
                metrics::counter!("flotilla_seeder_missing_objects_total").increment(stats.missing);
                return Err(SeederError::Incomplete {
                    node: node.id.to_string(),
                    repo,
                    missing: stats.missing,
                });
            }
            fetched += stats.fetched_bytes;
            metrics::counter!("flotilla_seeder_bytes_total").increment(stats.fetched_bytes);
            metrics::counter!("flotilla_seeder_objects_total").increment(stats.objects);
            if let Some((k, v)) = done(&repo, stats) {
                self.inner.map.store().put(&k, v.into()).await?;
            }
            if rate > 0 {
                let due = Duration::from_secs_f64(fetched as f64 / rate as f64);
                if let Some(wait) = due.checked_sub(started.elapsed()) {
                    if !sleep_or(&self.inner.term, wait).await {
                        return Err(SeederError::LostLeadership);
                    }
                }
            }
        }
        Ok(())
    }

    /// Run `step` until it succeeds or the term ends, backing off on errors (object storage
    /// or the node unreachable: the work stays recorded and resumes when they return).
    async fn retrying<F, Fut>(&self, what: &str, mut step: F)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<bool, SeederError>>,
    {
        let mut backoff = Duration::from_millis(500);
        while !self.inner.term.is_cancelled() {
            match step().await {
                Ok(true) => return,
                Ok(false) => backoff = Duration::from_millis(500),
                Err(SeederError::LostLeadership) => return,
                Err(e) if e.is_config() => {
                    tracing::error!(job = what, error = %e.report(), "seeder job blocked by a configuration error; retrying until it is fixed");
                    metrics::counter!("flotilla_seeder_config_errors_total").increment(1);
                    backoff = Duration::from_secs(5);
                }
                Err(e) => {
                    tracing::warn!(job = what, error = %e, "seeder job step failed; retrying");
                    metrics::counter!("flotilla_seeder_errors_total").increment(1);
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
            if !sleep_or(&self.inner.term, backoff).await {
                return;
            }
        }
    }

    // ---- reseed ----------------------------------------------------------------------

    async fn reseed_job(&self, id: NodeId) {
        let me = self.clone();
        self.retrying(&format!("reseed {id}"), || {
            let (me, id) = (me.clone(), id.clone());
            async move { me.reseed_step(&id).await }
        })
        .await
    }

    /// One attempt at reseeding `id` to completion. `Ok(true)` when finished (or no longer
    /// needed); errors are recorded in the progress record and retried.
    async fn reseed_step(&self, id: &NodeId) -> Result<bool, SeederError> {
        let map = &self.inner.map;
        let key = map.keys().reseed(id);
        let Some((node, _)) = map.get_node(id).await? else {
            return Ok(true);
        };
        if node.state != NodeState::Seeding {
            return Ok(true);
        }
        let status = self.inner.client.status(&node).await?;
        if !status.needs_seed {
            return Ok(false); // the node is about to report ready itself
        }
        let stored = match map.store().get(&key).await? {
            Some((b, _)) => ReseedRecord::decode(&key, &b).ok(),
            None => None,
        };
        let mut shard_keys: Vec<ShardKey> = map
            .list_shards()
            .await?
            .into_iter()
            .filter(|(s, _)| s.replicas.contains(id) || s.joining.contains(id))
            .map(|(s, _)| s.key)
            .collect();
        shard_keys.sort();
        let depth = self.inner.cfg.shard_key_depth;
        let mut rec = match stored {
            Some(mut r) if r.status == ReseedStatus::Seeding && r.seed_id == status.seed_id => {
                tracing::info!(node = %id, done = r.shards_done.len(), total = r.shards_total, "resuming reseed");
                r.seeder = self.inner.cfg.id.clone();
                r
            }
            _ => {
                let mut objects_total = 0;
                for k in &shard_keys {
                    objects_total += shard_repos(&self.inner.remote, k, depth)
                        .await?
                        .values()
                        .sum::<u64>();
                }
                tracing::info!(node = %id, shards = shard_keys.len(), objects = objects_total, "starting reseed from object storage");
                let now = now_ms();
                ReseedRecord {
                    node: id.clone(),
                    seed_id: status.seed_id.clone(),
                    status: ReseedStatus::Seeding,
                    started_ms: now,
                    updated_ms: now,
                    finished_ms: None,
                    shards_total: shard_keys.len() as u64,
                    shards_done: Vec::new(),
                    repos_done: Vec::new(),
                    objects_total,
                    objects_done: 0,
                    bytes_done: 0,
                    bytes_per_sec: 0.0,
                    objects_per_sec: 0.0,
                    eta_secs: None,
                    seeder: self.inner.cfg.id.clone(),
                    last_error: None,
                }
            }
        };
        rec.shards_total = shard_keys.len() as u64;
        self.put_record(&key, &rec).await?;
        let result = self.reseed_shards(&node, &shard_keys, &mut rec, &key).await;
        if let Err(e) = &result {
            rec.last_error = Some(e.report());
            rec.update_rates(now_ms());
            let _ = self.put_record(&key, &rec).await;
            return result.map(|_| false);
        }
        // Final pass: whatever landed in object storage while we worked (cheap: only what
        // is missing is fetched).
        for k in &shard_keys {
            let repos: Vec<RepoName> = shard_repos(&self.inner.remote, k, depth)
                .await?
                .into_keys()
                .collect();
            self.seed_repos(&node, repos, false, |_, _| None).await?;
        }
        self.inner.client.seeded(&node).await?;
        rec.status = ReseedStatus::Done;
        rec.finished_ms = Some(now_ms());
        rec.last_error = None;
        rec.objects_done = rec.objects_done.max(rec.objects_total);
        rec.update_rates(now_ms());
        rec.eta_secs = Some(0.0);
        self.put_record(&key, &rec).await?;
        metrics::counter!("flotilla_seeder_reseeds_completed_total").increment(1);
        tracing::info!(node = %id, objects = rec.objects_done, bytes = rec.bytes_done, secs = (rec.updated_ms - rec.started_ms) as f64 / 1000.0, "reseed complete; node reports ready");
        Ok(true)
    }

    async fn reseed_shards(
        &self,
        node: &NodeRecord,
        shard_keys: &[ShardKey],
        rec: &mut ReseedRecord,
        key: &str,
    ) -> Result<(), SeederError> {
        let depth = self.inner.cfg.shard_key_depth;
        for k in shard_keys {
            if rec.shards_done.contains(k) {
                continue;
            }
            let repos: Vec<RepoName> = shard_repos(&self.inner.remote, k, depth)
                .await?
                .into_keys()
                .filter(|r| !rec.repos_done.contains(r))
                .collect();
            let mut last_save = Instant::now();
            self.seed_repos(node, repos, true, |repo, stats| {
                rec.objects_done += stats.objects;
                rec.bytes_done += stats.bytes;
                rec.repos_done.push(repo.clone());
                rec.update_rates(now_ms());
                let n = rec.node.to_string();
                metrics::gauge!("flotilla_seeder_reseed_objects_done", "node" => n.clone())
                    .set(rec.objects_done as f64);
                metrics::gauge!("flotilla_seeder_reseed_objects_total", "node" => n)
                    .set(rec.objects_total as f64);
                (last_save.elapsed() >= SAVE_EVERY).then(|| {
                    last_save = Instant::now();
                    (key.to_owned(), rec.encode())
                })
            })
            .await?;
            rec.shards_done.push(k.clone());
            rec.repos_done.clear();
            rec.last_error = None;
            rec.update_rates(now_ms());
            self.put_record(key, rec).await?;
        }
        Ok(())
    }

    // ---- moves -----------------------------------------------------------------------

    async fn move_job(&self, rec: MoveRecord) {
        let me = self.clone();
        let rec = Arc::new(tokio::sync::Mutex::new(rec));
        self.retrying("move", || {
            let (me, rec) = (me.clone(), rec.clone());
            async move {
                let mut r = rec.lock().await;
                me.move_step(&mut r).await
            }
        })
        .await
    }

    async fn end_move(&self, rec: &MoveRecord, outcome: &str) -> Result<(), SeederError> {
        self.inner
            .map
            .store()
            .delete(&self.inner.map.keys().shard_move(&rec.key))
            .await?;
        metrics::counter!("flotilla_seeder_moves_finished_total", "reason" => rec.reason.as_str(), "outcome" => outcome.to_owned()).increment(1);
        Ok(())
    }

    async fn abort_move(&self, rec: &MoveRecord, why: &str) -> Result<bool, SeederError> {
        tracing::warn!(key = %rec.key, from = %rec.from, to = %rec.to, why, "abandoning a replica move");
        let to = rec.to.clone();
        self.update_shard(&rec.key, |s| {
            let had = s.joining.contains(&to);
            s.joining.retain(|j| *j != to);
            had
        })
        .await?;
        self.end_move(rec, "aborted").await?;
        Ok(true)
    }

    /// Drive one move to completion: add as joining → seed → swap → drop.
    async fn move_step(&self, rec: &mut MoveRecord) -> Result<bool, SeederError> {
        let map = &self.inner.map;
        let rkey = map.keys().shard_move(&rec.key);
        let Some((shard, _)) = map.get_shard(&rec.key).await? else {
            return self.abort_move(rec, "shard record gone").await;
        };
        if shard.replicas.contains(&rec.to) && !shard.replicas.contains(&rec.from) {
            self.end_move(rec, "done").await?;
            return Ok(true);
        }
        if !shard.replicas.contains(&rec.from) || shard.pinned {
            return self
                .abort_move(rec, "the shard changed under the move")
                .await;
        }
        let target = match map.get_node(&rec.to).await? {
            Some((n, _)) if n.state == NodeState::Ready => n,
            _ => {
                return self
                    .abort_move(rec, "the target node is no longer ready")
                    .await
            }
        };
        if !shard.joining.contains(&rec.to) {
            let to = rec.to.clone();
            self.update_shard(&rec.key, |s| {
                if s.joining.contains(&to) {
                    return false;
                }
                s.joining.push(to.clone());
                true
            })
            .await?;
            rec.joined_ms = Some(now_ms());
            rec.updated_ms = now_ms();
            self.put_record(&rkey, rec).await?;
        }
        // Seed everything the shard holds (verified).
        let depth = self.inner.cfg.shard_key_depth;
        let repos: Vec<RepoName> = shard_repos(&self.inner.remote, &rec.key, depth)
            .await?
            .into_keys()
            .collect();
        rec.repos_total = repos.len() as u64;
        let mut acc = (0u64, 0u64, 0u64);
        self.seed_repos(&target, repos, true, |_, s| {
            acc.0 += 1;
            acc.1 += s.objects;
            acc.2 += s.bytes;
            None
        })
        .await?;
        rec.repos_done = acc.0;
        rec.objects_done = acc.1;
        rec.bytes_done = acc.2;
        rec.updated_ms = now_ms();
        self.put_record(&rkey, rec).await?;
        // The final pass and the swap, against one version of the shard record: every write
        // committed before that version is in object storage (the pass copies it), and every
        // write committing after it reaches `to` (routers' commits re-read the record and
        // write to joining nodes they missed) or changes the version, so the swap's CAS
        // fails and the pass repeats. No wait for routers to have seen `to` is needed.
        let (from, to) = (rec.from.clone(), rec.to.clone());
        let mut swapped = None;
        for _ in 0..SWAP_ATTEMPTS {
            let Some((mut s, version)) = map.get_shard(&rec.key).await? else {
                break;
            };
            let repos: Vec<RepoName> = shard_repos(&self.inner.remote, &rec.key, depth)
                .await?
                .into_keys()
                .collect();
            self.seed_repos(&target, repos, false, |_, _| None).await?;
            // Swap: `to` replaces `from` in place (keeping its preference order), leaves
            // joining; `from`'s lag (if any) leaves with it.
            let Some(pos) = s.replicas.iter().position(|r| *r == from) else {
                break;
            };
            if s.replicas.contains(&to) || !s.joining.contains(&to) {
                break;
            }
            s.replicas[pos] = to.clone();
            s.joining.retain(|j| *j != to);
            s.lagging.retain(|l| *l != from && *l != to);
            s.syncing.retain(|l| *l != from && *l != to);
            s.epoch += 1;
            if map.cas_shard(&s, Some(version)).await?.is_ok() {
                swapped = Some(s);
                break;
            }
            tracing::debug!(key = %rec.key, "a write landed during the final pass; passing again");
        }
        match swapped {
            Some(s) if s.replicas.contains(&rec.to) && !s.replicas.contains(&rec.from) => {
                tracing::info!(key = %rec.key, from = %rec.from, to = %rec.to, replicas = ?s.replicas, epoch = s.epoch, "replica move complete");
                // Drop: the old copy stops receiving traffic with the swap; the donor deletes
                // its bytes itself once the grace period has passed (registry-node `gc`).
                self.end_move(rec, "done").await?;
                Ok(true)
            }
            _ => self.abort_move(rec, "the swap could not be applied").await,
        }
    }
}
