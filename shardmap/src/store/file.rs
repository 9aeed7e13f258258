//! The embedded metadata store (`file:///DIR`), the default: one JSON state file per store,
//! safe for several processes on one host.
//!
//! Layout: `DIR/state.json` (every key, the revision counter, leases and a bounded change
//! log) and `DIR/lock` (an advisory `flock`). Every write takes the exclusive lock, re-reads
//! the state, applies the change with the next revision, writes `state.json.tmp`, fsyncs it,
//! renames it over `state.json` and fsyncs the directory. A crash before the rename leaves the
//! old state; after it, the new one — never a torn file, because rename is atomic within a
//! filesystem and fsync makes data durable. Readers take no lock: they read whichever complete
//! file the last rename installed. Revisions are monotonic across processes because they are
//! only ever incremented under the lock from the value on disk.
//!
//! Watches poll the state file every [`POLL`] and replay the change log (the last
//! [`LOG_CAP`] changes); a watcher that falls further behind gets [`StoreError::Compacted`].
//! Leases are expiry timestamps: a key whose lease has expired is absent to every reader at
//! once, and the next writer (or a polling watcher) purges it and logs the delete.
//!
//! The whole state is rewritten on each change, which is fine for a development cluster or a
//! single host with thousands of keys; large deployments use Consul or etcd.

