//! radfm's trainer process.
//!
//! This crate turns the env contract into one validated configuration before anything runs and
//! maps every failure to an exit code of the documented table, because the exit code is all the
//! operator learns from a dead trainer. Training itself (ViT/MAE on libtorch, data loading,
//! collectives) builds on this.
#![deny(missing_docs)]

use radfm_api::env::EnvContract;
use radfm_api::exit;

/// Errors of the trainer library, each with the exit code it maps to.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The env contract is missing a variable or holds an invalid value.
    #[error("invalid configuration: {0}")]
    Config(#[from] radfm_api::Error),
}

impl Error {
    /// The exit code the operator's failure policy expects for this error.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Config(_) => exit::INVALID_CONFIG,
        }
    }
}

/// Result alias of the trainer library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The trainer's resolved configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The validated env contract.
    pub contract: EnvContract,
}

impl Config {
    /// Reads and validates the process environment.
    pub fn from_env() -> Result<Self> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// Reads and validates variables from any source.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self> {
        Ok(Config {
            contract: EnvContract::from_lookup(get)?,
        })
    }

    /// The configuration as one JSON object (variable names as keys), for logs.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::Value::Object(
            self.contract
                .to_vars()
                .into_iter()
                .map(|(k, v)| (k, serde_json::Value::String(v)))
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_contract_maps_to_the_invalid_config_exit_code() {
        let err = Config::from_lookup(|_| None).unwrap_err();
        assert_eq!(err.exit_code(), 64);
        assert_eq!(
            err.to_string(),
            "invalid configuration: environment variable RADFM_JOB_NAME: is required but not set"
        );
    }
}
