//! Tags list, catalog and referrers: the read-only listings, with `n`/`last` pagination.

use axum::response::{IntoResponse, Response};
use flotilla_core::{media, Digest, RepoName};
use http::{header, StatusCode};

use super::params::{Page, ReferrersFilter};
use super::ApiError;
use crate::NodeService;

/// Apply `n`/`last` to a sorted list; returns the page and whether more follow.
pub(crate) fn paginate<T: AsRef<str>>(items: Vec<T>, q: &Page) -> (Vec<T>, bool) {
    let mut page: Vec<T> = items
        .into_iter()
        .filter(|t| q.last.as_ref().is_none_or(|l| t.as_ref() > l.as_str()))
        .collect();
    let more = q.n.is_some_and(|n| page.len() > n);
    if let Some(n) = q.n {
        page.truncate(n);
    }
    (page, more)
}

fn next_link(base: &str, q: &Page, last: Option<&str>) -> Option<String> {
    let n = q.n?;
    Some(format!("<{base}?n={n}&last={}>; rel=\"next\"", last?))
}

pub(crate) async fn tags(
    node: &NodeService,
    repo: &RepoName,
    q: Page,
) -> Result<Response, ApiError> {
    let all: Vec<String> = node
        .list_tags(repo)
        .await?
        .into_iter()
        .map(String::from)
        .collect();
    let (page, more) = paginate(all, &q);
    let link = more
        .then(|| {
            next_link(
                &format!("/v2/{repo}/tags/list"),
                &q,
                page.last().map(String::as_str),
            )
        })
        .flatten();
    let body = serde_json::json!({ "name": repo, "tags": page });
    let mut resp = axum::Json(body).into_response();
    if let Some(l) = link.and_then(|l| l.parse().ok()) {
        resp.headers_mut().insert(header::LINK, l);
    }
    Ok(resp)
}

pub(crate) async fn catalog(node: &NodeService, q: Page) -> Result<Response, ApiError> {
    let all: Vec<String> = node
        .list_repos()
        .await?
        .into_iter()
        .map(String::from)
        .collect();
    let (page, more) = paginate(all, &q);
    let link = more
        .then(|| next_link("/v2/_catalog", &q, page.last().map(String::as_str)))
        .flatten();
    let mut resp = axum::Json(serde_json::json!({ "repositories": page })).into_response();
    if let Some(l) = link.and_then(|l| l.parse().ok()) {
        resp.headers_mut().insert(header::LINK, l);
    }
    Ok(resp)
}

pub(crate) async fn referrers(
    node: &NodeService,
    repo: &RepoName,
    subject: &Digest,
    q: ReferrersFilter,
) -> Result<Response, ApiError> {
    let filter = q.artifact_type.as_deref();
    let list = node.referrers(repo, subject, filter).await?;
    let body = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": media::OCI_INDEX,
        "manifests": list,
    });
    let mut resp = (
        StatusCode::OK,
        [(header::CONTENT_TYPE, media::OCI_INDEX)],
        body.to_string(),
    )
        .into_response();
    if filter.is_some() {
        resp.headers_mut().insert(
            "oci-filters-applied",
            http::HeaderValue::from_static("artifactType"),
        );
    }
    Ok(resp)
}
