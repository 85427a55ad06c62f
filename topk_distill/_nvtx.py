"""Named ranges around the phases of a loss call, for Nsight Systems and torch.profiler.

    from . import _nvtx
    with _nvtx.nvtx_range("shard_pass"):     # -> a range named "topk_distill/shard_pass"
        ...

Phases: ``shard_pass``, ``collectives``, ``epilogue``, ``backward``.

Off unless the environment variable ``TOPK_DISTILL_NVTX=1`` is set when this module is imported
(``set_enabled`` switches it at run time, e.g. in tests). When off, ``nvtx_range`` returns one
shared no-op context manager: a global read and a call, ~0.1 us, nothing next to a kernel. A
hot path can skip even that with ``if _nvtx.ENABLED:``.

When on, a range is
  * an NVTX range (``torch.cuda.nvtx.range_push`` / ``range_pop``) when CUDA is available, so
    that ``nsys profile -t cuda,nvtx`` shows the phases over the kernels, and
  * a ``torch.profiler.record_function`` of the same name (on every device), so that
    torch.profiler traces and ``key_averages()`` show the phases too.
Inside ``torch.compile`` tracing the ranges are skipped (no graph breaks); compiled code is
profiled through the compiler's own kernel names.
"""
from __future__ import annotations

import contextlib
import os

import torch

__all__ = ["ENABLED", "PHASES", "PREFIX", "nvtx_range", "set_enabled", "is_enabled"]

PREFIX = "topk_distill/"
PHASES = ("shard_pass", "collectives", "epilogue", "backward")

ENABLED: bool = os.environ.get("TOPK_DISTILL_NVTX", "0").strip() == "1"

_NULL = contextlib.nullcontext()  # reusable and re-entrant: one instance serves every call
_cuda_nvtx = None  # None: not decided yet; False: no CUDA; else the torch.cuda.nvtx module


def set_enabled(flag: bool) -> bool:
    """Turn the ranges on or off; returns the previous setting."""
    global ENABLED
    previous, ENABLED = ENABLED, bool(flag)
    return previous


def is_enabled() -> bool:
    return ENABLED


def _nvtx_module():
    global _cuda_nvtx
    if _cuda_nvtx is None:
        try:
            _cuda_nvtx = torch.cuda.nvtx if torch.cuda.is_available() else False
        except Exception:  # a CPU-only build without the NVTX bindings
            _cuda_nvtx = False
    return _cuda_nvtx


class _Range:
    __slots__ = ("name", "_record", "_nvtx")

    def __init__(self, name: str):
        self.name = name
        self._record = None
        self._nvtx = None

    def __enter__(self):
        nvtx = _nvtx_module()
        if nvtx:
            nvtx.range_push(self.name)
            self._nvtx = nvtx
        self._record = torch.profiler.record_function(self.name)
        self._record.__enter__()
        return self

    def __exit__(self, exc_type, exc, tb):
        try:
            self._record.__exit__(exc_type, exc, tb)
        finally:
            if self._nvtx is not None:
                self._nvtx.range_pop()
        return False


def nvtx_range(name: str):
    """Context manager for the range ``topk_distill/<name>`` (``name`` may already carry the
    prefix); the shared no-op context when ranges are off or while torch.compile traces."""
    if not ENABLED or torch.compiler.is_compiling():
        return _NULL
    return _Range(name if name.startswith(PREFIX) else PREFIX + name)
