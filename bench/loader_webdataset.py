"""The reference for `make bench-loader`: Python webdataset + PIL + numpy doing what radfm's
loader does per sample (decode the 16-bit PNG, rescale to physical values, random resized crop to
128x128 with bilinear resampling, horizontal flip, intensity jitter, normalisation with the
dataset statistics), single process. Prints images per CPU-second."""
import glob, io, json, random, resource, sys, time

import numpy as np
import webdataset as wds
from PIL import Image

root, epochs = sys.argv[1], int(sys.argv[2])
index = json.load(open(f"{root}/index.json"))
mean, std = index["stats"]["mean"], index["stats"]["std"] or 1.0
shards = sorted(glob.glob(f"{root}/shard-*.tar"))
rng = random.Random(0)
size = 128

t0, c0 = time.perf_counter(), time.process_time()
images, checksum = 0, 0.0
for epoch in range(epochs):
    batch = []
    for s in wds.WebDataset(shards, shardshuffle=False).shuffle(256, rng=rng):
        meta = json.loads(s["json"])
        img = Image.open(io.BytesIO(s["png"]))
        a = np.asarray(img, dtype=np.float32) * meta["rescale_slope"] + meta["rescale_intercept"]
        h, w = a.shape
        area = w * h * rng.uniform(0.5, 1.0)
        ratio = np.exp(rng.uniform(np.log(0.75), np.log(4 / 3)))
        cw, ch = min(w, (area * ratio) ** 0.5), min(h, (area / ratio) ** 0.5)
        x0, y0 = rng.uniform(0, w - cw), rng.uniform(0, h - ch)
        crop = Image.fromarray(a, mode="F").resize((size, size), Image.BILINEAR, box=(x0, y0, x0 + cw, y0 + ch))
        out = np.asarray(crop)
        if rng.random() < 0.5:
            out = out[:, ::-1]
        out = ((out - mean) / std) * rng.uniform(0.9, 1.1) + rng.uniform(-0.1, 0.1)
        batch.append(out.astype(np.float32))
        if len(batch) == 32:
            x = np.stack(batch)
            images += len(batch)
            checksum += float(x.ravel()[::997].sum())
            batch = []
wall, cpu = time.perf_counter() - t0, time.process_time() - c0
peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(f"webdataset images={images} wall_s={wall:.2f} cpu_s={cpu:.2f} images_per_cpu_s={images / cpu:.1f} peak_rss_mib={peak_rss_mib:.0f}")
