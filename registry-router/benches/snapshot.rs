//! The router's shard snapshot at fleet size: one watch event (a commit's epoch bump) applied
//! with 100,000 keys cached, against what the snapshot used to cost per event (a copy of the
//! whole map, swapped in). `cargo bench -p registry-router --bench snapshot`.

use std::collections::HashMap;

use criterion::{criterion_group, criterion_main, Criterion};
use flotilla_core::ShardKey;
use registry_router::{Cluster, RouterConfig};
use shardmap::ShardRecord;

const KEYS: usize = 100_000;

fn record(i: usize, epoch: u64) -> ShardRecord {
    ShardRecord {
        key: format!("svc{i}/prod").parse::<ShardKey>().unwrap(),
        replicas: vec!["n1".parse().unwrap(), "n2".parse().unwrap()],
        joining: Vec::new(),
        lagging: Vec::new(),
        syncing: Vec::new(),
        epoch,
        pinned: false,
        rack_relaxed: false,
        created_ms: 1,
    }
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().display()).parse().unwrap();
    let cluster = rt.block_on(Cluster::open(RouterConfig::new(url))).unwrap();
    for i in 0..KEYS {
        cluster.cache_shard(record(i, 1));
    }
    let mut epoch = 1;
    c.bench_function("apply one shard event, 100k keys cached", |b| {
        b.iter(|| {
            epoch += 1;
            cluster.cache_shard(record(epoch as usize % KEYS, epoch));
        })
    });
    // The previous design: a copy-on-write snapshot, cloned whole for every event.
    let mut old: std::sync::Arc<HashMap<ShardKey, ShardRecord>> = std::sync::Arc::new(
        (0..KEYS)
            .map(|i| (record(i, 1).key, record(i, 1)))
            .collect(),
    );
    c.bench_function("copy-on-write snapshot, 100k keys (before)", |b| {
        b.iter(|| {
            epoch += 1;
            let rec = record(epoch as usize % KEYS, epoch);
            let mut next = (*old).clone();
            next.insert(rec.key.clone(), rec);
            old = std::sync::Arc::new(next);
        })
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20);
    targets = bench
}
criterion_main!(benches);
