"""Pins the SPEC section 9 additions of topk_distill.reference (the oracle) to SPEC + DECISIONS 17-25.

Every check is against an independent float64 computation of the definition: ``log_softmax`` +
``gather`` for label log-probs, ``-sum q log q`` for the entropy, the SPEC 9.2 closed-form
gradients, ``torch.topk`` / a Python sort for the student's top-k, a per-entry loop for the overlap,
scalar ``math`` for missing entries and covered rows, TRL's ``generalized_jsd_loss`` formulas over
the full vocabulary for issue 18, and the unsharded call for tensor parallelism.
"""
import itertools
import math
import os
import pickle
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))

from _dist_utils import run_distributed  # noqa: E402
import topk_distill as td  # noqa: E402
from topk_distill import reference  # noqa: E402
from topk_distill._types import Term, TopKDistillOutput  # noqa: E402
from topk_distill._validate import UNSET, validate_args, validate_options  # noqa: E402
from _v2 import expected_overlap  # noqa: E402
from _inputs import LOSSES, SUPPORTS  # noqa: E402

ref = reference.topk_distill_loss
F64 = torch.float64
INF = float("inf")
NAN = float("nan")


def make_inputs(n=6, v=9, k=4, seed=0, dtype=F64, scale=1.5):
    """Student logits [n, v]; teacher ids (distinct per row) and their log-probs under a random
    teacher distribution; row 1 has a padding entry, row 2 a duplicated id."""
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(n, v, generator=g, dtype=F64) * scale).to(dtype)
    teacher = torch.log_softmax(torch.randn(n, v, generator=g, dtype=F64) * scale, -1)
    ids = torch.stack([torch.randperm(v, generator=g)[:k] for _ in range(n)])
    if n >= 3 and k >= 2:
        ids[1, -1] = -1
        ids[2, 1] = ids[2, 0]
    lp = torch.where(ids >= 0, teacher.gather(-1, ids.clamp_min(0)), 0.0)
    return z, ids, lp


def grad_of(out, z, upstream=None):
    upstream = torch.ones_like(out) if upstream is None else upstream
    (g,) = torch.autograd.grad(out, z, upstream, retain_graph=True)
    return g


# ----------------------------------------------------------------------------- scalar brute force

def _kl(x, y):
    return sum(math.inf if yi == 0 else xi * math.log(xi / yi) for xi, yi in zip(x, y) if xi > 0)


def _divergence(a, b, loss, beta, rkl_ratio, skew):
    if loss == "fkl" or (loss == "jsd" and beta == 0):
        return _kl(a, b)
    if loss == "rkl" or (loss == "jsd" and beta == 1):
        return _kl(b, a)
    if loss == "jsd":
        m = [beta * x + (1 - beta) * y for x, y in zip(a, b)]
        return beta * _kl(a, m) + (1 - beta) * _kl(b, m)
    if loss == "fkl+rkl":
        parts = [(1 - rkl_ratio, _kl(a, b)), (rkl_ratio, _kl(b, a))]
        return sum(w * d for w, d in parts if w != 0)
    if loss == "tvd":
        return 0.5 * sum(abs(x - y) for x, y in zip(a, b))
    if loss == "skl":
        return _kl(a, [skew * x + (1 - skew) * y for x, y in zip(a, b)])
    return _kl(b, [skew * y + (1 - skew) * x for x, y in zip(a, b)])


def brute(z, ids, bin_l, mass_l=None, *, loss, support, beta=0.5, rkl_ratio=0.1, skew=0.1,
          T=1.0, clamp=None):
    """One row straight from SPEC 3 + DECISIONS 1-8, 20, 21, with scalar math.

    ids: entries that count (others must be given as -1); bin_l: each entry's teacher log-prob in
    the bins (before the clamp); mass_l: its log-prob in P (default bin_l; -inf for a floored
    entry). Coverage (DECISIONS 20): the distinct ids are all len(z) columns."""
    mass_l = bin_l if mass_l is None else mass_l
    zt = [x / T for x in z]
    mx = max(zt)
    lse = mx + math.log(sum(math.exp(x - mx) for x in zt))
    ent = [(zt[i] - lse, lb, lm) for i, lb, lm in zip(ids, bin_l, mass_l) if i >= 0]
    covered = len({i for i in ids if i >= 0}) == len(z)
    Q = sum(math.exp(s) for s, _, _ in ent)
    P = sum(math.exp(lm) for _, _, lm in ent)
    cl = (lambda x: x) if clamp is None else (lambda x: max(x, clamp))
    a = [math.exp(cl(lb)) for _, lb, _ in ent]
    b = [math.exp(cl(s)) for s, _, _ in ent]
    if support == "renorm":
        if not ent:
            return 0.0
        a = [x / sum(a) for x in a]
        b = [x / sum(b) for x in b]
    if support == "tail" and not covered:
        # q_tail from the columns that are not teacher ids (no cancellation), minus the copies.
        others = sum(math.exp(zt[v] - lse) for v in range(len(z)) if v not in set(ids))
        seen, dup_mass = set(), 0.0
        for i, (s, _, _) in zip([i for i in ids if i >= 0], ent):
            dup_mass += math.exp(s) if i in seen else 0.0
            seen.add(i)
        a, b = a + [max(1 - P, 0.0)], b + [max(others - dup_mass, 0.0)]
    d = _divergence(a, b, loss, beta, rkl_ratio, skew)
    if support == "topk":
        u = 0.0 if covered else 1 - Q  # DECISIONS 4, 20: linear, exactly 0 when covered
        if loss == "jsd" and 0 < beta < 1:
            d += (1 - beta) * u * math.log(1 / (1 - beta))
        elif loss == "tvd":
            d += 0.5 * u
        elif loss == "srkl" and skew > 0:
            d += u * math.log(1 / skew)
    return d


# ----------------------------------------------------------------------------- types and API

def test_types_and_exports():
    assert td.Term is Term and Term("fkl") == ("fkl", "topk", 1.0, 0.5, 0.1, 0.1)
    assert TopKDistillOutput._fields == (
        "loss", "student_mass", "teacher_mass", "label_logprobs", "entropy", "student_topk_ids",
        "student_topk_logprobs", "overlap_count", "overlap_token_advantage")
    out = TopKDistillOutput(1, 2, 3)  # the old three-field construction still works
    assert out[3:] == (None,) * 6
    z, ids, lp = make_inputs()
    out = ref(z, ids, lp)
    assert out[3:] == (None,) * 6
    assert repr(UNSET) == "UNSET" and pickle.loads(pickle.dumps(UNSET)) is UNSET


