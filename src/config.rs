//! The high-level configuration: the `cli` arguments validated once into the typed configs
//! the crates take. Nothing here touches the disk or the network, so a bad flag fails before
//! a process creates its data directory, and every error starts with the flag it is about.
//! `flotilla dev` builds its configs here too, from the same URL types and defaults.

use std::fmt::Display;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use flotilla_core::{NodeId, RackId};
use flotilla_objstore::StoreUrl;
use metrics_exporter_prometheus::PrometheusHandle;
use registry_node::NodeConfig;
use registry_router::RouterConfig;
use s3_seeder::SeederConfig;
use shardmap::MetaUrl;

use crate::cli::{
    AuthArgs, Cli, Cmd, DevArgs, EventsArgs, ListenArgs, NodeArgs, Redirect, RouterArgs, SeederArgs,
};
use flotilla_serve::{ServeConfig, TlsFiles};

/// A subcommand with everything it needs, ready to run.
#[derive(Debug)]
pub(crate) enum Run {
    Dev(Box<DevConfig>),
    Node {
        listen: SocketAddr,
        cfg: NodeConfig,
    },
    Router {
        listen: SocketAddr,
        cfg: RouterConfig,
    },
    Seeder {
        /// Where `/metrics` and `/healthz` are served, if anywhere.
        metrics_listen: Option<SocketAddr>,
        cfg: SeederConfig,
    },
    AgentPull(deploy_agent::PullConfig),
}

/// `flotilla dev`: the configs of every component it runs in one process.
#[derive(Debug)]
pub(crate) struct DevConfig {
    pub listen: SocketAddr,
    /// Absolute, so the file:// URLs below stay valid whatever the process's directory.
    pub data: PathBuf,
    /// The embedded metadata store every component shares (`flotilla dev` waits on it for
    /// the nodes to be ready before it opens the router).
    pub meta: MetaUrl,
    pub nodes: Vec<NodeConfig>,
    pub seeder: SeederConfig,
    pub router: RouterConfig,
}

/// Validate the whole command line. `metrics` is the process's one recorder, which every
/// component renders on `/metrics`.
pub(crate) fn validate(cli: &Cli, metrics: &PrometheusHandle) -> anyhow::Result<Run> {
    Ok(match &cli.cmd {
        Cmd::Dev(a) => Run::Dev(Box::new(dev(a, metrics)?)),
        Cmd::Node(a) => Run::Node {
            listen: a.listen,
            cfg: node(a, metrics)?,
        },
        Cmd::Router(a) => Run::Router {
            listen: a.listen,
            cfg: router(a, metrics)?,
        },
        Cmd::Seeder(a) => Run::Seeder {
            metrics_listen: a.metrics_listen,
            cfg: seeder(a)?,
        },
        Cmd::Agent(a) => match &a.cmd {
            crate::cli::AgentCmd::Pull(p) => Run::AgentPull(agent_pull(p)?),
        },
    })
}

fn router_urls(urls: &[String]) -> anyhow::Result<Vec<String>> {
    for u in urls {
        let rest = u
            .strip_prefix("http://")
            .or_else(|| u.strip_prefix("https://"))
            .ok_or_else(|| anyhow::anyhow!("--router: {u:?} is not an http:// or https:// URL"))?;
        if rest.trim_end_matches('/').is_empty() || rest.trim_end_matches('/').contains('/') {
            anyhow::bail!("--router: {u:?} must be a base URL (scheme, host and port)");
        }
    }
    Ok(urls.to_vec())
}

fn agent_pull(a: &crate::cli::AgentPullArgs) -> anyhow::Result<deploy_agent::PullConfig> {
    let credentials = match (&a.user, &a.password_file, &a.token) {
        (Some(user), Some(file), _) => {
            let text = std::fs::read_to_string(file)
                .map_err(|e| anyhow::anyhow!("--password-file: {}: {e}", file.display()))?;
            deploy_agent::Credentials::Basic {
                user: user.clone(),
                password: text.lines().next().unwrap_or_default().to_owned(),
            }
        }
        (_, _, Some(t)) => deploy_agent::Credentials::Bearer(t.clone()),
        _ => deploy_agent::Credentials::None,
    };
    Ok(deploy_agent::PullConfig {
        routers: router_urls(&a.router)?,
        image: a
            .image
            .parse()
            .map_err(|e| anyhow::anyhow!("IMAGE {:?}: {e}", a.image))?,
        docker_socket: a.docker_socket.clone(),
        credentials,
        work_dir: a.work_dir.clone(),
    })
}

/// Prefix an error with the flag it is about, in the one form every flag error takes.
fn flag<E: Display>(name: &'static str) -> impl FnOnce(E) -> anyhow::Error {
    move |e| anyhow::anyhow!("{name}: {e}")
}

