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
from typing import NamedTuple

import torch

from . import _layout
from ._types import Term, TopKDistillOutput
from ._validate import (UNSET, Options, check_data, check_k_fits, data_flags, validate_args,
                        validate_k, validate_logits, validate_temperature, validate_vocab_start)
from .parallel import resolve_layout

__all__ = ["topk_distill_loss", "student_topk", "fused_linear_topk_distill_loss", "lm_head_logits"]

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
    (not NaN) gradient: such rows see a dummy finite input instead of all -inf. A term of -inf
    adds nothing and is left out (a row of only -inf terms is a row that keeps nothing), so its
    gradient is 0 rather than the NaN of logsumexp's backward over all -inf."""
    keep = keep & ~torch.isneginf(x)
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

def _bin_terms(a, la, b, lb, opts) -> torch.Tensor:
    """Per-bin terms of the divergence (SPEC 3) between teacher bins a and student bins b;
    summing them over the bins gives the divergence. a = e^la, b = e^lb. ``opts``: anything with
    ``loss``, ``beta``, ``rkl_ratio``, ``skew`` (a :class:`Term`)."""
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


def _generalized_slope(opts) -> float:
    """support="generalized" (SPEC 10.3): each bin's term is the plain one plus kappa * (b - a),
    which makes it a divergence between unnormalised measures (>= 0, 0 only at b = a):
    fkl ``- a + b``, rkl ``- b + a``, skl ``- a + m = (1-skew)(b - a)``, srkl ``- b + m' =
    (1-skew)(a - b)``, fkl+rkl the mix; JSD and TVD need nothing. Returns kappa."""
    loss = opts.loss
    if loss == "jsd":
        return {0.0: 1.0, 1.0: -1.0}.get(opts.beta, 0.0)  # beta = 0 / 1: the fkl / rkl rows
    if loss == "fkl+rkl":
        return 1.0 - 2.0 * opts.rkl_ratio
    return {"fkl": 1.0, "rkl": -1.0, "tvd": 0.0,
            "skl": 1.0 - opts.skew, "srkl": -(1.0 - opts.skew)}[loss]


def _topk_outside_term(u: torch.Tensor, opts) -> torch.Tensor:
    """support="topk": the student's mass outside the top-k, u = 1 - Q (unclamped, not floored,
    DECISIONS 4; exactly 0 in a row whose ids cover the vocab, DECISIONS 20), against a teacher
    probability of 0 (SPEC 3). Linear in u."""
    loss, zero = opts.loss, torch.zeros_like(u)
    if loss == "jsd" and 0.0 < opts.beta < 1.0:  # (1-beta) u log(u / ((1-beta) u))
        return (1.0 - opts.beta) * u * math.log(1.0 / (1.0 - opts.beta))
    if loss == "tvd":  # 0.5 |0 - u|, u >= 0 up to duplicates (taken linear anyway)
        return 0.5 * u
    if loss == "srkl" and opts.skew > 0.0:  # u log(u / (skew u)); skew=0: infinite, left out
        return u * math.log(1.0 / opts.skew)
    # fkl, skl: teacher 0 contributes 0; rkl, fkl+rkl's RKL part, jsd at beta=1: infinite, left out.
    return zero


class SampledEntry(NamedTuple):
    """The sampled token of each row (SPEC 10.2), [N] each: ``s`` its student log-prob s_y
    (differentiable), ``l`` the teacher's log p_y, ``weight`` the importance weight w (a
    constant), ``use`` whether the entry adds to the loss (counted, 0 <= y < V, not a valid
    teacher id, not dropped as missing)."""

    s: torch.Tensor
    l: torch.Tensor
    weight: torch.Tensor
    use: torch.Tensor


