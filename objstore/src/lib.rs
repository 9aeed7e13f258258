//! The node's object store: the durable source of truth behind the local cache.
//!
//! Wraps any `object_store::ObjectStore` (S3 and S3-compatible, GCS, Azure, local directory)
//! under a key prefix, and speaks only in `flotilla_core::layout` keys. Uploads of large
//! blobs are multipart, streamed from the local file with bounded concurrency, so no blob is
//! ever held whole in memory. Retries are bounded tightly: a push waiting on an unreachable
//! store should fail with 503 in seconds, not hang for the library's default three minutes.

use std::path::Path as FsPath;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use flotilla_core::layout::{self, RemoteDir, RemoteKey};
use flotilla_core::Digest;
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{ObjectStore, PutPayload, WriteMultipart};
use tokio::io::AsyncReadExt;

/// Parts at least this large go up as multipart uploads (S3's minimum part is 5 MiB).
const MULTIPART_THRESHOLD: u64 = 16 * 1024 * 1024;
const PART_SIZE: usize = 8 * 1024 * 1024;
/// Parts in flight per blob: bounds memory at `PART_SIZE * MAX_PARTS_IN_FLIGHT` per upload.
const MAX_PARTS_IN_FLIGHT: usize = 4;

/// Failures talking to object storage; all of them mean "unavailable" to a client.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error("invalid store URL {url:?}: {reason}")]
    Url { url: String, reason: String },
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
}

impl Remote {
    /// `s3://BUCKET[/PREFIX][?endpoint=http://HOST:PORT&region=R]`, `gs://BUCKET[/PREFIX]`,
    /// `az://CONTAINER[/PREFIX]`, `file:///DIR`, `memory://`.
    /// S3 credentials come from the usual `AWS_*` variables; custom endpoints use path-style
    /// addressing (what MinIO, moto and Ceph expect).
    pub fn open(url: &str) -> Result<Remote, RemoteError> {
        let bad = |reason: &str| RemoteError::Url {
            url: url.to_owned(),
            reason: reason.to_owned(),
        };
        let parsed = url::Url::parse(url).map_err(|e| bad(&e.to_string()))?;
        let query = |k: &str| {
            parsed
                .query_pairs()
                .find(|(q, _)| q == k)
                .map(|(_, v)| v.into_owned())
        };
        let prefix = parsed.path().trim_matches('/').to_owned();
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
            .with_timeout(Duration::from_secs(120));
        let (store, prefix): (Arc<dyn ObjectStore>, String) = match parsed.scheme() {
            "s3" => {
                let bucket = parsed.host_str().ok_or_else(|| bad("missing bucket"))?;
                let mut b = object_store::aws::AmazonS3Builder::from_env()
                    .with_bucket_name(bucket)
                    .with_retry(retry)
                    .with_client_options(client);
                if let Some(region) = query("region") {
                    b = b.with_region(region);
                }
                if let Some(endpoint) = query("endpoint") {
                    b = b
                        .with_allow_http(endpoint.starts_with("http://"))
                        .with_endpoint(endpoint)
                        .with_virtual_hosted_style_request(false);
                }
                (Arc::new(b.build()?), prefix)
            }
            "file" => {
                let dir = parsed
                    .to_file_path()
                    .map_err(|()| bad("not a local path"))?;
                std::fs::create_dir_all(&dir)?;
                (
                    Arc::new(object_store::local::LocalFileSystem::new_with_prefix(dir)?),
                    String::new(),
                )
            }
            // Credentials and endpoints from the libraries' usual environment variables.
            "gs" => {
                let bucket = parsed.host_str().ok_or_else(|| bad("missing bucket"))?;
                let b = object_store::gcp::GoogleCloudStorageBuilder::from_env()
                    .with_bucket_name(bucket)
                    .with_retry(retry)
                    .with_client_options(client);
                (Arc::new(b.build()?), prefix)
            }
            "az" => {
                let container = parsed.host_str().ok_or_else(|| bad("missing container"))?;
                let b = object_store::azure::MicrosoftAzureBuilder::from_env()
                    .with_container_name(container)
                    .with_retry(retry)
                    .with_client_options(client);
                (Arc::new(b.build()?), prefix)
            }
            "memory" => (Arc::new(object_store::memory::InMemory::new()), prefix),
            other => return Err(bad(&format!("unsupported scheme {other:?}"))),
        };
        Ok(Remote { store, prefix })
    }

    /// Wrap an existing store (tests inject fault-injecting wrappers here).
    pub fn from_store(store: Arc<dyn ObjectStore>, prefix: &str) -> Remote {
        Remote {
            store,
            prefix: prefix.trim_matches('/').to_owned(),
        }
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
        match self.store.head(&self.path(key.as_str())).await {
            Ok(m) => Ok(Some(m.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    pub async fn put_bytes(&self, key: &RemoteKey, bytes: Bytes) -> Result<(), RemoteError> {
        self.store
            .put(&self.path(key.as_str()), PutPayload::from(bytes))
            .await?;
        Ok(())
    }

    /// A small object (tag, link, manifest) read whole; `None` if absent.
    pub async fn get_bytes(
        &self,
        key: &RemoteKey,
        limit: u64,
    ) -> Result<Option<Bytes>, RemoteError> {
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
    }

    pub async fn delete(&self, key: &RemoteKey) -> Result<(), RemoteError> {
        match self.store.delete(&self.path(key.as_str())).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Stream an object; `None` if absent. The size comes from the same response.
    pub async fn get_stream(
        &self,
        key: &RemoteKey,
    ) -> Result<Option<(u64, BoxStream<'static, Result<Bytes, RemoteError>>)>, RemoteError> {
        match self.store.get(&self.path(key.as_str())).await {
            Ok(r) => {
                let size = r.meta.size;
                Ok(Some((
                    size,
                    r.into_stream().map_err(RemoteError::from).boxed(),
                )))
            }
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Names (last key component) of the objects directly under `dir/`.
    pub async fn list_names(&self, dir: &RemoteDir) -> Result<Vec<String>, RemoteError> {
        let prefix = self.path(dir.as_str());
        let listing = self.store.list_with_delimiter(Some(&prefix)).await?;
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
        let metas: Vec<_> = self.store.list(Some(&prefix)).try_collect().await?;
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
            let upload = self.store.put_multipart(&self.path(key.as_str())).await?;
            let mut w = WriteMultipart::new_with_chunk_size(upload, PART_SIZE);
            let mut buf = vec![0u8; 1024 * 1024];
            let result: Result<(), RemoteError> = async {
                loop {
                    let n = f.read(&mut buf).await?;
                    if n == 0 {
                        break;
                    }
                    w.wait_for_capacity(MAX_PARTS_IN_FLIGHT).await?;
                    w.write(&buf[..n]);
                }
                Ok(())
            }
            .await;
            match result {
                Ok(()) => {
                    w.finish().await?;
                }
                Err(e) => {
                    let _ = w.abort().await;
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
