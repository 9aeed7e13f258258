//! Manifest media types: the four Flotilla validates and indexes, and which of them are indexes.

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// Whether `mt` is one of the manifest types whose references we check on push.
pub fn is_known_manifest(mt: &str) -> bool {
    matches!(
        mt,
        OCI_MANIFEST | OCI_INDEX | DOCKER_MANIFEST | DOCKER_MANIFEST_LIST
    )
}

/// Whether `mt` lists other manifests (rather than a config and layers).
pub fn is_index(mt: &str) -> bool {
    matches!(mt, OCI_INDEX | DOCKER_MANIFEST_LIST)
}
