//! Kubernetes-facing shells: the ComputeJob controller, the ProviderNode status writer and the
//! CA Secret. They read and write the API server and call into the kube-free core.

pub mod ca;
pub mod job;
pub mod lease;
pub mod nodes;

/// The field manager of every write the operator makes.
pub const MANAGER: &str = "kommune-operator";

/// The Event recorder of every controller: reported as the operator, by pod when it knows it.
pub fn recorder(client: kube::Client) -> kube::runtime::events::Recorder {
    kube::runtime::events::Recorder::new(client, kube::runtime::events::Reporter { controller: MANAGER.into(), instance: std::env::var("POD_NAME").ok() })
}

/// A controller failure; the variant names the step, and becomes the Event/metric label.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error("finalizer: {0}")]
    Finalizer(String),
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

impl Error {
    /// A short label for metrics and logs.
    pub fn label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::Store(_) => "store",
            Error::Finalizer(_) => "finalizer",
            Error::MissingMetadata(_) => "metadata",
            Error::Pki(_) => "pki",
            Error::CaSecret(_) => "ca_secret",
            Error::Blob(_) => "blob",
            Error::Fenced(_) => "fenced",
        }
    }
}
