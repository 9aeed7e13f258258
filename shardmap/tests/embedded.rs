//! The conformance suite against the embedded file store, including two handles on one
//! directory (as two processes would have).

use std::time::Duration;

use shardmap::testsuite;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_store_passes_the_suite() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().display());
    let store = shardmap::open(&url.parse().unwrap()).unwrap();
    testsuite::run_all(store.clone(), "flotilla/").await;
    testsuite::lease_expiry(&*store, "flotilla/", Duration::from_secs(1)).await;
    // A second handle (another process) sees the same data and keeps versions increasing.
    let other = shardmap::open(&url.parse().unwrap()).unwrap();
    let v1 = store.put("flotilla/x", "1".into()).await.unwrap();
    let v2 = other.put("flotilla/x", "2".into()).await.unwrap();
    assert!(v2 > v1);
    assert_eq!(store.get("flotilla/x").await.unwrap().unwrap().1, v2);
}
