//! Micro-benchmarks of the node's hot paths: hashing a stream chunk by chunk (every pushed
//! and read-through byte), parsing a manifest (every manifest push) and parsing a request
//! path into a typed route (every request).

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use flotilla_core::{Algorithm, DigestHasher};
use registry_client::OciRoute;

fn digest_streaming(c: &mut Criterion) {
    let chunk = vec![0x5au8; 256 * 1024];
    let mut g = c.benchmark_group("digest");
    g.throughput(Throughput::Bytes(64 * chunk.len() as u64));
    for alg in [Algorithm::Sha256, Algorithm::Sha512] {
        g.bench_function(format!("{alg} 16 MiB in 256 KiB chunks"), |b| {
            b.iter(|| {
                let mut h = DigestHasher::new(alg);
                for _ in 0..64 {
                    h.update(&chunk);
                }
                h.finish()
            })
        });
    }
    g.finish();
}

fn manifest_parsing(c: &mut Criterion) {
    let d = |n: u8| format!("sha256:{}", format!("{n:02x}").repeat(32));
    let layers: Vec<String> = (0..12)
        .map(|i| format!(r#"{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{}","size":{}}}"#, d(i), 1000 + i as u32))
        .collect();
    let body = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{}","size":1234}},"layers":[{}],"annotations":{{"org.opencontainers.image.created":"2026-11-26T00:00:00Z"}}}}"#,
        d(99),
        layers.join(",")
    );
    let mut g = c.benchmark_group("manifest");
    g.throughput(Throughput::Bytes(body.len() as u64));
    g.bench_function("parse OCI image manifest, 12 layers", |b| {
        b.iter(|| {
            registry_node::manifest::parse(
                body.as_bytes(),
                Some("application/vnd.oci.image.manifest.v1+json"),
            )
            .map(|m| m.blobs.len())
        })
    });
    g.finish();
}

fn route_parsing(c: &mut Criterion) {
    let path = format!("/v2/billing/api/worker/blobs/sha256:{}", "ab".repeat(32));
    c.bench_function("route parse blob path", |b| {
        b.iter(|| OciRoute::parse(&path).is_ok())
    });
}

criterion_group!(benches, digest_streaming, manifest_parsing, route_parsing);
criterion_main!(benches);
