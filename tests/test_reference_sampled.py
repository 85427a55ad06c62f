"""Pins SPEC 10.2 (support="sampled") and 10.3 (support="generalized") in the float64 oracle.

The sampled estimator is checked by exact enumeration: on a small vocabulary every token y is
taken as the sampled one, and the mu-weighted mean of the per-row loss and of its gradient must
equal the full-vocabulary divergence sum_v f(p_v, q_v) and its gradient, computed here
independently from SPEC 10.2's table (for mu = the student's own q - the default - and for an
explicit mu). The generalized support is checked against SPEC 10.3's table written out per bin,
for >= 0, and for a zero loss with a zero gradient when the student equals the teacher on its
entries.
"""
import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

from _inputs import LOSSES  # noqa: E402
from topk_distill import reference  # noqa: E402
from topk_distill._types import Term  # noqa: E402

ref = reference.topk_distill_loss
F64 = torch.float64
PARAMS = dict(beta=0.3, rkl_ratio=0.25, skew=0.2)


def _clamped(x, c):
    return x if c is None else torch.where(x < c, torch.full_like(x, c), x)


def f_table(lp, lq, loss, beta=0.3, rkl_ratio=0.25, skew=0.2):
    """SPEC 10.2's per-token f(p, q) from log p and log q (both > -inf here), elementwise."""
    p, q = lp.exp(), lq.exp()
    fkl, rkl = p * (lp - lq), q * (lq - lp)
    if loss == "fkl":
        return fkl
    if loss == "rkl":
        return rkl
    if loss == "jsd":
        lm = torch.log(beta * p + (1 - beta) * q)
        return beta * p * (lp - lm) + (1 - beta) * q * (lq - lm)
    if loss == "fkl+rkl":
        return (1 - rkl_ratio) * fkl + rkl_ratio * rkl
    if loss == "tvd":
        return 0.5 * (p - q).abs()
    if loss == "skl":
        return p * (lp - torch.log(skew * p + (1 - skew) * q))
    if loss == "srkl":
        return q * (lq - torch.log(skew * q + (1 - skew) * p))
    raise AssertionError(loss)


def generalized_table(la, lb, loss, beta=0.3, rkl_ratio=0.25, skew=0.2):
    """SPEC 10.3's per-bin terms between unnormalised a = e^la and b = e^lb."""
    a, b = la.exp(), lb.exp()
    fkl, rkl = a * (la - lb) - a + b, b * (lb - la) - b + a
    if loss == "fkl":
        return fkl
    if loss == "rkl":
        return rkl
    if loss == "fkl+rkl":
        return (1 - rkl_ratio) * fkl + rkl_ratio * rkl
    if loss == "jsd":
        m = beta * a + (1 - beta) * b
        return beta * a * (la - m.log()) + (1 - beta) * b * (lb - m.log())
    if loss == "tvd":
        return 0.5 * (a - b).abs()
    if loss == "skl":
        m = skew * a + (1 - skew) * b
        return a * (la - m.log()) - a + m
    if loss == "srkl":
        m = skew * b + (1 - skew) * a
        return b * (lb - m.log()) - b + m
    raise AssertionError(loss)


