//! The conformance suite against the Consul stand-in (`consul_standin`: Consul's server
//! cannot be installed here; the stand-in follows its documented KV, txn and session
//! semantics).

mod consul_standin;

use std::time::Duration;

use shardmap::testsuite;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consul_standin_passes_the_suite() {
    let addr = consul_standin::start_standin().await;
    let store = shardmap::open(&format!("consul://{addr}").parse().unwrap()).unwrap();
    testsuite::run_all(store.clone(), "flotilla/").await;
    // Consul's minimum session TTL is 10 s, so this takes ~10 s.
    testsuite::lease_expiry(&*store, "flotilla/", Duration::from_secs(10)).await;
}
