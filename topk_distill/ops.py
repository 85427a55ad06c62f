"""Typed wrappers over ``torch.ops.topk_distill.*``, their fake (meta) kernels and the autograd
function that chains them.

The schemas and what every output means are in ``csrc/registration.cpp``. The fake kernels let
``torch.compile`` and ``torch.library.opcheck`` reason about shapes without running a kernel.

Backends. ``"native"`` (the default): CPU tensors run the CPU kernels, CUDA tensors the CUDA
kernels. ``"emulated_cuda"``: CPU tensors run the CUDA kernels - the same source, compiled for
the host against the CUDA emulator (``csrc/emu``), which also checks synchronisation, warp
collectives and shared-memory bounds - registered as ``torch.ops.topk_distill_emu.*``; CUDA
tensors still run the real CUDA kernels. ``TOPK_DISTILL_EMULATE_CUDA=1`` in the environment
selects it when topk_distill is imported, so any script using the public API runs the CUDA
kernels without a GPU; :func:`set_backend` / :func:`use_backend` switch in a running process.
The emulator reads ``TOPK_DISTILL_EMU_SMS`` (SM count the launch geometry assumes, default 132),
``TOPK_DISTILL_EMU_SEED`` (schedule seed) and ``TOPK_DISTILL_EMU_THREADS`` (OS threads).
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator, Optional, Sequence

import torch
from torch import Tensor

BACKENDS = ("native", "emulated_cuda")
_NAMESPACES = ("topk_distill", "topk_distill_emu")


def _backend_from_env() -> str:
    value = os.environ.get("TOPK_DISTILL_EMULATE_CUDA", "").strip().lower()
    if value in ("", "0", "false", "no", "off"):
        return "native"
    if value in ("1", "true", "yes", "on"):
        return "emulated_cuda"
    raise ValueError(f"TOPK_DISTILL_EMULATE_CUDA must be 0 or 1; got {value!r}")


_backend = _backend_from_env()


def backend() -> str:
    """The current backend: ``"native"`` or ``"emulated_cuda"`` (see the module docstring)."""
    return _backend


def set_backend(name: str) -> None:
    """Select the backend for every later call in this process."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {name!r}")
    _backend = name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """``with ops.use_backend("emulated_cuda"): ...`` - the backend inside the block only."""
    previous = _backend
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def _ops(t: Tensor, backend: Optional[str] = None):
    """The op namespace that serves tensors on ``t``'s device under ``backend`` (default: the
    current one). The autograd functions pass the backend their forward ran on, so that the
    backward runs on it too, whatever the backend is when ``backward()`` is called."""
    if (backend or _backend) == "emulated_cuda" and t.device.type == "cpu":
        return torch.ops.topk_distill_emu
    return torch.ops.topk_distill


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of the kernels: fp64 for fp64 logits, fp32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------
# Fake kernels: shapes and dtypes only (csrc/registration.cpp is the contract).
# ---------------------------------------------------------------------------------------------

SHARD_SUMS = 5   # sums columns: rest, teach, dup, teacher columns, entropy sum
ROW_COEFS = 7    # row_coefs columns: log_sum, dense, outside, entropy, label / entropy factors,
                 # the sampled token's dL/ds_y


def _rows(logits):
    return logits.shape[0] * logits.shape[1] if logits.dim() == 3 else logits.shape[0]


def _shard_pass_fake(logits, teacher_ids, labels, vocab_start, inv_temperature, with_entropy, topk):
    n, k = _rows(logits), teacher_ids.shape[1]
    acc = acc_dtype(logits.dtype)
    return (
        logits.new_empty((n,), dtype=acc),
        logits.new_empty((n, SHARD_SUMS), dtype=acc),
        # (an int, not a bool: a symbolic k + True reaches sympy as k + BooleanAtom, a
        # TypeError in torch 2.11's opcheck)
        logits.new_empty((n, k + (1 if labels is not None else 0)), dtype=acc),
        logits.new_empty((n, topk), dtype=acc),
        logits.new_empty((n, topk), dtype=torch.int64),
    )


def _epilogue_fake(row_max, sums, gathered, teacher_ids, teacher_logprobs, mask, labels,
                   vocab_size, loss, support, weight, beta, rkl_ratio, skew, log_prob_min_clamp,
                   loss_scale, with_entropy, label_teacher_logprobs=None,
                   label_sample_logprobs=None, sample_weight_clip=None,
                   drop_missing_label=False):
    n = row_max.shape[0]
    return (
        row_max.new_empty((n,)),
        row_max.new_empty((n,), dtype=torch.float32),
        row_max.new_empty((n,), dtype=torch.float32),
        row_max.new_empty((n,)),
        row_max.new_empty((n,)),
        row_max.new_empty((n, ROW_COEFS), dtype=torch.float64),
        row_max.new_empty(teacher_ids.shape, dtype=torch.float64),
    )


