"""Loads an exported encoder into timm itself, as a new user would from the model card.

Usage: timm_load.py MODEL_DIR INPUT.safetensors OUTPUT.safetensors

Builds the module with the card's `timm` constructor (timm.create_model(model, **kwargs)),
loads encoder.safetensors with strict=True, and writes the model's output (the pooled
embedding) for the input images to OUTPUT.
"""
import json
import sys

import timm
import torch
from safetensors.torch import load_file, save_file


def main(model_dir, inp, out):
    card = json.load(open(f"{model_dir}/model_card.json"))
    ctor = card["timm"]
    model = timm.create_model(ctor["model"], pretrained=False, **ctor["kwargs"])
    model.load_state_dict(load_file(f"{model_dir}/encoder.safetensors"), strict=True)
    model.eval()
    with torch.no_grad():
        pooled = model(load_file(inp)["images"])
    save_file({"pooled": pooled.contiguous()}, out)
    print(json.dumps({"timm": timm.__version__, "pooled": list(pooled.shape)}))


if __name__ == "__main__":
    main(*sys.argv[1:])