def test_options_normalisation_and_old_style_calls():
    old = validate_options(loss="jsd", support="tail", beta=0.3, rkl_ratio=0.2, skew=0.4)
    assert (old.loss, old.support, old.beta, old.rkl_ratio, old.skew) == ("jsd", "tail", 0.3, 0.2, 0.4)
    assert old.terms == (Term("jsd", "tail", 1.0, 0.3, 0.2, 0.4),)
    dflt = validate_options()
    assert (dflt.support, dflt.beta, dflt.rkl_ratio, dflt.skew) == ("topk", 0.5, 0.1, 0.1)
    assert (dflt.return_entropy, dflt.student_topk, dflt.missing_teacher) == (False, None, "error")
    mix = validate_options(loss=[("fkl", "topk", 0.9), ["rkl", "renorm", 1]])
    assert mix.terms == (Term("fkl", "topk", 0.9), Term("rkl", "renorm", 1.0)) and mix.loss == mix.terms
    assert (mix.support, mix.beta, mix.rkl_ratio, mix.skew) == (None,) * 4
    assert isinstance(mix.terms[1].weight, float)
    assert validate_options(loss=Term("tvd")).terms == (Term("tvd"),)  # a lone Term
    z, ids, lp = make_inputs()
    args = validate_args(z, ids, lp, loss=[("fkl",)], student_topk=3, labels=ids[:, 0])
    assert args.options.terms == (Term("fkl"),) and args.student_topk == 3 and args.n_rows == 6


# ----------------------------------------------------------------------------- label log-probs

@pytest.mark.parametrize("T", [1.0, 1.7])
def test_label_logprobs_are_the_log_softmax_gather(T):
    z, ids, lp = make_inputs(n=6, seed=1)
    labels = torch.tensor([3, -1, 0, 8, -100, 5])
    mask = torch.tensor([True, True, True, True, True, False])
    z = z.reshape(2, 3, 9).requires_grad_()
    out = ref(z, ids.reshape(2, 3, 4), lp.reshape(2, 3, 4), labels=labels.reshape(2, 3).int(),
              mask=mask.reshape(2, 3), temperature=T, t2_scale=True)
    assert out.label_logprobs.shape == (2, 3) and out.label_logprobs.dtype == F64
    logq = torch.log_softmax(z.detach().reshape(6, 9) / T, -1)
    use = (labels >= 0) & mask
    want = torch.where(use, logq.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1), 0.0)
    torch.testing.assert_close(out.label_logprobs.reshape(6), want, rtol=1e-14, atol=1e-15)
    assert (out.label_logprobs.reshape(6)[~use] == 0).all()

    # SPEC 9.2: d label_logprobs / dz_v = (1/T) ([v == y] - q_v), times the upstream gradient.
    w = torch.tensor([0.3, -1.2, 2.0, 0.7, 1.1, 5.0], dtype=F64)
    g = grad_of(out.label_logprobs, z, w.reshape(2, 3)).reshape(6, 9)
    onehot = F.one_hot(labels.clamp_min(0), 9).to(F64)
    want_g = torch.where(use.unsqueeze(-1), w.unsqueeze(-1) * (onehot - logq.exp()) / T, 0.0)
    torch.testing.assert_close(g, want_g, rtol=1e-12, atol=1e-15)
    assert (g[~use] == 0).all()

    # fp32 logits: fp32 label log-probs; per row, whatever the reduction.
    out32 = ref(z.detach().float(), ids.reshape(2, 3, 4), lp.reshape(2, 3, 4), labels=labels.reshape(2, 3),
                temperature=T, reduction="sum")
    assert out32.label_logprobs.dtype == torch.float32 and out32.label_logprobs.shape == (2, 3)


def test_label_out_of_range_without_checks_is_a_nan_row():
    z, ids, lp = make_inputs(n=4, seed=2)
    z.requires_grad_()
    labels = torch.tensor([1, 9, 2**40, 4])  # V = 9
    mask = torch.tensor([True, True, False, True])
    out = ref(z, ids, lp, labels=labels, mask=mask, check_inputs=False, reduction="none")
    lab = out.label_logprobs
    assert math.isnan(lab[1].item()) and lab[2].item() == 0  # masked: 0, never checked
    good = ref(z, ids, lp, labels=torch.tensor([1, -1, -1, 4]), reduction="none").label_logprobs
    assert torch.equal(lab[[0, 3]], good[[0, 3]])
    assert torch.isfinite(out.loss).all()  # a bad label does not touch the loss
    g = grad_of(lab, z, torch.tensor([1.0, 1.0, 1.0, 1.0], dtype=F64))
    assert torch.isnan(g[1]).all() and torch.isfinite(g[[0, 2, 3]]).all() and (g[2] == 0).all()
    g0 = grad_of(lab, z, torch.tensor([1.0, 0.0, 1.0, 1.0], dtype=F64))  # no upstream: 0
    assert (g0[1] == 0).all()
    # The loss's gradient is unaffected by the bad label.
    assert torch.isfinite(grad_of(out.loss, z)).all()
    with pytest.raises(ValueError, match="^labels has a label >= the vocab size V=9"):
        ref(z, ids, lp, labels=labels, mask=mask)
    ref(z, ids, lp, labels=torch.tensor([1, -7, 2**40, 4]), mask=mask)  # ignored / masked: fine


# ----------------------------------------------------------------------------- entropy

