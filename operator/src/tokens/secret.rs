//! Join tokens as Secrets: minting, checking and redeeming. The redemptions of one token are
//! group-committed: one optimistic write for all the uses that came in while the last one wrote.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::jiff::Timestamp;
use kommune_proto::token::JoinToken;
use kube::api::{Api, DeleteParams, ObjectMeta, PostParams, Preconditions};
use tokio::sync::oneshot;
use tracing::{info, warn};

use super::{CapacityLimits, JoinTokens, LABEL, NodeGrant, SECRET_TYPE, TokenRecord, TokenRejection, allot, check, default_owner, limit_fields, record_of};

/// A Secret read this recently answers a check without another read; redeeming always writes
/// with the version it knows, so a stale one costs a conflict and a read, never a wrong grant.
const CHECK_FRESH: Duration = Duration::from_secs(1);
/// Writes of one batch tried before its joins get Unavailable (others writing the Secret: an
/// admin's edit, or a replica that still thinks it leads).
const WRITE_TRIES: usize = 5;

/// Tokens as Secrets in the operator's namespace.
///
/// Joins racing for one token used to race for its Secret: each read it and wrote it back, all
/// but one got a conflict, read again, and so on, a retry storm that turned a thousand joins into
/// thousands of requests. Now the uses of one token queue here: the first starts a commit that
/// takes every use waiting, checks each against the Secret it knows, and writes the count down
/// once for all of them (optimistically, with that version: two operators cannot both spend the
/// last use). Uses that arrive while it writes go in the next write. The Secret stays the one
/// record of what is left, so a restarted operator or `kubectl get secret` sees the truth.
pub struct SecretTokens {
    inner: Arc<Inner>,
}

struct Inner {
    api: Api<Secret>,
    tokens: Mutex<HashMap<String, TokenState>>,
}

#[derive(Default)]
struct TokenState {
    /// Uses waiting for the next write, in the order they came.
    waiting: Vec<(JoinToken, oneshot::Sender<Result<NodeGrant, TokenRejection>>)>,
    /// A commit task is running for this token.
    committing: bool,
    /// The Secret as last read or written, and when.
    known: Option<(Secret, Instant)>,
}

impl SecretTokens {
    pub fn new(client: kube::Client, namespace: &str) -> Self {
        SecretTokens { inner: Arc::new(Inner { api: Api::namespaced(client, namespace), tokens: Mutex::default() }) }
    }

