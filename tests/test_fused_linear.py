"""fused_linear_topk_distill_loss against the unfused path (topk_distill_loss on hidden @ W.T + b)
and the float64 reference: values, masses and the gradients of hidden, weight and bias, for
every loss x support, chunkings, masks, reductions, dtypes, TP (gloo) and the memory bound."""
import itertools
import os
import subprocess
import sys
import textwrap
import zlib

import pytest
import torch

import topk_distill as td
from topk_distill import ops, reference

from _dist_utils import run_distributed
from _inputs import LOSSES, SUPPORTS, assert_close, emulated_cuda_ran

# The fused path on CPU tensors: the CPU kernels, and the CUDA kernels under the CUDA emulator
# (tests/conftest.py switches the backend for "cuda_emu").
HOST_DEVICES = ["cpu", "cuda_emu"]

ref = reference.topk_distill_loss
GRAD_OUT = 1.7  # the incoming gradient: the backward must scale the stored gradients by it


def make_batch(n, h, v, k, *, seed=0, dtype=torch.float64, special_rows=True, neg_inf=False):
    """hidden [n, h], weight [v, h], bias [v] and a teacher top-k correlated with the student.
    special_rows: ids at columns 0 and v-1, a padding entry, a duplicate, an all-padding row;
    neg_inf: a teacher log-prob of -inf (RKL-like losses are then inf unless clamped)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64) * (1.5 / h ** 0.5)
    bias = torch.randn(v, generator=g, dtype=torch.float64) * 0.5
    z = hidden @ weight.T + bias
    t_logp = torch.log_softmax(0.6 * z + torch.randn(n, v, generator=g, dtype=torch.float64), -1)
    ids = t_logp.topk(k, dim=-1).indices
    if special_rows and n >= 4:
        ids[0, 0], ids[0, -1] = 0, v - 1
        ids[1, -1] = -1
        ids[2, 1] = ids[2, 0]
        ids[3, :] = -1
    lp = torch.where(ids >= 0, t_logp.gather(-1, ids.clamp_min(0)), 0.0)
    if neg_inf and n >= 5:
        lp[4, -1] = float("-inf")
    return hidden.to(dtype), weight.to(dtype), bias.to(dtype), ids, lp


def run_fused(hidden, weight, bias, ids, lp, **kw):
    """(loss, student_mass, teacher_mass, grad_hidden, grad_weight, grad_bias) of one call,
    backpropagating GRAD_OUT."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (hidden, weight, bias)]
    out = td.fused_linear_topk_distill_loss(leaves[0], leaves[1], ids, lp, bias=leaves[2], **kw)
    grads = torch.autograd.grad(out.loss * GRAD_OUT, leaves)
    return (out.loss.detach(), out.student_mass, out.teacher_mass, *grads)


def run_unfused(fn, hidden, weight, bias, ids, lp, **kw):
    """The same through materialised logits, with autograd through the GEMM."""
    kw = {k: v for k, v in kw.items() if k != "chunk_size"}
    leaves = [t.detach().clone().requires_grad_(True) for t in (hidden, weight, bias)]
    out = fn(leaves[0] @ leaves[1].T + leaves[2], ids, lp, **kw)
    grads = torch.autograd.grad(out.loss * GRAD_OUT, leaves)
    return (out.loss.detach(), out.student_mass, out.teacher_mass, *grads)


NAMES = ("loss", "student_mass", "teacher_mass", "grad_hidden", "grad_weight", "grad_bias")


def check(got, exp, dtype, what=""):
    for name, a, b in zip(NAMES, got, exp):
        assert_close(a, b, torch.float32 if "mass" in name else dtype, f"{what} {name}")


# ----------------------------------------------------------------------------- correctness

SWEEP = list(itertools.product(LOSSES, SUPPORTS))


