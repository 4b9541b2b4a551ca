//! The trainer's exit codes.
//!
//! A worker pod's exit code is the only thing the operator learns from a dead trainer, so the code
//! must say whether running the gang again can help. Codes follow BSD `sysexits.h` where one fits.
//! The operator's default failure policy ([`crate::failure`]) is derived from [`class`].

/// Training finished.
pub const SUCCESS: i32 = 0;
/// The configuration (env contract or YAML) is invalid: running again cannot help.
pub const INVALID_CONFIG: i32 = 64;
/// More corrupt or undecodable samples than the configured limit.
pub const DATA_ERROR_LIMIT: i32 = 65;
/// The loss was NaN or infinite more often than the retry budget allows.
pub const NON_FINITE_LOSS: i32 = 66;
/// A transient failure (object-store I/O, network): the gang should restart from the last
/// checkpoint.
pub const RETRYABLE: i32 = 75;
/// A peer rank died or stalled past the collective timeout.
pub const PEER_LOST: i32 = 76;
/// SIGTERM received; a checkpoint was written before exiting.
pub const TERMINATED: i32 = 77;
/// Killed by SIGKILL (128 + 9), for example by the OOM killer.
pub const KILLED: i32 = 137;
/// Killed by SIGTERM before a checkpoint could be written (128 + 15).
pub const SIGTERM: i32 = 143;

/// The first and last permanent code: the default failure policy fails the job on these.
pub const PERMANENT_RANGE: (i32, i32) = (64, 69);

/// What an exit code means for the gang.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitClass {
    /// The trainer finished.
    Success,
    /// Running the gang again from its last checkpoint can help.
    Retryable,
    /// Running again cannot help; the job should fail.
    Permanent,
}

/// The exit code of a finished process as a shell reports it: its code, or 128 + the signal
/// that killed it (so SIGKILL reads as [`KILLED`], SIGTERM as [`SIGTERM`]).
pub fn of_status(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
}

/// Classifies an exit code. Codes the table does not name (crashes, panics) are retryable, so
/// that `backoffLimit` bounds them.
pub fn class(code: i32) -> ExitClass {
    match code {
        SUCCESS => ExitClass::Success,
        c if (PERMANENT_RANGE.0..=PERMANENT_RANGE.1).contains(&c) => ExitClass::Permanent,
        _ => ExitClass::Retryable,
    }
}

/// One row of the documented table: code, name, class, meaning.
pub const TABLE: &[(i32, &str, ExitClass, &str)] = &[
    (
        SUCCESS,
        "Success",
        ExitClass::Success,
        "training reached its last step",
    ),
    (
        INVALID_CONFIG,
        "InvalidConfig",
        ExitClass::Permanent,
        "configuration rejected before training",
    ),
    (
        DATA_ERROR_LIMIT,
        "DataErrorLimit",
        ExitClass::Permanent,
        "too many corrupt samples",
    ),
    (
        NON_FINITE_LOSS,
        "NonFiniteLoss",
        ExitClass::Permanent,
        "loss NaN/inf beyond the retry budget",
    ),
    (
        RETRYABLE,
        "Retryable",
        ExitClass::Retryable,
        "transient I/O or network failure",
    ),
    (
        PEER_LOST,
        "PeerLost",
        ExitClass::Retryable,
        "another rank died or stalled",
    ),
    (
        TERMINATED,
        "Terminated",
        ExitClass::Retryable,
        "SIGTERM; checkpoint written",
    ),
    (
        KILLED,
        "Killed",
        ExitClass::Retryable,
        "SIGKILL (often the OOM killer)",
    ),
    (
        SIGTERM,
        "SigTerm",
        ExitClass::Retryable,
        "SIGTERM before a checkpoint was written",
    ),
];

/// The name of a code in the table, for messages.
pub fn name(code: i32) -> &'static str {
    TABLE
        .iter()
        .find(|row| row.0 == code)
        .map(|row| row.1)
        .unwrap_or("Unknown")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_rows_agree_with_classification() {
        for (code, name, cls, _) in TABLE {
            assert_eq!(class(*code), *cls, "code {code} ({name})");
        }
    }

    #[test]
    fn unknown_codes_are_retryable_and_config_errors_are_permanent() {
        assert_eq!(class(1), ExitClass::Retryable);
        assert_eq!(class(101), ExitClass::Retryable);
        assert_eq!(class(67), ExitClass::Permanent);
        assert_eq!(class(70), ExitClass::Retryable);
        assert_eq!(name(76), "PeerLost");
        assert_eq!(name(3), "Unknown");
    }
}

#[cfg(test)]
mod doc_tests {
    #[test]
    fn docs_exit_codes_table_lists_every_code() {
        let doc = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../docs/exit-codes.md"
        ))
        .unwrap();
        for (code, name, _, meaning) in super::TABLE {
            let row = format!("| {code} | {name} |");
            assert!(doc.contains(&row), "docs/exit-codes.md lacks {row}");
            assert!(
                doc.contains(meaning),
                "docs/exit-codes.md lacks {meaning:?}"
            );
        }
    }
}