    /// Mints a token valid for `ttl` and `uses` joins, owned by `owner` (None: `token:<id>`)
    /// and capping its machines' claims at `limits`, stored as a Secret.
    pub async fn create(
        &self,
        ca_pin: &str,
        ttl: std::time::Duration,
        uses: u32,
        owner: Option<&str>,
        limits: CapacityLimits,
    ) -> Result<JoinToken, kube::Error> {
        let token = JoinToken::generate(ca_pin);
        let expires = Timestamp::now() + jiff_span(ttl);
        let mut fields = BTreeMap::from([
            ("token-id".to_string(), token.id.clone()),
            ("token-secret".to_string(), token.secret.clone()),
            ("expiration".to_string(), expires.to_string()),
            ("usages-remaining".to_string(), uses.to_string()),
            // Written out even when defaulted, so `kubectl get secret` shows whose it is.
            ("owner".to_string(), owner.map_or_else(|| default_owner(&token.id), str::to_string)),
        ]);
        fields.extend(limit_fields(&limits));
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(token.secret_name()),
                labels: Some(BTreeMap::from([(LABEL.to_string(), "true".to_string())])),
                ..Default::default()
            },
            type_: Some(SECRET_TYPE.into()),
            string_data: Some(fields),
            ..Default::default()
        };
        self.inner.api.create(&PostParams::default(), &secret).await?;
        Ok(token)
    }

    /// The token's Secret and its record after one use. A token found expired has its Secret
    /// deleted (best effort: the next presentation tries again).
    async fn read(&self, token: &JoinToken) -> Result<(Secret, TokenRecord), TokenRejection> {
        let secret = match self.inner.api.get_opt(&token.secret_name()).await {
            Ok(Some(s)) => s,
            Ok(None) => return Err(TokenRejection::Unknown(token.id.clone())),
            Err(e) => return Err(TokenRejection::Backend(e.to_string())),
        };
        let record = record_of(&secret).ok_or_else(|| TokenRejection::Unknown(token.id.clone()))?;
        match check(token, &record, Timestamp::now()) {
            Ok(next) => {
                self.inner.remember_read(&token.id, &secret);
                Ok((secret, next))
            }
            Err(e @ TokenRejection::Expired { .. }) => {
                match self.inner.api.delete(&token.secret_name(), &unchanged(&secret)).await {
                    Ok(_) => info!(token = %token.id, "expired join token deleted"),
                    Err(err) => warn!(token = %token.id, error = %err, "cannot delete an expired join token"),
                }
                Err(e)
            }
            Err(e) => Err(e),
        }
    }

    /// A check answered from a Secret read or written within [`CHECK_FRESH`], if that says the
    /// token is good (anything else is read again, so a refusal is always current).
    fn check_known(&self, token: &JoinToken) -> Option<NodeGrant> {
        let tokens = self.inner.locked();
        let (secret, at) = tokens.get(&token.id)?.known.as_ref()?;
        if at.elapsed() > CHECK_FRESH {
            return None;
        }
        let record = record_of(secret)?;
        check(token, &record, Timestamp::now()).ok().map(|next| next.grant(&token.id))
    }
}

impl Inner {
    fn locked(&self) -> MutexGuard<'_, HashMap<String, TokenState>> {
        self.tokens.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps a Secret read by a check, unless a commit is writing it (its version is newer).
    fn remember_read(&self, id: &str, secret: &Secret) {
        let mut tokens = self.locked();
        let st = tokens.entry(id.to_string()).or_default();
        if !st.committing {
            st.known = Some((secret.clone(), Instant::now()));
        }
    }

    fn remember(&self, id: &str, secret: Option<Secret>) {
        if let Some(st) = self.locked().get_mut(id) {
            st.known = secret.map(|s| (s, Instant::now()));
        }
    }

    /// Commits the uses of token `id` until none is waiting.
    async fn commit_all(&self, id: &str) {
        loop {
            let (batch, known) = {
                let mut tokens = self.locked();
                let Some(st) = tokens.get_mut(id) else { return };
                if st.waiting.is_empty() {
                    st.committing = false;
                    if st.known.is_none() {
                        tokens.remove(id);
                    }
                    return;
                }
                (std::mem::take(&mut st.waiting), st.known.as_ref().map(|(s, _)| s.clone()))
            };
            let presented: Vec<JoinToken> = batch.iter().map(|(t, _)| t.clone()).collect();
            let outcomes = self.commit(&presented, known).await;
            for ((_, answer), outcome) in batch.into_iter().zip(outcomes) {
                // A join that gave up meanwhile has no one to tell; its use stays spent, as a
                // join whose answer was lost on the way would.
                let _ = answer.send(outcome);
            }
        }
    }

