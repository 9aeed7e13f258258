//! Placement benchmarks: 100,000 keys over 100 nodes in 10 racks, then planning the addition
//! and the loss of one node. Prints moves against the ideal (add: total replicas / new node
//! count; remove: the replicas the lost node held).

use std::time::Instant;

use criterion::{criterion_group, criterion_main, Criterion};
use flotilla_core::ShardKey;
use shardmap::{place, plan_add_node, plan_remove_node, Loads, NodeInfo, NodeState, ShardRecord};

const KEYS: usize = 100_000;

fn nodes(n: usize) -> Vec<NodeInfo> {
    (0..n)
        .map(|i| NodeInfo {
            id: format!("n{i}").parse().unwrap(),
            rack: format!("r{}", i % 10).parse().unwrap(),
            state: NodeState::Ready,
            weight: 1,
        })
        .collect()
}

fn place_all(nodes: &[NodeInfo]) -> Vec<ShardRecord> {
    let mut loads = Loads::default();
    (0..KEYS)
        .map(|i| {
            let key: ShardKey = format!("svc{i}/mode").parse().unwrap();
            let p = place(&key, 2, nodes, &loads).unwrap();
            loads.add(&p.replicas);
            ShardRecord {
                key,
                replicas: p.replicas,
                joining: vec![],
                lagging: Vec::new(),
                syncing: Vec::new(),
                epoch: 1,
                pinned: false,
                rack_relaxed: p.rack_relaxed,
                created_ms: 0,
            }
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let base = nodes(100);
    let t = Instant::now();
    let shards = place_all(&base);
    let loads = Loads::from_shards(&shards);
    let counts: Vec<u64> = base.iter().map(|n| loads.node(&n.id)).collect();
    println!(
        "placed {KEYS} keys on 100 nodes/10 racks in {:?}; load min {} max {}",
        t.elapsed(),
        counts.iter().min().unwrap_or(&0),
        counts.iter().max().unwrap_or(&0)
    );
    let mut per_set: std::collections::HashMap<Vec<&str>, u64> = Default::default();
    for s in &shards {
        let mut set: Vec<&str> = s.replicas.iter().map(|r| r.as_str()).collect();
        set.sort_unstable();
        *per_set.entry(set).or_default() += 1;
    }
    println!(
        "replica sets: {} distinct, keys per set min {} max {}",
        per_set.len(),
        per_set.values().min().unwrap_or(&0),
        per_set.values().max().unwrap_or(&0)
    );
    let mut grown = base.clone();
    grown.push(NodeInfo {
        id: "new".parse().unwrap(),
        rack: "r3".parse().unwrap(),
        state: NodeState::Ready,
        weight: 1,
    });
    let add = plan_add_node(&grown[100].id, &grown, &shards);
    println!(
        "add one node: {} moves, ideal {}",
        add.len(),
        KEYS * 2 / 101
    );
    let gone = base[7].id.clone();
    let alive: Vec<NodeInfo> = base.iter().filter(|n| n.id != gone).cloned().collect();
    let remove = plan_remove_node(&gone, &alive, &shards);
    println!(
        "lose one node: {} moves, ideal {}",
        remove.len(),
        loads.node(&gone)
    );

    let mut g = c.benchmark_group("placement");
    g.sample_size(10);
    g.bench_function("place_100k_keys_100_nodes", |b| b.iter(|| place_all(&base)));
    g.bench_function("plan_add_node", |b| {
        b.iter(|| plan_add_node(&grown[100].id, &grown, &shards))
    });
    g.bench_function("plan_remove_node", |b| {
        b.iter(|| plan_remove_node(&gone, &alive, &shards))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
