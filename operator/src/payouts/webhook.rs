//! The payout webhook: each closed statement POSTed as JSON to the configured URL, retried with
//! backoff until the receiver answers 2xx. Delivery state lives on the PayoutStatement's status.

use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use serde::Serialize;

use crate::crd::WebhookDelivery;
use crate::ledger::export::ExportLine;
use crate::ledger::payout::Statement;

/// What the webhook receives: the signed statement line (verify it with the operator key: the
/// receiver needs no trust in the sender) and its decoded content. The receipts it covers come
/// from `kommune-operator payout export --statement SEQ`.
#[derive(Debug, Serialize)]
pub struct WebhookBody<'a> {
    /// "kommune.dev/PayoutStatement": what this JSON is.
    pub kind: &'static str,
    /// The statement's ledger entry: deliveries are at least once, so receivers dedupe on it.
    pub statement_seq: u64,
    pub entry: &'a ExportLine,
    pub statement: &'a Statement,
}

/// How long a POST may take.
const POST_TIMEOUT: Duration = Duration::from_secs(10);

/// The wait before retry `attempts + 1`: 2 s doubling up to 5 min, so a receiver that is down
/// for a day costs a few hundred POSTs per statement, and one back up is served within 5 min.
pub fn backoff(attempts: u32) -> Duration {
    Duration::from_secs(2u64.saturating_pow(attempts.min(16)).min(300))
}

/// Whether a delivery in state `d` is due at `now`.
pub fn due(d: &WebhookDelivery, now: Timestamp) -> bool {
    if d.state == DELIVERED {
        return false;
    }
    let Some(last) = d.last_attempt.as_deref().and_then(|t| t.parse::<Timestamp>().ok()) else { return true };
    let wait = backoff(d.attempts.saturating_sub(1));
    now.duration_since(last).unsigned_abs() >= wait || now < last
}

pub const DELIVERED: &str = "Delivered";
pub const PENDING: &str = "Pending";

/// POSTs `body` to `url` (off the async workers: the client blocks). Ok on a 2xx; otherwise what
/// went wrong, in words that carry nothing the receiver chose to send.
pub async fn post(url: &str, body: Vec<u8>) -> Result<(), String> {
    let url = url.to_string();
    tokio::task::spawn_blocking(move || post_blocking(&url, &body)).await.map_err(|e| format!("the webhook task failed: {e}"))?
}

fn post_blocking(url: &str, body: &[u8]) -> Result<(), String> {
    let config = ureq::Agent::config_builder().timeout_global(Some(POST_TIMEOUT)).http_status_as_error(false).max_redirects(0).build();
    let agent = ureq::Agent::new_with_config(config);
    let resp = agent.post(url).header("content-type", "application/json").send(body).map_err(|e| match e {
        ureq::Error::Timeout(_) => "timed out".to_string(),
        ureq::Error::HostNotFound => "host not found".to_string(),
        ureq::Error::Io(io) => format!("connection failed ({:?})", io.kind()),
        other => format!("the request failed: {other}"),
    })?;
    let status = resp.status();
    if status.is_success() { Ok(()) } else { Err(format!("the webhook answered HTTP {}", status.as_u16())) }
}

/// The delivery after one attempt made at `now` with `result`.
pub fn after_attempt(d: &WebhookDelivery, now: Timestamp, result: Result<(), String>) -> WebhookDelivery {
    let attempts = d.attempts.saturating_add(1);
    let last_attempt = Some(now.to_string());
    match result {
        Ok(()) => WebhookDelivery { state: DELIVERED.into(), attempts, last_attempt, last_error: None },
        Err(e) => WebhookDelivery { state: PENDING.into(), attempts, last_attempt, last_error: Some(e) },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_back_off_to_five_minutes_and_a_delivered_statement_is_never_due() {
        assert_eq!([0, 1, 2, 8, 9, 40].map(|a| backoff(a).as_secs()), [1, 2, 4, 256, 300, 300]);
        let t0: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        let fresh = WebhookDelivery { state: PENDING.into(), ..Default::default() };
        assert!(due(&fresh, t0), "a new statement is sent at once");
        let failed = after_attempt(&fresh, t0, Err("the webhook answered HTTP 500".into()));
        assert_eq!((failed.state.as_str(), failed.attempts), (PENDING, 1));
        assert!(!due(&failed, t0), "not again at once");
        assert!(due(&failed, t0 + Duration::from_secs(1)));
        let twice = after_attempt(&failed, t0, Err("x".into()));
        assert!(!due(&twice, t0 + Duration::from_secs(1)) && due(&twice, t0 + Duration::from_secs(2)));
        let done = after_attempt(&twice, t0, Ok(()));
        assert_eq!((done.state.as_str(), done.attempts, done.last_error.as_deref()), (DELIVERED, 3, None));
        assert!(!due(&done, t0 + Duration::from_secs(86400)));
    }
}
