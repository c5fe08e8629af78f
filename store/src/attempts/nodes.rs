//! The node registry: the key each node name is bound to, the owner and capacity limits its join
//! token granted, and the names retired when their node left or was revoked (tombstones).
//!
//! A name is one identity for good: the ledger keys earnings by node name, so a name that was
//! ever registered is never bound to another key, and a retired name is never registered again,
//! not even for the key it had (the agent deletes its key when it leaves anyway).

use serde::{Deserialize, Serialize};

use super::{Result, Store};

/// Why a node name was retired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removal {
    /// The node left the pool of its own accord.
    Left,
    /// An admin removed it (its ProviderNode was deleted).
    Revoked,
}

impl Removal {
    pub fn as_str(self) -> &'static str {
        match self {
            Removal::Left => "left",
            Removal::Revoked => "revoked",
        }
    }

    /// Reads a stored reason; anything unknown counts as a revocation (the stricter reading).
    pub fn parse(s: &str) -> Removal {
        if s == "left" { Removal::Left } else { Removal::Revoked }
    }
}

/// Caps on what a node's agent may claim, set by the admin (on the token or the ProviderNode).
/// None: no cap from this source.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CapacityLimits {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_millis: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ephemeral_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpus: Option<u32>,
}

impl CapacityLimits {
    pub fn is_empty(&self) -> bool {
        *self == CapacityLimits::default()
    }
}

/// What a redeemed join token grants the node that joins with it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeGrant {
    /// The party the node belongs to (never empty: a token without one is `token:<id>`).
    pub owner: String,
    pub limits: CapacityLimits,
}

/// One row of the registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRecord {
    pub public_key_sha256: String,
    pub joined_ms: i64,
    /// None for nodes registered before owners were recorded.
    pub owner: Option<String>,
    pub limits: CapacityLimits,
    /// When and why the name was retired; None while the node is registered.
    pub removed: Option<(i64, Removal)>,
}

/// Outcome of registering a node name for a public key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Registration {
    /// The name was free and is now bound to the key.
    New,
    /// The name was already bound to this same key (a re-join); its owner and limits stay those
    /// of its first registration.
    SameKey,
    /// The name belongs to another key.
    Taken,
    /// The name was retired (its node left or was revoked) and is never registered again.
    Retired { at_ms: i64, reason: Removal },
}

/// The limits column as stored: JSON, NULL when there are none.
pub(super) fn limits_to_json(limits: &CapacityLimits) -> Option<String> {
    (!limits.is_empty()).then(|| serde_json::to_string(limits).expect("limits always serialize"))
}

/// A limits column as read; one that no longer parses is no limit (the sanity ceiling still
/// applies in the fleet) rather than an unreadable registry.
pub(super) fn limits_from_json(json: Option<String>) -> CapacityLimits {
    json.and_then(|j| serde_json::from_str(&j).ok()).unwrap_or_default()
}

impl Store {
    /// Binds `name` to a node key with what its token granted, or reports why it cannot be.
    pub async fn register_node(&self, name: &str, public_key_sha256: &str, grant: &NodeGrant, now_ms: i64) -> Result<Registration> {
        self.fence.check()?;
        let (epoch, name, key, grant) = (self.epoch, name.to_string(), public_key_sha256.to_string(), grant.clone());
        self.with(move |db| db.register_node(epoch, &name, &key, &grant, now_ms)).await
    }

    /// Retires a node's name (a tombstone, kept with when and why): its certificate no longer
    /// opens sessions and no key may take the name again. Returns whether it was registered.
    pub async fn remove_node(&self, name: &str, removal: Removal, now_ms: i64) -> Result<bool> {
        self.fence.check()?;
        let (epoch, name) = (self.epoch, name.to_string());
        self.with(move |db| db.remove_node(epoch, &name, removal, now_ms)).await
    }

    /// The key hash a registered node name is bound to; None when unknown or retired.
    pub async fn node_key(&self, name: &str) -> Result<Option<String>> {
        Ok(self.node(name).await?.filter(|r| r.removed.is_none()).map(|r| r.public_key_sha256))
    }

    /// The registry's row for `name`, retired or not.
    pub async fn node(&self, name: &str) -> Result<Option<NodeRecord>> {
        let name = name.to_string();
        self.with(move |db| db.node(&name)).await
    }
}
