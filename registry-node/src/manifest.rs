//! Manifest parsing and validation: what a pushed manifest is, and what it references.

use flotilla_core::{media, Digest};
use serde::Deserialize;

/// Why a manifest body was refused.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("manifest is not valid JSON: {0}")]
    Json(String),
    #[error("manifest invalid: {0}")]
    Invalid(String),
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawDescriptor {
    media_type: Option<String>,
    digest: String,
    size: Option<i64>,
    #[serde(default)]
    urls: Vec<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawManifest {
    schema_version: Option<i64>,
    media_type: Option<String>,
    artifact_type: Option<String>,
    config: Option<RawDescriptor>,
    #[serde(default)]
    layers: Vec<RawDescriptor>,
    manifests: Option<Vec<RawDescriptor>>,
    subject: Option<RawDescriptor>,
    annotations: Option<serde_json::Map<String, serde_json::Value>>,
}

/// The facts about a manifest that the registry acts on.
#[derive(Debug)]
pub struct Manifest {
    pub media_type: String,
    /// Blobs (config and layers) the repository must hold.
    pub blobs: Vec<Digest>,
    /// Child manifests (of an index) the repository must hold.
    pub manifests: Vec<Digest>,
    pub subject: Option<Digest>,
    /// `artifactType`, or for an image manifest without one its config media type, as the
    /// referrers API reports it.
    pub artifact_type: Option<String>,
    pub annotations: Option<serde_json::Map<String, serde_json::Value>>,
}

fn descriptor_digest(d: &RawDescriptor, what: &str) -> Result<Digest, ManifestError> {
    if d.size.is_some_and(|s| s < 0) {
        return Err(ManifestError::Invalid(format!(
            "{what} has a negative size"
        )));
    }
    d.digest
        .parse()
        .map_err(|e| ManifestError::Invalid(format!("{what}: {e}")))
}

/// Parse and validate a manifest body. `content_type` is the request's `Content-Type`; when
/// both it and the body's `mediaType` are present they must agree.
pub fn parse(bytes: &[u8], content_type: Option<&str>) -> Result<Manifest, ManifestError> {
    let raw: RawManifest =
        serde_json::from_slice(bytes).map_err(|e| ManifestError::Json(e.to_string()))?;
    let content_type = content_type
        .map(|c| c.split(';').next().unwrap_or("").trim())
        .filter(|c| !c.is_empty() && *c != "application/json" && *c != "application/octet-stream");
    let media_type = match (content_type, raw.media_type.as_deref()) {
        (Some(c), Some(b)) if c != b => {
            return Err(ManifestError::Invalid(format!(
                "Content-Type {c} does not match the manifest's mediaType {b}"
            )))
        }
        (Some(c), _) => c.to_owned(),
        (None, Some(b)) => b.to_owned(),
        (None, None) if raw.manifests.is_some() => media::OCI_INDEX.to_owned(),
        (None, None) => media::OCI_MANIFEST.to_owned(),
    };
    if media_type.starts_with("application/vnd.docker.distribution.manifest.v1+") {
        return Err(ManifestError::Invalid(
            "Docker schema 1 manifests are not supported".into(),
        ));
    }
    if media::is_known_manifest(&media_type) && raw.schema_version != Some(2) {
        return Err(ManifestError::Invalid("schemaVersion must be 2".into()));
    }
    let mut blobs = Vec::new();
    let mut manifests = Vec::new();
    if media::is_index(&media_type) {
        let list = raw
            .manifests
            .as_ref()
            .ok_or_else(|| ManifestError::Invalid("an index needs a manifests array".into()))?;
        for m in list {
            manifests.push(descriptor_digest(m, "manifests[]")?);
        }
    } else if media::is_known_manifest(&media_type) {
        let config = raw
            .config
            .as_ref()
            .ok_or_else(|| ManifestError::Invalid("an image manifest needs a config".into()))?;
        blobs.push(descriptor_digest(config, "config")?);
        for l in &raw.layers {
            let d = descriptor_digest(l, "layers[]")?;
            // Non-distributable layers live at their `urls`, not in the registry.
            if l.urls.is_empty() {
                blobs.push(d);
            }
        }
    }
    let subject = raw
        .subject
        .as_ref()
        .map(|s| descriptor_digest(s, "subject"))
        .transpose()?;
    let artifact_type = raw.artifact_type.clone().or_else(|| {
        raw.config
            .as_ref()
            .and_then(|c| c.media_type.clone())
            .filter(|_| !media::is_index(&media_type))
    });
    Ok(Manifest {
        media_type,
        blobs,
        manifests,
        subject,
        artifact_type,
        annotations: raw.annotations,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(c: char) -> String {
        format!("sha256:{}", c.to_string().repeat(64))
    }

    #[test]
    fn image_manifest_references() {
        let body = format!(
            r#"{{"schemaVersion":2,"mediaType":"{}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{}","size":2}},"layers":[{{"digest":"{}","size":3}},{{"digest":"{}","size":3,"urls":["http://x"]}}],"subject":{{"digest":"{}","size":1}}}}"#,
            media::OCI_MANIFEST,
            d('a'),
            d('b'),
            d('c'),
            d('e')
        );
        let m = parse(body.as_bytes(), Some(media::OCI_MANIFEST)).unwrap();
        assert_eq!(m.blobs.len(), 2, "foreign layer skipped");
        assert_eq!(m.subject.unwrap().to_string(), d('e'));
        assert_eq!(
            m.artifact_type.as_deref(),
            Some("application/vnd.oci.image.config.v1+json")
        );
    }

    #[test]
    fn refusals() {
        for (body, ct) in [
            ("not json", None),
            (
                r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json"}"#,
                None,
            ),
            (
                r#"{"schemaVersion":1,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"digest":"sha256:aa","size":1}}"#,
                None,
            ),
            (
                r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json"}"#,
                Some(media::OCI_INDEX),
            ),
            (
                r#"{"schemaVersion":2,"config":{"digest":"sha256:zz","size":1},"layers":[]}"#,
                None,
            ),
        ] {
            assert!(parse(body.as_bytes(), ct).is_err(), "{body}");
        }
    }

    #[test]
    fn media_type_inference() {
        let idx = format!(
            r#"{{"schemaVersion":2,"manifests":[{{"digest":"{}","size":1}}]}}"#,
            d('a')
        );
        assert_eq!(
            parse(idx.as_bytes(), None).unwrap().media_type,
            media::OCI_INDEX
        );
        let m = parse(idx.as_bytes(), None).unwrap();
        assert_eq!(m.manifests.len(), 1);
    }
}
