//! `GET .../computejobs/{name}/tasks/{task}/logs?follow=1`: a running task's live stdout and
//! stderr as newline-delimited JSON ([`LiveEvent`]), for whoever may `get` the ComputeJob.

use axum::body::Body;
use axum::extract::{ConnectInfo, Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::Response;
use futures::StreamExt as _;

use super::results::{Routes, error, job_uid, permitted};
use super::tls::Peer;
use crate::outputs::live::{Following, LiveEvent};

/// Whether the query asks to follow (`follow=1` or `follow=true`); without it the answer is
/// the buffered tail only.
fn wants_follow(query: Option<&str>) -> bool {
    query.unwrap_or_default().split('&').any(|p| matches!(p, "follow" | "follow=1" | "follow=true"))
}

fn line(event: &LiveEvent) -> bytes::Bytes {
    let mut v = serde_json::to_vec(event).unwrap_or_default();
    v.push(b'\n');
    v.into()
}

/// 200 with the stream while an attempt of the task runs; 409 when none does (the task has
/// not started or has ended: its stored logs are at `.../outputs`).
pub(super) async fn follow(
    State(routes): State<Routes>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    headers: HeaderMap,
    Path((namespace, name, task)): Path<(String, String, String)>,
    RawQuery(query): RawQuery,
) -> Response {
    let retrieval = match permitted(&routes, &peer, &headers, &namespace, &name).await {
        Ok(r) => r,
        Err(r) => return r,
    };
    let Ok(task_index) = task.parse::<u32>() else {
        return error(StatusCode::BAD_REQUEST, format!("task {task:?} is not a task index (a number from 0)"));
    };
    let Some(live) = retrieval.live.clone() else {
        return error(StatusCode::SERVICE_UNAVAILABLE, "this operator keeps no live logs".into());
    };
    let uid = match job_uid(&retrieval, &namespace, &name).await {
        Ok(uid) => uid,
        Err(r) => return r,
    };
    match live.follow(uid, task_index).await {
        Ok(Following::Live(attempt)) => {
            let body = attempt.follow(wants_follow(query.as_deref())).map(|e| Ok::<_, std::convert::Infallible>(line(&e)));
            let mut r = Response::new(Body::from_stream(body));
            let h = r.headers_mut();
            h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/x-ndjson"));
            h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
            r
        }
        Ok(Following::NotRunning) => error(
            StatusCode::CONFLICT,
            format!(
                "no attempt of task {task_index} of {namespace}/{name} is running now: it has not started or has ended (its stored logs are listed under outputs)"
            ),
        ),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e),
    }
}

#[cfg(test)]
mod tests {
    use super::wants_follow;

    #[test]
    fn follow_is_asked_for_in_the_query() {
        assert!(wants_follow(Some("follow=1")));
        assert!(wants_follow(Some("x=2&follow=true")));
        assert!(!wants_follow(Some("follow=0")));
        assert!(!wants_follow(None));
    }
}
