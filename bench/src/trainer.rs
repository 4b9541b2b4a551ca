//! bench-trainer: MAE training throughput of radfm's trainer step (forward, backward, global-norm
//! clipping, AdamW) on a fixed in-memory batch, for comparison with the same model, batch and
//! precision in PyTorch (bench/trainer_pytorch.py) on the same CPU.
//!
//! Usage: bench-trainer ARCH IMAGE PATCH BATCH STEPS THREADS; prints one JSON line.

use std::time::Instant;

use radfm_trainer::model::{Mae, VitConfig};
use radfm_trainer::optim::{AdamW, AdamWConfig};
use tch::{Device, Kind, Tensor, nn};

fn main() -> anyhow::Result<()> {
    let a: Vec<String> = std::env::args().skip(1).collect();
    anyhow::ensure!(
        a.len() == 6,
        "usage: bench-trainer ARCH IMAGE PATCH BATCH STEPS THREADS"
    );
    let (image, patch, batch, steps, threads): (i64, i64, i64, usize, i32) = (
        a[1].parse()?,
        a[2].parse()?,
        a[3].parse()?,
        a[4].parse()?,
        a[5].parse()?,
    );
    tch::set_num_threads(threads);
    tch::manual_seed(0);
    let cfg = VitConfig::preset(&a[0], image, patch)?;
    let vs = nn::VarStore::new(Device::Cpu);
    let mae = Mae::new(&vs.root(), cfg);
    let mut opt = AdamW::new(&vs, AdamWConfig::default());
    let images = Tensor::randn([batch, 1, image, image], (Kind::Float, Device::Cpu));
    // Returns the loss and the seconds spent in clipping and the optimizer.
    let mut step = |lr: f64| {
        let loss = mae.loss(&images, 0.75);
        loss.backward();
        let t = Instant::now();
        opt.clip_grad_norm(1.0);
        opt.step(lr);
        opt.zero_grad();
        let optim = t.elapsed().as_secs_f64();
        (loss.double_value(&[]), optim)
    };
    for _ in 0..3 {
        step(1e-4);
    }
    let t = Instant::now();
    let (mut last, mut optim_secs) = (0.0, 0.0);
    for _ in 0..steps {
        let (loss, optim) = step(1e-4);
        (last, optim_secs) = (loss, optim_secs + optim);
    }
    let secs = t.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({
            "impl": "radfm (tch)",
            "arch": a[0], "image": image, "patch": patch, "batch": batch, "threads": threads,
            "steps": steps, "seconds": secs, "loss": last,
            "optimizer_share": optim_secs / secs,
            "images_per_s": (steps as i64 * batch) as f64 / secs,
        })
    );
    Ok(())
}
