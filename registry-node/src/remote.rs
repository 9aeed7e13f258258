//! The node's object store: the durable source of truth behind the local cache.
//!
//! Wraps any `object_store::ObjectStore` (S3 and S3-compatible, GCS, Azure, local directory)
//! under a key prefix, and speaks only in `flotilla_core::layout` keys. Uploads of large
//! blobs are multipart, streamed from the local file with bounded concurrency, so no blob is
//! ever held whole in memory. Retries are bounded tightly: a push waiting on an unreachable
//! store should fail with 503 in seconds, not hang for the library's default three minutes.

use std::fmt;
use std::path::{Path as FsPath, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use flotilla_core::{layout, Digest};
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

/// Why a string is not a [`StoreUrl`]; every variant quotes the whole URL so the message
/// stands on its own after the flag name.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StoreUrlError {
    #[error("invalid store URL {url:?}: {error}")]
    Syntax { url: String, error: url::ParseError },
    #[error("invalid store URL {url:?}: unsupported scheme {scheme:?} (expected s3, gs, az, file or memory)")]
    UnsupportedScheme { url: String, scheme: String },
    #[error("invalid store URL {url:?}: missing {part}")]
    Missing { url: String, part: &'static str },
    #[error("invalid store URL {url:?}: file:// needs a local absolute directory (file:///DIR)")]
    NotLocal { url: String },
    #[error("invalid store URL {url:?}: unknown parameter {param:?} (s3 takes endpoint and region; other schemes none)")]
    UnknownParameter { url: String, param: String },
    #[error("invalid store URL {url:?}: endpoint {endpoint:?} is not an http:// or https:// URL")]
    Endpoint { url: String, endpoint: String },
}

/// An object-store URL: `s3://BUCKET[/PREFIX][?endpoint=http://HOST:PORT&region=R]`,
/// `gs://BUCKET[/PREFIX]`, `az://CONTAINER[/PREFIX]`, `file:///DIR`, `memory://`.
///
/// Parsing checks the scheme, the bucket or directory and the query without any I/O, so a
/// process rejects a bad URL before it creates anything on disk; [`Remote::open`] then only
/// fails for reasons of the store itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreUrl {
    url: url::Url,
    backend: Backend,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Backend {
    S3 {
        bucket: String,
        endpoint: Option<String>,
        region: Option<String>,
    },
    Gcs {
        bucket: String,
    },
    Azure {
        container: String,
    },
    File(PathBuf),
    Memory,
}

impl StoreUrl {
    /// A `file://` store in `dir`, for callers that own a directory (`flotilla dev`, tests)
    /// and should not have to get percent-encoding right by hand.
    pub fn file(dir: &FsPath) -> Result<StoreUrl, StoreUrlError> {
        let url = url::Url::from_directory_path(dir).map_err(|()| StoreUrlError::NotLocal {
            url: format!("file://{}", dir.display()),
        })?;
        url.as_str().parse()
    }

    /// The key prefix inside the bucket (empty for `file://`, whose directory is the root).
    fn prefix(&self) -> String {
        match self.backend {
            Backend::File(_) => String::new(),
            _ => self.url.path().trim_matches('/').to_owned(),
        }
    }
}

impl FromStr for StoreUrl {
    type Err = StoreUrlError;

    fn from_str(s: &str) -> Result<StoreUrl, StoreUrlError> {
        let url = url::Url::parse(s).map_err(|error| StoreUrlError::Syntax {
            url: s.to_owned(),
            error,
        })?;
        let missing = |part| StoreUrlError::Missing {
            url: s.to_owned(),
            part,
        };
        let host = || url.host_str().filter(|h| !h.is_empty()).map(str::to_owned);
        let allowed: &[&str] = if url.scheme() == "s3" {
            &["endpoint", "region"]
        } else {
            &[]
        };
        if let Some((param, _)) = url
            .query_pairs()
            .find(|(k, _)| !allowed.contains(&k.as_ref()))
        {
            return Err(StoreUrlError::UnknownParameter {
                url: s.to_owned(),
                param: param.into_owned(),
            });
        }
        let query = |k: &str| {
            url.query_pairs()
                .find(|(q, _)| q == k)
                .map(|(_, v)| v.into_owned())
        };
        let backend = match url.scheme() {
            "s3" => {
                let endpoint = query("endpoint");
                if let Some(e) = &endpoint {
                    let ok = url::Url::parse(e)
                        .is_ok_and(|e| matches!(e.scheme(), "http" | "https") && e.has_host());
                    if !ok {
                        return Err(StoreUrlError::Endpoint {
                            url: s.to_owned(),
                            endpoint: e.clone(),
                        });
                    }
                }
                Backend::S3 {
                    bucket: host().ok_or_else(|| missing("bucket"))?,
                    endpoint,
                    region: query("region"),
                }
            }
            "gs" => Backend::Gcs {
                bucket: host().ok_or_else(|| missing("bucket"))?,
            },
            "az" => Backend::Azure {
                container: host().ok_or_else(|| missing("container"))?,
            },
            "file" => {
                let dir = url
                    .to_file_path()
                    .map_err(|()| StoreUrlError::NotLocal { url: s.to_owned() })?;
                if dir.parent().is_none() {
                    return Err(missing("directory"));
                }
                Backend::File(dir)
            }
            "memory" => Backend::Memory,
            other => {
                return Err(StoreUrlError::UnsupportedScheme {
                    url: s.to_owned(),
                    scheme: other.to_owned(),
                })
            }
        };
        Ok(StoreUrl { url, backend })
    }
}

impl fmt::Display for StoreUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.url.as_str())
    }
}

