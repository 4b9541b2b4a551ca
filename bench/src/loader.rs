//! `make bench-loader`: decode + augment throughput of radfm's loader per CPU core, on shards made
//! by `radfm synth`. The Python side (`bench/loader_webdataset.py`: webdataset + PIL doing the same
//! work) runs on the same shards in the same `make` run; this program prints radfm's line.
//!
//! Usage: bench-loader DATASET_DIR EPOCHS. Rayon and tokio are limited to one thread; CPU time is
//! measured with getrusage over the whole process, so background threads count too.

use std::time::Instant;

use radfm_data::loader::{Cursor, Loader, LoaderConfig};

fn cpu_seconds() -> f64 {
    // SAFETY: getrusage writes into the struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(ru.ru_utime) + t(ru.ru_stime)
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
        println!("radfm      images={images} wall_s={wall:.2} cpu_s={cpu:.2} images_per_cpu_s={:.1} (checksum {checksum:.1})", images as f64 / cpu);
        Ok::<_, anyhow::Error>(())
    })
}
