//! The node's object store: the durable source of truth behind the local cache.
//!
//! Wraps any `object_store::ObjectStore` (S3 and S3-compatible, GCS, Azure, local directory)
//! under a key prefix, and speaks only in `flotilla_core::layout` keys. Uploads of large
//! blobs are multipart, streamed from the local file with bounded concurrency, so no blob is
//! ever held whole in memory.
//!
//! Every call has a deadline that fits its work, so a frozen store (a process that accepts
//! connections and never answers) costs a client seconds, never minutes: a small request
//! (HEAD, tag, link, delete, one listing page) must finish within [`SMALL_DEADLINE`]; a
//! whole-object PUT gets that plus time for its bytes at [`MIN_RATE`]; streams and multipart
//! uploads are held to progress instead of a total (each body chunk, each part, within its
//! own deadline), so a large blob on a slow but live link is not cut. A timeout counts as
//! the store being unreachable: [`Remote::healthy`] reports it until the next success.

mod url;

use std::path::Path as FsPath;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use flotilla_core::layout::{self, RemoteDir, RemoteKey};
use flotilla_core::Digest;
use futures::stream::BoxStream;
use futures::StreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, PutPayload, WriteMultipart};
use tokio::io::AsyncReadExt;

use crate::url::Backend;
pub use crate::url::{StoreUrl, StoreUrlError};

/// Parts at least this large go up as multipart uploads (S3's minimum part is 5 MiB).
const MULTIPART_THRESHOLD: u64 = 16 * 1024 * 1024;
const PART_SIZE: usize = 8 * 1024 * 1024;
/// Parts in flight per blob: bounds memory at `PART_SIZE * MAX_PARTS_IN_FLIGHT` per upload.
const MAX_PARTS_IN_FLIGHT: usize = 4;

/// A small request (HEAD, small GET/PUT, delete, a listing page) finishes within this.
pub const SMALL_DEADLINE: Duration = Duration::from_secs(3);
/// The slowest transfer rate a PUT, a part or a streamed body is allowed before it counts as
/// stalled: 1 MiB/s.
pub const MIN_RATE: u64 = 1024 * 1024;
/// A streamed body must deliver its next chunk within this.
pub const STREAM_IDLE: Duration = Duration::from_secs(10);

/// The deadline for moving `bytes` in one request.
fn transfer_deadline(bytes: u64) -> Duration {
    SMALL_DEADLINE + Duration::from_secs_f64(bytes as f64 / MIN_RATE as f64)
}

