//! Abuse limits, as a hostile client meets them, on loopback and bounded in time: slowloris
//! and idle floods are closed by the header-read and idle timeouts while a normal request is
//! answered within a second; a full server evicts idle connections and answers 429 with
//! `Retry-After` when every connection is busy; a router with an open-file limit of 1,024
//! still answers `GET /v2/` with 1,100 idle connections open and logs that it is at its cap;
//! oversized heads get 431 with the OCI body; too many uploads from one client get 429;
//! `--max-blob-bytes` refuses a larger blob with 413.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::cluster_support::{poll, CLUSTER_TIMEOUT};
use crate::support::*;

/// A fresh connection's `GET /v2/`, timed (status, elapsed).
async fn timed_get(base: &str) -> (u16, Duration) {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client");
    let t = Instant::now();
    let s = http
        .get(format!("{base}/v2/"))
        .send()
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0);
    (s, t.elapsed())
}

/// `GET /v2/` on fresh connections during a flood: every answer within a second; a 429
/// (with `Retry-After`) is allowed only while the flood's connections are younger than the
/// server's 100 ms eviction floor (polled, bounded to 3 s); then five in a row must be 200.
/// Returns the slowest 200.
async fn answered_during_flood(base: &str) -> Duration {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let (status, took) = timed_get(base).await;
        assert!(took < Duration::from_secs(1), "GET /v2/ took {took:?}");
        match status {
            200 => break,
            429 if Instant::now() < deadline => continue,
            s => panic!("GET /v2/ during the flood: {s}"),
        }
    }
    let mut worst = Duration::ZERO;
    for _ in 0..5 {
        let (status, took) = timed_get(base).await;
        assert_eq!(status, 200, "GET /v2/ during the flood");
        assert!(took < Duration::from_secs(1), "GET /v2/ took {took:?}");
        worst = worst.max(took);
    }
    worst
}

/// Until the server closes `s` (EOF or error), or `limit`: how long that took.
async fn closed_within(mut s: TcpStream, limit: Duration) -> Option<Duration> {
    let t = Instant::now();
    let mut buf = [0u8; 1024];
    let r = tokio::time::timeout(limit, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    r.ok().map(|_| t.elapsed())
}

/// A slowloris: a request head sent one byte every 200 ms, never finished. Resolves with
/// the time until the server closed it (`None` if it held past `limit`).
async fn slowloris(host: String, limit: Duration) -> Option<Duration> {
    let mut s = TcpStream::connect(&host).await.ok()?;
    let t = Instant::now();
    let head = format!("GET /v2/ HTTP/1.1\r\nHost: {host}\r\nX-Slow: ");
    let _ = s.write_all(head.as_bytes()).await;
    let mut buf = [0u8; 256];
    while t.elapsed() < limit {
        if s.write_all(b"a").await.is_err() {
            return Some(t.elapsed());
        }
        // A read that ends (EOF, error) means the server let go.
        match tokio::time::timeout(Duration::from_millis(200), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Some(t.elapsed()),
            Ok(Ok(_)) | Err(_) => {}
        }
    }
    None
}

/// Open `n` connections that send nothing.
async fn idle_flood(host: &str, n: usize) -> Vec<TcpStream> {
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        v.push(
            TcpStream::connect(host)
                .await
                .unwrap_or_else(|e| panic!("connect {host}: {e}")),
        );
    }
    v
}

