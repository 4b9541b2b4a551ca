//! radfm's image data: WebDataset-compatible tar shards on object storage, the dataset index, DICOM
//! and PNG/JPEG ingest with an enforced de-identification gate, and synthetic cohorts.
//!
//! One crate owns the shard format so that the writer (ingest, synth) and the readers (the
//! trainer's loader, the validators) cannot disagree about it; `docs/shard-format.md` documents it
//! for everyone else, and the Python `webdataset` library reads the shards unchanged.
#![deny(missing_docs)]

pub mod alloc_cap;
pub mod dicom;
pub mod dicom_lengths;
pub mod image16;
pub mod index;
pub mod ingest;
pub mod loader;
pub mod meta;
pub mod report_deid;
pub mod shard;
pub mod spool;
pub mod store;
pub mod structured_report;
pub mod synth;

pub use image16::Image16;
pub use index::{DatasetIndex, ShardEntry};
pub use meta::SampleMeta;
pub use shard::{Sample, ShardReader, ShardWriter};

/// Errors of the data crate; each names the file, shard or field concerned.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Object-store I/O failed.
    #[error("{uri}: {source}")]
    Store {
        /// The object or prefix.
        uri: String,
        /// The store's error.
        source: object_store::Error,
    },
    /// A URI could not be understood.
    #[error("{uri}: {reason}")]
    Uri {
        /// The URI as given.
        uri: String,
        /// Why it is not usable.
        reason: String,
    },
    /// Local file I/O failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A shard is corrupt or truncated.
    #[error("shard {shard}: {reason}")]
    Shard {
        /// The shard's name.
        shard: String,
        /// What is wrong.
        reason: String,
    },
    /// An image could not be decoded or encoded.
    #[error("{source_name}: {reason}")]
    Image {
        /// The file or sample key.
        source_name: String,
        /// What went wrong.
        reason: String,
    },
    /// A DICOM file still carries direct identifiers and `--deidentify` was not given.
    #[error(
        "{path}: refused: the file carries direct identifiers ({tags}); re-run with --deidentify to strip them (docs/shard-format.md lists what is removed)"
    )]
    Identified {
        /// The file.
        path: String,
        /// Names of the identifying attributes found (never their values).
        tags: String,
    },
    /// The de-identification gate refuses a file whose pixels may carry identifiers (burned-in
    /// text) without the ingest operator's explicit acceptance of that risk.
    #[error(
        "{source_name}: refused: {reason}; if you checked that the pixels carry no identifiers, re-run with --accept-burned-in-risk"
    )]
    PixelRisk {
        /// The file (its pseudonymous source id).
        source_name: String,
        /// Why the pixels are at risk.
        reason: String,
    },
    /// A report still holds what could identify the patient after de-identification (see
    /// [`report_deid`]), and `--accept-report-doubts` was not given.
    #[error(
        "{source_name}: refused: its report may still identify the patient ({kinds}); read it, and if it does not, re-run with --accept-report-doubts"
    )]
    ReportDoubt {
        /// The file (its pseudonymous source id).
        source_name: String,
        /// The kinds of doubt (never the text).
        kinds: String,
    },
    /// A DICOM file in the input is not an image (a Structured Report, a presentation state);
    /// ingest skips it and counts it.
    #[error("{source_name}: {what}, not an image")]
    NotAnImage {
        /// The file (its pseudonymous source id).
        source_name: String,
        /// What it is.
        what: String,
    },
    /// A Structured Report could not be read; nothing is ingested until it is fixed or removed.
    #[error("{source_name}: Structured Report: {reason}")]
    StructuredReport {
        /// The file (its pseudonymous source id).
        source_name: String,
        /// What is wrong.
        reason: String,
    },
    /// Several equally final Structured Reports with different texts describe the image.
    #[error(
        "{source_name}: refused: {count} equally final Structured Reports with different texts describe it; remove the ones that do not apply, or mark the right one verified"
    )]
    ReportConflict {
        /// The image (its pseudonymous source id).
        source_name: String,
        /// How many.
        count: usize,
    },
    /// The object store accepted a second create-only write of one object: concurrent writers
    /// (registrations, index appends, checkpoint epochs) could overwrite each other.
    #[error(
        "{uri}: the object store does not honour create-only writes (If-None-Match: *); concurrent writers could overwrite each other. Use a store that does (AWS S3, MinIO, versitygw, GCS, Azure, a local folder), or set RADFM_SINGLE_WRITER=true if only one writer ever uses this location"
    )]
    Unconditional {
        /// The location checked.
        uri: String,
    },
    /// An object is larger than what reading it may allocate.
    #[error("{uri}: {bytes} bytes is more than the limit of {limit} for this kind of object")]
    TooLarge {
        /// The object.
        uri: String,
        /// Its size.
        bytes: u64,
        /// The limit.
        limit: u64,
    },
    /// The dataset index is invalid or was changed in a way that is not an append.
    #[error("{uri}: {reason}")]
    Index {
        /// The index object.
        uri: String,
        /// What is wrong.
        reason: String,
    },
}

/// Result alias of the data crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
