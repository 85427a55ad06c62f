"""The public API: ``topk_distill_loss``, its ``nn.Module`` twin ``TopKDistillLoss`` and
``student_topk``.

One call = shard pass (kernel) -> TP collectives (only with ``tp_group``) -> epilogue (kernel)
-> reduction (torch). The backward is one kernel with no communication. See docs/SPEC.md.

Layouts (SPEC 9.1): the logits go to the kernels as a view - ``[N, V_r]``, or ``[B, T, V_r]``
with any two leading strides (``logits[:, :-1]``, ``[1, total, V]``, transposed leading dims) -
and are copied only when their leading dims need three or more strides
(``topk_distill._layout.fold_rows``). Jagged nested tensors are computed on their packed values
and per-token outputs come back jagged with the same offsets (``_layout.call_on_packed``).
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from . import _layout, _nvtx, _validate, ops, parallel
from ._types import TopKDistillOutput
from ._validate import UNSET

__all__ = ["topk_distill_loss", "TopKDistillLoss", "TopKDistillOutput", "student_topk"]


class _Config(NamedTuple):
    """The non-tensor arguments of one call (constants for torch.compile)."""

    group_name: Optional[str]
    vocab_start: int
    vocab_size: int
    inv_temperature: float
    terms: Tuple[Tuple[str, str, float, float, float, float], ...]  # td.Term fields
    log_prob_min_clamp: Optional[float]
    loss_scale: float
    with_entropy: bool
    topk: int  # the student's own top-k (0: not asked for)
    inplace_backward: bool
    sampled: bool = False  # a term of nonzero weight has support="sampled" (SPEC 10.2)
    sample_weight_clip: Optional[float] = None
    drop_missing_label: bool = False  # missing_teacher="drop": a NaN label teacher log-prob


def _shard_stats(logits, teacher_ids, labels, cfg: _Config):
    """Shard pass, then (with a group) the collectives: the global row statistics, and the
    student's top-k of the whole vocab when asked for."""
    with _nvtx.nvtx_range("shard_pass"):
        row_max, sums, gathered, top_v, top_i = ops.shard_pass(
            logits, teacher_ids, cfg.vocab_start, cfg.inv_temperature, labels, cfg.with_entropy,
            cfg.topk)
    if cfg.group_name is not None:
        with _nvtx.nvtx_range("collectives"):
            row_max, sums, gathered = parallel.combine_shard_stats(
                row_max, sums, gathered, cfg.group_name, cfg.with_entropy)
            if cfg.topk > 0:
                top_v, top_i = parallel.merge_topk(top_v, top_i, cfg.group_name)
    return row_max, sums, gathered, top_v, top_i


def _topk_logprobs(top_v, row_max, log_sum, inv_temperature):
    """log q of the selected raw logits: (z / T - M) - log_sum, as the kernels form s_k; fp32."""
    x = (top_v * inv_temperature).double()
    return ((x - row_max.double().unsqueeze(1)) - log_sum.unsqueeze(1)).float()


def _overlap(teacher_ids, teacher_logprobs, gathered, mask, top_ids, row_max, log_sum,
             vocab_size, clamp):
    """verl's overlap diagnostics (SPEC 9.4, DECISIONS 23): per row the number of valid teacher
    entries whose id is among the student's top-k, and the mean over those entries of
    -exp(l') (l' - s') (clamped bin log-probs; 0 when there are none). float64 inside."""
    k = teacher_ids.shape[1]
    ids = teacher_ids.long()
    valid = (ids >= 0) & (ids < vocab_size)
    if mask is not None:
        valid = valid & mask.unsqueeze(1)
    sorted_top = torch.sort(top_ids, dim=1).values
    pos = torch.searchsorted(sorted_top, ids).clamp_max(sorted_top.shape[1] - 1)
    hit = (sorted_top.gather(1, pos) == ids) & valid
    count = hit.sum(1)
    s = (gathered[:, :k].double() - row_max.double().unsqueeze(1)) - log_sum.unsqueeze(1)
    lp = teacher_logprobs.double()
    if clamp is not None:
        lp, s = torch.where(lp < clamp, clamp, lp), torch.where(s < clamp, clamp, s)
    p = torch.exp(lp)
    use = hit & (p > 0)  # 0 * (-inf) = 0: a teacher probability of 0 adds 0
    adv = torch.where(use, -p * (torch.where(use, lp, 0.0) - torch.where(use, s, 0.0)), 0.0)
    adv = adv.sum(1) / count.clamp_min(1).double()
    return count, torch.where(count > 0, adv, 0.0).float()


