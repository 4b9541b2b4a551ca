//! radfm's Kubernetes operator: runs TrainingJobs as gangs of trainer pods.
//!
//! The crate is split so that decisions stay pure: [`children`] builds the owned objects,
//! [`plan`] decides what to create, delete and report, and [`reconcile`] is the thin layer that
//! talks to the API server. [`leader`], [`metrics`] and [`telemetry`] make the binary operable.
#![deny(missing_docs)]

pub mod children;
pub mod crdgen;
pub mod plan;
