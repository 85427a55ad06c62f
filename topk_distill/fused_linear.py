"""Fused linear + top-k distillation: the loss of ``hidden @ weight.T (+ bias)`` without ever
materialising the ``[N, V_r]`` logits (the LM head and the loss in one autograd Function).

As in Liger-Kernel's fused linear cross entropy, the rows are processed in chunks during the
FORWARD; for each chunk of ``C`` rows:

1. ``logits = hidden_chunk @ weight.T (+ bias)``  - one GEMM into a reused ``[C, V_r]`` buffer,
   in the hidden's dtype; then, in place, the optional ``logit_scale`` and Gemma-style softcap
   ``cap * tanh(z / cap)`` (whose derivative goes to a second ``[C, V_r]`` buffer);
2. ``shard_pass`` (kernel), the TP collectives (``parallel.combine_shard_stats``, only with a
   ``tp_group``), ``epilogue`` (kernel): per-row loss, masses, ``g = dL/ds``;
3. ``backward_`` (kernel) overwrites the buffer with ``dL/dlogits`` for the reduction's per-row
   weight (1 for ``sum``, ``1 / count`` for ``mean``), times the scale / softcap derivative;
4. ``grad_hidden[chunk] = grad_logits @ weight``, ``grad_weight += grad_logits.T @ hidden_chunk``,
   ``grad_bias += grad_logits.sum(0)`` - each GEMM skipped when its input needs no gradient.

The backward then only multiplies the stored gradients by the incoming scalar ``grad_output``.
Peak extra memory: ``C * V_r`` logits + O(N * K) + the gradients of hidden / weight / bias,
independent of N. See docs/FUSED_LINEAR.md for the chunk-size rule and the measured numbers.
"""
from __future__ import annotations

import math
import numbers
from typing import NamedTuple, Optional, Tuple, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import _validate, losses, ops, parallel
from ._types import TopKDistillOutput
from ._validate import UNSET

__all__ = ["fused_linear_topk_distill_loss", "FusedLinearTopKDistillLoss", "auto_chunk_size"]

# Auto chunk size: the [C, V_r] logits buffer gets this many bytes (see auto_chunk_size).
CPU_CHUNK_BYTES = 128 << 20
CUDA_MIN_CHUNK_BYTES = 64 << 20
CUDA_MAX_CHUNK_BYTES = 1 << 30
_ROW_MULTIPLE = 64  # chunks of >= 64 rows are rounded down to a multiple of 64 (GEMM tiles)

_LOW_PRECISION = (torch.bfloat16, torch.float16)