def _sampled_entry(logq, y, ids, valid, counted, l_y, log_mu, clip, missing_teacher):
    """:class:`SampledEntry` from the full-vocab student log-probs ``logq`` [N, V], labels ``y``,
    the label's teacher log-prob ``l_y`` and sampling log-prob ``log_mu`` (None: the student's own
    s_y, detached). w = 1 / mu_y, with a clip c: min(1 / mu_y, c / q_y), q_y unclamped."""
    vocab = logq.shape[-1]
    in_vocab = (y >= 0) & (y < vocab) & counted
    use = in_vocab & ~((ids == y.unsqueeze(-1)) & valid).any(-1)
    s_y = logq.gather(-1, torch.where(in_vocab, y, 0).unsqueeze(-1)).squeeze(-1)
    if missing_teacher != "error":  # SPEC 9.5 for the label's teacher log-prob
        missing = use & torch.isnan(l_y)
        l_y = torch.where(missing, _NEG_INF, l_y)
        if missing_teacher == "drop":
            use = use & ~missing
    with torch.no_grad():
        log_w = -(s_y if log_mu is None else log_mu)
        if clip is not None:  # min(1/mu, c/q): the ratio q/mu is bounded by c
            log_w = torch.minimum(log_w, math.log(clip) - s_y)
        weight = torch.where(use, torch.exp(log_w), 0.0)
    return SampledEntry(s_y, l_y, weight, use)


def _sampled_rows(sampled: SampledEntry, term: Term, clamp: float | None) -> torch.Tensor:
    """w * f(p_y, q_y) per row (0 where the entry is not used), with the clamp of the bins."""
    la, lb = sampled.l, sampled.s
    if clamp is not None:
        la, lb = _clamp_min(la, clamp), _clamp_min(lb, clamp)
    # An unused entry is a zero-probability bin on both sides: 0, with a zero gradient.
    la = torch.where(sampled.use, la, _NEG_INF).unsqueeze(-1)
    lb = torch.where(sampled.use, lb, _NEG_INF).unsqueeze(-1)
    f = _bin_terms(torch.exp(la), la, torch.exp(lb), lb, term).squeeze(-1)
    return torch.where(sampled.use, sampled.weight * f, 0.0)


def _term_rows(s: torch.Tensor, l: torch.Tensor, valid: torch.Tensor,
               log_q_tail: torch.Tensor | None, term: Term, clamp: float | None,
               covered: torch.Tensor | None, sampled: SampledEntry | None = None
               ) -> torch.Tensor:
    """One term's per-row divergence (SPEC 3 with DECISIONS 1-8, 20; SPEC 10.2 / 10.3 for the
    sampled and generalized supports); see :func:`per_row_loss`."""
    # Masses, unclamped (SPEC 3): Q = sum q_k, P = sum p_k over valid entries.
    Q = torch.where(valid, torch.exp(torch.where(valid, s, _NEG_INF)), 0.0).sum(-1)
    P = torch.where(valid, torch.exp(torch.where(valid, l, _NEG_INF)), 0.0).sum(-1)

    # Bin log-probs: clamped (DECISIONS 1), then renormalised over the valid bins (DECISIONS 2).
    la, lb = (l, s) if clamp is None else (_clamp_min(l, clamp), _clamp_min(s, clamp))
    undefined = torch.zeros_like(valid[:, 0])
    if term.support == "renorm":
        norm_a, norm_b = _masked_logsumexp(la, valid), _masked_logsumexp(lb, valid)
        # A teacher with zero mass on its valid bins cannot be renormalised: NaN, not a guess.
        undefined = valid.any(-1) & torch.isneginf(norm_a)
        norm_a = torch.where(undefined, 0.0, norm_a)
        la, lb = la - norm_a.unsqueeze(-1), lb - norm_b.unsqueeze(-1)
    # Padding = a zero-probability bin on both sides (ignored by every divergence).
    la = torch.where(valid, la, _NEG_INF)
    lb = torch.where(valid, lb, _NEG_INF)
    a, b = torch.exp(la), torch.exp(lb)

    if term.support == "tail":
        # K+1-th bin: the rest of the vocab. p_tail floored at 0; q_tail = 1 - Q (DECISIONS 3).
        p_tail = (1.0 - P).clamp_min(0.0)
        if covered is not None:  # ids cover the vocab: no rest, both tails 0 (DECISIONS 20)
            p_tail = torch.where(covered, 0.0, p_tail)
            log_q_tail = torch.where(covered, _NEG_INF, log_q_tail)
        la = torch.cat([la, torch.log(p_tail).unsqueeze(-1)], -1)
        lb = torch.cat([lb, log_q_tail.unsqueeze(-1)], -1)
        a = torch.cat([a, p_tail.unsqueeze(-1)], -1)
        b = torch.cat([b, torch.exp(log_q_tail).unsqueeze(-1)], -1)

    bins = _bin_terms(a, la, b, lb, term)
    if term.support == "generalized":  # SPEC 10.3: unnormalised measures, no outside term
        kappa = _generalized_slope(term)
        if kappa != 0.0:
            bins = bins + kappa * (b - a)  # padding: a = b = 0
    rows = bins.sum(-1)
    if term.support == "topk":
        u = 1.0 - Q
        if covered is not None:  # nothing outside the ids: u is exactly 0 (DECISIONS 20)
            u = torch.where(covered, 0.0, u)
        rows = rows + _topk_outside_term(u, term)
    else:  # DECISIONS 7: no valid entry -> exactly 0 (the tail bins, both 1, could round to 1e-16)
        rows = torch.where(valid.any(-1), rows, 0.0)
    if term.support == "sampled":  # SPEC 10.2: the rest of the vocab by one weighted sample
        rows = rows + _sampled_rows(sampled, term, clamp)
    return torch.where(undefined, float("nan"), rows)