def problem(n=4, v=7, k=3, seed=0, scale=1.3):
    """Student logits [n, v]; a full teacher distribution (log) [n, v] with full support; its
    top-k ids and log-probs; row 1 has a padding entry, row 2 a duplicated id."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, v, generator=g, dtype=F64) * scale
    teacher = torch.log_softmax(0.5 * z + torch.randn(n, v, generator=g, dtype=F64) * scale, -1)
    ids = teacher.topk(k, -1).indices
    ids[1, -1] = -1
    ids[2, 1] = ids[2, 0]
    lp = torch.where(ids >= 0, teacher.gather(-1, ids.clamp_min(0)), 0.0)
    return z, teacher, ids, lp


def enumerate_sampled(z, teacher, ids, lp, log_mu, *, mask=None, **kw):
    """(E_mu[D_hat] per row, E_mu[grad D_hat]): every y of the vocab as the sampled token, the
    per-row losses weighted by mu_y (a constant). ``log_mu`` None: mu = the student's q."""
    n, v = z.shape
    zz = z.detach().clone().requires_grad_(True)
    rep = lambda t: t.repeat_interleave(v, 0)  # noqa: E731  row n, y = 0..v-1
    labels = torch.arange(v).repeat(n)
    mu_log = (torch.log_softmax(z.detach() / kw.get("temperature", 1.0), -1) if log_mu is None
              else log_mu)
    out = ref(rep(zz), rep(ids), rep(lp), labels=labels,
              label_teacher_logprobs=teacher.reshape(-1),
              label_sample_logprobs=None if log_mu is None else log_mu.reshape(-1),
              mask=None if mask is None else rep(mask), reduction="none", **kw)
    rows = (out.loss.reshape(n, v) * mu_log.exp()).sum(-1)
    (grad,) = torch.autograd.grad(rows.sum(), zz)
    return rows.detach(), grad


def full_divergence(z, teacher, loss, *, temperature=1.0, t2_scale=False, clamp=None, mask=None,
                    **params):
    """sum_v f(p_v, q_v) over the full vocab (the clamp on both log-probs) and its gradient."""
    zz = z.detach().clone().requires_grad_(True)
    lq = torch.log_softmax(zz / temperature, -1)
    rows = f_table(_clamped(teacher, clamp), _clamped(lq, clamp), loss, **params).sum(-1)
    if t2_scale:
        rows = rows * temperature ** 2
    if mask is not None:
        rows = torch.where(mask, rows, 0.0)
    (grad,) = torch.autograd.grad(rows.sum(), zz)
    return rows.detach(), grad


CASES = [dict(), dict(temperature=1.7, t2_scale=True), dict(log_prob_min_clamp=-2.5),
         dict(temperature=0.8, log_prob_min_clamp=-3.0)]