@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_entropy_definition_and_gradient(dtype):
    T = 1.3
    z, ids, lp = make_inputs(n=5, v=8, seed=3)
    z[1, 2] = -INF  # q = 0 exactly: contributes 0, gradient exactly 0, never NaN
    z[3, :] = torch.tensor([5e3, 0, 0, 0, 0, 0, 0, 0])  # everything but one column underflows
    mask = torch.tensor([True, True, True, True, False])
    z = z.to(dtype).requires_grad_()
    out = ref(z, ids, lp, return_entropy=True, mask=mask, temperature=T, t2_scale=True)
    ent = out.entropy
    assert ent.dtype == (F64 if dtype == F64 else torch.float32) and ent.shape == (5,)
    logq = torch.log_softmax(z.detach().double() / T, -1)
    q = logq.exp()
    want = -(q * torch.where(q > 0, logq, 0.0)).sum(-1)
    want[~mask] = 0
    rtol = 1e-13 if dtype == F64 else 1e-5
    torch.testing.assert_close(ent.double(), want, rtol=rtol, atol=rtol)
    assert ent[3].item() == 0 and ent[4].item() == 0

    # SPEC 9.2: d entropy / dz_v = -(1/T) q_v (log q_v + entropy).
    w = torch.tensor([1.0, -0.5, 2.0, 1.0, 3.0], dtype=F64)
    g = grad_of(ent, z, w.to(ent.dtype)).double()
    qlogq = torch.where(q > 0, q * logq, 0.0)
    want_g = -(w.unsqueeze(-1) / T) * (qlogq + q * want.unsqueeze(-1))
    want_g[~mask] = 0
    torch.testing.assert_close(g, want_g, rtol=rtol, atol=rtol)
    assert g[1, 2].item() == 0 and (g[4] == 0).all() and torch.isfinite(g).all()


def test_entropy_and_labels_of_non_finite_and_masked_rows():
    z, ids, lp = make_inputs(n=4, seed=4)
    z[0, 3] = NAN
    z[1, 5] = INF
    z[2, 1] = INF  # masked: its logits never enter the arithmetic
    mask = torch.tensor([True, True, False, True])
    z.requires_grad_()
    labels = torch.tensor([0, 0, 0, -1])
    out = ref(z, ids, lp, return_entropy=True, labels=labels, mask=mask, reduction="none")
    for t in (out.entropy, out.label_logprobs, out.loss):
        assert torch.isnan(t[:2]).all() and t[2].item() == 0, t
    assert out.entropy[3].isfinite() and out.label_logprobs[3].item() == 0
    for t in (out.entropy, out.label_logprobs, out.loss):
        g = grad_of(t, z)
        assert torch.isnan(g[:2]).all(), t  # DECISIONS 15: all-NaN rows
        assert (g[2] == 0).all()  # DECISIONS 10: masked, even with inf logits
        assert torch.isfinite(g[3]).all()
    assert (grad_of(out.label_logprobs, z)[3] == 0).all()  # ignored label: zero gradient


# ----------------------------------------------------------------------------- gradcheck

