//! bench-nccl: radfm's NCCL backend on real GPUs, without libtorch (so the binary built here
//! runs on any CUDA machine that has libnccl).
//!
//! `bench-nccl check [TIMEOUT_S]`: the device verification of the backend, one rank per GPU,
//! each on its own thread. Sum all-reduce and broadcast give exact values; a communicator whose
//! last rank never joins fails within the timeout instead of hanging; with two or more GPUs, a
//! rank that stops calling makes the others' all-reduce fail within the timeout. Prints one JSON
//! line per check and exits non-zero if any failed.
//!
//! `bench-nccl busbw WORLD MIB...`: all-reduce bandwidth, one JSON line per size, in the format
//! of bench-allreduce (busbw = algbw × 2(n−1)/n, as nccl-tests defines it), for comparison with
//! torch.distributed's NCCL (`bench/allreduce_gloo.py` with `BACKEND=nccl`).

use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use cudarc::driver::{CudaContext, DevicePtrMut};
use radfm_collective::nccl::{self, Nccl};
use radfm_collective::rendezvous::{RendezvousClient, RendezvousServer};

fn iterations(bytes: usize) -> usize {
    (((256usize << 20) / bytes.max(1)) * 2).clamp(3, 50)
}

/// The loaded NCCL's version and the GPUs visible.
fn gpus() -> anyhow::Result<(nccl::Version, usize)> {
    let version = nccl::probe()?;
    cudarc::driver::result::init().map_err(|e| anyhow::anyhow!("cuInit: {e:?}"))?;
    let n = cudarc::driver::result::device::get_count()
        .map_err(|e| anyhow::anyhow!("cuDeviceGetCount: {e:?}"))?;
    ensure!(n > 0, "no GPU visible");
    Ok((version, n as usize))
}

/// Runs `f(rank, store)` for `world` ranks on threads, rank r on GPU r; returns each result.
fn gang<T: Send + 'static>(
    world: usize,
    timeout: Duration,
    f: impl Fn(usize, RendezvousClient) -> anyhow::Result<T> + Send + Sync + 'static,
) -> anyhow::Result<Vec<anyhow::Result<T>>> {
    let server = RendezvousServer::start("127.0.0.1:0", None, 1)?;
    let addr = server.addr.to_string();
    let f = Arc::new(f);
    let handles: Vec<_> = (0..world)
        .map(|rank| {
            let (f, addr) = (f.clone(), addr.clone());
            std::thread::spawn(move || {
                let store = RendezvousClient::connect(&addr, 1, timeout, None)?;
                f(rank, store)
            })
        })
        .collect();
    Ok(handles
        .into_iter()
        .map(|h| h.join().unwrap_or_else(|_| bail!("rank thread panicked")))
        .collect())
}

/// Every rank fills a buffer with rank+1, all-reduces and checks n(n+1)/2 everywhere; then
/// broadcasts rank 0's values (0, 1, 2, ...) and checks them.
fn exact_values(world: usize, timeout: Duration) -> anyhow::Result<serde_json::Value> {
    let n = (64usize << 20) / 4 + 3; // not a multiple of anything NCCL chunks by
    let results = gang(world, timeout, move |rank, mut store| {
        let mut comm = Nccl::connect(&mut store, rank, world, rank, timeout)?;
        let ctx = CudaContext::new(rank)?;
        let stream = ctx.default_stream();
        let mut buf = stream.clone_htod(&vec![(rank + 1) as f32; n])?;
        {
            let (ptr, _sync) = buf.device_ptr_mut(&stream);
            // SAFETY: `buf` holds n f32 on this rank's GPU and is borrowed for the call.
            unsafe { comm.all_reduce_sum_f32(ptr as *mut _, n)? };
        }
        let sum = stream.clone_dtoh(&buf)?;
        let want = (world * (world + 1) / 2) as f32;
        ensure!(
            sum.iter().all(|&v| v == want),
            "rank {rank}: all-reduce gave {:?}.., want {want}",
            &sum[..4]
        );
        let mine: Vec<f32> = (0..n)
            .map(|i| if rank == 0 { (i % 1000) as f32 } else { -1.0 })
            .collect();
        let mut buf = stream.clone_htod(&mine)?;
        {
            let (ptr, _sync) = buf.device_ptr_mut(&stream);
            // SAFETY: as above.
            unsafe { comm.broadcast_f32(ptr as *mut _, n, 0)? };
        }
        let got = stream.clone_dtoh(&buf)?;
        ensure!(
            got.iter().enumerate().all(|(i, &v)| v == (i % 1000) as f32),
            "rank {rank}: broadcast differs from rank 0"
        );
        Ok(())
    })?;
    for r in results {
        r?;
    }
    Ok(serde_json::json!({"check": "exact_values", "world": world, "floats": n, "ok": true}))
}

