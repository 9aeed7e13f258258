//! The `MetaStore` conformance suite (feature `testsuite`): every backend — embedded, Consul,
//! etcd, and any wrapper — must pass [`run_all`]. Each function panics with a description of
//! the broken contract; keys live under the caller's `prefix` so runs do not interfere.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;

use crate::model::{Keyspace, RecordError, ShardRecord};
use crate::store::{Conflict, MetaStore, ShardMap, StoreError, WatchEvent, WatchStream};

/// Run every contract check.
pub async fn run_all(store: Arc<dyn MetaStore>, prefix: &str) {
    basic_kv(&*store, prefix).await;
    cas(&*store, prefix).await;
    watch(&*store, prefix).await;
    leases_and_locks(&*store, prefix).await;
    racing_placement(store.clone(), prefix).await;
    bad_records(store, prefix).await;
}

fn b(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

pub async fn basic_kv(s: &dyn MetaStore, prefix: &str) {
    let k = format!("{prefix}kv/a");
    assert_eq!(s.get(&k).await.unwrap(), None, "fresh key must be absent");
    let v1 = s.put(&k, b("one")).await.unwrap();
    assert_eq!(s.get(&k).await.unwrap(), Some((b("one"), v1)));
    let v2 = s.put(&k, b("two")).await.unwrap();
    assert!(v2 > v1, "versions must increase: {v1} then {v2}");
    s.put(&format!("{prefix}kv/b/c"), b("x")).await.unwrap();
    s.put(&format!("{prefix}kvz"), b("outside")).await.unwrap();
    let keys: Vec<String> = s
        .list(&format!("{prefix}kv/"))
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.key)
        .collect();
    assert_eq!(keys, [format!("{prefix}kv/a"), format!("{prefix}kv/b/c")]);
    s.delete(&k).await.unwrap();
    assert_eq!(s.get(&k).await.unwrap(), None);
    s.delete(&k).await.unwrap(); // deleting a missing key is fine
}

pub async fn cas(s: &dyn MetaStore, prefix: &str) {
    let k = format!("{prefix}cas/x");
    let v1 = s
        .cas(&k, None, b("1"))
        .await
        .unwrap()
        .expect("create-only on absent key");
    let lost = s.cas(&k, None, b("2")).await.unwrap();
    assert_eq!(
        lost,
        Err(Conflict { current: Some(v1) }),
        "create-only on existing key"
    );
    let v2 = s
        .cas(&k, Some(v1), b("2"))
        .await
        .unwrap()
        .expect("cas at current version");
    let stale = s.cas(&k, Some(v1), b("3")).await.unwrap();
    assert_eq!(
        stale,
        Err(Conflict { current: Some(v2) }),
        "cas at stale version"
    );
    assert_eq!(s.get(&k).await.unwrap(), Some((b("2"), v2)));
    s.delete(&k).await.unwrap();
    let gone = s.cas(&k, Some(v2), b("4")).await.unwrap();
    assert_eq!(gone, Err(Conflict { current: None }), "cas on deleted key");
}

async fn next(w: &mut WatchStream) -> WatchEvent {
    tokio::time::timeout(Duration::from_secs(20), w.next())
        .await
        .expect("watch event within 20s")
        .expect("watch stream ended")
        .expect("watch error")
}

/// Each change is awaited before the next one: Consul's blocking queries deliver snapshots, so
/// a key put and deleted between two polls is legitimately never seen there. What every
/// backend guarantees is that the latest state of each key is delivered, in version order.
pub async fn watch(s: &dyn MetaStore, prefix: &str) {
    let p = format!("{prefix}watch/");
    let mut w = s.watch(&p, None).await.unwrap();
    let v1 = s.put(&format!("{p}a"), b("1")).await.unwrap();
    let e1 = next(&mut w).await;
    assert_eq!(
        e1,
        WatchEvent::Put {
            key: format!("{p}a"),
            value: b("1"),
            version: v1
        }
    );
    s.put(&format!("{prefix}unwatched"), b("x")).await.unwrap();
    let v2 = s.put(&format!("{p}b"), b("2")).await.unwrap();
    let e2 = next(&mut w).await;
    assert_eq!(
        e2,
        WatchEvent::Put {
            key: format!("{p}b"),
            value: b("2"),
            version: v2
        }
    );
    s.delete(&format!("{p}a")).await.unwrap();
    let e3 = next(&mut w).await;
    assert!(
        matches!(&e3, WatchEvent::Delete { key, .. } if *key == format!("{p}a")),
        "{e3:?}"
    );
    assert!(e3.version() > v2);
    drop(w);
    // Resume after the first event: the later put of b is replayed.
    let mut w = s.watch(&p, Some(e1.version())).await.unwrap();
    let again = next(&mut w).await;
    assert_eq!(again.key(), format!("{p}b"));
}