def _terms_of(opts: Options):
    """The loss terms of ``opts`` (an Options built without ``terms``: its single loss)."""
    if opts.terms:
        return opts.terms
    return (Term(opts.loss, opts.support, 1.0, opts.beta, opts.rkl_ratio, opts.skew),)


def per_row_loss(s: torch.Tensor, teacher_logprobs: torch.Tensor, valid: torch.Tensor,
                 log_q_tail: torch.Tensor | None, opts: Options,
                 covered: torch.Tensor | None = None,
                 sampled: SampledEntry | None = None) -> torch.Tensor:
    """Per-row loss from the student log-probs of the teacher tokens (the SPEC's s_k).

    s, teacher_logprobs: [N, K] in the compute dtype; valid: [N, K] bool (entries that count;
    ``s`` and the log-probs are ignored elsewhere). log_q_tail: [N], log(1 - Q), needed when a
    term has support="tail" (taken as an input so that it can be computed without cancellation
    from the full softmax). covered: [N] bool or None, rows whose distinct valid ids are the whole
    vocab (DECISIONS 20). sampled: the rows' sampled tokens, needed when a term has
    support="sampled" (:func:`_sampled_entry`). No temperature / t2 / mask / reduction here.

    The loss is ``sum_i weight_i * L_i`` over ``opts.terms`` (SPEC 9.3), all from the same s, l,
    clamp and masks. A term of weight 0 is skipped, never computed (an infinite term times 0
    would be NaN); a term of weight 1 is not multiplied, so a one-term list is bitwise the plain
    call (DECISIONS 17).
    """
    rows = None
    for term in _terms_of(opts):
        if term.weight == 0.0:
            continue
        r = _term_rows(s, teacher_logprobs, valid, log_q_tail, term, opts.log_prob_min_clamp,
                       covered, sampled)
        if term.weight != 1.0:
            r = term.weight * r
        rows = r if rows is None else rows + r
    return torch.zeros_like(s[:, 0]) if rows is None else rows


def _covers_vocab(ids: torch.Tensor, valid: torch.Tensor, vocab: int) -> torch.Tensor | None:
    """[N] bool: the row's distinct valid ids are all V columns (issue 18, DECISIONS 20). Decided
    from the ids, never from the masses. None when K < V (no row can cover the vocab)."""
    if ids.shape[-1] < vocab:
        return None
    srt = torch.where(valid, ids, -1).sort(dim=-1).values
    new = torch.ones_like(srt, dtype=torch.bool)
    new[:, 1:] = srt[:, 1:] != srt[:, :-1]
    return ((srt >= 0) & new).sum(-1) == vocab