use std::collections::{BTreeMap, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use bytes::Bytes;
use fs4::fs_std::FileExt;
use serde::{Deserialize, Serialize};

use super::{
    now_ms, Conflict, Entry, Lease, MetaStore, StoreError, Version, WatchEvent, WatchStream,
};

/// How often a watcher re-reads the state file.
pub const POLL: Duration = Duration::from_millis(50);
/// How many changes the log keeps for resuming watchers.
pub const LOG_CAP: usize = 10_000;
/// Format version of `state.json`.
const STATE_FORMAT: u64 = 1;

#[derive(Debug, Default, Serialize, Deserialize)]
struct State {
    v: u64,
    revision: u64,
    /// Events with a version greater than this are all still in `log`.
    log_floor: u64,
    next_lease: u64,
    keys: BTreeMap<String, Stored>,
    /// Lease id -> (ttl in ms, expiry in ms since the epoch).
    leases: BTreeMap<String, (u64, u64)>,
    log: VecDeque<Change>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Stored {
    value: String,
    version: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    lease: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Change {
    key: String,
    version: u64,
    /// `None` = deleted.
    value: Option<String>,
}

impl State {
    fn live(&self, s: &Stored, now: u64) -> bool {
        match &s.lease {
            None => true,
            Some(l) => self.leases.get(l).is_some_and(|(_, exp)| *exp > now),
        }
    }

    fn get_live(&self, key: &str, now: u64) -> Option<&Stored> {
        self.keys.get(key).filter(|s| self.live(s, now))
    }

    fn log_change(&mut self, key: &str, value: Option<String>) -> u64 {
        self.revision += 1;
        let version = self.revision;
        self.log.push_back(Change {
            key: key.to_owned(),
            version,
            value,
        });
        while self.log.len() > LOG_CAP {
            if let Some(c) = self.log.pop_front() {
                self.log_floor = c.version;
            }
        }
        version
    }

    fn set(&mut self, key: &str, value: &[u8], lease: Option<String>) -> u64 {
        let enc = B64.encode(value);
        let version = self.log_change(key, Some(enc.clone()));
        self.keys.insert(
            key.to_owned(),
            Stored {
                value: enc,
                version,
                lease,
            },
        );
        version
    }

    fn remove(&mut self, key: &str) {
        if self.keys.remove(key).is_some() {
            self.log_change(key, None);
        }
    }

    fn has_expired(&self, now: u64) -> bool {
        self.leases.values().any(|(_, exp)| *exp <= now)
    }

    /// Drop expired leases and delete (and log) their keys.
    fn purge(&mut self, now: u64) {
        let dead: Vec<String> = self
            .leases
            .iter()
            .filter(|(_, (_, exp))| *exp <= now)
            .map(|(id, _)| id.clone())
            .collect();
        for id in dead {
            self.drop_lease(&id);
        }
    }

    fn drop_lease(&mut self, id: &str) {
        self.leases.remove(id);
        let keys: Vec<String> = self
            .keys
            .iter()
            .filter(|(_, s)| s.lease.as_deref() == Some(id))
            .map(|(k, _)| k.clone())
            .collect();
        for k in keys {
            self.remove(&k);
        }
    }

    fn lease_alive(&self, id: &str, now: u64) -> bool {
        self.leases.get(id).is_some_and(|(_, exp)| *exp > now)
    }
}

/// The embedded store. Cheap to clone.
#[derive(Clone, Debug)]
pub struct FileStore {
    dir: Arc<PathBuf>,
}

impl FileStore {
    /// Open (creating if needed) the store in `dir`.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self, StoreError> {
        let dir = dir.as_ref().to_path_buf();
        fs::create_dir_all(&dir).map_err(|e| io_err(&dir, e))?;
        Ok(FileStore { dir: Arc::new(dir) })
    }

    fn state_path(&self) -> PathBuf {
        self.dir.join("state.json")
    }

    fn read_state(&self) -> Result<State, StoreError> {
        let path = self.state_path();
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(State {
                    v: STATE_FORMAT,
                    ..State::default()
                })
            }
            Err(e) => return Err(io_err(&path, e)),
        };
        let state: State =
            serde_json::from_slice(&bytes).map_err(|e| StoreError::CorruptState {
                path: path.display().to_string(),
                detail: e.to_string(),
            })?;
        if state.v > STATE_FORMAT {
            return Err(StoreError::CorruptState {
                path: path.display().to_string(),
                detail: format!("format version {} is newer than {STATE_FORMAT}", state.v),
            });
        }
        Ok(state)
    }

    /// Run `f` on the state under the exclusive lock and persist the result crash-safely.
    fn update<T>(&self, f: impl FnOnce(&mut State, u64) -> T) -> Result<T, StoreError> {
        let lock_path = self.dir.join("lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| io_err(&lock_path, e))?;
        FileExt::lock_exclusive(&lock).map_err(|e| io_err(&lock_path, e))?;
        let mut state = self.read_state()?;
        let now = now_ms();
        state.purge(now);
        let out = f(&mut state, now);
        state.v = STATE_FORMAT;
        self.persist(&state)?;
        // Closing `lock` releases the flock.
        drop(lock);
        Ok(out)
    }

    fn persist(&self, state: &State) -> Result<(), StoreError> {
        let path = self.state_path();
        let tmp = self.dir.join("state.json.tmp");
        let bytes = serde_json::to_vec(state).map_err(|e| StoreError::CorruptState {
            path: tmp.display().to_string(),
            detail: e.to_string(),
        })?;
        let mut f = File::create(&tmp).map_err(|e| io_err(&tmp, e))?;
        f.write_all(&bytes).map_err(|e| io_err(&tmp, e))?;
        f.sync_all().map_err(|e| io_err(&tmp, e))?;
        drop(f);
        fs::rename(&tmp, &path).map_err(|e| io_err(&path, e))?;
        let d = File::open(self.dir.as_path()).map_err(|e| io_err(&self.dir, e))?;
        d.sync_all().map_err(|e| io_err(&self.dir, e))?;
        Ok(())
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(FileStore) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let me = self.clone();
        tokio::task::spawn_blocking(move || f(me))
            .await
            .map_err(|e| io_err(&self.dir, std::io::Error::other(e)))?
    }
}

fn io_err(path: &Path, source: std::io::Error) -> StoreError {
    StoreError::Io {
        path: path.display().to_string(),
        source,
    }
}

fn decode(key: &str, v: &str) -> Result<Bytes, StoreError> {
    B64.decode(v)
        .map(Bytes::from)
        .map_err(|e| StoreError::CorruptState {
            path: key.to_owned(),
            detail: e.to_string(),
        })
}

#[async_trait::async_trait]
impl MetaStore for FileStore {
    async fn get(&self, key: &str) -> Result<Option<(Bytes, Version)>, StoreError> {
        let key = key.to_owned();
        self.blocking(move |s| {
            let st = s.read_state()?;
            match st.get_live(&key, now_ms()) {
                None => Ok(None),
                Some(v) => Ok(Some((decode(&key, &v.value)?, v.version))),
            }
        })
        .await
    }

    async fn put(&self, key: &str, value: Bytes) -> Result<Version, StoreError> {
        let key = key.to_owned();
        self.blocking(move |s| s.update(|st, _| st.set(&key, &value, None)))
            .await
    }

    async fn cas(
        &self,
        key: &str,
        expected: Option<Version>,
        value: Bytes,
    ) -> Result<Result<Version, Conflict>, StoreError> {
        let key = key.to_owned();
        self.blocking(move |s| {
            s.update(|st, now| {
                let current = st.get_live(&key, now).map(|v| v.version);
                if current != expected {
                    return Err(Conflict { current });
                }
                Ok(st.set(&key, &value, None))
            })
        })
        .await
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        let key = key.to_owned();
        self.blocking(move |s| s.update(|st, _| st.remove(&key)))
            .await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<Entry>, StoreError> {
        let prefix = prefix.to_owned();
        self.blocking(move |s| {
            let st = s.read_state()?;
            let now = now_ms();
            st.keys
                .range(prefix.clone()..)
                .take_while(|(k, _)| k.starts_with(&prefix))
                .filter(|(_, v)| st.live(v, now))
                .map(|(k, v)| {
                    Ok(Entry {
                        key: k.clone(),
                        value: decode(k, &v.value)?,
                        version: v.version,
                    })
                })
                .collect()
        })
        .await
    }

    async fn watch(&self, prefix: &str, from: Option<Version>) -> Result<WatchStream, StoreError> {
        let start = match from {
            Some(v) => v,
            None => self.blocking(|s| Ok(s.read_state()?.revision)).await?,
        };
        let init = (
            self.clone(),
            prefix.to_owned(),
            start,
            VecDeque::new(),
            false,
        );
        let stream = futures::stream::unfold(
            init,
            |(store, prefix, mut last, mut queue, done)| async move {
                if done {
                    return None;
                }
                loop {
                    if let Some(ev) = queue.pop_front() {
                        return Some((Ok(ev), (store, prefix, last, queue, false)));
                    }
                    let polled = store
                        .blocking({
                            let prefix = prefix.clone();
                            move |s| poll_changes(&s, &prefix, last)
                        })
                        .await;
                    match polled {
                        Err(e) => return Some((Err(e), (store, prefix, last, queue, true))),
                        Ok((events, seen)) => {
                            last = seen;
                            queue.extend(events);
                            if queue.is_empty() {
                                tokio::time::sleep(POLL).await;
                            }
                        }
                    }
                }
            },
        );
        Ok(Box::pin(stream))
    }

    async fn lease(&self, ttl: Duration) -> Result<Lease, StoreError> {
        let ttl_ms = ttl.as_millis() as u64;
        self.blocking(move |s| {
            s.update(|st, now| {
                st.next_lease += 1;
                let id = format!("{:x}", st.next_lease);
                st.leases.insert(id.clone(), (ttl_ms, now + ttl_ms));
                Lease { id, ttl }
            })
        })
        .await
    }

    async fn keepalive(&self, lease: &Lease) -> Result<(), StoreError> {
        let id = lease.id.clone();
        self.blocking(move |s| {
            s.update(|st, now| match st.leases.get_mut(&id) {
                Some((ttl, exp)) if *exp > now => {
                    *exp = now + *ttl;
                    Ok(())
                }
                _ => Err(StoreError::LeaseExpired(id.clone())),
            })?
        })
        .await
    }

    async fn revoke(&self, lease: &Lease) -> Result<(), StoreError> {
        let id = lease.id.clone();
        self.blocking(move |s| s.update(|st, _| st.drop_lease(&id)))
            .await
    }

    async fn put_with_lease(
        &self,
        key: &str,
        value: Bytes,
        lease: &Lease,
    ) -> Result<Version, StoreError> {
        let (key, id) = (key.to_owned(), lease.id.clone());
        self.blocking(move |s| {
            s.update(|st, now| {
                if !st.lease_alive(&id, now) {
                    return Err(StoreError::LeaseExpired(id.clone()));
                }
                Ok(st.set(&key, &value, Some(id.clone())))
            })?
        })
        .await
    }

    async fn try_lock(&self, key: &str, lease: &Lease) -> Result<bool, StoreError> {
        let (key, id) = (key.to_owned(), lease.id.clone());
        self.blocking(move |s| {
            s.update(|st, now| {
                if !st.lease_alive(&id, now) {
                    return Err(StoreError::LeaseExpired(id.clone()));
                }
                match st.get_live(&key, now) {
                    Some(cur) => Ok(cur.lease.as_deref() == Some(id.as_str())),
                    None => {
                        st.set(&key, id.as_bytes(), Some(id.clone()));
                        Ok(true)
                    }
                }
            })?
        })
        .await
    }

    async fn unlock(&self, key: &str, lease: &Lease) -> Result<(), StoreError> {
        let (key, id) = (key.to_owned(), lease.id.clone());
        self.blocking(move |s| {
            s.update(|st, now| {
                if st.get_live(&key, now).and_then(|c| c.lease.as_deref()) == Some(id.as_str()) {
                    st.remove(&key);
                }
            })
        })
        .await
    }
}

/// Events under `prefix` newer than `last`, and the revision they bring the watcher to. Purges
/// expired leases first, so lease expiry shows up as deletes even when nobody else writes.
fn poll_changes(
    s: &FileStore,
    prefix: &str,
    last: Version,
) -> Result<(Vec<WatchEvent>, Version), StoreError> {
    let mut st = s.read_state()?;
    if st.has_expired(now_ms()) {
        s.update(|_, _| ())?;
        st = s.read_state()?;
    }
    if st.revision <= last {
        return Ok((Vec::new(), last));
    }
    if last < st.log_floor {
        return Err(StoreError::Compacted {
            from: last,
            oldest: st.log_floor,
        });
    }
    let mut events = Vec::new();
    for c in st.log.iter().filter(|c| c.version > last) {
        if !c.key.starts_with(prefix) {
            continue;
        }
        events.push(match &c.value {
            Some(v) => WatchEvent::Put {
                key: c.key.clone(),
                value: decode(&c.key, v)?,
                version: c.version,
            },
            None => WatchEvent::Delete {
                key: c.key.clone(),
                version: c.version,
            },
        });
    }
    Ok((events, st.revision))
}