def auto_chunk_size(n_rows: int, local_vocab: int, dtype: torch.dtype,
                    device: torch.device) -> int:
    """Rows per chunk when ``chunk_size=None``: the ``[C, V_r]`` logits buffer gets a byte budget
    of 128 MiB on CPU; on CUDA a quarter of the free memory (the driver's free memory plus what
    torch's caching allocator holds unused), clamped to [64 MiB, 1 GiB]. C = budget // (V_r *
    itemsize), at least 1, rounded down to a multiple of 64 when >= 64, at most N (and >= 1)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        budget = min(CUDA_MAX_CHUNK_BYTES, max(CUDA_MIN_CHUNK_BYTES, free // 4))
    else:
        budget = CPU_CHUNK_BYTES
    rows = max(1, budget // max(1, local_vocab * itemsize))
    if rows >= _ROW_MULTIPLE:
        rows -= rows % _ROW_MULTIPLE
    return int(max(1, min(rows, n_rows)))


# ----------------------------------------------------------------------------- checks

_RENAMES = (("the logits hold the whole vocab", "weight holds the whole vocab"),
            ("logits", "hidden"))


def _validate_tensors(hidden, weight, bias, teacher_ids, teacher_logprobs, mask, tp_group,
                      vocab_start, labels=None, label_teacher_logprobs=None,
                      label_sample_logprobs=None) -> Tuple[Tuple[int, ...], int, int, int]:
    """(lead_shape, N, V_r, K); errors name hidden / weight / bias / teacher_* / mask."""
    # Jagged input is refused, not supported: the packed values() ARE what the fused head needs
    # ([total, H], no padding, no copy), and its only per-token outputs are small.
    for name, t in (("hidden", hidden), ("weight", weight), ("bias", bias),
                    ("teacher_ids", teacher_ids), ("teacher_logprobs", teacher_logprobs),
                    ("mask", mask), ("labels", labels)):
        if isinstance(t, torch.Tensor) and t.is_nested:
            raise TypeError(
                f"{name} is a nested tensor; fused_linear_topk_distill_loss takes plain tensors. "
                f"Pass the packed values ({name}.values(), [total, ...]: no copy) for hidden and "
                f"for each jagged teacher tensor / mask / labels (same offsets); per-token "
                f"outputs then come back packed [total]")
    for name, t in (("hidden", hidden), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
        if t.dtype not in _validate.FLOAT_DTYPES:
            raise TypeError(f"{name} must have dtype in "
                            f"{[str(d) for d in _validate.FLOAT_DTYPES]}; got {t.dtype}")
    if hidden.dim() < 1:
        raise ValueError("hidden must have shape [..., H]; got a 0-d tensor")
    if weight.dim() != 2:
        raise ValueError(f"weight must be this rank's vocab shard [V_r, H]; got shape "
                         f"{list(weight.shape)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must have shape [V_r, H] with H = hidden.shape[-1] = "
                         f"{hidden.shape[-1]}; got {list(weight.shape)}")
    if weight.shape[0] == 0:
        raise ValueError("weight must have a non-empty vocab dimension; got V_r = 0")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight must have the dtype of hidden ({hidden.dtype}); got "
                        f"{weight.dtype}")
    if weight.device != hidden.device:
        raise ValueError(f"weight is on {weight.device} but hidden is on {hidden.device}; all "
                         f"tensors must be on the same device")
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"bias must be None or a torch.Tensor; got {type(bias).__name__}")
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias must have shape [V_r] = [{weight.shape[0]}]; got "
                             f"{list(bias.shape)}")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"bias must have the dtype of hidden ({hidden.dtype}); got "
                            f"{bias.dtype}")
        if bias.device != hidden.device:
            raise ValueError(f"bias is on {bias.device} but hidden is on {hidden.device}; all "
                             f"tensors must be on the same device")
    # The teacher / mask / vocab_start checks are those of topk_distill_loss, run on a
    # zero-memory stand-in for the logits [..., V_r]; their messages then name hidden.
    proxy = hidden.new_empty(()).expand(*hidden.shape[:-1], weight.shape[0])
    try:
        shapes = _validate.validate_tensors(proxy, teacher_ids, teacher_logprobs, mask,
                                            tp_group=tp_group, vocab_start=vocab_start,
                                            labels=labels,
                                            label_teacher_logprobs=label_teacher_logprobs,
                                            label_sample_logprobs=label_sample_logprobs)
    except (TypeError, ValueError) as e:
        msg = str(e)
        for a, b in _RENAMES:
            msg = msg.replace(a, b)
        raise type(e)(msg) from None
    return shapes.lead_shape, shapes.n_rows, shapes.local_vocab, shapes.k


def _validate_chunk_size(chunk_size):
    if chunk_size is None:
        return None
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral):
        raise TypeError(f"chunk_size must be None or an int; got {type(chunk_size).__name__}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 (rows per chunk); got {chunk_size}")
    return int(chunk_size)


def _validate_head(logit_scale, final_logit_softcapping) -> "_Head":
    """The LM head's output transform (logit_scale, final_logit_softcapping), checked."""
    if isinstance(logit_scale, bool) or not isinstance(logit_scale, numbers.Real):
        raise TypeError(f"logit_scale must be a float; got {type(logit_scale).__name__}")
    if not math.isfinite(logit_scale):
        raise ValueError(f"logit_scale must be finite; got {logit_scale}")
    cap = final_logit_softcapping
    if cap is not None:
        if isinstance(cap, bool) or not isinstance(cap, numbers.Real):
            raise TypeError(f"final_logit_softcapping must be None or a float; got "
                            f"{type(cap).__name__}")
        if not (math.isfinite(cap) and cap > 0):
            raise ValueError(f"final_logit_softcapping must be None or a finite float > 0; got "
                             f"{cap}")
        cap = float(cap)
    return _Head(float(logit_scale), cap)


