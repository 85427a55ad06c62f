"""Pins the mathematics of topk_distill.reference (the oracle) to docs/SPEC.md + DECISIONS.md.

Independent checks: a brute-force scalar (``math``) evaluation, algebraic identities between the
losses, invariances, the SPEC section 4 gradient formula, gradcheck, and tensor parallelism.
"""
import itertools
import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

from _dist_utils import run_distributed  # noqa: E402
from _inputs import LOSSES, SUPPORTS  # noqa: E402
from topk_distill import reference  # noqa: E402
from topk_distill._validate import validate_options  # noqa: E402

ref = reference.topk_distill_loss
F64 = torch.float64
INF = float("inf")


def make_inputs(n=6, v=9, k=4, seed=0, dtype=F64, scale=1.5, special_rows=True):
    """Student logits [n, v]; teacher = top-k-ish entries of a random distribution (P < 1).
    With special_rows: row 1 has padding, row 2 a duplicate id, row 3 is all padding,
    row 4 holds ids 0 and v-1."""
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(n, v, generator=g, dtype=F64) * scale).to(dtype)
    teacher = torch.log_softmax(torch.randn(n, v, generator=g, dtype=F64) * scale, -1)
    ids = torch.stack([torch.randperm(v, generator=g)[:k] for _ in range(n)])
    if special_rows and n >= 5:
        ids[1, -1] = -1
        ids[2, 1] = ids[2, 0]
        ids[3, :] = -1
        ids[4, 0], ids[4, -1] = 0, v - 1
    lp = teacher.gather(-1, ids.clamp_min(0))
    lp = torch.where(ids >= 0, lp, 0.0)
    return z, ids, lp


def grad_of(out_loss, z):
    (g,) = torch.autograd.grad(out_loss.sum(), z, retain_graph=True)
    return g


# ----------------------------------------------------------------------------- brute force

def brute_row(z, ids, l, *, loss, support, beta=0.5, rkl_ratio=0.1, skew=0.1, T=1.0, clamp=None):
    """One row with scalar math, straight from SPEC 3 / DECISIONS, in probability space."""
    zt = [x / T for x in z]
    m = max(zt)
    lse = m + math.log(sum(math.exp(x - m) for x in zt))
    ent = [(zt[i] - lse, lk) for i, lk in zip(ids, l) if i >= 0]
    Q = sum(math.exp(s) for s, _ in ent)
    P = sum(math.exp(lk) for _, lk in ent)
    cl = (lambda x: x) if clamp is None else (lambda x: max(x, clamp))
    a = [math.exp(cl(lk)) for _, lk in ent]
    b = [math.exp(cl(s)) for s, _ in ent]
    if support == "renorm":
        if not ent:
            return 0.0, Q, P
        a = [x / sum(a) for x in a]
        b = [x / sum(b) for x in b]
    if support == "tail":
        a, b = a + [max(1.0 - P, 0.0)], b + [1.0 - Q]
    if support == "topk":
        # The outside bin (teacher 0, student 1 - Q) is included wherever its term is finite.
        finite = {"fkl": True, "skl": True, "tvd": True, "rkl": False, "fkl+rkl": False,
                  "jsd": beta < 1, "srkl": skew > 0}[loss]
        if finite:
            a, b = a + [0.0], b + [1.0 - Q]

    def kl(x, y):
        tot = 0.0
        for xi, yi in zip(x, y):
            if xi > 0:
                tot += INF if yi == 0 else xi * math.log(xi / yi)
        return tot

    if loss == "fkl" or (loss == "jsd" and beta == 0):
        d = kl(a, b)
    elif loss == "rkl" or (loss == "jsd" and beta == 1):
        d = kl(b, a)
    elif loss == "jsd":
        mix = [beta * x + (1 - beta) * y for x, y in zip(a, b)]
        d = beta * kl(a, mix) + (1 - beta) * kl(b, mix)
    elif loss == "fkl+rkl":
        d = (1 - rkl_ratio) * kl(a, b) + rkl_ratio * kl(b, a)
    elif loss == "tvd":
        d = 0.5 * sum(abs(x - y) for x, y in zip(a, b))
    elif loss == "skl":
        d = kl(a, [skew * x + (1 - skew) * y for x, y in zip(a, b)])
    else:
        d = kl(b, [skew * y + (1 - skew) * x for x, y in zip(a, b)])
    return d, Q, P


@pytest.mark.parametrize("support", SUPPORTS)
@pytest.mark.parametrize("loss", LOSSES)
def test_matches_brute_force(loss, support):
    z, ids, lp = make_inputs(n=7, v=7, k=3, seed=1)
    lp[5, 1] = -INF  # a teacher probability of 0
    kw = dict(beta=0.3, rkl_ratio=0.25, skew=0.2)
    for T, clamp in [(1.0, None), (1.7, None), (1.0, -2.5), (0.6, -3.0)]:
        if clamp is None and loss in ("rkl", "fkl+rkl", "srkl") or (loss == "jsd" and kw["beta"] == 1):
            rows = [r for r in range(7) if r != 5]  # RKL against p = 0 is +inf (checked below)
        else:
            rows = list(range(7))
        out = ref(z, ids, lp, loss=loss, support=support, temperature=T, log_prob_min_clamp=clamp,
                  reduction="none", **kw)
        for r in rows:
            want, Q, P = brute_row(z[r].tolist(), ids[r].tolist(), lp[r].tolist(), loss=loss,
                                   support=support, T=T, clamp=clamp, **kw)
            got = out.loss[r].item()
            assert math.isclose(got, want, rel_tol=1e-10, abs_tol=1e-13), (r, T, clamp, got, want)
            assert math.isclose(out.student_mass[r].item(), Q, rel_tol=1e-6)
            assert math.isclose(out.teacher_mass[r].item(), P, rel_tol=1e-6)