@pytest.mark.parametrize("loss,support", SWEEP)
@pytest.mark.parametrize("device", HOST_DEVICES)
def test_every_loss_and_support_matches_reference_and_unfused(loss, support, device):
    """fp64 against the float64 oracle, fp32 against the unfused kernels; the case index picks a
    chunk size (dividing N or not, 1, > N), a reduction, a clamp and a temperature."""
    i = SWEEP.index((loss, support))
    chunk = [1, 4, 5, 13, 100, None][i % 6]
    kw = dict(loss=loss, support=support, reduction=["mean", "sum"][(i // 3) % 2],
              log_prob_min_clamp=[None, -4.0, None][i % 3], temperature=[1.0, 2.5][(i // 2) % 2],
              t2_scale=i % 4 == 3, chunk_size=chunk)
    seed = zlib.crc32(f"{loss}-{support}".encode()) % 1000
    batch = make_batch(13, 16, 50, 6, seed=seed, neg_inf=kw["log_prob_min_clamp"] is not None)
    check(run_fused(*batch, **kw), run_unfused(ref, *batch, **kw), torch.float64,
          f"fp64 chunk={chunk}")
    b32 = [batch[0].float(), batch[1].float(), batch[2].float(), batch[3], batch[4].float()]
    check(run_fused(*b32, **kw), run_unfused(td.topk_distill_loss, *b32, **kw), torch.float32,
          f"fp32 chunk={chunk}")


def test_fused_linear_runs_the_emulated_cuda_kernels_per_chunk():
    hidden, weight, bias, ids, lp = make_batch(13, 16, 50, 6, seed=3, dtype=torch.float32)
    with ops.use_backend("emulated_cuda"), emulated_cuda_ran() as ran:
        run_fused(hidden, weight, bias, ids, lp, chunk_size=5)
    # 3 chunks x (shard pass, epilogue, in-place backward)
    assert ran()["launches"] == 9, ran()


@pytest.mark.parametrize("chunk_size", [1, 7, 10, 30, 31, 1000, None])
@pytest.mark.parametrize("device", HOST_DEVICES)
def test_chunk_sizes_and_leading_dims(chunk_size, device):
    """N = 30 rows given as [2, 3, 5, H]; chunk sizes that divide N, do not, 1 and > N."""
    hidden, weight, bias, ids, lp = make_batch(30, 24, 41, 5, seed=1)
    hidden, ids, lp = hidden.view(2, 3, 5, 24), ids.view(2, 3, 5, 5), lp.view(2, 3, 5, 5)
    kw = dict(loss="fkl+rkl", support="tail", chunk_size=chunk_size)
    got = run_fused(hidden, weight, bias, ids, lp, **kw)
    assert got[0].shape == () and got[1].shape == (2, 3, 5) and got[3].shape == (2, 3, 5, 24)
    check(got, run_unfused(ref, hidden, weight, bias, ids, lp, **kw), torch.float64)
    x = [hidden.float(), weight.float(), bias.float(), ids, lp.float()]
    check(run_fused(*x, **kw), run_unfused(td.topk_distill_loss, *x, **kw), torch.float32)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("device", HOST_DEVICES)
def test_mask_and_reductions(reduction, device):
    hidden, weight, bias, ids, lp = make_batch(19, 16, 37, 4, seed=2)
    mask = torch.rand(19, generator=torch.Generator().manual_seed(3)) > 0.4
    kw = dict(loss="jsd", support="renorm", mask=mask, reduction=reduction, chunk_size=6)
    got = run_fused(hidden, weight, bias, ids, lp, **kw)
    check(got, run_unfused(ref, hidden, weight, bias, ids, lp, **kw), torch.float64)
    assert torch.all(got[1][~mask] == 0) and torch.all(got[2][~mask] == 0)
    assert torch.all(got[3][~mask] == 0)  # masked rows: no gradient to their hidden


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_all_masked_and_empty_batches_give_zero(reduction):
    hidden, weight, bias, ids, lp = make_batch(9, 8, 20, 3, seed=4)
    cases = [(hidden, ids, lp, torch.zeros(9, dtype=torch.bool)),
             (hidden[:0], ids[:0], lp[:0], None)]
    for h, i, l, m in cases:
        got = run_fused(h, weight, bias, i, l, mask=m, reduction=reduction, chunk_size=4)
        assert got[0].item() == 0.0
        for g in got[3:]:
            assert torch.all(g == 0)


@pytest.mark.parametrize("weight_grad_fp32", [False, True])
def test_bf16_loosely_matches_fp32(weight_grad_fp32):
    hidden, weight, bias, ids, lp = make_batch(40, 32, 64, 8, seed=5)
    kw = dict(loss="jsd", support="topk", chunk_size=7)
    x16 = [t.bfloat16() if t.is_floating_point() else t for t in (hidden, weight, bias, ids)]
    x16.append(lp.float())
    got = run_fused(*x16, weight_grad_fp32=weight_grad_fp32, **kw)
    assert all(g.dtype == torch.bfloat16 for g in got[3:])
    x32 = [t.float() if t.is_floating_point() else t for t in x16]  # the same rounded values
    exp = run_unfused(ref, *x32, **kw)
    for name, a, b in zip(NAMES, got, exp):
        scale = b.abs().max().item()
        torch.testing.assert_close(a.float(), b.float(), rtol=3e-2, atol=2e-2 * scale,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_extreme_rows_and_nan_gradient_rows_match_unfused():
    """RKL against a teacher probability of 0 (no clamp): the loss is inf and, as in the unfused
    path (DECISIONS 15), the gradient is NaN - every weight row sees the NaN row."""
    batch = make_batch(8, 8, 20, 4, seed=6, neg_inf=True)
    got = run_fused(*batch, loss="rkl", chunk_size=3)
    exp = run_unfused(ref, *batch, loss="rkl")
    assert got[0].isinf() and exp[0].isinf()
    check(got, exp, torch.float64)


def test_inputs_that_need_no_grad_skip_their_gemms():
    hidden, weight, bias, ids, lp = make_batch(11, 8, 30, 4, seed=7)
    full = run_fused(hidden, weight, bias, ids, lp, chunk_size=4)
    for needs in [(True, False, False), (False, True, False), (False, False, True),
                  (True, True, False)]:
        leaves = [t.detach().clone().requires_grad_(r) for t, r in zip((hidden, weight, bias),
                                                                        needs)]
        out = td.fused_linear_topk_distill_loss(leaves[0], leaves[1], ids, lp, bias=leaves[2],
                                                chunk_size=4)
        (out.loss * GRAD_OUT).backward()
        torch.testing.assert_close(out.loss.detach(), full[0], rtol=0, atol=0)
        for leaf, need, exp in zip(leaves, needs, full[3:]):
            if need:
                torch.testing.assert_close(leaf.grad, exp, rtol=1e-12, atol=1e-14)
            else:
                assert leaf.grad is None
    # No bias, and no grad at all (inference): same values as the unfused path.
    with torch.no_grad():
        out = td.fused_linear_topk_distill_loss(hidden, weight, ids, lp, chunk_size=5)
    exp = td.topk_distill_loss(hidden @ weight.T, ids, lp)
    torch.testing.assert_close(out.loss, exp.loss)
    assert not out.loss.requires_grad
    got = run_fused(hidden, weight, torch.zeros_like(bias), ids, lp, chunk_size=5)
    torch.testing.assert_close(got[0], exp.loss)


def test_non_contiguous_hidden_and_weight():
    hidden, weight, bias, ids, lp = make_batch(12, 8, 30, 4, seed=11)
    big = torch.randn(12, 3, 10, dtype=torch.float64)
    big[:, 1, 1:9] = hidden
    big.requires_grad_(True)
    w_t = weight.T.contiguous().requires_grad_(True)  # weight as the transpose of [H, V] storage
    view, w = big[:, 1, 1:9], w_t.T
    assert not view.is_contiguous() and not w.is_contiguous()
    out = td.fused_linear_topk_distill_loss(view, w, ids, lp, bias=bias, chunk_size=5)
    (out.loss * GRAD_OUT).backward()
    exp = run_fused(hidden, weight, bias, ids, lp, chunk_size=5)
    torch.testing.assert_close(out.loss.detach(), exp[0])
    torch.testing.assert_close(big.grad[:, 1, 1:9], exp[3])
    assert torch.all(big.grad[:, 0] == 0) and torch.all(big.grad[:, 1, 9:] == 0)
    torch.testing.assert_close(w_t.grad.T, exp[4])


def test_module_twin_and_backward_runs_once():
    hidden, weight, bias, ids, lp = make_batch(10, 8, 30, 4, seed=8)
    crit = td.FusedLinearTopKDistillLoss(loss="tvd", support="tail", chunk_size=3,
                                         reduction="sum")
    assert "chunk_size=3" in repr(crit)
    h = hidden.clone().requires_grad_(True)
    out = crit(h, weight, ids, lp, bias=bias)
    exp = td.fused_linear_topk_distill_loss(hidden, weight, ids, lp, bias=bias, loss="tvd",
                                            support="tail", reduction="sum")
    torch.testing.assert_close(out.loss, exp.loss)
    out.loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="only once"):
        out.loss.backward()
    with pytest.raises(ValueError, match="reduction"):
        td.FusedLinearTopKDistillLoss(reduction="none")


def test_errors_name_the_argument():
    hidden, weight, bias, ids, lp = make_batch(6, 8, 20, 3, seed=9)
    f = td.fused_linear_topk_distill_loss
    with pytest.raises(ValueError, match="reduction='none'"):
        f(hidden, weight, ids, lp, reduction="none")
    with pytest.raises(ValueError, match="weight must have shape"):
        f(hidden, weight[:, :5], ids, lp)
    with pytest.raises(TypeError, match="weight must have the dtype of hidden"):
        f(hidden, weight.float(), ids, lp)
    with pytest.raises(ValueError, match="bias must have shape"):
        f(hidden, weight, ids, lp, bias=bias[:3])
    with pytest.raises(ValueError, match="teacher_ids .*leading shape of hidden"):
        f(hidden, weight, ids[:4], lp[:4])
    with pytest.raises(ValueError, match="mask must have the leading shape of hidden"):
        f(hidden, weight, ids, lp, mask=torch.ones(5, dtype=torch.bool))
    with pytest.raises(ValueError, match="chunk_size"):
        f(hidden, weight, ids, lp, chunk_size=0)
    with pytest.raises(ValueError, match="teacher_ids has an id >= the vocab size V=20"):
        f(hidden, weight, ids + 20, lp)
    with pytest.raises(ValueError, match="beta"):
        f(hidden, weight, ids, lp, loss="jsd", beta=1.5)


def test_auto_chunk_size_rule():
    from topk_distill.fused_linear import auto_chunk_size
    cpu = torch.device("cpu")
    assert auto_chunk_size(10 ** 6, 32000, torch.float32, cpu) == 1024  # 128 MiB / 128000 B
    assert auto_chunk_size(10 ** 6, 32000, torch.bfloat16, cpu) == 2048
    assert auto_chunk_size(100, 32000, torch.float32, cpu) == 100
    assert auto_chunk_size(10 ** 6, 10 ** 9, torch.float32, cpu) == 1


# ----------------------------------------------------------------------------- TP (gloo)

TP_WIDTHS = [29, 18]  # uneven shards of V = 47
TP_CASES = [dict(loss="jsd", support="tail", chunk_size=4),
            dict(loss="rkl", support="renorm", chunk_size=None, log_prob_min_clamp=-6.0,
                 mask=torch.arange(11) % 3 != 1),
            dict(loss="srkl", support="topk", chunk_size=20, reduction="sum", temperature=2.0,
                 check_inputs=False)]


def _tp_worker(rank, world_size, cases, backend="native"):
    import torch.distributed as dist
    ops.set_backend(backend)
    group = dist.group.WORLD
    hidden, weight, bias, ids, lp = make_batch(11, 12, sum(TP_WIDTHS), 5, seed=10)
    lo = sum(TP_WIDTHS[:rank])
    w, b = weight[lo:lo + TP_WIDTHS[rank]], bias[lo:lo + TP_WIDTHS[rank]]
    results = [run_fused(hidden, w, b, ids, lp, tp_group=group, **kw) for kw in cases]
    # Ranks that cut the rows differently must all raise, not hang.
    try:
        td.fused_linear_topk_distill_loss(hidden, w, ids, lp, chunk_size=3 + rank, tp_group=group)
        error = None
    except ValueError as e:
        error = str(e)
    return results, error


@pytest.mark.parametrize("backend", ["native", "emulated_cuda"])
def test_tensor_parallel_uneven_shards_match_unsharded(backend):
    per_rank = run_distributed(_tp_worker, world_size=2, args=(TP_CASES, backend), deadline_s=180)
    batch = make_batch(11, 12, sum(TP_WIDTHS), 5, seed=10)
    for i, kw in enumerate(TP_CASES):
        exp = run_unfused(ref, *batch, **kw)
        r0, r1 = per_rank[0][0][i], per_rank[1][0][i]
        for r in (r0, r1):  # loss and masses: replicated, equal to the unsharded call
            for name, a, b in zip(NAMES[:3], r[:3], exp[:3]):
                assert_close(a, b, torch.float64, f"{kw} {name}")
        # hidden: each rank holds its partial grad_logits_r @ W_r; their sum is the full one.
        assert_close(r0[3] + r1[3], exp[3], torch.float64, f"{kw} grad_hidden (sum over ranks)")
        assert_close(torch.cat([r0[4], r1[4]]), exp[4], torch.float64, f"{kw} grad_weight")
        assert_close(torch.cat([r0[5], r1[5]]), exp[5], torch.float64, f"{kw} grad_bias")
    for _, error in per_rank:
        assert error is not None and "chunk_size must be the same on every rank" in error


# ----------------------------------------------------------------------------- memory

MEMORY_SCRIPT = textwrap.dedent("""
    import torch, topk_distill as td

    def status(field):  # bytes
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1]) * 1024

    N, V, H, K = 16384, 32000, 256, 16
    g = torch.Generator().manual_seed(0)
    hidden = (torch.randn(N, H, generator=g) * 0.1).requires_grad_(True)
    weight = (torch.randn(V, H, generator=g) * 0.1).requires_grad_(True)
    bias = torch.zeros(V, requires_grad=True)
    ids = torch.randint(0, V, (N, K), generator=g)
    lp = torch.log_softmax(torch.randn(N, K, generator=g), -1) - 1.0
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS high-water mark (VmHWM) to the current RSS
    before = status("VmRSS:")
    out = td.fused_linear_topk_distill_loss(hidden, weight, ids, lp, bias=bias, loss="jsd")
    out.loss.backward()
    assert torch.isfinite(out.loss) and hidden.grad is not None and weight.grad is not None
    print(status("VmHWM:") - before)
""")


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
def test_peak_memory_is_far_below_one_full_logits_buffer():
    """N=16384, V=32000, H=256 fp32 on CPU: one [N, V] fp32 buffer is 2 GB; the whole fused
    forward + backward must stay under a quarter of it above the inputs (measured as the peak
    resident set - the kernel's high-water mark, reset just before the call - in a fresh
    process; independent of timing)."""
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT], capture_output=True, text=True,
                         env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    peak_extra = int(res.stdout.split()[0])
    full_logits = 16384 * 32000 * 4
    # Expected: one 1024-row fp32 chunk (131 MB) + grad_weight (33 MB) + grad_hidden (17 MB).
    assert peak_extra < full_logits // 4, (peak_extra, full_logits)
