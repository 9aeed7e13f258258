//! Flotilla's shared vocabulary.
//!
//! Brief overview:
//! - [`Digest`], [`RepoName`], [`Tag`], [`Reference`], [`ShardKey`], [`NodeId`], [`RackId`],
//!   [`UploadId`]: identifiers parsed once at the edge and valid by construction (the only
//!   constructors are `FromStr`/`TryFrom`, serde goes through them too).
//! - [`DigestHasher`]: incremental hashing for the algorithms a [`Digest`] may name.
//! - [`layout`]: the only place that turns identifiers into storage keys.
//! - [`ErrorCode`]: the OCI Distribution error codes with their HTTP status.
//! - [`media`]: the manifest media types Flotilla understands.
//!
//! This crate does no I/O and knows nothing about HTTP servers, tokio or storage backends.

mod digest;
mod errcode;
pub mod glob;
pub mod layout;
pub mod media;
mod names;
mod time;

pub use digest::{Algorithm, Digest, DigestHasher};
pub use errcode::ErrorCode;
pub use names::{NodeId, ParseError, RackId, Reference, RepoName, ShardKey, Tag, UploadId};
pub use time::rfc3339;
