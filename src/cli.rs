//! The low-level arguments: what clap parses, one struct per subcommand. URLs stay strings
//! here; `config` turns them into typed, validated configs (ripgrep's low/high args split),
//! so that every message about a bad URL names its flag in one consistent form.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};
use flotilla_core::{NodeId, RackId};

#[derive(Parser, Debug)]
#[command(
    name = "flotilla",
    version,
    about = "A distributed, sharded OCI container registry"
)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Subcommand, Debug)]
pub(crate) enum Cmd {
    /// Run the embedded cluster in one process: nodes in racks, the router on --listen, the
    /// seeder, the embedded metadata store and a file:// object store under --data.
    Dev(DevArgs),
    /// Run one registry node serving the OCI API.
    Node(NodeArgs),
    /// Run the router: the front door mapping each service/mode to its replica pair.
    Router(RouterArgs),
    /// Run a seeder: reseeds empty nodes from object storage, replaces dead nodes, rebalances.
    /// Any number may run; one (leader-elected through the metadata store) acts.
    Seeder(SeederArgs),
    /// The deploy agent: `flotilla agent pull` pulls an image into the local Docker engine
    /// from the key's replicas, verified, failing over to the partner and the routers.
    Agent(AgentArgs),
}

#[derive(clap::Args, Debug)]
pub(crate) struct AgentArgs {
    #[command(subcommand)]
    pub cmd: AgentCmd,
}

#[derive(Subcommand, Debug)]
pub(crate) enum AgentCmd {
    /// Pull IMAGE (`service/mode/...:tag` or `...@sha256:...`) into the engine and print
    /// its manifest digest; non-zero only when no source delivered verified bytes.
    Pull(AgentPullArgs),
}

#[derive(clap::Args, Debug)]
pub(crate) struct AgentPullArgs {
    /// Router base URLs, comma-separated, tried in order (the image is named after the
    /// first: `HOST:PORT/REPO:TAG`, as `docker pull` through it would name it).
    #[arg(long, value_delimiter = ',', required = true)]
    pub router: Vec<String>,
    /// The Docker engine's API socket.
    #[arg(long, default_value = "/var/run/docker.sock")]
    pub docker_socket: PathBuf,
    /// User for the routers' Basic auth (with --password-file).
    #[arg(long, requires = "password_file")]
    pub user: Option<String>,
    /// File holding the password (first line) for --user.
    #[arg(long, requires = "user")]
    pub password_file: Option<PathBuf>,
    /// A registry token (Bearer) for the routers instead of --user.
    #[arg(
        long,
        env = "FLOTILLA_TOKEN",
        hide_env_values = true,
        conflicts_with = "user"
    )]
    pub token: Option<String>,
    /// Where verified blobs wait for the engine (a temporary directory inside, removed after).
    #[arg(long, default_value_os_t = std::env::temp_dir().join("flotilla-agent"))]
    pub work_dir: PathBuf,
    pub image: String,
}

#[derive(clap::Args, Debug)]
pub(crate) struct DevArgs {
    #[arg(long, default_value = "127.0.0.1:5000")]
    pub listen: SocketAddr,
    #[arg(long, default_value = "./flotilla-data")]
    pub data: PathBuf,
    /// Number of nodes.
    #[arg(long, default_value_t = 3)]
    pub nodes: usize,
    /// Rack of each node in order, comma-separated (default: n1,n2 in r1; n3 in r2).
    #[arg(long, value_delimiter = ',', default_value = "r1,r1,r2")]
    pub racks: Vec<RackId>,
    /// Blob GETs answered with a 307 to a live replica (`router --blob-redirect`) instead
    /// of proxied: `auto` does so when --listen is a loopback address, since every client
    /// can then reach the nodes (which listen on loopback too).
    #[arg(long, value_enum, default_value_t = Redirect::Auto)]
    pub blob_redirect: Redirect,
    /// The router's listener; --tls-cert/--tls-key also make every node serve HTTPS with the
    /// same certificate (which must then be valid for 127.0.0.1, where the nodes listen).
    #[command(flatten)]
    pub listen_opts: ListenArgs,
    /// Root certificate(s) the router and seeder trust when calling the nodes (default with
    /// --tls-cert: the certificate file itself).
    #[arg(long)]
    pub tls_ca: Option<PathBuf>,
    /// Largest blob a push may upload, in bytes (default: no limit).
    #[arg(long)]
    pub max_blob_bytes: Option<u64>,
    /// Upload requests in flight per client at the router (as `router`).
    #[arg(long, default_value_t = 16)]
    pub max_uploads_per_client: usize,
    #[command(flatten)]
    pub auth: AuthArgs,
    /// (The events journal lives under --data.)
    #[command(flatten)]
    pub events: EventsArgs,
}

