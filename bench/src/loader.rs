//! `make bench-loader`: decode + augment throughput of radfm's loader per CPU core, on shards made
//! by `radfm synth`. The Python side (`bench/loader_webdataset.py`: webdataset + PIL doing the same
//! work) runs on the same shards in the same `make` run; this program prints radfm's line.
//!
//! Usage: bench-loader DATASET_DIR EPOCHS. Rayon and tokio are limited to one thread; CPU time is
//! measured with getrusage over the whole process, so background threads count too. The line
//! also gives the largest shard and the process's peak RSS: `make bench-loader` runs it on 8 MiB
//! and on 512 MiB shards to show that memory does not grow with the shard size.

use std::time::Instant;

use radfm_data::loader::{Cursor, Loader, LoaderConfig};

fn cpu_seconds() -> f64 {
    // SAFETY: getrusage writes into the struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(ru.ru_utime) + t(ru.ru_stime)
}

/// Peak resident memory of this process (VmHWM), in MiB.
fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
            line.split_whitespace().nth(1)?.parse::<f64>().ok()
        })
        .map_or(f64::NAN, |kib| kib / 1024.0)
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let dir = args
        .next()
        .ok_or_else(|| anyhow::anyhow!("usage: bench-loader DATASET_DIR EPOCHS"))?;
    let epochs: u64 = args.next().unwrap_or_else(|| "2".into()).parse()?;
    rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build_global()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(1)
        .build()?;
    rt.block_on(async {
        let cfg = LoaderConfig { batch_size: 32, image_size: 128, augment: true, prefetch: 2, ..Default::default() };
        let mut loader = Loader::open(&dir, cfg).await?;
        let (wall0, cpu0) = (Instant::now(), cpu_seconds());
        let mut images = 0u64;
        let mut checksum = 0f64;
        for epoch in 0..epochs {
            loader
                .run_epoch(Cursor { epoch, position: 0 }, |b| {
                    images += b.keys.len() as u64;
                    checksum += b.images.iter().step_by(997).map(|&v| v as f64).sum::<f64>();
                    true
                })
                .await?;
        }
        let (wall, cpu) = (wall0.elapsed().as_secs_f64(), cpu_seconds() - cpu0);
        let shard_mib = loader.shards().iter().map(|s| s.bytes).max().unwrap_or(0) as f64 / (1 << 20) as f64;
        println!(
            "radfm      images={images} wall_s={wall:.2} cpu_s={cpu:.2} images_per_cpu_s={:.1} largest_shard_mib={shard_mib:.0} peak_rss_mib={:.0} (checksum {checksum:.1})",
            images as f64 / cpu,
            peak_rss_mib()
        );
        Ok::<_, anyhow::Error>(())
    })
}
