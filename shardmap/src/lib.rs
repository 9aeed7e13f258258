//! Flotilla's shard map: where every service/mode (shard key) lives, and the metadata stores
//! that hold that map.
//!
//! # Brief overview
//!
//! - [`model`]: the versioned records ([`NodeRecord`], [`ShardRecord`]) and the key layout
//!   ([`Keyspace`]) under the store prefix (default `flotilla/`).
//! - [`seeder`]: the seeder's work records ([`ReseedRecord`], [`MoveRecord`],
//!   [`SeederLeader`]), written by the seeder and read by the router's admin API.
//! - [`placement`]: pure, deterministic placement — [`place`] picks RF rack-distinct, balanced
//!   replicas for a new key; [`plan_add_node`] / [`plan_remove_node`] compute the minimal
//!   [`Move`]s after a membership change. No I/O.
//! - [`store`]: the [`MetaStore`] trait (get/put/CAS/delete/list/watch, leases, locks), its
//!   backends chosen by a [`MetaUrl`] through [`open`] (`file://` embedded, `consul://`, `etcd://`), and
//!   [`ShardMap`], typed helpers every backend shares.
//! - `testsuite` (feature `testsuite`): the conformance suite every backend runs.

pub mod deploy;
pub mod model;
pub mod placement;
pub mod seeder;
pub mod store;
#[cfg(feature = "testsuite")]
pub mod testsuite;

/// The key prefix every Flotilla component uses unless configured otherwise.
pub const DEFAULT_PREFIX: &str = "flotilla/";

/// The shard key depth a new cluster gets (service/mode); the stored value
/// ([`ShardMap::key_depth`]) wins from then on.
pub const DEFAULT_KEY_DEPTH: std::num::NonZeroUsize = match std::num::NonZeroUsize::new(2) {
    Some(d) => d,
    None => std::num::NonZeroUsize::MIN,
};

pub use deploy::{ContainerSpec, DeploymentRecord, HealthSpec, PortSpec};
pub use model::{Keyspace, NodeRecord, NodeState, Record, RecordError, ShardRecord, Versioned};
pub use placement::{
    place, plan_add_node, plan_remove_node, rendezvous, Loads, Move, NodeInfo, Placement,
    PlacementError,
};
pub use seeder::{MoveReason, MoveRecord, ReseedRecord, ReseedStatus, SeederLeader};
pub use store::{
    open, Conflict, Entry, Lease, MetaStore, MetaUrl, MetaUrlError, ShardMap, StoreError,
    Unreadable, Version, WatchEvent,
};
