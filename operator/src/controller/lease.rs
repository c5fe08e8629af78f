//! Leader election through a coordination.k8s.io Lease, so only one replica places tasks and
//! writes. Fencing is by exit: a leader that cannot renew within the lease duration stops the
//! whole process at once, before another replica may take over.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, ObjectMeta, PostParams};
use tracing::{info, warn};

use crate::fence::Fence;

/// Name of the Lease in the operator's namespace.
pub const LEASE_NAME: &str = "kommune-operator";

/// What to do with the Lease as it stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// No Lease exists: create it, holding it.
    Create,
    /// Nobody holds it, or the holder let it expire: take it over.
    TakeOver,
    /// We hold it: renew.
    Renew,
    /// Someone else holds a live Lease: wait.
    Wait,
}

/// Decides from the Lease's holder and last renewal. Pure.
pub fn decide(lease: Option<&LeaseSpec>, me: &str, now: Timestamp) -> Decision {
    let Some(spec) = lease else { return Decision::Create };
    match spec.holder_identity.as_deref() {
        Some(h) if h == me => Decision::Renew,
        None | Some("") => Decision::TakeOver,
        Some(_) => {
            let duration = SignedDuration::from_secs(spec.lease_duration_seconds.unwrap_or(15).max(1).into());
            match &spec.renew_time {
                Some(t) if t.0 + duration > now => Decision::Wait,
                _ => Decision::TakeOver,
            }
        }
    }
}

/// Why leadership ended.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("lost the leader Lease to {0}")]
    TakenBy(String),
    #[error("could not renew the leader Lease for {0:?}, longer than its duration")]
    RenewDeadline(Duration),
}

/// Acquires and holds the Lease for one identity.
pub struct LeaderElector {
    api: Api<Lease>,
    identity: String,
    duration: Duration,
    fence: Fence,
}

impl LeaderElector {
    /// `fence` is opened for a little less than the Lease duration after each successful write
    /// of the Lease, and closed when leadership ends.
    pub fn new(client: kube::Client, namespace: &str, identity: String, duration: Duration, fence: Fence) -> Self {
        LeaderElector { api: Api::namespaced(client, namespace), identity, duration, fence }
    }

    /// How long after a renewal this replica still counts itself leader: two thirds of the
    /// Lease, so it stops before any other replica may take over.
    fn protected(&self) -> Duration {
        self.duration * 2 / 3
    }

    pub fn identity(&self) -> &str {
        &self.identity
    }

    fn spec(&self, now: Timestamp, prev: Option<&LeaseSpec>, taking_over: bool) -> LeaseSpec {
        let transitions = prev.and_then(|p| p.lease_transitions).unwrap_or(0);
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(self.duration.as_secs().max(1) as i32),
            acquire_time: if taking_over || prev.is_none() { Some(MicroTime(now)) } else { prev.and_then(|p| p.acquire_time.clone()) },
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(if taking_over { transitions + 1 } else { transitions }),
            ..Default::default()
        }
    }

    /// One step: create, take over or renew if we may. Returns whether we hold the Lease now.
    /// Writes use the Lease's resourceVersion, so two replicas can never both win a step.
    pub async fn try_hold(&self) -> Result<bool, kube::Error> {
        let started = std::time::Instant::now();
        let now = Timestamp::now();
        let current = self.api.get_opt(LEASE_NAME).await?;
        let decision = decide(current.as_ref().and_then(|l| l.spec.as_ref()), &self.identity, now);
        let result = match (decision, current) {
            (Decision::Wait, _) => return Ok(false),
            (Decision::Create, _) => {
                let lease = Lease { metadata: ObjectMeta { name: Some(LEASE_NAME.into()), ..Default::default() }, spec: Some(self.spec(now, None, true)) };
                self.api.create(&PostParams::default(), &lease).await
            }
            (d, Some(mut lease)) => {
                lease.spec = Some(self.spec(now, lease.spec.as_ref(), d == Decision::TakeOver));
                self.api.replace(LEASE_NAME, &PostParams::default(), &lease).await
            }
            (_, None) => return Ok(false),
        };
        match result {
            Ok(_) => {
                // Counted from before the request: the Lease may be older than its response.
                self.fence.extend(started + self.protected());
                Ok(true)
            }
            // Someone else wrote first: not ours this round.
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Waits until this replica holds the Lease.
    pub async fn acquire(&self) {
        let retry = (self.duration / 5).max(Duration::from_millis(200));
        loop {
            match self.try_hold().await {
                Ok(true) => {
                    info!(identity = %self.identity, "acquired the leader Lease");
                    return;
                }
                Ok(false) => {}
                Err(e) => warn!(error = %e, "cannot read or write the leader Lease"),
            }
            tokio::time::sleep(retry).await;
        }
    }

    /// Renews the Lease until it is lost; returns why, with the fence already closed. The
    /// caller must stop at once.
    pub async fn hold(&self) -> LeaseError {
        let why = self.renew_until_lost().await;
        self.fence.close();
        why
    }

    async fn renew_until_lost(&self) -> LeaseError {
        let every = (self.duration / 3).max(Duration::from_millis(100));
        let mut last_renewed = std::time::Instant::now();
        loop {
            let left = self.protected().saturating_sub(last_renewed.elapsed());
            if left.is_zero() {
                return LeaseError::RenewDeadline(last_renewed.elapsed());
            }
            tokio::time::sleep(every.min(left)).await;
            let attempt = std::time::Instant::now();
            match tokio::time::timeout(every, self.try_hold()).await {
                Ok(Ok(true)) => last_renewed = attempt,
                Ok(Ok(false)) => {
                    let holder = self.api.get_opt(LEASE_NAME).await.ok().flatten().and_then(|l| l.spec?.holder_identity).unwrap_or_default();
                    if holder != self.identity {
                        return LeaseError::TakenBy(holder);
                    }
                }
                Ok(Err(e)) => warn!(error = %e, "cannot renew the leader Lease"),
                Err(_) => warn!("renewing the leader Lease timed out"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(holder: Option<&str>, renewed_secs_ago: i64, duration: i32, now: Timestamp) -> LeaseSpec {
        LeaseSpec {
            holder_identity: holder.map(str::to_string),
            lease_duration_seconds: Some(duration),
            renew_time: Some(MicroTime(now - SignedDuration::from_secs(renewed_secs_ago))),
            ..Default::default()
        }
    }

    #[test]
    fn decisions() {
        let now = Timestamp::now();
        assert_eq!(decide(None, "me", now), Decision::Create);
        assert_eq!(decide(Some(&spec(Some("me"), 100, 15, now)), "me", now), Decision::Renew);
        assert_eq!(decide(Some(&spec(Some("other"), 5, 15, now)), "me", now), Decision::Wait);
        assert_eq!(decide(Some(&spec(Some("other"), 15, 15, now)), "me", now), Decision::TakeOver);
        assert_eq!(decide(Some(&spec(Some("other"), 16, 15, now)), "me", now), Decision::TakeOver);
        assert_eq!(decide(Some(&spec(None, 0, 15, now)), "me", now), Decision::TakeOver);
        assert_eq!(decide(Some(&spec(Some(""), 0, 15, now)), "me", now), Decision::TakeOver);
        let never_renewed = LeaseSpec { holder_identity: Some("other".into()), ..Default::default() };
        assert_eq!(decide(Some(&never_renewed), "me", now), Decision::TakeOver);
    }
}
