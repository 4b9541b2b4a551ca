//! radfm's collectives, kept free of libtorch so that they build, test and benchmark anywhere.
//!
//! Only members of the job's gang join ([`auth`]). Rank 0 serves the [`rendezvous`] server; the CPU collective is a TCP [`ring`]; GPUs talk
//! through [`nccl`], loaded at run time so that a machine without CUDA builds and runs
//! everything else. Every operation has a deadline: a peer that died or stalls turns into
//! [`Error::PeerLost`] (or [`Error::Rendezvous`]) instead of a hang. The trainer glues these to
//! tensors.
#![deny(missing_docs)]

pub mod auth;
pub mod nccl;
pub mod rendezvous;
pub mod ring;
mod shm;

/// Errors of the collectives.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Rendezvous with the other ranks failed (rendezvous server unreachable, a key never set).
    #[error("rendezvous {what}: {reason}")]
    Rendezvous {
        /// The rendezvous operation or key.
        what: String,
        /// What went wrong.
        reason: String,
    },
    /// Another rank died or stalled during a collective.
    #[error("rank {rank}: peer lost: {reason}")]
    PeerLost {
        /// This rank.
        rank: usize,
        /// Which peer and what failed.
        reason: String,
    },
    /// The NCCL backend cannot run on this machine (library missing, no GPU).
    #[error("NCCL backend unavailable: {reason}")]
    Unavailable {
        /// What is missing.
        reason: String,
    },
    /// A collective was called with buffers that do not fit it.
    #[error("{0}")]
    Shape(String),
    /// Local socket or file I/O failed.
    #[error("{path}: {source}")]
    Io {
        /// The socket or file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// Result alias of the collectives.
pub type Result<T, E = Error> = std::result::Result<T, E>;
