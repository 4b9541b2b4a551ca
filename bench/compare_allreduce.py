"""Side-by-side table of bench-allreduce (radfm) and allreduce_gloo.py results, per world size
and message size, ending with `bench: allreduce ratio=<geometric mean of radfm/gloo busbw>`.

Usage: compare_allreduce.py RADFM.jsonl GLOO.jsonl
"""
import json
import math
import sys


def load(path):
    return {(r["world"], r["mib"]): r for r in map(json.loads, open(path)) if r}


ours, gloo = load(sys.argv[1]), load(sys.argv[2])
ratios = []
print(f"{'ranks':>5} {'MiB':>5} {'radfm busbw GB/s':>17} {'gloo busbw GB/s':>16} {'ratio':>6}")
for key in sorted(ours):
    if key not in gloo:
        continue
    a, b = ours[key]["busbw_gbs"], gloo[key]["busbw_gbs"]
    ratios.append(a / b)
    print(f"{key[0]:>5} {key[1]:>5} {a:>17.3f} {b:>16.3f} {a / b:>6.2f}")
print(f"bench: allreduce ratio={math.exp(sum(map(math.log, ratios)) / len(ratios)):.3f}")