def _agree_on_chunk_size(group_name: str, requested: Optional[int], local_auto: int,
                         device: torch.device) -> int:
    """Every rank must cut the rows at the same places (the collectives run per chunk). One
    all-gather of two ints (on the hidden's device, which the group serves anyway for the loss's
    own collectives): requested sizes must match; automatic ones take the group's minimum."""
    world = dist.get_world_size(parallel._resolve(group_name))
    mine = torch.tensor([-1 if requested is None else requested, local_auto], dtype=torch.int64,
                        device=device)
    table = parallel._gather_host_table(mine, world, group_name)
    req = [r[0] for r in table]
    if len(set(req)) != 1:
        raise ValueError(f"chunk_size must be the same on every rank of tp_group (None "
                         f"everywhere or one int); got (rank: chunk_size) "
                         f"{ {r: (None if c < 0 else c) for r, c in enumerate(req)} }")
    return req[0] if req[0] > 0 else min(r[1] for r in table)


# ----------------------------------------------------------------------------- autograd

class _FusedLinearTopKDistill(torch.autograd.Function):
    """(hidden [N, H], weight [V_r, H], bias [V_r] | None) -> (reduced loss, student_mass [N],
    teacher_mass [N], label_logprobs [N], entropy [N], student top-k outputs). The gradients of
    the loss are computed in the forward and kept until the backward; those of label_logprobs
    and entropy (their upstream gradients are only known then) are computed in the backward, by
    recomputing each chunk's logits - only when one of them receives a gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, teacher_ids, teacher_logprobs, mask, labels,
                label_teacher_logprobs, label_sample_logprobs, count, cfg):
        n, h = hidden.shape
        v_r = weight.shape[0]
        acc = ops.acc_dtype(hidden.dtype)
        need_h, need_w, need_b = cfg["needs"]
        need_any = need_h or need_w or need_b
        chunk = cfg["chunk_size"]
        lcfg = cfg["loss_cfg"]  # losses._Config of the per-chunk calls
        topk = lcfg.topk

        loss_rows = torch.empty(n, dtype=acc, device=hidden.device)
        student_mass = torch.empty(n, dtype=torch.float32, device=hidden.device)
        teacher_mass = torch.empty(n, dtype=torch.float32, device=hidden.device)
        label_lp = torch.zeros(n, dtype=acc, device=hidden.device)
        entropy = torch.zeros(n, dtype=acc, device=hidden.device)
        row_max_all = torch.empty(n, dtype=acc, device=hidden.device)
        coefs_all = torch.empty((n, ops.ROW_COEFS), dtype=torch.float64, device=hidden.device)
        top_ids = top_lp = ov_count = ov_adv = None
        if topk > 0:
            top_ids = torch.empty((n, topk), dtype=torch.int64, device=hidden.device)
            top_lp = torch.empty((n, topk), dtype=torch.float32, device=hidden.device)
            ov_count = torch.empty(n, dtype=torch.int64, device=hidden.device)
            ov_adv = torch.empty(n, dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if need_h else None
        grad_weight = grad_weight_acc = partial_w = None
        if need_w:
            if cfg["weight_grad_fp32"] and weight.dtype in _LOW_PRECISION:
                grad_weight_acc = torch.zeros(weight.shape, dtype=torch.float32,
                                              device=weight.device)
                partial_w = torch.empty_like(weight)
            else:  # the first chunk writes it (out=), later ones accumulate; zeros when N = 0
                grad_weight = torch.empty_like(weight) if n > 0 else torch.zeros_like(weight)
        grad_bias_acc = (torch.zeros(v_r, dtype=ops.acc_dtype(bias.dtype), device=bias.device)
                         if need_b else None)
        if need_any:
            # The reduction's per-row weight: 1 (sum) or 1 / max(count, 1) (mean). A tensor, so
            # a mask's count never needs a host sync.
            grad_rows = torch.ones(min(chunk, n), dtype=acc, device=hidden.device)
            if cfg["reduction"] == "mean":
                grad_rows = grad_rows / count.to(acc)

        buf = hidden.new_empty((min(chunk, n), v_r))  # reused: no allocator traffic per chunk
        head = cfg["head"]
        # With a softcap, d(logits)/d(raw) = scale * (1 - tanh^2) is kept per chunk in a second
        # buffer (the first one is overwritten by the gradient before it is needed).
        dbuf = buf.new_empty(buf.shape) if head.cap is not None and need_any else None
        weight_t = weight.t()
        for s in range(0, n, chunk):
            e = min(s + chunk, n)
            rows = e - s
            h_c = hidden[s:e]
            z = buf[:rows]
            dz = None if dbuf is None else dbuf[:rows]
            _head_logits(h_c, weight_t, bias, head, z, dz)
            ids_c = teacher_ids[s:e]
            lab_c = None if labels is None else labels[s:e]
            mask_c = None if mask is None else mask[s:e]
            row_max, sums, gathered, top_v, top_i = losses._shard_stats(z, ids_c, lab_c, lcfg)
            l_c, sm_c, tm_c, lab_lp_c, ent_c, row_coefs, grad_logprobs = losses._epilogue(
                row_max, sums, gathered, ids_c, teacher_logprobs[s:e], mask_c, lab_c,
                None if label_teacher_logprobs is None else label_teacher_logprobs[s:e],
                None if label_sample_logprobs is None else label_sample_logprobs[s:e], lcfg)
            loss_rows[s:e] = l_c
            student_mass[s:e] = sm_c
            teacher_mass[s:e] = tm_c
            label_lp[s:e] = lab_lp_c
            entropy[s:e] = ent_c
            row_max_all[s:e] = row_max
            coefs_all[s:e] = row_coefs
            if topk > 0:
                log_sum = row_coefs[:, 0]
                top_ids[s:e] = top_i
                top_lp[s:e] = losses._topk_logprobs(top_v, row_max, log_sum, lcfg.inv_temperature)
                ov_count[s:e], ov_adv[s:e] = losses._overlap(
                    ids_c, teacher_logprobs[s:e], gathered, mask_c, top_i, row_max, log_sum,
                    lcfg.vocab_size, lcfg.log_prob_min_clamp)
            if not need_any:
                continue
            # dL/dlogits of the chunk, written over its logits (they are not needed any more).
            # The sampled support's entry goes through the label's column (SPEC 10.2).
            sampled_gy = losses._with_sampled_gradient(None, grad_rows[:rows], row_coefs, lcfg)
            ops.backward_(z, ids_c, row_max, row_coefs, grad_logprobs, grad_rows[:rows],
                          lcfg.vocab_start, lcfg.inv_temperature,
                          lab_c if sampled_gy is not None else None, sampled_gy)
            _head_grad_(z, head, dz)
            _accumulate_linear_grads(z, h_c, weight, s, e, grad_hidden, grad_weight,
                                     grad_weight_acc, partial_w, grad_bias_acc)
        del buf, dbuf, partial_w

        if grad_weight_acc is not None:
            grad_weight = grad_weight_acc.to(weight.dtype)
            del grad_weight_acc
        if cfg["reduction"] == "sum":
            out = loss_rows.sum()
        else:
            out = loss_rows.sum() / count.to(acc)
        ctx.grads = [grad_hidden, grad_weight,
                     None if grad_bias_acc is None else grad_bias_acc.to(bias.dtype)]
        # For the backward of label_logprobs / entropy (recomputed per chunk, see the class doc).
        ctx.save_for_backward(hidden, weight, bias, teacher_ids, labels, row_max_all, coefs_all)
        ctx.cfg = cfg
        ctx.backend = ops.backend()  # the backward runs where the forward ran (ops._ops)
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(student_mass, teacher_mass)
        if topk > 0:
            ctx.mark_non_differentiable(top_ids, top_lp, ov_count, ov_adv)
        return (out, student_mass, teacher_mass, label_lp, entropy, top_ids, top_lp, ov_count,
                ov_adv)

    @staticmethod
    def backward(ctx, grad_out, _gsm, _gtm, grad_label, grad_entropy, *_topk):
        if ctx.grads is None:
            raise RuntimeError(
                "fused_linear_topk_distill_loss: its backward can run only once (the gradients "
                "are computed in the forward and handed over in the first backward; "
                "retain_graph=True with a second backward is not supported)")
        grads, ctx.grads = ctx.grads, None  # dropped here so autograd can steal, not copy, them
        out = []
        for g in grads:  # (a 0-d grad_out keeps g's dtype)
            if g is not None and grad_out is not None:
                g.mul_(grad_out)  # in place: no second copy of grad_weight
            elif g is not None:
                g.zero_()
            out.append(g)
        grads = None
        hidden, weight, bias, teacher_ids, labels, row_max, row_coefs = ctx.saved_tensors
        lcfg = ctx.cfg["loss_cfg"]
        if labels is None:
            grad_label = None
        if not lcfg.with_entropy:
            grad_entropy = None
        if grad_label is not None or grad_entropy is not None:
            _per_row_outputs_backward(ctx.cfg, hidden, weight, bias, teacher_ids, labels, row_max,
                                      row_coefs, grad_label, grad_entropy, out, ctx.backend)
        return (*out, None, None, None, None, None, None, None, None)


class _Head(NamedTuple):
    """The LM head's output transform: logits = cap * tanh(scale * raw / cap) (cap = None: no
    softcap), with raw = hidden @ weight.T + bias. scale = 1.0 and cap = None: the identity."""
    scale: float
    cap: Optional[float]


def _head_logits(h_c, weight_t, bias, head: _Head, z, dz):
    """z = the chunk's logits; with a softcap also dz = d(logits)/d(raw) = scale * (1 - tanh^2),
    when dz is given (it is needed only for a gradient)."""
    if bias is None:
        torch.mm(h_c, weight_t, out=z)
    else:
        torch.addmm(bias, h_c, weight_t, out=z)
    if head.cap is not None:
        z.mul_(head.scale / head.cap).tanh_()  # z = tanh(u / cap), u = scale * raw
        if dz is not None:
            torch.mul(z, z, out=dz)
            dz.sub_(1.0).mul_(-head.scale)
        z.mul_(head.cap)
    elif head.scale != 1.0:
        z.mul_(head.scale)


def _head_grad_(z, head: _Head, dz):
    """In place: dL/dlogits -> dL/draw (the chain rule through the scale and the softcap)."""
    if head.cap is not None:
        z.mul_(dz)
    elif head.scale != 1.0:
        z.mul_(head.scale)


def _accumulate_linear_grads(z, h_c, weight, s, e, grad_hidden, grad_weight, grad_weight_acc,
                             partial_w, grad_bias_acc):
    """grad_hidden[s:e] = z @ W, grad_weight += z.T @ h_c (written by the first chunk),
    grad_bias += z.sum(0), for a chunk's dL/dlogits z (each skipped when not needed)."""
    if grad_hidden is not None:
        torch.mm(z, weight, out=grad_hidden[s:e])
    if grad_weight_acc is not None:
        torch.mm(z.t(), h_c, out=partial_w)
        grad_weight_acc.add_(partial_w)
    elif grad_weight is not None:
        if s == 0:
            torch.mm(z.t(), h_c, out=grad_weight)
        else:
            grad_weight.addmm_(z.t(), h_c)
    if grad_bias_acc is not None:
        grad_bias_acc.add_(z.sum(0, dtype=grad_bias_acc.dtype))


