"""A plain PyTorch ViT with timm's module names, for checking radfm's exported encoders.

Usage: vit_reference.py MODEL_DIR INPUT.safetensors OUTPUT.safetensors

Builds the ViT the model card describes (timm layout: patch_embed.proj, cls_token, pos_embed,
blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}, norm; LayerNorm eps 1e-6, exact GELU),
loads encoder.safetensors with strict=True (every name and shape must match), and writes
forward_features of the input images to OUTPUT.
"""
import json
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
    main(*sys.argv[1:])
