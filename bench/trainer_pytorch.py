"""The reference for bench-trainer: the same MAE (ViT encoder with timm names, shallow decoder,
75 % masking, per-patch normalised targets), batch and precision in PyTorch, with
torch.optim.AdamW(betas=(0.9, 0.95), weight_decay=0.05) and clip_grad_norm_(1.0).

Usage: trainer_pytorch.py ARCH IMAGE PATCH BATCH STEPS THREADS; prints one JSON line.
"""
import json
import os
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "python"))
from vit_reference import Block, VisionTransformer  # noqa: E402

PRESETS = {  # width, depth, heads, decoder width, depth, heads (as radfm's VitConfig::preset)
    "vit-tiny": (192, 12, 3, 128, 2, 4),
    "vit-small": (384, 12, 6, 256, 4, 8),
    "vit-base": (768, 12, 12, 512, 8, 16),
}


class Mae(nn.Module):
    def __init__(self, arch, image, patch):
        super().__init__()
        w, d, h, dw, dd, dh = PRESETS[arch]
        self.patch, self.n = patch, (image // patch) ** 2
        self.encoder = VisionTransformer(image, patch, w, d, h, 4)
        self.decoder_embed = nn.Linear(w, dw)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dw))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, self.n + 1, dw), requires_grad=False)
        self.decoder_blocks = nn.Sequential(*[Block(dw, dh, 4) for _ in range(dd)])
        self.decoder_norm = nn.LayerNorm(dw, eps=1e-6)
        self.decoder_pred = nn.Linear(dw, patch * patch)
        self.encoder.pos_embed.requires_grad_(False)

    def forward(self, imgs, ratio=0.75):
        e = self.encoder
        x = e.patch_embed(imgs) + e.pos_embed[:, 1:]
        b, n, d = x.shape
        keep = int(round(n * (1 - ratio)))
        ids_shuffle = torch.rand(b, n).argsort(1)
        ids_restore = ids_shuffle.argsort(1)
        x = x.gather(1, ids_shuffle[:, :keep, None].expand(-1, -1, d))
        mask = torch.ones(b, n)
        mask[:, :keep] = 0
        mask = mask.gather(1, ids_restore)
        cls = (e.cls_token + e.pos_embed[:, :1]).expand(b, -1, -1)
        x = e.norm(e.blocks(torch.cat([cls, x], 1)))
        y = self.decoder_embed(x)
        dw = y.shape[-1]
        seq = torch.cat([y[:, 1:], self.mask_token.expand(b, n + 1 - y.shape[1], -1)], 1)
        seq = seq.gather(1, ids_restore[:, :, None].expand(-1, -1, dw))
        y = torch.cat([y[:, :1], seq], 1) + self.decoder_pos_embed
        pred = self.decoder_pred(self.decoder_norm(self.decoder_blocks(y)))[:, 1:]
        p = self.patch
        g = imgs.shape[-1] // p
        t = imgs.reshape(b, 1, g, p, g, p).permute(0, 2, 4, 3, 5, 1).reshape(b, g * g, p * p)
        t = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6).sqrt()
        return (((pred - t) ** 2).mean(-1) * mask).sum() / mask.sum()


def main(arch, image, patch, batch, steps, threads):
    image, patch, batch, steps, threads = map(int, (image, patch, batch, steps, threads))
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = Mae(arch, image, patch)
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim >= 2 and "token" not in n]
    other = [p for n, p in model.named_parameters() if p.requires_grad and not (p.ndim >= 2 and "token" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": other, "weight_decay": 0.0}],
                            lr=1e-4, betas=(0.9, 0.95))
    imgs = torch.randn(batch, 1, image, image)

    def step():
        loss = model(imgs)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=False)
        return loss.item()

    for _ in range(3):
        step()
    t = time.perf_counter()
    for _ in range(steps):
        last = step()
    secs = time.perf_counter() - t
    print(json.dumps({"impl": f"pytorch {torch.__version__}", "arch": arch, "image": image, "patch": patch,
                      "batch": batch, "threads": threads, "steps": steps, "seconds": secs, "loss": last,
                      "images_per_s": steps * batch / secs}))


if __name__ == "__main__":
    main(*sys.argv[1:])