def _per_row_outputs_backward(cfg, hidden, weight, bias, teacher_ids, labels, row_max, row_coefs,
                              grad_label, grad_entropy, grads, backend=None):
    """Adds the gradients of label_logprobs and entropy (upstream grad_label / grad_entropy [N])
    to grads = [grad_hidden, grad_weight, grad_bias], chunk by chunk: the chunk's logits are
    recomputed (one GEMM) and the backward kernel turns the two upstream gradients into
    dL/dlogits (the loss's own part is already in grads)."""
    lcfg = cfg["loss_cfg"]
    need_h, need_w, need_b = cfg["needs"]
    n = hidden.shape[0]
    chunk = cfg["chunk_size"]
    acc = row_max.dtype
    gy = None if grad_label is None else grad_label.to(acc).contiguous()
    gh = None if grad_entropy is None else grad_entropy.to(acc).contiguous()
    grad_hidden, grad_weight, grad_bias = grads
    if need_h and grad_hidden is None:
        grad_hidden = grads[0] = torch.zeros_like(hidden)
    if need_w and grad_weight is None:
        grad_weight = grads[1] = torch.zeros_like(weight)
    bias_acc = None
    if need_b:
        bias_acc = torch.zeros(weight.shape[0], dtype=ops.acc_dtype(bias.dtype), device=bias.device)
    weight_t = weight.t()
    head = cfg["head"]
    buf = hidden.new_empty((min(chunk, n), weight.shape[0]))
    dbuf = None if head.cap is None else buf.new_empty(buf.shape)
    k = teacher_ids.shape[1]
    for s in range(0, n, chunk):
        e = min(s + chunk, n)
        z = buf[:e - s]
        dz = None if dbuf is None else dbuf[:e - s]
        _head_logits(hidden[s:e], weight_t, bias, head, z, dz)
        no_g = torch.zeros((e - s, k), dtype=torch.float64, device=hidden.device)
        ops.backward_(z, teacher_ids[s:e], row_max[s:e], row_coefs[s:e], no_g,
                      torch.zeros(e - s, dtype=acc, device=hidden.device), lcfg.vocab_start,
                      lcfg.inv_temperature, None if labels is None else labels[s:e],
                      None if gy is None else gy[s:e], None if gh is None else gh[s:e],
                      backend=backend)
        _head_grad_(z, head, dz)
        if need_h:
            grad_hidden[s:e].addmm_(z, weight)
        if need_w:
            grad_weight.addmm_(z.t(), hidden[s:e])
        if need_b:
            bias_acc.add_(z.sum(0, dtype=bias_acc.dtype))
    if need_b:
        grads[2] = bias_acc.to(bias.dtype) if grads[2] is None else grads[2] + bias_acc.to(bias.dtype)


