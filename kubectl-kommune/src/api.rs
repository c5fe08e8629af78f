//! The operator's outputs API as the plugin calls it: the listing of a job's outputs and one
//! output's bytes, with the operator's refusals turned into messages a user can act on.

use http::StatusCode;
use http_body_util::BodyExt as _;
use kommune_operator::web::results::OutputList;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 401, 403 or 404, with the operator's explanation.
    #[error("{status}: {message}")]
    Refused { status: StatusCode, message: String },
    /// 503: the operator stores no outputs (or cannot read them now).
    #[error("the operator cannot serve outputs: {0}")]
    Unavailable(String),
    #[error("cannot reach the operator: {0}")]
    Transport(String),
    #[error("unexpected answer from the operator: {0}")]
    Protocol(String),
}

/// One output's bytes: from the operator, or from the URL it redirected to.
pub enum Fetched {
    Body(kube::client::Body),
    Redirect(String),
}

/// Percent-encodes one path segment (everything but RFC 3986's unreserved characters), so a
/// name with spaces, `%`, `?` or `#` reaches the operator as it is.
pub fn encode_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The listing's path for job `namespace/name`.
pub fn outputs_path(namespace: &str, job: &str) -> String {
    format!("/api/v1/namespaces/{}/computejobs/{}/outputs", encode_segment(namespace), encode_segment(job))
}

/// One output's path; the output's own `/` separators stay (the operator's route takes the rest
/// of the path as the name), each segment between them is encoded.
pub fn output_path(namespace: &str, job: &str, task: u32, name: &str) -> String {
    let name: Vec<String> = name.split('/').map(encode_segment).collect();
    format!("{}/{task}/{}", outputs_path(namespace, job), name.join("/"))
}

async fn send(client: &kube::Client, path: &str) -> Result<http::Response<kube::client::Body>, ApiError> {
    let req = http::Request::get(path).body(Vec::new()).map_err(|e| ApiError::Protocol(e.to_string()))?.map(kube::client::Body::from);
    client.send(req).await.map_err(|e| ApiError::Transport(crate::connect::describe_transport_error(&e)))
}

/// The operator's `{"error": ...}` message, else the body as text.
async fn refusal(status: StatusCode, body: kube::client::Body) -> ApiError {
    let bytes = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let message = serde_json::from_slice::<serde_json::Value>(&bytes)
        .ok()
        .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
        .unwrap_or_else(|| String::from_utf8_lossy(&bytes).trim().to_string());
    if status == StatusCode::SERVICE_UNAVAILABLE { ApiError::Unavailable(message) } else { ApiError::Refused { status, message } }
}

/// Every stored output of job `namespace/job`.
pub async fn list_outputs(client: &kube::Client, namespace: &str, job: &str) -> Result<OutputList, ApiError> {
    let resp = send(client, &outputs_path(namespace, job)).await?;
    let (parts, body) = resp.into_parts();
    if !parts.status.is_success() {
        return Err(refusal(parts.status, body).await);
    }
    let bytes = body.collect().await.map_err(|e| ApiError::Transport(e.to_string()))?.to_bytes();
    serde_json::from_slice(&bytes).map_err(|e| ApiError::Protocol(format!("the listing is not what this plugin expects: {e}")))
}

/// Opens one output: its body, or the URL to fetch it from (without the user's credentials).
pub async fn open_output(client: &kube::Client, namespace: &str, job: &str, task: u32, name: &str) -> Result<Fetched, ApiError> {
    let resp = send(client, &output_path(namespace, job, task, name)).await?;
    let (parts, body) = resp.into_parts();
    if parts.status == StatusCode::TEMPORARY_REDIRECT {
        let location = parts.headers.get(http::header::LOCATION).and_then(|l| l.to_str().ok());
        return location.map(|l| Fetched::Redirect(l.to_string())).ok_or_else(|| ApiError::Protocol("a redirect without a Location".into()));
    }
    if !parts.status.is_success() {
        return Err(refusal(parts.status, body).await);
    }
    Ok(Fetched::Body(body))
}

/// The live logs' path of task `task` of job `namespace/name`, following.
pub fn live_logs_path(namespace: &str, job: &str, task: u32) -> String {
    format!("/api/v1/namespaces/{}/computejobs/{}/tasks/{task}/logs?follow=1", encode_segment(namespace), encode_segment(job))
}

/// What the operator answers a follower of a task.
pub enum Live {
    /// The running attempt's events, newline-delimited JSON, until it ends.
    Stream(kube::client::Body),
    /// No attempt of the task runs now (why, from the operator).
    NotRunning(String),
    /// The operator offers no live logs (an older one: its router has no such route; or
    /// outputs are not enabled): the plugin waits for the task to end instead.
    NotOffered(String),
}

/// Follows the running attempt of task `task` of job `namespace/job`.
pub async fn follow_logs(client: &kube::Client, namespace: &str, job: &str, task: u32) -> Result<Live, ApiError> {
    let resp = send(client, &live_logs_path(namespace, job, task)).await?;
    let (parts, body) = resp.into_parts();
    if parts.status.is_success() {
        return Ok(Live::Stream(body));
    }
    match (parts.status, refusal(parts.status, body).await) {
        (StatusCode::CONFLICT, ApiError::Refused { message, .. }) => Ok(Live::NotRunning(message)),
        // The operator's own 404s explain themselves; an unknown route's is empty.
        (StatusCode::NOT_FOUND, ApiError::Refused { message, .. }) if message.is_empty() => {
            Ok(Live::NotOffered("this operator serves no live logs (it is older than this plugin)".into()))
        }
        (_, ApiError::Unavailable(why)) => Ok(Live::NotOffered(why)),
        (_, e) => Err(e),
    }
}

/// Fetches a redirect's URL (a presigned bucket URL) with a client that carries no kubeconfig
/// credentials: the URL authorizes itself, and the user's token must not leave for a bucket.
pub async fn fetch_url(url: &str) -> Result<kube::client::Body, ApiError> {
    let uri: http::Uri = url.parse().map_err(|e| ApiError::Protocol(format!("bad redirect URL: {e}")))?;
    let origin = match (uri.scheme_str(), uri.authority()) {
        (Some(s @ ("http" | "https")), Some(a)) => format!("{s}://{a}/"),
        _ => return Err(ApiError::Protocol(format!("the redirect {url:?} is not an http(s) URL"))),
    };
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let config = kube::Config::new(origin.parse().map_err(|e| ApiError::Protocol(format!("bad redirect URL: {e}")))?);
    let client = kube::Client::try_from(config).map_err(|e| ApiError::Transport(e.to_string()))?;
    let resp = send(&client, path).await?;
    let (parts, body) = resp.into_parts();
    if !parts.status.is_success() {
        return Err(ApiError::Transport(format!("{url}: {}", parts.status)));
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_encode_each_segment_and_keep_the_name_s_slashes() {
        assert_eq!(outputs_path("team-a", "render"), "/api/v1/namespaces/team-a/computejobs/render/outputs");
        assert_eq!(output_path("team-a", "render", 3, "out/a b%.csv"), "/api/v1/namespaces/team-a/computejobs/render/outputs/3/out/a%20b%25.csv");
        assert_eq!(output_path("a", "b", 0, "x?y#z"), "/api/v1/namespaces/a/computejobs/b/outputs/0/x%3Fy%23z");
    }
}
