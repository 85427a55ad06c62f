"""SPEC 9.4 / 9.5 through the kernels (issue 16): ``td.student_topk`` and
``topk_distill_loss(student_topk=k)`` (ids, log-probs, verl's overlap diagnostics) and missing
teacher entries (``missing_teacher="drop" | "floor" | "error"``) against the float64 oracle on the
same rounded inputs, an independent Python sort / per-entry loop, and the documented workflow
(student top-k -> the teacher scores those ids -> reverse KL over them)."""
import itertools
import math
import re

import pytest
import torch

import topk_distill as td
from topk_distill import reference

from _inputs import DEVICES, LOSSES, SUPPORTS, assert_close, tdev, teacher_batch
from _v2 import F32, F64, compare, equal_nan, expected_overlap, run

ref = reference.topk_distill_loss
BF16, F16 = torch.bfloat16, torch.float16
INF, NAN = math.inf, math.nan


def sorted_ids(z, k):
    """Python sort by (-logit, id): descending, equal logits -> lower id first (DECISIONS 22).
    NaN-free rows only."""
    rows = [sorted(range(len(r)), key=lambda v: (-r[v], v))[:k] for r in z.tolist()]
    return torch.tensor(rows, dtype=torch.int64)


def dtypes_of(device):
    return [F64, F32, BF16, F16] if device != "cuda" else [F32, BF16, F16]


# ----------------------------------------------------------------------------- student_topk

@pytest.mark.parametrize("temperature", [1.0, 0.6, 2.5])
@pytest.mark.parametrize("device", DEVICES)
def test_student_topk_matches_the_oracle(temperature, device):
    v = 53
    g = torch.Generator().manual_seed(1)
    z = (torch.randn(2, 5, v, generator=g, dtype=F64) * 3).to(tdev(device))
    for dt, k in itertools.product(dtypes_of(device), [1, 7, v]):
        x = z.to(dt).requires_grad_(True)
        ids, lps = td.student_topk(x, k, temperature=temperature)
        want_ids, want_lps = reference.student_topk(x.detach().double(), k,
                                                    temperature=temperature)
        what = f"{dt} k={k} T={temperature}"
        assert ids.dtype == torch.int64 and lps.dtype == F32, what
        assert ids.shape == lps.shape == (2, 5, k), what
        assert not ids.requires_grad and not lps.requires_grad, what
        assert torch.equal(ids.cpu(), want_ids.cpu()), what
        assert torch.equal(ids.cpu().view(10, k), sorted_ids(x.detach().double().view(10, v), k))
        assert_close(lps, want_lps, F32, what)
        assert (lps[..., 1:] <= lps[..., :-1]).all(), what
        # The loss call's top-k (bitwise equality: test_loss_call_returns_the_same_tensors).
        tids = torch.randint(0, v, (2, 5, 4), generator=g).to(ids.device)
        out = td.topk_distill_loss(x, tids, torch.full((2, 5, 4), -3.0, device=ids.device),
                                   student_topk=k, temperature=temperature)
        assert torch.equal(out.student_topk_ids, ids), what
        assert_close(out.student_topk_logprobs, want_lps, F32, what)
        assert not out.student_topk_logprobs.requires_grad
    assert td.student_topk(z[0, 0], 3)[0].shape == (3,)  # a single row [V]


@pytest.mark.parametrize("device", DEVICES)
def test_loss_call_returns_the_same_tensors_as_student_topk(device):
    """SPEC 9.4 / DECISIONS 22: topk_distill_loss(..., student_topk=k) returns the same two
    tensors as td.student_topk (masked rows included): the same ids, bitwise; the same
    log-probs to fp32 rounding (fp64: bitwise) - the kernels' log-sum-exp sums the columns split
    into teacher / non-teacher ones in the loss call and unsplit alone, so the fp32 sums round
    differently. The oracle (one log_softmax either way) is bitwise."""
    g = torch.Generator().manual_seed(11)
    v, k = 53, 5
    z = (torch.randn(10, v, generator=g, dtype=F64) * 3).to(tdev(device))
    tids = torch.randint(0, v, (10, 4), generator=g).to(tdev(device))
    tlp = torch.full((10, 4), -3.0, device=tdev(device))
    mask = torch.arange(10, device=tdev(device)) % 3 != 1
    for dt, T in itertools.product(dtypes_of(device), [1.0, 1.7]):
        x = z.to(dt)
        alone = td.student_topk(x, k, temperature=T)
        out = td.topk_distill_loss(x, tids, tlp, student_topk=k, temperature=T, mask=mask)
        assert torch.equal(out.student_topk_ids, alone[0]), (dt, T)
        if dt == F64:
            assert torch.equal(out.student_topk_logprobs, alone[1]), (dt, T)
        else:  # a few ulp of the fp32 log-sum-exp
            torch.testing.assert_close(out.student_topk_logprobs, alone[1], rtol=4e-7, atol=1e-6)
        r_alone = reference.student_topk(x, k, temperature=T)
        r_out = ref(x, tids, tlp, student_topk=k, temperature=T, mask=mask)
        assert torch.equal(r_out.student_topk_logprobs, r_alone[1])  # the oracle does