/// Failures talking to object storage; all of them mean "unavailable" to a client.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error("object store did not answer {op} within {after:?}")]
    Timeout { op: &'static str, after: Duration },
    #[error("object store: {0}")]
    Store(#[from] object_store::Error),
    #[error("reading local file for upload: {0}")]
    Io(#[from] std::io::Error),
}

/// Handle on the object store under a prefix. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Remote {
    store: Arc<dyn ObjectStore>,
    prefix: String,
    /// Whether the last call reached the store (see [`Remote::healthy`]).
    up: Arc<std::sync::atomic::AtomicBool>,
}

impl Remote {
    /// Build the store `url` names. S3 credentials come from the usual `AWS_*` variables;
    /// custom endpoints use path-style addressing (what MinIO, moto and Ceph expect). GCS and
    /// Azure take credentials and endpoints from their libraries' usual variables.
    pub fn open(url: &StoreUrl) -> Result<Remote, RemoteError> {
        let prefix = url.prefix();
        let retry = object_store::RetryConfig {
            backoff: object_store::BackoffConfig {
                init_backoff: Duration::from_millis(50),
                max_backoff: Duration::from_secs(1),
                base: 2.0,
            },
            max_retries: 3,
            retry_timeout: Duration::from_secs(10),
        };
        let client = object_store::ClientOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            // A backstop per attempt; the deadlines below are what a caller waits at most.
            .with_timeout(Duration::from_secs(60));
        let store: Arc<dyn ObjectStore> = match &url.backend {
            Backend::S3 {
                bucket,
                endpoint,
                region,
            } => {
                let mut b = object_store::aws::AmazonS3Builder::from_env()
                    .with_bucket_name(bucket)
                    .with_retry(retry)
                    .with_client_options(client);
                if let Some(region) = region {
                    b = b.with_region(region);
                }
                if let Some(endpoint) = endpoint {
                    b = b
                        .with_allow_http(endpoint.starts_with("http://"))
                        .with_endpoint(endpoint)
                        .with_virtual_hosted_style_request(false);
                }
                Arc::new(b.build()?)
            }
            Backend::File(dir) => {
                std::fs::create_dir_all(dir)?;
                Arc::new(object_store::local::LocalFileSystem::new_with_prefix(dir)?)
            }
            Backend::Gcs { bucket } => Arc::new(
                object_store::gcp::GoogleCloudStorageBuilder::from_env()
                    .with_bucket_name(bucket)
                    .with_retry(retry)
                    .with_client_options(client)
                    .build()?,
            ),
            Backend::Azure { container } => Arc::new(
                object_store::azure::MicrosoftAzureBuilder::from_env()
                    .with_container_name(container)
                    .with_retry(retry)
                    .with_client_options(client)
                    .build()?,
            ),
            Backend::Memory => Arc::new(object_store::memory::InMemory::new()),
        };
        Ok(Remote::new(store, prefix))
    }

    fn new(store: Arc<dyn ObjectStore>, prefix: String) -> Remote {
        Remote {
            store,
            prefix,
            up: Arc::new(std::sync::atomic::AtomicBool::new(true)),
        }
    }

    /// Whether the store answered the last call made to it (a timeout or a transport error
    /// says no; any answer, a 404 included, says yes). Reported in `/readyz` and metrics.
    pub fn healthy(&self) -> bool {
        self.up.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Run `fut` within `after`, recording whether the store answered.
    async fn within<T>(
        &self,
        op: &'static str,
        after: Duration,
        fut: impl std::future::Future<Output = Result<T, RemoteError>>,
    ) -> Result<T, RemoteError> {
        // Every call is a request to the store (billed on S3): what an idle node must keep
        // near zero.
        metrics::counter!("flotilla_node_object_store_requests_total", "op" => op).increment(1);
        let result = match tokio::time::timeout(after, fut).await {
            Ok(r) => r,
            Err(_) => Err(RemoteError::Timeout { op, after }),
        };
        let answered = match &result {
            Ok(_) => true,
            Err(RemoteError::Timeout { .. }) => false,
            Err(RemoteError::Store(e)) => !matches!(e, object_store::Error::Generic { .. }),
            Err(_) => true,
        };
        if self.up.swap(answered, std::sync::atomic::Ordering::Relaxed) != answered {
            if answered {
                tracing::info!("object store reachable again");
            } else {
                tracing::warn!(op, "object store unreachable");
            }
        }
        metrics::gauge!("flotilla_node_object_store_up").set(if answered { 1.0 } else { 0.0 });
        if !answered {
            metrics::counter!("flotilla_node_object_store_failures_total", "op" => op).increment(1);
        }
        result
    }

    fn path(&self, key: &str) -> Path {
        if self.prefix.is_empty() {
            Path::from(key)
        } else {
            Path::from(format!("{}/{key}", self.prefix))
        }
    }

    /// Size of an object, `None` if absent.
    pub async fn head(&self, key: &RemoteKey) -> Result<Option<u64>, RemoteError> {
        self.within("HEAD", SMALL_DEADLINE, async {
            match self.store.head(&self.path(key.as_str())).await {
                Ok(m) => Ok(Some(m.size)),
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(e.into()),
            }
        })
        .await
    }

    pub async fn put_bytes(&self, key: &RemoteKey, bytes: Bytes) -> Result<(), RemoteError> {
        let after = transfer_deadline(bytes.len() as u64);
        self.within("PUT", after, async {
            self.store
                .put(&self.path(key.as_str()), PutPayload::from(bytes))
                .await?;
            Ok(())
        })
        .await
    }

    /// A small object (tag, link, manifest) read whole; `None` if absent.
    pub async fn get_bytes(
        &self,
        key: &RemoteKey,
        limit: u64,
    ) -> Result<Option<Bytes>, RemoteError> {
        self.within("GET", transfer_deadline(limit), async {
            let r = match self.store.get(&self.path(key.as_str())).await {
                Ok(r) => r,
                Err(object_store::Error::NotFound { .. }) => return Ok(None),
                Err(e) => return Err(e.into()),
            };
            if r.meta.size > limit {
                return Err(RemoteError::Io(std::io::Error::other(format!(
                    "object {key} is {} bytes, over the limit of {limit}",
                    r.meta.size
                ))));
            }
            Ok(Some(r.bytes().await?))
        })
        .await
    }

    pub async fn delete(&self, key: &RemoteKey) -> Result<(), RemoteError> {
        self.within("DELETE", SMALL_DEADLINE, async {
            match self.store.delete(&self.path(key.as_str())).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                Err(e) => Err(e.into()),
            }
        })
        .await
    }

    /// Stream an object; `None` if absent. The size comes from the same response.
    pub async fn get_stream(
        &self,
        key: &RemoteKey,
    ) -> Result<Option<(u64, BoxStream<'static, Result<Bytes, RemoteError>>)>, RemoteError> {
        let r = self
            .within("GET", SMALL_DEADLINE, async {
                match self.store.get(&self.path(key.as_str())).await {
                    Ok(r) => Ok(Some(r)),
                    Err(object_store::Error::NotFound { .. }) => Ok(None),
                    Err(e) => Err(e.into()),
                }
            })
            .await?;
        let Some(r) = r else {
            return Ok(None);
        };
        let size = r.meta.size;
        // Held to progress: each chunk within STREAM_IDLE, however long the whole takes.
        let up = self.up.clone();
        let body =
            tokio_stream::StreamExt::timeout(r.into_stream(), STREAM_IDLE).map(move |item| {
                match item {
                    Ok(chunk) => chunk.map_err(RemoteError::from),
                    Err(_) => {
                        up.store(false, std::sync::atomic::Ordering::Relaxed);
                        Err(RemoteError::Timeout {
                            op: "GET body",
                            after: STREAM_IDLE,
                        })
                    }
                }
            });
        Ok(Some((size, body.boxed())))
    }

    /// Names (last key component) of the objects directly under `dir/`.
    pub async fn list_names(&self, dir: &RemoteDir) -> Result<Vec<String>, RemoteError> {
        let prefix = self.path(dir.as_str());
        let listing = self
            .within("LIST", SMALL_DEADLINE, async {
                Ok(self.store.list_with_delimiter(Some(&prefix)).await?)
            })
            .await?;
        Ok(listing
            .objects
            .into_iter()
            .filter_map(|o| o.location.filename().map(str::to_owned))
            .collect())
    }

    /// Every key under `dir/`, relative to this store's prefix.
    pub async fn list_keys(&self, dir: &RemoteDir) -> Result<Vec<String>, RemoteError> {
        let prefix = self.path(dir.as_str());
        let strip = if self.prefix.is_empty() {
            String::new()
        } else {
            format!("{}/", self.prefix)
        };
        // Held to progress: a long listing may take many pages, each within the deadline.
        let pages =
            tokio_stream::StreamExt::timeout(self.store.list(Some(&prefix)), SMALL_DEADLINE);
        let metas: Vec<_> = self
            .within("LIST", Duration::MAX, async {
                let mut out = Vec::new();
                tokio::pin!(pages);
                while let Some(item) = pages.next().await {
                    match item {
                        Ok(meta) => out.push(meta?),
                        Err(_) => {
                            return Err(RemoteError::Timeout {
                                op: "LIST page",
                                after: SMALL_DEADLINE,
                            })
                        }
                    }
                }
                Ok(out)
            })
            .await?;
        Ok(metas
            .into_iter()
            .map(|m| {
                let s = m.location.to_string();
                s.strip_prefix(&strip).unwrap_or(&s).to_owned()
            })
            .collect())
    }

    /// Upload a verified local blob unless the store already has it (blobs are deduplicated
    /// across repositories and nodes). Returns whether bytes were sent.
    pub async fn put_blob_file(
        &self,
        d: &Digest,
        file: &FsPath,
        size: u64,
    ) -> Result<bool, RemoteError> {
        let key = layout::remote_blob(d);
        if self.head(&key).await? == Some(size) {
            metrics::counter!("flotilla_node_remote_blob_dedup_total").increment(1);
            return Ok(false);
        }
        let started = std::time::Instant::now();
        let mut f = tokio::fs::File::open(file).await?;
        if size < MULTIPART_THRESHOLD {
            // Bounded by the threshold: small blobs go up in one request.
            let mut buf = Vec::with_capacity(size as usize);
            f.read_to_end(&mut buf).await?;
            self.put_bytes(&key, Bytes::from(buf)).await?;
        } else {
            let upload = self
                .within("PUT multipart", SMALL_DEADLINE, async {
                    Ok(self.store.put_multipart(&self.path(key.as_str())).await?)
                })
                .await?;
            let mut w = WriteMultipart::new_with_chunk_size(upload, PART_SIZE);
            let mut buf = vec![0u8; 1024 * 1024];
            // Held to progress: waiting for room means waiting for a part to finish, which
            // must happen within one part's transfer deadline.
            let part = transfer_deadline(PART_SIZE as u64);
            let result: Result<(), RemoteError> = async {
                loop {
                    let n = f.read(&mut buf).await?;
                    if n == 0 {
                        break;
                    }
                    self.within("PUT part", part, async {
                        Ok(w.wait_for_capacity(MAX_PARTS_IN_FLIGHT).await?)
                    })
                    .await?;
                    w.write(&buf[..n]);
                }
                Ok(())
            }
            .await;
            match result {
                Ok(()) => {
                    // The parts still in flight, then the completion request.
                    let last = part * MAX_PARTS_IN_FLIGHT as u32 + SMALL_DEADLINE;
                    self.within("PUT complete", last, async { Ok(w.finish().await?) })
                        .await?;
                }
                Err(e) => {
                    let _ = tokio::time::timeout(SMALL_DEADLINE, w.abort()).await;
                    return Err(e);
                }
            }
        }
        metrics::histogram!("flotilla_node_write_through_seconds")
            .record(started.elapsed().as_secs_f64());
        metrics::counter!("flotilla_node_remote_blob_bytes_out_total").increment(size);
        Ok(true)
    }
}