@pytest.mark.parametrize("loss", ["rkl", "fkl+rkl"])
def test_rkl_against_zero_teacher_prob_is_inf_unless_clamped(loss):
    z, ids, lp = make_inputs(n=2, v=6, k=3, special_rows=False)
    lp[0, 0] = -INF
    out = ref(z, ids, lp, loss=loss, reduction="none")
    assert out.loss[0].item() == INF and math.isfinite(out.loss[1].item())
    assert torch.isfinite(ref(z, ids, lp, loss=loss, reduction="none", log_prob_min_clamp=-20.0).loss).all()


# ----------------------------------------------------------------------------- identities

@pytest.mark.parametrize("support", SUPPORTS)
def test_jsd_endpoints_are_fkl_and_rkl_exactly(support):
    z, ids, lp = make_inputs(seed=2)
    z.requires_grad_()
    for beta, other in [(0.0, "fkl"), (1.0, "rkl")]:
        for clamp in [None, -2.0]:
            a = ref(z, ids, lp, loss="jsd", beta=beta, support=support, log_prob_min_clamp=clamp, reduction="none")
            b = ref(z, ids, lp, loss=other, support=support, log_prob_min_clamp=clamp, reduction="none")
            assert torch.equal(a.loss, b.loss)
            assert torch.equal(grad_of(a.loss, z), grad_of(b.loss, z))
    # Inside (0, 1) the mixture formula is used (no clamping of beta towards the endpoints).
    mid = ref(z, ids, lp, loss="jsd", beta=1e-3, support=support, reduction="none").loss
    assert not torch.allclose(mid, ref(z, ids, lp, loss="fkl", support=support, reduction="none").loss)