def _log_student_tail(logq: torch.Tensor, ids: torch.Tensor, valid: torch.Tensor,
                      s: torch.Tensor, covered: torch.Tensor | None = None) -> torch.Tensor:
    """log q_tail = log(1 - Q) per row, from the full-vocab student log-probs ``logq`` [N, V].

    1 - Q cancels catastrophically when Q -> 1 (and rounding can even make it negative), so when
    a row's valid ids are distinct it is computed as the log-sum-exp of the student log-probs of
    the tokens that are NOT teacher ids: the same number, a sum of non-negative terms.
    With duplicate ids (each counts in Q, DECISIONS 8) or no valid id the SPEC's 1 - Q is used
    as is (it may then be negative -> NaN, which is not papered over).
    A covered row (DECISIONS 20) has no such token: -inf, with a zero (not NaN) gradient.
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
    if covered is not None:  # the complement is empty: -inf as it is, whatever the duplicates
        dup = dup & ~covered
    s_sorted = s.gather(-1, order)[:, 1:]
    dup_mass = torch.where(repeat, torch.exp(torch.where(repeat, s_sorted, _NEG_INF)), 0.0).sum(-1)
    with_dup = (torch.exp(torch.where(dup, complement, 0.0)) - dup_mass).clamp_min(0.0)
    with_dup = torch.where(dup, with_dup, 1.0)  # unused branch: log(1) (finite gradient)
    return torch.where(dup, torch.log(with_dup), complement)


class _NaNGradWhereNotFinite(torch.autograd.Function):
    """``rows`` [N] -> the same values; in the backward, every row whose value is inf or NaN and
    that receives a nonzero gradient sends an all-NaN gradient row to the logits ``z`` [N, V]
    (DECISIONS 15): such a row has no usable gradient, and autograd alone would hand out an
    arbitrary mix of inf, NaN and finite numbers depending on how the formula is written. The
    NaN row is added to whatever else reaches ``z``, so every column of the row is NaN - a -inf
    logit's included - and good rows get 0 added."""

    @staticmethod
    def forward(ctx, rows, z):
        ctx.save_for_backward(~torch.isfinite(rows))
        ctx.z_shape = z.shape
        return rows.clone()

    @staticmethod
    def backward(ctx, grad):
        (bad,) = ctx.saved_tensors
        # A row that receives no gradient (masked, or left out by the caller) stays at 0.
        poisoned = bad & (grad != 0)
        grad_z = torch.zeros(ctx.z_shape, dtype=grad.dtype, device=grad.device)
        grad_z = grad_z.masked_fill(poisoned.unsqueeze(-1), float("nan"))
        return grad.masked_fill(poisoned, float("nan")), grad_z


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

def _process_group(tp_group):
    """A process group from a group or its registered name (as the kernel-backed API allows)."""
    if isinstance(tp_group, str):
        from torch.distributed.distributed_c10d import _resolve_process_group
        return _resolve_process_group(tp_group)
    return tp_group


def _topk_rows(z: torch.Tensor, k: int, temperature: float):
    """The student's own top-k of rows ``z`` [N, V] (full vocab, compute dtype): ``(ids int64,
    log-probs fp32)`` [N, k], no gradient (SPEC 9.4, DECISIONS 22).

    Ranked by the logits themselves: exact (no rounding can merge two different logits), and the
    same order as the exact log-probs z/T - LSE because T > 0. Equal logits keep the lower id
    first (a stable descending sort). The log-probs are log_softmax(z / T) at those ids, rounded
    to fp32 - non-increasing, possibly equal where the logits were not."""
    with torch.no_grad():
        order = torch.sort(z, dim=-1, descending=True, stable=True).indices[:, :k]
        logq = torch.log_softmax(z / temperature, dim=-1)
        return order, logq.gather(-1, order).float()


def student_topk(logits, k, *, temperature=1.0, tp_group=None, vocab_start=None):
    """The student's k most likely tokens at temperature T over the full vocab (SPEC 9.4).

    Returns ``(ids, logprobs)``, each ``[..., k]``: global ids (int64) and their log-probs
    log_softmax(z / T) (fp32; computed in fp64 for fp64 logits, else fp32), descending, equal
    logits broken by the lower id. No gradient. ``1 <= k <= V`` (V = the full vocab, all shards),
    else ``ValueError`` naming ``k``. With ``tp_group`` the logits are this rank's vocab shard;
    the shards are all-gathered and every rank returns the same result.
    """
    lead, n, v_local = validate_logits(logits)
    k = validate_k("k", k)
    temperature = validate_temperature(temperature)
    validate_vocab_start(tp_group, vocab_start)
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    z = logits.detach().reshape(n, v_local).to(dtype)
    if tp_group is not None:
        tp_group = _process_group(tp_group)
        # K = 0: the ranks' agreement on N and the shard layout is checked, not k.
        layout = resolve_layout(tp_group, n, 0, v_local, vocab_start, check_inputs=True,
                                device=logits.device)
        z = _GatherVocabShards.apply(z, layout, tp_group)
    check_k_fits("k", k, z.shape[-1])
    ids, logprobs = _topk_rows(z, k, temperature)
    return ids.reshape(*lead, k), logprobs.reshape(*lead, k)


