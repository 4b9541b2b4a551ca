"""A plain PyTorch ViT with timm's module names, for checking radfm's exported encoders.

Usage: vit_reference.py MODEL_DIR INPUT.safetensors OUTPUT.safetensors
       vit_reference.py mae-loss MODEL.safetensors CONFIG.json INPUT.safetensors

Builds the ViT the model card describes (timm layout: patch_embed.proj, cls_token, pos_embed,
blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}, norm; LayerNorm eps 1e-6, exact GELU),
loads encoder.safetensors with strict=True (every name and shape must match), and writes
forward_features of the input images to OUTPUT.
"""
import json
import math
import sys

import torch
from safetensors.torch import load_file, save_file
from torch import nn


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = nn.functional.scaled_dot_product_attention(q, k, v)  # as timm's fused_attn
        return self.proj(x.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim, heads, mlp_ratio):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, dim * mlp_ratio)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, patch, dim):
        super().__init__()
        self.proj = nn.Conv2d(1, dim, patch, stride=patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
    def __init__(self, image_size, patch_size, width, depth, heads, mlp_ratio, **_):
        super().__init__()
        n = (image_size // patch_size) ** 2
        self.patch_embed = PatchEmbed(patch_size, width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, n + 1, width))
        self.blocks = nn.Sequential(*[Block(width, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(width, eps=1e-6)

    def forward_features(self, x):
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed
        return self.norm(self.blocks(x))


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

    def forward(self, imgs, ratio=0.75, noise=None):
        e = self.encoder
        x = e.patch_embed(imgs) + e.pos_embed[:, 1:]
        b, n, d = x.shape
        keep = int(round(n * (1 - ratio)))
        noise = torch.rand(b, n, device=imgs.device) if noise is None else noise
        ids_shuffle = noise.argsort(1)
        ids_restore = ids_shuffle.argsort(1)
        x = x.gather(1, ids_shuffle[:, :keep, None].expand(-1, -1, d))
        mask = torch.ones(b, n, device=imgs.device)
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



def mae_loss(model_safetensors, card_json, inp):
    """The MAE loss of radfm's full checkpointed model (encoder.*, decoder.*) on given images and
    masking noise, printed as JSON."""
    state = load_file(model_safetensors)
    cfg = json.load(open(card_json))
    model = Mae(cfg["arch"], cfg["model"]["image_size"], cfg["model"]["patch_size"])
    state = {k.removeprefix("decoder."): v for k, v in state.items()}
    model.load_state_dict(state, strict=True)
    data = load_file(inp)
    with torch.no_grad():
        loss = model(data["images"], cfg["mask_ratio"], data["noise"])
    print(json.dumps({"loss": loss.item()}))


def contrastive_loss(inp, out):
    """The CLIP loss and its gradients on given image and text embeddings and logit scale, as
    open_clip computes it (normalised embeddings, scale clamped at 100, mean of both directions'
    cross-entropy); gradients are written to `out`, the loss printed as JSON."""
    import torch.nn.functional as F
    data = load_file(inp)
    image = data["image"].clone().requires_grad_(True)
    text = data["text"].clone().requires_grad_(True)
    scale = data["logit_scale"].clone().requires_grad_(True)
    logits = scale.clamp(max=math.log(100)).exp() * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).t()
    target = torch.arange(logits.shape[0])
    loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2
    loss.backward()
    save_file({"image": image.grad, "text": text.grad, "logit_scale": scale.grad.reshape(1)}, out)
    print(json.dumps({"loss": loss.item()}))


def main(model_dir, inp, out):
    card = json.load(open(f"{model_dir}/model_card.json"))
    assert card["format"] == "radfm.model-card/v1", card["format"]
    model = VisionTransformer(**card["vit"])
    model.load_state_dict(load_file(f"{model_dir}/encoder.safetensors"), strict=True)
    model.eval()
    images = load_file(inp)["images"]
    with torch.no_grad():
        feats = model.forward_features(images)
    save_file({"features": feats.contiguous()}, out)
    print(json.dumps({"parameters": sum(p.numel() for p in model.parameters()),
                      "features": list(feats.shape)}))


if __name__ == "__main__":
    if sys.argv[1] == "mae-loss":
        mae_loss(*sys.argv[2:])
    elif sys.argv[1] == "contrastive-loss":
        contrastive_loss(*sys.argv[2:])
    else:
        main(*sys.argv[1:])