#[tokio::test(flavor = "multi_thread")]
async fn node_closes_slowloris_and_idle_floods_and_still_answers_within_a_second() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let node = NodeProc::spawn(
        tmp.path().join("data"),
        free_port(),
        "n1",
        [
            "--header-read-timeout-secs",
            "1",
            "--idle-timeout-secs",
            "2",
            "--max-connections",
            "100",
        ]
        .map(String::from)
        .to_vec(),
    );
    node.wait_ready().await;
    let (base, host) = (node.url(), node.host());

    // 150 slowloris and 150 silent connections: three times the cap.
    let slow: Vec<_> = (0..150)
        .map(|_| tokio::spawn(slowloris(host.clone(), Duration::from_secs(8))))
        .collect();
    let idle = idle_flood(&host, 150).await;

    // While the flood is held, normal requests are answered, each within a second.
    answered_during_flood(&base).await;

    // Every slowloris is let go: by the header read timeout (1 s) or by eviction.
    for (i, h) in slow.into_iter().enumerate() {
        let closed = h.await.expect("slowloris task");
        assert!(
            closed.is_some_and(|d| d < Duration::from_secs(3)),
            "slowloris {i} held for {closed:?}"
        );
    }
    // And every silent connection, by the header read or the idle timeout.
    let closes: Vec<_> = idle
        .into_iter()
        .map(|s| tokio::spawn(closed_within(s, Duration::from_secs(5))))
        .collect();
    for (i, h) in closes.into_iter().enumerate() {
        let c = h.await.expect("idle task");
        assert!(c.is_some(), "idle connection {i} still open after 5 s");
    }
    assert!(metric_sum(&base, "flotilla_connection_timeouts_total").await >= 1.0);
    assert!(metric_sum(&base, "flotilla_connections_rejected_total").await >= 1.0);

    // A kept-alive connection waiting quietly for its next request is under the idle
    // timeout (2 s), not the header read timeout (1 s), which counts from a head's first byte.
    let mut s = TcpStream::connect(&host).await.expect("connect");
    s.write_all(format!("GET /v2/ HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes())
        .await
        .expect("request");
    let mut buf = vec![0u8; 4096];
    let n = s.read(&mut buf).await.expect("response");
    assert!(
        buf[..n].starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&buf[..n])
    );
    let closed = closed_within(s, Duration::from_secs(6)).await;
    assert!(
        closed.is_some_and(|d| d >= Duration::from_millis(1500) && d < Duration::from_secs(4)),
        "kept-alive connection closed after {closed:?}, want the 2 s idle timeout"
    );
}

/// A `PATCH` whose chunked body has started and stays open: a busy connection.
async fn hold_patch(host: &str, location: &str) -> TcpStream {
    let mut s = TcpStream::connect(host).await.expect("connect");
    let head = format!(
        "PATCH {location} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n"
    );
    s.write_all(head.as_bytes())
        .await
        .expect("write patch head");
    s
}

