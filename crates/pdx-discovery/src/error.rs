//! The one error type of worker discovery.

/// What can go wrong in discovery.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    /// A bad `--discovery` value or discovery flag (says which and why).
    #[error("bad discovery setting: {0}")]
    BadArgs(String),
    /// A value a source holds is not a registration the router would take (says why); the entry is ignored.
    #[error("bad registration in discovery source: {0}")]
    BadValue(String),
    /// etcd refused a request or could not be reached.
    #[error("etcd: {0}")]
    Etcd(String),
    /// The Kubernetes API refused a request or could not be reached (or its configuration is missing).
    #[error("kubernetes: {0}")]
    Kube(String),
}

impl From<etcd_client::Error> for DiscoveryError {
    fn from(e: etcd_client::Error) -> Self {
        DiscoveryError::Etcd(e.to_string())
    }
}

impl From<kube::Error> for DiscoveryError {
    fn from(e: kube::Error) -> Self {
        DiscoveryError::Kube(e.to_string())
    }
}
