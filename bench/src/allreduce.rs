//! bench-allreduce: bus bandwidth of radfm's CPU ring all-reduce, one process per rank on
//! loopback, for comparison with torch.distributed + gloo (bench/allreduce_gloo.py).
//!
//! Usage: bench-allreduce WORLD MIB...; prints one JSON line per size (rank 0). busbw follows
//! nccl-tests: algbw × 2(n−1)/n.

use std::time::{Duration, Instant};

use radfm_trainer::collective::rendezvous::{RendezvousClient, RendezvousServer};
use radfm_trainer::collective::ring::Ring;

fn iterations(bytes: usize) -> usize {
    (((256usize << 20) / bytes.max(1)) * 2).clamp(3, 50)
}

fn rank_main(rank: usize, world: usize, port: u16, sizes: &[usize]) -> anyhow::Result<()> {
    let _server = if rank == 0 {
        Some(RendezvousServer::start(
            &format!("127.0.0.1:{port}"),
            None,
            1,
        )?)
    } else {
        None
    };
    let mut store = RendezvousClient::connect(
        &format!("127.0.0.1:{port}"),
        1,
        Duration::from_secs(30),
        None,
    )?;
    let mut ring = Ring::connect(&mut store, rank, world, Duration::from_secs(60))?;
    for &mib in sizes {
        let bytes = mib << 20;
        let mut data = vec![1.0f32; bytes / 4];
        ring.all_reduce_sum(&mut data)?; // warm-up
        ring.barrier()?;
        let iters = iterations(bytes);
        let t = Instant::now();
        for _ in 0..iters {
            ring.all_reduce_sum(&mut data)?;
        }
        let secs = t.elapsed().as_secs_f64() / iters as f64;
        if rank == 0 {
            let algbw = bytes as f64 / secs / 1e9;
            println!(
                "{}",
                serde_json::json!({
                    "impl": "radfm-ring", "world": world, "mib": mib, "iters": iters,
                    "seconds": secs, "algbw_gbs": algbw,
                    "busbw_gbs": algbw * 2.0 * (world - 1) as f64 / world as f64,
                })
            );
        }
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    anyhow::ensure!(args.len() >= 2, "usage: bench-allreduce WORLD MIB...");
    let world: usize = args[0].parse()?;
    let sizes: Vec<usize> = args[1..]
        .iter()
        .map(|s| s.parse())
        .collect::<Result<_, _>>()?;
    if let Ok(rank) = std::env::var("BENCH_RANK") {
        let port: u16 = std::env::var("BENCH_PORT")?.parse()?;
        return rank_main(rank.parse()?, world, port, &sizes);
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let exe = std::env::current_exe()?;
    let children: Vec<std::process::Child> = (0..world)
        .map(|r| {
            std::process::Command::new(&exe)
                .args(&args)
                .env("BENCH_RANK", r.to_string())
                .env("BENCH_PORT", port.to_string())
                .spawn()
        })
        .collect::<Result<_, _>>()?;
    for mut c in children {
        anyhow::ensure!(c.wait()?.success(), "a rank failed");
    }
    Ok(())
}