/// The last rank of the communicator never joins: every other rank's connect must fail with
/// PeerLost within the timeout (plus slack), not hang.
fn missing_peer(gpus: usize, timeout: Duration) -> anyhow::Result<serde_json::Value> {
    let world = gpus + 1;
    let t = Instant::now();
    let results = gang(gpus, timeout, move |rank, mut store| {
        match Nccl::connect(&mut store, rank, world, rank, timeout) {
            Ok(_) => bail!("rank {rank}: joined a communicator whose rank {gpus} never came"),
            Err(e @ radfm_collective::Error::PeerLost { .. }) => Ok(e.to_string()),
            Err(e) => bail!("rank {rank}: wrong error: {e}"),
        }
    })?;
    let secs = t.elapsed().as_secs_f64();
    let errors: Vec<String> = results.into_iter().collect::<anyhow::Result<_>>()?;
    ensure!(
        secs < timeout.as_secs_f64() + 10.0,
        "took {secs:.1}s with a {timeout:?} timeout"
    );
    Ok(
        serde_json::json!({"check": "missing_peer", "world": world, "seconds": secs,
                          "errors": errors, "ok": true}),
    )
}

/// All ranks join and reduce once; then the last rank stops calling. The others' next
/// all-reduce must fail with PeerLost within the timeout.
fn stalled_peer(world: usize, timeout: Duration) -> anyhow::Result<serde_json::Value> {
    let release = Arc::new(Barrier::new(world));
    let t = Arc::new(std::sync::Mutex::new(None::<Instant>));
    let results = gang(world, timeout, {
        let t = t.clone();
        move |rank, mut store| {
            let mut comm = Nccl::connect(&mut store, rank, world, rank, timeout)?;
            let ctx = CudaContext::new(rank)?;
            let stream = ctx.default_stream();
            let mut buf = stream.clone_htod(&vec![1.0f32; 1 << 20])?;
            let (ptr, _sync) = buf.device_ptr_mut(&stream);
            // SAFETY: `buf` holds 1 Mi f32 on this GPU, borrowed until the end.
            unsafe { comm.all_reduce_sum_f32(ptr as *mut _, 1 << 20)? };
            store.barrier("reduced", world)?;
            if rank == world - 1 {
                // Stall until the others have given up, then leave (dropping aborts).
                release.wait();
                return Ok(None);
            }
            *t.lock().unwrap() = Some(Instant::now());
            // SAFETY: as above.
            let r = unsafe { comm.all_reduce_sum_f32(ptr as *mut _, 1 << 20) };
            let secs = t.lock().unwrap().unwrap().elapsed().as_secs_f64();
            release.wait();
            match r {
                Ok(()) => bail!(
                    "rank {rank}: all-reduce finished without rank {}",
                    world - 1
                ),
                Err(e @ radfm_collective::Error::PeerLost { .. }) => {
                    Ok(Some((secs, e.to_string())))
                }
                Err(e) => bail!("rank {rank}: wrong error: {e}"),
            }
        }
    })?;
    let mut worst = 0.0f64;
    let mut errors = Vec::new();
    for r in results {
        if let Some((secs, e)) = r? {
            worst = worst.max(secs);
            errors.push(e);
        }
    }
    ensure!(
        worst < timeout.as_secs_f64() + 10.0,
        "the slowest rank gave up after {worst:.1}s with a {timeout:?} timeout"
    );
    Ok(
        serde_json::json!({"check": "stalled_peer", "world": world, "seconds": worst,
                          "errors": errors, "ok": true}),
    )
}

