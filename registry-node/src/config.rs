//! Node configuration, passed by value. Every field is already typed and validated (the
//! binary builds it from its flags in one place), so the node never parses a string.

use std::path::PathBuf;
use std::time::Duration;

use flotilla_core::{NodeId, RackId};
use shardmap::MetaUrl;

use flotilla_objstore::StoreUrl;

#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub id: NodeId,
    pub rack: RackId,
    pub data_dir: PathBuf,
    /// Object store; `None` keeps everything local only (tests and the single-node spec
    /// suite).
    pub store_url: Option<StoreUrl>,
    /// Metadata store; with it the node registers itself for routers to find.
    pub meta_url: Option<MetaUrl>,
    /// Shared secret required on the node-internal API; `None` disables that API.
    pub secret: Option<String>,
    /// URL routers and peers use to reach this node; defaults to `http://<listen addr>`.
    pub advertise: Option<String>,
    /// Upload sessions idle longer than this are purged with their bytes.
    pub upload_max_age: Duration,
    /// How often the purge runs.
    pub upload_purge_interval: Duration,
    /// Manifests larger than this are refused (the spec suggests at least 4 MiB).
    pub manifest_max_bytes: usize,
    /// How often the node re-checks its tags and links against object storage.
    pub catch_up_interval: Duration,
    /// Upper bound on waiting for in-flight requests at shutdown.
    pub drain_timeout: Duration,
    /// Scrubber pace: bytes re-hashed per second (0 disables the scrubber). Modest by
    /// default so scrubbing never competes with client reads for the disk.
    pub scrub_bytes_per_sec: u64,
    /// Pause between two scrub passes.
    pub scrub_interval: Duration,
    /// Passes over which the scrubber checks every blob's object-storage copy once.
    pub scrub_remote_every: u64,
    /// How often the node drops data of shards it no longer holds (zero disables it; it
    /// also needs a metadata and an object store).
    pub gc_interval: Duration,
    /// How long a repository must have been orphaned (and an unlinked blob unmodified)
    /// before it is deleted; longer than any router's view of the shard map can lag.
    pub gc_grace: Duration,
    /// Quarantined files older than this are deleted (they are kept only for inspection).
    pub quarantine_retention: Duration,
    /// Quarantine is trimmed, oldest first, to at most this many bytes.
    pub quarantine_max_bytes: u64,
    /// How long a successful upload or HEAD counts as proof that object storage holds an
    /// object (see `durable`); zero checks every time.
    pub remote_confirm_ttl: Duration,
    /// Below this many free bytes on the data directory's filesystem the node takes no new
    /// data; `None` picks the smaller of 2 GiB and 5% of the filesystem.
    pub min_free_bytes: Option<u64>,
    /// Blob fetches in flight while seeding one repository.
    pub seed_concurrency: usize,
    /// Renders `/metrics`; the process installs one recorder and hands every node its handle.
    pub metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    /// The listener: TLS, connection cap, timeouts.
    pub serve: flotilla_serve::ServeConfig,
    /// Largest blob an upload session may grow to (`None`: no limit beyond the disk).
    pub max_blob_bytes: Option<u64>,
}

impl NodeConfig {
    pub fn new(id: NodeId, rack: RackId, data_dir: PathBuf) -> Self {
        NodeConfig {
            id,
            rack,
            data_dir,
            store_url: None,
            meta_url: None,
            advertise: None,
            secret: None,
            upload_max_age: Duration::from_secs(3600),
            upload_purge_interval: Duration::from_secs(60),
            manifest_max_bytes: 4 * 1024 * 1024,
            catch_up_interval: Duration::from_secs(7 * 24 * 3600),
            drain_timeout: Duration::from_secs(30),
            scrub_bytes_per_sec: 8 * 1024 * 1024,
            scrub_interval: Duration::from_secs(3600),
            scrub_remote_every: 24,
            gc_interval: Duration::from_secs(60),
            gc_grace: Duration::from_secs(600),
            quarantine_retention: Duration::from_secs(7 * 24 * 3600),
            quarantine_max_bytes: 1 << 30,
            remote_confirm_ttl: Duration::from_secs(60),
            min_free_bytes: None,
            seed_concurrency: 8,
            metrics: None,
            serve: flotilla_serve::ServeConfig::new("node"),
            max_blob_bytes: None,
        }
    }
}
