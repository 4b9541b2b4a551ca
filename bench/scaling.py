"""Data-parallel scaling of the trainer: the same per-rank batch and one libtorch thread per rank
on 1, 2 and 4 local ranks (one pod, the launcher, the CPU ring); images/s of the whole gang and
efficiency = gang images/s / (ranks × 1-rank images/s). Ranks beyond the machine's cores share
cores, which bounds efficiency by cores/ranks there; the JSON lines say how many cores there are.

Usage: scaling.py TRAINER RADFM WORKDIR; last line `bench: scaling efficiency4=<x>`.
"""
import json
import os
import shutil
import socket
import subprocess
import sys

trainer, radfm, work = sys.argv[1:4]
shutil.rmtree(work, ignore_errors=True)
subprocess.run([radfm, "synth", "--out", f"{work}/data", "--samples", "1024", "--size", "64"],
               check=True, stdout=subprocess.DEVNULL)
cores = os.cpu_count() or 1
results = {}
for world in (1, 2, 4):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    env = {
        "PATH": os.environ.get("PATH", ""),
        "RADFM_JOB_NAME": "scaling", "RADFM_ATTEMPT": "1", "RADFM_NODE_RANK": "0", "RADFM_NNODES": "1",
        "RADFM_NPROC_PER_NODE": str(world), "RADFM_MASTER_ADDR": "127.0.0.1", "RADFM_MASTER_PORT": str(port),
        "RADFM_DATASET_URI": f"file://{work}/data", "RADFM_CHECKPOINT_URI": f"file://{work}/ckpt-{world}",
        "RADFM_CHECKPOINT_EVERY": "100000", "RADFM_CHECKPOINT_KEEP": "1", "RADFM_MODEL_ARCH": "vit-tiny",
        "RADFM_STEPS": "30", "RADFM_BATCH_SIZE": "16", "RADFM_LEARNING_RATE": "0.001",
        "RADFM_PRECISION": "fp32", "RADFM_IMAGE_SIZE": "64", "RADFM_PATCH_SIZE": "8",
        "RADFM_THREADS": "1", "RADFM_LOG_EVERY": "1000",
    }
    out = subprocess.run([trainer, "train"], env=env, check=True, capture_output=True, text=True).stdout
    done = [json.loads(line) for line in out.splitlines() if '"done"' in line][-1]
    gang = done["images_per_s"] * world
    results[world] = gang
    eff = gang / (world * results[1])
    print(json.dumps({"ranks": world, "cores": cores, "threads_per_rank": 1,
                      "gang_images_per_s": round(gang, 1), "efficiency": round(eff, 3)}), flush=True)
print(f"bench: scaling efficiency4={results[4] / (4 * results[1]):.3f}")
