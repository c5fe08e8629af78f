//! The scripted API server the request-level tests share: a `tower_test` mock stands in for
//! the API server, and each test takes the client's requests one by one and answers them.

use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use kube::client::Body;
use serde::Serialize;
use serde_json::Value;
use tokio::time::timeout;
use tower_test::mock::{Handle, SendResponse};

pub type ApiHandle = Handle<Request<Body>, Response<Body>>;

/// One request the client made, with its body parsed as JSON.
pub struct Call {
    pub method: Method,
    pub path: String,
    pub query: String,
    pub content_type: String,
    pub body: Value,
    pub respond: SendResponse<Response<Body>>,
}

impl Call {
    /// Asserts the request's method, path and query.
    pub fn is(&self, method: Method, path: &str, query: &str) {
        assert_eq!((&self.method, self.path.as_str(), self.query.as_str()), (&method, path, query), "unexpected request; body: {}", self.body);
    }

    pub fn reply(self, code: StatusCode, body: &impl Serialize) {
        let bytes = serde_json::to_vec(body).expect("response serialises");
        let response = Response::builder().status(code).body(Body::from(bytes)).expect("response builds");
        self.respond.send_response(response);
    }
}

/// The client's next request, which must come within `within`; `expected` says what it should
/// be, for the failure message.
pub async fn next_call(api: &mut ApiHandle, within: Duration, expected: &str) -> Call {
    let (request, respond) = timeout(within, api.next_request())
        .await
        .unwrap_or_else(|_| panic!("expected {expected}, but no request came within {within:?}"))
        .unwrap_or_else(|| panic!("expected {expected}, but the client is gone"));
    let (parts, body) = request.into_parts();
    let bytes = body.collect_bytes().await.expect("request body");
    Call {
        method: parts.method,
        path: parts.uri.path().to_string(),
        query: parts.uri.query().unwrap_or_default().to_string(),
        content_type: parts.headers.get(http::header::CONTENT_TYPE).map(|v| v.to_str().expect("ascii header").to_string()).unwrap_or_default(),
        body: if bytes.is_empty() { Value::Null } else { serde_json::from_slice(&bytes).expect("request body is JSON") },
        respond,
    }
}