/// Where the router sends its events (`router` and `dev`).
#[derive(clap::Args, Debug)]
pub(crate) struct EventsArgs {
    /// Deliver every manifest push and delete to this URL (repeatable), in Distribution's
    /// notification envelope, at least once and in order: recorded durably before the
    /// client's 201, retried with backoff while the receiver is down.
    #[arg(long = "webhook", value_name = "URL")]
    pub webhooks: Vec<String>,
    /// Per-delivery timeout, in seconds.
    #[arg(long, default_value_t = 5)]
    pub webhook_timeout_secs: u64,
    /// Sinks from a TOML file (`[[sinks]]`: name, url, kind = "distribution" or
    /// "cloudevents", timeout_secs, headers, actions, repositories globs), besides --webhook.
    #[arg(long = "events", value_name = "FILE")]
    pub events_file: Option<PathBuf>,
}

/// Who may do what at the router (`router` and `dev`). Without any of these the registry is
/// open to anyone who can reach it, and says so when it starts.
#[derive(clap::Args, Debug)]
pub(crate) struct AuthArgs {
    /// Users for Basic auth: an `htpasswd -B` file (bcrypt only); re-read when it changes.
    #[arg(long)]
    pub htpasswd: Option<PathBuf>,
    /// Access policy by repository glob (TOML, or JSON for *.json); re-read when it changes.
    /// Without it: users pull and push everywhere, admins also delete and use /admin/v1.
    #[arg(long)]
    pub access: Option<PathBuf>,
    /// Admin users (comma-separated), besides the access policy's `admins`.
    #[arg(long, value_delimiter = ',')]
    pub admin: Vec<String>,
    /// Issue Docker registry tokens, signed with this private key (PEM, PKCS#8 EC P-256 or
    /// RSA), at /auth/token; clients are then challenged with Bearer.
    #[arg(long)]
    pub token_key: Option<PathBuf>,
    /// An external token service's realm URL (its tokens are verified with --token-cert or
    /// --token-jwks); default with --token-key: this router's /auth/token.
    #[arg(long)]
    pub token_realm: Option<String>,
    /// The `iss` tokens must carry (and the router's own tokens carry).
    #[arg(long, default_value = "flotilla")]
    pub token_issuer: String,
    /// The `service` (token audience) clients ask for and tokens must carry.
    #[arg(long, default_value = "flotilla")]
    pub token_service: String,
    /// Public keys of the external issuer as a JWKS file.
    #[arg(long)]
    pub token_jwks: Option<PathBuf>,
    /// Certificate(s) or public key (PEM) of the external issuer.
    #[arg(long)]
    pub token_cert: Option<PathBuf>,
    /// Lifetime of the tokens this router issues, in seconds.
    #[arg(long, default_value_t = 300)]
    pub token_ttl_secs: u64,
}

