//! Flags are validated before a process does anything: a bad URL is refused with a message
//! naming its flag, and `flotilla node` has not created its data directory by then.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::KillOnDrop;

/// Run `flotilla ARGS`, expect it to fail within a few seconds, return its stderr.
fn refused(args: &[&str]) -> String {
    let mut child = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_flotilla"))
            .args(args)
            .env("RUST_LOG", "info")
            .env_remove("FLOTILLA_SECRET")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn flotilla"),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.0.try_wait().expect("wait") {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "flotilla {args:?} still running after 20 s; it should have refused its flags"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(child.0.stderr.as_mut().expect("stderr"), &mut stderr)
        .expect("read stderr");
    assert!(!status.success(), "flotilla {args:?} succeeded: {stderr}");
    stderr
}

fn assert_names(stderr: &str, flag: &str, url: &str) {
    assert!(
        stderr.contains(&format!("{flag}: ")) && stderr.contains(url),
        "stderr does not name {flag} and {url:?}: {stderr}"
    );
}

#[test]
fn node_refuses_a_bad_store_or_meta_url_before_creating_its_data_dir() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("d");
    let data = data.to_str().expect("utf-8 path");
    let node = [
        "node",
        "--id",
        "n1",
        "--listen",
        "127.0.0.1:0",
        "--data",
        data,
    ];
    let cases = [
        ("--store", "s4://nope", "unsupported scheme \"s4\""),
        ("--store", "s3:///no-bucket", "missing bucket"),
        ("--meta", "zk://x", "unsupported scheme \"zk\""),
        ("--meta", "etcd://host-without-port", "is not HOST:PORT"),
    ];
    for (flag, url, why) in cases {
        let stderr = refused(&[&node[..], &[flag, url]].concat());
        assert_names(&stderr, flag, url);
        assert!(stderr.contains(why), "{flag} {url}: {stderr}");
        assert!(
            !tmp.path().join("d").exists(),
            "{flag} {url}: the data directory was created before the flag was checked"
        );
    }
    // A good --meta does not excuse a bad --store (both are checked up front).
    let meta = format!("file://{}", tmp.path().join("meta").display());
    let stderr = refused(&[&node[..], &["--meta", &meta, "--store", "s4://nope"]].concat());
    assert_names(&stderr, "--store", "s4://nope");
    assert!(!tmp.path().join("d").exists() && !tmp.path().join("meta").exists());
}

#[test]
fn router_and_seeder_refuse_a_bad_meta_or_store_url() {
    let stderr = refused(&["router", "--listen", "127.0.0.1:0", "--meta", "zk://x"]);
    assert_names(&stderr, "--meta", "zk://x");
    let stderr = refused(&["seeder", "--meta", "zk://x", "--store", "memory://"]);
    assert_names(&stderr, "--meta", "zk://x");
    let tmp = tempfile::tempdir().expect("tempdir");
    let meta = format!("file://{}", tmp.path().join("meta").display());
    let stderr = refused(&["seeder", "--meta", &meta, "--store", "s4://nope"]);
    assert_names(&stderr, "--store", "s4://nope");
    assert!(
        !tmp.path().join("meta").exists(),
        "the seeder opened its metadata store before checking --store"
    );
}

/// Every component that talks to the others needs the cluster's secret: a node with `--meta`,
/// any router, any seeder. Without it they refuse to start, naming the flag and the variable
/// (a node without one used to disable its internal API silently, and a wiped node then sat
/// in `seeding` forever while the seeder retried 401s). A node without `--meta` needs none.
#[test]
fn cluster_components_refuse_to_start_without_the_secret() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let meta = format!("file://{}", tmp.path().join("meta").display());
    let data = tmp.path().join("d");
    let data = data.to_str().expect("utf-8 path");
    let node = [
        "node",
        "--id",
        "n1",
        "--listen",
        "127.0.0.1:0",
        "--data",
        data,
        "--meta",
        &meta,
    ];
    let router = ["router", "--listen", "127.0.0.1:0", "--meta", &meta];
    let seeder = ["seeder", "--meta", &meta, "--store", "memory://"];
    for args in [&node[..], &router[..], &seeder[..]] {
        let stderr = refused(args);
        assert!(
            stderr.contains("--secret") && stderr.contains("FLOTILLA_SECRET"),
            "{args:?}: {stderr}"
        );
    }
    assert!(
        !tmp.path().join("d").exists() && !tmp.path().join("meta").exists(),
        "something was created before the secret was checked"
    );
    // An empty secret is no secret.
    let stderr = refused(&[&router[..], &["--secret", ""]].concat());
    assert!(stderr.contains("--secret"), "{stderr}");
}