@pytest.mark.parametrize("loss,support,clamp,T", [
    ("jsd", "tail", -2.5, 1.3), ("rkl", "renorm", -3.0, 0.8),
    ([("fkl", "topk", 0.9), ("rkl", "renorm", 0.1)], None, None, 1.0),
    ([Term("tvd", "tail", -0.7), Term("srkl", "topk", 1.5, skew=0.3)], None, -4.0, 2.0),
])
def test_gradcheck_of_loss_labels_and_entropy(loss, support, clamp, T):
    z, ids, lp = make_inputs(n=5, v=6, k=3, seed=5)
    z.requires_grad_()
    labels = torch.tensor([0, 5, -1, 2, 3])
    mask = torch.tensor([True, True, True, False, True])
    kw = dict(loss=loss, log_prob_min_clamp=clamp, temperature=T, labels=labels, mask=mask,
              return_entropy=True, reduction="none")
    if support is not None:
        kw["support"] = support

    def each(x):
        out = ref(x, ids, lp, **kw)
        return out.loss, out.label_logprobs, out.entropy

    def weighted(x):
        out = ref(x, ids, lp, **kw)
        return 0.7 * out.loss + 1.3 * out.label_logprobs - 0.4 * out.entropy

    assert torch.autograd.gradcheck(each, (z,), eps=1e-6, atol=1e-7)
    assert torch.autograd.gradcheck(weighted, (z,), eps=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------- mixtures

def test_mixture_of_every_loss_and_support_is_the_weighted_sum_of_single_calls():
    z, ids, lp = make_inputs(n=6, v=9, k=4, seed=6)
    g = torch.Generator().manual_seed(7)
    terms = []
    for loss, support in itertools.product(LOSSES, SUPPORTS):
        w = float(torch.randn((), generator=g, dtype=F64))
        beta, ratio, skew = (float(x) for x in torch.rand(3, generator=g, dtype=F64))
        terms.append(Term(loss, support, w, beta, ratio, skew))
    mask = torch.tensor([True, True, False, True, True, True])
    for kw in [dict(), dict(log_prob_min_clamp=-2.0, temperature=1.6, t2_scale=True, mask=mask)]:
        for reduction in ["none", "mean"]:
            zz = z.clone().requires_grad_()
            mix = ref(zz, ids, lp, loss=terms, reduction=reduction, **kw).loss
            singles = [t.weight * ref(zz, ids, lp, loss=t.loss, support=t.support, beta=t.beta,
                                      rkl_ratio=t.rkl_ratio, skew=t.skew, reduction=reduction,
                                      **kw).loss for t in terms]
            want = sum(singles)
            torch.testing.assert_close(mix, want, rtol=1e-12, atol=1e-13)
            torch.testing.assert_close(grad_of(mix, zz), grad_of(want, zz), rtol=1e-11, atol=1e-13)
    # Tuple forms are read as Term(*t).
    zz = z.clone().requires_grad_()
    a = ref(zz, ids, lp, loss=[("fkl",), ("jsd", "tail"), ["tvd", "renorm", 0.25],
                               ("skl", "topk", 2.0, 0.5, 0.1, 0.3)], reduction="none").loss
    b = ref(zz, ids, lp, loss=[Term("fkl"), Term("jsd", "tail"), Term("tvd", "renorm", 0.25),
                               Term("skl", "topk", 2.0, skew=0.3)], reduction="none").loss
    assert torch.equal(a, b)


@pytest.mark.parametrize("support", SUPPORTS)
def test_one_term_list_is_bitwise_the_plain_call(support):
    z, ids, lp = make_inputs(seed=8)
    for loss in LOSSES:
        kw = dict(beta=0.3, rkl_ratio=0.4, skew=0.2)
        for clamp in [None, -2.0]:
            z1, z2, z3 = (z.clone().requires_grad_() for _ in range(3))
            plain = ref(z1, ids, lp, loss=loss, support=support, log_prob_min_clamp=clamp,
                        reduction="none", **kw).loss
            term = Term(loss, support, 1.0, kw["beta"], kw["rkl_ratio"], kw["skew"])
            as_list = ref(z2, ids, lp, loss=[term], log_prob_min_clamp=clamp, reduction="none").loss
            alone = ref(z3, ids, lp, loss=term, log_prob_min_clamp=clamp, reduction="none").loss
            assert torch.equal(plain, as_list) and torch.equal(plain, alone), (loss, clamp)
            assert torch.equal(grad_of(plain, z1), grad_of(as_list, z2))
            assert torch.equal(grad_of(plain, z1), grad_of(alone, z3))
    # Defaults of a tuple term are the SPEC 8 defaults.
    assert torch.equal(ref(z, ids, lp, loss=[("jsd", support)]).loss,
                       ref(z, ids, lp, loss="jsd", support=support).loss)


def test_zero_weight_drops_an_infinite_term():
    z, ids, lp = make_inputs(n=3, seed=9)
    lp[0, 0] = -INF  # RKL against a teacher probability of 0: +inf
    z.requires_grad_()
    fkl = ref(z, ids, lp, loss="fkl", reduction="none").loss
    assert ref(z, ids, lp, loss="rkl", reduction="none").loss[0].item() == INF
    mix = ref(z, ids, lp, loss=[("fkl", "topk", 1.0), ("rkl", "topk", 0.0)], reduction="none").loss
    assert torch.equal(mix, fkl) and torch.isfinite(grad_of(mix, z)).all()
    tiny = ref(z, ids, lp, loss=[("fkl", "topk", 1.0), ("rkl", "topk", 1e-3)], reduction="none").loss
    assert tiny[0].item() == INF and torch.isnan(grad_of(tiny, z)[0]).all()
    zero = ref(z, ids, lp, loss=[("rkl", "topk", 0.0)], reduction="none").loss
    assert (zero == 0).all() and (grad_of(zero, z) == 0).all()


# ----------------------------------------------------------------------------- student top-k

def _expected_topk(z, k):
    """Python sort by (-logit, id): descending, equal logits -> lower id first."""
    rows = [sorted(range(len(r)), key=lambda v: (-r[v], v))[:k] for r in z.tolist()]
    return torch.tensor(rows, dtype=torch.int64)


@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16])
def test_student_topk_against_torch_topk_and_planted_ties(dtype):
    g = torch.Generator().manual_seed(10)
    n, v, T = 6, 12, 1.5
    z = torch.randn(n, v, generator=g, dtype=F64).to(dtype)
    logq64 = torch.log_softmax(z.double() / T, -1)
    for k in [1, 4, v]:
        ids, lps = reference.student_topk(z, k, temperature=T)
        assert ids.dtype == torch.int64 and lps.dtype == torch.float32 and ids.shape == (n, k)
        want = torch.topk(logq64, k, dim=-1)  # no ties in random fp64 / fp32 draws
        if dtype != torch.bfloat16:
            assert torch.equal(ids, want.indices)
        assert torch.equal(ids, _expected_topk(z.double(), k))
        torch.testing.assert_close(lps.double(), logq64.gather(-1, ids), rtol=2e-7, atol=1e-7)
        assert (lps[:, 1:] <= lps[:, :-1]).all()
    # Planted ties: equal logits come out lower id first, also when k cuts a tie group.
    zt = torch.tensor([[1.0, 3.0, 3.0, -2.0, 3.0, 1.0, 0.5],
                       [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
                       [-INF, 2.0, -INF, 2.0, 7.0, -1.0, 2.0]], dtype=F64).to(dtype)
    for k in [1, 2, 3, 4, 5, 7]:
        ids, lps = reference.student_topk(zt, k)
        assert torch.equal(ids, _expected_topk(zt.double(), k)), (k, ids)
    ids, lps = reference.student_topk(zt, 7)
    assert ids[0].tolist() == [1, 2, 4, 0, 5, 6, 3] and ids[1].tolist() == list(range(7))
    assert ids[2].tolist() == [4, 1, 3, 6, 5, 0, 2] and lps[2, -1].item() == -INF
    # Leading dims, and the loss call returns the same tensors (masked rows included).
    z3 = z.reshape(2, 3, v)
    ids3, lps3 = reference.student_topk(z3, 5, temperature=T)
    assert ids3.shape == lps3.shape == (2, 3, 5)
    tids = torch.randint(0, v, (2, 3, 4), generator=g)
    out = ref(z3, tids, torch.full((2, 3, 4), -2.0), student_topk=5, temperature=T,
              mask=torch.tensor([[True, False, True], [False, True, True]]))
    assert torch.equal(out.student_topk_ids, ids3) and torch.equal(out.student_topk_logprobs, lps3)
    assert out.overlap_count.shape == out.overlap_token_advantage.shape == (2, 3)
    assert out.overlap_count[0, 1] == 0 and out.overlap_count[1, 0] == 0


@pytest.mark.parametrize("clamp", [None, -2.0])
def test_overlap_against_a_direct_recomputation(clamp):
    T = 0.9
    z, ids, lp = make_inputs(n=8, v=10, k=5, seed=11, scale=2.0)
    ids[3] = -1  # all padding: 0, 0
    lp[4, 0] = -INF  # teacher probability 0: adds 0 (verl would give NaN)
    ids[5, :3] = torch.topk(z[5], 3).indices  # surely overlapping
    mask = torch.ones(8, dtype=torch.bool)
    mask[6] = False
    out = ref(z, ids, lp, student_topk=3, temperature=T, log_prob_min_clamp=clamp, mask=mask,
              reduction="none")
    count, adv = expected_overlap(z, ids, lp, out.student_topk_ids, mask, clamp, T)
    assert out.overlap_count.dtype == torch.int64 and out.overlap_token_advantage.dtype == torch.float32
    assert torch.equal(out.overlap_count, count)
    torch.testing.assert_close(out.overlap_token_advantage.double(), adv, rtol=1e-6, atol=1e-7)
    assert count[5] >= 3 and count[3] == 0 and count[6] == 0
    assert torch.isfinite(out.overlap_token_advantage).all()
    # Duplicated teacher ids count once per entry (row 2 duplicates its first id).
    full = ref(z, ids, lp, student_topk=10, reduction="none")
    assert full.overlap_count[2].item() == 5 and full.overlap_count[1].item() == 4


# ----------------------------------------------------------------------------- missing teacher

def _with_missing(seed=12):
    z, ids, lp = make_inputs(n=6, v=9, k=4, seed=seed)
    miss = torch.zeros_like(ids, dtype=torch.bool)
    miss[0, 1] = miss[2, 1] = miss[4, 0] = miss[4, 3] = True  # row 2: the duplicate's copy
    miss[5, :] = True  # every entry missing
    return z, ids, torch.where(miss, NAN, lp), lp, miss


@pytest.mark.parametrize("support", SUPPORTS)
def test_missing_drop_is_padding(support):
    z, ids, lp_nan, _, miss = _with_missing()
    padded = torch.where(miss, -1, ids)
    for loss in LOSSES:
        for clamp in [None, -2.5]:
            z1, z2 = z.clone().requires_grad_(), z.clone().requires_grad_()
            kw = dict(loss=loss, support=support, log_prob_min_clamp=clamp, reduction="none",
                      student_topk=4)
            a = ref(z1, ids, lp_nan, missing_teacher="drop", **kw)
            b = ref(z2, padded, torch.where(miss, 0.0, lp_nan), **kw)
            for name in ["loss", "student_mass", "teacher_mass", "overlap_count",
                         "overlap_token_advantage"]:
                assert torch.equal(getattr(a, name), getattr(b, name)), (loss, clamp, name)
            assert torch.equal(grad_of(a.loss, z1), grad_of(b.loss, z2))


@pytest.mark.parametrize("support", SUPPORTS)
def test_missing_floor_against_scalar_math(support):
    c, T = -3.0, 1.2
    z, ids, lp_nan, _, miss = _with_missing(seed=13)
    kw = dict(beta=0.3, rkl_ratio=0.25, skew=0.2)
    for loss in LOSSES:
        out = ref(z, ids, lp_nan, loss=loss, support=support, missing_teacher="floor",
                  log_prob_min_clamp=c, temperature=T, reduction="none", **kw)
        for r in range(6):
            bin_l = [c if m else x for m, x in zip(miss[r].tolist(), lp_nan[r].tolist())]
            mass_l = [-INF if m else x for m, x in zip(miss[r].tolist(), lp_nan[r].tolist())]
            want = brute(z[r].tolist(), ids[r].tolist(), bin_l, mass_l, loss=loss, support=support,
                         T=T, clamp=c, **kw)
            assert math.isclose(out.loss[r].item(), want, rel_tol=1e-10, abs_tol=1e-13), (loss, r)
        # In student_mass and in the bins, out of teacher_mass.
        q = torch.softmax(z / T, -1)
        valid = ids >= 0
        sm = torch.where(valid, q.gather(-1, ids.clamp_min(0)), 0.0).sum(-1)
        tm = torch.where(valid & ~miss, lp_nan.exp(), 0.0).nan_to_num().sum(-1)
        torch.testing.assert_close(out.student_mass, sm.float())
        torch.testing.assert_close(out.teacher_mass, tm.float())
        assert out.teacher_mass[5].item() == 0


def test_missing_floor_counts_in_the_overlap_with_the_clamp():
    c = -2.0
    z, ids, lp_nan, lp, miss = _with_missing(seed=14)
    out = ref(z, ids, lp_nan, missing_teacher="floor", log_prob_min_clamp=c, student_topk=9,
              reduction="none")  # k = V: every entry that counts overlaps
    floored = torch.where(miss, c, lp_nan)
    count, adv = expected_overlap(z, ids, floored, out.student_topk_ids,
                                   torch.ones(6, dtype=torch.bool), c, 1.0)
    assert torch.equal(out.overlap_count, count) and count[5] == 4
    torch.testing.assert_close(out.overlap_token_advantage.double(), adv, rtol=1e-6, atol=1e-7)


def test_missing_error_mode():
    z, ids, lp_nan, _, _ = _with_missing()
    with pytest.raises(ValueError, match=r'^teacher_logprobs has a NaN entry.*missing_teacher="drop"'):
        ref(z, ids, lp_nan)
    # check_inputs=False: the NaN propagates into its row only.
    out = ref(z, ids, lp_nan, check_inputs=False, reduction="none")
    assert torch.isnan(out.loss[[0, 2, 4, 5]]).all() and torch.isfinite(out.loss[[1, 3]]).all()
    # NaN in padding entries or masked rows is never looked at.
    ids2 = torch.where(torch.isnan(lp_nan), -1, ids)
    ref(z, ids2, lp_nan)
    ref(z, ids, lp_nan, mask=torch.tensor([False, True, False, True, False, False]))
    # A positive log-prob is an error in every mode; a missing entry's id is still checked.
    for mode, clamp in [("drop", None), ("floor", -5.0)]:
        bad = lp_nan.clone()
        bad[1, 0] = 0.1
        with pytest.raises(ValueError, match="^teacher_logprobs has an entry > 0"):
            ref(z, ids, bad, missing_teacher=mode, log_prob_min_clamp=clamp)
        bad_ids = ids.clone()
        bad_ids[0, 1] = 9  # its log-prob is NaN (missing)
        with pytest.raises(ValueError, match="^teacher_ids has an id >= the vocab size"):
            ref(z, bad_ids, lp_nan, missing_teacher=mode, log_prob_min_clamp=clamp)
        out = ref(z, bad_ids, lp_nan, missing_teacher=mode, log_prob_min_clamp=clamp,
                  check_inputs=False, reduction="none")
        assert math.isnan(out.loss[0].item()) and torch.isfinite(out.loss[1:]).all()


# ----------------------------------------------------------------------------- issue 18: coverage

def _trl_jsd(student_logp, teacher_logp, beta):
    """TRL's generalized_jsd_loss (GKD) per row over the full vocab, float64, its formulas."""
    if beta == 0:
        return F.kl_div(student_logp, teacher_logp, reduction="none", log_target=True).sum(-1)
    if beta == 1:
        return F.kl_div(teacher_logp, student_logp, reduction="none", log_target=True).sum(-1)
    b = torch.tensor(beta, dtype=student_logp.dtype)
    mix = torch.logsumexp(torch.stack([student_logp + torch.log(1 - b), teacher_logp + torch.log(b)]), 0)
    kl_t = F.kl_div(mix, teacher_logp, reduction="none", log_target=True)
    kl_s = F.kl_div(mix, student_logp, reduction="none", log_target=True)
    return (b * kl_t + (1 - b) * kl_s).sum(-1)


def _full_vocab(loss, beta, s, l):
    """The divergence over the full vocabulary (teacher log-probs l as given, not renormalised)."""
    if loss == "jsd":
        return _trl_jsd(s, l, beta)
    p, q = l.exp(), s.exp()
    if loss == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    return _trl_jsd(s, l, {"fkl": 0.0, "rkl": 1.0}[loss])


@pytest.mark.parametrize("tdtype", [torch.float32, torch.bfloat16, F64])
def test_teacher_covering_the_vocab_gives_the_full_vocabulary_divergence(tdtype):
    g = torch.Generator().manual_seed(15)
    n, v, T = 6, 50, 1.4
    z = torch.randn(n, v, generator=g, dtype=F64) * 2
    perm = torch.stack([torch.randperm(v, generator=g) for _ in range(n)])  # K = V, any order
    teacher = torch.log_softmax(torch.randn(n, v, generator=g, dtype=F64) * 2, -1)
    lp = teacher.gather(-1, perm).to(tdtype)  # rounded: the teacher mass is not exactly 1
    l_cols = torch.empty(n, v, dtype=F64).scatter_(-1, perm, lp.double())  # by column
    cases = [("fkl", 0.5), ("rkl", 0.5), ("jsd", 0.0), ("jsd", 0.5), ("jsd", 1.0), ("tvd", 0.5)]
    for (loss, beta), support in itertools.product(cases, ["tail", "topk"]):
        zz = z.clone().requires_grad_()
        out = ref(zz, perm, lp, loss=loss, beta=beta, support=support, temperature=T, reduction="none")
        zf = z.clone().requires_grad_()
        want = _full_vocab(loss, beta, torch.log_softmax(zf / T, -1), l_cols)
        torch.testing.assert_close(out.loss, want, rtol=1e-12, atol=1e-14, msg=f"{loss} {beta} {support}")
        gz, gw = grad_of(out.loss, zz), grad_of(want, zf)
        assert torch.isfinite(gz).all()
        torch.testing.assert_close(gz, gw, rtol=1e-10, atol=1e-13)
    # Every loss x support is finite, with a finite gradient, whatever the mass rounds to.
    for loss, support in itertools.product(LOSSES, SUPPORTS):
        zz = z.clone().requires_grad_()
        out = ref(zz, perm, lp, loss=loss, support=support, reduction="none")
        assert torch.isfinite(out.loss).all() and torch.isfinite(grad_of(out.loss, zz)).all()


def test_coverage_is_decided_from_distinct_ids_and_an_uncovered_column_keeps_the_tail():
    """K >= V rows: covered (with duplicates and padding around) -> no tail / outside term;
    one column left out by padding, a duplicate or a dropped entry -> the tail bin stays."""
    g = torch.Generator().manual_seed(16)
    v = 6
    z = torch.randn(5, v, generator=g, dtype=F64)
    teacher = torch.log_softmax(torch.randn(5, v, generator=g, dtype=F64), -1).float()
    base = torch.arange(v)
    ids = torch.stack([torch.cat([base, torch.tensor([2, -1])]),        # covered, duplicate
                       torch.cat([base, torch.tensor([-1, -1])]),       # covered
                       torch.cat([base[:-1], torch.tensor([-1, 0, -1])]),  # column 5 left out
                       torch.cat([base[:-1], torch.tensor([3, -1, -1])]),  # dup instead of 5
                       torch.cat([base, torch.tensor([-1, 4])])])       # col 5 dropped below
    lp = torch.where(ids >= 0, teacher.double().gather(-1, ids.clamp_min(0)), 0.0).float()
    lp[4, 5] = NAN  # missing: dropped -> column 5 of row 4 is uncovered
    kw = dict(beta=0.3, rkl_ratio=0.25, skew=0.2)
    for loss, support in itertools.product(LOSSES, SUPPORTS):
        zz = z.clone().requires_grad_()
        out = ref(zz, ids, lp, loss=loss, support=support, missing_teacher="drop",
                  reduction="none", **kw)
        for r in range(5):
            rid = [i if not math.isnan(x) else -1 for i, x in zip(ids[r].tolist(), lp[r].tolist())]
            want = brute(z[r].tolist(), rid, lp[r].double().tolist(), loss=loss, support=support, **kw)
            assert math.isclose(out.loss[r].item(), want, rel_tol=1e-10, abs_tol=1e-13), (loss, support, r)
        finite = torch.isfinite(out.loss)
        gz = grad_of(out.loss, zz)
        assert torch.isfinite(gz[finite]).all() and torch.isnan(gz[~finite]).all()
        assert finite[:2].all(), (loss, support)  # covered rows: always finite
    # TVD over the top-k of a covered row with a duplicate: no (negative) outside term.
    out = ref(z, ids, lp, loss="tvd", support="topk", missing_teacher="drop", reduction="none")
    assert 1 - out.student_mass[0].item() < 0
    q = torch.softmax(z[0], -1)[ids[0, :7]]
    p = lp[0, :7].double().exp()
    assert math.isclose(out.loss[0].item(), 0.5 * (p - q).abs().sum().item(), rel_tol=1e-12)


def test_uncovered_tail_noise_against_a_zero_student_tail_stays_inf():
    """DECISIONS 25: a column is uncovered and the student gives it probability 0 exactly."""
    v = 5
    z = torch.tensor([[0.5, 1.0, -0.5, 0.2, -INF]], dtype=F64, requires_grad=True)
    ids = torch.tensor([[0, 1, 2, 3]])
    lp = torch.log_softmax(torch.tensor([[0.3, 1.2, -0.1, 0.4]]), -1)  # fp32: P rounds near 1
    lp[0, 0] = lp[0, 0] - 1e-6  # make sure 1 - P > 0
    out = ref(z, ids, lp, loss="fkl", support="tail", reduction="none")
    assert out.loss.item() == INF and torch.isnan(grad_of(out.loss, z)).all()
    assert math.isfinite(ref(z, ids, lp, loss="tvd", support="tail").loss.item())
    # With the fifth column covered too (teacher probability 0 there), no tail: finite.
    ids5, lp5 = torch.arange(v).unsqueeze(0), torch.cat([lp, torch.full((1, 1), -INF)], -1)
    out = ref(z, ids5, lp5, loss="fkl", support="tail", reduction="none")
    assert math.isfinite(out.loss.item()) and grad_of(out.loss, z)[0, 4].item() == 0


# ----------------------------------------------------------------------------- validation

def _base():
    z = torch.randn(2, 3, 7)
    ids = torch.randint(0, 7, (2, 3, 2))
    lp = -torch.rand(2, 3, 2)
    return dict(logits=z, teacher_ids=ids, teacher_logprobs=lp)


def _with(**kw):
    return lambda b: {**b, **kw}


BAD = [
    # (what, exception, the start of the message: the argument's name)
    (_with(loss=[]), ValueError, "loss must be a loss name or a non-empty sequence"),
    (_with(loss=3), TypeError, "loss must be a str, one of"),
    (_with(loss=[("fkl", "topk", INF)]), ValueError, "loss[0].weight"),
    (_with(loss=[("fkl",), ("rkl", "topk", NAN)]), ValueError, "loss[1].weight"),
    (_with(loss=[("fkl", "topk", "1")]), TypeError, "loss[0].weight"),
    (_with(loss=[("fkl", "topk", True)]), TypeError, "loss[0].weight"),
    (_with(loss=[("kl",)]), ValueError, "loss[0].loss"),
    (_with(loss=[(None,)]), TypeError, "loss[0].loss"),
    (_with(loss=[("fkl", "full")]), ValueError, "loss[0].support"),
    (_with(loss=[("fkl",), Term("jsd", beta=1.5)]), ValueError, "loss[1].beta"),
    (_with(loss=[Term("fkl+rkl", rkl_ratio=-0.1)]), ValueError, "loss[0].rkl_ratio"),
    (_with(loss=[Term("srkl", skew=NAN)]), ValueError, "loss[0].skew"),
    (_with(loss=["fkl"]), TypeError, "loss[0] must be a td.Term"),
    (_with(loss=("fkl", "topk", 0.9)), TypeError, "loss[0] must be a td.Term"),
    (_with(loss=[()]), ValueError, "loss[0] must be"),
    (_with(loss=[("fkl", "topk", 1.0, 0.5, 0.1, 0.1, 7)]), ValueError, "loss[0] must be"),
    (_with(loss=[("fkl",)], support="tail"), ValueError, "support cannot be passed beside"),
    (_with(loss=[("fkl",)], beta=0.3), ValueError, "beta cannot be passed beside"),
    (_with(loss=[("fkl",)], rkl_ratio=0.2), ValueError, "rkl_ratio cannot be passed beside"),
    (_with(loss=[("fkl",)], skew=0.0), ValueError, "skew cannot be passed beside"),
    (_with(return_entropy=1), TypeError, "return_entropy"),
    (_with(student_topk=0), ValueError, "student_topk"),
    (_with(student_topk=8), ValueError, "student_topk must be <= the vocab size V=7"),
    (_with(student_topk=2.0), TypeError, "student_topk"),
    (_with(student_topk=True), TypeError, "student_topk"),
    (_with(missing_teacher="skip"), ValueError, "missing_teacher"),
    (_with(missing_teacher=None), TypeError, "missing_teacher"),
    (_with(missing_teacher="floor"), ValueError, 'missing_teacher="floor"'),
    (_with(labels=torch.zeros(2, 3)), TypeError, "labels"),
    (_with(labels=torch.zeros(2, 3, dtype=torch.int16)), TypeError, "labels"),
    (_with(labels=torch.zeros(6, dtype=torch.long)), ValueError, "labels"),
    (_with(labels=torch.zeros(2, 3, dtype=torch.long, device="meta")), ValueError, "labels"),
    (_with(labels=[[0, 1, 2], [0, 1, 2]]), TypeError, "labels"),
    (_with(labels=torch.full((2, 3), 7)), ValueError, "labels has a label >= the vocab size V=7"),
    (lambda b: {**b, "teacher_logprobs": b["teacher_logprobs"].index_fill(-1, torch.tensor([1]), NAN)},
     ValueError, "teacher_logprobs has a NaN entry"),
]


@pytest.mark.parametrize("bad,exc,msg", BAD, ids=[f"{i}" for i in range(len(BAD))])
def test_validation_errors_name_the_argument(bad, exc, msg):
    import re

    kw = bad(_base())
    with pytest.raises(exc, match="^" + re.escape(msg)):
        ref(kw.pop("logits"), kw.pop("teacher_ids"), kw.pop("teacher_logprobs"), **kw)


def test_student_topk_function_errors_name_the_argument():
    z = torch.randn(3, 7)
    for k, exc, msg in [(0, ValueError, "^k must be an int >= 1"),
                        (8, ValueError, "^k must be <= the vocab size V=7"),
                        (2.0, TypeError, "^k must be"), (True, TypeError, "^k must be"),
                        (None, TypeError, "^k must be")]:
        with pytest.raises(exc, match=msg):
            reference.student_topk(z, k)
    for kw, exc, msg in [(dict(temperature=0.0), ValueError, "^temperature"),
                         (dict(vocab_start=2), ValueError, "^vocab_start")]:
        with pytest.raises(exc, match=msg):
            reference.student_topk(z, 2, **kw)
    with pytest.raises(TypeError, match="^logits"):
        reference.student_topk(z.long(), 2)
    with pytest.raises(ValueError, match="^logits"):
        reference.student_topk(z[:, :0], 1)
    assert reference.student_topk(z, 7)[0].shape == (3, 7)  # k = V is fine


def test_valid_new_arguments_are_accepted():
    b = _base()
    args = (b["logits"], b["teacher_ids"], b["teacher_logprobs"])
    for kw in [dict(loss=[("fkl", "topk", 0)]), dict(loss=[("fkl", "topk", -2.5)]),
               dict(loss=(Term("fkl"), Term("tvd", "tail"))), dict(student_topk=7),
               dict(missing_teacher="floor", log_prob_min_clamp=-INF), dict(missing_teacher="drop"),
               dict(labels=torch.full((2, 3), -1, dtype=torch.int32)), dict(return_entropy=False),
               dict(loss="jsd", support=UNSET, beta=UNSET)]:
        assert torch.isfinite(ref(*args, **kw).loss), kw


# ----------------------------------------------------------------------------- tensor parallelism

def _tp_worker(rank, world_size):
    import torch.distributed as dist

    n, v = 6, 11
    sizes = {2: [7, 4], 3: [4, 2, 5]}[world_size]
    starts = {2: None, 3: [7, 0, 2]}[world_size]  # 3 ranks: shards out of rank order
    start = sum(sizes[:rank]) if starts is None else starts[rank]
    z, ids, lp = make_inputs(n=n, v=v, k=4, seed=21, scale=2.0)
    big = torch.stack([torch.randperm(v, generator=torch.Generator().manual_seed(r)) for r in range(n)])
    lp_big = torch.log_softmax(torch.randn(n, v, dtype=F64), -1).float().gather(-1, big)
    big[4, 3] = -1  # row 4 leaves a column uncovered
    lp_big[5, 2] = NAN  # row 5: missing
    labels = torch.tensor([0, v - 1, -1, 4, 10, 7])
    mask = torch.tensor([True, True, True, False, True, True])
    z[0, :3] = 1.5  # ties across shard boundaries for the top-k
    cases = [(ids, lp, dict(loss="jsd", support="tail", log_prob_min_clamp=-2.0, temperature=1.7)),
             (ids, lp, dict(loss=[("fkl", "topk", 0.9), ("rkl", "renorm", 0.1), ("tvd", "tail", 0.3)],
                            mask=mask)),
             (big, lp_big, dict(loss=[("fkl", "tail", 1.0), ("jsd", "topk", 0.5), ("tvd", "topk", 1.0)],
                                missing_teacher="drop")),
             (big, lp_big, dict(loss="srkl", support="tail", missing_teacher="floor",
                                log_prob_min_clamp=-4.0, skew=0.3))]
    names = ["loss", "student_mass", "teacher_mass", "label_logprobs", "entropy", "student_topk_ids",
             "student_topk_logprobs", "overlap_count", "overlap_token_advantage"]
    checked = 0
    for tids, tlp, kw in cases:
        kw = dict(kw, labels=labels, return_entropy=True, student_topk=5, reduction="none")
        full = z.clone().requires_grad_()
        want = ref(full, tids, tlp, **kw)
        local = z[:, start:start + sizes[rank]].clone().requires_grad_()
        got = ref(local, tids, tlp, tp_group=dist.group.WORLD,
                  vocab_start=None if starts is None else start, **kw)
        for name in names:
            torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=1e-12,
                                       atol=1e-14, equal_nan=True, msg=name)
        up = (torch.arange(n, dtype=F64) + 1, torch.linspace(-1, 1, n, dtype=F64), torch.ones(n, dtype=F64))
        gw = torch.autograd.grad((want.loss, want.label_logprobs, want.entropy), full, up)[0]
        gg = torch.autograd.grad((got.loss, got.label_logprobs, got.entropy), local, up)[0]
        torch.testing.assert_close(gg, gw[:, start:start + sizes[rank]], rtol=1e-12, atol=1e-14)
        checked += 1
    # The standalone top-k: k > V_r on some ranks, k = V, same on every rank.
    for k in (4, v):
        ids_k, lps_k = reference.student_topk(z[:, start:start + sizes[rank]], k, temperature=0.7,
                                              tp_group=dist.group.WORLD,
                                              vocab_start=None if starts is None else start)
        ids_w, lps_w = reference.student_topk(z, k, temperature=0.7)
        assert torch.equal(ids_k, ids_w) and torch.equal(lps_k, lps_w)
        checked += 1
    errors = []
    local = z[:, start:start + sizes[rank]]
    vs = dict(vocab_start=None if starts is None else start, tp_group=dist.group.WORLD)
    bad_labels = labels.clone()
    if rank == world_size - 1:
        bad_labels[0] = v  # only this rank's copy is bad: every rank must raise
    for call in (lambda: ref(local, ids, lp, labels=bad_labels, **vs),
                 lambda: ref(local, ids, lp, student_topk=v + 1, **vs),
                 lambda: reference.student_topk(local, v + 1, **vs)):
        try:
            call()
        except ValueError as err:
            errors.append(str(err))
    return checked, errors