# ----------------------------------------------------------------------------- API

def fused_linear_topk_distill_loss(
    hidden: Tensor,
    weight: Tensor,
    teacher_ids: Tensor,
    teacher_logprobs: Tensor,
    *,
    bias: Optional[Tensor] = None,
    chunk_size: Optional[int] = None,
    loss="fkl",
    support: Optional[str] = "topk",
    beta: Optional[float] = 0.5,
    rkl_ratio: Optional[float] = 0.1,
    skew: Optional[float] = 0.1,
    temperature: float = 1.0,
    t2_scale: bool = False,
    log_prob_min_clamp: Optional[float] = None,
    mask: Optional[Tensor] = None,
    reduction: str = "mean",
    tp_group: Union[None, str, "dist.ProcessGroup"] = None,
    vocab_start: Optional[int] = None,
    check_inputs: bool = True,
    weight_grad_fp32: bool = False,
    labels: Optional[Tensor] = None,
    return_entropy: bool = False,
    student_topk: Optional[int] = None,
    missing_teacher: str = "error",
    logit_scale: float = 1.0,
    final_logit_softcapping: Optional[float] = None,
    label_teacher_logprobs: Optional[Tensor] = None,
    label_sample_logprobs: Optional[Tensor] = None,
    sample_weight_clip: Optional[float] = None,
) -> TopKDistillOutput:
    """``topk_distill_loss(hidden @ weight.T + bias, ...)`` without the ``[N, V_r]`` logits.

    Args:
        hidden: ``[..., H]`` the LM head's input (fp32, bf16, fp16, or fp64 on CPU).
        weight: ``[V_r, H]`` the LM head's weight - this rank's vocab shard under TP - in the
            hidden's dtype. ``bias``: optional ``[V_r]``.
        teacher_ids, teacher_logprobs, mask, loss, support, beta, rkl_ratio, skew, temperature,
        t2_scale, log_prob_min_clamp, tp_group, vocab_start, check_inputs, labels,
        return_entropy, student_topk, missing_teacher, label_teacher_logprobs,
        label_sample_logprobs, sample_weight_clip: as in
            :func:`topk_distill.topk_distill_loss`. ``label_logprobs`` and ``entropy`` are
            differentiable: their gradients are formed in the backward, by recomputing each
            chunk's logits (one more GEMM per chunk, only when they receive a gradient).
        reduction: ``mean`` | ``sum``. ``none`` is not supported: the gradients are formed in the
            forward with each row's weight in the reduction, which must be known then.
        chunk_size: rows per chunk (peak memory ~ chunk_size * V_r logits); ``None`` picks it
            with :func:`auto_chunk_size`. Under TP every rank must pass the same value.
        weight_grad_fp32: for bf16 / fp16 weights, accumulate ``grad_weight`` over the chunks in
            an fp32 buffer (+4 bytes per weight element, during the forward) instead of in the
            weight's dtype. fp32 / fp64 weights always accumulate in their own dtype.
        logit_scale, final_logit_softcapping: the LM head's output transform, as in Cohere
            (``logit_scale``) and Gemma (``final_logit_softcapping``) models and TRL's chunked
            loss: the logits are ``cap * tanh(logit_scale * raw / cap)`` with ``raw = hidden @
            weight.T + bias`` (``cap = None``: ``logit_scale * raw``), before ``temperature``.
            The gradients are exact (chain rule per chunk); a softcap keeps its derivative in a
            second chunk-sized buffer, so the automatic chunk has half the rows.

    The gradient w.r.t. ``hidden`` under TP is this rank's partial ``grad_logits_r @ weight_r``;
    the sum over the ranks is the full one. Reduce it as Megatron's ColumnParallelLinear does
    (``copy_to_tensor_model_parallel_region`` before the call, or the sequence-parallel gather).

    Returns:
        ``TopKDistillOutput``; per-row fields have hidden's leading shape.
    """
    opts = _validate.validate_options(loss=loss, support=support, beta=beta, rkl_ratio=rkl_ratio,
                                      skew=skew, temperature=temperature, t2_scale=t2_scale,
                                      log_prob_min_clamp=log_prob_min_clamp, reduction=reduction,
                                      check_inputs=check_inputs, return_entropy=return_entropy,
                                      student_topk=student_topk, missing_teacher=missing_teacher,
                                      sample_weight_clip=sample_weight_clip)
    if opts.reduction == "none":
        raise ValueError("reduction='none' is not supported by fused_linear_topk_distill_loss "
                         "(its gradients are formed in the forward from each row's weight in "
                         "the reduction); use 'mean' or 'sum', or topk_distill_loss on the "
                         "logits for per-row losses")
    if not isinstance(weight_grad_fp32, bool):
        raise TypeError(f"weight_grad_fp32 must be a bool; got {type(weight_grad_fp32).__name__}")
    chunk_size = _validate_chunk_size(chunk_size)
    head = _validate_head(logit_scale, final_logit_softcapping)
    lead_shape, n, v_local, k = _validate_tensors(hidden, weight, bias, teacher_ids,
                                                  teacher_logprobs, mask, tp_group, vocab_start,
                                                  labels, label_teacher_logprobs,
                                                  label_sample_logprobs)
    _validate.validate_sampled_inputs(opts.terms, labels, label_teacher_logprobs,
                                      label_sample_logprobs)

    _validate.warn_if_teacher_requires_grad(teacher_logprobs)
    hidden2d = hidden.reshape(n, hidden.shape[-1])
    if not hidden2d.is_contiguous():
        hidden2d = hidden2d.contiguous()
    ids2d = teacher_ids.reshape(n, k).contiguous()
    lp2d = teacher_logprobs.detach().reshape(n, k).contiguous()
    mask1d = None if mask is None else mask.reshape(n).contiguous()
    labels1d = None if labels is None else labels.reshape(n).contiguous()
    label_lps = losses._label_rows(n, label_teacher_logprobs, label_sample_logprobs)

    try:
        group_name, start, vocab_size = parallel.layout_and_checks(
            tp_group, n, k, v_local, vocab_start, ids2d, lp2d, mask1d,
            check_inputs=check_inputs, device=hidden.device, labels=labels1d,
            missing_teacher=opts.missing_teacher, label_logprobs=label_lps)
    except ValueError as e:  # the layout check says "logits"; here the rows are hidden's
        raise ValueError(str(e).replace("logits:", "hidden:")) from None
    ids2d, lp2d, loss_cfg = losses._after_layout(opts, ids2d, lp2d, group_name, start,
                                                 vocab_size, inplace_backward=False)

    if chunk_size is None or group_name is not None:
        # A softcap's derivative buffer doubles the bytes per row: the same budget, half the rows.
        buffer_cols = v_local * (2 if head.cap is not None else 1)
        local_auto = auto_chunk_size(max(n, 1), buffer_cols, hidden.dtype, hidden.device)
        if group_name is not None and (chunk_size is None or check_inputs):
            chunk_size = _agree_on_chunk_size(group_name, chunk_size, local_auto, hidden.device)
        elif chunk_size is None:
            chunk_size = local_auto
    chunk_size = max(1, min(chunk_size, max(n, 1)))

    grad_on = torch.is_grad_enabled()
    needs = (grad_on and hidden.requires_grad, grad_on and weight.requires_grad,
             grad_on and bias is not None and bias.requires_grad)
    count = None
    if opts.reduction == "mean":
        count = (torch.tensor(max(n, 1), device=hidden.device) if mask1d is None
                 else mask1d.sum().clamp_min(1))
    cfg = dict(needs=needs, chunk_size=chunk_size, loss_cfg=loss_cfg, reduction=opts.reduction,
               weight_grad_fp32=weight_grad_fp32, head=head)
    (out, student_mass, teacher_mass, label_lp, entropy, top_ids, top_lp, ov_count,
     ov_adv) = _FusedLinearTopKDistill.apply(
         hidden2d, weight, bias, ids2d, lp2d, mask1d, labels1d,
         losses._label_teacher_logprobs(opts, label_lps[0]), label_lps[1], count, cfg)
    return losses._output(
        out, lead_shape, student_mass, teacher_mass,
        label_logprobs=label_lp if labels is not None else None,
        entropy=entropy if opts.return_entropy else None,
        topk=(top_ids, top_lp, ov_count, ov_adv) if opts.student_topk is not None else None)