fn meta_url(s: &str) -> anyhow::Result<MetaUrl> {
    s.parse().map_err(flag("--meta"))
}

fn store_url(s: &str) -> anyhow::Result<StoreUrl> {
    s.parse().map_err(flag("--store"))
}

fn secs(name: &'static str, secs: u64, min: u64) -> anyhow::Result<Duration> {
    anyhow::ensure!(secs >= min, "{name}: must be at least {min}");
    Ok(Duration::from_secs(secs))
}

/// Routers and peers dial this URL; a bare `HOST:PORT` would register a node nobody can
/// reach, so it is refused here rather than noticed as failing requests.
fn advertise(s: &str) -> anyhow::Result<String> {
    let host = s
        .strip_prefix("http://")
        .or_else(|| s.strip_prefix("https://"))
        .filter(|rest| !rest.is_empty() && !rest.starts_with('/'));
    anyhow::ensure!(
        host.is_some(),
        "--advertise: {s:?} is not an http:// or https:// URL"
    );
    Ok(s.to_owned())
}

/// The cluster's shared secret, required wherever components talk to each other (a node
/// in a cluster, every router and seeder): without it a node silently refused the seeder
/// and a wiped node never came back, so refuse to start instead, naming the flag.
fn cluster_secret(secret: &Option<String>, role: &str) -> anyhow::Result<String> {
    match secret {
        Some(s) if !s.is_empty() => Ok(s.clone()),
        _ => anyhow::bail!(
            "--secret (or FLOTILLA_SECRET): required for a {role}: routers, seeders and nodes \
             authenticate the node-internal API with it; give every component the same value"
        ),
    }
}

/// The TLS files, both or neither (clap enforces the pair; this keeps the type honest).
fn tls_files(cert: &Option<PathBuf>, key: &Option<PathBuf>) -> anyhow::Result<Option<TlsFiles>> {
    match (cert, key) {
        (Some(cert), Some(key)) => Ok(Some(TlsFiles {
            cert: cert.clone(),
            key: key.clone(),
        })),
        (None, None) => Ok(None),
        _ => anyhow::bail!("--tls-cert and --tls-key: give both or neither"),
    }
}

fn serve(role: &'static str, a: &ListenArgs) -> anyhow::Result<ServeConfig> {
    if let Some(n) = a.max_connections {
        anyhow::ensure!(n >= 1, "--max-connections: must be at least 1");
    }
    // Below 1 KiB no real client's head fits; above 192 KiB hyper's own bound (256 KiB)
    // would answer first, without the JSON body.
    anyhow::ensure!(
        (1024..=192 * 1024).contains(&a.max_header_bytes),
        "--max-header-bytes: must be between 1024 and 196608"
    );
    Ok(ServeConfig {
        tls: tls_files(&a.tls_cert, &a.tls_key)?,
        max_connections: a.max_connections,
        header_read_timeout: secs("--header-read-timeout-secs", a.header_read_timeout_secs, 1)?,
        idle_timeout: secs("--idle-timeout-secs", a.idle_timeout_secs, 1)?,
        max_header_bytes: a.max_header_bytes,
        ..ServeConfig::new(role)
    })
}

fn uploads_per_client(n: usize) -> anyhow::Result<usize> {
    anyhow::ensure!(n >= 1, "--max-uploads-per-client: must be at least 1");
    Ok(n)
}

fn max_blob_bytes(v: Option<u64>) -> anyhow::Result<Option<u64>> {
    if let Some(n) = v {
        anyhow::ensure!(n >= 1, "--max-blob-bytes: must be at least 1");
    }
    Ok(v)
}

fn node(a: &NodeArgs, metrics: &PrometheusHandle) -> anyhow::Result<NodeConfig> {
    // Zero would make the purge interval zero, which the purge timer cannot run at.
    let upload_max_age = secs("--upload-max-age-secs", a.upload_max_age_secs, 1)?;
    let meta_url = a.meta.as_deref().map(meta_url).transpose()?;
    let store_url = a.store.as_deref().map(store_url).transpose()?;
    let secret = match meta_url {
        Some(_) => Some(cluster_secret(&a.secret, "node with --meta")?),
        None => a.secret.clone(),
    };
    Ok(NodeConfig {
        store_url,
        meta_url,
        advertise: a.advertise.as_deref().map(advertise).transpose()?,
        secret,
        metrics: Some(metrics.clone()),
        upload_max_age,
        upload_purge_interval: upload_max_age.min(Duration::from_secs(60)),
        drain_timeout: secs("--drain-secs", a.drain_secs, 0)?,
        scrub_bytes_per_sec: a.scrub_bytes_per_sec,
        scrub_interval: secs("--scrub-interval-secs", a.scrub_interval_secs, 0)?,
        scrub_remote_every: a.scrub_remote_check_every.max(1),
        catch_up_interval: secs("--catch-up-secs", a.catch_up_secs, 1)?,
        gc_interval: secs("--gc-interval-secs", a.gc_interval_secs, 0)?,
        gc_grace: secs("--gc-grace-secs", a.gc_grace_secs, 0)?,
        quarantine_retention: secs(
            "--quarantine-retention-secs",
            a.quarantine_retention_secs,
            0,
        )?,
        quarantine_max_bytes: a.quarantine_max_bytes,
        min_free_bytes: a.min_free_bytes,
        remote_confirm_ttl: secs("--remote-confirm-secs", a.remote_confirm_secs, 0)?,
        serve: serve("node", &a.listen_opts)?,
        max_blob_bytes: max_blob_bytes(a.max_blob_bytes)?,
        ..NodeConfig::new(a.id.clone(), a.rack.clone(), a.data.clone())
    })
}