/// Failures talking to object storage; all of them mean "unavailable" to a client.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
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
            .with_timeout(Duration::from_secs(120));
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
    pub async fn head(&self, key: &str) -> Result<Option<u64>, RemoteError> {
        match self.store.head(&self.path(key)).await {
            Ok(m) => Ok(Some(m.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    pub async fn put_bytes(&self, key: &str, bytes: Bytes) -> Result<(), RemoteError> {
        self.store
            .put(&self.path(key), PutPayload::from(bytes))
            .await?;
        Ok(())
    }

    /// A small object (tag, link, manifest) read whole; `None` if absent.
    pub async fn get_bytes(&self, key: &str, limit: u64) -> Result<Option<Bytes>, RemoteError> {
        let r = match self.store.get(&self.path(key)).await {
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

    pub async fn delete(&self, key: &str) -> Result<(), RemoteError> {
        match self.store.delete(&self.path(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Stream an object; `None` if absent. The size comes from the same response.
    pub async fn get_stream(
        &self,
        key: &str,
    ) -> Result<Option<(u64, BoxStream<'static, Result<Bytes, RemoteError>>)>, RemoteError> {
        match self.store.get(&self.path(key)).await {
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
    pub async fn list_names(&self, dir: &str) -> Result<Vec<String>, RemoteError> {
        let prefix = self.path(dir.trim_end_matches('/'));
        let listing = self.store.list_with_delimiter(Some(&prefix)).await?;
        Ok(listing
            .objects
            .into_iter()
            .filter_map(|o| o.location.filename().map(str::to_owned))
            .collect())
    }

    /// Every key under `dir/`, relative to this store's prefix.
    pub async fn list_keys(&self, dir: &str) -> Result<Vec<String>, RemoteError> {
        let prefix = self.path(dir.trim_end_matches('/'));
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
            let upload = self.store.put_multipart(&self.path(&key)).await?;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn check(url: &str, expected: Result<&str, &str>) {
        match (url.parse::<StoreUrl>(), expected) {
            (Ok(u), Ok(prefix)) => {
                assert_eq!(u.prefix(), prefix, "{url}");
                assert_eq!(u.to_string().parse::<StoreUrl>().as_ref(), Ok(&u), "{url}");
            }
            (Err(e), Err(needle)) => {
                let msg = e.to_string();
                assert!(msg.contains(needle), "{url}: {msg:?} lacks {needle:?}");
                assert!(msg.contains(&format!("{url:?}")), "{url}: {msg:?}");
            }
            (got, want) => panic!("{url}: got {got:?}, want {want:?}"),
        }
    }

    #[test]
    fn grammar() {
        check(
            "s3://b/p/q?endpoint=http://127.0.0.1:9000&region=us-east-1",
            Ok("p/q"),
        );
        check("s3://b", Ok(""));
        check("gs://b/p", Ok("p"));
        check("az://c/p/", Ok("p"));
        check("file:///var/lib/objects", Ok(""));
        check("memory://", Ok(""));
        check("s4://x", Err("unsupported scheme \"s4\""));
        check("s3:///p", Err("missing bucket"));
        check("gs://", Err("missing bucket"));
        check("az://", Err("missing container"));
        check("file:///", Err("missing directory"));
        check("file://host/dir", Err("local absolute directory"));
        check(
            "s3://b?endpiont=http://x",
            Err("unknown parameter \"endpiont\""),
        );
        check("gs://b?region=x", Err("unknown parameter \"region\""));
        check(
            "s3://b?endpoint=127.0.0.1:9000",
            Err("is not an http:// or https:// URL"),
        );
        check("bucket/prefix", Err("relative URL without a base"));
    }

    #[test]
    fn file_constructor_encodes_the_path() {
        let u = StoreUrl::file(FsPath::new("/tmp/a b")).unwrap();
        assert_eq!(u.backend, Backend::File(PathBuf::from("/tmp/a b/")));
        assert!(StoreUrl::file(FsPath::new("relative")).is_err());
    }
}