@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("mu", ["student", "explicit"])
@pytest.mark.parametrize("loss", LOSSES)
def test_sampled_is_unbiased_by_exact_enumeration(loss, mu, case):
    kw = CASES[case]
    z, teacher, ids, lp = problem(seed=3)
    log_mu = None
    if mu == "explicit":  # a rollout policy that is neither the student nor the teacher
        g = torch.Generator().manual_seed(9)
        log_mu = torch.log_softmax(torch.randn(z.shape, generator=g, dtype=F64), -1)
    mask = torch.tensor([True, True, True, False])
    est, est_grad = enumerate_sampled(z, teacher, ids, lp, log_mu, loss=loss, support="sampled",
                                      mask=mask, **PARAMS, **kw)
    # The reference's duplicated id (row 2) counts twice in the teacher's bins: the full
    # divergence of that row is not sum_v f; compare the other rows there, all rows elsewhere.
    exact, exact_grad = full_divergence(
        z, teacher, loss, mask=mask, clamp=kw.get("log_prob_min_clamp"),
        temperature=kw.get("temperature", 1.0), t2_scale=kw.get("t2_scale", False), **PARAMS)
    rows = [0, 1, 3]
    torch.testing.assert_close(est[rows], exact[rows], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(est_grad[rows], exact_grad[rows], rtol=1e-9, atol=1e-12)
    assert est[3] == 0 and (est_grad[3] == 0).all()  # masked row


def test_enumeration_can_fail_with_a_wrong_weight():
    """The enumeration distinguishes the right weight from a plausible wrong one: the estimate
    with mu = q but weights computed for another mu is biased."""
    z, teacher, ids, lp = problem(seed=4)
    wrong_mu = torch.log_softmax(torch.zeros_like(z), -1)  # uniform, but y is drawn from q
    n, v = z.shape
    out = ref(z.repeat_interleave(v, 0), ids.repeat_interleave(v, 0),
              lp.repeat_interleave(v, 0), labels=torch.arange(v).repeat(n),
              label_teacher_logprobs=teacher.reshape(-1),
              label_sample_logprobs=wrong_mu.reshape(-1), loss="fkl", support="sampled",
              reduction="none")
    est = (out.loss.reshape(n, v) * torch.softmax(z, -1)).sum(-1)
    exact, _ = full_divergence(z, teacher, "fkl")
    assert (est[[0, 1, 3]] - exact[[0, 1, 3]]).abs().max() > 1e-3


def test_duplicated_teacher_ids_count_once_per_entry_and_the_rest_stays_unbiased():
    """Row 2 has a duplicated id (DECISIONS 8: each entry is a bin): E[D_hat] is the full
    divergence plus the duplicate's extra f term, exactly."""
    z, teacher, ids, lp = problem(seed=3)
    est, _ = enumerate_sampled(z, teacher, ids, lp, None, loss="fkl", support="sampled")
    exact, _ = full_divergence(z, teacher, "fkl")
    lq = torch.log_softmax(z, -1)
    dup = ids[2, 0]
    extra = f_table(teacher[2, dup], lq[2, dup], "fkl")
    torch.testing.assert_close(est[2], exact[2] + extra, rtol=1e-10, atol=1e-12)


def _one_row(seed=5, v=11, k=4):
    z, teacher, ids, lp = problem(n=4, v=v, k=k, seed=seed)
    lq = torch.log_softmax(z, -1)
    # labels: row 0 outside the top-k, row 1 equal to a teacher id, row 2 ignored (-1), row 3
    # outside the top-k.
    out_of_topk = [int(next(c for c in range(v) if c not in ids[r].tolist())) for r in range(4)]
    labels = torch.tensor([out_of_topk[0], int(ids[1, 0]), -1, out_of_topk[3]])
    return z, teacher, ids, lp, lq, labels


@pytest.mark.parametrize("loss", LOSSES)
def test_sampled_rows_against_the_formula_with_and_without_the_clip(loss):
    z, teacher, ids, lp, lq, labels = _one_row()
    l_y = teacher.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    log_mu = torch.full((4,), -1.5, dtype=F64)
    for clip in (None, 0.7):
        out = ref(z, ids, lp, loss=loss, support="sampled", labels=labels,
                  label_teacher_logprobs=l_y, label_sample_logprobs=log_mu,
                  sample_weight_clip=clip, reduction="none", **PARAMS)
        valid = ids >= 0
        bins = torch.where(valid, f_table(lp, lq.gather(-1, ids.clamp_min(0)), loss, **PARAMS),
                           0.0).sum(-1)
        s_y = lq.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        w = torch.exp(-log_mu)
        if clip is not None:
            w = torch.minimum(w, clip / s_y.exp())
            assert (w < torch.exp(-log_mu)).any() and (w == torch.exp(-log_mu)).any()
        extra = w * f_table(l_y, s_y, loss, **PARAMS)
        use = torch.tensor([True, False, False, True])
        expected = bins + torch.where(use, extra, 0.0)
        torch.testing.assert_close(out.loss, expected, rtol=1e-12, atol=1e-14)


def test_default_mu_is_the_detached_student_probability():
    """mu = q by default, held constant: the loss equals the call with label_sample_logprobs =
    s_y.detach(), values and gradients."""
    z, teacher, ids, lp, lq, labels = _one_row()
    l_y = teacher.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    s_y = lq.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    zz = z.clone().requires_grad_(True)
    a = ref(zz, ids, lp, loss="rkl", support="sampled", labels=labels, label_teacher_logprobs=l_y)
    b = ref(zz, ids, lp, loss="rkl", support="sampled", labels=labels, label_teacher_logprobs=l_y,
            label_sample_logprobs=s_y)
    torch.testing.assert_close(a.loss, b.loss, rtol=0, atol=0)
    ga, = torch.autograd.grad(a.loss, zz)
    gb, = torch.autograd.grad(b.loss, zz)
    torch.testing.assert_close(ga, gb, rtol=1e-14, atol=1e-15)


def test_sampled_masses_are_the_teacher_entries_and_label_logprobs_are_returned():
    z, teacher, ids, lp, lq, labels = _one_row()
    l_y = teacher.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    out = ref(z, ids, lp, support="sampled", labels=labels, label_teacher_logprobs=l_y)
    plain = ref(z, ids, lp, labels=labels)
    torch.testing.assert_close(out.student_mass, plain.student_mass, rtol=0, atol=0)
    torch.testing.assert_close(out.teacher_mass, plain.teacher_mass, rtol=0, atol=0)
    torch.testing.assert_close(out.label_logprobs, plain.label_logprobs, rtol=0, atol=0)


def test_unread_label_teacher_logprobs_may_be_anything():
    """A label that is a teacher id, ignored, or in a masked row: its log-probs are never read
    (no check error, no NaN)."""
    z, teacher, ids, lp, lq, labels = _one_row()
    l_y = teacher.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    junk = l_y.clone()
    junk[1], junk[2], junk[3] = float("nan"), 5.0, float("nan")
    mask = torch.tensor([True, True, True, False])
    out = ref(z, ids, lp, support="sampled", labels=labels, label_teacher_logprobs=junk,
              label_sample_logprobs=junk, mask=mask, reduction="none")
    assert torch.isfinite(out.loss).all() and out.loss[3] == 0


def test_missing_teacher_applies_to_the_label():
    z, teacher, ids, lp, lq, labels = _one_row()
    l_y = teacher.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    l_y[0] = float("nan")
    kw = dict(labels=labels, label_teacher_logprobs=l_y, support="sampled", reduction="none")
    with pytest.raises(ValueError, match="label_teacher_logprobs has a NaN"):
        ref(z, ids, lp, **kw)
    unchecked = ref(z, ids, lp, check_inputs=False, **kw).loss
    assert torch.isnan(unchecked[0]) and torch.isfinite(unchecked[1:]).all()
    dropped = ref(z, ids, lp, missing_teacher="drop", **kw).loss
    no_label = labels.clone()
    no_label[0] = -1
    kw_none = dict(kw, labels=no_label)
    torch.testing.assert_close(dropped, ref(z, ids, lp, **kw_none).loss, rtol=0, atol=0)
    floored = ref(z, ids, lp, missing_teacher="floor", log_prob_min_clamp=-4.0, **kw).loss
    l_floor = l_y.clone()
    l_floor[0] = -4.0
    torch.testing.assert_close(
        floored, ref(z, ids, lp, log_prob_min_clamp=-4.0, **dict(kw, label_teacher_logprobs=l_floor)).loss,
        rtol=0, atol=0)


def test_label_out_of_range_without_checks_is_a_nan_row():
    z, teacher, ids, lp, lq, labels = _one_row()
    l_y = torch.full((4,), -3.0, dtype=F64)
    labels[0] = z.shape[1]
    with pytest.raises(ValueError, match="labels"):
        ref(z, ids, lp, support="sampled", labels=labels, label_teacher_logprobs=l_y)
    out = ref(z, ids, lp, support="sampled", labels=labels, label_teacher_logprobs=l_y,
              check_inputs=False, reduction="none")
    assert torch.isnan(out.loss[0]) and torch.isfinite(out.loss[1:]).all()


def test_sampled_in_a_mixture_is_the_weighted_sum():
    z, teacher, ids, lp, lq, labels = _one_row()
    l_y = teacher.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    kw = dict(labels=labels, label_teacher_logprobs=l_y, reduction="none")
    zz = z.clone().requires_grad_(True)
    mix = ref(zz, ids, lp, loss=[Term("fkl", "topk", 0.6), Term("rkl", "sampled", 0.4),
                                 Term("jsd", "generalized", 0.5, beta=0.3)], **kw).loss
    parts = (0.6 * ref(zz, ids, lp, loss="fkl", labels=labels, reduction="none").loss
             + 0.4 * ref(zz, ids, lp, loss="rkl", support="sampled", **kw).loss
             + 0.5 * ref(zz, ids, lp, loss="jsd", support="generalized", beta=0.3,
                         labels=labels, reduction="none").loss)
    torch.testing.assert_close(mix, parts, rtol=1e-13, atol=1e-15)
    g1, = torch.autograd.grad(mix.sum(), zz)
    g2, = torch.autograd.grad(parts.sum(), zz)
    torch.testing.assert_close(g1, g2, rtol=1e-12, atol=1e-14)
    # A sampled term of weight 0 is dropped exactly, and its inputs are still accepted.
    zero = ref(z, ids, lp, loss=[Term("fkl", "topk", 1.0), Term("rkl", "sampled", 0.0)], **kw)
    torch.testing.assert_close(zero.loss, ref(z, ids, lp, labels=labels, reduction="none").loss,
                               rtol=0, atol=0)


# ----------------------------------------------------------------------------- generalized

@pytest.mark.parametrize("clamp", [None, -2.0])
@pytest.mark.parametrize("loss", LOSSES)
def test_generalized_against_the_table(loss, clamp):
    z, teacher, ids, lp = problem(n=5, v=9, k=4, seed=7)
    T = 1.3
    zz = z.clone().requires_grad_(True)
    out = ref(zz, ids, lp, loss=loss, support="generalized", temperature=T,
              log_prob_min_clamp=clamp, reduction="none", **PARAMS)
    z2 = z.clone().requires_grad_(True)
    s = torch.log_softmax(z2 / T, -1).gather(-1, ids.clamp_min(0))
    la, lb = _clamped(lp, clamp), _clamped(s, clamp)
    valid = ids >= 0
    terms = generalized_table(torch.where(valid, la, 0.0), torch.where(valid, lb, 0.0), loss,
                              **PARAMS)
    expected = torch.where(valid, terms, 0.0).sum(-1)
    torch.testing.assert_close(out.loss, expected, rtol=1e-12, atol=1e-14)
    g1, = torch.autograd.grad(out.loss.sum(), zz)
    g2, = torch.autograd.grad(expected.sum(), z2)
    torch.testing.assert_close(g1, g2, rtol=1e-10, atol=1e-13)


def test_generalized_against_a_teacher_probability_of_zero():
    """a = 0: the limits of SPEC 10.3's terms (0 log 0 = 0), inf where b log(b / 0) appears."""
    b = 0.3
    beta, skew = PARAMS["beta"], PARAMS["skew"]
    expected = {"fkl": b, "rkl": math.inf, "fkl+rkl": math.inf,
                "jsd": -(1 - beta) * b * math.log(1 - beta), "tvd": b / 2,
                "skl": (1 - skew) * b, "srkl": -b * math.log(skew) - (1 - skew) * b}
    z = torch.tensor([[math.log(b), math.log(1 - b)]], dtype=F64)
    ids = torch.tensor([[0]])
    lp = torch.tensor([[-math.inf]], dtype=F64)
    for loss, value in expected.items():
        got = ref(z, ids, lp, loss=loss, support="generalized", **PARAMS).loss.item()
        assert got == pytest.approx(value, rel=1e-12), loss


@pytest.mark.parametrize("loss", LOSSES)
def test_generalized_is_nonnegative(loss):
    for seed in range(5):
        z, teacher, ids, lp = problem(n=6, v=12, k=5, seed=seed, scale=3.0)
        for clamp in (None, -3.0):
            out = ref(z, ids, lp, loss=loss, support="generalized", log_prob_min_clamp=clamp,
                      reduction="none", **PARAMS)
            assert (out.loss >= 0).all(), (seed, clamp, out.loss)


@pytest.mark.parametrize("T", [1.0, 2.0])
@pytest.mark.parametrize("loss", LOSSES)
def test_generalized_is_zero_with_zero_gradient_when_the_student_matches_on_the_entries(loss, T):
    """The student's probabilities equal the teacher's on the teacher's (distinct) ids, anything
    on the rest of the vocab: loss 0 and gradient 0, whereas "topk" / "tail" are not zero."""
    v, k = 10, 3
    g = torch.Generator().manual_seed(1)
    teacher = torch.log_softmax(torch.randn(3, v, generator=g, dtype=F64) * 2, -1)
    ids = teacher.topk(k, -1).indices
    lp = teacher.gather(-1, ids)
    rest = (1 - lp.exp().sum(-1, keepdim=True)) / (v - k)
    logq = rest.log().expand(3, v).clone()
    logq.scatter_(-1, ids, lp)
    # uneven rest: move mass between two non-teacher columns (still the same probabilities on
    # the teacher's ids)
    others = [[c for c in range(v) if c not in ids[r].tolist()] for r in range(3)]
    for r in range(3):
        a, b = others[r][0], others[r][1]
        logq[r, a] = (rest[r, 0] * 1.5).log()
        logq[r, b] = (rest[r, 0] * 0.5).log()
    z = (logq * T).requires_grad_(True)
    out = ref(z, ids, lp, loss=loss, support="generalized", temperature=T, reduction="none",
              **PARAMS)
    torch.testing.assert_close(out.loss, torch.zeros(3, dtype=F64), rtol=0, atol=1e-14)
    if loss == "tvd":  # |a - b| has its kink exactly there: log_softmax's rounding picks a side
        return
    grad, = torch.autograd.grad(out.loss.sum(), z)
    torch.testing.assert_close(grad, torch.zeros_like(grad), rtol=0, atol=1e-14)


# ----------------------------------------------------------------------------- errors (SPEC 7)

def _base():
    z, teacher, ids, lp, lq, labels = _one_row()
    l_y = teacher.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return z, ids, lp, labels, l_y


@pytest.mark.parametrize("change,exc,msg", [
    (dict(labels=None), ValueError, "needs labels"),
    (dict(label_teacher_logprobs=None), ValueError, "needs label_teacher_logprobs"),
    (dict(label_teacher_logprobs="short"), ValueError, "label_teacher_logprobs must have"),
    (dict(label_sample_logprobs="short"), ValueError, "label_sample_logprobs must have"),
    (dict(label_teacher_logprobs="int"), TypeError, "label_teacher_logprobs must have dtype"),
    (dict(label_teacher_logprobs="positive"), ValueError, "label_teacher_logprobs has an entry > 0"),
    (dict(label_sample_logprobs="positive"), ValueError, "label_sample_logprobs has an entry > 0"),
    (dict(label_sample_logprobs="nan"), ValueError, "label_sample_logprobs has a NaN"),
    (dict(sample_weight_clip=0.0), ValueError, "sample_weight_clip must be"),
    (dict(sample_weight_clip=-1.0), ValueError, "sample_weight_clip must be"),
    (dict(sample_weight_clip=float("nan")), ValueError, "sample_weight_clip must be"),
    (dict(sample_weight_clip="1"), TypeError, "sample_weight_clip"),
    (dict(support="topk"), ValueError, 'label_teacher_logprobs is only used by support="sampled"'),
    (dict(support="topk", label_teacher_logprobs=None, sample_weight_clip=2.0), ValueError,
     'sample_weight_clip is only used'),
])
def test_sampled_errors_name_the_argument(change, exc, msg):
    z, ids, lp, labels, l_y = _base()
    kw = dict(support="sampled", labels=labels, label_teacher_logprobs=l_y)
    for name, value in change.items():
        if value == "short":
            value = l_y[:2]
        elif value == "int":
            value = torch.zeros(4, dtype=torch.int64)
        elif value == "positive":
            value = l_y.clone()
            value[0] = 0.5
        elif value == "nan":
            value = l_y.clone()
            value[3] = float("nan")
        kw[name] = value
    with pytest.raises(exc, match=msg):
        ref(z, ids, lp, **kw)
