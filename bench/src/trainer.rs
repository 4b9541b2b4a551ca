//! bench-trainer: MAE training throughput of radfm's trainer step (forward, backward, global-norm
//! clipping, AdamW) on a fixed in-memory batch, for comparison with the same model, batch and
//! precision in PyTorch (bench/trainer_pytorch.py) on the same CPU, or on GPU 0 with `cuda`
//! (bf16 autocast with `bf16`, as the trainer does). The line carries the model FLOPs per image,
//! so throughput converts to model-FLOPs utilisation.
//!
//! Usage: bench-trainer ARCH IMAGE PATCH BATCH STEPS THREADS [cpu|cuda] [fp32|bf16]; prints one
//! JSON line.

use std::time::Instant;

use radfm_trainer::model::{Mae, VitConfig};
use radfm_trainer::optim::{AdamW, AdamWConfig};
use tch::{Device, Kind, Tensor, nn};

fn main() -> anyhow::Result<()> {
    let a: Vec<String> = std::env::args().skip(1).collect();
    anyhow::ensure!(
        (6..=8).contains(&a.len()),
        "usage: bench-trainer ARCH IMAGE PATCH BATCH STEPS THREADS [cpu|cuda] [fp32|bf16]"
    );
    let device = match a.get(6).map(String::as_str) {
        None | Some("cpu") => Device::Cpu,
        Some("cuda") => {
            anyhow::ensure!(
                tch::Cuda::is_available(),
                "cuda asked for, but tch sees no GPU"
            );
            Device::Cuda(0)
        }
        Some(other) => anyhow::bail!("device {other:?} is not cpu or cuda"),
    };
    let bf16 = match a.get(7).map(String::as_str) {
        None | Some("fp32") => false,
        Some("bf16") => true,
        Some(other) => anyhow::bail!("precision {other:?} is not fp32 or bf16"),
    };
    let (image, patch, batch, steps, threads): (i64, i64, i64, usize, i32) = (
        a[1].parse()?,
        a[2].parse()?,
        a[3].parse()?,
        a[4].parse()?,
        a[5].parse()?,
    );
    // As radfm-trainer does at start (radfm_trainer::allocator).
    radfm_trainer::allocator::keep_tensor_memory();
    tch::set_num_threads(threads);
    tch::manual_seed(0);
    let cfg = VitConfig::preset(&a[0], image, patch)?;
    let vs = nn::VarStore::new(device);
    let mae = Mae::new(&vs.root(), cfg);
    let mut opt = AdamW::new(&vs, AdamWConfig::default());
    let images = Tensor::randn([batch, 1, image, image], (Kind::Float, device));
    // Returns the loss and the seconds spent in clipping and the optimizer.
    let mut step = |lr: f64| {
        let loss = tch::autocast(bf16 && device.is_cuda(), || mae.loss(&images, 0.75));
        opt.backward(&loss);
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
            "impl": "radfm (tch)", "device": format!("{device:?}"),
            "precision": if bf16 { "bf16" } else { "fp32" },
            "train_flops_per_image": cfg.mae_train_flops(0.75),
            "arch": a[0], "image": image, "patch": patch, "batch": batch, "threads": threads,
            "steps": steps, "seconds": secs, "loss": last,
            "optimizer_share": optim_secs / secs,
            "images_per_s": (steps as i64 * batch) as f64 / secs,
        })
    );
    Ok(())
}
