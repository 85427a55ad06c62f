"""Issue 18 / DECISIONS 20, 25 through the kernels: a teacher whose ids cover the vocabulary
(K = V, every id once) gives the full-vocabulary divergence, finite with a finite gradient, for
every loss x support and fp32 / bf16 / fp64 teacher log-probs (whatever the teacher mass rounds
to); rows that leave a column uncovered (padding, duplicates, dropped entries) keep the tail bin,
infinite where the math says so."""
import itertools
import math

import pytest
import torch

import topk_distill as td
from topk_distill import reference

from _inputs import DEVICES, LOSSES, SUPPORTS, assert_close, assert_close_rowwise, tdev
from _v2 import F32, F64, compare, run

ref = reference.topk_distill_loss
BF16 = torch.bfloat16
INF, NAN = math.inf, math.nan
N, V, T = 8, 50, 1.4

# (loss, its parameters): JSD at beta 0 / 0.5 / 1 (TRL's convention) and inside, and the rest.
CONFIGS = [("fkl", {}), ("rkl", {}), ("jsd", dict(beta=0.0)), ("jsd", dict(beta=0.5)),
           ("jsd", dict(beta=1.0)), ("jsd", dict(beta=0.3)), ("fkl+rkl", dict(rkl_ratio=0.25)),
           ("tvd", {}), ("skl", dict(skew=0.2)), ("srkl", dict(skew=0.2))]
assert {c[0] for c in CONFIGS} == set(LOSSES)