@pytest.mark.parametrize("world_size", [2, 3])
def test_tensor_parallel_new_outputs_match_unsharded(world_size):
    results = run_distributed(_tp_worker, world_size=world_size, deadline_s=300)
    for checked, errors in results:
        assert checked == 6
        assert len(errors) == 3, errors
        assert errors[0].startswith("labels has a label >= the vocab size V=11")
        assert errors[1].startswith("student_topk must be <= the vocab size V=11")
        assert errors[2].startswith("k must be <= the vocab size V=11")
    assert "on rank" in results[0][1][0] and "on rank" not in results[-1][1][0]


def test_a_logit_of_minus_inf_is_a_column_of_probability_zero():
    """A -inf logit that is no teacher id behaves as if its column were not in the vocab (and
    gets gradient 0); every other output agrees too."""
    z, ids, lp = make_inputs(n=5, v=9, k=4, seed=17)
    z[:, 8] = -INF
    ids = torch.where(ids == 8, -1, ids)  # column 8 is nobody's teacher id
    labels = torch.tensor([0, 3, -1, 7, 2])
    kw = dict(labels=labels, return_entropy=True, student_topk=3, reduction="none")
    for loss, support in itertools.product(LOSSES, SUPPORTS):
        z1, z2 = z.clone().requires_grad_(), z[:, :8].clone().requires_grad_()
        a = ref(z1, ids, lp, loss=loss, support=support, **kw)
        b = ref(z2, ids, lp, loss=loss, support=support, **kw)
        for name in TopKDistillOutput._fields:
            torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=1e-13, atol=1e-15,
                                       msg=f"{loss} {support} {name}")
        ga = grad_of(a.loss + a.label_logprobs + a.entropy, z1)
        gb = grad_of(b.loss + b.label_logprobs + b.entropy, z2)
        assert (ga[:, 8] == 0).all()
        torch.testing.assert_close(ga[:, :8], gb, rtol=1e-12, atol=1e-14)
