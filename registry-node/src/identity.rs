//! The node's identity on its data directory (`node.json`): which node owns the disk, and
//! whether the disk still waits for a seeder. A node refuses a disk that names another id.

use std::io;

use flotilla_core::layout;

use crate::store::LocalStore;
use crate::{NodeConfig, NodeError};

/// `node.json`. `needs_seed` is written `true` when the file had to be created (a new or
/// wiped disk) and cleared only once a seeder has filled the disk, so a restart in the middle
/// of a reseed is still recognised as "same id, incomplete disk".
#[derive(serde::Serialize, serde::Deserialize)]
struct Identity {
    id: String,
    rack: String,
    layout: u32,
    #[serde(default)]
    needs_seed: bool,
    /// Names this disk's reseed, so a seeder resuming a reseed of the same id can tell a disk
    /// wiped again (new `seed_id`: start over) from the one it was filling.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    seed_id: Option<String>,
}

/// Check (or create) `node.json`; returns whether the disk still needs a seeder, and the id of
/// that reseed.
pub(crate) async fn check(
    store: &LocalStore,
    cfg: &NodeConfig,
) -> Result<(bool, String), NodeError> {
    let path = store.path(&layout::local_identity());
    let io_err = |source| NodeError::DataDir {
        path: path.clone(),
        source,
    };
    match tokio::fs::read(&path).await {
        Ok(bytes) => {
            let id: Identity = serde_json::from_slice(&bytes)
                .map_err(|e| io_err(io::Error::new(io::ErrorKind::InvalidData, e)))?;
            if id.id != cfg.id.as_str() {
                return Err(NodeError::IdentityMismatch {
                    expected: cfg.id.to_string(),
                    found: id.id,
                });
            }
            Ok((id.needs_seed, id.seed_id.unwrap_or_default()))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            // Only a cluster member with object storage can be seeded, so only it waits.
            let needs_seed = cfg.store_url.is_some() && cfg.meta_url.is_some();
            let seed_id = needs_seed.then(|| uuid::Uuid::new_v4().simple().to_string());
            write(store, cfg, needs_seed, seed_id.clone()).await?;
            Ok((needs_seed, seed_id.unwrap_or_default()))
        }
        Err(e) => Err(io_err(e)),
    }
}

pub(crate) async fn write(
    store: &LocalStore,
    cfg: &NodeConfig,
    needs_seed: bool,
    seed_id: Option<String>,
) -> Result<(), NodeError> {
    let path = store.path(&layout::local_identity());
    let io_err = |source| NodeError::DataDir {
        path: path.clone(),
        source,
    };
    let id = Identity {
        id: cfg.id.to_string(),
        rack: cfg.rack.to_string(),
        layout: layout::LAYOUT_VERSION,
        needs_seed,
        seed_id,
    };
    let bytes = serde_json::to_vec_pretty(&id).map_err(|e| io_err(io::Error::other(e)))?;
    crate::store::write_atomic(&store.tmp_dir(), &path, &bytes)
        .await
        .map_err(io_err)
}