/// How a server listens: TLS and the limits every connection meets (router and node).
#[derive(clap::Args, Debug)]
pub(crate) struct ListenArgs {
    /// Serve HTTPS with this certificate chain (PEM); reloaded on SIGHUP or when it changes.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Open connections at most (default: half the open-file limit). At the cap the oldest
    /// idle connection is closed for a new one; with every connection busy, 429.
    #[arg(long)]
    pub max_connections: Option<usize>,
    /// Seconds a client has for the TLS handshake and for each request head.
    #[arg(long, default_value_t = 10)]
    pub header_read_timeout_secs: u64,
    /// Seconds a connection may sit with no request in flight before it is closed.
    #[arg(long, default_value_t = 60)]
    pub idle_timeout_secs: u64,
    /// Largest request head (request line and headers) in bytes; larger ones get 431.
    #[arg(long, default_value_t = 64 * 1024)]
    pub max_header_bytes: usize,
}

/// `flotilla dev --blob-redirect`.
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub(crate) enum Redirect {
    Auto,
    Always,
    Never,
}

#[derive(clap::Args, Debug)]
pub(crate) struct RouterArgs {
    #[arg(long, default_value = "127.0.0.1:5000")]
    pub listen: SocketAddr,
    /// Metadata store URL (file:///DIR, consul://HOST:PORT, etcd://HOST:PORT,...).
    #[arg(long)]
    pub meta: String,
    /// Replication factor for newly placed keys.
    #[arg(long, default_value_t = 2)]
    pub replicas: usize,
    /// Shared secret for the node-internal API.
    #[arg(long, env = "FLOTILLA_SECRET", hide_env_values = true)]
    pub secret: Option<String>,
    /// MiB of manifests answered from the router's memory (0 disables the cache).
    #[arg(long, default_value_t = 64)]
    pub manifest_cache_mib: u64,
    /// Longest a cached manifest is served when no newer shard epoch has been seen (a
    /// bound for writes this router cannot observe, e.g. while the metadata store is away).
    #[arg(long, default_value_t = 10)]
    pub manifest_cache_ttl_secs: u64,
    /// Answer blob GETs with a 307 to a live replica (probed first) instead of proxying
    /// the bytes: the router leaves the data path, clients must reach the nodes' URLs.
    #[arg(long)]
    pub blob_redirect: bool,
    /// Seconds in-flight requests get to finish after SIGTERM before the router exits.
    #[arg(long, default_value_t = 30)]
    pub drain_secs: u64,
    #[command(flatten)]
    pub listen_opts: ListenArgs,
    /// Root certificate(s) (PEM) trusted when calling nodes over https://.
    #[arg(long)]
    pub tls_ca: Option<PathBuf>,
    /// Upload requests in flight per client (per user once authenticated, else per IP
    /// address); more get 429 with Retry-After.
    #[arg(long, default_value_t = 16)]
    pub max_uploads_per_client: usize,
    #[command(flatten)]
    pub auth: AuthArgs,
    #[command(flatten)]
    pub events: EventsArgs,
    /// Where the events journal (the outbox) and each sink's cursor live: a local disk
    /// that survives restarts, one directory per router. Required with --webhook.
    #[arg(long)]
    pub events_dir: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
pub(crate) struct SeederArgs {
    /// Metadata store URL (file:///DIR, consul://HOST:PORT, etcd://HOST:PORT,...).
    #[arg(long)]
    pub meta: String,
    /// Object store URL, the one the nodes use (s3://BUCKET/PREFIX?endpoint=..., file:///DIR).
    #[arg(long)]
    pub store: String,
    /// Shared secret for the node-internal API.
    #[arg(long, env = "FLOTILLA_SECRET", hide_env_values = true)]
    pub secret: Option<String>,
    /// Replace a node missing from the map this many seconds, shard by shard.
    #[arg(long, default_value_t = 600)]
    pub replace_after_secs: u64,
    /// This instance's name (default: random).
    #[arg(long)]
    pub id: Option<String>,
    /// Repositories seeded in parallel per node.
    #[arg(long, default_value_t = 4)]
    pub seed_concurrency: usize,
    /// Pace of each seeding job in bytes per second (0 = unpaced).
    #[arg(long, default_value_t = 0)]
    pub seed_bytes_per_sec: u64,
    /// Replica moves in flight at once.
    #[arg(long, default_value_t = 2)]
    pub max_moves: usize,
    /// Minimum seconds between starting two rebalance moves.
    #[arg(long, default_value_t = 2)]
    pub rebalance_interval_secs: u64,
    /// Serve `/metrics` (Prometheus) and `/healthz` on this address.
    #[arg(long)]
    pub metrics_listen: Option<SocketAddr>,
    /// Root certificate(s) (PEM) trusted when calling nodes over https://.
    #[arg(long)]
    pub tls_ca: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
pub(crate) struct NodeArgs {
    #[arg(long)]
    pub id: NodeId,
    #[arg(long, default_value = "r1")]
    pub rack: RackId,
    #[arg(long, default_value = "127.0.0.1:5001")]
    pub listen: SocketAddr,
    #[arg(long)]
    pub data: PathBuf,
    /// Metadata store URL (file:///DIR, consul://HOST:PORT, etcd://HOST:PORT,...).
    #[arg(long)]
    pub meta: Option<String>,
    /// Object store URL (s3://BUCKET/PREFIX?endpoint=..., gs://, az://, file:///DIR).
    #[arg(long)]
    pub store: Option<String>,
    /// URL routers use to reach this node (default: http://LISTEN).
    #[arg(long)]
    pub advertise: Option<String>,
    /// Shared secret required on the node-internal API (`/internal/v1`).
    #[arg(long, env = "FLOTILLA_SECRET", hide_env_values = true)]
    pub secret: Option<String>,
    /// Idle upload sessions older than this many seconds are purged.
    #[arg(long, default_value_t = 3600)]
    pub upload_max_age_secs: u64,
    /// Seconds to wait for in-flight requests on shutdown.
    #[arg(long, default_value_t = 30)]
    pub drain_secs: u64,
    /// Scrubber pace: stored blob bytes re-hashed per second (0 disables scrubbing).
    #[arg(long, default_value_t = 8 * 1024 * 1024)]
    pub scrub_bytes_per_sec: u64,
    /// Seconds between two scrub passes.
    #[arg(long, default_value_t = 3600)]
    pub scrub_interval_secs: u64,
    /// The scrubber checks each blob's object-storage copy once every this many passes (1 =
    /// every pass; the default, with hourly passes, is daily: one HEAD per blob per day).
    #[arg(long, default_value_t = 24)]
    pub scrub_remote_check_every: u64,
    /// Seconds between two full catch-ups with object storage (a guard: replicas that miss
    /// a write are marked lagging and catch up that key alone; a full pass also runs at
    /// start). Default: weekly.
    #[arg(long, default_value_t = 7 * 24 * 3600)]
    pub catch_up_secs: u64,
    /// Seconds between two sweeps for data of shards moved away (0 disables; needs --meta
    /// and --store).
    #[arg(long, default_value_t = 60)]
    pub gc_interval_secs: u64,
    /// Seconds a repository stays orphaned (and an unlinked blob unmodified) before deletion.
    #[arg(long, default_value_t = 600)]
    pub gc_grace_secs: u64,
    /// Quarantined blobs older than this many seconds are deleted.
    #[arg(long, default_value_t = 7 * 24 * 3600)]
    pub quarantine_retention_secs: u64,
    /// The quarantine is trimmed, oldest first, to at most this many bytes.
    #[arg(long, default_value_t = 1 << 30)]
    pub quarantine_max_bytes: u64,
    /// Seconds a successful upload or HEAD proves object storage holds an object; a push
    /// that depends on an older proof checks again (0: always check).
    #[arg(long, default_value_t = 60)]
    pub remote_confirm_secs: u64,
    /// Below this many free bytes the node refuses new data (507) and takes no new keys
    /// (default: the smaller of 2 GiB and 5% of the data directory's filesystem).
    #[arg(long)]
    pub min_free_bytes: Option<u64>,
    #[command(flatten)]
    pub listen_opts: ListenArgs,
    /// Largest blob an upload may grow to, in bytes (default: no limit); a chunk past it
    /// gets 413 SIZE_INVALID and the session is dropped.
    #[arg(long)]
    pub max_blob_bytes: Option<u64>,
}