fn router(a: &RouterArgs, metrics: &PrometheusHandle) -> anyhow::Result<RouterConfig> {
    anyhow::ensure!(a.replicas >= 1, "--replicas: must be at least 1");
    let manifest_cache_bytes = a
        .manifest_cache_mib
        .checked_mul(1024 * 1024)
        .context("--manifest-cache-mib: too large")?;
    let meta = meta_url(&a.meta)?;
    Ok(RouterConfig {
        replication_factor: a.replicas,
        secret: Some(cluster_secret(&a.secret, "router")?),
        manifest_cache_bytes,
        manifest_cache_ttl: secs("--manifest-cache-ttl-secs", a.manifest_cache_ttl_secs, 0)?,
        blob_redirect: a.blob_redirect,
        drain_timeout: secs("--drain-secs", a.drain_secs, 0)?,
        metrics: Some(metrics.clone()),
        serve: serve("router", &a.listen_opts)?,
        tls_ca: a.tls_ca.clone(),
        max_uploads_per_client: uploads_per_client(a.max_uploads_per_client)?,
        auth: auth(&a.auth)?,
        events: events(&a.events, a.events_dir.as_deref())?,
        ..RouterConfig::new(meta)
    })
}

fn events(
    a: &EventsArgs,
    dir: Option<&std::path::Path>,
) -> anyhow::Result<Option<flotilla_events::OutboxConfig>> {
    if a.webhooks.is_empty() && a.events_file.is_none() {
        return Ok(None);
    }
    let dir = dir.context(
        "--webhook/--events need --events-dir: events are journaled on local disk before the client's 201",
    )?;
    anyhow::ensure!(
        a.webhook_timeout_secs > 0,
        "--webhook-timeout-secs: must be positive"
    );
    let sinks = a
        .webhooks
        .iter()
        .enumerate()
        .map(|(i, url)| {
            flotilla_events::SinkConfig::webhook(
                &format!("webhook-{}", i + 1),
                url,
                Duration::from_secs(a.webhook_timeout_secs),
            )
        })
        .collect::<Vec<_>>();
    let mut sinks = sinks;
    if let Some(f) = &a.events_file {
        let text =
            std::fs::read_to_string(f).with_context(|| format!("--events {}", f.display()))?;
        let more = flotilla_events::parse_sinks(&text)
            .map_err(|m| anyhow::anyhow!("--events {}: {m}", f.display()))?;
        for m in &more {
            anyhow::ensure!(
                !sinks.iter().any(|s| s.name == m.name),
                "--events {}: sink {:?} clashes with a --webhook's name",
                f.display(),
                m.name
            );
        }
        sinks.extend(more);
    }
    // The URLs are checked now, so a typo stops the start rather than the first delivery.
    for s in &sinks {
        flotilla_events::check_url(&s.url).map_err(|m| anyhow::anyhow!("--webhook: {m}"))?;
    }
    Ok(Some(flotilla_events::OutboxConfig {
        dir: std::path::absolute(dir).map_err(flag("--events-dir"))?,
        sinks,
    }))
}

