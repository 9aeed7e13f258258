//! The open connections, so that a full server makes room instead of hanging: at the cap a
//! new connection evicts the one that has had no request in flight the longest (an idle
//! keep-alive, or a slow client still dribbling its headers, which costs nothing to drop),
//! and only when every connection is busy (or idle for less than [`EVICT_MIN_IDLE`], i.e.
//! probably just sending its request) is the newcomer refused with a 429. Each connection's
//! activity is kept here too, for the idle timeout.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio_util::sync::CancellationToken;

const NO_HEAD: u64 = u64::MAX;

/// A connection idle for less than this is not evicted: it has most likely just connected
/// and its request head is on the way.
pub(crate) const EVICT_MIN_IDLE: std::time::Duration = std::time::Duration::from_millis(100);

/// One connection's state, shared by its task, its in-flight requests and the registry.
#[derive(Debug)]
pub(crate) struct Slot {
    id: u64,
    /// Requests whose response (body included) has not finished.
    busy: AtomicUsize,
    /// Milliseconds since `epoch` at the last start or end of a request.
    last_active_ms: AtomicU64,
    /// Milliseconds since `epoch` when the request head now awaited began: the connection's
    /// start for its first request, else the first byte read while idle; `NO_HEAD` when none
    /// is pending (a kept-alive connection waiting quietly, or a request in flight).
    head_since_ms: AtomicU64,
    epoch: Instant,
    /// Cancelled when the registry evicts this connection.
    pub(crate) evicted: CancellationToken,
}

impl Slot {
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Marks a request in flight until the returned guard is dropped.
    pub(crate) fn begin(self: &Arc<Self>) -> Busy {
        self.busy.fetch_add(1, Ordering::AcqRel);
        self.head_since_ms.store(NO_HEAD, Ordering::Release);
        self.last_active_ms.store(self.now_ms(), Ordering::Release);
        Busy(self.clone())
    }

    /// Bytes arrived: if no request is in flight they start a request head, whose deadline
    /// is the header read timeout.
    pub(crate) fn bytes_read(&self) {
        if self.is_idle() {
            let _ = self.head_since_ms.compare_exchange(
                NO_HEAD,
                self.now_ms(),
                Ordering::AcqRel,
                Ordering::Acquire,
            );
        }
    }

    /// How long the request head now awaited has been coming, if one is.
    pub(crate) fn head_pending_for(&self) -> Option<std::time::Duration> {
        let since = self.head_since_ms.load(Ordering::Acquire);
        (since != NO_HEAD && self.is_idle())
            .then(|| std::time::Duration::from_millis(self.now_ms().saturating_sub(since)))
    }

    fn is_idle(&self) -> bool {
        self.busy.load(Ordering::Acquire) == 0
    }

    /// How long the connection has had no request in flight (zero while one is).
    pub(crate) fn idle_for(&self) -> std::time::Duration {
        if !self.is_idle() {
            return std::time::Duration::ZERO;
        }
        let since = self
            .now_ms()
            .saturating_sub(self.last_active_ms.load(Ordering::Acquire));
        std::time::Duration::from_millis(since)
    }
}

