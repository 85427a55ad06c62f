"""The kernel-backed API against the float64 reference: values, masses and gradients for every
loss x support x clamp x temperature, dtypes, masks, reductions, shapes and edge cases."""
import itertools
import zlib
import math

import pytest
import torch

import topk_distill as td
from topk_distill import reference

from _inputs import DEVICES, LOSSES, SUPPORTS, assert_close, assert_close_rowwise, tdev, teacher_batch

ref = reference.topk_distill_loss


def run(fn, z, ids, lp, **kw):
    """(per-row loss, student_mass, teacher_mass, grad of the summed loss) of one call."""
    z = z.detach().clone().requires_grad_(True)
    out = fn(z, ids, lp, reduction="none", **kw)
    (grad,) = torch.autograd.grad(out.loss.sum(), z)
    return out.loss.detach(), out.student_mass, out.teacher_mass, grad


def compare(z, ids, lp, logits_dtype, what="", rowwise_grad=False, **kw):
    """Kernel on `z` in logits_dtype vs the reference in float64 on the same (rounded) values.
    rowwise_grad: gradients compared with tolerances scaled by each row's largest entry."""
    x = z.to(logits_dtype)
    got = run(td.topk_distill_loss, x, ids, lp, **kw)
    exp = run(ref, x.double(), ids, lp.double(), **kw)
    value_dtype = torch.float64 if logits_dtype == torch.float64 else torch.float32
    for name, a, b, dt in zip(("loss", "student_mass", "teacher_mass", "grad"), got, exp,
                              (value_dtype, torch.float32, torch.float32, logits_dtype)):
        check = assert_close_rowwise if (rowwise_grad and name == "grad") else assert_close
        check(a, b, dt, f"{what} {name}")
    return got


CASES = list(itertools.product(LOSSES, SUPPORTS, [None, -4.0], [1.0, 2.5]))


@pytest.mark.parametrize("loss,support,clamp,temperature", CASES)
@pytest.mark.parametrize("device", DEVICES)
def test_matches_reference_fp64_and_fp32(loss, support, clamp, temperature, device):
    z, ids, lp = teacher_batch(12, 97, 9, seed=zlib.crc32(f"{loss}-{support}".encode()) % 1000, device=device)
    kw = dict(loss=loss, support=support, log_prob_min_clamp=clamp, temperature=temperature)
    dtypes = [torch.float32] + ([torch.float64] if device != "cuda" else [])
    for dt in dtypes:
        compare(z, ids, lp, dt, what=f"{dt}", **kw)


