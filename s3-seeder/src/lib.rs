//! Flotilla's auto-recovery: the seeder.
//!
//! Brief overview:
//! - [`run`] campaigns for leadership: a lease plus `ShardMap::try_lock_seeder`. Any number
//!   of seeders may run; the one holding the lock acts, the others retry every tick and take
//!   over within a lease TTL (a few seconds) of the leader dying.
//! - The leader reconciles every tick ([`work`]): nodes registered as `Seeding` are reseeded
//!   from object storage; shards on a node absent longer than `replace_after`, or on a
//!   drained node, move to rack-valid nodes; a node below its fair share receives moves
//!   (rate-limited). A move is add as joining → seed → swap in → drop, each step a CAS on the
//!   shard record with the epoch bumped.
//! - All work state lives in the metadata store ([`shardmap::seeder`]), so a successor
//!   resumes.
//! - Bytes never pass through the seeder: it asks nodes to fetch (`/internal/v1/seed`), and
//!   the node verifies every byte on the same path a client read uses ([`nodes`]).

pub mod nodes;
pub mod work;

use std::future::Future;
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use shardmap::{Keyspace, MetaStore, SeederLeader, ShardMap};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Seeder settings, built by the binary from already validated flags.
#[derive(Clone, Debug)]
pub struct SeederConfig {
    /// This instance's name in the leader record and progress records.
    pub id: String,
    pub meta_url: shardmap::MetaUrl,
    /// Object store, the same the nodes use (listing only; the seeder reads no bytes).
    pub store_url: flotilla_objstore::StoreUrl,
    /// Shared secret of the node-internal API.
    pub secret: Option<String>,
    /// A node missing from `nodes/` this long is replaced shard by shard.
    pub replace_after: Duration,
    pub shard_key_depth: NonZeroUsize,
    /// Leader lease TTL: how long a dead leader blocks a successor.
    pub lease_ttl: Duration,
    /// Reconcile period (also how often standbys try to take the lock).
    pub tick: Duration,
    /// Repositories seeded in parallel per node.
    pub seed_concurrency: usize,
    /// Moves in flight at once, cluster-wide.
    pub max_moves: usize,
    /// At least this long between starting two rebalance moves, so production traffic is not
    /// starved by a new node filling up.
    pub rebalance_interval: Duration,
    /// Pace of seeding per job in fetched bytes per second (0 = as fast as nodes go).
    pub seed_bytes_per_sec: u64,
    /// Extra root certificates (PEM) trusted when calling nodes over `https://`.
    pub tls_ca: Option<std::path::PathBuf>,
}

impl SeederConfig {
    pub fn new(meta_url: shardmap::MetaUrl, store_url: flotilla_objstore::StoreUrl) -> Self {
        SeederConfig {
            id: format!("seeder-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]),
            meta_url,
            store_url,
            secret: None,
            tls_ca: None,
            replace_after: Duration::from_secs(600),
            shard_key_depth: shardmap::DEFAULT_KEY_DEPTH,
            lease_ttl: Duration::from_secs(3),
            tick: Duration::from_secs(1),
            seed_concurrency: 4,
            max_moves: 2,
            rebalance_interval: Duration::from_secs(2),
            seed_bytes_per_sec: 0,
        }
    }
}

/// Seeder failures. Most are retried on the next tick; only startup errors end [`run`].
#[derive(Debug, thiserror::Error)]
pub enum SeederError {
    #[error("metadata store: {0}")]
    Meta(#[from] shardmap::StoreError),
    #[error("object store: {0}")]
    Remote(#[from] flotilla_objstore::RemoteError),
    #[error("node {node}: {source}")]
    Node {
        node: String,
        #[source]
        source: registry_client::internal::ClientError,
    },
    #[error(
        "node {node}: object storage lacks {missing} object(s) of {repo} that its listing names"
    )]
    Incomplete {
        node: String,
        repo: flotilla_core::RepoName,
        missing: u64,
    },
    #[error("leadership lost")]
    LostLeadership,
}

impl SeederError {
    /// A node refused the seeder's credential: retrying cannot help, an operator must make
    /// `--secret` agree on both sides.
    pub fn is_config(&self) -> bool {
        matches!(self, SeederError::Node { source, .. } if source.is_auth())
    }

