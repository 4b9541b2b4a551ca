"""Side-by-side table of radfm's all-reduce (bench-allreduce or bench-nccl) and the PyTorch
reference (allreduce_gloo.py), per world size and message size, ending with
`bench: NAME ratio=<geometric mean of radfm/reference busbw>`. One rank has no bus traffic
(busbw is 0 by nccl-tests' definition), so a world of 1 compares algbw.

Usage: compare_allreduce.py RADFM.jsonl REFERENCE.jsonl [NAME, default allreduce]
"""
import json
import math
import sys


def load(path):
    return {(r["world"], r["mib"]): r for r in map(json.loads, open(path)) if r}


ours, ref = load(sys.argv[1]), load(sys.argv[2])
name = sys.argv[3] if len(sys.argv) > 3 else "allreduce"
ratios = []
a_name = next(iter(ours.values()))["impl"]
b_name = next(iter(ref.values()))["impl"]
print(f"radfm: {a_name}; reference: {b_name}")
print(f"{'ranks':>5} {'MiB':>5} {'metric':>6} {'radfm GB/s':>11} {'reference GB/s':>15} {'ratio':>6}")
for key in sorted(ours):
    if key not in ref:
        continue
    metric = "busbw_gbs" if key[0] > 1 else "algbw_gbs"
    a, b = ours[key][metric], ref[key][metric]
    ratios.append(a / b)
    print(f"{key[0]:>5} {key[1]:>5} {metric[:5]:>6} {a:>11.3f} {b:>15.3f} {a / b:>6.2f}")
print(f"bench: {name} ratio={math.exp(sum(map(math.log, ratios)) / len(ratios)):.3f}")