@pytest.mark.parametrize("loss,support", list(itertools.product(LOSSES, SUPPORTS)))
@pytest.mark.parametrize("logits_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("device", DEVICES)
def test_matches_reference_half_logits(loss, support, logits_dtype, device):
    z, ids, lp = teacher_batch(10, 131, 16, seed=3, device=device)
    compare(z, ids, lp, logits_dtype, loss=loss, support=support, t2_scale=True,
            temperature=1.7, log_prob_min_clamp=-9.0)


@pytest.mark.parametrize("lp_dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("ids_dtype", [torch.int32, torch.int64])
def test_teacher_dtypes(lp_dtype, ids_dtype):
    z, ids, lp = teacher_batch(8, 50, 6, seed=5)
    ids, lp = ids.to(ids_dtype), lp.to(lp_dtype)
    got = run(td.topk_distill_loss, z.float(), ids, lp, loss="jsd", support="tail")
    exp = run(ref, z.double(), ids.long(), lp.double(), loss="jsd", support="tail")
    for a, b in zip(got, exp):
        assert_close(a, b, torch.float32)


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("skew", [0.0, 0.25, 1.0])
@pytest.mark.parametrize("rkl_ratio", [0.0, 0.6, 1.0])
def test_loss_parameters_at_and_inside_their_bounds(beta, skew, rkl_ratio):
    z, ids, lp = teacher_batch(8, 40, 5, seed=11)
    for loss, support in itertools.product(["jsd", "skl", "srkl", "fkl+rkl"], SUPPORTS):
        compare(z, ids, lp, torch.float64, what=f"{loss}/{support}", loss=loss, support=support,
                beta=beta, skew=skew, rkl_ratio=rkl_ratio)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("device", DEVICES)
def test_mask_reduction_and_leading_dims(reduction, device):
    z, ids, lp = teacher_batch(24, 64, 8, seed=2, device=device)
    z, ids, lp = z.view(2, 3, 4, 64).float(), ids.view(2, 3, 4, 8), lp.view(2, 3, 4, 8)
    mask = torch.rand(2, 3, 4, generator=torch.Generator().manual_seed(0)) > 0.4
    mask = mask.to(tdev(device))
    kw = dict(loss="jsd", support="renorm", mask=mask, reduction=reduction)
    zk = z.clone().requires_grad_(True)
    zr = z.double().clone().requires_grad_(True)
    out = td.topk_distill_loss(zk, ids, lp, **kw)
    exp = ref(zr, ids, lp.double(), **kw)
    assert out.student_mass.shape == (2, 3, 4) and out.teacher_mass.shape == (2, 3, 4)
    assert out.student_mass.dtype == torch.float32 and out.teacher_mass.dtype == torch.float32
    assert not out.student_mass.requires_grad
    assert out.loss.dtype == torch.float32
    assert out.loss.shape == ((2, 3, 4) if reduction == "none" else ())
    assert_close(out.loss.detach(), exp.loss.detach(), torch.float32, "loss")
    assert_close(out.student_mass, exp.student_mass, torch.float32, "student_mass")
    assert torch.all(out.student_mass[~mask] == 0) and torch.all(out.teacher_mass[~mask] == 0)
    out.loss.sum().backward()
    exp.loss.sum().backward()
    assert_close(zk.grad, zr.grad, torch.float32, "grad")
    assert torch.all(zk.grad[~mask] == 0)


def test_mean_is_over_counted_rows_and_empty_batches_give_zero():
    z, ids, lp = teacher_batch(6, 30, 4, seed=1)
    mask = torch.tensor([True, False, True, False, False, True])
    per_row = td.topk_distill_loss(z, ids, lp, reduction="none", mask=mask).loss
    mean = td.topk_distill_loss(z, ids, lp, mask=mask).loss
    torch.testing.assert_close(mean, per_row[mask].mean())
    for zz, ii, ll, mm in [(z, ids, lp, torch.zeros(6, dtype=torch.bool)),
                           (z[:0], ids[:0], lp[:0], None)]:
        zz = zz.clone().requires_grad_(True)
        for reduction in ("mean", "sum"):
            out = td.topk_distill_loss(zz, ii, ll, mask=mm, reduction=reduction)
            assert out.loss.item() == 0.0
            (g,) = torch.autograd.grad(out.loss, zz)
            assert torch.all(g == 0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("loss", LOSSES)
def test_extreme_but_valid_inputs(loss, device):
    """Logits of +-1e4, teacher log-probs of -inf and -1e30, all-padding rows, K = 1, K > V."""
    for support in SUPPORTS:
        z, ids, lp = teacher_batch(8, 33, 5, seed=4, device=device)
        z[6] = 0.0
        z[6, :3] = 1e4
        z[6, 10:] = -1e4
        lp[7, 0] = -1e30
        kw = dict(loss=loss, support=support)
        for clamp in (None, -20.0):
            got = compare(z, ids, lp, torch.float32, what=f"{support} clamp={clamp}",
                          log_prob_min_clamp=clamp, rowwise_grad=True, **kw)
            # A row's gradient is finite exactly when its loss is, else all NaN (DECISIONS 15).
            # (Unclamped RKL against p = 0 is +inf; with duplicated ids the tail support can
            # face a teacher tail of 0, which the clamp of the K bins does not touch.)
            finite = torch.isfinite(got[0])
            assert torch.isfinite(got[3][finite]).all()
            assert torch.isnan(got[3][~finite]).all()
        z1, ids1, lp1 = teacher_batch(7, 20, 1, seed=6, device=device, special_rows=False)
        compare(z1, ids1, lp1, torch.float32, what="K=1", **kw)
        z2, ids2, lp2 = teacher_batch(6, 5, 9, seed=7, device=device)
        compare(z2, ids2, lp2, torch.float32, what="K>V", **kw)


def test_rkl_against_zero_teacher_probability_is_inf_unless_clamped():
    z, ids, lp = teacher_batch(6, 20, 4, seed=9, special_rows=False)
    lp[2, 1] = -math.inf
    out = td.topk_distill_loss(z, ids, lp, loss="rkl", reduction="none")
    assert math.isinf(out.loss[2].item()) and torch.isfinite(out.loss[[0, 1, 3, 4, 5]]).all()
    out = td.topk_distill_loss(z, ids, lp, loss="rkl", reduction="none", log_prob_min_clamp=-30.0)
    assert torch.isfinite(out.loss).all()


def test_tail_support_is_accurate_when_student_mass_is_near_one():
    """1 - Q is formed from the non-teacher sum, not as 1 - Q: full precision in fp32."""
    v, k = 1000, 4
    z = torch.zeros(3, v, dtype=torch.float64)
    ids = torch.tensor([[0, 1, 2, 3]] * 3)
    for r, margin in enumerate((16.0, 22.0, 28.0)):
        z[r, :k] = margin  # 1 - Q = 996 / (4 e^margin + 996): 1e-4 ... 1e-10
    lp = torch.log(torch.tensor([[0.3, 0.3, 0.2, 0.1]] * 3, dtype=torch.float64))
    got = td.topk_distill_loss(z.float(), ids, lp.float(), loss="fkl", support="tail",
                               reduction="none").loss.double()
    exact = []
    for r, margin in enumerate((16.0, 22.0, 28.0)):
        lse = math.log(k * math.exp(margin) + (v - k))
        s = margin - lse
        q_tail = (v - k) / (k * math.exp(margin) + (v - k))
        p = [0.3, 0.3, 0.2, 0.1]
        exact.append(sum(pi * (math.log(pi) - s) for pi in p) + 0.1 * (math.log(0.1) - math.log(q_tail)))
    torch.testing.assert_close(got, torch.tensor(exact, dtype=torch.float64), rtol=1e-6, atol=0)


def test_t2_scale_multiplies_loss_and_grad_by_t_squared():
    z, ids, lp = teacher_batch(6, 30, 4, seed=12)
    a = run(td.topk_distill_loss, z, ids, lp, loss="tvd", temperature=3.0)
    b = run(td.topk_distill_loss, z, ids, lp, loss="tvd", temperature=3.0, t2_scale=True)
    torch.testing.assert_close(b[0], 9.0 * a[0])
    torch.testing.assert_close(b[3], 9.0 * a[3])


def test_teacher_tensors_get_no_gradient():
    z, ids, lp = teacher_batch(6, 30, 4, seed=13)
    lp = lp.clone().requires_grad_(True)
    out = td.topk_distill_loss(z.requires_grad_(True), ids, lp)
    out.loss.backward()
    assert lp.grad is None and z.grad is not None


def test_non_contiguous_logits_and_storage_offsets():
    z, ids, lp = teacher_batch(8, 40, 5, seed=14)
    big = torch.randn(8, 3, 47, dtype=torch.float64)
    big[:, 1, 3:43] = z
    view = big[:, 1, 3:43]  # row stride 141, storage offset 50
    assert not view.is_contiguous()
    got = run(td.topk_distill_loss, view.float(), ids, lp, loss="jsd")
    exp = run(ref, z, ids, lp, loss="jsd")
    for a, b in zip(got, exp):
        assert_close(a, b, torch.float32)
    strided = big.float()[:, 1, 3:43]
    got = run(td.topk_distill_loss, strided, ids.t().contiguous().t(), lp.t().contiguous().t(),
              loss="jsd")
    for a, b in zip(got, exp):
        assert_close(a, b, torch.float32)


def test_module_twin():
    z, ids, lp = teacher_batch(6, 30, 4, seed=15)
    mask = torch.tensor([True, True, False, True, True, True])
    crit = td.TopKDistillLoss(loss="skl", skew=0.2, support="tail", temperature=1.5)
    a = crit(z, ids, lp, mask=mask)
    b = td.topk_distill_loss(z, ids, lp, loss="skl", skew=0.2, support="tail", temperature=1.5,
                             mask=mask)
    assert torch.equal(a.loss, b.loss)
    assert "skl" in repr(crit)
    with pytest.raises(ValueError, match="beta"):
        td.TopKDistillLoss(loss="jsd", beta=1.5)


def test_bitwise_deterministic_run_to_run_and_across_thread_counts():
    z, ids, lp = teacher_batch(64, 3000, 32, seed=16)
    z = z.float()
    outs = []
    threads = torch.get_num_threads()
    try:
        for nt in (threads, 1, threads):
            torch.set_num_threads(nt)
            outs.append(run(td.topk_distill_loss, z, ids, lp, loss="jsd", support="tail"))
    finally:
        torch.set_num_threads(threads)
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            assert torch.equal(a, b)