    /// How the error is recorded for an operator (`GET /admin/v1/reseed`).
    pub(crate) fn report(&self) -> String {
        if self.is_config() {
            format!("configuration error: {self} (the node refused the seeder's secret: give every component the same --secret/FLOTILLA_SECRET)")
        } else {
            self.to_string()
        }
    }
}

pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Sleep unless cancelled first; `false` if cancelled.
pub(crate) async fn sleep_or(cancel: &CancellationToken, d: Duration) -> bool {
    tokio::select! {
        _ = cancel.cancelled() => false,
        _ = tokio::time::sleep(d) => true,
    }
}

/// Run until `shutdown`: campaign, act while leader, stand by otherwise.
pub async fn run(
    cfg: SeederConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), SeederError> {
    let mut cfg = cfg;
    let store: Arc<dyn MetaStore> = shardmap::open(&cfg.meta_url)?;
    let map = ShardMap::new(store, Keyspace::new(shardmap::DEFAULT_PREFIX));
    // The cluster's key depth is the shard map's, never this process's own idea of it; the
    // seeder waits for the store rather than guess.
    cfg.shard_key_depth = loop {
        match map.key_depth(cfg.shard_key_depth).await {
            Ok(d) => break d,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the shard key depth yet; retrying");
                tokio::time::sleep(cfg.tick).await;
            }
        }
    };
    let remote = flotilla_objstore::Remote::open(&cfg.store_url)?;
    let client = nodes::NodeClient::new(cfg.secret.clone(), cfg.tls_ca.as_deref())?;
    let cancel = CancellationToken::new();
    let tasks = TaskTracker::new();
    {
        let c = cancel.clone();
        tasks.spawn(async move {
            shutdown.await;
            c.cancel();
        });
    }
    tracing::info!(seeder = %cfg.id, "seeder started; campaigning for leadership");
    metrics::gauge!("flotilla_seeder_leader").set(0.0);
    while !cancel.is_cancelled() {
        let lease = match map.store().lease(cfg.lease_ttl).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "metadata store unreachable; retrying");
                sleep_or(&cancel, cfg.tick).await;
                continue;
            }
        };
        // Stand by: keep the lease alive and retry the lock every tick.
        let won = loop {
            match map.try_lock_seeder(&lease).await {
                Ok(true) => break true,
                Ok(false) => {}
                Err(e) => tracing::debug!(error = %e, "seeder lock attempt failed"),
            }
            if !sleep_or(&cancel, cfg.tick).await {
                break false;
            }
            if map.store().keepalive(&lease).await.is_err() {
                break false;
            }
        };
        if !won {
            let _ = map.store().revoke(&lease).await;
            continue;
        }
        tracing::info!(seeder = %cfg.id, "acting as the seeder leader");
        metrics::gauge!("flotilla_seeder_leader").set(1.0);
        let leader = SeederLeader {
            id: cfg.id.clone(),
            since_ms: now_ms(),
        };
        let _ = map
            .store()
            .put_with_lease(
                &map.keys().seeder_leader(),
                Bytes::from(leader.encode()),
                &lease,
            )
            .await;
        let term = cancel.child_token();
        let keeper = {
            let (store, lease, term, every) = (
                map.store().clone(),
                lease.clone(),
                term.clone(),
                cfg.lease_ttl / 3,
            );
            tasks.spawn(async move {
                while sleep_or(&term, every).await {
                    if let Err(e) = store.keepalive(&lease).await {
                        tracing::warn!(error = %e, "seeder lease lost; stepping down");
                        term.cancel();
                    }
                }
            })
        };
        let ctx = work::Ctx::new(
            cfg.clone(),
            map.clone(),
            remote.clone(),
            client.clone(),
            term.clone(),
        );
        while !term.is_cancelled() {
            if let Err(e) = ctx.reconcile().await {
                tracing::warn!(error = %e, "reconcile failed; retrying next tick");
            }
            sleep_or(&term, cfg.tick).await;
        }
        ctx.stop().await;
        let _ = keeper.await;
        metrics::gauge!("flotilla_seeder_leader").set(0.0);
        let _ = map.store().unlock(&map.keys().seeder_lock(), &lease).await;
        let _ = map.store().revoke(&lease).await;
        tracing::info!(seeder = %cfg.id, "no longer the seeder leader");
    }
    tasks.close();
    tasks.wait().await;
    Ok(())
}