/// A request in flight on a connection; dropped when its response body ends.
#[derive(Debug)]
pub(crate) struct Busy(Arc<Slot>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0
            .last_active_ms
            .store(self.0.now_ms(), Ordering::Release);
        self.0.busy.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Every open connection by age (ids increase), capped at `cap`.
#[derive(Debug)]
pub(crate) struct Registry {
    cap: usize,
    next: AtomicU64,
    epoch: Instant,
    slots: Mutex<BTreeMap<u64, Arc<Slot>>>,
}

/// What the accept loop does with a new connection.
#[derive(Debug)]
pub(crate) enum Admit {
    /// Serve it.
    Open(Arc<Slot>),
    /// Serve it; an idle connection was evicted to make room.
    Evicted(Arc<Slot>),
    /// Every connection is busy: answer 429 and close.
    Full,
}

impl Registry {
    pub(crate) fn new(cap: usize) -> Self {
        Registry {
            cap: cap.max(1),
            next: AtomicU64::new(0),
            epoch: Instant::now(),
            slots: Mutex::default(),
        }
    }

    pub(crate) fn cap(&self) -> usize {
        self.cap
    }

    pub(crate) fn len(&self) -> usize {
        self.slots.lock().map(|s| s.len()).unwrap_or(0)
    }

    pub(crate) fn admit(&self) -> Admit {
        let Ok(mut slots) = self.slots.lock() else {
            return Admit::Full;
        };
        let mut evicted = false;
        if slots.len() >= self.cap {
            // Idle longest first: the connection least likely to be about to send a request.
            let victim = slots
                .iter()
                .map(|(id, s)| (s.idle_for(), *id))
                .filter(|(idle, _)| *idle >= EVICT_MIN_IDLE)
                .max()
                .map(|(_, id)| id);
            match victim.and_then(|id| slots.remove(&id)) {
                Some(v) => {
                    v.evicted.cancel();
                    evicted = true;
                }
                None => return Admit::Full,
            }
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let now = self.epoch.elapsed().as_millis() as u64;
        let slot = Arc::new(Slot {
            id,
            busy: AtomicUsize::new(0),
            last_active_ms: AtomicU64::new(now),
            // A new connection owes its first request head from the start.
            head_since_ms: AtomicU64::new(now),
            epoch: self.epoch,
            evicted: CancellationToken::new(),
        });
        slots.insert(id, slot.clone());
        if evicted {
            Admit::Evicted(slot)
        } else {
            Admit::Open(slot)
        }
    }

    pub(crate) fn remove(&self, slot: &Slot) {
        if let Ok(mut slots) = self.slots.lock() {
            slots.remove(&slot.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(a: Admit) -> Arc<Slot> {
        match a {
            Admit::Open(s) | Admit::Evicted(s) => s,
            Admit::Full => panic!("expected a slot"),
        }
    }

    #[test]
    fn full_registry_evicts_the_longest_idle_then_refuses_when_all_busy() {
        let r = Registry::new(2);
        let a = slot(r.admit());
        let b = slot(r.admit());
        // Both just connected: nobody is evicted yet.
        std::thread::sleep(EVICT_MIN_IDLE / 10);
        assert!(matches!(r.admit(), Admit::Full));
        std::thread::sleep(EVICT_MIN_IDLE);
        let _busy_a = a.begin();
        // b is idle, a is busy: b goes.
        let c = match r.admit() {
            Admit::Evicted(c) => c,
            other => panic!("expected an eviction, got {other:?}"),
        };
        assert!(b.evicted.is_cancelled());
        assert!(!a.evicted.is_cancelled());
        let _busy_c = c.begin();
        assert!(matches!(r.admit(), Admit::Full));
        assert_eq!(r.len(), 2);
        r.remove(&a);
        assert!(matches!(r.admit(), Admit::Open(_)));
    }

    #[test]
    fn busy_connection_is_never_idle() {
        let r = Registry::new(1);
        let a = slot(r.admit());
        let g = a.begin();
        assert_eq!(a.idle_for(), std::time::Duration::ZERO);
        drop(g);
        assert!(a.is_idle());
    }

    #[test]
    fn a_head_is_pending_from_connect_and_from_the_first_idle_byte_only() {
        let r = Registry::new(1);
        let a = slot(r.admit());
        assert!(
            a.head_pending_for().is_some(),
            "the first head is owed at once"
        );
        let g = a.begin();
        assert_eq!(a.head_pending_for(), None);
        a.bytes_read(); // body bytes of the request in flight
        drop(g);
        assert_eq!(a.head_pending_for(), None, "kept alive, waiting quietly");
        a.bytes_read();
        assert!(a.head_pending_for().is_some(), "the next head has begun");
    }
}
