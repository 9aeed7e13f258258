//! Membership: a node with a metadata store registers itself under `nodes/<id>` bound to a
//! lease, refreshes its heartbeat, and on shutdown marks itself draining (so routers stop
//! sending new work first) before revoking the lease (so it disappears from the map).

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use shardmap::{Keyspace, MetaStore, NodeRecord, NodeState, ShardMap};
use tokio_util::sync::CancellationToken;

use crate::NodeConfig;

/// Lease TTL: how long a dead node stays in the map before routers stop trying it (they also
/// eject it passively on the first failed request).
pub const LEASE_TTL: Duration = Duration::from_secs(10);

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[derive(Debug)]
pub struct Membership {
    map: ShardMap,
    record: NodeRecord,
}

impl Membership {
    pub fn open(
        cfg: &NodeConfig,
        meta_url: &str,
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
            },
        })
    }

    /// Wait until `node` has caught up with object storage, register, keep the registration
    /// alive until `cancel`, then drain and deregister.
    pub async fn run(mut self, node: crate::NodeService, cancel: CancellationToken) {
        while !node.is_ready() {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
        }
        let mut lease = None;
        let mut tick = tokio::time::interval(LEASE_TTL / 4);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tick.tick() => {}
            }
            self.record.heartbeat_ms = now_ms();
            // An operator's drain (admin API) survives our heartbeats.
            if let Ok(Some((current, _))) = self.map.get_node(&self.record.id).await {
                self.record.state = current.state;
            }
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
