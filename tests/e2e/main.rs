//! End-to-end tests: one integration binary, a module per area, all over real HTTP against
//! real `flotilla` processes (and real clients: skopeo, podman, the Docker engine).

mod cluster_support;
mod compose_load;
mod compose_support;
#[path = "../../shardmap/tests/consul_standin/mod.rs"]
mod consul_standin;
mod etcdsupport;
mod s3support;
mod support;

mod agent;
mod auth;
mod bench_smoke;
mod clients;
mod cluster;
mod compose;
mod config;
mod control;
mod crash;
mod dev;
mod drills;
mod events;
mod faults;
mod history;
mod hostile;
mod limits;
mod recovery;
mod s3;
mod spec;
mod tls;