class FusedLinearTopKDistillLoss(nn.Module):
    """``nn.Module`` form of :func:`fused_linear_topk_distill_loss`; keywords fixed at
    construction, the LM head's weight (and bias) passed per call, as in Liger-Kernel.

    ``crit = FusedLinearTopKDistillLoss(loss="jsd", beta=0.5, chunk_size=1024)``
    ``out = crit(hidden, lm_head.weight, teacher_ids, teacher_logprobs, mask=mask)``
    """

    def __init__(self, *, chunk_size: Optional[int] = None, loss="fkl", support="topk",
                 beta=0.5, rkl_ratio=0.1, skew=0.1, temperature: float = 1.0,
                 t2_scale: bool = False, log_prob_min_clamp: Optional[float] = None,
                 reduction: str = "mean", tp_group=None, vocab_start: Optional[int] = None,
                 check_inputs: bool = True, weight_grad_fp32: bool = False,
                 return_entropy: bool = False, student_topk: Optional[int] = None,
                 missing_teacher: str = "error", logit_scale: float = 1.0,
                 final_logit_softcapping: Optional[float] = None,
                 sample_weight_clip: Optional[float] = None):
        super().__init__()
        self.kwargs = dict(chunk_size=chunk_size, loss=loss, support=support, beta=beta,
                           rkl_ratio=rkl_ratio, skew=skew, temperature=temperature,
                           t2_scale=t2_scale, log_prob_min_clamp=log_prob_min_clamp,
                           reduction=reduction, tp_group=tp_group, vocab_start=vocab_start,
                           check_inputs=check_inputs, weight_grad_fp32=weight_grad_fp32,
                           return_entropy=return_entropy, student_topk=student_topk,
                           missing_teacher=missing_teacher, logit_scale=logit_scale,
                           final_logit_softcapping=final_logit_softcapping,
                           sample_weight_clip=sample_weight_clip)
        _validate_head(logit_scale, final_logit_softcapping)
        # Fail at construction, not at the first step.
        _validate.validate_options(loss=loss, support=support, beta=beta, rkl_ratio=rkl_ratio,
                                   skew=skew, temperature=temperature, t2_scale=t2_scale,
                                   log_prob_min_clamp=log_prob_min_clamp, reduction=reduction,
                                   check_inputs=check_inputs, return_entropy=return_entropy,
                                   student_topk=student_topk, missing_teacher=missing_teacher,
                                   sample_weight_clip=sample_weight_clip)
        if reduction == "none":
            raise ValueError("reduction='none' is not supported by FusedLinearTopKDistillLoss; "
                             "use 'mean' or 'sum'")
        _validate_chunk_size(chunk_size)
        if not isinstance(weight_grad_fp32, bool):
            raise TypeError(f"weight_grad_fp32 must be a bool; got "
                            f"{type(weight_grad_fp32).__name__}")

    def forward(self, hidden: Tensor, weight: Tensor, teacher_ids: Tensor,
                teacher_logprobs: Tensor, bias: Optional[Tensor] = None,
                mask: Optional[Tensor] = None, labels: Optional[Tensor] = None,
                label_teacher_logprobs: Optional[Tensor] = None,
                label_sample_logprobs: Optional[Tensor] = None) -> TopKDistillOutput:
        return fused_linear_topk_distill_loss(
            hidden, weight, teacher_ids, teacher_logprobs, bias=bias, mask=mask, labels=labels,
            label_teacher_logprobs=label_teacher_logprobs,
            label_sample_logprobs=label_sample_logprobs, **self.kwargs)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items()
                         if k != "tp_group" and v is not UNSET)