class _TopKDistillFunction(torch.autograd.Function):
    """logits (a [N, V_r] or [B, T, V_r] view) -> per-row (loss, student_mass, teacher_mass,
    label_logprobs, entropy) and the student top-k outputs.

    Saves the logits (no copy), row max [N], the per-row coefficients [N, 6] and g = dL/ds [N, K];
    allocates nothing of size [N, V_r] in the forward. The backward is one kernel that combines
    the upstream gradients of the loss, label_logprobs and entropy.
    """

    @staticmethod
    def forward(ctx, logits, teacher_ids, teacher_logprobs, mask, labels, label_teacher_logprobs,
                label_sample_logprobs, cfg: _Config):
        row_max, sums, gathered, top_v, top_i = _shard_stats(logits, teacher_ids, labels, cfg)
        with _nvtx.nvtx_range("epilogue"):
            loss_rows, student_mass, teacher_mass, label_lp, entropy, row_coefs, g = _epilogue(
                row_max, sums, gathered, teacher_ids, teacher_logprobs, mask, labels,
                label_teacher_logprobs, label_sample_logprobs, cfg)
        ctx.save_for_backward(logits, teacher_ids, labels, row_max, row_coefs, g)
        ctx.cfg = cfg
        ctx.backend = ops.backend()  # the backward runs where the forward ran (ops._ops)
        ctx.set_materialize_grads(False)  # an output nobody uses brings None, not zeros
        ctx.mark_non_differentiable(student_mass, teacher_mass)
        if cfg.topk == 0:
            return loss_rows, student_mass, teacher_mass, label_lp, entropy, None, None, None, None
        log_sum = row_coefs[:, 0]
        top_lp = _topk_logprobs(top_v, row_max, log_sum, cfg.inv_temperature)
        count, adv = _overlap(teacher_ids, teacher_logprobs, gathered, mask, top_i, row_max,
                              log_sum, cfg.vocab_size, cfg.log_prob_min_clamp)
        ctx.mark_non_differentiable(top_i, top_lp, count, adv)
        return loss_rows, student_mass, teacher_mass, label_lp, entropy, top_i, top_lp, count, adv

    @staticmethod
    def backward(ctx, grad_loss, _gsm, _gtm, grad_label, grad_entropy, *_topk):
        logits, teacher_ids, labels, row_max, row_coefs, g = ctx.saved_tensors
        cfg = ctx.cfg
        acc = row_max.dtype
        grad_rows = (torch.zeros_like(row_max) if grad_loss is None
                     else grad_loss.to(acc).contiguous())
        if grad_label is not None:
            grad_label = grad_label.to(acc).contiguous() if labels is not None else None
        grad_label = _with_sampled_gradient(grad_label, grad_rows, row_coefs, cfg)
        if grad_entropy is not None:
            grad_entropy = grad_entropy.to(acc).contiguous() if cfg.with_entropy else None
        args = (teacher_ids, row_max, row_coefs, g, grad_rows, cfg.vocab_start,
                cfg.inv_temperature, labels, grad_label, grad_entropy)
        with _nvtx.nvtx_range("backward"):
            if cfg.inplace_backward:
                ops.backward_(logits, *args, backend=ctx.backend)
                # A C++ op's Tensor(a!) write does not bump the version counter by itself: do it,
                # so that any other node that saved these logits raises autograd's "modified by an
                # inplace operation" error instead of silently reading a gradient.
                if not torch.compiler.is_compiling():
                    torch.autograd.graph.increment_version(logits)
                grad_logits = logits
            else:
                grad_logits = ops.backward(logits, *args, backend=ctx.backend)
        return grad_logits, None, None, None, None, None, None, None


def _epilogue(row_max, sums, gathered, teacher_ids, teacher_logprobs, mask, labels,
              label_teacher_logprobs, label_sample_logprobs, cfg: _Config):
    """The epilogue op with the call's configuration (shared with the fused LM head)."""
    return ops.epilogue(
        row_max, sums, gathered, teacher_ids, teacher_logprobs, mask, cfg.vocab_size, cfg.terms,
        cfg.log_prob_min_clamp, cfg.loss_scale, labels, cfg.with_entropy,
        label_teacher_logprobs if cfg.sampled else None,
        label_sample_logprobs if cfg.sampled else None, cfg.sample_weight_clip,
        cfg.drop_missing_label)


