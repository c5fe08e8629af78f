//! Join tokens on the operator side: redeeming one (the gateway's Join) and minting one
//! (`kommune-operator token create`). Tokens live as Secrets `kommune-join-<id>` in the
//! operator's namespace, like kubeadm's bootstrap tokens in kube-system.
//!
//! A token whose last use is redeemed, or that is found expired, has its Secret deleted: a
//! cluster does not collect spent credentials.
//!
//! A token belongs to an owner (`token:<id>` unless the admin named one) and may cap what the
//! machines joined with it can claim: both are what redeeming it grants (a [`NodeGrant`]).

mod secret;

use std::collections::HashMap;
use std::sync::Mutex;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::jiff::Timestamp;
use kommune_proto::quantity;
use kommune_proto::token::JoinToken;

pub use crate::store::{CapacityLimits, NodeGrant};

/// Secret type of join-token Secrets.
pub const SECRET_TYPE: &str = "kommune.dev/join-token";
const LABEL: &str = "kommune.dev/join-token";

/// What a joining machine is told about any token that is not valid, whatever the reason: one
/// message and one code (Unauthenticated), so that which token ids exist, which are used up and
/// which expired cannot be learnt by trying. The reason goes to the operator's log.
pub const NOT_VALID: &str = "join token is not valid; ask the cluster admin for a new one";

/// Why a token was not accepted: for the operator's log (the joining machine is told
/// [`NOT_VALID`]) and for `kommune-operator` commands run by the admin.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenRejection {
    #[error("join token {0} is not valid (unknown or deleted); ask the cluster admin for a new one")]
    Unknown(String),
    #[error("join token {0} is not valid (wrong secret); check that it was copied whole")]
    WrongSecret(String),
    #[error("join token {id} expired at {at}; ask the cluster admin for a new one")]
    Expired { id: String, at: String },
    #[error("join token {0} has no uses left; ask the cluster admin for a new one")]
    UsedUp(String),
    #[error("cannot check the join token right now: {0}")]
    Backend(String),
}

impl TokenRejection {
    /// The status a joining machine gets: [`NOT_VALID`] for every bad token, Unavailable when
    /// the token store could not be asked.
    pub fn to_status(&self) -> tonic::Status {
        match self {
            TokenRejection::Backend(_) => tonic::Status::unavailable("cannot check the join token right now; try again later"),
            _ => tonic::Status::unauthenticated(NOT_VALID),
        }
    }
}

/// Where tokens are checked and consumed.
#[tonic::async_trait]
pub trait JoinTokens: Send + Sync + 'static {
    /// Checks a token without using it (what Join does before anything else); returns what it
    /// would grant. An expired token is deleted.
    async fn check(&self, token: &JoinToken) -> Result<NodeGrant, TokenRejection>;
    /// Checks a token and consumes one use of it; returns what it grants the joining node.
    /// The last use deletes the token; so does finding it expired.
    async fn redeem(&self, token: &JoinToken) -> Result<NodeGrant, TokenRejection>;
}

/// A stored token's state, the same whether in a Secret or in memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRecord {
    pub secret: String,
    pub expires: Timestamp,
    pub uses_left: u32,
    /// The owner the admin gave the token; None: the token is its own owner.
    pub owner: Option<String>,
    pub limits: CapacityLimits,
}

impl TokenRecord {
    /// What redeeming this record grants: every machine joined with one token is one owner,
    /// so `replicas: 2` cannot be met by two machines of whoever holds the token.
    pub fn grant(&self, token_id: &str) -> NodeGrant {
        NodeGrant { owner: self.owner.clone().unwrap_or_else(|| default_owner(token_id)), limits: self.limits }
    }
}

/// The owner of a token created without `--owner`.
pub fn default_owner(token_id: &str) -> String {
    format!("token:{token_id}")
}

/// Checks an owner name given to `token create --owner`: what `spec.owner` accepts.
pub fn valid_owner(owner: &str) -> Result<(), String> {
    if owner.trim().is_empty() || owner.len() > 253 || owner.chars().any(char::is_control) {
        return Err(format!("owner {:?} is not valid: use 1 to 253 printable characters", owner.chars().take(80).collect::<String>()));
    }
    Ok(())
}

/// Pure: one batch of redemptions of one token, in the order they came, each checked with its
/// own presented token (a wrong secret fails alone). Returns each one's outcome and the record
/// after the granted uses; uses past the last are UsedUp.
pub fn allot(tokens: &[JoinToken], record: &TokenRecord, now: Timestamp) -> (Vec<Result<NodeGrant, TokenRejection>>, TokenRecord) {
    let mut current = record.clone();
    let outcomes = tokens
        .iter()
        .map(|t| {
            let next = check(t, &current, now)?;
            current = next;
            Ok(current.grant(&t.id))
        })
        .collect();
    (outcomes, current)
}

