"""Pure-PyTorch reference of docs/SPEC.md (with docs/DECISIONS.md): the float64 oracle.

This file is the definition of correctness for the kernels and the "plain PyTorch" baseline of
the benchmarks. It is written as users write it today: ``log_softmax`` over the full vocab in
fp32 (fp64 for fp64 logits), ``gather``, the divergence formula, and autograd for the gradient.

Conventions that keep values AND autograd gradients free of spurious NaN:
  * every bin is a pair (probability, log-probability) for the teacher (a, la) and the student
    (b, lb); a padding entry is a bin with a = b = 0, which every divergence ignores;
  * ``x * (lx - ly)`` is taken as 0 wherever x == 0 (``0 log 0 = 0``, ``0 * (-inf) = 0``), and the
    inputs of the unused branch are replaced by finite values *before* the arithmetic: a
    ``torch.where`` only zeroes the gradient of the unused branch, and 0 * inf in its backward
    would still be NaN;
  * log-sum-exps over possibly-empty sets go through :func:`_masked_logsumexp`.
"""
from __future__ import annotations

import math

import torch

from . import _layout
from ._types import TopKDistillOutput
from ._validate import Options, check_data, validate_args
from .parallel import resolve_layout

__all__ = ["topk_distill_loss"]

_NEG_INF = float("-inf")


# ----------------------------------------------------------------------------- small helpers

def _log(x: float) -> float:
    """math.log with log(0) = -inf (for the mixture weights beta, skew and their complements)."""
    return math.log(x) if x > 0 else _NEG_INF


def _clamp_min(x: torch.Tensor, c: float) -> torch.Tensor:
    """max(x, c) whose gradient passes where x >= c (SPEC 3: an entry with s == c does pass
    gradient). Not ``clamp_min``: in this torch its backward is 0 at x == c. Keeps NaN."""
    return torch.where(x < c, torch.full_like(x, c), x)