def _with_sampled_gradient(grad_label, grad_rows, row_coefs, cfg: _Config):
    """The sampled support's entry reaches the logits through the label's column (SPEC 10.2):
    its dL/ds_y (row_coefs[:, 6]) times the loss's upstream gradient is added to the label's
    upstream gradient; the backward kernel's ``gy ([v == y] - q_v)`` is then exactly its term.
    A row with no loss gradient adds nothing (never 0 * inf)."""
    if not cfg.sampled:
        return grad_label
    extra = torch.where(grad_rows != 0, grad_rows * row_coefs[:, 6].to(grad_rows.dtype), 0.0)
    return extra if grad_label is None else grad_label + extra


def _logits_rows(logits: Tensor, v_local: int) -> Tensor:
    """The logits as the kernels take them: a 2-D or 3-D view (no copy) when the leading dims
    fold into at most two strides, else a contiguous [N, V_r] copy (SPEC 9.1)."""
    rows = _layout.fold_rows(logits)
    return rows if rows is not None else logits.reshape(-1, v_local).contiguous()


def _after_layout(opts, ids2d, lp2d, group_name, start, vocab_size, *, inplace_backward):
    """Once the full vocab size is known (shared with the fused LM head): ``student_topk <= V``,
    the ``missing_teacher`` mode applied to the teacher tensors (SPEC 9.5), and the call's
    _Config. Returns (ids2d, lp2d, cfg). (The label's teacher log-prob of the sampled support:
    :func:`_label_teacher_logprobs`.)"""
    if opts.student_topk is not None:
        _validate.check_k_fits("student_topk", opts.student_topk, vocab_size)
    if opts.missing_teacher == "drop":  # the entry is padding (an id >= V still poisons its row)
        ids2d = torch.where(torch.isnan(lp2d) & (ids2d < vocab_size), -1, ids2d)
    elif opts.missing_teacher == "floor":  # probability 0; the clamp lifts its bin to c
        lp2d = torch.where(torch.isnan(lp2d), float("-inf"), lp2d)
    terms = tuple((t.loss, t.support, float(t.weight), float(t.beta), float(t.rkl_ratio),
                   float(t.skew)) for t in opts.terms)
    cfg = _Config(group_name, start, vocab_size, 1.0 / opts.temperature, terms,
                  opts.log_prob_min_clamp, opts.temperature ** 2 if opts.t2_scale else 1.0,
                  opts.return_entropy, opts.student_topk or 0, inplace_backward,
                  _validate.has_sampled(opts.terms), opts.sample_weight_clip,
                  opts.missing_teacher == "drop")
    return ids2d, lp2d, cfg


def _label_teacher_logprobs(opts, label_teacher_logprobs):
    """``missing_teacher`` applied to the sampled token's teacher log-prob (SPEC 10.2 / 9.5):
    "floor" makes a NaN -inf (the clamp lifts the bin to c); "drop" is the kernel's
    drop_missing_label (the entry is skipped, label_logprobs stays); "error" keeps NaN."""
    if label_teacher_logprobs is None or opts.missing_teacher != "floor":
        return label_teacher_logprobs
    return torch.where(torch.isnan(label_teacher_logprobs), float("-inf"), label_teacher_logprobs)


