"""Side by side: radfm's and PyTorch's MAE training throughput on a GPU (bench-trainer and
trainer_pytorch.py with the same arguments), as images/s, achieved TFLOP/s and model-FLOPs
utilisation against the GPU's peak. The model FLOPs per image come from radfm's line (the same
model in both); the peak is dense bf16 (989 TFLOP/s for an H100 or H200 SXM) unless given.

Usage: mfu.py RADFM.json PYTORCH.json [PEAK_TFLOPS]; last line
`bench: trainer-gpu ratio=<radfm/pytorch images/s> mfu=<radfm's MFU>`.
"""
import json
import sys

ours, ref = (json.loads(open(p).read().strip().splitlines()[-1]) for p in sys.argv[1:3])
peak = float(sys.argv[3]) if len(sys.argv) > 3 else 989.0
flops = ours["train_flops_per_image"]
print(f"{ours['arch']} {ours['image']}px/{ours['patch']}, batch {ours['batch']}, "
      f"{ours['precision']}: {flops / 1e9:.1f} GFLOP per image (forward + backward), peak {peak} TFLOP/s")
print(f"{'impl':<28} {'images/s':>9} {'TFLOP/s':>8} {'MFU':>6}")
mfu = {}
for r in (ours, ref):
    tflops = r["images_per_s"] * flops / 1e12
    mfu[r["impl"]] = tflops / peak
    print(f"{r['impl']:<28} {r['images_per_s']:>9.1f} {tflops:>8.1f} {tflops / peak:>6.1%}")
print(f"bench: trainer-gpu ratio={ours['images_per_s'] / ref['images_per_s']:.3f} "
      f"mfu={mfu[ours['impl']]:.3f}")
