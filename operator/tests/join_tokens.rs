//! Join-token Secrets against a scripted API server: a token's last use deletes its Secret (only
//! if nobody used it meanwhile), a token found expired has its Secret deleted, others count down.

use std::time::Duration;

use base64::Engine as _;
use http::{Method, Request, Response, StatusCode};
use kommune_operator::tokens::{JoinTokens, SECRET_TYPE, SecretTokens, TokenRejection};
use kommune_proto::token::JoinToken;
use kube::client::Body;
use serde_json::{Value, json};
use tower_test::mock;

#[allow(dead_code)] // shared with the other request-level tests; this file uses part of it
mod support;
use support::{ApiHandle, next_call};

const NS: &str = "kommune-system";
const PIN: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
const STEP: Duration = Duration::from_secs(5);

fn tokens() -> (SecretTokens, ApiHandle) {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    (SecretTokens::new(kube::Client::new(service, NS), NS), handle)
}

fn path(token: &JoinToken) -> String {
    format!("/api/v1/namespaces/{NS}/secrets/{}", token.secret_name())
}

/// The token's Secret as the API server returns it, at `resource_version`.
fn secret(token: &JoinToken, expiration: &str, uses: u32, resource_version: &str) -> Value {
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": token.secret_name(), "namespace": NS, "resourceVersion": resource_version, "uid": "uid-1"},
        "type": SECRET_TYPE,
        "data": {"token-secret": b64(&token.secret), "expiration": b64(expiration), "usages-remaining": b64(&uses.to_string())},
    })
}

fn status(code: u16, reason: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Status", "status": "Failure", "reason": reason, "code": code, "message": reason})
}

/// Asserts the request deletes the token's Secret only at `resource_version`.
fn assert_guarded_delete(body: &Value, resource_version: &str) {
    assert_eq!(body["preconditions"], json!({"resourceVersion": resource_version, "uid": "uid-1"}), "{body}");
}

#[tokio::test]
async fn the_last_use_deletes_the_secret_unless_someone_used_it_first() {
    let (tokens, mut api) = tokens();
    let token = JoinToken::generate(PIN);
    let redeem = tokio::spawn({
        let token = token.clone();
        async move { tokens.redeem(&token).await }
    });
    let get = next_call(&mut api, STEP, "a read of the token").await;
    get.is(Method::GET, &path(&token), "");
    get.reply(StatusCode::OK, &secret(&token, "2099-01-01T00:00:00Z", 1, "7"));
    let delete = next_call(&mut api, STEP, "the Secret deleted on its last use").await;
    delete.is(Method::DELETE, &path(&token), "");
    assert_guarded_delete(&delete.body, "7");
    delete.reply(StatusCode::OK, &secret(&token, "2099-01-01T00:00:00Z", 1, "7"));
    let grant = redeem.await.unwrap().expect("the last use is granted");
    assert_eq!(grant.owner, format!("token:{}", token.id));

    // Two agents race for the last use: this one's delete finds the Secret changed, and on
    // reading again finds it gone.
    let (tokens, mut api) = self::tokens();
    let redeem = tokio::spawn({
        let token = token.clone();
        async move { tokens.redeem(&token).await }
    });
    next_call(&mut api, STEP, "a read").await.reply(StatusCode::OK, &secret(&token, "2099-01-01T00:00:00Z", 1, "8"));
    let delete = next_call(&mut api, STEP, "a guarded delete").await;
    assert_guarded_delete(&delete.body, "8");
    delete.reply(StatusCode::CONFLICT, &status(409, "Conflict"));
    let again = next_call(&mut api, STEP, "a second read").await;
    again.is(Method::GET, &path(&token), "");
    again.reply(StatusCode::NOT_FOUND, &status(404, "NotFound"));
    assert_eq!(redeem.await.unwrap(), Err(TokenRejection::Unknown(token.id.clone())), "the other agent had the last use");
}

