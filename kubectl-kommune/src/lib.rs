//! `kubectl kommune`: a kubectl plugin. Each subcommand is a module; they reach the operator
//! with the user's own kubeconfig credentials, so Kubernetes RBAC decides what they see.

pub mod api;
pub mod connect;
pub mod dashboard;
pub mod follow;
pub mod forward;
pub mod get;
pub mod logs;
pub mod results;