def _with_nan_gradient_rows(rows: torch.Tensor, z: torch.Tensor):
    """``rows`` [N] whose non-finite rows get an all-NaN gradient row in ``z`` (DECISIONS 15):
    every column, a -inf logit's included, also where the inf / NaN came out of a branch that
    does not depend on the logits. (A masked row's value is the constant 0: never poisoned.)"""
    return _NaNGradWhereNotFinite.apply(rows, z)


@_layout.accepts_jagged  # SPEC 9.1: jagged nested tensors run on their packed values
def topk_distill_loss(logits, teacher_ids, teacher_logprobs, *, loss="fkl", support="topk",
                      beta=0.5, rkl_ratio=0.1, skew=0.1, temperature=1.0, t2_scale=False,
                      log_prob_min_clamp=None, mask=None, reduction="mean", tp_group=None,
                      vocab_start=None, inplace_backward=False, check_inputs=True, labels=None,
                      return_entropy=False, student_topk=None, missing_teacher="error",
                      label_teacher_logprobs=None, label_sample_logprobs=None,
                      sample_weight_clip=None) -> TopKDistillOutput:
    """Top-k distillation loss, pure PyTorch (SPEC.md sections 8 and 9; the oracle).

    Computes in float64 for float64 logits, else float32. Returns a TopKDistillOutput: the loss
    is in the compute dtype, the masses are fp32 without gradient (DECISIONS 11) and have the
    logits' leading shape, as does the loss for reduction="none".
    With ``tp_group`` the logits are this rank's vocab shard: the shards are all-gathered (a
    custom autograd Function whose backward is the local slice) and every rank computes the
    unsharded loss. ``inplace_backward`` is checked as in the kernel path (a leaf that requires
    grad, or a view of one, is a ValueError) and otherwise ignored (autograd allocates the
    gradient).

    ``loss``: a name, or a sequence of :class:`~topk_distill.Term` / ``(loss, support, weight)``
    tuples (per row ``sum_i weight_i * L_i``, SPEC 9.3); ``support`` / ``beta`` / ``rkl_ratio``
    / ``skew`` then stay at their defaults (or None). SPEC 9.2 / 9.4 / 9.5 (all per row, never reduced; ``t2_scale``
    applies to the loss only):
      * ``labels`` [...] -> ``label_logprobs`` = z_y / T - LSE (compute dtype, differentiable; 0
        for an ignored label < 0 or a masked row; NaN for a label >= V with check_inputs=False);
      * ``return_entropy`` -> ``entropy`` = -sum_v q_v log q_v (compute dtype, differentiable);
      * ``student_topk=k`` -> ``student_topk_ids`` / ``_logprobs`` [..., k] (:func:`student_topk`)
        and ``overlap_count`` (int64) / ``overlap_token_advantage`` (fp32), no gradient;
      * ``missing_teacher``: a NaN teacher log-prob is an error, or its entry is dropped (padding)
        or floored (``log_prob_min_clamp`` in the bins, out of ``teacher_mass``).
    SPEC 10.2, ``support="sampled"``: ``labels`` (y), ``label_teacher_logprobs`` (log p_y),
    optional ``label_sample_logprobs`` (log mu_y; default the student's own s_y, detached) and
    ``sample_weight_clip`` (w = min(1/mu_y, c/q_y)). SPEC 10.3, ``support="generalized"``.
    """
    args = validate_args(
        logits, teacher_ids, teacher_logprobs, loss=loss, support=support, beta=beta,
        rkl_ratio=rkl_ratio, skew=skew, temperature=temperature, t2_scale=t2_scale,
        log_prob_min_clamp=log_prob_min_clamp, mask=mask, reduction=reduction, tp_group=tp_group,
        vocab_start=vocab_start, inplace_backward=inplace_backward, check_inputs=check_inputs,
        labels=labels, return_entropy=return_entropy, student_topk=student_topk,
        missing_teacher=missing_teacher, label_teacher_logprobs=label_teacher_logprobs,
        label_sample_logprobs=label_sample_logprobs, sample_weight_clip=sample_weight_clip)
    # args has every Options field: read them off args itself, not its .options property -
    # dynamo of torch 2.9 cannot inline a property of a NamedTuple (a fullgraph graph break).
    opts, n, k, lead = args, args.n_rows, args.k, args.lead_shape
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32

    z = logits.reshape(n, args.local_vocab).to(dtype)
    ids = teacher_ids.reshape(n, k).long()
    l = teacher_logprobs.reshape(n, k).detach()  # teacher inputs are constants
    mask_rows = None if mask is None else mask.reshape(n)
    y = None if labels is None else labels.reshape(n).long()
    # The label's teacher / sampling log-probs (SPEC 10.2): constants, like the teacher's.
    l_y = (None if label_teacher_logprobs is None
           else label_teacher_logprobs.reshape(n).detach().to(dtype))
    log_mu = (None if label_sample_logprobs is None
              else label_sample_logprobs.reshape(n).detach().to(dtype))
    label_data = dict(label_teacher_logprobs=l_y, label_sample_logprobs=log_mu)
    if tp_group is not None:
        tp_group = _process_group(tp_group)
        # Always gathered (the oracle makes no shortcut): (N, K, V_r, start) and, with
        # check_inputs, the data-check facts, so that every rank raises alike.
        data = (data_flags(ids, l, mask_rows, labels=y, missing_teacher=opts.missing_teacher,
                           **label_data)
                if opts.check_inputs else None)
        layout = resolve_layout(tp_group, n, k, args.local_vocab, vocab_start, check_inputs=True,
                                device=logits.device, data=data)
        z = _GatherVocabShards.apply(z, layout, tp_group)
    elif opts.check_inputs:
        check_data(ids, l, args.local_vocab, mask_rows, labels=y,
                   missing_teacher=opts.missing_teacher, **label_data)
    vocab = z.shape[-1]
    if opts.student_topk is not None:
        check_k_fits("student_topk", opts.student_topk, vocab)

    l = l.to(dtype)
    counted = torch.ones(n, dtype=torch.bool, device=z.device) if mask_rows is None else mask_rows
    in_range = ids < vocab
    entry = (ids >= 0) & in_range & counted.unsqueeze(-1)  # entries that count
    bad_row = (~in_range).any(-1)  # ids >= V (check_inputs=False): entry ignored, row NaN
    # SPEC 9.5 / DECISIONS 21. "drop": the entry is padding. "floor": its teacher log-prob is
    # -inf - probability 0 in teacher_mass and in the tail / outside terms - and the required
    # clamp makes its bin log-prob max(-inf, c) = c. "error": a NaN stays NaN (check_inputs
    # raised, or the row is NaN).
    valid = entry
    if opts.missing_teacher != "error":
        missing = entry & torch.isnan(l)
        l = torch.where(missing, _NEG_INF, l)
        if opts.missing_teacher == "drop":
            valid = entry & ~missing

    # Student log-probs over the full vocab at temperature T (DECISIONS 12), then s_k. Masked
    # rows never enter the arithmetic (DECISIONS 10: gradient 0 even for non-finite logits).
    zc = z if mask_rows is None else torch.where(counted.unsqueeze(-1), z, 0.0)
    logq = torch.log_softmax(zc / opts.temperature, dim=-1)
    s = torch.where(valid, logq.gather(-1, torch.where(valid, ids, 0)), 0.0)
    covered = _covers_vocab(ids, valid, vocab)
    terms = [t for t in opts.terms if t.weight != 0.0]
    log_q_tail = (_log_student_tail(logq, ids, valid, s, covered)
                  if any(t.support == "tail" for t in terms) else None)

    sampled = None
    if any(t.support == "sampled" for t in terms):
        sampled = _sampled_entry(logq, y, ids, valid, counted, l_y, log_mu,
                                 opts.sample_weight_clip, opts.missing_teacher)
        # A label >= V (check_inputs=False) is never read: the row is NaN (SPEC 7).
        bad_row = bad_row | (y >= vocab)
    rows = per_row_loss(s, l, valid, log_q_tail, opts, covered, sampled)
    if opts.t2_scale:
        rows = rows * opts.temperature ** 2
    rows = torch.where(counted, rows, 0.0)  # masked rows: loss 0, gradient 0 (DECISIONS 10)
    rows = rows + torch.where(bad_row & counted, float("nan"), 0.0)
    rows = _with_nan_gradient_rows(rows, zc)

    with torch.no_grad():
        student_mass = torch.where(valid, s.exp(), 0.0).sum(-1).float()
        teacher_mass = torch.where(valid, l.exp(), 0.0).sum(-1).float()

    if opts.reduction == "none":
        out = rows.reshape(lead)
    elif opts.reduction == "sum":
        out = rows.sum()
    else:  # mean over counted rows; an empty or all-masked batch gives 0, not NaN
        out = rows.sum() / counted.sum().clamp_min(1).to(dtype)

    extra = {}
    if y is not None:  # SPEC 9.2, DECISIONS 18
        use = (y >= 0) & (y < vocab) & counted
        bad = (y >= vocab) & counted  # only with check_inputs=False: NaN, never read
        lab = logq.gather(-1, torch.where(use, y, 0).unsqueeze(-1)).squeeze(-1)
        lab = torch.where(use, lab, 0.0) + torch.where(bad, float("nan"), 0.0)
        extra["label_logprobs"] = _with_nan_gradient_rows(lab, zc).reshape(lead)
    if opts.return_entropy:  # SPEC 9.2: -sum q log q, with 0 log 0 = 0 (and a finite gradient)
        q = torch.exp(logq)
        zero = q == 0
        ent = -torch.where(zero, 0.0, q * torch.where(zero, 0.0, logq)).sum(-1)
        ent = torch.where(counted, ent, 0.0)
        extra["entropy"] = _with_nan_gradient_rows(ent, zc).reshape(lead)
    if opts.student_topk is not None:  # SPEC 9.4, DECISIONS 22, 23
        kk = opts.student_topk
        top_ids, top_lp = _topk_rows(z.detach(), kk, opts.temperature)  # every row, mask or not
        with torch.no_grad():
            overlap = (ids.unsqueeze(-1) == top_ids.unsqueeze(-2)).any(-1) & valid
            count = overlap.sum(-1)
            c = opts.log_prob_min_clamp
            lp_, sp_ = (l, s) if c is None else (_clamp_min(l, c), _clamp_min(s, c))
            # -exp(l') (l' - s') with 0 * (-inf) = 0 (a teacher probability of 0 adds 0).
            adv = -_xlog_ratio(torch.exp(lp_), lp_, sp_)
            adv = torch.where(overlap, adv, 0.0).sum(-1) / count.clamp_min(1).to(dtype)
            adv = torch.where(count > 0, adv, 0.0)
        extra.update(student_topk_ids=top_ids.reshape(*lead, kk),
                     student_topk_logprobs=top_lp.reshape(*lead, kk),
                     overlap_count=count.reshape(lead),
                     overlap_token_advantage=adv.float().reshape(lead))
    return TopKDistillOutput(out, student_mass.reshape(lead), teacher_mass.reshape(lead), **extra)