def covering_batch(tdtype, seed=0, device="cpu"):
    """Student logits [N, V]; ids: a permutation of the vocab per row (K = V); the teacher's
    full distribution at those ids, rounded to tdtype (its mass is then not exactly 1)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(N, V, generator=g, dtype=F64) * 2
    perm = torch.stack([torch.randperm(V, generator=g) for _ in range(N)])
    teacher = torch.log_softmax(torch.randn(N, V, generator=g, dtype=F64) * 2, -1)
    lp = teacher.gather(-1, perm).to(tdtype)
    d = tdev(device)
    return z.to(d), perm.to(d), lp.to(d)


def _kl(la, lb):
    a = la.exp()
    return torch.where(a > 0, a * (la - torch.where(a > 0, lb, 0.0)), 0.0).sum(-1)


def _mix(x, lx, y, ly):
    """log(x e^lx + y e^ly) for weights x, y > 0."""
    return torch.logaddexp(math.log(x) + lx, math.log(y) + ly)


def full_vocab(loss, params, s, l):
    """The divergence between teacher log-probs l and student log-probs s over the whole vocab
    (float64, autograd), SPEC 3's definitions (TRL's generalized_jsd_loss for JSD)."""
    beta, r, lam = params.get("beta", 0.5), params.get("rkl_ratio", 0.1), params.get("skew", 0.1)
    if loss == "fkl" or (loss == "jsd" and beta == 0.0):
        return _kl(l, s)
    if loss == "rkl" or (loss == "jsd" and beta == 1.0):
        return _kl(s, l)
    if loss == "jsd":
        m = _mix(beta, l, 1 - beta, s)
        return beta * _kl(l, m) + (1 - beta) * _kl(s, m)
    if loss == "fkl+rkl":
        return (1 - r) * _kl(l, s) + r * _kl(s, l)
    if loss == "tvd":
        return 0.5 * (l.exp() - s.exp()).abs().sum(-1)
    if loss == "skl":
        return _kl(l, _mix(lam, l, 1 - lam, s))
    return _kl(s, _mix(lam, s, 1 - lam, l))  # srkl


def logits_dtypes(device):
    return [F64, F32] if device != "cuda" else [F32]


@pytest.mark.parametrize("tdtype", [F32, BF16, F64])
@pytest.mark.parametrize("device", DEVICES)
def test_covering_teacher_gives_the_full_vocabulary_divergence(tdtype, device):
    z, perm, lp = covering_batch(tdtype, seed=1, device=device)
    mass = lp.double().exp().sum(-1)
    if tdtype != F64:  # the case of the issue: masses that round below (and above) 1
        assert (mass < 1).any() and (mass > 1).any(), mass
    # The teacher's log-probs by column, as given (topk / tail) and renormalised (renorm).
    l_cols = torch.empty(N, V, dtype=F64, device=z.device).scatter_(-1, perm, lp.double())
    l_renorm = l_cols - torch.logsumexp(l_cols, -1, keepdim=True)
    for dt, (loss, params), support in itertools.product(logits_dtypes(device), CONFIGS,
                                                         SUPPORTS):
        what = f"{dt} teacher {tdtype} {loss} {params} {support}"
        kw = dict(loss=loss, support=support, temperature=T, reduction="none", **params)
        got = run(td.topk_distill_loss, z.to(dt), perm, lp, **kw)
        assert torch.isfinite(got.out.loss).all(), what
        assert torch.isfinite(got.grad).all(), what
        exp = run(ref, z.to(dt).double(), perm, lp, **kw)
        compare(got, exp, dt, what)
        # ... and the full-vocabulary divergence, with its gradient.
        zf = z.to(dt).double().clone().requires_grad_(True)
        s = torch.log_softmax(zf / T, -1)
        want = full_vocab(loss, params, s, l_renorm if support == "renorm" else l_cols)
        (gw,) = torch.autograd.grad((want * torch.linspace(-0.9, 1.6, N, dtype=F64,
                                                           device=z.device)).sum(), zf)
        assert_close(got.out.loss, want.detach(), F64 if dt == F64 else F32, what + " vs full vocab")
        assert_close_rowwise(got.grad, gw, dt, what + " grad vs full vocab")


@pytest.mark.parametrize("device", DEVICES)
def test_issue_18_reproduction_fkl_tail_is_finite(device):
    """N=4, V=50, ids = arange(V) for every row, fp32 teacher log_softmax(randn * 2)."""
    g = torch.Generator().manual_seed(0)
    d = tdev(device)
    lp = torch.log_softmax(torch.randn(4, 50, generator=g) * 2, -1).to(d)
    ids = torch.arange(50, device=d).expand(4, 50)
    z = torch.randn(4, 50, generator=g).to(d)
    assert (lp.double().exp().sum(-1) < 1).any()
    for loss, beta in [("fkl", 0.5), ("fkl+rkl", 0.5), ("jsd", 0.0)]:
        x = z.clone().requires_grad_(True)
        out = td.topk_distill_loss(x, ids, lp, loss=loss, support="tail", beta=beta,
                                   reduction="none")
        out.loss.sum().backward()
        assert torch.isfinite(out.loss).all() and torch.isfinite(x.grad).all(), loss
        want = full_vocab(loss, dict(beta=beta), torch.log_softmax(z.double(), -1), lp.double())
        assert_close(out.loss, want, F32, loss)


def uncovered_batch(device):
    """K = V + 2 rows over V = 6 columns (DECISIONS 20, 25):
    0: covered, plus a duplicate and a padding entry      1: covered, plus two padding entries
    2: column 5 left out by padding                       3: a duplicate in place of column 5
    4: column 5 present but its log-prob missing (NaN) -> dropped, uncovered
    5: covered, column 5 with teacher log-prob -inf      6: K = V exactly, every id once
    7: column 5 left out, its student logit -inf (student tail exactly 0)"""
    g = torch.Generator().manual_seed(2)
    v = 6
    z = torch.randn(8, v, generator=g, dtype=F64)
    z[7, 5] = -INF
    teacher = torch.log_softmax(torch.randn(8, v, generator=g, dtype=F64), -1).float()
    base = torch.arange(v)
    ids = torch.stack([torch.cat([base, torch.tensor([2, -1])]),
                       torch.cat([base, torch.tensor([-1, -1])]),
                       torch.cat([base[:-1], torch.tensor([-1, 0, -1])]),
                       torch.cat([base[:-1], torch.tensor([3, -1, -1])]),
                       torch.cat([base, torch.tensor([-1, 4])]),
                       torch.cat([base, torch.tensor([-1, -1])]),
                       torch.cat([base.flip(0), torch.tensor([-1, -1])]),
                       torch.cat([base[:-1], torch.tensor([-1, -1, -1])])])
    lp = torch.where(ids >= 0, teacher.double().gather(-1, ids.clamp_min(0)), 0.0).float()
    lp[4, 5] = NAN
    lp[5, 5] = -INF
    # Row 7: a teacher mass a little below 1 (rounding noise) over its 5 columns.
    lp[7, :5] = torch.log_softmax(torch.randn(5, generator=g, dtype=F64), -1).float() - 1e-6
    d = tdev(device)
    return z.to(d), ids.to(d), lp.to(d)


@pytest.mark.parametrize("device", DEVICES)
def test_uncovered_columns_keep_the_tail_bin(device):
    z, ids, lp = uncovered_batch(device)
    for dt, loss, support in itertools.product(logits_dtypes(device), LOSSES, SUPPORTS):
        what = f"{dt} {loss} {support}"
        kw = dict(loss=loss, support=support, beta=0.3, rkl_ratio=0.25, skew=0.2,
                  missing_teacher="drop", reduction="none")
        # (row 7, a student tail of exactly 0: test_a_student_tail_of_exactly_zero)
        got = run(td.topk_distill_loss, z[:7].to(dt), ids[:7], lp[:7], **kw)
        exp = run(ref, z[:7].to(dt).double(), ids[:7], lp[:7], **kw)
        compare(got, exp, dt, what)
        finite = torch.isfinite(got.out.loss)
        assert torch.isfinite(got.grad[finite]).all() and torch.isnan(got.grad[~finite]).all()
        # covered rows whose teacher probabilities are all > 0: always finite
        assert finite[[0, 1, 6]].all(), (what, got.out.loss)
    for dt in logits_dtypes(device):
        # TVD over the top-k of a covered row with a duplicate: no (negative) outside term.
        out = td.topk_distill_loss(z.to(dt), ids, lp, loss="tvd", support="topk",
                                   missing_teacher="drop", reduction="none")
        assert 1 - out.student_mass[0].item() < 0
        q = torch.softmax(z[0].double(), -1)[ids[0, :7]]
        p = lp[0, :7].double().exp()
        assert math.isclose(out.loss[0].item(), 0.5 * (p - q).abs().sum().item(), rel_tol=1e-5)


@pytest.mark.parametrize("impl", ["kernels", "oracle"])
@pytest.mark.parametrize("device", DEVICES)
def test_a_student_tail_of_exactly_zero(device, impl):
    """DECISIONS 25 and 15: row 7 of uncovered_batch leaves column 5 out of its ids and the
    student gives it probability 0 exactly (logit -inf), against a teacher tail 1 - P > 0. An
    FKL-type tail bin is +inf with an all-NaN gradient row. The other losses are finite: their
    tail bin adds a constant (TVD 0.5 p_tail, JSD beta p_tail log(1/beta), SKL p_tail log(1/skew);
    RKL and SRKL 0), so the loss is the covered row over columns 0-4 plus that constant, and the
    gradient is that row's, with exactly 0 at the -inf column (DECISIONS 15: a -inf logit is a
    column of probability 0 and gets gradient 0). The float64 oracle must satisfy the same."""
    fn = td.topk_distill_loss if impl == "kernels" else ref
    z, ids, lp = uncovered_batch(device)
    z7, ids7, lp7 = z[7:], ids[7:], lp[7:]
    cov_z, cov_ids, cov_lp = z7[:, :5], ids7[:, :5], lp7[:, :5]  # covered: no tail bin
    p_tail = 1 - lp7[0, :5].double().exp().sum().item()
    assert p_tail > 0
    cases = [("fkl", {}, INF), ("jsd", dict(beta=0.0), INF), ("skl", dict(skew=0.0), INF),
             ("fkl+rkl", dict(rkl_ratio=0.5), INF),
             ("rkl", {}, 0.0), ("srkl", dict(skew=0.2), 0.0), ("tvd", {}, 0.5 * p_tail),
             ("jsd", dict(beta=0.3), 0.3 * p_tail * math.log(1 / 0.3)),
             ("skl", dict(skew=0.2), p_tail * math.log(1 / 0.2))]
    for dt, (loss, params, tail_term) in itertools.product(logits_dtypes(device), cases):
        what = f"{dt} {loss} {params}"
        kw = dict(loss=loss, support="tail", reduction="none", **params)
        x = z7.to(dt) if impl == "kernels" else z7.to(dt).double()
        got = run(fn, x, ids7, lp7, **kw)
        if tail_term == INF:
            assert got.out.loss.item() == INF and torch.isnan(got.grad).all(), what
            continue
        covered = run(ref, cov_z.to(dt).double(), cov_ids, cov_lp, **kw)
        assert_close(got.out.loss, covered.out.loss + tail_term, F64 if dt == F64 else F32, what)
        assert got.grad[0, 5].item() == 0, (what, got.grad)
        assert_close_rowwise(got.grad[:, :5], covered.grad, x.dtype, what)


@pytest.mark.parametrize("device", DEVICES)
def test_k_equals_v_with_a_duplicate_in_place_of_an_id_is_not_covered(device):
    """K = V, but each row repeats one id in place of another: one column is uncovered, so the
    tail bin (and the topk outside term) stay, as the oracle has them (DECISIONS 8, 20)."""
    z, perm, lp = covering_batch(F32, seed=3, device=device)
    ids = perm.clone()
    ids[:, -1] = ids[:, 0]  # the last column of each permutation is now uncovered
    lp2 = lp.clone()
    lp2[:, -1] = lp[:, 0]
    for dt, loss, support in itertools.product(logits_dtypes(device), LOSSES, SUPPORTS):
        kw = dict(loss=loss, support=support, temperature=T, reduction="none")
        got = run(td.topk_distill_loss, z.to(dt), ids, lp2, **kw)
        exp = run(ref, z.to(dt).double(), ids, lp2, **kw)
        compare(got, exp, dt, f"{dt} {loss} {support}")