/// Pure check of a presented token against its record; returns the record after one use.
pub fn check(token: &JoinToken, record: &TokenRecord, now: Timestamp) -> Result<TokenRecord, TokenRejection> {
    if !token.secret_matches(&record.secret) {
        return Err(TokenRejection::WrongSecret(token.id.clone()));
    }
    if now >= record.expires {
        return Err(TokenRejection::Expired { id: token.id.clone(), at: record.expires.to_string() });
    }
    if record.uses_left == 0 {
        return Err(TokenRejection::UsedUp(token.id.clone()));
    }
    Ok(TokenRecord { uses_left: record.uses_left - 1, ..record.clone() })
}

/// The Secret keys of a token's caps, with how each is written and read.
const LIMIT_KEYS: [&str; 4] = ["max-cpu", "max-memory", "max-ephemeral-storage", "max-gpus"];

/// Caps as Secret fields (Kubernetes quantities; GPUs a count).
pub(crate) fn limit_fields(l: &CapacityLimits) -> Vec<(String, String)> {
    let values = [
        l.cpu_millis.map(quantity::format_cpu),
        l.memory_bytes.map(quantity::format_memory),
        l.ephemeral_bytes.map(quantity::format_memory),
        l.gpus.map(|g| g.to_string()),
    ];
    LIMIT_KEYS.iter().zip(values).filter_map(|(k, v)| Some((k.to_string(), v?))).collect()
}

/// Caps from Secret fields; an unreadable one is an error naming it (the token is then refused
/// rather than letting its machines claim anything).
fn limits_of(get: impl Fn(&str) -> Option<String>) -> Result<CapacityLimits, String> {
    let q = |key: &'static str, parse: fn(&'static str, &str) -> Result<u64, quantity::QuantityError>| {
        get(key).map(|v| parse(key, &v).map_err(|e| e.to_string())).transpose()
    };
    Ok(CapacityLimits {
        cpu_millis: q("max-cpu", quantity::cpu_millis)?,
        memory_bytes: q("max-memory", quantity::memory_bytes)?,
        ephemeral_bytes: q("max-ephemeral-storage", quantity::memory_bytes)?,
        gpus: get("max-gpus").map(|v| v.trim().parse::<u32>().map_err(|_| format!("max-gpus: {v:?} is not a count"))).transpose()?,
    })
}

/// Tokens in memory, for tests and single-process setups.
#[derive(Default)]
pub struct MemoryTokens {
    records: Mutex<HashMap<String, TokenRecord>>,
}

impl MemoryTokens {
    /// A token of its own owner (`token:<id>`), without caps.
    pub fn insert(&self, token: &JoinToken, expires: Timestamp, uses: u32) {
        self.insert_owned(token, expires, uses, None, CapacityLimits::default());
    }

    /// A token of `owner` whose machines may claim at most `limits`.
    pub fn insert_owned(&self, token: &JoinToken, expires: Timestamp, uses: u32, owner: Option<&str>, limits: CapacityLimits) {
        let record = TokenRecord { secret: token.secret.clone(), expires, uses_left: uses, owner: owner.map(str::to_string), limits };
        self.records.lock().unwrap().insert(token.id.clone(), record);
    }
}

impl MemoryTokens {
    /// Whether a token with this id is stored (spent and expired ones are not).
    pub fn contains(&self, token_id: &str) -> bool {
        self.records.lock().unwrap_or_else(|p| p.into_inner()).contains_key(token_id)
    }

    /// Checks `token`; the record after one use. An expired record is removed.
    fn checked(records: &mut HashMap<String, TokenRecord>, token: &JoinToken) -> Result<TokenRecord, TokenRejection> {
        let record = records.get(&token.id).ok_or_else(|| TokenRejection::Unknown(token.id.clone()))?;
        let checked = check(token, record, Timestamp::now());
        if let Err(TokenRejection::Expired { .. }) = checked {
            records.remove(&token.id);
        }
        checked
    }
}

#[tonic::async_trait]
impl JoinTokens for MemoryTokens {
    async fn check(&self, token: &JoinToken) -> Result<NodeGrant, TokenRejection> {
        let mut records = self.records.lock().unwrap_or_else(|p| p.into_inner());
        Self::checked(&mut records, token).map(|next| next.grant(&token.id))
    }

    async fn redeem(&self, token: &JoinToken) -> Result<NodeGrant, TokenRejection> {
        let mut records = self.records.lock().unwrap_or_else(|p| p.into_inner());
        let next = Self::checked(&mut records, token)?;
        let grant = next.grant(&token.id);
        if next.uses_left == 0 {
            records.remove(&token.id);
        } else {
            records.insert(token.id.clone(), next);
        }
        Ok(grant)
    }
}