#[tokio::test]
async fn an_expired_token_is_deleted_when_presented_and_an_unspent_one_counts_down() {
    let (tokens, mut api) = tokens();
    let token = JoinToken::generate(PIN);
    let check = tokio::spawn({
        let token = token.clone();
        async move { tokens.check(&token).await }
    });
    next_call(&mut api, STEP, "a read").await.reply(StatusCode::OK, &secret(&token, "2020-01-01T00:00:00Z", 3, "9"));
    let delete = next_call(&mut api, STEP, "the expired Secret deleted").await;
    delete.is(Method::DELETE, &path(&token), "");
    assert_guarded_delete(&delete.body, "9");
    delete.reply(StatusCode::OK, &secret(&token, "2020-01-01T00:00:00Z", 3, "9"));
    assert!(matches!(check.await.unwrap(), Err(TokenRejection::Expired { .. })));

    let (tokens, mut api) = self::tokens();
    let redeem = tokio::spawn({
        let token = token.clone();
        async move { tokens.redeem(&token).await }
    });
    next_call(&mut api, STEP, "a read").await.reply(StatusCode::OK, &secret(&token, "2099-01-01T00:00:00Z", 2, "10"));
    let replace = next_call(&mut api, STEP, "the count written down").await;
    replace.is(Method::PUT, &path(&token), "");
    assert_eq!(replace.body["stringData"], json!({"usages-remaining": "1"}));
    assert_eq!(replace.body["metadata"]["resourceVersion"], "10", "the write is optimistic");
    replace.reply(StatusCode::OK, &secret(&token, "2099-01-01T00:00:00Z", 1, "11"));
    assert!(redeem.await.unwrap().is_ok());
}

/// Five joins race for a token with three uses left: one read, one write for the first, one
/// for the four that queued meanwhile (two granted, the last use deleting the Secret, two
/// refused). No conflict and no retry: the old read-modify-write per join made each of them
/// read, most of them conflict, and all of them read again.
#[tokio::test]
async fn concurrent_uses_of_one_token_are_one_write_per_batch_without_conflicts() {
    let (tokens, mut api) = tokens();
    let tokens = std::sync::Arc::new(tokens);
    let token = JoinToken::generate(PIN);
    let redeem = |tokens: std::sync::Arc<SecretTokens>, token: JoinToken| tokio::spawn(async move { tokens.redeem(&token).await });
    let first = redeem(tokens.clone(), token.clone());
    let get = next_call(&mut api, STEP, "the one read").await;
    get.is(Method::GET, &path(&token), "");
    // The others arrive while the first use is being committed.
    let others: Vec<_> = (0..4).map(|_| redeem(tokens.clone(), token.clone())).collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    get.reply(StatusCode::OK, &secret(&token, "2099-01-01T00:00:00Z", 3, "20"));
    let put = next_call(&mut api, STEP, "the first use written").await;
    put.is(Method::PUT, &path(&token), "");
    assert_eq!(put.body["stringData"], json!({"usages-remaining": "2"}));
    put.reply(StatusCode::OK, &secret(&token, "2099-01-01T00:00:00Z", 2, "21"));
    assert!(first.await.unwrap().is_ok());
    // The four waiting: written together from the version just written, without reading it.
    let delete = next_call(&mut api, STEP, "the last two uses: the Secret deleted").await;
    delete.is(Method::DELETE, &path(&token), "");
    assert_guarded_delete(&delete.body, "21");
    delete.reply(StatusCode::OK, &secret(&token, "2099-01-01T00:00:00Z", 2, "21"));
    let mut outcomes = Vec::new();
    for o in others {
        outcomes.push(o.await.unwrap());
    }
    assert_eq!(outcomes.iter().filter(|o| o.is_ok()).count(), 2, "{outcomes:?}");
    assert_eq!(outcomes.iter().filter(|o| **o == Err(TokenRejection::UsedUp(token.id.clone()))).count(), 2, "{outcomes:?}");
    if let Ok(Some((req, _))) = tokio::time::timeout(Duration::from_millis(300), api.next_request()).await {
        panic!("unexpected request: {} {}", req.method(), req.uri());
    }
}
