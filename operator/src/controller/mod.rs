//! Kubernetes-facing shells: the ComputeJob controller, the ProviderNode status writer and the
//! CA Secret. They read and write the API server and call into the kube-free core.

pub mod budget;
pub mod ca;
pub mod crds;
pub mod events;
pub mod inputs;
pub mod job;
pub mod job_events;
pub mod lease;
pub mod nodes;
pub mod outputs;
pub mod secret_env;

use kube::runtime::finalizer::Error as FinalizerError;

/// The field manager of every write the operator makes.
pub const MANAGER: &str = "kommune-operator";

/// The Event writer of every controller: reported as the operator, by pod when it knows it.
pub fn recorder(client: kube::Client) -> events::EventWriter {
    events::EventWriter::new(client)
}

/// Publishes an Event about `regarding` unless this replica may not write (it is not the
/// leader); a failure to record one is logged, never fatal. The recorder folds repeats into one
/// Event with a count, as Kubernetes' own components do.
pub async fn publish_event(
    recorder: &events::EventWriter,
    dispatcher: &crate::dispatch::Dispatcher,
    regarding: &k8s_openapi::api::core::v1::ObjectReference,
    severity: crate::job::status::Severity,
    reason: &str,
    note: &str,
) {
    use kube::runtime::events::{Event, EventType};
    if dispatcher.may_write().is_err() {
        return;
    }
    let ev = Event {
        type_: match severity {
            crate::job::status::Severity::Normal => EventType::Normal,
            crate::job::status::Severity::Warning => EventType::Warning,
        },
        reason: reason.chars().take(128).collect(),
        note: Some(note.chars().take(1000).collect()),
        action: "Reconcile".into(),
        secondary: None,
    };
    if let Err(e) = recorder.publish(&ev, regarding).await {
        tracing::warn!(kind = ?regarding.kind, name = ?regarding.name, error = %e, "cannot record event");
    }
}

/// A controller failure; the variant names the step, and becomes the Event/metric label.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Ledger(#[from] crate::ledger::LedgerError),
    /// Failures of reconcile's own steps arrive wrapped here by kube's finalizer helper; kept
    /// typed so [`Error::label`] can name the step that failed rather than the wrapper.
    #[error(transparent)]
    Finalizer(Box<kube::runtime::finalizer::Error<Error>>),
    #[error("writing status: {0}")]
    StatusPatch(#[source] kube::Error),
    #[error("ComputeJob {0} has no namespace or uid")]
    MissingMetadata(String),
    #[error(transparent)]
    Pki(#[from] crate::pki::PkiError),
    #[error("CA Secret {0} is missing tls.crt or tls.key")]
    CaSecret(String),
    #[error(transparent)]
    Blob(#[from] crate::blobs::BlobError),
    #[error(transparent)]
    Fenced(#[from] crate::fence::Fenced),
}

impl From<crate::dispatch::DispatchError> for Error {
    fn from(e: crate::dispatch::DispatchError) -> Self {
        match e {
            crate::dispatch::DispatchError::Store(e) => Error::Store(e),
            crate::dispatch::DispatchError::Ledger(e) => Error::Ledger(e),
        }
    }
}

impl Error {
    /// A short label for metrics and logs.
    pub fn label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::Store(_) => "store",
            Error::Ledger(_) => "ledger",
            Error::Finalizer(e) => match e.as_ref() {
                FinalizerError::ApplyFailed(inner) | FinalizerError::CleanupFailed(inner) => inner.label(),
                _ => "finalizer",
            },
            Error::StatusPatch(_) => "status_patch",
            Error::MissingMetadata(_) => "metadata",
            Error::Pki(_) => "pki",
            Error::CaSecret(_) => "ca_secret",
            Error::Blob(_) => "blob",
            Error::Fenced(_) => "fenced",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused() -> kube::Error {
        let status = kube::core::Status::failure("forbidden", "Forbidden").with_code(403);
        kube::Error::Api(Box::new(status))
    }

    /// The finalizer helper wraps every step's error; the label still names the step.
    #[test]
    fn a_step_failing_inside_the_finalizer_is_labelled_by_the_step() {
        let apply = Error::Finalizer(Box::new(FinalizerError::ApplyFailed(Error::StatusPatch(refused()))));
        assert_eq!(apply.label(), "status_patch");
        let cleanup = Error::Finalizer(Box::new(FinalizerError::CleanupFailed(Error::MissingMetadata("j".into()))));
        assert_eq!(cleanup.label(), "metadata");
        // The helper's own writes are the finalizer step.
        assert_eq!(Error::Finalizer(Box::new(FinalizerError::AddFinalizer(refused()))).label(), "finalizer");
        assert!(apply.to_string().contains("writing status"), "{apply}");
    }
}