def lm_head_logits(hidden, weight, bias=None, *, logit_scale=1.0, final_logit_softcapping=None):
    """The LM head's logits as the fused loss defines them: ``raw = hidden @ weight.T + bias``,
    then ``logit_scale * raw`` and, with a softcap ``cap``, ``cap * tanh(logit_scale * raw / cap)``
    (Cohere's scale, Gemma's final softcap; TRL's chunked loss applies them in this order).
    Plain autograd, in the inputs' dtype."""
    z = hidden @ weight.T
    if bias is not None:
        z = z + bias
    if logit_scale != 1.0:
        z = z * logit_scale
    if final_logit_softcapping is not None:
        z = final_logit_softcapping * torch.tanh(z / final_logit_softcapping)
    return z


def fused_linear_topk_distill_loss(hidden, weight, teacher_ids, teacher_logprobs, *, bias=None,
                                   chunk_size=None, weight_grad_fp32=False, logit_scale=1.0,
                                   final_logit_softcapping=None, **kwargs) -> TopKDistillOutput:
    """The oracle of :func:`topk_distill.fused_linear_topk_distill_loss`: :func:`topk_distill_loss`
    on the materialised :func:`lm_head_logits` (autograd through the head). ``chunk_size`` and
    ``weight_grad_fp32`` only change how the fused path computes, and are ignored here."""
    del chunk_size, weight_grad_fp32
    z = lm_head_logits(hidden, weight, bias, logit_scale=logit_scale,
                       final_logit_softcapping=final_logit_softcapping)
    return topk_distill_loss(z, teacher_ids, teacher_logprobs, **kwargs)
