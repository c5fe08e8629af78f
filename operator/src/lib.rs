//! The Kommune operator: ComputeJob and ProviderNode CRDs, the job controller, the scheduler,
//! the agents' gRPC gateway and the embedded store. Pure logic (`job`, `scheduler`) has no
//! kube or tonic in it; controllers and the gateway are thin shells around it.

pub mod attempt;
pub mod attempt_index;
pub mod blobs;
pub mod controller;
pub mod crd;
pub mod dispatch;
pub mod fence;
pub mod fleet;
pub mod gateway;
pub mod job;
pub mod ledger;
pub mod metrics;
pub mod pki;
pub mod pricing;
pub mod scheduler;
pub mod store;
pub mod tokens;

/// See [`kommune_proto::STAGE_TARGET`].
pub(crate) const STAGE: &str = kommune_proto::STAGE_TARGET;
