//! The Kommune operator: ComputeJob and ProviderNode CRDs, the job controller, the scheduler,
//! the agents' gRPC gateway and the embedded store. Pure logic (`job`, `scheduler`) has no
//! kube or tonic in it; controllers and the gateway are thin shells around it.

pub mod controller;
pub mod crd;
pub mod dispatch;
pub mod fleet;
pub mod gateway;
pub mod job;
pub mod metrics;
pub mod outputs;
pub mod payouts;
pub mod pki;
pub mod tokens;
pub mod web;

// The pure core and the storage layer are crates of their own (see docs/ARCHITECTURE.md); the
// operator reaches them under their old paths so its shells read the same.
pub use kommune_core::{attempt, attempt_index, bounds, fence, scheduler};
pub use kommune_store::attempts as store;
pub use kommune_store::{blobs, ledger};

/// The core's pricing, plus the conversion of a ProviderNode's `spec.pricing`.
pub mod pricing {
    pub use crate::crd::provider_node::overrides_from;
    pub use kommune_core::pricing::*;
}

/// See [`kommune_proto::STAGE_TARGET`].
pub(crate) const STAGE: &str = kommune_proto::STAGE_TARGET;