def _backward_fake(logits, teacher_ids, labels, row_max, row_coefs, grad_logprobs, grad_rows,
                   grad_label, grad_entropy, vocab_start, inv_temperature):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _backward_inplace_fake(logits, teacher_ids, labels, row_max, row_coefs, grad_logprobs,
                           grad_rows, grad_label, grad_entropy, vocab_start, inv_temperature):
    return None


for _ns in _NAMESPACES:
    torch.library.register_fake(f"{_ns}::shard_pass")(_shard_pass_fake)
    torch.library.register_fake(f"{_ns}::epilogue")(_epilogue_fake)
    torch.library.register_fake(f"{_ns}::backward")(_backward_fake)
    torch.library.register_fake(f"{_ns}::backward_")(_backward_inplace_fake)


# ---------------------------------------------------------------------------------------------
# Typed wrappers.
# ---------------------------------------------------------------------------------------------


def shard_pass(logits: Tensor, teacher_ids: Tensor, vocab_start: int, inv_temperature: float,
               labels: Optional[Tensor] = None, with_entropy: bool = False, topk: int = 0):
    """(row_max [N], sums [N, 5], gathered [N, K (+1 with labels)], topk_logits [N, topk],
    topk_ids [N, topk]) of this rank's logits ([N, V_r] or [B, T, V_r], any leading strides)."""
    return _ops(logits).shard_pass(logits, teacher_ids, labels, vocab_start, inv_temperature,
                                   with_entropy, topk)


def epilogue(row_max: Tensor, sums: Tensor, gathered: Tensor, teacher_ids: Tensor,
             teacher_logprobs: Tensor, mask: Optional[Tensor], vocab_size: int,
             terms: Sequence, log_prob_min_clamp: Optional[float], loss_scale: float,
             labels: Optional[Tensor] = None, with_entropy: bool = False,
             label_teacher_logprobs: Optional[Tensor] = None,
             label_sample_logprobs: Optional[Tensor] = None,
             sample_weight_clip: Optional[float] = None, drop_missing_label: bool = False):
    """(loss [N], student_mass [N], teacher_mass [N], label_logprobs [N], entropy [N],
    row_coefs [N, 7] f64, grad_logprobs [N, K] f64). ``terms``: (loss, support, weight, beta,
    rkl_ratio, skew) per term (``td.Term``s). The sampled support's label log-probs (SPEC 10.2)
    are passed to the kernel as contiguous float64 [N]."""
    as_f64 = (lambda t: None if t is None  # noqa: E731
              else t.to(torch.float64).contiguous())
    return _ops(row_max).epilogue(
        row_max, sums, gathered, teacher_ids, teacher_logprobs, mask, labels, vocab_size,
        [t[0] for t in terms], [t[1] for t in terms], [float(t[2]) for t in terms],
        [float(t[3]) for t in terms], [float(t[4]) for t in terms], [float(t[5]) for t in terms],
        log_prob_min_clamp, loss_scale, with_entropy, as_f64(label_teacher_logprobs),
        as_f64(label_sample_logprobs), sample_weight_clip, drop_missing_label)


def backward(logits: Tensor, teacher_ids: Tensor, row_max: Tensor, row_coefs: Tensor,
             grad_logprobs: Tensor, grad_rows: Tensor, vocab_start: int, inv_temperature: float,
             labels: Optional[Tensor] = None, grad_label: Optional[Tensor] = None,
             grad_entropy: Optional[Tensor] = None, backend: Optional[str] = None) -> Tensor:
    """Gradient w.r.t. logits, a new contiguous tensor shaped like them, in their dtype.
    ``backend``: the forward's (default: the current one)."""
    return _ops(logits, backend).backward(logits, teacher_ids, labels, row_max, row_coefs, grad_logprobs,
                                 grad_rows, grad_label, grad_entropy, vocab_start,
                                 inv_temperature)


def backward_(logits: Tensor, teacher_ids: Tensor, row_max: Tensor, row_coefs: Tensor,
              grad_logprobs: Tensor, grad_rows: Tensor, vocab_start: int,
              inv_temperature: float, labels: Optional[Tensor] = None,
              grad_label: Optional[Tensor] = None, grad_entropy: Optional[Tensor] = None,
              backend: Optional[str] = None) -> None:
    """Gradient w.r.t. logits written into the logits' own storage (through their strides).
    ``backend``: the forward's (default: the current one)."""
    _ops(logits, backend).backward_(logits, teacher_ids, labels, row_max, row_coefs, grad_logprobs,
                           grad_rows, grad_label, grad_entropy, vocab_start, inv_temperature)
