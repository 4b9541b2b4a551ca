//! radfm's decentralised clinical validation.
//!
//! Hospitals do not ship images; they validate candidate models on their own data and send back
//! signed aggregates. This crate holds the parts every participant must agree on:
//! - [`stats`]: AUROC, AUPRC, operating-point sensitivity and specificity, calibration, and
//!   paired bootstrap intervals of candidate − baseline;
//! - [`drift`]: permutation two-sample tests (embedding MMD, score KS, metadata χ²) and Holm's
//!   adjustment, for monitoring a deployed model at a site;
//! - [`performance`]: late labels at a site: AUROC per cell against the reference window, with
//!   intervals and a permutation test of a drop;
//! - [`disclosure`]: which subgroup cells a report may publish (small cells and their
//!   complements hidden);
//! - [`report`]: the site report and its ed25519 signature;
//! - [`monitor`]: a site's signed monitor report of its deployed model (drift tests judged
//!   together at one false-alarm level);
//! - [`gate`]: the promotion decision from verified reports under a `PromotionPolicy`;
//! - [`approval`]: human approvals signed by the people the policy lists;
//! - [`apply`]: the gate against the registry, recording each decision in its event log.
//!
//! Everything but [`apply`] is pure: the site validator (`radfm validate`) computes predictions with libtorch
//! and the registry stores the results; neither is needed to test the rules here.
#![deny(missing_docs)]

pub mod apply;
pub mod approval;
pub mod disclosure;
pub mod drift;
pub mod gate;
pub mod monitor;
pub mod performance;
pub mod report;
pub mod stats;

/// Errors of validation, each saying what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Signature or key problems.
    #[error("signature: {0}")]
    Signature(String),
    /// Data that cannot be validated or parsed.
    #[error("{0}")]
    Data(String),
}

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