@pytest.mark.parametrize("support", SUPPORTS)
@pytest.mark.parametrize("clamp", [None, -2.0])
def test_fkl_plus_rkl_is_the_linear_combination(support, clamp):
    z, ids, lp = make_inputs(seed=3)
    z.requires_grad_()
    kw = dict(support=support, log_prob_min_clamp=clamp, reduction="none")
    fkl, rkl = ref(z, ids, lp, loss="fkl", **kw).loss, ref(z, ids, lp, loss="rkl", **kw).loss
    for r in [0.0, 0.1, 0.7, 1.0]:
        mix = ref(z, ids, lp, loss="fkl+rkl", rkl_ratio=r, **kw).loss
        torch.testing.assert_close(mix, (1 - r) * fkl + r * rkl, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(grad_of(mix, z), (1 - r) * grad_of(fkl, z) + r * grad_of(rkl, z),
                                   rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("support", SUPPORTS)
def test_skew_endpoints(support):
    z, ids, lp = make_inputs(seed=4)
    kw = dict(support=support, reduction="none")
    fkl, rkl = ref(z, ids, lp, loss="fkl", **kw).loss, ref(z, ids, lp, loss="rkl", **kw).loss
    torch.testing.assert_close(ref(z, ids, lp, loss="skl", skew=0.0, **kw).loss, fkl, rtol=1e-12, atol=1e-14)
    # DECISIONS 6: skew = 0 is RKL, including no outside term for "topk".
    torch.testing.assert_close(ref(z, ids, lp, loss="srkl", skew=0.0, **kw).loss, rkl, rtol=1e-12, atol=1e-14)
    for loss in ["skl", "srkl"]:
        torch.testing.assert_close(ref(z, ids, lp, loss=loss, skew=1.0, **kw).loss,
                                   torch.zeros(6, dtype=F64), rtol=0, atol=1e-14)


@pytest.mark.parametrize("loss", LOSSES)
def test_tail_divergences_nonnegative_and_zero_at_equality(loss):
    for seed in range(3):
        z, ids, lp = make_inputs(n=8, v=10, k=4, seed=seed, scale=2.0)
        ids[2, 1] = 5 if ids[2, 0] != 5 else 6  # no duplicates: a true distribution on both sides
        lp = torch.log_softmax(torch.randn(8, 10, dtype=F64) * 2, -1).gather(-1, ids.clamp_min(0))
        out = ref(z, ids, lp, loss=loss, support="tail", beta=0.4, skew=0.3, reduction="none")
        assert (out.loss >= -1e-14).all(), out.loss
    # Teacher == student on the teacher tokens: every tail / renorm divergence is 0, and so is
    # its gradient (a minimum).
    z.requires_grad_()
    same = torch.log_softmax(z.detach(), -1).gather(-1, ids.clamp_min(0))
    for support in ["tail", "renorm"]:
        out = ref(z, ids, same, loss=loss, support=support, reduction="none")
        torch.testing.assert_close(out.loss, torch.zeros(8, dtype=F64), rtol=0, atol=1e-13)
        if loss != "tvd":  # |a - b| has no derivative at a == b (rounding picks a side)
            torch.testing.assert_close(grad_of(out.loss, z), torch.zeros_like(z), rtol=0, atol=1e-12)


def test_topk_at_equality_leaves_exactly_the_outside_terms():
    z, ids, _ = make_inputs(seed=5, special_rows=False)
    same = torch.log_softmax(z, -1).gather(-1, ids)
    out = ref(z, ids, same, reduction="none")
    u = 1 - out.student_mass.double()
    beta, skew = 0.3, 0.2
    expected = {"fkl": 0 * u, "rkl": 0 * u, "fkl+rkl": 0 * u, "skl": 0 * u, "tvd": u / 2,
                "jsd": (1 - beta) * u * math.log(1 / (1 - beta)), "srkl": u * math.log(1 / skew)}
    for loss, want in expected.items():
        got = ref(z, ids, same, loss=loss, beta=beta, skew=skew, reduction="none").loss
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-12)


def test_renorm_invariances():
    z, ids, lp = make_inputs(seed=6)
    z.requires_grad_()
    for loss in LOSSES:
        base = ref(z, ids, lp, loss=loss, support="renorm", reduction="none").loss
        # Adding a constant to all teacher log-probs of a row changes nothing.
        shifted = lp - torch.linspace(0.1, 3.0, 6, dtype=F64).unsqueeze(-1)
        torch.testing.assert_close(ref(z, ids, shifted, loss=loss, support="renorm", reduction="none").loss,
                                   base, rtol=1e-10, atol=1e-13)
        # Only ratios of q_k matter: the logits of non-teacher tokens get exactly no gradient.
        g = grad_of(base, z)
        off = torch.ones_like(z, dtype=torch.bool)
        for r in range(6):
            off[r, ids[r][ids[r] >= 0]] = False
        torch.testing.assert_close(g[off], torch.zeros_like(g[off]), rtol=0, atol=1e-14)


def test_temperature_divides_student_logits_and_t2_scale_multiplies():
    z, ids, lp = make_inputs(seed=7)
    T = 2.5
    for loss, support in itertools.product(LOSSES, SUPPORTS):
        zz = z.clone().requires_grad_()
        zt = (z / T).requires_grad_()
        a = ref(zz, ids, lp, loss=loss, support=support, temperature=T, reduction="sum")
        b = ref(zt, ids, lp, loss=loss, support=support, reduction="sum")
        torch.testing.assert_close(a.loss, b.loss, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(grad_of(a.loss, zz), grad_of(b.loss, zt) / T, rtol=1e-10, atol=1e-14)
        c = ref(zz, ids, lp, loss=loss, support=support, temperature=T, t2_scale=True, reduction="sum")
        torch.testing.assert_close(c.loss, T ** 2 * a.loss, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(grad_of(c.loss, zz), T ** 2 * grad_of(a.loss, zz), rtol=1e-12, atol=1e-14)
        one = ref(zz, ids, lp, loss=loss, support=support, t2_scale=True, reduction="sum").loss
        assert torch.equal(one, ref(zz, ids, lp, loss=loss, support=support, reduction="sum").loss)


# ----------------------------------------------------------------------------- gradients

@pytest.mark.parametrize("clamp", [None, -2.2])
@pytest.mark.parametrize("support", SUPPORTS)
@pytest.mark.parametrize("loss", LOSSES)
def test_gradient_matches_spec_section_4(loss, support, clamp):
    """dL/dz = (1/T) (scatter_add(g at ids) - softmax(z/T) * sum_k g), g = dL/ds (autograd)."""
    T = 1.3
    z, ids, lp = make_inputs(seed=8, scale=1.0)
    z.requires_grad_()
    kw = dict(loss=loss, support=support, log_prob_min_clamp=clamp, beta=0.35, rkl_ratio=0.3, skew=0.15)
    out = ref(z, ids, lp, temperature=T, reduction="sum", **kw)
    grad_z = grad_of(out.loss, z)

    # The same loss as a function of s alone: the tail is 1 - sum_k q_k (SPEC 4).
    valid = ids >= 0
    logq = torch.log_softmax(z.detach() / T, -1)
    s = torch.where(valid, logq.gather(-1, ids.clamp_min(0)), 0.0).requires_grad_()
    log_q_tail = torch.log(1 - torch.where(valid, s.exp(), 0.0).sum(-1)) if support == "tail" else None
    rows = reference.per_row_loss(s, lp, valid, log_q_tail, validate_options(**kw))
    torch.testing.assert_close(rows.sum(), out.loss, rtol=1e-12, atol=1e-14)
    g = torch.where(valid, torch.autograd.grad(rows.sum(), s)[0], 0.0)

    sparse = torch.zeros_like(z).scatter_add(-1, ids.clamp_min(0), g)
    expected = (sparse - torch.softmax(z.detach() / T, -1) * g.sum(-1, keepdim=True)) / T
    torch.testing.assert_close(grad_z, expected, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("loss,support,clamp,T", [
    ("fkl", "topk", None, 1.0), ("rkl", "topk", -3.0, 1.0), ("jsd", "tail", -2.5, 1.0),
    ("jsd", "topk", None, 0.8), ("srkl", "renorm", None, 0.7), ("fkl+rkl", "tail", None, 2.0),
    ("tvd", "topk", None, 1.0), ("skl", "tail", -3.0, 1.0), ("srkl", "topk", None, 1.0),
    ("rkl", "renorm", -2.0, 1.3),
])
def test_gradcheck(loss, support, clamp, T):
    z, ids, lp = make_inputs(n=5, v=6, k=3, seed=9)
    z.requires_grad_()

    def f(x):
        return ref(x, ids, lp, loss=loss, support=support, log_prob_min_clamp=clamp,
                   temperature=T, reduction="none").loss

    assert torch.autograd.gradcheck(f, (z,), eps=1e-6, atol=1e-7)


def test_clamp_gradient_rule():
    """s < c: the bin passes no gradient; s == c: it does (SPEC 3); s > c: it does."""
    c = -2.0
    s = torch.tensor([[c, c - 0.5, c + 0.5]], dtype=F64, requires_grad=True)
    l = torch.tensor([[-1.0, -1.5, -2.5]], dtype=F64)
    valid = torch.ones(1, 3, dtype=torch.bool)
    opts = validate_options(loss="fkl", support="topk", log_prob_min_clamp=c)
    (g,) = torch.autograd.grad(reference.per_row_loss(s, l, valid, None, opts).sum(), s)
    a = torch.exp(torch.clamp(l, min=c))
    torch.testing.assert_close(g, torch.stack([-a[0, 0], torch.zeros((), dtype=F64), -a[0, 2]]).unsqueeze(0))
    # ...while a clamped bin still feels the tail bin through Q (SPEC 3).
    opts = validate_options(loss="fkl", support="tail", log_prob_min_clamp=c)
    s2 = s.detach().clone().requires_grad_()
    lqt = torch.log(1 - s2.exp().sum(-1))
    (g2,) = torch.autograd.grad(reference.per_row_loss(s2, l, valid, lqt, opts).sum(), s2)
    p_tail = 1 - l.exp().sum()
    dtail = p_tail * s2.detach().exp()[0, 1] / torch.exp(lqt.detach())[0]  # d(-p_tail log q_tail)/ds_1
    torch.testing.assert_close(g2[0, 1], dtail)


def test_clamp_leaves_masses_unclamped():
    z, ids, lp = make_inputs(seed=10)
    a = ref(z, ids, lp)
    b = ref(z, ids, lp, log_prob_min_clamp=-0.5)
    assert torch.equal(a.student_mass, b.student_mass) and torch.equal(a.teacher_mass, b.teacher_mass)


# ----------------------------------------------------------------------------- special inputs

def test_padding_is_ignored_and_edge_ids_get_their_gradient():
    """Padding entries (with garbage log-probs) change nothing; ids 0 and V-1 are ordinary."""
    g = torch.Generator().manual_seed(11)
    v = 8
    z = torch.randn(3, v, dtype=F64, generator=g)
    ids = torch.tensor([[0, 3, v - 1], [v - 1, 0, 2], [5, 0, 1]])
    lp = torch.log(torch.tensor([[0.3, 0.2, 0.1], [0.25, 0.25, 0.1], [0.5, 0.1, 0.05]], dtype=F64))
    pad_ids = torch.cat([torch.full((3, 2), -1), ids, torch.full((3, 1), -7)], -1)
    pad_lp = torch.cat([torch.full((3, 2), float("nan"), dtype=F64), lp, torch.full((3, 1), 5.0, dtype=F64)], -1)
    for loss, support in itertools.product(LOSSES, SUPPORTS):
        z1, z2 = z.clone().requires_grad_(), z.clone().requires_grad_()
        a = ref(z1, ids, lp, loss=loss, support=support, reduction="none")
        b = ref(z2, pad_ids, pad_lp, loss=loss, support=support, reduction="none")
        torch.testing.assert_close(b.loss, a.loss, rtol=1e-13, atol=1e-15)
        torch.testing.assert_close(b.student_mass, a.student_mass)
        torch.testing.assert_close(grad_of(b.loss, z2), grad_of(a.loss, z1), rtol=1e-12, atol=1e-15)
    z.requires_grad_()
    assert torch.autograd.gradcheck(lambda x: ref(x, pad_ids, pad_lp, loss="jsd", support="tail",
                                                  reduction="none").loss, (z,))


def test_duplicate_ids_are_separate_bins_and_accumulate():
    z = torch.tensor([[0.5, -1.0, 2.0, 0.0, -0.3]], dtype=F64, requires_grad=True)
    ids = torch.tensor([[2, 2, 0]])
    lp = torch.log(torch.tensor([[0.2, 0.2, 0.1]], dtype=F64))
    out = ref(z, ids, lp, reduction="none")
    q = torch.softmax(z.detach(), -1)
    torch.testing.assert_close(out.student_mass, (2 * q[0, 2] + q[0, 0]).float().reshape(1))
    # fkl/topk: L = -sum_k p_k s_k + const  ->  dL/dz = -(sum of p at each id) + softmax * sum p
    want = -torch.tensor([[0.1, 0, 0.4, 0, 0]], dtype=F64) + q * 0.5
    torch.testing.assert_close(grad_of(out.loss, z), want)
    # tail: Q counts the duplicate twice (DECISIONS 8) and exceeds 1: q_tail is floored at 0
    # (DECISIONS 3), so FKL against p_tail = 0.5 > 0 is +inf - not NaN, not a finite guess.
    tail = ref(z, ids, lp, loss="fkl", support="tail", reduction="none").loss
    assert 1 - out.student_mass.item() < 0 and tail.item() == math.inf
    # With a small enough Q the tail is finite and agrees with brute force (bins counted twice).
    z2 = torch.tensor([[-2.0, 1.0, -1.5, 2.0, 0.3]], dtype=F64)
    got = ref(z2, ids, lp, loss="jsd", support="tail", reduction="none").loss.item()
    want, Q, _ = brute_row(z2[0].tolist(), ids[0].tolist(), lp[0].tolist(), loss="jsd", support="tail")
    assert Q < 1 and math.isclose(got, want, rel_tol=1e-12)


def test_tail_has_no_cancellation_when_student_mass_is_near_one():
    # Teacher tokens 0, 1 hold all but ~e^-50 of the student's mass.
    v = 8
    z = torch.tensor([[0.0, 0.0] + [-50.0] * (v - 2)], dtype=F64)
    ids = torch.tensor([[0, 1]])
    p = 0.45
    lp = torch.full((1, 2), math.log(p), dtype=F64)
    log_den = math.log(2 + (v - 2) * math.exp(-50.0))
    log_qk = -log_den
    log_qtail = math.log(v - 2) - 50.0 - log_den
    p_tail = 1 - 2 * p
    want = {"fkl": 2 * p * (math.log(p) - log_qk) + p_tail * (math.log(p_tail) - log_qtail),
            "rkl": 2 * math.exp(log_qk) * (log_qk - math.log(p))
            + math.exp(log_qtail) * (log_qtail - math.log(p_tail))}
    for dtype, rtol in [(F64, 1e-13), (torch.float32, 1e-6)]:
        for loss, w in want.items():
            zz = z.to(dtype).requires_grad_()
            got = ref(zz, ids, lp, loss=loss, support="tail")
            assert math.isclose(got.loss.item(), w, rel_tol=rtol), (dtype, loss, got.loss.item(), w)
            assert torch.isfinite(grad_of(got.loss, zz)).all()


@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_extreme_but_valid_inputs_are_finite(dtype):
    g = torch.Generator().manual_seed(12)
    n, v, k = 6, 16, 5
    z = (torch.randint(0, 2, (n, v), generator=g) * 2e4 - 1e4).to(dtype)  # logits of +-1e4
    ids = torch.stack([torch.randperm(v, generator=g)[:k] for _ in range(n)])
    lp = torch.log_softmax(torch.randn(n, v, generator=g, dtype=F64), -1).gather(-1, ids)
    lp[0, 0], lp[1, 1], lp[2, :] = -INF, -1e30, -INF  # row 2: teacher has all -inf
    for loss, support in itertools.product(LOSSES, SUPPORTS):
        for clamp in [None, -30.0]:
            zz = z.clone().requires_grad_()
            out = ref(zz, ids, lp, loss=loss, support=support, log_prob_min_clamp=clamp, reduction="none")
            rows = torch.ones(n, dtype=torch.bool)
            if clamp is None and loss in ("rkl", "fkl+rkl"):
                rows[:3] = False  # RKL against p = 0: +inf (the math)
            if clamp is None and support == "renorm":
                rows[2] = False  # zero teacher mass cannot be renormalised: NaN
            assert torch.isfinite(out.loss[rows]).all(), (loss, support, clamp, out.loss)
            gz = torch.autograd.grad(out.loss[rows].sum(), zz)[0]
            assert torch.isfinite(gz[rows]).all(), (loss, support, clamp)  # (0 * inf: other rows NaN)
            assert (gz[~rows] == 0).all() or not rows.all()
            assert torch.isfinite(out.student_mass).all() and torch.isfinite(out.teacher_mass).all()


def test_rows_without_valid_entries_decisions_7():
    z = torch.randn(1, 5, dtype=F64, requires_grad=True)
    ids = torch.full((1, 3), -1)
    lp = torch.zeros(1, 3, dtype=F64)
    beta, skew = 0.3, 0.2
    topk = {"fkl": 0.0, "rkl": 0.0, "fkl+rkl": 0.0, "skl": 0.0, "tvd": 0.5,
            "jsd": (1 - beta) * math.log(1 / (1 - beta)), "srkl": math.log(1 / skew)}
    for loss, support in itertools.product(LOSSES, SUPPORTS):
        out = ref(z, ids, lp, loss=loss, support=support, beta=beta, skew=skew)
        want = topk[loss] if support == "topk" else 0.0
        assert math.isclose(out.loss.item(), want, rel_tol=1e-15, abs_tol=0.0), (loss, support)
        assert torch.equal(grad_of(out.loss, z), torch.zeros_like(z))
        assert out.student_mass.item() == 0 and out.teacher_mass.item() == 0


def test_renorm_of_a_zero_mass_teacher_is_nan():
    z = torch.randn(2, 5, dtype=F64, requires_grad=True)
    ids = torch.tensor([[0, 1], [2, 3]])
    lp = torch.tensor([[-INF, -INF], [-1.0, -2.0]], dtype=F64)
    out = ref(z, ids, lp, support="renorm", reduction="none")
    assert math.isnan(out.loss[0].item()) and math.isfinite(out.loss[1].item())
    assert torch.isfinite(grad_of(out.loss[1], z)).all()
    assert math.isfinite(ref(z, ids, lp, support="renorm", log_prob_min_clamp=-5.0).loss.item())


def test_invalid_ids_without_checks_give_a_nan_row():
    z, ids, lp = make_inputs(seed=13)
    ids[0, 0] = 9  # == V
    ids[5, 1] = 1000
    mask = torch.ones(6, dtype=torch.bool)
    mask[5] = False
    out = ref(z, ids, lp, reduction="none", check_inputs=False, mask=mask)
    assert math.isnan(out.loss[0].item())
    assert out.loss[5].item() == 0  # masked: does not count
    good = ref(z[1:5], ids[1:5], lp[1:5], reduction="none").loss
    torch.testing.assert_close(out.loss[1:5], good)
    assert torch.isfinite(out.student_mass).all() and torch.isfinite(out.teacher_mass).all()
    # The invalid entry is ignored in the masses.
    ids0 = ids[:1].clone()
    ids0[0, 0] = -1
    torch.testing.assert_close(out.student_mass[:1], ref(z[:1], ids0, lp[:1]).student_mass)
    assert math.isnan(ref(z, ids, lp, check_inputs=False).loss.item())


# ----------------------------------------------------------------------------- shapes, masks, dtypes

def test_leading_dims_mask_and_reductions():
    z, ids, lp = make_inputs(n=6, seed=14)
    mask = torch.tensor([True, False, True, True, False, True])
    for loss, support in itertools.product(["fkl", "tvd", "jsd"], SUPPORTS):
        zz = z.clone().requires_grad_()
        flat = ref(zz, ids, lp, loss=loss, support=support, mask=mask, reduction="none")
        assert flat.loss.shape == (6,)
        assert (flat.loss[~mask] == 0).all()
        assert (flat.student_mass[~mask] == 0).all() and (flat.teacher_mass[~mask] == 0).all()
        unmasked = ref(z, ids, lp, loss=loss, support=support, reduction="none").loss
        torch.testing.assert_close(flat.loss[mask], unmasked[mask])
        g = grad_of(flat.loss, zz)
        assert (g[~mask] == 0).all()
        s = ref(zz, ids, lp, loss=loss, support=support, mask=mask, reduction="sum").loss
        m = ref(zz, ids, lp, loss=loss, support=support, mask=mask).loss
        torch.testing.assert_close(s, flat.loss.sum())
        torch.testing.assert_close(m, flat.loss.sum() / 4)
        # Leading dims [2, 3] are flattened rows.
        nd = ref(zz.reshape(2, 3, -1), ids.reshape(2, 3, -1), lp.reshape(2, 3, -1), loss=loss,
                 support=support, mask=mask.reshape(2, 3), reduction="none")
        assert nd.loss.shape == nd.student_mass.shape == nd.teacher_mass.shape == (2, 3)
        torch.testing.assert_close(nd.loss.reshape(6), flat.loss)
    # A single row [V] gives 0-d per-row outputs.
    one = ref(z[0], ids[0], lp[0], reduction="none")
    assert one.loss.shape == one.student_mass.shape == ()


def test_empty_and_all_masked_give_zero_not_nan():
    z, ids, lp = make_inputs(n=4, seed=15, special_rows=False)
    z.requires_grad_()
    for loss, support, reduction in itertools.product(LOSSES, SUPPORTS, ["mean", "sum"]):
        out = ref(z, ids, lp, loss=loss, support=support, reduction=reduction,
                  mask=torch.zeros(4, dtype=torch.bool))
        assert out.loss.item() == 0
        assert torch.equal(grad_of(out.loss, z), torch.zeros_like(z))
        e = torch.zeros(0, 9, dtype=F64, requires_grad=True)
        out = ref(e, ids[:0], lp[:0], loss=loss, support=support, reduction=reduction)
        assert out.loss.item() == 0 and out.student_mass.shape == (0,)
        assert grad_of(out.loss, e).shape == (0, 9)


def test_dtypes():
    z, ids, lp = make_inputs(seed=16)
    oracle = ref(z, ids, lp, loss="jsd", support="tail", reduction="none")
    assert oracle.loss.dtype == F64 and oracle.student_mass.dtype == torch.float32
    for dtype in [torch.float32, torch.bfloat16, torch.float16]:
        zz = z.to(dtype).requires_grad_()
        out = ref(zz, ids.int(), lp.to(dtype), loss="jsd", support="tail", reduction="none")
        assert out.loss.dtype == out.student_mass.dtype == out.teacher_mass.dtype == torch.float32
        assert grad_of(out.loss, zz).dtype == dtype
        exact = ref(z.to(dtype).double(), ids, lp.to(dtype).double(), loss="jsd", support="tail", reduction="none")
        torch.testing.assert_close(out.loss, exact.loss.float(), rtol=1e-5, atol=1e-6)
    # int32 ids == int64 ids; inplace_backward is accepted and changes nothing here.
    a = ref(z, ids.int(), lp, inplace_backward=True)
    b = ref(z, ids, lp)
    assert torch.equal(a.loss, b.loss)


def test_teacher_gets_no_gradient():
    z, ids, lp = make_inputs(seed=17)
    z.requires_grad_()
    lp = lp.clone().requires_grad_()
    ref(z, ids, lp, loss="jsd", support="tail").loss.backward()
    assert lp.grad is None and z.grad is not None


# ----------------------------------------------------------------------------- validation

def _base():
    z = torch.randn(2, 3, 7)
    ids = torch.randint(0, 7, (2, 3, 2))
    lp = -torch.rand(2, 3, 2)
    return dict(logits=z, teacher_ids=ids, teacher_logprobs=lp)


def _replace(**kw):
    def f(b):
        b.update(kw)
        return b
    return f


BAD = [
    # (what, exception, argument named first in the message)
    (_replace(loss="kl"), ValueError, "loss"),
    (_replace(loss=None), TypeError, "loss"),
    (_replace(support="full"), ValueError, "support"),
    (_replace(reduction="avg"), ValueError, "reduction"),
    (_replace(beta=-0.1), ValueError, "beta"),
    (_replace(beta=1.5), ValueError, "beta"),
    (_replace(beta=float("nan")), ValueError, "beta"),
    (_replace(beta="0.5"), TypeError, "beta"),
    (_replace(rkl_ratio=1.01), ValueError, "rkl_ratio"),
    (_replace(skew=-1e-9), ValueError, "skew"),
    (_replace(temperature=0.0), ValueError, "temperature"),
    (_replace(temperature=-1.0), ValueError, "temperature"),
    (_replace(temperature=INF), ValueError, "temperature"),
    (_replace(temperature=float("nan")), ValueError, "temperature"),
    (_replace(log_prob_min_clamp=0.5), ValueError, "log_prob_min_clamp"),
    (_replace(log_prob_min_clamp=float("nan")), ValueError, "log_prob_min_clamp"),
    (_replace(t2_scale=1), TypeError, "t2_scale"),
    (_replace(check_inputs="yes"), TypeError, "check_inputs"),
    (_replace(vocab_start=3), ValueError, "vocab_start"),
    (_replace(vocab_start=1.5), TypeError, "vocab_start"),
    (lambda b: {**b, "logits": b["logits"].long()}, TypeError, "logits"),
    (lambda b: {**b, "logits": b["logits"].tolist()}, TypeError, "logits"),
    (lambda b: {**b, "teacher_ids": b["teacher_ids"].float()}, TypeError, "teacher_ids"),
    (lambda b: {**b, "teacher_ids": b["teacher_ids"].short()}, TypeError, "teacher_ids"),
    (lambda b: {**b, "teacher_logprobs": b["teacher_logprobs"].long()}, TypeError, "teacher_logprobs"),
    (lambda b: {**b, "teacher_ids": b["teacher_ids"][:1]}, ValueError, "teacher_ids"),
    (lambda b: {**b, "teacher_ids": b["teacher_ids"].reshape(6, 2)}, ValueError, "teacher_ids"),
    (lambda b: {**b, "teacher_logprobs": b["teacher_logprobs"][..., :1]}, ValueError, "teacher_logprobs"),
    (lambda b: {**b, "mask": torch.ones(2, 3)}, TypeError, "mask"),
    (lambda b: {**b, "mask": torch.ones(3, 2, dtype=torch.bool)}, ValueError, "mask"),
    (lambda b: {**b, "teacher_ids": b["teacher_ids"][..., :0],
                "teacher_logprobs": b["teacher_logprobs"][..., :0]}, ValueError, "teacher_ids"),
    (lambda b: {**b, "logits": b["logits"][..., :0]}, ValueError, "logits"),
    (lambda b: {**b, "teacher_ids": b["teacher_ids"].to("meta")}, ValueError, "teacher_ids"),
    (lambda b: {**b, "mask": torch.ones(2, 3, dtype=torch.bool, device="meta")}, ValueError, "mask"),
    # data checks (check_inputs=True)
    (lambda b: {**b, "teacher_ids": b["teacher_ids"].index_fill(-1, torch.tensor([0]), 7)}, ValueError, "teacher_ids"),
    (lambda b: {**b, "teacher_logprobs": b["teacher_logprobs"].index_fill(-1, torch.tensor([1]), float("nan"))},
     ValueError, "teacher_logprobs"),
    (lambda b: {**b, "teacher_logprobs": b["teacher_logprobs"].index_fill(-1, torch.tensor([1]), 1e-3)},
     ValueError, "teacher_logprobs"),
]


@pytest.mark.parametrize("bad,exc,name", BAD, ids=[f"{i}-{c[2]}" for i, c in enumerate(BAD)])
def test_validation_errors(bad, exc, name):
    kw = bad(_base())
    with pytest.raises(exc, match=rf"^{name}\b"):
        ref(kw.pop("logits"), kw.pop("teacher_ids"), kw.pop("teacher_logprobs"), **kw)


def test_valid_edge_arguments_are_accepted():
    b = _base()
    args = (b["logits"], b["teacher_ids"], b["teacher_logprobs"])
    for kw in [dict(beta=0), dict(beta=1), dict(skew=0, loss="srkl"), dict(skew=1), dict(rkl_ratio=1),
               dict(log_prob_min_clamp=0.0), dict(log_prob_min_clamp=-INF), dict(vocab_start=0),
               dict(temperature=1e-3), dict(check_inputs=False)]:
        assert torch.isfinite(ref(*args, **kw).loss)
    # Data checks ignore padding entries and masked rows.
    ids, lp = b["teacher_ids"].clone(), b["teacher_logprobs"].clone()
    ids[0, 0, 0], lp[0, 0, 0] = -1, float("nan")
    ids[1, 2, 1], lp[1, 2, 1] = 99, 5.0
    mask = torch.ones(2, 3, dtype=torch.bool)
    mask[1, 2] = False
    assert torch.isfinite(ref(b["logits"], ids, lp, mask=mask).loss)


# ----------------------------------------------------------------------------- tensor parallelism

def _tp_worker(rank, world_size):
    import torch.distributed as dist

    assert world_size == 3
    z, ids, lp = make_inputs(n=6, v=11, k=4, seed=21)
    lp[0, 2] = -INF
    ids[5] = torch.tensor([9, 10, 10, -1])  # duplicates, all in the last shard
    mask = torch.tensor([True, True, False, True, True, True]).reshape(2, 3)
    z, ids, lp = z.reshape(2, 3, 11), ids.reshape(2, 3, 4), lp.reshape(2, 3, 4)
    pair = dist.new_group([0, 1])  # every rank must call new_group
    # (group, sizes per rank, vocab_start per rank or None for the default)
    splits = [(None, [3, 5, 3], None), (None, [4, 2, 5], [7, 0, 2]), (pair, [7, 4], None)]
    configs = [dict(loss=l, support=s) for l, s in itertools.product(LOSSES, SUPPORTS)]
    configs += [dict(loss="jsd", support="tail", log_prob_min_clamp=-2.0, temperature=1.7, t2_scale=True,
                     mask=mask, reduction="sum"),
                dict(loss="tvd", support="topk", mask=mask, reduction="none"),
                dict(loss="srkl", support="renorm", log_prob_min_clamp=-3.0, reduction="none")]
    checked = 0
    for group, sizes, starts in splits:
        if group is not None and rank >= len(sizes):
            continue
        grank = dist.get_rank(group)
        start = sum(sizes[:grank]) if starts is None else starts[grank]
        for dtype in [F64, torch.float32]:
            for cfg in configs:
                full = z.to(dtype).requires_grad_()
                want = ref(full, ids, lp, **cfg)
                (gw,) = torch.autograd.grad(want.loss.sum(), full)
                local = z[..., start:start + sizes[grank]].to(dtype).requires_grad_()
                pg = group if group is not None else dist.group.WORLD
                got = ref(local, ids, lp, tp_group=pg if cfg["loss"] != "tvd" else pg.group_name,
                          vocab_start=None if starts is None else start, **cfg)
                (gg,) = torch.autograd.grad(got.loss.sum(), local)
                tol = dict(rtol=1e-12, atol=1e-14) if dtype == F64 else dict(rtol=1e-5, atol=1e-6)
                torch.testing.assert_close(got.loss, want.loss, equal_nan=True, **tol)
                torch.testing.assert_close(got.student_mass, want.student_mass, **tol)
                torch.testing.assert_close(got.teacher_mass, want.teacher_mass, **tol)
                torch.testing.assert_close(gg, gw[..., start:start + sizes[grank]], equal_nan=True, **tol)
                checked += 1
    # Empty input under TP.
    e = torch.zeros(0, [3, 5, 3][rank], dtype=F64, requires_grad=True)
    out = ref(e, ids.reshape(6, 4)[:0], lp.reshape(6, 4)[:0], tp_group=dist.group.WORLD)
    assert out.loss.item() == 0 and grad_of(out.loss, e).shape == e.shape
    # Cross-rank errors are raised on every rank (nobody hangs).
    errors = []
    k = 4 if rank else 3
    try:
        ref(z[..., :3], ids[..., :k], lp[..., :k], tp_group=dist.group.WORLD)
    except ValueError as err:
        errors.append(str(err))
    try:  # shards that overlap instead of tiling [0, V)
        ref(z[..., :3], ids, lp, tp_group=dist.group.WORLD, vocab_start=[0, 0, 3][rank])
    except ValueError as err:
        errors.append(str(err))
    try:  # an id beyond the full vocab (V = 9 here)
        ids_bad = ids.clone()
        ids_bad[0, 0, 0] = 9
        ref(z[..., :3], ids_bad, lp, tp_group=dist.group.WORLD)
    except ValueError as err:
        errors.append(str(err))
    return checked, errors


def test_tensor_parallel_matches_unsharded():
    results = run_distributed(_tp_worker, world_size=3)
    n_cfg = 2 * (len(LOSSES) * len(SUPPORTS) + 3)
    assert [r[0] for r in results] == [3 * n_cfg, 3 * n_cfg, 2 * n_cfg]
    for _, errors in results:
        assert len(errors) == 3
        assert errors[0].startswith("teacher_ids")
        assert errors[1].startswith("vocab_start")
        assert errors[2].startswith("teacher_ids")