#[test]
fn listener_flags_are_checked_before_start() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("d");
    let data = data.to_str().expect("utf-8 path");
    let node = [
        "node",
        "--id",
        "n1",
        "--listen",
        "127.0.0.1:0",
        "--data",
        data,
    ];
    for (extra, needle) in [
        (&["--tls-cert", "/x.pem"][..], "--tls-key"),
        (
            &["--max-connections", "0"][..],
            "--max-connections: must be at least 1",
        ),
        (
            &["--max-header-bytes", "10"][..],
            "--max-header-bytes: must be between",
        ),
        (
            &["--header-read-timeout-secs", "0"][..],
            "--header-read-timeout-secs: must be at least 1",
        ),
        (
            &["--max-blob-bytes", "0"][..],
            "--max-blob-bytes: must be at least 1",
        ),
    ] {
        let stderr = refused(&[&node[..], extra].concat());
        assert!(stderr.contains(needle), "{extra:?}: {stderr}");
    }
    assert!(
        !tmp.path().join("d").exists(),
        "data dir created before the flags were checked"
    );
    // A TLS file that cannot be read stops the start with the file's name.
    let stderr = refused(
        &[
            &node[..],
            &[
                "--tls-cert",
                "/nonexistent/c.pem",
                "--tls-key",
                "/nonexistent/k.pem",
            ],
        ]
        .concat(),
    );
    assert!(stderr.contains("/nonexistent/c.pem"), "{stderr}");
    assert!(
        !tmp.path().join("d").exists(),
        "data dir created before the TLS files were read"
    );
    let stderr = refused(&[
        "router",
        "--listen",
        "127.0.0.1:0",
        "--meta",
        "etcds://127.0.0.1:1?pin=x",
        "--secret",
        "s",
    ]);
    assert!(
        stderr.contains("--meta: ") && stderr.contains("unknown option"),
        "{stderr}"
    );
}

#[test]
fn a_webhook_needs_an_events_dir_and_a_real_url() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let meta = format!("file://{}", tmp.path().join("meta").display());
    let router = [
        "router",
        "--listen",
        "127.0.0.1:0",
        "--meta",
        &meta,
        "--secret",
        "s",
    ];
    let e = refused(&[&router[..], &["--webhook", "http://127.0.0.1:1/hook"]].concat());
    assert!(e.contains("--webhook/--events need --events-dir"), "{e}");
    let dir = tmp.path().join("events");
    let dir = dir.to_str().expect("utf-8 path");
    let e = refused(
        &[
            &router[..],
            &["--webhook", "ftp://x/hook", "--events-dir", dir],
        ]
        .concat(),
    );
    assert!(e.contains("--webhook") && e.contains("ftp://x/hook"), "{e}");
    let data = tmp.path().join("dev");
    let e = refused(&[
        "dev",
        "--listen",
        "127.0.0.1:0",
        "--data",
        data.to_str().expect("utf-8 path"),
        "--webhook",
        "not a url",
    ]);
    assert!(e.contains("--webhook") && e.contains("not a url"), "{e}");
    let file = tmp.path().join("events.toml");
    std::fs::write(
        &file,
        "[[sinks]]\nname = \"a\"\nurl = \"http://x/\"\nactions = [\"pull\"]\n",
    )
    .expect("events file");
    let e = refused(
        &[
            &router[..],
            &[
                "--events",
                file.to_str().expect("utf-8"),
                "--events-dir",
                dir,
            ],
        ]
        .concat(),
    );
    assert!(
        e.contains("--events") && e.contains("unknown action \"pull\""),
        "{e}"
    );
}