@_layout.accepts_jagged  # SPEC 9.1: jagged nested tensors run on their packed values
def topk_distill_loss(
    logits: Tensor,
    teacher_ids: Tensor,
    teacher_logprobs: Tensor,
    *,
    loss="fkl",
    support=UNSET,
    beta=UNSET,
    rkl_ratio=UNSET,
    skew=UNSET,
    temperature: float = 1.0,
    t2_scale: bool = False,
    log_prob_min_clamp: Optional[float] = None,
    mask: Optional[Tensor] = None,
    reduction: str = "mean",
    tp_group: Union[None, str, "torch.distributed.ProcessGroup"] = None,
    vocab_start: Optional[int] = None,
    inplace_backward: bool = False,
    check_inputs: bool = True,
    labels: Optional[Tensor] = None,
    return_entropy: bool = False,
    student_topk: Optional[int] = None,
    missing_teacher: str = "error",
    label_teacher_logprobs: Optional[Tensor] = None,
    label_sample_logprobs: Optional[Tensor] = None,
    sample_weight_clip: Optional[float] = None,
) -> TopKDistillOutput:
    """Distillation loss between student logits and a top-k teacher (docs/SPEC.md).

    Args:
        logits: ``[..., V_r]`` student logits (this rank's vocab shard under TP), fp32, bf16,
            fp16, or fp64; any view whose leading dims fold into two strides is used in place
            (``logits[:, :-1]``); a jagged nested tensor ``[B, j, V_r]`` is accepted too.
        teacher_ids: ``[..., K]`` global vocab ids (int32/int64); negative ids are padding.
        teacher_logprobs: ``[..., K]`` teacher log-probs over the full vocab; ``-inf`` allowed.
        loss: ``fkl | rkl | jsd | fkl+rkl | tvd | skl | srkl``, or a list of ``td.Term`` /
            ``(loss, support, weight)`` tuples: the per-row loss is ``sum_i weight_i * L_i``, one
            pass over the logits (SPEC 9.3).
        support: ``topk | renorm | tail | sampled | generalized`` (default ``topk``) - which bins
            the divergence compares (SPEC 3; ``sampled`` 10.2, ``generalized`` 10.3).
        beta, rkl_ratio, skew: the JSD weight, the fkl+rkl mix, the skew-KL lambda (in [0, 1];
            defaults 0.5, 0.1, 0.1). Not beside a term list (each term has its own).
        temperature: divides the student logits; ``t2_scale`` multiplies the loss by T^2.
        log_prob_min_clamp: clamp both sides' log-probs in the K bins (verl semantics).
        mask: ``[...]`` bool, rows that count.
        reduction: ``mean`` (over counted rows) | ``sum`` | ``none`` (per row).
        tp_group: process group (or its name) over which the vocab is sharded; ``vocab_start``
            is this rank's first column (default: the sum of the lower ranks' shard widths).
            Teacher tensors, mask and labels are replicated. Forward: two collectives (all_reduce
            MAX of [N], all_reduce SUM of [N, 5 + K (+1)]), plus one all_gather of the top-k with
            ``student_topk``; backward: none (docs/TP.md).
        inplace_backward: write the gradient into the logits' storage (they must be an
            intermediate not needed after the backward; misuse raises autograd's in-place error).
            ValueError for logits that are a leaf requiring grad (an ``nn.Parameter``) or a view
            of one, and for logits whose rows overlap in memory.
        check_inputs: also check the data (ids and labels < V, teacher log-probs <= 0 and, with
            ``missing_teacher="error"``, not NaN); costs one host sync on CUDA. ``False`` for CUDA
            graphs / no syncs. With ``tp_group`` it also makes one small all_gather so that ranks
            disagreeing on N or K all raise ``ValueError``.
        labels: ``[...]`` int ids (negative = ignored) -> ``label_logprobs = z_y / T - LSE`` per
            row, differentiable (SPEC 9.2).
        return_entropy: -> ``entropy = -sum_v q_v log q_v`` per row, differentiable.
        student_topk: ``k`` -> the student's own top-k ids / log-probs and verl's overlap
            diagnostics ``overlap_count`` / ``overlap_token_advantage`` (SPEC 9.4).
        missing_teacher: ``error | drop | floor`` - what a NaN teacher log-prob means (SPEC 9.5).
        label_teacher_logprobs: ``[...]`` the teacher's log-prob of each row's label, log p_y;
            required by ``support="sampled"`` (with ``labels``, the sampled tokens): the rest of
            the vocab is estimated without bias by that one importance-weighted token.
        label_sample_logprobs: ``[...]`` log mu_y, the log-prob of y under the distribution it
            was drawn from (e.g. the rollout policy); default the student's own s_y, detached.
        sample_weight_clip: ``c > 0``: the importance weight becomes ``min(1/mu_y, c/q_y)``.

    Returns:
        ``TopKDistillOutput``; read the fields by name (the ones not asked for are ``None``).
    """
    args = _validate.validate_args(
        logits, teacher_ids, teacher_logprobs, loss=loss, support=support, beta=beta,
        rkl_ratio=rkl_ratio, skew=skew, temperature=temperature, t2_scale=t2_scale,
        log_prob_min_clamp=log_prob_min_clamp, mask=mask, reduction=reduction,
        tp_group=tp_group, vocab_start=vocab_start, inplace_backward=inplace_backward,
        check_inputs=check_inputs, labels=labels, return_entropy=return_entropy,
        student_topk=student_topk, missing_teacher=missing_teacher,
        label_teacher_logprobs=label_teacher_logprobs,
        label_sample_logprobs=label_sample_logprobs, sample_weight_clip=sample_weight_clip)
    lead, n, v_local, k = args.lead_shape, args.n_rows, args.local_vocab, args.k

    rows = _logits_rows(logits, v_local)
    if args.inplace_backward and _layout.rows_overlap(rows):
        raise ValueError("inplace_backward=True: the rows of logits overlap in memory (e.g. an "
                         "expand, stride 0), so their gradients cannot be written into them; pass "
                         "logits.contiguous() or inplace_backward=False")
    ids2d = teacher_ids.reshape(n, k).contiguous()
    lp2d = teacher_logprobs.detach().reshape(n, k).contiguous()
    mask1d = None if mask is None else mask.reshape(n).contiguous()
    labels1d = None if labels is None else labels.reshape(n).contiguous()
    label_lps = _label_rows(n, label_teacher_logprobs, label_sample_logprobs)

    group_name, start, vocab_size = parallel.layout_and_checks(
        tp_group, n, k, v_local, vocab_start, ids2d, lp2d, mask1d, check_inputs=check_inputs,
        device=logits.device, labels=labels1d, missing_teacher=args.missing_teacher,
        label_logprobs=label_lps)
    ids2d, lp2d, cfg = _after_layout(args, ids2d, lp2d, group_name, start, vocab_size,
                                     inplace_backward=args.inplace_backward)
    (loss_rows, student_mass, teacher_mass, label_lp, entropy, top_ids, top_lp, count,
     adv) = _TopKDistillFunction.apply(rows, ids2d, lp2d, mask1d, labels1d,
                                       _label_teacher_logprobs(args, label_lps[0]),
                                       label_lps[1], cfg)

    if args.reduction == "none":
        out_loss = loss_rows.view(lead)
    elif args.reduction == "sum":
        out_loss = loss_rows.sum()
    else:
        count_rows = n if mask1d is None else mask1d.sum()
        out_loss = loss_rows.sum() / (count_rows.clamp_min(1) if torch.is_tensor(count_rows)
                                      else max(count_rows, 1))
    return _output(out_loss, lead, student_mass, teacher_mass,
                   label_logprobs=label_lp if labels is not None else None,
                   entropy=entropy if args.return_entropy else None,
                   topk=(top_ids, top_lp, count, adv) if args.student_topk is not None else None)


