"""Typed wrappers over ``torch.ops.topk_distill.*``, their fake (meta) kernels and the autograd
function that chains them.

The schemas and what every output means are in ``csrc/registration.cpp``. The fake kernels let
``torch.compile`` and ``torch.library.opcheck`` reason about shapes without running a kernel.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

_ops = torch.ops.topk_distill


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of the kernels: fp64 for fp64 logits, fp32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------
# Fake kernels: shapes and dtypes only.
# ---------------------------------------------------------------------------------------------


@torch.library.register_fake("topk_distill::shard_pass")
def _shard_pass_fake(logits, teacher_ids, vocab_start, inv_temperature):
    n, k = logits.shape[0], teacher_ids.shape[1]
    acc = acc_dtype(logits.dtype)
    return (
        logits.new_empty((n,), dtype=acc),
        logits.new_empty((n, 3), dtype=acc),
        logits.new_empty((n, k), dtype=acc),
    )


@torch.library.register_fake("topk_distill::epilogue")
def _epilogue_fake(row_max, sums, gathered, teacher_ids, teacher_logprobs, mask, vocab_size,
                   loss, support, beta, rkl_ratio, skew, log_prob_min_clamp, loss_scale):
    n = row_max.shape[0]
    return (
        row_max.new_empty((n,)),
        row_max.new_empty((n,), dtype=torch.float32),
        row_max.new_empty((n,), dtype=torch.float32),
        row_max.new_empty((n, 3), dtype=torch.float64),
        gathered.new_empty(gathered.shape, dtype=torch.float64),
    )


@torch.library.register_fake("topk_distill::backward")
def _backward_fake(logits, teacher_ids, row_max, row_coefs, grad_logprobs, grad_rows, vocab_start,
                   inv_temperature):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


@torch.library.register_fake("topk_distill::backward_")
def _backward_inplace_fake(logits, teacher_ids, row_max, row_coefs, grad_logprobs, grad_rows,
                           vocab_start, inv_temperature):
    return None


# ---------------------------------------------------------------------------------------------
# Typed wrappers.
# ---------------------------------------------------------------------------------------------


def shard_pass(logits: Tensor, teacher_ids: Tensor, vocab_start: int,
               inv_temperature: float) -> Tuple[Tensor, Tensor, Tensor]:
    """(row_max [N], sums [N, 3], gathered [N, K]) of this rank's logits [N, V_r]."""
    return _ops.shard_pass(logits, teacher_ids, vocab_start, inv_temperature)


def epilogue(row_max: Tensor, sums: Tensor, gathered: Tensor, teacher_ids: Tensor,
             teacher_logprobs: Tensor, mask: Optional[Tensor], vocab_size: int, loss: str,
             support: str, beta: float, rkl_ratio: float, skew: float,
             log_prob_min_clamp: Optional[float], loss_scale: float):
    """(loss [N], student_mass [N], teacher_mass [N], row_coefs [N, 3] f64, grad_logprobs [N, K] f64))."""
    return _ops.epilogue(row_max, sums, gathered, teacher_ids, teacher_logprobs, mask, vocab_size,
                         loss, support, beta, rkl_ratio, skew, log_prob_min_clamp, loss_scale)


def backward(logits: Tensor, teacher_ids: Tensor, row_max: Tensor, row_coefs: Tensor,
             grad_logprobs: Tensor, grad_rows: Tensor, vocab_start: int,
             inv_temperature: float) -> Tensor:
    """Gradient w.r.t. logits, a new tensor in the logits' dtype."""
    return _ops.backward(logits, teacher_ids, row_max, row_coefs, grad_logprobs, grad_rows,
                         vocab_start, inv_temperature)


def backward_(logits: Tensor, teacher_ids: Tensor, row_max: Tensor, row_coefs: Tensor,
              grad_logprobs: Tensor, grad_rows: Tensor, vocab_start: int,
              inv_temperature: float) -> None:
    """Gradient w.r.t. logits written into the logits' own storage."""
    _ops.backward_(logits, teacher_ids, row_max, row_coefs, grad_logprobs, grad_rows, vocab_start,
                   inv_temperature)
