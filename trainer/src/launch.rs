//! The per-pod launcher: one trainer process per local device, as torchrun does.
//!
//! The pod's entry process starts `RADFM_NPROC_PER_NODE` copies of itself with
//! `RADFM_LOCAL_RANK` set, forwards SIGTERM and SIGINT to them, and exits with one code that
//! tells the operator what happened to the pod as a whole ([`fold`]).

use std::process::{Child, Command};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use radfm_api::exit;

use crate::config::LOCAL_RANK;

/// The pod's exit code from its processes' codes: success only if all succeeded; otherwise a
/// permanent code if any process failed permanently (running again cannot help); otherwise
/// Terminated if that is what every failed process reported; otherwise the first other failure.
/// Processes stopped by a peer's failure report PeerLost, so the root cause wins over them.
pub fn fold(codes: &[i32]) -> i32 {
    let failed: Vec<i32> = codes
        .iter()
        .copied()
        .filter(|&c| c != exit::SUCCESS)
        .collect();
    if failed.is_empty() {
        return exit::SUCCESS;
    }
    if let Some(&c) = failed
        .iter()
        .find(|&&c| exit::class(c) == exit::ExitClass::Permanent)
    {
        return c;
    }
    if failed.iter().all(|&c| c == exit::TERMINATED) {
        return exit::TERMINATED;
    }
    failed
        .iter()
        .copied()
        .find(|&c| c != exit::PEER_LOST && c != exit::TERMINATED)
        .unwrap_or(exit::PEER_LOST)
}

/// Runs `nproc` copies of this executable with the same arguments and `RADFM_LOCAL_RANK`, until
/// all exit; returns the folded exit code.
pub fn run(nproc: usize) -> i32 {
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("radfm-trainer: cannot find my own executable: {e}");
            return exit::RETRYABLE;
        }
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut children: Vec<Child> = Vec::with_capacity(nproc);
    for local in 0..nproc {
        match Command::new(&exe)
            .args(&args)
            .env(LOCAL_RANK, local.to_string())
            .spawn()
        {
            Ok(c) => children.push(c),
            Err(e) => {
                eprintln!("radfm-trainer: starting local rank {local}: {e}");
                for c in &mut children {
                    let _ = c.kill();
                }
                return exit::RETRYABLE;
            }
        }
    }
    let signalled = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        let _ = signal_hook::flag::register(sig, signalled.clone());
    }
    let mut codes: Vec<Option<i32>> = vec![None; nproc];
    let mut forwarded = false;
    while codes.iter().any(Option::is_none) {
        if signalled.load(Ordering::SeqCst) && !forwarded {
            for c in &children {
                // SAFETY: kill(2) on our own children's pids.
                unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            }
            forwarded = true;
        }
        for (i, c) in children.iter_mut().enumerate() {
            if codes[i].is_none()
                && let Ok(Some(status)) = c.try_wait()
            {
                codes[i] = Some(exit::of_status(status));
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let codes: Vec<i32> = codes
        .into_iter()
        .map(|c| c.unwrap_or(exit::RETRYABLE))
        .collect();
    let folded = fold(&codes);
    if folded != exit::SUCCESS {
        eprintln!("radfm-trainer: local ranks exited with {codes:?}; pod exits {folded}");
    }
    folded
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pod_code_names_the_root_cause() {
        assert_eq!(fold(&[0, 0, 0]), 0);
        assert_eq!(fold(&[0, 76, 66, 76]), 66, "a permanent failure wins");
        assert_eq!(
            fold(&[76, 75, 76]),
            75,
            "the failure that stopped the peers"
        );
        assert_eq!(fold(&[76, 76]), 76);
        assert_eq!(fold(&[77, 77]), 77);
        assert_eq!(fold(&[77, 76]), 76);
        assert_eq!(fold(&[0, 137]), 137);
    }
}
