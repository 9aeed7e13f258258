//! The desired state of deployments: what the deploy agents converge their hosts to. One
//! record per service/mode (shard key), written by the router's admin API
//! (`PUT /admin/v1/deployments/{service}/{mode}`) and read by every agent; the reports of
//! what actually runs live beside it (`Keyspace::deployment`, per host, under a lease).

use std::collections::BTreeMap;

use flotilla_core::{Digest, RepoName, ShardKey, Tag};
use serde::{Deserialize, Serialize};

use crate::model::Record;

/// How long an old container may drain after SIGTERM, unless the deployment says otherwise.
pub const DEFAULT_DRAIN_SECS: u64 = 30;

/// What should run, and where.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeploymentRecord {
    pub key: ShardKey,
    /// The repository the image comes from (the key itself, or a repository under it).
    pub repository: RepoName,
    /// The tag to run; resolved to a digest by each agent, unless `digest` pins one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<Tag>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<Digest>,
    /// Deploy hosts' names (`flotilla agent --host NAME`).
    pub hosts: Vec<String>,
    #[serde(default)]
    pub container: ContainerSpec,
    /// When the admin API last wrote it (ms since the epoch).
    pub updated_ms: u64,
}

impl Record for DeploymentRecord {}

/// How the container runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerSpec {
    /// Overrides the image's command when not empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Host ports published to container ports (TCP).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PortSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<HealthSpec>,
    /// Seconds between SIGTERM and kill for the container being replaced.
    #[serde(default = "default_drain_secs")]
    pub drain_secs: u64,
}

fn default_drain_secs() -> u64 {
    DEFAULT_DRAIN_SECS
}

impl Default for ContainerSpec {
    fn default() -> Self {
        ContainerSpec {
            command: Vec::new(),
            env: BTreeMap::new(),
            ports: Vec::new(),
            health: None,
            drain_secs: DEFAULT_DRAIN_SECS,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortSpec {
    pub host: u16,
    pub container: u16,
}

/// A health check run inside the container (the engine's `Healthcheck`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthSpec {
    /// Run with the container's shell (`CMD-SHELL`); exit 0 is healthy.
    pub command: String,
    #[serde(default = "one")]
    pub interval_secs: u64,
    /// How long the new container may take to become healthy before it is rolled back.
    #[serde(default = "sixty")]
    pub timeout_secs: u64,
}

fn one() -> u64 {
    1
}

fn sixty() -> u64 {
    60
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_minimal_body_gets_the_defaults_and_round_trips() {
        let rec: DeploymentRecord = serde_json::from_str(
            r#"{"key":"billing/api","repository":"billing/api","tag":"v1","hosts":["h1"],"updated_ms":1}"#,
        )
        .unwrap();
        assert_eq!(rec.container.drain_secs, DEFAULT_DRAIN_SECS);
        let back = DeploymentRecord::decode("k", &rec.encode()).unwrap();
        assert_eq!(back, rec);
    }
}