@pytest.mark.parametrize("device", DEVICES)
def test_planted_ties_lower_id_first(device):
    zt = torch.tensor([[1.0, 3.0, 3.0, -2.0, 3.0, 1.0, 0.5, 3.0],
                       [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
                       [-INF, 2.0, -INF, 2.0, 7.0, -1.0, 2.0, -INF],
                       [5.0, -1.0, 5.0, 5.0, 5.0, 5.0, -1.0, 5.0]], dtype=F64)
    for dt, k in itertools.product(dtypes_of(device), range(1, 9)):
        x = zt.to(device=tdev(device), dtype=dt)
        ids, lps = td.student_topk(x, k, temperature=0.7)
        assert torch.equal(ids.cpu(), sorted_ids(zt, k)), (dt, k, ids)
        want_ids, want_lps = reference.student_topk(x.double(), k, temperature=0.7)
        assert torch.equal(ids.cpu(), want_ids.cpu())
        assert_close(lps, want_lps, F32, f"{dt} k={k}")
    ids, lps = td.student_topk(zt.to(tdev(device)), 8)
    assert ids[0].tolist() == [1, 2, 4, 7, 0, 5, 6, 3]
    assert ids[2].tolist() == [4, 1, 3, 6, 5, 0, 2, 7] and lps[2, -1].item() == -INF


@pytest.mark.parametrize("device", DEVICES)
def test_ranked_by_the_logits_not_by_rounded_log_probs(device):
    """DECISIONS 22: two different fp32 logits whose z / T round to the same value still rank
    by the logits (the larger first, whatever the ids)."""
    a = torch.tensor(1.9999, dtype=F32)
    b = torch.nextafter(a, torch.tensor(3.0))  # one ulp above
    z = torch.tensor([[0.0, float(a), float(b), -1.0], [0.0, float(b), float(a), -1.0]], dtype=F32)
    t = 0.7
    inv = 1.0 / torch.tensor(t, dtype=F32)
    # the ties that rounding z / T (either way) or the log-softmax would create
    assert (z[0, 1] / t) == (z[0, 2] / t) and (z[0, 1] * inv) == (z[0, 2] * inv)
    lq = torch.log_softmax(z / t, -1)
    assert lq[0, 1] == lq[0, 2]
    ids, _ = td.student_topk(z.to(tdev(device)), 2, temperature=t)
    assert ids.tolist() == [[2, 1], [1, 2]]


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_logits_with_many_ties(device):
    g = torch.Generator().manual_seed(2)
    v = 300
    z = (torch.randint(-12, 12, (6, v), generator=g).to(F64) / 4).to(BF16)
    assert len(set(z[0].tolist())) < 30  # ~10 logits per distinct value
    for k in (1, 11, 37, v):
        ids, lps = td.student_topk(z.to(tdev(device)), k, temperature=1.3)
        assert torch.equal(ids.cpu(), sorted_ids(z.double(), k)), k
        want_ids, want_lps = reference.student_topk(z.double(), k, temperature=1.3)
        assert torch.equal(ids.cpu(), want_ids)
        assert_close(lps, want_lps, F32, f"k={k}")


@pytest.mark.parametrize("device", DEVICES)
def test_k_bounds_and_errors(device):
    z, ids, lp = teacher_batch(4, 9, 3, seed=3, special_rows=False, device=device)
    z = z.float()
    assert td.student_topk(z, 9)[0].shape == (4, 9)  # k = V
    full, _ = td.student_topk(z, 9)
    assert torch.equal(full.sort(-1).values.cpu(), torch.arange(9).expand(4, 9))
    for k, exc, msg in [(0, ValueError, "k must be an int >= 1"),
                        (-2, ValueError, "k must be an int >= 1"),
                        (10, ValueError, "k must be <= the vocab size V=9"),
                        (2.0, TypeError, "k must be"), (True, TypeError, "k must be"),
                        (None, TypeError, "k must be")]:
        with pytest.raises(exc, match="^" + re.escape(msg)):
            td.student_topk(z, k)
        if k is None:  # student_topk=None: not asked for
            continue
        loss_msg = msg.replace("k must", "student_topk must")
        with pytest.raises(exc, match="^" + re.escape(loss_msg)):
            td.topk_distill_loss(z, ids, lp, student_topk=k)
        with pytest.raises(exc, match="^" + re.escape(loss_msg)):
            td.fused_linear_topk_distill_loss(torch.randn(4, 5, device=z.device),
                                              torch.randn(9, 5, device=z.device), ids, lp,
                                              student_topk=k)
    with pytest.raises(ValueError, match="^temperature"):
        td.student_topk(z, 2, temperature=0.0)


# ----------------------------------------------------------------------------- overlap

def overlap_batch(device, seed=4):
    """Rows with duplicated ids, padding, an all-padding row, a -inf teacher log-prob on an id
    of the student's top-k, a row surely overlapping and a masked row."""
    z, ids, lp = teacher_batch(10, 40, 6, seed=seed, device=device)  # rows 0-5: special rows
    top = torch.topk(z, 6, dim=-1).indices
    ids[6, :4] = top[6, :4].to(ids.device)
    ids[7, 0], lp[7, 0] = top[7, 0], -INF  # probability 0 inside the overlap: adds 0
    ids[8, 1] = ids[8, 0] = top[8, 1]  # a duplicated id in the overlap: counted twice
    lp[8, 1] = lp[8, 0]
    ids[9, 2] = -1
    mask = torch.ones(10, dtype=torch.bool, device=tdev(device))
    mask[5] = False
    return z, ids, lp, mask


@pytest.mark.parametrize("clamp", [None, -2.0])
@pytest.mark.parametrize("device", DEVICES)
def test_overlap_diagnostics_match_the_oracle_and_a_direct_loop(clamp, device):
    z, ids, lp, mask = overlap_batch(device)
    T = 0.9
    for dt, k in itertools.product([d for d in dtypes_of(device) if d != F16], [1, 6, 40]):
        kw = dict(student_topk=k, temperature=T, log_prob_min_clamp=clamp, mask=mask,
                  reduction="none", loss="jsd", labels=ids[:, 0], return_entropy=True)
        got = run(td.topk_distill_loss, z.to(dt), ids, lp, **kw)
        exp = run(ref, z.to(dt).double(), ids, lp, **kw)
        compare(got, exp, dt, f"{dt} k={k} clamp={clamp}")
        out = got.out
        assert out.overlap_token_advantage.dtype == F32 and out.overlap_count.dtype == torch.int64
        count, adv = expected_overlap(z.to(dt).cpu(), ids.cpu(), lp.cpu(),
                                      out.student_topk_ids.cpu(), mask.cpu(), clamp, T)
        assert torch.equal(out.overlap_count.cpu(), count), (dt, k)
        assert_close(out.overlap_token_advantage, adv, F32, f"{dt} k={k} advantage")
        assert torch.isfinite(out.overlap_token_advantage).all()
        # Masked rows: top-k computed like any row, overlap 0.
        assert out.overlap_count[5] == 0 and out.overlap_token_advantage[5] == 0
        alone_ids, _ = td.student_topk(z.to(dt), k, temperature=T)
        assert torch.equal(out.student_topk_ids, alone_ids)
        if k == 40:  # every entry that counts overlaps; duplicates count once per entry
            valid = (ids >= 0) & mask.unsqueeze(-1)
            assert torch.equal(out.overlap_count, valid.sum(-1))
    assert count[3] == 0 and count[8] >= 2


@pytest.mark.parametrize("device", DEVICES)
def test_nan_logits_in_a_row(device):
    z, ids, lp = teacher_batch(6, 30, 4, seed=5, special_rows=False, device=device)
    z[2, 7] = NAN
    for dt in [d for d in dtypes_of(device) if d != F16]:
        x = z.to(dt)
        ids_k, lps = td.student_topk(x, 5)
        assert torch.isnan(lps[2]).all()
        others = [0, 1, 3, 4, 5]
        want_ids, want_lps = reference.student_topk(x.double(), 5)
        assert torch.equal(ids_k[others], want_ids[others])
        assert_close(lps[others], want_lps[others], F32, f"{dt}")
        kw = dict(student_topk=5, reduction="none", return_entropy=True)
        got = run(td.topk_distill_loss, x, ids, lp, **kw)
        assert torch.isnan(got.out.loss[2]) and torch.isnan(got.out.entropy[2])
        assert torch.isnan(got.grad[2]).all() and torch.isfinite(got.grad[others]).all()
        assert torch.isnan(got.out.student_topk_logprobs[2]).all()
        exp = run(ref, x.double(), ids, lp, **kw)
        for name in ("loss", "entropy", "student_mass", "teacher_mass", "overlap_count"):
            a, b = getattr(got.out, name), getattr(exp.out, name)
            assert_close(a[others], b[others], F64 if dt == F64 else F32, name)
        assert_close(got.grad[others], exp.grad[others], dt, "grad")


# ----------------------------------------------------------------------------- missing entries

def missing_batch(device, seed=6):
    """teacher_batch's special rows plus NaN ("not scored") teacher log-probs: one per row in
    rows 0 (at local column 0), 1, 4, 6; the duplicate's copy in row 2; every entry of row 7;
    a NaN in a padding entry (never looked at)."""
    z, ids, lp = teacher_batch(10, 40, 6, seed=seed, device=device)
    miss = torch.zeros_like(ids, dtype=torch.bool)
    miss[0, 0] = miss[1, 2] = miss[2, 1] = miss[4, 3] = miss[6, 5] = True
    miss[7, :] = True
    lp_nan = torch.where(miss, NAN, lp)
    lp_nan[1, -1] = NAN  # a padding entry (id -1)
    mask = torch.ones(10, dtype=torch.bool, device=tdev(device))
    mask[9] = False
    lp_nan[9, 0] = NAN  # masked row: never looked at
    return z, ids, lp_nan, mask


MISSING_MODES = [("drop", None), ("drop", -3.0), ("floor", -3.0), ("floor", -INF)]


@pytest.mark.parametrize("mode,clamp", MISSING_MODES)
@pytest.mark.parametrize("device", DEVICES)
def test_missing_entries_every_loss_and_support(mode, clamp, device):
    z, ids, lp_nan, mask = missing_batch(device)
    for loss, support in itertools.product(LOSSES, SUPPORTS):
        kw = dict(loss=loss, support=support, beta=0.3, rkl_ratio=0.25, skew=0.2,
                  missing_teacher=mode, log_prob_min_clamp=clamp, mask=mask, temperature=1.2,
                  reduction="none", student_topk=8)
        for dt in [d for d in dtypes_of(device) if d in (F64, F32)]:
            got = run(td.topk_distill_loss, z.to(dt), ids, lp_nan, **kw)
            exp = run(ref, z.to(dt).double(), ids, lp_nan, **kw)
            compare(got, exp, dt, f"{mode} c={clamp} {loss}/{support} {dt}")
            tm = got.out.teacher_mass
            assert torch.isfinite(tm).all() and tm[7] == 0  # missing entries are not in P
            if mode == "drop":
                assert got.out.student_mass[7] == 0 and got.out.overlap_count[7] == 0
    # "drop" is padding, exactly.
    if mode == "drop":
        padded = torch.where(torch.isnan(lp_nan), -1, ids)
        for loss, support in itertools.product(LOSSES, SUPPORTS):
            kw = dict(loss=loss, support=support, log_prob_min_clamp=clamp, mask=mask,
                      reduction="none", student_topk=8)
            a = run(td.topk_distill_loss, z.float(), ids, lp_nan, missing_teacher="drop", **kw)
            b = run(td.topk_distill_loss, z.float(), padded,
                    torch.where(torch.isnan(lp_nan), 0.0, lp_nan), **kw)
            for name in ("loss", "student_mass", "teacher_mass", "overlap_count",
                         "overlap_token_advantage"):
                assert equal_nan(getattr(a.out, name), getattr(b.out, name)), (loss, support, name)
            assert equal_nan(a.grad, b.grad), (loss, support)


@pytest.mark.parametrize("device", DEVICES)
def test_missing_teacher_errors(device):
    z, ids, lp_nan, mask = missing_batch(device)
    z = z.float()
    with pytest.raises(ValueError, match=r"^teacher_logprobs has a NaN entry.*missing_teacher"):
        td.topk_distill_loss(z, ids, lp_nan)
    with pytest.raises(ValueError, match=r'^missing_teacher="floor" .*log_prob_min_clamp'):
        td.topk_distill_loss(z, ids, lp_nan, missing_teacher="floor")
    with pytest.raises(ValueError, match=r'^missing_teacher="floor"'):
        td.TopKDistillLoss(missing_teacher="floor")
    with pytest.raises(ValueError, match="^missing_teacher must be one of"):
        td.topk_distill_loss(z, ids, lp_nan, missing_teacher="skip")
    with pytest.raises(TypeError, match="^missing_teacher"):
        td.topk_distill_loss(z, ids, lp_nan, missing_teacher=None)
    for mode, clamp in [("drop", None), ("floor", -5.0)]:
        bad = lp_nan.clone()
        bad[5, 0] = 0.5  # a positive log-prob is an error in every mode
        with pytest.raises(ValueError, match="^teacher_logprobs has an entry > 0"):
            td.topk_distill_loss(z, ids, bad, missing_teacher=mode, log_prob_min_clamp=clamp)
        bad_ids = ids.clone()
        bad_ids[0, 0] = 40  # its log-prob is NaN (missing): the id is still checked
        with pytest.raises(ValueError, match="^teacher_ids has an id >= the vocab size V=40"):
            td.topk_distill_loss(z, bad_ids, lp_nan, missing_teacher=mode,
                                 log_prob_min_clamp=clamp)
        kw = dict(missing_teacher=mode, log_prob_min_clamp=clamp, check_inputs=False,
                  reduction="none", mask=mask)
        got = run(td.topk_distill_loss, z, bad_ids, lp_nan, **kw)
        exp = run(ref, z.double(), bad_ids, lp_nan, **kw)
        compare(got, exp, F32, f"{mode} id >= V")
        assert torch.isnan(got.out.loss[0]) and torch.isfinite(got.out.loss[1:]).all()
    # "error" with check_inputs=False: the NaN propagates into its rows only.
    kw = dict(check_inputs=False, reduction="none", mask=mask, loss="fkl", support="tail")
    got = run(td.topk_distill_loss, z, ids, lp_nan, **kw)
    exp = run(ref, z.double(), ids, lp_nan, **kw)
    compare(got, exp, F32, "error, unchecked")
    nan_rows = [0, 1, 2, 4, 6, 7]
    assert torch.isnan(got.out.loss[nan_rows]).all() and torch.isnan(got.out.teacher_mass[nan_rows]).all()
    assert torch.isfinite(got.out.loss[[3, 5, 8, 9]]).all()


@pytest.mark.parametrize("mode", ["drop", "floor"])
@pytest.mark.parametrize("device", DEVICES)
def test_workflow_reverse_kl_over_the_students_own_top_k(mode, device):
    """README / issue 16 workflow: student_topk -> the teacher scores those ids (NaN where it
    did not) -> reverse KL over them, against the oracle and a direct formula."""
    d = tdev(device)
    g = torch.Generator().manual_seed(7)
    n, v, k = 8, 64, 10
    z = (torch.randn(n, v, generator=g, dtype=F64) * 2).to(d).float()
    teacher = torch.log_softmax(0.7 * z.double().cpu() + torch.randn(n, v, generator=g,
                                                                      dtype=F64), -1)
    scored = teacher.topk(24, -1).indices  # the teacher only scores its own top-24

    ids, _ = td.student_topk(z, k)  # 1. the student's own top-k
    ids_cpu = ids.cpu()
    known = (ids_cpu.unsqueeze(-1) == scored.unsqueeze(-2)).any(-1)
    lp = torch.where(known, teacher.gather(-1, ids_cpu), NAN).float().to(d)  # 2. the teacher
    assert (~known).any() and known.any(-1).all()
    clamp = -12.0 if mode == "floor" else None
    kw = dict(loss="rkl", support="renorm", missing_teacher=mode, log_prob_min_clamp=clamp,
              reduction="none", student_topk=k)
    got = run(td.topk_distill_loss, z, ids, lp, **kw)  # 3. the loss over them
    exp = run(ref, z.double(), ids, lp, **kw)
    compare(got, exp, F32, mode)
    assert torch.isfinite(got.out.loss).all() and torch.isfinite(got.grad).all()
    assert torch.equal(got.out.overlap_count.cpu(), known.sum(-1) if mode == "drop"
                       else torch.full((n,), k))
    # Direct formula: sum_k b_k (log b_k - log a_k) over the kept entries, both renormalised.
    logq = torch.log_softmax(z.double().cpu(), -1).gather(-1, ids_cpu)
    l_bins = torch.where(known, lp.double().cpu(), -INF if mode == "drop" else clamp)
    s_bins = torch.where(known, logq, -INF) if mode == "drop" else logq.clamp_min(clamp)
    if mode == "floor":
        l_bins = l_bins.clamp_min(clamp)
    lb = s_bins - torch.logsumexp(s_bins, -1, keepdim=True)
    la = l_bins - torch.logsumexp(l_bins, -1, keepdim=True)
    b = lb.exp()
    want = torch.where(b > 0, b * (lb - torch.where(b > 0, la, 0.0)), 0.0).sum(-1)
    assert_close(got.out.loss, want, F32, "direct formula")
