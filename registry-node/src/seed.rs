//! Seeding on the node side: copy everything object storage holds for a repository onto
//! this disk, verified (what the seeder asks for through `POST /internal/v1/seed`).
//!
//! Why the node does the copying rather than the seeder: the node already owns the one code
//! path that fetches, hashes and commits object-storage bytes (`read::through`), so a seeded
//! blob goes through exactly the verification a client read does, and the seeder stays a
//! coordinator that moves no bytes.

use bytes::Bytes;
use flotilla_core::layout::{self, RemoteRepoObject};
use flotilla_core::{Digest, RepoName, Tag};
use futures::StreamExt;
use registry_client::internal::SeedStats;

use crate::read::verify::{file_matches, quarantine, repair};
use crate::service::ServiceError;
use crate::store::{io_err, ReferrerDescriptor, StoreError};
use crate::NodeService;

/// Make sure a verified copy of `d` is on disk; returns (size, fetched bytes), or `None` when
/// object storage does not hold it.
async fn ensure_blob(
    node: &NodeService,
    d: &Digest,
    verify: bool,
) -> Result<Option<(u64, u64)>, ServiceError> {
    let store = node.store();
    let path = store.path(&layout::local_blob(d));
    if let Some(size) = store.blob_size(d).await? {
        if !verify {
            return Ok(Some((size, 0)));
        }
        match file_matches(node, &path, d, 0, None)
            .await
            .map_err(io_err(&path))?
        {
            Some(true) => return Ok(Some((size, 0))),
            Some(false) => quarantine(node, d).await?,
            None => {}
        }
    }
    match repair(node, d).await {
        Ok(()) => {}
        Err(ServiceError::Store(StoreError::BlobUnknown(_))) => return Ok(None),
        Err(e) => return Err(e),
    }
    let size = store.blob_size(d).await?.unwrap_or(0);
    Ok(Some((size, size)))
}

/// Copy everything object storage holds for `repo` onto this disk, verified: blobs, then
/// manifests (with their revision links and referrer entries), then tags — the order a push
/// makes them visible. Idempotent: what is already present and verifies is not fetched again,
/// so a seeder that resumes simply asks again. With `verify`, blobs already on disk are
/// re-hashed (a partial disk may hold damaged files); without, their presence suffices.
pub(crate) async fn seed_repo(
    node: &NodeService,
    repo: &RepoName,
    concurrency: usize,
    verify: bool,
) -> Result<SeedStats, ServiceError> {
    let Some(remote) = node.remote() else {
        return Ok(SeedStats::default());
    };
    let keys = remote.list_keys(&layout::remote_repo_dir(repo)).await?;
    let mut tags: Vec<Tag> = Vec::new();
    let mut manifests: Vec<Digest> = Vec::new();
    let mut blobs: Vec<Digest> = Vec::new();
    for k in keys {
        match layout::parse_remote_repo_key(&k) {
            // A nested repository's key is not this repository's.
            Some((r, _)) if &r != repo => {}
            Some((_, RemoteRepoObject::Tag(t))) => tags.push(t),
            Some((_, RemoteRepoObject::ManifestLink(d))) => manifests.push(d),
            Some((_, RemoteRepoObject::BlobLink(d))) => blobs.push(d),
            None => {}
        }
    }
    let mut stats = SeedStats::default();
    let concurrency = concurrency.max(1);
    let store = node.store();

    let mut results = futures::stream::iter(blobs.into_iter().map(|d| {
        let (node, repo) = (node.clone(), repo.clone());
        async move {
            let got = ensure_blob(&node, &d, verify).await?;
            if got.is_some() {
                node.store().link_layer(&repo, &d).await?;
            }
            Ok::<_, ServiceError>(got)
        }
    }))
    .buffer_unordered(concurrency);
    while let Some(r) = results.next().await {
        stats.count(r?);
    }
    drop(results);

    let limit = node.config().manifest_max_bytes as u64;
    let mut results = futures::stream::iter(manifests.into_iter().map(|d| {
        let (node, repo) = (node.clone(), repo.clone());
        async move { seed_manifest(&node, &repo, &d, limit).await }
    }))
    .buffer_unordered(concurrency);
    while let Some(r) = results.next().await {
        stats.count(r?);
    }
    drop(results);

    for tag in &tags {
        // Under the tag's lock, read now: a write arriving while the seed runs (a joining
        // node takes them) is never replaced by the value object storage held before it.
        let _guard = node.inner.tag_locks.lock(repo, tag).await;
        let Some(bytes) = remote
            .get_bytes(&layout::remote_tag(repo, tag), 1024)
            .await?
        else {
            continue; // deleted since the listing
        };
        let Ok(d) = String::from_utf8_lossy(&bytes).trim().parse::<Digest>() else {
            tracing::error!(%repo, %tag, "tag object in object storage does not hold a digest");
            continue;
        };
        if store.get_tag(repo, tag).await?.as_ref() != Some(&d) {
            store.put_tag(repo, tag, &d).await?;
        }
        stats.objects += 1;
    }
    metrics::counter!("flotilla_node_seed_objects_total").increment(stats.objects);
    metrics::counter!("flotilla_node_seed_bytes_total").increment(stats.fetched_bytes);
    Ok(stats)
}

async fn seed_manifest(
    node: &NodeService,
    repo: &RepoName,
    d: &Digest,
    limit: u64,
) -> Result<Option<(u64, u64)>, ServiceError> {
    let store = node.store();
    let Some(remote) = node.remote() else {
        return Ok(None);
    };
    let Some(mt) = remote
        .get_bytes(&layout::remote_manifest_link(repo, d), 4096)
        .await?
    else {
        return Ok(None); // deleted since the listing
    };
    let media_type = String::from_utf8_lossy(&mt).into_owned();
    let mut fetched = 0;
    let bytes = match store.read_blob_bytes(d, limit).await {
        Ok(b) if Digest::of(d.algorithm(), &b) == *d => Bytes::from(b),
        other => {
            if other.is_ok() {
                quarantine(node, d).await?;
            }
            let Some(b) = remote.get_bytes(&layout::remote_blob(d), limit).await? else {
                return Ok(None);
            };
            if Digest::of(d.algorithm(), &b) != *d {
                tracing::error!(digest = %d, "object storage holds a corrupt manifest; not seeded");
                return Err(ServiceError::CorruptRemote(d.clone()));
            }
            store.put_blob_bytes(d, &b).await?;
            fetched = b.len() as u64;
            b
        }
    };
    if store.manifest_media_type(repo, d).await?.is_none() {
        store.link_manifest(repo, d, &media_type).await?;
    }
    if let Ok(m) = crate::manifest::parse(&bytes, Some(&media_type)) {
        if let Some(subject) = &m.subject {
            let desc = ReferrerDescriptor {
                media_type: m.media_type.clone(),
                digest: d.clone(),
                size: bytes.len() as u64,
                artifact_type: m.artifact_type.clone(),
                annotations: m.annotations.clone(),
            };
            store.put_referrer(repo, subject, &desc).await?;
        }
    }
    Ok(Some((bytes.len() as u64, fetched)))
}