async fn start_upload(oci: &Oci, repo: &str) -> String {
    let r = oci
        .http
        .post(oci.url(&format!("/v2/{repo}/blobs/uploads/")))
        .send()
        .await
        .expect("POST upload");
    assert_eq!(r.status(), 202);
    let loc = r
        .headers()
        .get("location")
        .and_then(|l| l.to_str().ok())
        .expect("Location")
        .to_owned();
    // The path only, as a raw request target.
    match loc.find("/v2/") {
        Some(i) => loc[i..].to_owned(),
        None => loc,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn node_with_every_connection_busy_answers_429_with_retry_after() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let node = NodeProc::spawn(
        tmp.path().join("data"),
        free_port(),
        "n1",
        ["--max-connections", "3"].map(String::from).to_vec(),
    );
    node.wait_ready().await;
    let host = node.host();
    let oci = Oci::new(&node.url());
    // Sessions first: the POSTs' connection must be idle (evictable) before the PATCHes
    // fill the node.
    let mut locs = Vec::new();
    for i in 0..3 {
        locs.push(start_upload(&oci, &format!("busy/r{i}")).await);
    }
    let mut held = Vec::new();
    for loc in &locs {
        held.push(hold_patch(&host, loc).await);
    }
    // Bounded poll: the three PATCHes reach the node's handlers asynchronously.
    let r = poll(
        "a 429 from the full node",
        Duration::from_secs(5),
        || async {
            let r = raw_request(&host, "GET", "/v2/", &[], b"").await;
            (r.status == 429).then_some(r)
        },
    )
    .await;
    assert_eq!(r.header("retry-after"), Some("1"), "{r:?}");
    assert_eq!(error_code_raw(&r), "TOOMANYREQUESTS");
    // Room again once the busy connections end.
    drop(held);
    poll("GET /v2/ served again", Duration::from_secs(5), || async {
        let (s, _) = timed_get(&node.url()).await;
        (s == 200).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn oversized_heads_get_431_with_the_oci_body_and_big_blobs_413() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let node = NodeProc::spawn(
        tmp.path().join("data"),
        free_port(),
        "n1",
        ["--max-blob-bytes", "1000"].map(String::from).to_vec(),
    );
    node.wait_ready().await;
    let host = node.host();

    let big = "x".repeat(70 * 1024);
    let r = raw_request(&host, "GET", "/v2/", &[("X-Big", &big)], b"").await;
    assert_eq!(r.status, 431, "{r:?}");
    assert_eq!(error_code_raw(&r), "SIZE_INVALID");
    let many: Vec<(String, String)> = (0..150).map(|i| (format!("x-h{i}"), "v".into())).collect();
    let many: Vec<(&str, &str)> = many.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let r = raw_request(&host, "GET", "/v2/", &many, b"").await;
    assert_eq!(r.status, 431, "150 headers: {r:?}");
    assert_eq!(error_code_raw(&r), "SIZE_INVALID");

    // --max-blob-bytes: a blob at the limit is taken, one past it refused, chunked or not.
    let oci = node.client();
    let ok = vec![7u8; 1000];
    oci.push_blob("big/ok", &ok).await;
    let too_big = vec![8u8; 1001];
    let loc = start_upload(&oci, "big/no").await;
    let r = raw_request(
        &host,
        "PUT",
        &with_digest(&loc, &sha256(&too_big)),
        &[("Content-Type", "application/octet-stream")],
        &too_big,
    )
    .await;
    assert_eq!(r.status, 413, "{r:?}");
    assert_eq!(error_code_raw(&r), "SIZE_INVALID");
    let loc = start_upload(&oci, "big/no").await;
    let first = raw_request(
        &host,
        "PATCH",
        &loc,
        &[("Content-Type", "application/octet-stream")],
        &too_big[..600],
    )
    .await;
    assert_eq!(first.status, 202, "{first:?}");
    let next = first.header("location").expect("Location").to_owned();
    let next = next
        .find("/v2/")
        .map(|i| next[i..].to_owned())
        .unwrap_or(next);
    let r = raw_request(
        &host,
        "PATCH",
        &next,
        &[("Content-Type", "application/octet-stream")],
        &too_big[600..],
    )
    .await;
    assert_eq!(r.status, 413, "second chunk past the limit: {r:?}");
    assert_eq!(error_code_raw(&r), "SIZE_INVALID");
    // The session is gone with its bytes.
    let r = raw_request(&host, "GET", &next, &[], b"").await;
    assert_eq!(r.status, 404, "{r:?}");
}

/// `flotilla dev` under `sh -c 'ulimit -n LIMIT; exec ...'`, with its stderr in `log`.
fn dev_with_fd_limit(
    port: u16,
    data: &std::path::Path,
    log: &std::path::Path,
    fd_limit: u32,
    extra: &str,
) -> KillOnDrop {
    let cmd = format!(
        "ulimit -n {fd_limit} && exec '{}' dev --listen 127.0.0.1:{port} --data '{}' --nodes 2 --racks r1,r2 {extra}",
        env!("CARGO_BIN_EXE_flotilla"),
        data.display()
    );
    KillOnDrop(
        Command::new("sh")
            .args(["-c", &cmd])
            .env("RUST_LOG", "info")
            // The log goes to stderr.
            .stderr(std::fs::File::create(log).expect("log"))
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn flotilla dev"),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn router_with_1024_fds_answers_with_1100_idle_connections_and_logs_its_cap() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let log = tmp.path().join("dev.log");
    let _dev = dev_with_fd_limit(port, &tmp.path().join("data"), &log, 1024, "");
    let base = format!("http://127.0.0.1:{port}");
    wait_http_ok(&format!("{base}/readyz"), CLUSTER_TIMEOUT).await;
    let host = format!("127.0.0.1:{port}");

    let t = Instant::now();
    let flood = idle_flood(&host, 1100).await;
    let opened = t.elapsed();
    let worst = answered_during_flood(&base).await;
    eprintln!("1100 idle connections opened in {opened:?}; worst GET /v2/ of 5: {worst:?}");
    assert!(worst < Duration::from_secs(1), "GET /v2/ took {worst:?}");
    let text = std::fs::read_to_string(&log).expect("dev log");
    assert!(
        text.contains("at the connection cap"),
        "no cap warning in the log:\n{text}"
    );
    drop(flood);
}

#[tokio::test(flavor = "multi_thread")]
async fn router_caps_concurrent_uploads_per_client_with_429() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let log = tmp.path().join("dev.log");
    let _dev = dev_with_fd_limit(
        port,
        &tmp.path().join("data"),
        &log,
        4096,
        "--max-uploads-per-client 2",
    );
    let base = format!("http://127.0.0.1:{port}");
    wait_http_ok(&format!("{base}/readyz"), CLUSTER_TIMEOUT).await;
    let host = format!("127.0.0.1:{port}");
    let oci = Oci::new(&base);
    // Sessions first (opening one counts as an upload too).
    let mut locs = Vec::new();
    for i in 0..2 {
        locs.push(start_upload(&oci, &format!("team/up{i}")).await);
    }
    let loc = start_upload_raw(&host, "team/up2").await;
    let mut held = Vec::new();
    for l in &locs {
        held.push(hold_patch(&host, l).await);
    }
    // Both held PATCHes are inside the limiter before the third is sent.
    poll("two uploads in flight", Duration::from_secs(5), || async {
        (metric_sum(&base, "flotilla_uploads_in_flight").await == 2.0).then_some(())
    })
    .await;
    let r = poll(
        "a 429 for the third upload",
        Duration::from_secs(5),
        || async {
            let r = raw_request(
                &host,
                "PATCH",
                &loc,
                &[("Content-Type", "application/octet-stream")],
                b"abcd",
            )
            .await;
            (r.status == 429).then_some(r)
        },
    )
    .await;
    assert_eq!(r.header("retry-after"), Some("1"), "{r:?}");
    assert_eq!(error_code_raw(&r), "TOOMANYREQUESTS");
    // Reads are not uploads: still served.
    let (s, took) = timed_get(&base).await;
    assert_eq!(s, 200);
    assert!(took < Duration::from_secs(1));
    // The held clients hang up mid-body: the router must not blame (eject) the nodes, so a
    // new repository can still be placed on a pair.
    drop(held);
    poll(
        "the aborted uploads released",
        Duration::from_secs(5),
        || async { (metric_sum(&base, "flotilla_uploads_in_flight").await == 0.0).then_some(()) },
    )
    .await;
    oci.push_blob("team/after-abort", b"still placeable").await;
    poll("uploads accepted again", Duration::from_secs(5), || async {
        let r = raw_request(
            &host,
            "PATCH",
            &loc,
            &[("Content-Type", "application/octet-stream")],
            b"abcd",
        )
        .await;
        (r.status == 202).then_some(())
    })
    .await;
}

/// `POST /v2/<repo>/blobs/uploads/` over a raw socket; returns the upload path.
async fn start_upload_raw(host: &str, repo: &str) -> String {
    let r = raw_request(
        host,
        "POST",
        &format!("/v2/{repo}/blobs/uploads/"),
        &[],
        b"",
    )
    .await;
    assert_eq!(r.status, 202, "{r:?}");
    let loc = r.header("location").expect("Location").to_owned();
    loc.find("/v2/").map(|i| loc[i..].to_owned()).unwrap_or(loc)
}
