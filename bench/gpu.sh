#!/usr/bin/env bash
# The GPU checks of radfm in one run, for a CUDA machine (issues 5 and 6): the NCCL backend's
# verification and bus bandwidth against torch.distributed NCCL, then ViT MAE training
# throughput and model-FLOPs utilisation of radfm's trainer step against PyTorch's.
#
# Usage: bench/gpu.sh [KIT]   (from the repository root)
#   KIT holds bench-nccl and bench-trainer: target/release after a CUDA build (`make bench-gpu`),
#   or the folder `make device-kit` fills for a machine without cargo.
# Env: PYTHON (a python with CUDA torch; default python3), OUT (results; default
#   /tmp/radfm-gpu), TRAIN_ARGS (default "vit-base 224 16 256 20 8"), PEAK_TFLOPS (default 989,
#   dense bf16 of an H100/H200 SXM), NCCL_TIMEOUT_S (default 5).
set -uo pipefail
KIT=${1:-target/release}
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/radfm-gpu}
TRAIN_ARGS=${TRAIN_ARGS:-vit-base 224 16 256 20 8}
mkdir -p "$OUT"
failed=0
step() { echo "== $*" | tee -a "$OUT/summary.txt"; }

# libnccl and libtorch from the python's torch; cudarc looks for libnccl.so, PyPI ships .so.2.
site=$("$PY" -c 'import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))') || exit 1
mkdir -p /tmp/radfm-nccl-lib
ln -sfn "$site/nvidia/nccl/lib/libnccl.so.2" /tmp/radfm-nccl-lib/libnccl.so
export LD_LIBRARY_PATH="/tmp/radfm-nccl-lib:$site/torch/lib:${LD_LIBRARY_PATH:-}"
"$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "gpus", torch.cuda.device_count())' | tee "$OUT/env.txt"
nvidia-smi -L | tee -a "$OUT/env.txt"
gpus=$("$PY" -c 'import torch; print(torch.cuda.device_count())')

step "NCCL backend check ($gpus GPU(s))"
# A hang here (an abort that never returns) is a finding too: the outer timeout reports it.
timeout 120 "$KIT/bench-nccl" check "${NCCL_TIMEOUT_S:-5}" | tee "$OUT/nccl-check.jsonl" || failed=1

step "all-reduce: radfm NCCL vs torch.distributed NCCL, $gpus rank(s)"
if timeout 180 "$KIT/bench-nccl" busbw "$gpus" 1 16 64 256 > "$OUT/nccl-radfm.jsonl" &&
   BACKEND=nccl timeout 180 "$PY" bench/allreduce_gloo.py "$gpus" 1 16 64 256 > "$OUT/nccl-torch.jsonl"; then
  python3 bench/compare_allreduce.py "$OUT/nccl-radfm.jsonl" "$OUT/nccl-torch.jsonl" nccl | tee -a "$OUT/summary.txt"
else
  failed=1
fi

step "MAE training, $TRAIN_ARGS, cuda bf16: radfm (tch) vs PyTorch"
# shellcheck disable=SC2086
if timeout 240 "$KIT/bench-trainer" $TRAIN_ARGS cuda bf16 > "$OUT/trainer-radfm.json" &&
   timeout 240 "$PY" bench/trainer_pytorch.py $TRAIN_ARGS cuda bf16 > "$OUT/trainer-torch.json"; then
  python3 bench/mfu.py "$OUT/trainer-radfm.json" "$OUT/trainer-torch.json" "${PEAK_TFLOPS:-989}" | tee -a "$OUT/summary.txt"
else
  failed=1
fi
exit $failed
