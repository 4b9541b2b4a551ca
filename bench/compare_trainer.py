"""Rounds of bench-trainer against trainer_pytorch.py, run alternately (radfm, PyTorch, radfm,
...) so that both sides see the same drift of a shared machine. Prints each round's images/s
and ratio, and ends with `bench: trainer ratio=<median of the rounds' ratios>`: on a noisy
machine one pair of runs varies by ±20 %, the median of several pairs much less.

Usage: compare_trainer.py RADFM.jsonl PYTORCH.jsonl (one JSON line per round, in order)
"""
import json
import statistics
import sys


def load(path):
    return [json.loads(line) for line in open(path) if line.strip()]


ours, ref = load(sys.argv[1]), load(sys.argv[2])
if not ours or len(ours) != len(ref):
    sys.exit(f"compare_trainer: {len(ours)} radfm rounds against {len(ref)} PyTorch rounds")
print(f"radfm: {ours[0]['impl']}; reference: {ref[0]['impl']}")
print(f"{'round':>5} {'radfm img/s':>12} {'PyTorch img/s':>14} {'ratio':>6} {'radfm optimizer':>16}")
ratios = []
for i, (a, b) in enumerate(zip(ours, ref), 1):
    ratio = a["images_per_s"] / b["images_per_s"]
    ratios.append(ratio)
    print(f"{i:>5} {a['images_per_s']:>12.1f} {b['images_per_s']:>14.1f} {ratio:>6.3f} "
          f"{100 * a.get('optimizer_share', 0):>15.1f}%")
print(f"range {min(ratios):.3f}..{max(ratios):.3f}")
print(f"bench: trainer ratio={statistics.median(ratios):.3f}")
