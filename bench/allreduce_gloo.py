"""The reference for bench-allreduce: torch.distributed all_reduce (SUM) with the gloo backend,
one process per rank on loopback, float32 tensors of the same sizes, the same iteration counts.
With BACKEND=nccl it is the reference for bench-nccl instead: NCCL, rank r on GPU r.

Usage: [BACKEND=nccl] allreduce_gloo.py WORLD MIB...; prints one JSON line per size (rank 0).
"""
import json
import os
import socket
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


BACKEND = os.environ.get("BACKEND", "gloo")


def iterations(nbytes):
    return max(3, min(50, ((256 << 20) // max(1, nbytes)) * 2))


def rank_main(rank, world, port, sizes):
    torch.set_num_threads(1)
    device = "cpu"
    if BACKEND == "nccl":
        device = f"cuda:{rank}"
        torch.cuda.set_device(rank)
    dist.init_process_group(BACKEND, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    for mib in sizes:
        nbytes = mib << 20
        data = torch.ones(nbytes // 4, device=device)
        dist.all_reduce(data)
        dist.barrier()
        iters = iterations(nbytes)
        t = time.perf_counter()
        for _ in range(iters):
            dist.all_reduce(data)
        if device != "cpu":
            torch.cuda.synchronize()
        secs = (time.perf_counter() - t) / iters
        if rank == 0:
            algbw = nbytes / secs / 1e9
            print(json.dumps({"impl": f"{BACKEND} (torch {torch.__version__})", "world": world, "mib": mib,
                              "iters": iters, "seconds": secs, "algbw_gbs": algbw,
                              "busbw_gbs": algbw * 2 * (world - 1) / world}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    world = int(sys.argv[1])
    sizes = [int(s) for s in sys.argv[2:]]
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    mp.spawn(rank_main, args=(world, port, sizes), nprocs=world)
