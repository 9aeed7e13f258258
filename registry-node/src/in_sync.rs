//! In-sync replicas, the node's half. A router that could not get a manifest or tag write
//! onto this node marks it lagging in the key's shard record before acknowledging the write,
//! and no router reads the key here after that. This loop notices (a watch on the shard
//! records: one listing when the watch starts, then one decode per change), catches the
//! key's repositories up from object storage, and takes the node off the lagging list with
//! a compare-and-swap against the record version it started from: a write committed in
//! between changes that version, so the node catches up again instead of rejoining with a
//! hole. This is also why a periodic full anti-entropy scan is no longer the normal path: a
//! node in sync received every write, a lagging one catches up exactly the keys it missed.

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
                .filter(|(s, _)| s.lagging.contains(&me))
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
                            Ok(rec) if rec.lagging.contains(&me) => {
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
    let (rec, version) = match map.get_shard(key).await {
        Ok(Some(got)) => got,
        Ok(None) => return true,
        Err(e) => {
            tracing::debug!(%key, error = %e, "could not read the shard record to rejoin");
            return false;
        }
    };
    if !rec.lagging.contains(me) {
        return true;
    }
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
    let mut next = rec.clone();
    next.lagging.retain(|l| l != me);
    next.epoch += 1;
    match map.cas_shard(&next, Some(version)).await {
        Ok(Ok(_)) => {
            tracing::info!(%key, changed, epoch = next.epoch, "caught up a lagging key; back in sync");
            metrics::counter!("flotilla_node_rejoins_total").increment(1);
            true
        }
        Ok(Err(_)) => {
            tracing::debug!(%key, "the shard record changed during the catch-up; catching up again");
            false
        }
        Err(e) => {
            tracing::debug!(%key, error = %e, "could not rejoin; will retry");
            false
        }
    }
}

/// Sleep for `d`; false when cancelled first.
async fn sleep_or(cancel: &CancellationToken, d: Duration) -> bool {
    tokio::select! {
        _ = cancel.cancelled() => false,
        _ = tokio::time::sleep(d) => true,
    }
}
