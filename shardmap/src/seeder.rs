//! The seeder's records in the metadata store, beside their keys in [`Keyspace`]: the seeder
//! writes them and the router's admin API reads them, so both share these types. One
//! [`ReseedRecord`] per node under `reseed/<node>` and one [`MoveRecord`] per shard move
//! under `moves/<key>` (versioned JSON, `"v": 1`, through [`Record`]), and the unversioned
//! [`SeederLeader`] under `seeder/leader`. Everything a new leader needs to resume lives
//! here, never only in a leader's memory. Field names are the stored format: renaming one
//! is a data migration. Unknown fields are ignored so an older reader still decodes a record
//! a newer seeder wrote.
//!
//! [`Keyspace`]: crate::Keyspace

use flotilla_core::{NodeId, RepoName, ShardKey};
use serde::{Deserialize, Serialize};

use crate::Record;

/// Where a node's reseed stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReseedStatus {
    Seeding,
    Done,
}

/// Progress of reseeding one node from object storage (what `GET /admin/v1/reseed` shows).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ReseedRecord {
    pub node: NodeId,
    /// The node's `seed_id` (from its identity file): a different one means the disk was
    /// wiped again and the reseed starts over.
    pub seed_id: String,
    pub status: ReseedStatus,
    pub started_ms: u64,
    pub updated_ms: u64,
    #[serde(default)]
    pub finished_ms: Option<u64>,
    pub shards_total: u64,
    /// Shards completely seeded, in order.
    pub shards_done: Vec<ShardKey>,
    /// Repositories seeded of the shard in progress (cleared when it completes).
    #[serde(default)]
    pub repos_done: Vec<RepoName>,
    pub objects_total: u64,
    pub objects_done: u64,
    pub bytes_done: u64,
    pub bytes_per_sec: f64,
    pub objects_per_sec: f64,
    /// Seconds to go at the current object rate (`None` until a rate is known).
    #[serde(default)]
    pub eta_secs: Option<f64>,
    /// The seeder instance that wrote this version (changes when a successor resumes).
    pub seeder: String,
    #[serde(default)]
    pub last_error: Option<String>,
}

impl Record for ReseedRecord {}

impl ReseedRecord {
    /// Recompute rate and ETA from the counters and the time spent so far.
    pub fn update_rates(&mut self, now_ms: u64) {
        self.updated_ms = now_ms;
        let secs = (now_ms.saturating_sub(self.started_ms) as f64 / 1000.0).max(0.001);
        self.bytes_per_sec = self.bytes_done as f64 / secs;
        self.objects_per_sec = self.objects_done as f64 / secs;
        self.eta_secs = (self.objects_per_sec > 0.0).then(|| {
            self.objects_total.saturating_sub(self.objects_done) as f64 / self.objects_per_sec
        });
    }
}

/// Why a replica moves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MoveReason {
    /// `from` has been absent from `nodes/` longer than `replace_after`.
    Replace,
    /// An operator drained `from`.
    Drain,
    /// `to` holds less than its fair share.
    Rebalance,
}

impl MoveReason {
    pub fn as_str(self) -> &'static str {
        match self {
            MoveReason::Replace => "replace",
            MoveReason::Drain => "drain",
            MoveReason::Rebalance => "rebalance",
        }
    }
}

/// One replica move in flight: add `to` as joining → seed it → swap it in for `from`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MoveRecord {
    pub key: ShardKey,
    pub from: NodeId,
    pub to: NodeId,
    pub reason: MoveReason,
    pub started_ms: u64,
    pub updated_ms: u64,
    /// When `to` was added to the shard's `joining` (routers need a refresh interval to see it
    /// before the final seeding pass, so no write slips between that pass and the swap).
    #[serde(default)]
    pub joined_ms: Option<u64>,
    pub repos_total: u64,
    pub repos_done: u64,
    pub objects_done: u64,
    pub bytes_done: u64,
    pub seeder: String,
    #[serde(default)]
    pub last_error: Option<String>,
}

impl Record for MoveRecord {}

/// The acting seeder, bound to its lease so it vanishes when the leader dies. Written as
/// plain JSON without `"v"` (it never outlives one leader's term, so there is nothing to
/// migrate).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeederLeader {
    /// The seeder instance's name.
    pub id: String,
    /// When it took the lock, ms since the Unix epoch.
    pub since_ms: u64,
}

impl SeederLeader {
    pub fn encode(&self) -> Vec<u8> {
        // A struct of a string and an integer always serialises.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// `None` for bytes that are not a leader record (the admin API then shows no leader).
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        serde_json::from_slice(bytes).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_and_eta() {
        let mut r = ReseedRecord {
            node: "n1".parse().unwrap(),
            seed_id: "s".into(),
            status: ReseedStatus::Seeding,
            started_ms: 1_000,
            updated_ms: 1_000,
            finished_ms: None,
            shards_total: 2,
            shards_done: vec![],
            repos_done: vec![],
            objects_total: 30,
            objects_done: 10,
            bytes_done: 4_000,
            bytes_per_sec: 0.0,
            objects_per_sec: 0.0,
            eta_secs: None,
            seeder: "a".into(),
            last_error: None,
        };
        r.update_rates(3_000);
        assert_eq!(r.bytes_per_sec, 2_000.0);
        assert_eq!(r.objects_per_sec, 5.0);
        assert_eq!(r.eta_secs, Some(4.0));
        let bytes = r.encode();
        let back = ReseedRecord::decode("k", &bytes).unwrap();
        assert_eq!(back.objects_done, 10);
        assert_eq!(back.status, ReseedStatus::Seeding);
    }

    /// The stored field names are a format: pin them, and that unknown fields are ignored.
    #[test]
    fn stored_format_is_pinned() {
        let stored = br#"{"v":1,"key":"billing/api","from":"n1","to":"n3","reason":"drain",
            "started_ms":1,"updated_ms":2,"joined_ms":null,"repos_total":3,"repos_done":1,
            "objects_done":4,"bytes_done":5,"seeder":"s1","last_error":null,"future":true}"#;
        let m = MoveRecord::decode("k", stored).unwrap();
        assert_eq!(m.reason, MoveReason::Drain);
        assert_eq!(m.to.as_str(), "n3");
        let leader = SeederLeader::decode(br#"{"id":"s1","since_ms":9,"extra":1}"#).unwrap();
        assert_eq!(leader.since_ms, 9);
        assert_eq!(leader.encode(), br#"{"id":"s1","since_ms":9}"#);
    }
}
