//! The read-only web dashboard (`--web-listen`): an embedded page and its JSON API, served over
//! TLS to callers the API server vouches for, showing only what they may `kubectl get`.

pub mod auth;
pub mod gather;
mod live;
pub mod overview;
pub mod results;
pub mod tls;

use std::collections::BTreeSet;
use std::sync::Arc;

use axum::Router;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::ConfigMap;

use auth::{Gatekeeper, Refusal, credential};
use overview::{JobFacts, ProviderFacts};
use tls::{Peer, TlsListener};

/// The providers and jobs the dashboard is built from.
pub type Facts = (Vec<ProviderFacts>, Vec<JobFacts>);

/// Where the dashboard's facts come from: the operator's fleet, store, ledger and ComputeJob
/// cache in production, fixed facts in tests.
pub trait Source: Send + Sync {
    fn facts(&self) -> BoxFuture<'_, Result<Facts, String>>;
}

#[derive(Clone)]
struct Web {
    gate: Arc<Gatekeeper>,
    source: Arc<dyn Source>,
}

const INDEX_HTML: &str = include_str!("assets/index.html");
const DASHBOARD_JS: &str = include_str!("assets/dashboard.js");
const DASHBOARD_CSS: &str = include_str!("assets/dashboard.css");

/// The dashboard's routes. The page and its script hold no data and are served to anyone (so
/// a refused caller sees why); `/api/v1/overview` is where authentication and access apply.
/// The outputs routes answer 503 (outputs are not enabled); see [`router_with_outputs`].
pub fn router(gate: Arc<Gatekeeper>, source: Arc<dyn Source>) -> Router {
    router_with_outputs(gate, source, None)
}

/// [`router`] plus the retrieval of jobs' outputs and logs ([`results::routes`]), for callers
/// allowed to `get` the job.
pub fn router_with_outputs(gate: Arc<Gatekeeper>, source: Arc<dyn Source>, retrieval: Option<results::Retrieval>) -> Router {
    Router::new()
        .route("/", get(|| async { asset("text/html; charset=utf-8", INDEX_HTML) }))
        .route("/dashboard.js", get(|| async { asset("text/javascript; charset=utf-8", DASHBOARD_JS) }))
        .route("/dashboard.css", get(|| async { asset("text/css; charset=utf-8", DASHBOARD_CSS) }))
        .route("/api/v1/overview", get(overview_handler))
        .with_state(Web { gate: gate.clone(), source })
        .merge(results::routes(gate, retrieval))
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    let mut r = body.into_response();
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    // The page only ever talks to its own origin.
    r.headers_mut().insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static("default-src 'self'; img-src 'self' data:"));
    r
}

fn json<T: serde::Serialize>(status: StatusCode, body: &T) -> Response {
    match serde_json::to_vec(body) {
        Ok(bytes) => (status, [(header::CONTENT_TYPE, "application/json")], bytes).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

fn refusal(r: Refusal) -> Response {
    match r {
        Refusal::Unauthenticated => {
            let mut resp = json(
                StatusCode::UNAUTHORIZED,
                &serde_json::json!({ "error": "Unauthorized: send a bearer token the API server accepts, or a client certificate of the cluster's client CA (kubectl kommune dashboard does)" }),
            );
            resp.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            resp
        }
        Refusal::Forbidden(why) => json(StatusCode::FORBIDDEN, &serde_json::json!({ "error": format!("Forbidden: {why}") })),
    }
}

async fn overview_handler(State(web): State<Web>, ConnectInfo(peer): ConnectInfo<Peer>, headers: HeaderMap) -> Response {
    let authorization = headers.get(header::AUTHORIZATION).and_then(|h| h.to_str().ok());
    let user = match web.gate.authenticate(credential(authorization, peer.user.as_ref())).await {
        Ok(u) => u,
        Err(r) => return refusal(r),
    };
    let (providers, jobs) = match web.source.facts().await {
        Ok(f) => f,
        Err(e) => return json(StatusCode::SERVICE_UNAVAILABLE, &serde_json::json!({ "error": e })),
    };
    let namespaces: BTreeSet<String> = jobs.iter().map(|j| j.namespace.clone()).collect();
    match web.gate.access(&user, &namespaces).await {
        Ok(access) => json(StatusCode::OK, &overview::overview(&providers, &jobs, &access)),
        Err(r) => refusal(r),
    }
}

/// Serves `router` on `listener` until the process ends.
pub async fn serve(listener: TlsListener, router: Router) -> std::io::Result<()> {
    axum::serve(listener, router.into_make_service_with_connect_info::<Peer>()).await
}

/// The API server's client CA bundle, as it publishes it for delegated authentication
/// (ConfigMap kube-system/extension-apiserver-authentication, key `client-ca-file`); None when
/// it is not readable, and client certificates are then not accepted (tokens still are).
pub async fn cluster_client_ca(client: kube::Client) -> Option<String> {
    let api: kube::Api<ConfigMap> = kube::Api::namespaced(client, "kube-system");
    match api.get("extension-apiserver-authentication").await {
        Ok(cm) => cm.data.and_then(|mut d| d.remove("client-ca-file")),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read kube-system/extension-apiserver-authentication: the dashboard accepts bearer tokens only, no client certificates");
            None
        }
    }
}