def _label_rows(n, label_teacher_logprobs, label_sample_logprobs):
    """The sampled support's per-row label log-probs as detached [N] tensors (or None): teacher
    and sampling log-probs are constants."""
    return tuple(None if t is None else t.detach().reshape(n)
                 for t in (label_teacher_logprobs, label_sample_logprobs))


def _output(loss, lead, student_mass, teacher_mass, *, label_logprobs=None, entropy=None,
            topk=None) -> TopKDistillOutput:
    """The output with every per-row tensor viewed as ``lead`` (the logits' leading shape); an
    output not asked for is None. ``topk``: the rows' (ids [N, k], log-probs [N, k],
    overlap_count [N], overlap_token_advantage [N]) or None. Shared with the fused LM head."""
    extra = {}
    if label_logprobs is not None:
        extra["label_logprobs"] = label_logprobs.view(lead)
    if entropy is not None:
        extra["entropy"] = entropy.view(lead)
    if topk is not None:
        ids, logprobs, count, advantage = topk
        k = ids.shape[-1]
        extra.update(student_topk_ids=ids.view(*lead, k),
                     student_topk_logprobs=logprobs.view(*lead, k),
                     overlap_count=count.view(lead), overlap_token_advantage=advantage.view(lead))
    return TopKDistillOutput(loss, student_mass.view(lead), teacher_mass.view(lead), **extra)


