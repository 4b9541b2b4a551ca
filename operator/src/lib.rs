//! radfm's Kubernetes operator: runs TrainingJobs as gangs of trainer pods, ContinualTrainings
//! as scheduled, data-triggered series of TrainingJobs, and the decentralised validation of
//! SiteValidators and PromotionPolicies, and federated training across hospitals
//! (FederatedTrainings at the hub, FederatedSites at each hospital), and post-deployment
//! monitoring at each hospital (ModelMonitors).
//!
//! One folder per controller, each a thin async layer around a pure plan:
//! [`training_job`] ([`training_job::plan`] decides, [`training_job::children`] builds the owned
//! objects), [`continual_training`] ([`continual_training::schedule`] decides when),
//! [`site_validator`], [`promotion_policy`], [`federated_training`], [`federated_site`],
//! [`model_monitor`]. [`effects`] holds the writes every controller ends a pass with;
//! [`leader`], [`metrics`] and [`telemetry`] make the binary operable.
#![deny(missing_docs)]

pub mod context;
pub mod continual_training;
pub mod crdgen;
pub mod effects;
pub mod federated_site;
pub mod federated_training;
pub mod kueue;
pub mod leader;
pub mod metrics;
pub mod model_monitor;
pub mod pod_policy;
pub mod promotion_policy;
pub mod registry_access;
pub mod site_validator;
pub mod telemetry;
pub mod training_job;
/// Errors of the operator library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A Kubernetes API call failed.
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// Creating or deleting a child object failed.
    #[error("{what}: {source}")]
    Child {
        /// What was being done ("creating pod mae-w0-a1").
        what: String,
        /// The API error.
        source: kube::Error,
    },
    /// An object could not be (de)serialized.
    #[error("serialization: {0}")]
    Serialize(#[source] serde_json::Error),
    /// A field the operator needs is missing.
    #[error("missing field {0}")]
    MissingField(&'static str),
    /// A field holds a value the operator cannot use.
    #[error("{field}: {reason}")]
    Invalid {
        /// The field path.
        field: String,
        /// What is wrong.
        reason: String,
    },
    /// A reconcile pass panicked: a bug. The pass is abandoned and retried like a failed one;
    /// the other objects' passes go on.
    #[error("reconcile of {object} panicked: {message}")]
    Panicked {
        /// Kind, namespace and name of the object.
        object: String,
        /// The panic's message.
        message: String,
    },
}

impl Error {
    /// A short label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Kube(_) => "api",
            Error::Child { .. } => "child",
            Error::Serialize(_) => "serialize",
            Error::MissingField(_) | Error::Invalid { .. } => "invalid",
            Error::Panicked { .. } => "panic",
        }
    }
}

/// Result alias of the operator library.
pub type Result<T, E = Error> = std::result::Result<T, E>;
