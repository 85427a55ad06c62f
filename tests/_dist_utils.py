"""Multi-process helpers for tensor-parallel tests (gloo on CPU; reusable by any test file).

    from _dist_utils import run_distributed
    results = run_distributed(worker, world_size=3, args=(cfg,))   # results[rank] = worker(rank, world_size, cfg)

``worker`` must be picklable (a module-level function); it runs in a fresh spawned process with
the default process group initialised (gloo by default - NCCL with ``backend="nccl"``, each rank
then on ``cuda:rank`` - 127.0.0.1, a free port). Its return value comes back through torch.save
(tensors are fine). An exception in any rank is re-raised in the caller as
``torch.multiprocessing.ProcessRaisedException`` with the child's traceback. With ``deadline_s``
the whole launch is killed after that many seconds and ``TimeoutError`` is raised: a rank that
blocks (e.g. in a mismatched collective) fails the test instead of hanging the suite.
"""
from __future__ import annotations

import datetime
import os
import socket
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(rank, world_size, port, out_dir, fn, args, timeout_s, backend="gloo"):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)  # several ranks share few cores
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size, timeout=datetime.timedelta(seconds=timeout_s))
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _kill(ctx) -> None:
    for proc in ctx.processes:
        if proc.is_alive():
            proc.kill()
    for proc in ctx.processes:
        proc.join(5)


def run_distributed(fn, world_size: int, args: tuple = (), timeout_s: float = 120.0,
                    deadline_s: float | None = None, backend: str = "gloo") -> list:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` processes; return the per-rank
    results as a list indexed by rank.

    ``timeout_s`` is the process group's collective timeout; ``deadline_s`` (optional) bounds the
    wall-clock time of the whole launch (``TimeoutError`` after killing every rank).
    """
    with tempfile.TemporaryDirectory() as out_dir:
        entry_args = (world_size, free_port(), out_dir, fn, args, timeout_s, backend)
        if deadline_s is None:
            mp.spawn(_entry, args=entry_args, nprocs=world_size, join=True)
        else:
            ctx = mp.start_processes(_entry, args=entry_args, nprocs=world_size, join=False,
                                     start_method="spawn")
            end = time.monotonic() + deadline_s
            try:
                while not ctx.join(timeout=max(0.1, min(1.0, end - time.monotonic()))):
                    if time.monotonic() > end:
                        raise TimeoutError(
                            f"{getattr(fn, '__name__', fn)} with world size {world_size} did not "
                            f"finish within {deadline_s} s (a rank blocked in a collective?)")
            finally:
                _kill(ctx)
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False)
                for r in range(world_size)]