def student_topk(logits: Tensor, k: int, *, temperature: float = 1.0, tp_group=None,
                 vocab_start: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    """The student's ``k`` most likely tokens at temperature T over the full vocab (SPEC 9.4).

    Returns ``(ids, logprobs)``, each ``[..., k]``: global ids (int64) and their log-probs
    (fp32), descending, equal logits broken by the lower id (DECISIONS 22). No gradient.
    ``1 <= k <= V`` (the full vocab, all shards) else ``ValueError``. With ``tp_group`` the
    logits are this rank's vocab shard; every rank returns the same result (two all-reduces for
    the log-sum-exp, one all_gather of the k (value, id) pairs per row). A jagged nested tensor
    ``[B, j, V_r]`` gives jagged ``[B, j, k]`` results. The CPU kernel selects inside its one pass
    over the logits; on CUDA the selection is a separate exact pass (docs/STUDENT_TOPK.md).
    """
    if _layout.is_jagged(logits):
        values = _layout.jagged_values(logits)
        ids, lp = student_topk(values, k, temperature=temperature, tp_group=tp_group,
                               vocab_start=vocab_start)
        return _layout.repack_jagged(ids, logits), _layout.repack_jagged(lp, logits)
    lead, n, v_local = _validate.validate_logits(logits)
    k = _validate.validate_k("k", k)
    temperature = _validate.validate_temperature(temperature)
    _validate.validate_vocab_start(tp_group, vocab_start)
    if tp_group is None:
        group_name, start, vocab_size = None, 0, v_local
    else:
        group_name = parallel.group_name_of(tp_group)
        start, vocab_size = parallel.vocab_layout(group_name, n, 0, v_local, vocab_start,
                                                  check_inputs=True, device=logits.device)
    _validate.check_k_fits("k", k, vocab_size)
    rows = _logits_rows(logits.detach(), v_local)
    no_ids = torch.empty((n, 0), dtype=torch.int64, device=logits.device)
    cfg = _Config(group_name, start, vocab_size, 1.0 / temperature, (), None, 1.0, False, k,
                  False)
    with torch.no_grad():
        row_max, sums, _, top_v, top_i = _shard_stats(rows, no_ids, None, cfg)
        log_sum = torch.log(sums[:, 0].double() + sums[:, 1].double())  # as the epilogue
        top_lp = _topk_logprobs(top_v, row_max, log_sum, cfg.inv_temperature)
    return top_i.view(*lead, k), top_lp.view(*lead, k)


class TopKDistillLoss(nn.Module):
    """``nn.Module`` form of :func:`topk_distill_loss`; keywords fixed at construction.

    ``crit = TopKDistillLoss(loss="jsd", beta=0.5, tp_group=group)``
    ``out = crit(logits, teacher_ids, teacher_logprobs, mask=mask, labels=labels)``
    """

    def __init__(self, *, loss="fkl", support=UNSET, beta=UNSET, rkl_ratio=UNSET, skew=UNSET,
                 temperature: float = 1.0, t2_scale: bool = False,
                 log_prob_min_clamp: Optional[float] = None, reduction: str = "mean",
                 tp_group=None, vocab_start: Optional[int] = None,
                 inplace_backward: bool = False, check_inputs: bool = True,
                 return_entropy: bool = False, student_topk: Optional[int] = None,
                 missing_teacher: str = "error", sample_weight_clip: Optional[float] = None):
        super().__init__()
        self.kwargs = dict(loss=loss, support=support, beta=beta, rkl_ratio=rkl_ratio, skew=skew,
                           temperature=temperature, t2_scale=t2_scale,
                           log_prob_min_clamp=log_prob_min_clamp, reduction=reduction,
                           tp_group=tp_group, vocab_start=vocab_start,
                           inplace_backward=inplace_backward, check_inputs=check_inputs,
                           return_entropy=return_entropy, student_topk=student_topk,
                           missing_teacher=missing_teacher, sample_weight_clip=sample_weight_clip)
        # Fail at construction, not at the first step.
        _validate.validate_options(**{k: v for k, v in self.kwargs.items()
                                      if k not in ("tp_group", "vocab_start")})

    def forward(self, logits: Tensor, teacher_ids: Tensor, teacher_logprobs: Tensor,
                mask: Optional[Tensor] = None, labels: Optional[Tensor] = None,
                label_teacher_logprobs: Optional[Tensor] = None,
                label_sample_logprobs: Optional[Tensor] = None) -> TopKDistillOutput:
        return topk_distill_loss(logits, teacher_ids, teacher_logprobs, mask=mask, labels=labels,
                                 label_teacher_logprobs=label_teacher_logprobs,
                                 label_sample_logprobs=label_sample_logprobs, **self.kwargs)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items()
                         if k != "tp_group" and v is not UNSET)