fn field(secret: &Secret, key: &str) -> Option<String> {
    secret.data.as_ref()?.get(key).and_then(|v| String::from_utf8(v.0.clone()).ok())
}

/// Reads a token Secret; None when it is not a well-formed token Secret (a cap that does not
/// parse makes it malformed: its machines are refused rather than left uncapped).
pub fn record_of(secret: &Secret) -> Option<TokenRecord> {
    if secret.type_.as_deref() != Some(SECRET_TYPE) {
        return None;
    }
    Some(TokenRecord {
        secret: field(secret, "token-secret")?,
        expires: field(secret, "expiration")?.parse().ok()?,
        uses_left: field(secret, "usages-remaining")?.parse().ok()?,
        // Tokens minted before owners were recorded are their own owner.
        owner: field(secret, "owner").filter(|o| valid_owner(o).is_ok()),
        limits: limits_of(|k| field(secret, k)).ok()?,
    })
}

pub use secret::SecretTokens;

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    const PIN: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn record(token: &JoinToken, expires: Timestamp, uses: u32) -> TokenRecord {
        TokenRecord { secret: token.secret.clone(), expires, uses_left: uses, owner: None, limits: CapacityLimits::default() }
    }

    #[test]
    fn check_accepts_and_consumes() {
        let t = JoinToken::generate(PIN);
        let now = Timestamp::now();
        let later = now + k8s_openapi::jiff::SignedDuration::from_secs(60);
        assert_eq!(check(&t, &record(&t, later, 2), now).unwrap().uses_left, 1);
        assert_eq!(check(&t, &record(&t, later, 0), now), Err(TokenRejection::UsedUp(t.id.clone())));
        assert!(matches!(check(&t, &record(&t, now, 1), now), Err(TokenRejection::Expired { .. })));
        let other = JoinToken::generate(PIN);
        assert_eq!(check(&t, &record(&other, later, 1), now), Err(TokenRejection::WrongSecret(t.id.clone())));
    }

    #[test]
    fn rejections_name_the_token_but_not_its_secret() {
        let t = JoinToken::generate(PIN);
        let msg = TokenRejection::Expired { id: t.id.clone(), at: "2026-01-01T00:00:00Z".into() }.to_string();
        assert!(msg.contains(&t.id) && msg.contains("expired") && !msg.contains(&t.secret));
    }

    #[tokio::test]
    async fn memory_tokens_run_out() {
        let tokens = MemoryTokens::default();
        let t = JoinToken::generate(PIN);
        tokens.insert(&t, Timestamp::now() + k8s_openapi::jiff::SignedDuration::from_secs(60), 1);
        assert_eq!(tokens.check(&t).await.unwrap().owner, format!("token:{}", t.id), "checking does not use the token");
        assert_eq!(tokens.redeem(&t).await.unwrap().owner, format!("token:{}", t.id), "a token is its own owner by default");
        // The last use deleted it: it is now as unknown as one never made.
        assert!(!tokens.contains(&t.id), "a used-up token is deleted");
        assert_eq!(tokens.redeem(&t).await, Err(TokenRejection::Unknown(t.id.clone())));
        assert!(tokens.redeem(&JoinToken::generate(PIN)).await.unwrap_err().to_string().contains("unknown"));
    }

    #[tokio::test]
    async fn an_expired_memory_token_is_deleted_when_presented_and_every_rejection_reads_the_same() {
        let tokens = MemoryTokens::default();
        let (expired, two) = (JoinToken::generate(PIN), JoinToken::generate(PIN));
        tokens.insert(&expired, Timestamp::now() - k8s_openapi::jiff::SignedDuration::from_secs(1), 3);
        tokens.insert(&two, Timestamp::now() + k8s_openapi::jiff::SignedDuration::from_secs(60), 2);
        let rejection = tokens.check(&expired).await.unwrap_err();
        assert!(matches!(rejection, TokenRejection::Expired { .. }), "{rejection:?}");
        assert!(!tokens.contains(&expired.id), "an expired token is deleted once found");
        tokens.redeem(&two).await.unwrap();
        assert!(tokens.contains(&two.id), "one use of two left");
        let wrong = JoinToken { secret: "x".repeat(two.secret.len()), ..two.clone() };
        let statuses = [rejection, tokens.check(&wrong).await.unwrap_err(), TokenRejection::UsedUp("u".into()), TokenRejection::Unknown("k".into())]
            .map(|r| r.to_status());
        for s in &statuses {
            assert_eq!((s.code(), s.message()), (tonic::Code::Unauthenticated, NOT_VALID));
        }
        assert_eq!(TokenRejection::Backend("down".into()).to_status().code(), tonic::Code::Unavailable);
    }

    #[test]
    fn token_secrets_parse() {
        use k8s_openapi::ByteString;
        let t = JoinToken::generate(PIN);
        let mut s = Secret { type_: Some(SECRET_TYPE.into()), ..Default::default() };
        s.data = Some(BTreeMap::from([
            ("token-secret".to_string(), ByteString(t.secret.clone().into_bytes())),
            ("expiration".to_string(), ByteString(b"2030-01-01T00:00:00Z".to_vec())),
            ("usages-remaining".to_string(), ByteString(b"3".to_vec())),
        ]));
        let r = record_of(&s).unwrap();
        assert_eq!((r.uses_left, r.owner.as_deref(), r.limits), (3, None, CapacityLimits::default()), "a token minted before owners");
        assert_eq!(r.grant(&t.id).owner, format!("token:{}", t.id));
        s.type_ = Some("Opaque".into());
        assert_eq!(record_of(&s), None);
    }

    #[test]
    fn owners_and_caps_round_trip_through_the_secret_and_a_bad_cap_refuses_the_token() {
        use k8s_openapi::ByteString;
        let t = JoinToken::generate(PIN);
        let limits = CapacityLimits { cpu_millis: Some(2500), memory_bytes: Some(8 << 30), ephemeral_bytes: None, gpus: Some(1) };
        let mut data = BTreeMap::from([
            ("token-secret".to_string(), t.secret.clone()),
            ("expiration".to_string(), "2030-01-01T00:00:00Z".to_string()),
            ("usages-remaining".to_string(), "2".to_string()),
            ("owner".to_string(), "alice".to_string()),
        ]);
        data.extend(limit_fields(&limits));
        assert_eq!(data.get("max-cpu").map(String::as_str), Some("2500m"));
        let secret = |data: &BTreeMap<String, String>| Secret {
            type_: Some(SECRET_TYPE.into()),
            data: Some(data.iter().map(|(k, v)| (k.clone(), ByteString(v.clone().into_bytes()))).collect()),
            ..Default::default()
        };
        let r = record_of(&secret(&data)).unwrap();
        assert_eq!(r.grant(&t.id), NodeGrant { owner: "alice".into(), limits });
        data.insert("max-memory".into(), "lots".into());
        assert_eq!(record_of(&secret(&data)), None);
    }

    #[test]
    fn a_batch_of_redemptions_grants_the_uses_left_in_order_and_refuses_the_rest() {
        let t = JoinToken::generate(PIN);
        let now = Timestamp::now();
        let record = TokenRecord { secret: t.secret.clone(), expires: now + jiff_hours(1), uses_left: 3, owner: None, limits: CapacityLimits::default() };
        let wrong = JoinToken { secret: "x".repeat(t.secret.len()), ..t.clone() };
        let batch = [t.clone(), wrong.clone(), t.clone(), t.clone(), t.clone()];
        let (outcomes, after) = allot(&batch, &record, now);
        let shape: Vec<_> = outcomes.iter().map(|o| o.as_ref().map(|g| g.owner.clone()).map_err(Clone::clone)).collect();
        let granted = Ok(format!("token:{}", t.id));
        assert_eq!(
            shape,
            [granted.clone(), Err(TokenRejection::WrongSecret(t.id.clone())), granted.clone(), granted, Err(TokenRejection::UsedUp(t.id.clone()))],
            "a wrong secret uses nothing; the fourth valid one finds none left"
        );
        assert_eq!(after.uses_left, 0);
        // Every size of batch against every count of uses: exactly min(batch, uses) granted.
        for uses in 0..6u32 {
            for n in 0..8usize {
                let r = TokenRecord { uses_left: uses, ..record.clone() };
                let (o, after) = allot(&vec![t.clone(); n], &r, now);
                assert_eq!(o.iter().filter(|x| x.is_ok()).count(), n.min(uses as usize));
                assert_eq!(after.uses_left, uses - n.min(uses as usize) as u32);
            }
        }
        let expired = TokenRecord { expires: now, ..record };
        let (o, after) = allot(std::slice::from_ref(&t), &expired, now);
        assert!(matches!(o[0], Err(TokenRejection::Expired { .. })));
        assert_eq!(after.uses_left, 3, "nothing used");
    }

    fn jiff_hours(h: i64) -> k8s_openapi::jiff::SignedDuration {
        k8s_openapi::jiff::SignedDuration::from_hours(h)
    }

    #[test]
    fn owners_are_checked() {
        assert!(valid_owner("alice@example.org").is_ok());
        for bad in ["", "  ", &"a".repeat(254), "a\nb"] {
            assert!(valid_owner(bad).is_err(), "{bad:?}");
        }
    }
}
