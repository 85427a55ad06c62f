"""Float64 torch references of the v2 ops, written from their contract (csrc/registration.cpp),
independently of every kernel: what ``shard_pass``, ``epilogue`` and ``backward`` must return.

    shard_pass_ref(logits, teacher_ids, labels, vocab_start, inv_temperature, with_entropy, topk)
    epilogue_ref(row_max, sums, gathered, teacher_ids, teacher_logprobs, mask, labels, vocab_size,
                 loss, support, weight, beta, rkl_ratio, skew, log_prob_min_clamp, loss_scale,
                 with_entropy)
    backward_ref(logits, teacher_ids, labels, row_max, row_coefs, grad_logprobs, grad_rows,
                 grad_label, grad_entropy, vocab_start, inv_temperature)

Same arguments and output order as the ops (tensors on any device; results are float64 CPU
tensors, int64 for ids), dense and simple: [N, V] at a time, for test sizes.

Where the contract leaves an edge to the kernels, the reference follows them and says so:
  * an all -inf row (row_max -inf): e_v of a -inf logit is 0 in ``rest`` and the entropy sum
    (probability 0), while ``teach`` / ``dup`` are exp(x_k - row_max) literally, NaN there;
  * a NaN logit: row_max NaN, and every sum that has a term NaN (rest always, teach / dup when
    the row has such entries, the entropy sum with with_entropy); the distinct-column count and
    the gathered values stay as they are (the CPU kernel's reading of "the sums NaN");
  * the epilogue's ``g`` / ``dense_coef`` / ``outside_coef`` are a decomposition of dL/ds and
    dL/du (u = 1 - Q); epilogue_ref returns instead the full derivative g_full = dL/ds_k (through
    Q too) and dL/du, and :func:`check_epilogue_decomposition` checks the kernel's three against
    them: g_k - outside q_k = g_full_k, dense - outside = sum g_full, outside = dL/du.
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import torch

from topk_distill import reference as R
from topk_distill._types import Term

F64 = torch.float64
NEG_INF = float("-inf")
NAN = float("nan")


def rows_of(logits: torch.Tensor) -> torch.Tensor:
    """[N, V] float64 copy of [N, V] / [B, T, V] logits (any strides)."""
    v = logits.shape[-1]
    return logits.detach().to(device="cpu", dtype=F64).reshape(-1, v)


def _acc(logits: torch.Tensor) -> torch.dtype:
    return F64 if logits.dtype == F64 else torch.float32


# --------------------------------------------------------------------------------- shard_pass

def shard_pass_ref(logits, teacher_ids, labels, vocab_start, inv_temperature, with_entropy, topk,
                   row_max=None):
    """``row_max`` (optional): the sums relative to this max instead of the exact one (a kernel's
    fp32 max is the exact one rounded; at |z| ~ 1e4 that half ulp moves every sum by ~1e-4)."""
    z = rows_of(logits)
    n, v = z.shape
    ids = teacher_ids.detach().cpu().long().reshape(n, -1)
    k = ids.shape[1]
    zs = z * inv_temperature
    nan_row = torch.isnan(z).any(-1)
    m = zs.max(-1).values if v > 0 else torch.full((n,), NEG_INF, dtype=F64)
    m = torch.where(nan_row, NAN, m)
    m_out = m
    if row_max is not None:
        m = torch.where(nan_row, NAN, row_max.detach().cpu().to(F64))
    col = ids - vocab_start
    inshard = (ids >= 0) & (col >= 0) & (col < v)
    colc = torch.where(inshard, col, 0)
    x = torch.where(inshard, zs.gather(-1, colc), 0.0)
    # distinct in-shard columns, and how many entries each has
    mult = torch.zeros(n, v, dtype=F64)
    mult.scatter_add_(-1, colc, inshard.to(F64))
    marked = mult > 0
    e = torch.where(torch.isneginf(zs), 0.0, torch.exp(zs - m.unsqueeze(-1)))
    rest = torch.where(marked, 0.0, e).sum(-1)
    ex = torch.exp(x - m.unsqueeze(-1))  # literally (NaN for -inf - -inf)
    # first copy of each id = its lowest k
    first = torch.ones(n, k, dtype=torch.bool)
    for j in range(1, k):
        first[:, j] = ~((ids[:, :j] == ids[:, j:j + 1]) & inshard[:, :j]).any(-1)
    teach = torch.where(inshard & first, ex, 0.0).sum(-1)
    dup = torch.where(inshard & ~first, ex, 0.0).sum(-1)
    count = marked.sum(-1).to(F64)
    if with_entropy:
        t = zs - m.unsqueeze(-1)
        ent = torch.where(e == 0, 0.0, e * torch.where(e == 0, 0.0, t)).sum(-1)  # NaN stays
    else:
        ent = torch.zeros(n, dtype=F64)
    # A NaN logit: every e_v relative to the NaN max is NaN - rest and (with_entropy) the entropy
    # sum are NaN, teach / dup are NaN where they have a term and 0 where they have none; the
    # count of distinct columns does not depend on the logits.
    nan_sums = torch.stack([
        torch.full((n,), NAN, dtype=F64),
        torch.where((inshard & first).any(-1), NAN, 0.0),
        torch.where((inshard & ~first).any(-1), NAN, 0.0),
        count,
        torch.full((n,), NAN if with_entropy else 0.0, dtype=F64)], -1)
    sums = torch.stack([rest, teach, dup, count, ent], -1)
    sums = torch.where(nan_row.unsqueeze(-1), nan_sums, sums)
    if labels is not None:
        y = labels.detach().cpu().long().reshape(n) - vocab_start
        ok = (labels.detach().cpu().long().reshape(n) >= 0) & (y >= 0) & (y < v)
        xl = torch.where(ok, zs.gather(-1, torch.where(ok, y, 0).unsqueeze(-1)).squeeze(-1), 0.0)
        x = torch.cat([x, xl.unsqueeze(-1)], -1)
    kk = min(topk, v)
    tv = torch.full((n, topk), NEG_INF, dtype=F64)
    ti = torch.full((n, topk), -1, dtype=torch.long)
    if kk > 0:
        order = torch.sort(z, dim=-1, descending=True, stable=True).indices[:, :kk]
        tv[:, :kk] = z.gather(-1, order)
        ti[:, :kk] = order + vocab_start
    return m_out, sums, x, tv, ti


# --------------------------------------------------------------------------------- epilogue

def _terms(loss, support, weight, beta, rkl_ratio, skew):
    return tuple(Term(*t) for t in zip(loss, support, weight, beta, rkl_ratio, skew))


def epilogue_ref(row_max, sums, gathered, teacher_ids, teacher_logprobs, mask, labels, vocab_size,
                 loss, support, weight, beta, rkl_ratio, skew, log_prob_min_clamp, loss_scale,
                 with_entropy):
    """Returns a SimpleNamespace: loss, student_mass, teacher_mass, label_logprobs, entropy,
    log_sum, H, label_factor, entropy_factor (row_coefs [0], [3], [4], [5]), g_full [N, K]
    (dL/ds_k through Q too, scaled by loss_scale, 0 off the valid entries), d_u [N] (dL/du)."""
    cpu = lambda t: t.detach().cpu()
    if teacher_ids.shape[1] == 0:  # K = 0: as one padding entry (the oracle wants a column)
        n = teacher_ids.shape[0]
        pad = torch.full((n, 1), -1, dtype=torch.long)
        g0 = cpu(gathered).to(F64)
        g1 = torch.cat([torch.zeros(n, 1, dtype=F64), g0], -1)
        r = epilogue_ref(row_max, sums, g1, pad, torch.zeros(n, 1, dtype=F64), mask, labels,
                         vocab_size, loss, support, weight, beta, rkl_ratio, skew,
                         log_prob_min_clamp, loss_scale, with_entropy)
        r.g_full, r.valid, r.q = r.g_full[:, :0], r.valid[:, :0], r.q[:, :0]
        return r
    M = cpu(row_max).to(F64)
    st = cpu(sums).to(F64)
    rest, teach, dup, cols, ent = st.unbind(-1)
    ids = cpu(teacher_ids).long()
    n, k = ids.shape
    x = cpu(gathered).to(F64)[:, :k]
    lp = cpu(teacher_logprobs).to(F64)
    counted = torch.ones(n, dtype=torch.bool) if mask is None else cpu(mask).bool()
    log_sum = torch.log(rest + teach)
    valid = (ids >= 0) & (ids < vocab_size) & counted.unsqueeze(-1)
    invalid_row = (ids >= vocab_size).any(-1) & counted
    covered = cols == vocab_size
    terms = [t for t in _terms(loss, support, weight, beta, rkl_ratio, skew) if t.weight != 0.0]
    opts = SimpleNamespace(terms=tuple(terms), log_prob_min_clamp=log_prob_min_clamp)

    s = torch.where(valid, (x - M.unsqueeze(-1)) - log_sum.unsqueeze(-1), 0.0)
    s = s.clone().requires_grad_(True)
    u = torch.where(covered, 0.0, (rest - dup) / (rest + teach))
    floored = (rest - dup) < 0
    log_u = torch.where(floored | covered, NEG_INF, torch.log((rest - dup).clamp_min(0)) - log_sum)
    log_u = log_u.clone().requires_grad_(True)
    rows = R.per_row_loss(s, lp, valid, log_u, opts, covered)
    rows = rows * loss_scale
    rows = torch.where(counted, rows, 0.0)
    gs, glu = torch.autograd.grad(rows.sum(), (s, log_u), allow_unused=True)
    gs = torch.zeros_like(s) if gs is None else gs
    glu = torch.zeros_like(log_u) if glu is None else glu
    # dL/du: the tail bins' (through log u) and the topk outside terms' (linear in u)
    d_u = torch.where(torch.isfinite(log_u) & (glu != 0), glu / torch.exp(log_u), 0.0)
    for t in terms:
        if t.support == "topk":
            one, zero = R._topk_outside_term(torch.ones(1, dtype=F64), t), R._topk_outside_term(
                torch.zeros(1, dtype=F64), t)
            d_u = d_u + torch.where(covered, 0.0, float((one - zero)[0]) * t.weight * loss_scale)
    # the topk outside terms are computed from s inside per_row_loss (u = 1 - Q): g_full has
    # their part already; the tail's came through log_u: add it (du/ds_k = -q_k)
    q = torch.where(valid, torch.exp(s.detach()), 0.0)
    d_u_tail = torch.where(torch.isfinite(log_u) & (glu != 0), glu / torch.exp(log_u), 0.0)
    g_full = torch.where(valid, gs - d_u_tail.unsqueeze(-1) * q, 0.0)
    d_u = torch.where(counted, d_u, 0.0)

    loss_rows = torch.where(invalid_row, NAN, rows.detach())
    smass = torch.where(valid, q, 0.0).sum(-1)
    tmass = torch.where(valid, torch.exp(lp), 0.0).sum(-1)
    lab = torch.zeros(n, dtype=F64)
    lfac = torch.zeros(n, dtype=F64)
    if labels is not None:
        y = cpu(labels).long()
        use = (y >= 0) & (y < vocab_size) & counted
        bad = (y >= vocab_size) & counted
        xl = cpu(gathered).to(F64)[:, k]
        lab = torch.where(use, (xl - M) - log_sum, 0.0)
        lab = torch.where(bad, NAN, lab)
        lfac = torch.where(bad, NAN, use.to(F64))
    H = torch.zeros(n, dtype=F64)
    efac = torch.zeros(n, dtype=F64)
    if with_entropy:
        H = torch.where(counted, log_sum - ent / (rest + teach), 0.0)
        efac = counted.to(F64)
    return SimpleNamespace(loss=loss_rows, student_mass=smass, teacher_mass=tmass,
                           label_logprobs=lab, entropy=H, log_sum=log_sum, H=H,
                           label_factor=lfac, entropy_factor=efac, g_full=g_full.detach(),
                           d_u=d_u.detach(), valid=valid, q=q)


def check_epilogue_decomposition(row_coefs, g, ref, rtol=1e-7, atol=1e-9, rows=None):
    """The kernel's (g, dense_coef, outside_coef) against epilogue_ref's full derivatives, on the
    rows whose loss is finite (others have a NaN dense_coef by design)."""
    rc = row_coefs.detach().cpu().to(F64)
    g = g.detach().cpu().to(F64)
    ok = torch.isfinite(ref.loss) if rows is None else rows
    dense, outside = rc[:, 1], rc[:, 2]
    lhs = torch.where(ref.valid, g - outside.unsqueeze(-1) * ref.q, 0.0)
    torch.testing.assert_close(lhs[ok], ref.g_full[ok], rtol=rtol, atol=atol,
                               msg=lambda m: f"g - outside q vs dL/ds: {m}")
    torch.testing.assert_close((dense - outside)[ok], ref.g_full.sum(-1)[ok], rtol=rtol,
                               atol=atol * max(1, g.shape[1]),
                               msg=lambda m: f"dense - outside vs sum dL/ds: {m}")
    # (a row without a valid entry has no teacher column: its outside_coef is unobservable -
    # only dense - outside reaches the gradient - and the kernels keep the tail bin's d_b there)
    ok = ok & ref.valid.any(-1)
    torch.testing.assert_close(outside[ok], ref.d_u[ok], rtol=rtol, atol=atol,
                               msg=lambda m: f"outside vs dL/du: {m}")


# --------------------------------------------------------------------------------- backward

def backward_ref(logits, teacher_ids, labels, row_max, row_coefs, grad_logprobs, grad_rows,
                 grad_label, grad_entropy, vocab_start, inv_temperature):
    """dL/dz of registration.cpp's formula, float64, shaped like the logits (CPU)."""
    z = rows_of(logits)
    n, v = z.shape
    cpu = lambda t: None if t is None else t.detach().cpu().to(F64)
    ids = teacher_ids.detach().cpu().long().reshape(n, -1)
    rc, g = cpu(row_coefs), cpu(grad_logprobs)
    M = cpu(row_max)
    # column 6 (the sampled entry's dL/ds_y) is not the backward op's: losses.py folds it into
    # the label's upstream gradient before the call
    log_sum, dense, outside, H, lfac, efac = rc.unbind(-1)[:6]
    gl = cpu(grad_rows)
    gy_up = torch.zeros(n, dtype=F64) if grad_label is None else cpu(grad_label)
    gh_up = torch.zeros(n, dtype=F64) if grad_entropy is None else cpu(grad_entropy)
    gy = torch.where(gy_up == 0, 0.0, gy_up * lfac)  # 0 even against a NaN factor
    gh = torch.where(gh_up == 0, 0.0, gh_up * efac)
    s = inv_temperature
    col = ids - vocab_start
    inshard = (ids >= 0) & (col >= 0) & (col < v)
    colc = torch.where(inshard, col, 0)
    gsum = torch.zeros(n, v, dtype=F64).scatter_add_(-1, colc, torch.where(inshard, g, 0.0))
    mult = torch.zeros(n, v, dtype=F64).scatter_add_(-1, colc, inshard.to(F64))
    any_g = (g != 0).any(-1)
    act_l = (gl != 0) & (any_g | (dense != 0) | (outside != 0))
    act_y, act_h = gy != 0, gh != 0
    gl_, gld = torch.where(act_l, gl, 0.0), torch.where(act_l, gl * dense, 0.0)
    glo = torch.where(act_l, gl * outside, 0.0)
    ghH = torch.where(act_h, gh * H, 0.0)
    t = (z * s - M.unsqueeze(-1)) - log_sum.unsqueeze(-1)
    q = torch.exp(t)
    qt = torch.where(q > 0, q * torch.where(q > 0, t, 0.0), 0.0)
    onehot = torch.zeros(n, v, dtype=F64)
    if labels is not None:
        y = labels.detach().cpu().long().reshape(n) - vocab_start
        oky = (labels.detach().cpu().long().reshape(n) >= 0) & (y >= 0) & (y < v)
        onehot.scatter_(-1, torch.where(oky, y, 0).unsqueeze(-1), oky.to(F64).unsqueeze(-1))
    extra_copies = torch.where(mult > 1, mult - 1, 0.0)
    out_term = torch.where(mult == 0, 1.0, 0.0) - extra_copies
    grad = s * (gl_.unsqueeze(-1) * gsum + gy.unsqueeze(-1) * onehot
                - q * (gld + gy + ghH).unsqueeze(-1)
                + glo.unsqueeze(-1) * q * out_term
                - gh.unsqueeze(-1) * qt)
    active = act_l | act_y | act_h
    nan_row = (~torch.isfinite(M + log_sum)) | torch.isnan(gld) | torch.isnan(glo) | \
        torch.isnan(gl_) | torch.isnan(gy) | torch.isnan(ghH)
    grad = torch.where((active & nan_row).unsqueeze(-1), NAN, grad)
    grad = torch.where((~active).unsqueeze(-1), 0.0, grad)
    return grad.reshape(logits.shape)