fn auth(a: &AuthArgs) -> anyhow::Result<flotilla_auth::AuthConfig> {
    if let Some(realm) = &a.token_realm {
        anyhow::ensure!(
            realm.starts_with("http://") || realm.starts_with("https://"),
            "--token-realm: {realm:?} is not an http(s) URL"
        );
    }
    anyhow::ensure!(a.token_ttl_secs > 0, "--token-ttl-secs: must be positive");
    anyhow::ensure!(
        !a.admin.iter().any(|u| u.trim().is_empty()),
        "--admin: empty user name"
    );
    let cfg = flotilla_auth::AuthConfig {
        htpasswd: a.htpasswd.clone(),
        access: a.access.clone(),
        admins: a.admin.clone(),
        token_key: a.token_key.clone(),
        token_realm: a.token_realm.clone(),
        token_issuer: a.token_issuer.clone(),
        token_service: a.token_service.clone(),
        token_jwks: a.token_jwks.clone(),
        token_cert: a.token_cert.clone(),
        token_ttl: Duration::from_secs(a.token_ttl_secs),
    };
    anyhow::ensure!(
        cfg.enabled() || (a.access.is_none() && a.admin.is_empty()),
        "--access/--admin: need a way to authenticate users (--htpasswd, --token-key or --token-realm)"
    );
    // Read every file now, so a bad htpasswd line, policy or key stops the start before any
    // component runs (the router loads them again; this copy is dropped).
    if cfg.enabled() {
        flotilla_auth::Auth::load(cfg.clone()).context("authentication")?;
    }
    Ok(cfg)
}

fn seeder(a: &SeederArgs) -> anyhow::Result<SeederConfig> {
    let defaults = SeederConfig::new(meta_url(&a.meta)?, store_url(&a.store)?);
    let id = match &a.id {
        Some(id) if id.trim().is_empty() => anyhow::bail!("--id: must not be empty"),
        Some(id) => id.clone(),
        None => defaults.id.clone(),
    };
    Ok(SeederConfig {
        id,
        secret: Some(cluster_secret(&a.secret, "seeder")?),
        replace_after: secs("--replace-after-secs", a.replace_after_secs, 0)?,
        seed_concurrency: a.seed_concurrency,
        seed_bytes_per_sec: a.seed_bytes_per_sec,
        max_moves: a.max_moves,
        rebalance_interval: secs("--rebalance-interval-secs", a.rebalance_interval_secs, 0)?,
        tls_ca: a.tls_ca.clone(),
        ..defaults
    })
}

fn dev(a: &DevArgs, metrics: &PrometheusHandle) -> anyhow::Result<DevConfig> {
    anyhow::ensure!(a.nodes >= 1, "--nodes: must be at least 1");
    let data = std::path::absolute(&a.data).map_err(flag("--data"))?;
    let meta = MetaUrl::file(data.join("meta")).map_err(flag("--data"))?;
    let store = StoreUrl::file(&data.join("objects")).map_err(flag("--data"))?;
    // One process: a fresh random secret per run guards the node-internal API.
    let secret = std::env::var("FLOTILLA_SECRET")
        .unwrap_or_else(|_| uuid::Uuid::new_v4().simple().to_string());
    let default_rack: RackId = "r1".parse().expect("valid rack");
    let router_serve = serve("router", &a.listen_opts)?;
    let tls = router_serve.tls.clone();
    // The internal clients trust --tls-ca, or else the serving certificate itself.
    let tls_ca = a
        .tls_ca
        .clone()
        .or_else(|| tls.as_ref().map(|t| t.cert.clone()));
    let max_blob = max_blob_bytes(a.max_blob_bytes)?;
    let nodes = (0..a.nodes)
        .map(|i| {
            let id: NodeId = format!("n{}", i + 1).parse()?;
            // Nodes past the end of --racks join the last rack listed.
            let rack = a
                .racks
                .get(i)
                .or(a.racks.last())
                .unwrap_or(&default_rack)
                .clone();
            let dir = data.join(id.as_str());
            Ok(NodeConfig {
                store_url: Some(store.clone()),
                meta_url: Some(meta.clone()),
                metrics: Some(metrics.clone()),
                secret: Some(secret.clone()),
                serve: ServeConfig {
                    tls: tls.clone(),
                    ..ServeConfig::new("node")
                },
                max_blob_bytes: max_blob,
                ..NodeConfig::new(id, rack, dir)
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let seeder = SeederConfig {
        id: "dev-seeder".to_owned(),
        secret: Some(secret.clone()),
        tls_ca: tls_ca.clone(),
        ..SeederConfig::new(meta.clone(), store)
    };
    let router = RouterConfig {
        metrics: Some(metrics.clone()),
        secret: Some(secret),
        blob_redirect: match a.blob_redirect {
            Redirect::Auto => a.listen.ip().is_loopback(),
            Redirect::Always => true,
            Redirect::Never => false,
        },
        serve: router_serve,
        tls_ca,
        max_uploads_per_client: uploads_per_client(a.max_uploads_per_client)?,
        auth: auth(&a.auth)?,
        events: events(&a.events, Some(&data.join("events")))?,
        ..RouterConfig::new(meta.clone())
    };
    Ok(DevConfig {
        listen: a.listen,
        data,
        meta,
        nodes,
        seeder,
        router,
    })
}
