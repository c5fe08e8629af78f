//! A job's stored outputs and logs over HTTP, for whoever may `get` the ComputeJob: the
//! listing, and one output streamed from the operator's store or redirected to the job's bucket.

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures::future::BoxFuture;
use kube::Api;

use super::auth::{Gatekeeper, UserInfo, credential};
use super::tls::Peer;
use super::{json, refusal};
use crate::crd::ComputeJob;
use crate::outputs::{OutputBody, OutputEntry, OutputReader};

/// Finds a ComputeJob's uid by namespace and name: outputs are stored by uid, so a job deleted
/// and created again under the same name never shows its predecessor's results.
pub trait JobLookup: Send + Sync {
    /// The uid of `namespace/name`, or None when there is no such job.
    fn uid(&self, namespace: String, name: String) -> BoxFuture<'_, Result<Option<String>, String>>;
}

/// [`JobLookup`] asking the API server (the operator's own `get computejobs`), so a job just
/// created is found even before any watch cache has seen it.
pub struct KubeJobs(pub kube::Client);

impl JobLookup for KubeJobs {
    fn uid(&self, namespace: String, name: String) -> BoxFuture<'_, Result<Option<String>, String>> {
        Box::pin(async move {
            let api: Api<ComputeJob> = Api::namespaced(self.0.clone(), &namespace);
            match api.get_opt(&name).await {
                Ok(job) => Ok(job.and_then(|j| j.metadata.uid)),
                Err(e) => Err(format!("cannot read ComputeJob {namespace}/{name}: {e}")),
            }
        })
    }
}

/// What the outputs routes need: where job uids come from, and the store, when outputs are
/// enabled (None: the routes answer 503).
#[derive(Clone)]
pub struct Retrieval {
    pub jobs: Arc<dyn JobLookup>,
    pub reader: Option<Arc<dyn OutputReader>>,
    /// Running attempts' live logs (`.../tasks/{task}/logs`); None: that route answers 503.
    pub live: Option<Arc<dyn crate::outputs::live::LiveSource>>,
}

/// The listing's body: the job it is for and its outputs, ordered by task then name.
#[derive(Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OutputList {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub items: Vec<OutputEntry>,
}

#[derive(Clone)]
pub(super) struct Routes {
    gate: Arc<Gatekeeper>,
    pub(super) retrieval: Option<Retrieval>,
}

/// `GET /api/v1/namespaces/{ns}/computejobs/{name}/outputs` (the listing) and
/// `.../outputs/{task}/{*name}` (one output; `name` may contain `/`).
pub fn routes(gate: Arc<Gatekeeper>, retrieval: Option<Retrieval>) -> Router {
    Router::new()
        .route("/api/v1/namespaces/{namespace}/computejobs/{name}/outputs", get(list))
        .route("/api/v1/namespaces/{namespace}/computejobs/{name}/outputs/{task}/{*output}", get(open))
        .route("/api/v1/namespaces/{namespace}/computejobs/{name}/tasks/{task}/logs", get(super::live::follow))
        .with_state(Routes { gate, retrieval })
}

pub(super) fn error(status: StatusCode, message: String) -> Response {
    json(status, &serde_json::json!({ "error": message }))
}

/// Authenticates the caller and checks `get` on the job: first, so a caller without the
/// permission learns nothing, not even whether the job exists or what this operator serves.
pub(super) async fn permitted(routes: &Routes, peer: &Peer, headers: &HeaderMap, namespace: &str, name: &str) -> Result<Retrieval, Response> {
    let authorization = headers.get(header::AUTHORIZATION).and_then(|h| h.to_str().ok());
    let user: UserInfo = routes.gate.authenticate(credential(authorization, peer.user.as_ref())).await.map_err(refusal)?;
    routes.gate.may_get_job(&user, namespace, name).await.map_err(refusal)?;
    routes.retrieval.clone().ok_or_else(|| error(StatusCode::SERVICE_UNAVAILABLE, "outputs are not enabled on this operator".into()))
}

/// The uid of job `namespace/name` (outputs and live logs are kept by uid).
pub(super) async fn job_uid(retrieval: &Retrieval, namespace: &str, name: &str) -> Result<String, Response> {
    match retrieval.jobs.uid(namespace.to_string(), name.to_string()).await {
        Ok(Some(uid)) => Ok(uid),
        Ok(None) => Err(error(StatusCode::NOT_FOUND, format!("computejobs.kommune.dev {name:?} not found in namespace {namespace:?}"))),
        Err(e) => Err(error(StatusCode::SERVICE_UNAVAILABLE, e)),
    }
}

/// Authenticates the caller, checks `get` on the job, then finds its uid: in that order, so a
/// caller without the permission learns nothing, not even whether the job exists.
async fn authorize(routes: &Routes, peer: &Peer, headers: &HeaderMap, namespace: &str, name: &str) -> Result<(Arc<dyn OutputReader>, String), Response> {
    let retrieval = permitted(routes, peer, headers, namespace, name).await?;
    let Some(reader) = retrieval.reader.clone() else {
        return Err(error(StatusCode::SERVICE_UNAVAILABLE, "outputs are not enabled on this operator (no output store is configured)".into()));
    };
    Ok((reader, job_uid(&retrieval, namespace, name).await?))
}

async fn list(
    State(routes): State<Routes>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    headers: HeaderMap,
    Path((namespace, name)): Path<(String, String)>,
) -> Response {
    let (reader, uid) = match authorize(&routes, &peer, &headers, &namespace, &name).await {
        Ok(found) => found,
        Err(r) => return r,
    };
    match reader.list(&uid).await {
        Ok(items) => json(StatusCode::OK, &OutputList { namespace, name, uid, items }),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, format!("cannot list the outputs: {e}")),
    }
}

async fn open(
    State(routes): State<Routes>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    headers: HeaderMap,
    Path((namespace, name, task, output)): Path<(String, String, String, String)>,
) -> Response {
    let (reader, uid) = match authorize(&routes, &peer, &headers, &namespace, &name).await {
        Ok(found) => found,
        Err(r) => return r,
    };
    let Ok(task_index) = task.parse::<u32>() else {
        return error(StatusCode::BAD_REQUEST, format!("task {task:?} is not a task index (a number from 0)"));
    };
    match reader.open(&uid, task_index, &output).await {
        Ok(Some(OutputBody::Stream { size, body })) => {
            let mut r = Response::new(Body::from_stream(body));
            let h = r.headers_mut();
            h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
            h.insert(header::CONTENT_LENGTH, HeaderValue::from(size));
            // A browser following a link saves the file rather than rendering what a task wrote.
            h.insert(header::CONTENT_DISPOSITION, HeaderValue::from_static("attachment"));
            h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
            r
        }
        Ok(Some(OutputBody::Redirect(url))) => match HeaderValue::from_str(&url) {
            Ok(location) => (StatusCode::TEMPORARY_REDIRECT, [(header::LOCATION, location)]).into_response(),
            Err(_) => error(StatusCode::INTERNAL_SERVER_ERROR, "the output's download URL is not a valid header value".into()),
        },
        Ok(None) => error(StatusCode::NOT_FOUND, format!("task {task_index} of {namespace}/{name} has no output {output:?}")),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, format!("cannot read the output: {e}")),
    }
}
