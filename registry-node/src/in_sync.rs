//! In-sync replicas, the node's half. A router that could not get a manifest or tag write
//! onto this node marks it lagging in the key's shard record before acknowledging the write,
//! and no router reads the key here after that. This loop notices (a watch on the shard
//! records: one listing when the watch starts, then one decode per change) and rejoins in
//! two compare-and-swaps: `lagging` → `syncing` (from then on every commit sends this node
//! the write, or demotes it back to `lagging`), then a catch-up of the key's repositories
//! from object storage (which holds every write committed before the first swap), then out
//! of `syncing`, valid only while the node is still listed there. No write can fall between
//! the two, and no write load can starve the rejoin (the second swap does not depend on the
//! epoch the catch-up started from). This is also why a periodic full anti-entropy scan is
//! no longer the normal path: a node in sync received every write, a lagging one catches up
//! exactly the keys it missed.

use std::collections::HashSet;
use std::time::Duration;

use flotilla_core::{NodeId, ShardKey};
use futures::StreamExt;
use shardmap::{Record, ShardMap, ShardRecord, WatchEvent};
use tokio_util::sync::CancellationToken;

use crate::NodeService;

/// How soon a key whose rejoin failed (object storage or the metadata store unreachable, or
/// a write landed during the catch-up) is tried again.
const RETRY: Duration = Duration::from_millis(500);

pub(crate) async fn rejoin_loop(node: NodeService, map: ShardMap, cancel: CancellationToken) {
    let me = node.config().id.clone();
    let prefix = map.keys().shards();
    while !cancel.is_cancelled() {
        // Watch first, then list: a change between the two arrives as an event.
        let mut events = match map.store().watch(&prefix, None).await {
            Ok(e) => e,
            Err(e) => {
                tracing::debug!(error = %e, "shard watch unavailable; retrying");
                if sleep_or(&cancel, RETRY * 4).await {
                    continue;
                }
                return;
            }
        };
        let mut pending: HashSet<ShardKey> = match map.list_shards().await {
            Ok(all) => all
                .into_iter()
                .filter(|(s, _)| s.lagging.contains(&me) || s.syncing.contains(&me))
                .map(|(s, _)| s.key)
                .collect(),
            Err(e) => {
                tracing::debug!(error = %e, "shard listing failed; retrying");
                if sleep_or(&cancel, RETRY * 4).await {
                    continue;
                }
                return;
            }
        };
        loop {
            if node.is_ready() && !node.needs_seed() {
                let mut again = HashSet::new();
                for key in pending.drain() {
                    if !rejoin(&node, &map, &me, &key).await {
                        again.insert(key);
                    }
                }
                pending = again;
            }
            let wait = if pending.is_empty() {
                Duration::from_secs(3600)
            } else {
                RETRY
            };
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
                ev = events.next() => match ev {
                    Some(Ok(WatchEvent::Put { key, value, .. })) => {
                        match ShardRecord::decode(&key, &value) {
                            Ok(rec) if rec.lagging.contains(&me) || rec.syncing.contains(&me) => {
                                pending.insert(rec.key);
                            }
                            Ok(_) => {}
                            Err(e) => tracing::warn!(error = %e, "skipping a shard record this node cannot read"),
                        }
                    }
                    Some(Ok(WatchEvent::Delete { .. })) => {}
                    Some(Err(e)) => {
                        tracing::debug!(error = %e, "shard watch broke; re-watching");
                        break;
                    }
                    None => break,
                },
            }
        }
    }
}

/// One attempt to rejoin `key`'s in-sync set; true when there is nothing left to do.
async fn rejoin(node: &NodeService, map: &ShardMap, me: &NodeId, key: &ShardKey) -> bool {
    // Step 1: lagging → syncing (already syncing: a rejoin interrupted by a restart).
    let entered = update(map, key, |r| {
        if r.syncing.contains(me) {
            return Some(false);
        }
        if !r.lagging.contains(me) {
            return None;
        }
        r.lagging.retain(|l| l != me);
        r.syncing.push(me.clone());
        Some(true)
    })
    .await;
    match entered {
        Ok(Some(_)) => {}
        Ok(None) => return true,
        Err(e) => {
            tracing::debug!(%key, error = %e, "could not start a rejoin; will retry");
            return false;
        }
    }
    // Step 2: everything committed before step 1 is in object storage.
    let changed = match node.catch_up_key(key).await {
        Ok(Some(n)) => n,
        Ok(None) => {
            tracing::warn!(%key, "lagging for a key but without object storage to catch up from; staying out of its reads");
            return true;
        }
        Err(e) => {
            tracing::warn!(%key, error = %e, "catch-up of a lagging key failed; will retry");
            return false;
        }
    };
    // Step 3: out of syncing, unless a write missed us meanwhile (back in lagging).
    let left = update(map, key, |r| {
        if !r.syncing.contains(me) {
            return None;
        }
        r.syncing.retain(|l| l != me);
        Some(true)
    })
    .await;
    match left {
        Ok(Some(epoch)) => {
            tracing::info!(%key, changed, epoch, "caught up a lagging key; back in sync");
            metrics::counter!("flotilla_node_rejoins_total").increment(1);
            true
        }
        Ok(None) => {
            tracing::debug!(%key, "missed a write during the catch-up; catching up again");
            false
        }
        Err(e) => {
            tracing::debug!(%key, error = %e, "could not finish a rejoin; will retry");
            false
        }
    }
}

/// Apply `f` to `key`'s record under compare-and-swap (epoch bumped), retrying lost races.
/// `f` answers `None` to leave the record alone (the result is then `None`), `Some(false)`
/// when it is already as wanted, `Some(true)` when it changed it; otherwise the result is
/// the record's epoch afterwards.
async fn update(
    map: &ShardMap,
    key: &ShardKey,
    mut f: impl FnMut(&mut ShardRecord) -> Option<bool>,
) -> Result<Option<u64>, shardmap::StoreError> {
    for _ in 0..32 {
        let Some((mut rec, version)) = map.get_shard(key).await? else {
            return Ok(None);
        };
        match f(&mut rec) {
            None => return Ok(None),
            Some(false) => return Ok(Some(rec.epoch)),
            Some(true) => {}
        }
        rec.epoch += 1;
        if map.cas_shard(&rec, Some(version)).await?.is_ok() {
            return Ok(Some(rec.epoch));
        }
    }
    Err(shardmap::StoreError::Protocol(format!(
        "shard {key} kept changing during a rejoin"
    )))
}

/// Sleep for `d`; false when cancelled first.
async fn sleep_or(cancel: &CancellationToken, d: Duration) -> bool {
    tokio::select! {
        _ = cancel.cancelled() => false,
        _ = tokio::time::sleep(d) => true,
    }
}
