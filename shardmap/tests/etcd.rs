//! The conformance suite against a real etcd (Debian package `etcd-server`), single member
//! and a three-member loopback cluster whose leader is killed mid-test.
//!
//! No silent skip: without an `etcd` binary these tests fail unless `FLOTILLA_SKIP_ETCD=1` is
//! set explicitly (and `FLOTILLA_REQUIRE_ETCD=1` makes them fail even then).

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures::StreamExt;
use shardmap::{testsuite, MetaStore, WatchEvent};

/// Find the etcd binary, or decide (loudly) that the test must not run.
fn etcd_binary() -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("etcd"))
            .find(|p| p.is_file())
    });
    let require = std::env::var("FLOTILLA_REQUIRE_ETCD").as_deref() == Ok("1");
    let skip = std::env::var("FLOTILLA_SKIP_ETCD").as_deref() == Ok("1");
    match found {
        Some(p) => Some(p),
        None if require => panic!("FLOTILLA_REQUIRE_ETCD=1 but no etcd binary on PATH (apt-get install etcd-server)"),
        None if skip => {
            eprintln!("!!! etcd tests SKIPPED because FLOTILLA_SKIP_ETCD=1 !!!");
            None
        }
        None => panic!("no etcd binary on PATH: install etcd-server, or set FLOTILLA_SKIP_ETCD=1 to skip explicitly"),
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running etcd member; killed on drop.
struct Member {
    name: String,
    client: u16,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Drop for Member {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_cluster(bin: &PathBuf, n: usize) -> Vec<Member> {
    let ports: Vec<(u16, u16)> = (0..n).map(|_| (free_port(), free_port())).collect();
    let initial = ports
        .iter()
        .enumerate()
        .map(|(i, (_, peer))| format!("m{i}=http://127.0.0.1:{peer}"))
        .collect::<Vec<_>>()
        .join(",");
    let members: Vec<Member> = ports
        .iter()
        .enumerate()
        .map(|(i, (client, peer))| {
            let dir = tempfile::tempdir().unwrap();
            let child = Command::new(bin)
                .args(["--name", &format!("m{i}")])
                .arg("--data-dir")
                .arg(dir.path())
                .args([
                    "--listen-client-urls",
                    &format!("http://127.0.0.1:{client}"),
                ])
                .args([
                    "--advertise-client-urls",
                    &format!("http://127.0.0.1:{client}"),
                ])
                .args(["--listen-peer-urls", &format!("http://127.0.0.1:{peer}")])
                .args([
                    "--initial-advertise-peer-urls",
                    &format!("http://127.0.0.1:{peer}"),
                ])
                .args(["--initial-cluster", &initial])
                .args([
                    "--initial-cluster-state",
                    "new",
                    "--initial-cluster-token",
                    "flotilla-test",
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn etcd");
            Member {
                name: format!("m{i}"),
                client: *client,
                child,
                _dir: dir,
            }
        })
        .collect();
    members
}

/// Poll `/health` on every member until all report healthy, for at most 90 s.
async fn wait_ready(members: &[Member]) {
    let http = reqwest::Client::new();
    // Generous: CI shares two cores between this cluster and the rest of the test suite.
    let deadline = Instant::now() + Duration::from_secs(90);
    for m in members {
        loop {
            let url = format!("http://127.0.0.1:{}/health", m.client);
            let ok = match http.get(&url).timeout(Duration::from_secs(2)).send().await {
                Ok(r) => r.text().await.unwrap_or_default().contains("\"true\""),
                Err(_) => false,
            };
            if ok {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "etcd member {} not healthy within 90s",
                m.name
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn url(members: &[Member]) -> String {
    let addrs: Vec<String> = members
        .iter()
        .map(|m| format!("127.0.0.1:{}", m.client))
        .collect();
    format!("etcd://{}", addrs.join(","))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_single_member_passes_the_suite() {
    let Some(bin) = etcd_binary() else { return };
    let members = start_cluster(&bin, 1);
    wait_ready(&members).await;
    let store = shardmap::open(&url(&members).parse().unwrap()).unwrap();
    testsuite::run_all(store.clone(), "flotilla/").await;
    testsuite::lease_expiry(&*store, "flotilla/", Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_cluster_survives_leader_loss() {
    let Some(bin) = etcd_binary() else { return };
    let mut members = start_cluster(&bin, 3);
    wait_ready(&members).await;
    // Put the leader first in the endpoint list so the client is talking to it when it dies.
    let leader = leader_index(&members).await;
    members.swap(0, leader);
    let store = shardmap::open(&url(&members).parse().unwrap()).unwrap();
    let s: &dyn MetaStore = &*store;

    let v1 = s.put("flotilla/k", "1".into()).await.unwrap();
    let mut w = s.watch("flotilla/", Some(v1)).await.unwrap();
    let lease = s.lease(Duration::from_secs(30)).await.unwrap();
    assert!(s.try_lock("flotilla/locks/seeder", &lease).await.unwrap());

    let dead = members.remove(0);
    drop(dead); // kill the leader

    let v2 = s
        .cas("flotilla/k", Some(v1), "2".into())
        .await
        .unwrap()
        .expect("cas after failover");
    assert_eq!(
        s.get("flotilla/k").await.unwrap().unwrap(),
        ("2".into(), v2)
    );
    let v3 = s.put("flotilla/k2", "3".into()).await.unwrap();
    assert!(s
        .cas("flotilla/k", Some(v1), "x".into())
        .await
        .unwrap()
        .is_err());
    // The watch reconnects to a survivor and carries on from where it was.
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let ev = tokio::time::timeout(Duration::from_secs(30), w.next())
            .await
            .expect("watch event after failover")
            .expect("stream open")
            .expect("no watch error");
        match ev {
            WatchEvent::Put { key, version, .. } if !key.contains("locks/") => {
                seen.push((key, version))
            }
            _ => {}
        }
    }
    assert_eq!(
        seen,
        [
            ("flotilla/k".to_owned(), v2),
            ("flotilla/k2".to_owned(), v3)
        ]
    );
    // The lock and its lease survived the election.
    s.keepalive(&lease).await.unwrap();
    let other = s.lease(Duration::from_secs(30)).await.unwrap();
    assert!(!s.try_lock("flotilla/locks/seeder", &other).await.unwrap());
    assert!(s.try_lock("flotilla/locks/seeder", &lease).await.unwrap());
    // And the whole suite still passes on the two survivors.
    testsuite::run_all(store.clone(), "after/").await;
}

async fn leader_index(members: &[Member]) -> usize {
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        for (i, m) in members.iter().enumerate() {
            let url = format!("http://127.0.0.1:{}/v3/maintenance/status", m.client);
            if let Ok(r) = http.post(&url).body("{}").send().await {
                if let Ok(v) = r.json::<serde_json::Value>().await {
                    let me = &v["header"]["member_id"];
                    if !me.is_null() && *me == v["leader"] {
                        return i;
                    }
                }
            }
        }
        assert!(Instant::now() < deadline, "no etcd leader within 30s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