    /// One write for a batch of uses of one token (non-empty), starting from the Secret known
    /// (None: read it). Each use's outcome, in order.
    async fn commit(&self, presented: &[JoinToken], known: Option<Secret>) -> Vec<Result<NodeGrant, TokenRejection>> {
        let id = presented[0].id.clone();
        let name = presented[0].secret_name();
        let all = |r: TokenRejection| vec![Err(r); presented.len()];
        let mut secret = known;
        for _ in 0..WRITE_TRIES {
            let current = match secret.take() {
                Some(s) => s,
                None => match self.api.get_opt(&name).await {
                    Ok(Some(s)) => s,
                    Ok(None) => {
                        self.remember(&id, None);
                        return all(TokenRejection::Unknown(id));
                    }
                    Err(e) => return all(TokenRejection::Backend(e.to_string())),
                },
            };
            let Some(record) = record_of(&current) else { return all(TokenRejection::Unknown(id)) };
            let (outcomes, next) = allot(presented, &record, Timestamp::now());
            if !outcomes.iter().any(Result::is_ok) {
                if outcomes.iter().any(|o| matches!(o, Err(TokenRejection::Expired { .. }))) {
                    match self.api.delete(&name, &unchanged(&current)).await {
                        Ok(_) => info!(token = %id, "expired join token deleted"),
                        Err(err) => warn!(token = %id, error = %err, "cannot delete an expired join token"),
                    }
                    self.remember(&id, None);
                }
                return outcomes;
            }
            let written = if next.uses_left == 0 {
                // The last use: the Secret goes (deleted only if nobody used it meanwhile).
                self.api.delete(&name, &unchanged(&current)).await.map(|_| {
                    info!(token = %id, "join token used up and deleted");
                    None
                })
            } else {
                let mut updated = current.clone();
                updated.string_data = Some(BTreeMap::from([("usages-remaining".to_string(), next.uses_left.to_string())]));
                self.api.replace(&name, &PostParams::default(), &updated).await.map(Some)
            };
            match written {
                Ok(now_known) => {
                    self.remember(&id, now_known);
                    return outcomes;
                }
                // Written by someone else since: read it again and re-check every use.
                Err(kube::Error::Api(s)) if s.code == 409 => continue,
                // Deleted since: another operator (or an admin) took what was left.
                Err(kube::Error::Api(s)) if s.code == 404 => {
                    self.remember(&id, None);
                    return outcomes.into_iter().map(|o| o.and(Err(TokenRejection::UsedUp(id.clone())))).collect();
                }
                Err(e) => return outcomes.into_iter().map(|o| o.and(Err(TokenRejection::Backend(e.to_string())))).collect(),
            }
        }
        all(TokenRejection::Backend("the token Secret kept changing while it was being used; try again".into()))
    }
}

fn jiff_span(d: Duration) -> k8s_openapi::jiff::SignedDuration {
    k8s_openapi::jiff::SignedDuration::try_from(d).unwrap_or(k8s_openapi::jiff::SignedDuration::MAX)
}

/// Deletes `secret` only if it is still the version that was read: a token whose last use is
/// being redeemed by two operators at once is deleted by one of them, and the other sees 409.
fn unchanged(secret: &Secret) -> DeleteParams {
    let preconditions = Preconditions { resource_version: secret.metadata.resource_version.clone(), uid: secret.metadata.uid.clone() };
    DeleteParams { preconditions: Some(preconditions), ..Default::default() }
}

#[tonic::async_trait]
impl JoinTokens for SecretTokens {
    async fn check(&self, token: &JoinToken) -> Result<NodeGrant, TokenRejection> {
        if let Some(grant) = self.check_known(token) {
            return Ok(grant);
        }
        self.read(token).await.map(|(_, next)| next.grant(&token.id))
    }

    async fn redeem(&self, token: &JoinToken) -> Result<NodeGrant, TokenRejection> {
        let (answer, answered) = oneshot::channel();
        let lead = {
            let mut tokens = self.inner.locked();
            let st = tokens.entry(token.id.clone()).or_default();
            st.waiting.push((token.clone(), answer));
            !std::mem::replace(&mut st.committing, true)
        };
        if lead {
            // A task of its own: a join that gives up (its request timed out) must not stop the
            // commit the other joins wait on.
            let (inner, id) = (self.inner.clone(), token.id.clone());
            tokio::spawn(async move { inner.commit_all(&id).await });
        }
        answered.await.unwrap_or_else(|_| Err(TokenRejection::Backend("the token commit stopped".into())))
    }
}
