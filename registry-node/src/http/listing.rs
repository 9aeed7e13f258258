//! Tags list, catalog and referrers: the read-only listings, with `n`/`last` pagination.

use axum::response::{IntoResponse, Response};
use flotilla_core::{media, Digest, ErrorCode, RepoName};
use http::{header, StatusCode};

use std::collections::HashMap;

use super::ApiError;

type Query = HashMap<String, String>;
use crate::NodeService;

/// Apply `n`/`last` to a sorted list; returns the page and whether more follow.
pub fn paginate<T: AsRef<str>>(items: Vec<T>, q: &Query) -> Result<(Vec<T>, bool), ApiError> {
    let n = q
        .get("n")
        .map(|v| {
            v.parse::<usize>().map_err(|_| {
                ApiError::new(ErrorCode::SizeInvalid).message("n must be a non-negative integer")
            })
        })
        .transpose()?;
    let last = q.get("last");
    let mut page: Vec<T> = items
        .into_iter()
        .filter(|t| last.is_none_or(|l| t.as_ref() > l.as_str()))
        .collect();
    let more = n.is_some_and(|n| page.len() > n);
    if let Some(n) = n {
        page.truncate(n);
    }
    Ok((page, more))
}

fn next_link(base: &str, q: &Query, last: Option<&str>) -> Option<String> {
    let n = q.get("n")?;
    Some(format!("<{base}?n={n}&last={}>; rel=\"next\"", last?))
}

pub async fn tags(node: &NodeService, repo: &RepoName, q: &Query) -> Result<Response, ApiError> {
    let all: Vec<String> = node
        .list_tags(repo)
        .await?
        .into_iter()
        .map(String::from)
        .collect();
    let (page, more) = paginate(all, q)?;
    let link = more
        .then(|| {
            next_link(
                &format!("/v2/{repo}/tags/list"),
                q,
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

pub async fn catalog(node: &NodeService, q: &Query) -> Result<Response, ApiError> {
    let all: Vec<String> = node
        .list_repos()
        .await?
        .into_iter()
        .map(String::from)
        .collect();
    let (page, more) = paginate(all, q)?;
    let link = more
        .then(|| next_link("/v2/_catalog", q, page.last().map(String::as_str)))
        .flatten();
    let mut resp = axum::Json(serde_json::json!({ "repositories": page })).into_response();
    if let Some(l) = link.and_then(|l| l.parse().ok()) {
        resp.headers_mut().insert(header::LINK, l);
    }
    Ok(resp)
}

pub async fn referrers(
    node: &NodeService,
    repo: &RepoName,
    subject: &Digest,
    q: &Query,
) -> Result<Response, ApiError> {
    let filter = q.get("artifactType").map(String::as_str);
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
