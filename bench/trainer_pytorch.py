"""The reference for bench-trainer: the same MAE (ViT encoder with timm names, shallow decoder,
75 % masking, per-patch normalised targets), batch and precision in PyTorch, with
torch.optim.AdamW(betas=(0.9, 0.95), weight_decay=0.05), clip_grad_norm_(1.0) and zero_grad()
(set_to_none, the default).

Usage: trainer_pytorch.py ARCH IMAGE PATCH BATCH STEPS THREADS [cpu|cuda] [fp32|bf16]; prints one
JSON line. bf16 is autocast on CUDA, as radfm's trainer does.
"""
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "python"))
from vit_reference import Mae  # noqa: E402

def main(arch, image, patch, batch, steps, threads, device="cpu", precision="fp32"):
    image, patch, batch, steps, threads = map(int, (image, patch, batch, steps, threads))
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = Mae(arch, image, patch).to(device)
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim >= 2 and "token" not in n]
    other = [p for n, p in model.named_parameters() if p.requires_grad and not (p.ndim >= 2 and "token" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": other, "weight_decay": 0.0}],
                            lr=1e-4, betas=(0.9, 0.95))
    imgs = torch.randn(batch, 1, image, image, device=device)
    bf16 = precision == "bf16" and device == "cuda"

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            loss = model(imgs)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()  # PyTorch's default, set_to_none=True, as radfm's step drops its gradients
        return loss.item()

    for _ in range(3):
        step()
    t = time.perf_counter()
    for _ in range(steps):
        last = step()
    secs = time.perf_counter() - t
    print(json.dumps({"impl": f"pytorch {torch.__version__}", "device": device, "precision": precision, "arch": arch, "image": image, "patch": patch,
                      "batch": batch, "threads": threads, "steps": steps, "seconds": secs, "loss": last,
                      "images_per_s": steps * batch / secs}))


if __name__ == "__main__":
    main(*sys.argv[1:])
