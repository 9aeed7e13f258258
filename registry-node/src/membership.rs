//! Membership: a node with a metadata store registers itself under `nodes/<id>` bound to a
//! lease, refreshes its heartbeat, and on shutdown marks itself draining (so routers stop
//! sending new work first) before revoking the lease (so it disappears from the map).
//!
//! The node is the authority on `Seeding`: it registers as `Seeding` while its disk waits for
//! a seeder (identity file was missing and some shard lists this id), and as `Ready` once the
//! seeder told it the disk is full (`POST /internal/v1/seeded`, which clears the flag before
//! the seeder flips the record). So a heartbeat can never undo the seeder's `Ready`: by then
//! the node itself believes it. An operator's `Draining` is kept across heartbeats.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use shardmap::{Keyspace, MetaStore, NodeRecord, NodeState, ShardMap};
use tokio_util::sync::CancellationToken;

use crate::NodeConfig;

/// Lease TTL: how long a dead node stays in the map before routers stop trying it (they also
/// eject it passively on the first failed request).
pub(crate) const LEASE_TTL: Duration = Duration::from_secs(10);

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[derive(Debug)]
pub(crate) struct Membership {
    map: ShardMap,
    record: NodeRecord,
}

impl Membership {
    pub(crate) fn open(
        cfg: &NodeConfig,
        meta_url: &shardmap::MetaUrl,
        advertise: String,
    ) -> Result<Self, shardmap::StoreError> {
        let store: Arc<dyn MetaStore> = shardmap::open(meta_url)?;
        Ok(Membership {
            map: ShardMap::new(store, Keyspace::new(shardmap::DEFAULT_PREFIX)),
            record: NodeRecord {
                id: cfg.id.clone(),
                url: advertise,
                rack: cfg.rack.clone(),
                state: NodeState::Ready,
                heartbeat_ms: now_ms(),
                weight: 1,
                store_ok: true,
                writable: true,
            },
        })
    }

    /// Whether any shard lists this node as a replica or as joining.
    async fn holds_shards(&self) -> Result<bool, shardmap::StoreError> {
        let id = &self.record.id;
        Ok(self
            .map
            .list_shards()
            .await?
            .iter()
            .any(|(s, _)| s.replicas.contains(id) || s.joining.contains(id)))
    }

    /// Wait until `node` has caught up with object storage, register, keep the registration
    /// alive until `cancel`, then drain and deregister.
    pub(crate) async fn run(mut self, node: crate::NodeService, cancel: CancellationToken) {
        while !node.is_ready() {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
        }
        let mut lease = None;
        let mut tick = tokio::time::interval(LEASE_TTL / 4);
        let mut seed_checked = !node.needs_seed();
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tick.tick() => {}
                _ = node.beat_requested() => {}
            }
            if !seed_checked {
                match self.holds_shards().await {
                    // A brand-new node (or one whose shards all moved away): nothing to seed.
                    Ok(false) => match node.mark_seeded().await {
                        Ok(()) => seed_checked = true,
                        Err(e) => tracing::warn!(error = %e, "could not record the identity"),
                    },
                    Ok(true) => {
                        tracing::info!(node = %self.record.id, "empty or partial disk under an id that holds shards: registering as seeding");
                        seed_checked = true;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "metadata store unreachable; will retry");
                        continue;
                    }
                }
            }
            self.record.heartbeat_ms = now_ms();
            self.record.store_ok = node.object_store_healthy();
            self.record.writable = node.writable();
            let stored = match self.map.get_node(&self.record.id).await {
                Ok(r) => r.map(|(rec, _)| rec.state),
                Err(_) => Some(self.record.state),
            };
            self.record.state = match stored {
                // An operator's drain (admin API) survives our heartbeats.
                Some(NodeState::Draining) => NodeState::Draining,
                _ if node.needs_seed() => NodeState::Seeding,
                Some(NodeState::Seeding) | None => NodeState::Ready,
                Some(s) => s,
            };
            let store = self.map.store().clone();
            let l = match &lease {
                Some(l) => match store.keepalive(l).await {
                    Ok(()) => l.clone(),
                    Err(e) => {
                        tracing::warn!(error = %e, "lease lost; registering again");
                        lease = None;
                        continue;
                    }
                },
                None => match store.lease(LEASE_TTL).await {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::warn!(error = %e, "metadata store unreachable; will retry");
                        continue;
                    }
                },
            };
            match self.map.register_node(&self.record, &l).await {
                Ok(_) => {
                    if lease.is_none() {
                        tracing::info!(node = %self.record.id, url = %self.record.url, "registered in the shard map");
                    }
                    lease = Some(l);
                }
                Err(e) => tracing::warn!(error = %e, "heartbeat failed"),
            }
        }
        if let Some(l) = lease {
            self.record.state = NodeState::Draining;
            let _ = self.map.register_node(&self.record, &l).await;
            let _ = self.map.store().revoke(&l).await;
            tracing::info!(node = %self.record.id, "deregistered from the shard map");
        }
    }
}