pub async fn leases_and_locks(s: &dyn MetaStore, prefix: &str) {
    let lock = format!("{prefix}locks/seeder");
    let node = format!("{prefix}nodes/n1");
    let a = s.lease(Duration::from_secs(10)).await.unwrap();
    let b_ = s.lease(Duration::from_secs(10)).await.unwrap();
    s.put_with_lease(&node, b("alive"), &a).await.unwrap();
    s.keepalive(&a).await.unwrap();
    assert!(s.try_lock(&lock, &a).await.unwrap(), "free lock");
    assert!(
        s.try_lock(&lock, &a).await.unwrap(),
        "re-entrant for the holder"
    );
    assert!(
        !s.try_lock(&lock, &b_).await.unwrap(),
        "held by another lease"
    );
    s.unlock(&lock, &a).await.unwrap();
    assert!(s.try_lock(&lock, &b_).await.unwrap(), "released lock");
    assert!(!s.try_lock(&lock, &a).await.unwrap());
    s.revoke(&b_).await.unwrap();
    assert!(
        s.try_lock(&lock, &a).await.unwrap(),
        "lock freed by revoking its lease"
    );
    s.revoke(&a).await.unwrap();
    assert_eq!(
        s.get(&node).await.unwrap(),
        None,
        "leased key vanishes with its lease"
    );
    assert!(matches!(
        s.keepalive(&a).await,
        Err(StoreError::LeaseExpired(_))
    ));
}

/// Lease expiry without revoke: the key disappears within the TTL plus slack.
pub async fn lease_expiry(s: &dyn MetaStore, prefix: &str, ttl: Duration) {
    let k = format!("{prefix}expiry/n1");
    let l = s.lease(ttl).await.unwrap();
    s.put_with_lease(&k, b("alive"), &l).await.unwrap();
    let deadline = tokio::time::Instant::now() + l.ttl * 3 + Duration::from_secs(5);
    while s.get(&k).await.unwrap().is_some() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "leased key outlived its TTL"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn shard(key: &str, replicas: &[&str]) -> ShardRecord {
    ShardRecord {
        key: key.parse().unwrap(),
        replicas: replicas.iter().map(|r| r.parse().unwrap()).collect(),
        joining: vec![],
        lagging: Vec::new(),
        syncing: Vec::new(),
        epoch: 1,
        pinned: false,
        rack_relaxed: false,
        created_ms: 0,
    }
}

/// Two routers place the same new key concurrently: one wins, both report the winner.
pub async fn racing_placement(store: Arc<dyn MetaStore>, prefix: &str) {
    let a = ShardMap::new(store.clone(), Keyspace::new(prefix));
    let b_ = ShardMap::new(store, Keyspace::new(prefix));
    let ra = shard("race/svc", &["n1", "n2"]);
    let rb = shard("race/svc", &["n3", "n4"]);
    let (ga, gb) = tokio::join!(a.create_shard(&ra), b_.create_shard(&rb));
    let (ga, gb) = (ga.unwrap(), gb.unwrap());
    assert_eq!(ga, gb, "both routers must report the same placement");
    assert!(ga.0 == ra || ga.0 == rb);
    assert_eq!(a.get_shard(&ra.key).await.unwrap(), Some(ga));
}

/// Corrupt and future-version records are reported, and CAS-based creation does not clobber.
pub async fn bad_records(store: Arc<dyn MetaStore>, prefix: &str) {
    let map = ShardMap::new(store.clone(), Keyspace::new(prefix));
    let corrupt = shard("bad/corrupt", &["n1", "n2"]);
    let future = shard("bad/future", &["n1", "n2"]);
    store
        .put(&map.keys().shard(&corrupt.key), b("{garbage"))
        .await
        .unwrap();
    let newer = br#"{"v":2,"key":"bad/future","replicas":["n9"],"epoch":9,"created_ms":0,"new_field":true}"#;
    store
        .put(&map.keys().shard(&future.key), Bytes::from_static(newer))
        .await
        .unwrap();
    let e = map.get_shard(&corrupt.key).await.unwrap_err();
    assert!(
        matches!(e, StoreError::Record(RecordError::Corrupt { .. })),
        "{e}"
    );
    let e = map.get_shard(&future.key).await.unwrap_err();
    assert!(
        matches!(
            e,
            StoreError::Record(RecordError::FutureVersion { found: 2, .. })
        ),
        "{e}"
    );
    assert!(
        map.create_shard(&future).await.is_err(),
        "create over a future record must fail"
    );
    assert!(map.cas_shard(&future, None).await.unwrap().is_err());
    let raw = store
        .get(&map.keys().shard(&future.key))
        .await
        .unwrap()
        .unwrap()
        .0;
    assert_eq!(&raw[..], &newer[..], "future record left untouched");
    // A listing keeps working around them: the readable records are listed, the two bad
    // ones are reported (and left as stored), so one bad record cannot stop a lister.
    let good = ShardRecord {
        key: "good/listed".parse().unwrap(),
        ..future.clone()
    };
    map.cas_shard(&good, None).await.unwrap().unwrap();
    let (listed, unreadable) = map.list_shards_checked().await.unwrap();
    assert!(listed.iter().any(|(r, _)| r.key == good.key), "{listed:?}");
    assert!(!listed
        .iter()
        .any(|(r, _)| r.key == future.key || r.key == corrupt.key));
    let bad: Vec<&str> = unreadable.iter().map(|u| u.key.as_str()).collect();
    assert!(
        bad.contains(&map.keys().shard(&future.key).as_str()),
        "{bad:?}"
    );
    assert!(
        bad.contains(&map.keys().shard(&corrupt.key).as_str()),
        "{bad:?}"
    );
    assert_eq!(map.list_shards().await.unwrap().len(), listed.len());
}