def _masked_logsumexp(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """log sum_{keep} exp(x) over the last dim; -inf for a row that keeps nothing, with a zero
    (not NaN) gradient: such rows see a dummy finite input instead of all -inf."""
    any_kept = keep.any(-1, keepdim=True)
    x = torch.where(keep, x, _NEG_INF)
    x = torch.where(any_kept, x, 0.0)
    return torch.where(any_kept.squeeze(-1), torch.logsumexp(x, -1), _NEG_INF)


def _logaddexp(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """log(e^x + e^y) that also has a finite gradient when both are -inf (value -inf)."""
    both = torch.isneginf(x) & torch.isneginf(y)
    x0, y0 = torch.where(both, 0.0, x), torch.where(both, 0.0, y)
    return torch.where(both, _NEG_INF, torch.logaddexp(x0, y0))


def _xlog_ratio(x: torch.Tensor, lx: torch.Tensor, ly: torch.Tensor) -> torch.Tensor:
    """Elementwise x * (lx - ly), the KL term of one bin (x = e^lx); 0 where x == 0."""
    pos = x > 0
    lx, ly = torch.where(pos, lx, 0.0), torch.where(pos, ly, 0.0)
    return torch.where(pos, x * (lx - ly), torch.where(torch.isnan(x), x, 0.0))  # NaN stays NaN


# ----------------------------------------------------------------------------- the divergences

def _bin_terms(a, la, b, lb, opts: Options) -> torch.Tensor:
    """Per-bin terms of the divergence (SPEC 3) between teacher bins a and student bins b;
    summing them over the bins gives the divergence. a = e^la, b = e^lb."""
    loss = opts.loss
    if loss == "fkl" or (loss == "jsd" and opts.beta == 0.0):  # DECISIONS 5: beta=0 is FKL exactly
        return _xlog_ratio(a, la, lb)
    if loss == "rkl" or (loss == "jsd" and opts.beta == 1.0):  # ... and beta=1 is RKL exactly
        return _xlog_ratio(b, lb, la)
    if loss == "jsd":  # m = beta a + (1-beta) b;  beta KL(a||m) + (1-beta) KL(b||m)
        beta = opts.beta
        lm = _logaddexp(math.log(beta) + la, math.log(1.0 - beta) + lb)
        return beta * _xlog_ratio(a, la, lm) + (1.0 - beta) * _xlog_ratio(b, lb, lm)
    if loss == "fkl+rkl" and opts.rkl_ratio in (0.0, 1.0):  # DECISIONS 5: the endpoints are
        return _xlog_ratio(a, la, lb) if opts.rkl_ratio == 0.0 else _xlog_ratio(b, lb, la)  # exact
    if loss == "fkl+rkl":
        r = opts.rkl_ratio
        return (1.0 - r) * _xlog_ratio(a, la, lb) + r * _xlog_ratio(b, lb, la)
    if loss == "tvd":  # autograd's abs: d|a-b| has sign(0) = 0 (DECISIONS 13)
        return 0.5 * (a - b).abs()
    lam = opts.skew
    if loss == "skl":  # KL(a || lam a + (1-lam) b)
        return _xlog_ratio(a, la, _logaddexp(_log(lam) + la, _log(1.0 - lam) + lb))
    if loss == "srkl":  # KL(b || lam b + (1-lam) a); skew=0 gives RKL (DECISIONS 6)
        return _xlog_ratio(b, lb, _logaddexp(_log(lam) + lb, _log(1.0 - lam) + la))
    raise AssertionError(loss)


def _topk_outside_term(u: torch.Tensor, opts: Options) -> torch.Tensor:
    """support="topk": the student's mass outside the top-k, u = 1 - Q (unclamped, not floored,
    DECISIONS 4), against a teacher probability of 0 (SPEC 3). Linear in u."""
    loss, zero = opts.loss, torch.zeros_like(u)
    if loss == "jsd" and 0.0 < opts.beta < 1.0:  # (1-beta) u log(u / ((1-beta) u))
        return (1.0 - opts.beta) * u * math.log(1.0 / (1.0 - opts.beta))
    if loss == "tvd":  # 0.5 |0 - u|, u >= 0 up to duplicates (taken linear anyway)
        return 0.5 * u
    if loss == "srkl" and opts.skew > 0.0:  # u log(u / (skew u)); skew=0: infinite, left out
        return u * math.log(1.0 / opts.skew)
    # fkl, skl: teacher 0 contributes 0; rkl, fkl+rkl's RKL part, jsd at beta=1: infinite, left out.
    return zero


def per_row_loss(s: torch.Tensor, teacher_logprobs: torch.Tensor, valid: torch.Tensor,
                 log_q_tail: torch.Tensor | None, opts: Options) -> torch.Tensor:
    """Per-row loss from the student log-probs of the teacher tokens (the SPEC's s_k).

    s, teacher_logprobs: [N, K] in the compute dtype; valid: [N, K] bool (entries that count;
    ``s`` is ignored elsewhere). log_q_tail: [N], log(1 - Q), needed for support="tail" only
    (taken as an input so that it can be computed without cancellation from the full softmax).
    No temperature / t2 / mask / reduction here.
    """
    l = teacher_logprobs
    # Masses, unclamped (SPEC 3): Q = sum q_k, P = sum p_k over valid entries.
    Q = torch.where(valid, torch.exp(torch.where(valid, s, _NEG_INF)), 0.0).sum(-1)
    P = torch.where(valid, torch.exp(torch.where(valid, l, _NEG_INF)), 0.0).sum(-1)

    # Bin log-probs: clamped (DECISIONS 1), then renormalised over the valid bins (DECISIONS 2).
    c = opts.log_prob_min_clamp
    la, lb = (l, s) if c is None else (_clamp_min(l, c), _clamp_min(s, c))
    undefined = torch.zeros_like(valid[:, 0])
    if opts.support == "renorm":
        norm_a, norm_b = _masked_logsumexp(la, valid), _masked_logsumexp(lb, valid)
        # A teacher with zero mass on its valid bins cannot be renormalised: NaN, not a guess.
        undefined = valid.any(-1) & torch.isneginf(norm_a)
        norm_a = torch.where(undefined, 0.0, norm_a)
        la, lb = la - norm_a.unsqueeze(-1), lb - norm_b.unsqueeze(-1)
    # Padding = a zero-probability bin on both sides (ignored by every divergence).
    la = torch.where(valid, la, _NEG_INF)
    lb = torch.where(valid, lb, _NEG_INF)
    a, b = torch.exp(la), torch.exp(lb)

    if opts.support == "tail":
        # K+1-th bin: the rest of the vocab. p_tail floored at 0; q_tail = 1 - Q (DECISIONS 3).
        p_tail = (1.0 - P).clamp_min(0.0)
        la = torch.cat([la, torch.log(p_tail).unsqueeze(-1)], -1)
        lb = torch.cat([lb, log_q_tail.unsqueeze(-1)], -1)
        a = torch.cat([a, p_tail.unsqueeze(-1)], -1)
        b = torch.cat([b, torch.exp(log_q_tail).unsqueeze(-1)], -1)

    rows = _bin_terms(a, la, b, lb, opts).sum(-1)
    if opts.support == "topk":
        rows = rows + _topk_outside_term(1.0 - Q, opts)
    else:  # DECISIONS 7: no valid entry -> exactly 0 (the tail bins, both 1, could round to 1e-16)
        rows = torch.where(valid.any(-1), rows, 0.0)
    return torch.where(undefined, float("nan"), rows)


def _log_student_tail(logq: torch.Tensor, ids: torch.Tensor, valid: torch.Tensor,
                      s: torch.Tensor) -> torch.Tensor:
    """log q_tail = log(1 - Q) per row, from the full-vocab student log-probs ``logq`` [N, V].

    1 - Q cancels catastrophically when Q -> 1 (and rounding can even make it negative), so when
    a row's valid ids are distinct it is computed as the log-sum-exp of the student log-probs of
    the tokens that are NOT teacher ids: the same number, a sum of non-negative terms.
    With duplicate ids (each counts in Q, DECISIONS 8) or no valid id the SPEC's 1 - Q is used
    as is (it may then be negative -> NaN, which is not papered over).
    """
    n = logq.shape[0]
    rows = torch.arange(n, device=logq.device).unsqueeze(-1).expand_as(ids)
    is_teacher = torch.zeros_like(logq, dtype=torch.bool)
    is_teacher[rows[valid], ids[valid]] = True  # all-True writes: duplicates are harmless
    complement = _masked_logsumexp(logq, ~is_teacher)

    # With duplicates, 1 - Q = (non-teacher mass) - (mass of the 2nd, 3rd... copies): still no
    # "1 - Q" cancellation. Duplicates can push it below 0: floored like the teacher's (DECISIONS
    # 3, 8). A row with no valid id has complement = log 1 = 0 already.
    srt, order = torch.where(valid, ids, -1).sort(dim=-1, stable=True)
    repeat = (srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)
    dup = repeat.any(-1)
    s_sorted = s.gather(-1, order)[:, 1:]
    dup_mass = torch.where(repeat, torch.exp(torch.where(repeat, s_sorted, _NEG_INF)), 0.0).sum(-1)
    with_dup = (torch.exp(torch.where(dup, complement, 0.0)) - dup_mass).clamp_min(0.0)
    with_dup = torch.where(dup, with_dup, 1.0)  # unused branch: log(1) (finite gradient)
    return torch.where(dup, torch.log(with_dup), complement)


class _NaNGradWhereNotFinite(torch.autograd.Function):
    """Identity whose backward makes the gradient NaN for every row whose value is inf or NaN
    (DECISIONS 15): such a row has no usable gradient, and autograd alone would hand out an
    arbitrary mix of inf, NaN and finite numbers depending on how the formula is written."""

    @staticmethod
    def forward(ctx, rows):
        ctx.save_for_backward(~torch.isfinite(rows))
        return rows.clone()

    @staticmethod
    def backward(ctx, grad):
        (bad,) = ctx.saved_tensors
        # A row that receives no gradient (masked, or left out by the caller) stays at 0.
        return grad.masked_fill(bad & (grad != 0), float("nan"))


# ----------------------------------------------------------------------------- tensor parallelism

class _GatherVocabShards(torch.autograd.Function):
    """[N, V_r] shard of every rank -> full [N, V] logits; backward: the local slice, no comm.

    Every rank computes the same, replicated loss from the same full logits, so the gradient of
    that loss w.r.t. this rank's shard is exactly the shard's slice of the full gradient.
    torch.distributed.nn.all_gather would instead sum the incoming gradients over the ranks in
    its backward (right when each rank's loss is a different term of a global sum), which here
    would multiply the gradient by the world size.
    """

    @staticmethod
    def forward(ctx, local, layout, group):
        ctx.start, ctx.size = layout.vocab_start, local.shape[-1]
        width = max(layout.shard_sizes)  # all_gather needs equal shapes: pad, gather, cut
        padded = torch.nn.functional.pad(local, (0, width - local.shape[-1])).contiguous()
        parts = [torch.empty_like(padded) for _ in range(layout.world_size)]
        torch.distributed.all_gather(parts, padded, group=group)
        order = sorted(range(layout.world_size), key=lambda r: layout.shard_starts[r])
        return torch.cat([parts[r][:, :layout.shard_sizes[r]] for r in order], -1)

    @staticmethod
    def backward(ctx, grad_full):
        return grad_full[:, ctx.start:ctx.start + ctx.size], None, None


# ----------------------------------------------------------------------------- the API

def topk_distill_loss(logits, teacher_ids, teacher_logprobs, *, loss="fkl", support="topk",
                      beta=0.5, rkl_ratio=0.1, skew=0.1, temperature=1.0, t2_scale=False,
                      log_prob_min_clamp=None, mask=None, reduction="mean", tp_group=None,
                      vocab_start=None, inplace_backward=False, check_inputs=True
                      ) -> TopKDistillOutput:
    """Top-k distillation loss, pure PyTorch (SPEC.md section 8 signature; the oracle).

    Computes in float64 for float64 logits, else float32. Returns (loss, student_mass,
    teacher_mass); the loss is in the compute dtype, the masses are fp32 without gradient
    (DECISIONS 11) and have the logits' leading shape, as does the loss for reduction="none".
    With ``tp_group`` the logits are this rank's vocab shard: the shards are all-gathered (a
    custom autograd Function whose backward is the local slice) and every rank computes the
    unsharded loss. ``inplace_backward`` is accepted and ignored (autograd allocates the gradient).
    """
    # SPEC 9.1, jagged nested tensors: this function on the packed values, per-token outputs
    # repacked (topk_distill/_layout.py). MUST stay the first statement: locals() is then exactly
    # this call's arguments, so keywords added later are forwarded (and checked for nesting) too.
    if _layout.any_nested(*locals().values()):
        return _layout.call_on_packed(topk_distill_loss, **locals())
    args = validate_args(
        logits, teacher_ids, teacher_logprobs, loss=loss, support=support, beta=beta,
        rkl_ratio=rkl_ratio, skew=skew, temperature=temperature, t2_scale=t2_scale,
        log_prob_min_clamp=log_prob_min_clamp, mask=mask, reduction=reduction, tp_group=tp_group,
        vocab_start=vocab_start, inplace_backward=inplace_backward, check_inputs=check_inputs)
    opts, n, k = args.options, args.n_rows, args.k
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32

    z = logits.reshape(n, args.local_vocab).to(dtype)
    if tp_group is not None:
        if isinstance(tp_group, str):  # a group's registered name, as the kernel-backed API allows
            from torch.distributed.distributed_c10d import _resolve_process_group
            tp_group = _resolve_process_group(tp_group)
        # Always checked (the oracle makes no shortcut): one all_gather of (N, K, V_r, start).
        layout = resolve_layout(tp_group, n, k, args.local_vocab, vocab_start, check_inputs=True,
                                device=logits.device)
        z = _GatherVocabShards.apply(z, layout, tp_group)
    vocab = z.shape[-1]
    if opts.check_inputs:
        check_data(teacher_ids, teacher_logprobs, vocab, mask)

    ids = teacher_ids.reshape(n, k).long()
    l = teacher_logprobs.reshape(n, k).to(dtype).detach()  # teacher inputs are constants
    counted = (torch.ones(n, dtype=torch.bool, device=z.device) if mask is None
               else mask.reshape(n))
    in_range = ids < vocab
    valid = (ids >= 0) & in_range & counted.unsqueeze(-1)
    bad_row = (~in_range).any(-1)  # ids >= V (check_inputs=False): entry ignored, row NaN

    # Student log-probs over the full vocab at temperature T (DECISIONS 12), then s_k.
    logq = torch.log_softmax(z / opts.temperature, dim=-1)
    s = torch.where(valid, logq.gather(-1, torch.where(valid, ids, 0)), 0.0)
    log_q_tail = _log_student_tail(logq, ids, valid, s) if opts.support == "tail" else None

    rows = per_row_loss(s, l, valid, log_q_tail, opts)
    if opts.t2_scale:
        rows = rows * opts.temperature ** 2
    rows = torch.where(counted, rows, 0.0)  # masked rows: loss 0, gradient 0 (DECISIONS 10)
    rows = rows + torch.where(bad_row & counted, float("nan"), 0.0)
    # 0 * sum(z): no value change for finite logits, but every row's loss now has a path to
    # every logit of its row, so the NaN of a non-finite row reaches all of them even where the
    # inf/NaN came out of a branch that does not depend on the logits.
    rows = rows + 0.0 * torch.where(counted.unsqueeze(-1), z, 0.0).sum(-1)
    rows = _NaNGradWhereNotFinite.apply(rows)

    with torch.no_grad():
        student_mass = torch.where(valid, s.exp(), 0.0).sum(-1).float()
        teacher_mass = torch.where(valid, l.exp(), 0.0).sum(-1).float()

    if opts.reduction == "none":
        out = rows.reshape(args.lead_shape)
    elif opts.reduction == "sum":
        out = rows.sum()
    else:  # mean over counted rows; an empty or all-masked batch gives 0, not NaN
        out = rows.sum() / counted.sum().clamp_min(1).to(dtype)
    return TopKDistillOutput(out, student_mass.reshape(args.lead_shape),
                             teacher_mass.reshape(args.lead_shape))
