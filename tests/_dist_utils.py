"""Multi-process helpers for tensor-parallel tests (gloo on CPU; reusable by any test file).

    from _dist_utils import run_distributed
    results = run_distributed(worker, world_size=3, args=(cfg,))   # results[rank] = worker(rank, world_size, cfg)

``worker`` must be picklable (a module-level function); it runs in a fresh spawned process with
the default process group initialised (gloo, 127.0.0.1, a free port). Its return value comes back
through torch.save (tensors are fine). An exception in any rank is re-raised in the caller as
``torch.multiprocessing.ProcessRaisedException`` with the child's traceback.
"""
from __future__ import annotations

import datetime
import os
import socket
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(rank, world_size, port, out_dir, fn, args, timeout_s):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)  # several ranks share few cores
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size, timeout=datetime.timedelta(seconds=timeout_s))
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_distributed(fn, world_size: int, args: tuple = (), timeout_s: float = 120.0) -> list:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` gloo processes; return the per-rank
    results as a list indexed by rank."""
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_entry, args=(world_size, free_port(), out_dir, fn, args, timeout_s),
                 nprocs=world_size, join=True)
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False)
                for r in range(world_size)]
