//! `radfm-trainer`: today it validates the env contract (`radfm-trainer validate`), printing the
//! resolved configuration or exiting with code 64 and the offending variable.

use std::process::ExitCode;

fn main() -> ExitCode {
    let cmd = std::env::args().nth(1).unwrap_or_default();
    match cmd.as_str() {
        "validate" => match radfm_trainer::Config::from_env() {
            Ok(config) => {
                println!("{}", config.to_json());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("radfm-trainer: {e}");
                ExitCode::from(e.exit_code() as u8)
            }
        },
        "version" => {
            println!("radfm-trainer {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        other => {
            eprintln!("radfm-trainer: unknown command {other:?}; commands: validate, version");
            ExitCode::from(radfm_api::exit::INVALID_CONFIG as u8)
        }
    }
}
