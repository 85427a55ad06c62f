"""The public API: ``topk_distill_loss`` and its ``nn.Module`` twin ``TopKDistillLoss``.

One call = shard pass (kernel) -> TP collectives (only with ``tp_group``) -> epilogue (kernel)
-> reduction (torch). The backward is one kernel with no communication. See docs/SPEC.md.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor, nn

from . import _nvtx, _validate, ops, parallel
from ._types import TopKDistillOutput

__all__ = ["topk_distill_loss", "TopKDistillLoss", "TopKDistillOutput"]


class _TopKDistillFunction(torch.autograd.Function):
    """logits [N, V_r] -> (per-row loss [N], student_mass [N], teacher_mass [N]).

    Saves the logits (no copy), row max and log-sum [N] and g = dL/ds [N, K]; allocates nothing
    of size [N, V_r] in the forward.
    """

    @staticmethod
    def forward(ctx, logits, teacher_ids, teacher_logprobs, mask, group_name, vocab_start,
                vocab_size, inv_temperature, loss, support, beta, rkl_ratio, skew,
                log_prob_min_clamp, loss_scale, inplace_backward):
        # Profiler ranges topk_distill/<phase> only with TOPK_DISTILL_NVTX=1 (_nvtx.py): when
        # off, nvtx_range is a shared no-op context.
        with _nvtx.nvtx_range("shard_pass"):
            row_max, sums, gathered = ops.shard_pass(logits, teacher_ids, vocab_start,
                                                     inv_temperature)
        if group_name is not None:
            with _nvtx.nvtx_range("collectives"):
                row_max, sums, gathered = parallel.combine_shard_stats(row_max, sums, gathered,
                                                                       group_name)
        with _nvtx.nvtx_range("epilogue"):
            loss_rows, student_mass, teacher_mass, row_coefs, grad_logprobs = ops.epilogue(
                row_max, sums, gathered, teacher_ids, teacher_logprobs, mask, vocab_size, loss,
                support, beta, rkl_ratio, skew, log_prob_min_clamp, loss_scale)
        ctx.save_for_backward(logits, teacher_ids, row_max, row_coefs, grad_logprobs)
        ctx.vocab_start = vocab_start
        ctx.inv_temperature = inv_temperature
        ctx.inplace_backward = inplace_backward
        ctx.mark_non_differentiable(student_mass, teacher_mass)
        return loss_rows, student_mass, teacher_mass

    @staticmethod
    def backward(ctx, grad_loss_rows, _grad_student_mass, _grad_teacher_mass):
        logits, teacher_ids, row_max, row_coefs, grad_logprobs = ctx.saved_tensors
        grad_rows = grad_loss_rows.to(row_max.dtype).contiguous()
        with _nvtx.nvtx_range("backward"):
            if ctx.inplace_backward:
                ops.backward_(logits, teacher_ids, row_max, row_coefs, grad_logprobs, grad_rows,
                              ctx.vocab_start, ctx.inv_temperature)
                # A C++ op's Tensor(a!) write does not bump the version counter by itself: do it,
                # so that any other node that saved these logits raises autograd's "modified by an
                # inplace operation" error instead of silently reading a gradient.
                if not torch.compiler.is_compiling():
                    torch.autograd.graph.increment_version(logits)
                grad_logits = logits
            else:
                grad_logits = ops.backward(logits, teacher_ids, row_max, row_coefs, grad_logprobs,
                                           grad_rows, ctx.vocab_start, ctx.inv_temperature)
        return (grad_logits,) + (None,) * 15


def _rows_view(logits: Tensor) -> Tensor:
    """logits [..., V_r] as [N, V_r] with unit column stride, a view whenever possible."""
    v = logits.shape[-1]
    if logits.dim() == 2 and (logits.stride(-1) == 1 or v == 1):
        return logits
    if logits.stride(-1) == 1:
        try:
            return logits.view(-1, v)
        except RuntimeError:
            pass
    return logits.reshape(-1, v).contiguous()


def topk_distill_loss(
    logits: Tensor,
    teacher_ids: Tensor,
    teacher_logprobs: Tensor,
    *,
    loss: str = "fkl",
    support: str = "topk",
    beta: float = 0.5,
    rkl_ratio: float = 0.1,
    skew: float = 0.1,
    temperature: float = 1.0,
    t2_scale: bool = False,
    log_prob_min_clamp: Optional[float] = None,
    mask: Optional[Tensor] = None,
    reduction: str = "mean",
    tp_group: Union[None, str, "torch.distributed.ProcessGroup"] = None,
    vocab_start: Optional[int] = None,
    inplace_backward: bool = False,
    check_inputs: bool = True,
) -> TopKDistillOutput:
    """Distillation loss between student logits and a top-k teacher (docs/SPEC.md).

    Args:
        logits: ``[..., V_r]`` student logits (this rank's vocab shard under TP), fp32, bf16,
            fp16, or fp64 on CPU.
        teacher_ids: ``[..., K]`` global vocab ids (int32/int64); negative ids are padding.
        teacher_logprobs: ``[..., K]`` teacher log-probs over the full vocab; ``-inf`` allowed.
        loss: ``fkl | rkl | jsd | fkl+rkl | tvd | skl | srkl``.
        support: ``topk | renorm | tail`` - which bins the divergence compares.
        beta, rkl_ratio, skew: the JSD weight, the fkl+rkl mix, the skew-KL lambda (in [0, 1]).
        temperature: divides the student logits; ``t2_scale`` multiplies the loss by T^2.
        log_prob_min_clamp: clamp both sides' log-probs in the K bins (verl semantics).
        mask: ``[...]`` bool, rows that count.
        reduction: ``mean`` (over counted rows) | ``sum`` | ``none`` (per row).
        tp_group: process group (or its name) over which the vocab is sharded; ``vocab_start``
            is this rank's first column (default: the sum of the lower ranks' shard widths).
            Teacher tensors and mask are replicated. Forward: two collectives (all_reduce MAX
            of [N], all_reduce SUM of [N, 3 + K]); backward: none (docs/TP.md).
        inplace_backward: write the gradient into the logits' storage (they must not be needed
            after the backward; misuse raises autograd's in-place error).
        check_inputs: also check the data (ids < V, teacher log-probs <= 0 and not NaN); costs
            one host sync on CUDA. ``False`` for CUDA graphs / no syncs. With ``tp_group`` it
            also makes the one collective beyond those two: an all_gather of (N, K, V_r,
            vocab_start), so that ranks disagreeing on N or K all raise ``ValueError``; with
            ``False`` the layout is cached after the first call (then exactly two).

    Returns:
        ``TopKDistillOutput(loss, student_mass, teacher_mass)``.
    """
    args = _validate.validate_args(
        logits, teacher_ids, teacher_logprobs, loss=loss, support=support, beta=beta,
        rkl_ratio=rkl_ratio, skew=skew, temperature=temperature, t2_scale=t2_scale,
        log_prob_min_clamp=log_prob_min_clamp, mask=mask, reduction=reduction,
        tp_group=tp_group, vocab_start=vocab_start, inplace_backward=inplace_backward,
        check_inputs=check_inputs)
    lead_shape = logits.shape[:-1]
    v_local = logits.shape[-1]
    k = teacher_ids.shape[-1]

    logits2d = _rows_view(logits)
    n = logits2d.shape[0]
    ids2d = teacher_ids.reshape(n, k).contiguous()
    lp2d = teacher_logprobs.detach().reshape(n, k).contiguous()
    mask1d = None if mask is None else mask.reshape(n).contiguous()

    group_name, start, vocab_size = parallel.layout_and_checks(
        tp_group, n, k, v_local, vocab_start, ids2d, lp2d, mask1d, check_inputs=check_inputs,
        device=logits.device)

    inv_t = 1.0 / args.temperature
    loss_scale = args.temperature ** 2 if t2_scale else 1.0
    loss_rows, student_mass, teacher_mass = _TopKDistillFunction.apply(
        logits2d, ids2d, lp2d, mask1d, group_name, start, vocab_size, inv_t, loss, support,
        float(beta), float(rkl_ratio), float(skew),
        None if log_prob_min_clamp is None else float(log_prob_min_clamp), loss_scale,
        bool(inplace_backward))

    if reduction == "none":
        out_loss = loss_rows.view(lead_shape)
    elif reduction == "sum":
        out_loss = loss_rows.sum()
    else:
        count = n if mask1d is None else mask1d.sum()
        out_loss = loss_rows.sum() / (count.clamp_min(1) if torch.is_tensor(count) else max(count, 1))
    return TopKDistillOutput(out_loss, student_mass.view(lead_shape), teacher_mass.view(lead_shape))


class TopKDistillLoss(nn.Module):
    """``nn.Module`` form of :func:`topk_distill_loss`; keywords fixed at construction.

    ``crit = TopKDistillLoss(loss="jsd", beta=0.5, tp_group=group)``
    ``out = crit(logits, teacher_ids, teacher_logprobs, mask=mask)``
    """

    def __init__(self, *, loss: str = "fkl", support: str = "topk", beta: float = 0.5,
                 rkl_ratio: float = 0.1, skew: float = 0.1, temperature: float = 1.0,
                 t2_scale: bool = False, log_prob_min_clamp: Optional[float] = None,
                 reduction: str = "mean", tp_group=None, vocab_start: Optional[int] = None,
                 inplace_backward: bool = False, check_inputs: bool = True):
        super().__init__()
        self.kwargs = dict(loss=loss, support=support, beta=beta, rkl_ratio=rkl_ratio, skew=skew,
                           temperature=temperature, t2_scale=t2_scale,
                           log_prob_min_clamp=log_prob_min_clamp, reduction=reduction,
                           tp_group=tp_group, vocab_start=vocab_start,
                           inplace_backward=inplace_backward, check_inputs=check_inputs)
        # Fail at construction, not at the first step.
        _validate.validate_options(**{k: v for k, v in self.kwargs.items()
                                      if k not in ("tp_group", "vocab_start")})

    def forward(self, logits: Tensor, teacher_ids: Tensor, teacher_logprobs: Tensor,
                mask: Optional[Tensor] = None) -> TopKDistillOutput:
        return topk_distill_loss(logits, teacher_ids, teacher_logprobs, mask=mask, **self.kwargs)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items() if k != "tp_group")