fn check(timeout: Duration) -> anyhow::Result<()> {
    let (version, n) = gpus()?;
    println!(
        "{}",
        serde_json::json!({"check": "probe", "nccl": version.to_string(), "gpus": n, "ok": true})
    );
    let mut failed = 0;
    let mut report = |name: &str, r: anyhow::Result<serde_json::Value>| match r {
        Ok(v) => println!("{v}"),
        Err(e) => {
            failed += 1;
            println!(
                "{}",
                serde_json::json!({"check": name, "ok": false, "error": format!("{e:#}")})
            );
        }
    };
    report("exact_values", exact_values(n, timeout));
    report("missing_peer", missing_peer(n, timeout));
    if n >= 2 {
        report("stalled_peer", stalled_peer(n, timeout));
    } else {
        println!(
            "{}",
            serde_json::json!({"check": "stalled_peer", "skipped": "needs two GPUs: one GPU cannot host two NCCL ranks"})
        );
    }
    ensure!(failed == 0, "{failed} check(s) failed");
    Ok(())
}

fn busbw(world: usize, sizes: Vec<usize>) -> anyhow::Result<()> {
    let (_, n) = gpus()?;
    ensure!(world <= n, "{world} ranks need {world} GPUs; {n} visible");
    let timeout = Duration::from_secs(120);
    let results = gang(world, timeout, move |rank, mut store| {
        let mut comm = Nccl::connect(&mut store, rank, world, rank, timeout)?;
        let ctx = CudaContext::new(rank)?;
        let stream = ctx.default_stream();
        let mut lines = Vec::new();
        for &mib in &sizes {
            let bytes = mib << 20;
            let mut buf = stream.clone_htod(&vec![1.0f32; bytes / 4])?;
            let (ptr, _sync) = buf.device_ptr_mut(&stream);
            let ptr = ptr as *mut std::ffi::c_void;
            // SAFETY: `buf` holds bytes/4 f32 on this GPU, borrowed through the loop.
            unsafe { comm.all_reduce_sum_f32(ptr, bytes / 4)? }; // warm-up
            store.barrier(&format!("size{mib}"), world)?;
            let iters = iterations(bytes);
            let t = Instant::now();
            for _ in 0..iters {
                // SAFETY: as above; each call returns once the stream has run it.
                unsafe { comm.all_reduce_sum_f32(ptr, bytes / 4)? };
            }
            let secs = t.elapsed().as_secs_f64() / iters as f64;
            let algbw = bytes as f64 / secs / 1e9;
            lines.push(serde_json::json!({
                "impl": "radfm-nccl", "world": world, "mib": mib, "iters": iters,
                "seconds": secs, "algbw_gbs": algbw,
                "busbw_gbs": algbw * 2.0 * (world - 1) as f64 / world as f64,
            }));
        }
        Ok(lines)
    })?;
    for (rank, r) in results.into_iter().enumerate() {
        let lines = r.with_context(|| format!("rank {rank}"))?;
        if rank == 0 {
            for l in lines {
                println!("{l}");
            }
        }
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("check") => {
            let secs: f64 = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(5.0);
            check(Duration::from_secs_f64(secs))
        }
        Some("busbw") if args.len() >= 3 => {
            let world = args[1].parse()?;
            let sizes = args[2..]
                .iter()
                .map(|s| s.parse())
                .collect::<Result<_, _>>()?;
            busbw(world, sizes)
        }
        _ => bail!("usage: bench-nccl check [TIMEOUT_S] | bench-nccl busbw WORLD MIB..."),
    }
}
