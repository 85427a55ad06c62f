"""The CUDA kernels against the CPU kernels on the same inputs (the CPU ops are tested against
the float64 reference elsewhere), on two targets:

* ``cuda_emu`` - always: the CUDA kernels' source compiled for the host and run on CPU tensors
  by the CUDA emulator (csrc/emu), with its checks on (barriers, warp collectives, shared-memory
  bounds, launch limits) and its schedules drawn from TOPK_DISTILL_EMU_SEED;
* ``cuda`` - a real GPU, when there is one and the build has the CUDA kernels.

Covered: fp32 / bf16 / fp16 / fp64 logits, int32 / int64 ids, K from 1 to 1100 (the epilogue's
warp and block paths), V_r not a multiple of 8, unaligned rows (storage offset 1, odd row
stride), duplicates, padding, ids outside the shard (vocab_start > 0) and invalid ids, the
split-row path (few rows, long rows: reached at these sizes because the emulated host sees
TOPK_DISTILL_EMU_SMS = 132 SMs), zero and NaN gradient rows, the in-place backward; on a real GPU
also CUDA graph capture and the forward's memory footprint.
"""
import contextlib
import math

import pytest
import torch

import topk_distill as td
from topk_distill import ops

from _inputs import LOSSES, SUPPORTS, assert_close_rowwise, emulated_cuda_ran, teacher_batch


def _cuda_kernels_built():
    try:
        import topk_distill._C as C
    except ImportError:
        return False
    return bool(getattr(C, "with_cuda", False)) and torch._C._dispatch_has_kernel_for_dispatch_key(
        "topk_distill::shard_pass", "CUDA")


class Target:
    """Where the CUDA kernels run: ``to(t)`` puts a CPU tensor there (a copy), ``active()`` is the
    context in which ops calls reach them; the CPU reference runs outside it, natively."""

    def __init__(self, name):
        self.name = name
        self.emulated = name == "cuda_emu"

    def to(self, t):
        return t.clone() if self.emulated else t.cuda()

    def active(self):
        return ops.use_backend("emulated_cuda") if self.emulated else contextlib.nullcontext()

    def __repr__(self):
        return self.name


TARGETS = [pytest.param("cuda_emu")] + [
    pytest.param("cuda", marks=[
        pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
        pytest.mark.skipif(not _cuda_kernels_built(), reason="built without CUDA kernels")])]


@pytest.fixture(params=TARGETS)
def dev(request):
    return Target(request.param)


def gpu_only(reason):
    """For the tests that need a real GPU (graphs, the device allocator)."""
    return [pytest.mark.skipif(not torch.cuda.is_available(), reason=f"needs a CUDA device: {reason}"),
            pytest.mark.skipif(not _cuda_kernels_built(), reason="built without CUDA kernels")]


LOW = [torch.float32, torch.bfloat16, torch.float16]
KS = [1, 7, 64, 300, 1100]


def shard_inputs(n, v, k, *, dtype=torch.float32, id_dtype=torch.int64, vocab_start=0, extra=0,
                 seed=0, invalid=False):
    """This rank's logits [n, v] (columns vocab_start .. vocab_start + v of a vocab of
    vocab_start + v + extra), global teacher ids [n, k] with padding, duplicates and ids in
    other shards, and teacher log-probs. Returns (z, ids, lp, vocab_size) on the CPU."""
    vocab = vocab_start + v + extra
    z_full, ids, lp = teacher_batch(n, vocab, k, seed=seed, logits_dtype=torch.float64)
    if n >= 8 and k >= 3:
        ids[6, 2] = ids[6, 0]  # one more duplicate, away from column 0
        lp[6, 2] = lp[6, 0]
        ids[7, -1] = -5  # padding is any negative id
        lp[7, -1] = 0.0
    if n >= 10 and k >= 4:  # a row whose ids are all repeats of two columns
        ids[9] = torch.where(torch.arange(k) % 2 == 0, ids[9, 0], ids[9, 1])
        lp[9] = torch.where(torch.arange(k) % 2 == 0, lp[9, 0], lp[9, 1])
    if invalid and n >= 9:
        ids[8, 0] = vocab + 3  # >= V: ignored, the row's loss is NaN
    z = z_full[:, vocab_start:vocab_start + v].contiguous().to(dtype)
    return z, ids.to(id_dtype).contiguous(), lp.float().contiguous(), vocab


def unaligned(z, how):
    """The same values as a view whose rows are not 16-byte aligned."""
    n, v = z.shape
    if how == "offset1":  # storage offset 1, contiguous rows
        buf = torch.empty(n * v + 1, dtype=z.dtype, device=z.device)
        out = buf[1:].view(n, v)
    elif how == "stride":  # row stride v + 3 and storage offset 1
        buf = torch.empty(n, v + 3, dtype=z.dtype, device=z.device)
        out = buf[:, 1:v + 1]
    else:
        return z
    out.copy_(z)
    assert out.storage_offset() > 0
    return out


def tol_for(dtype):
    return {torch.float64: (1e-10, 1e-12), torch.float32: (2e-5, 2e-6)}.get(dtype, (2e-2, 2e-3))


def close(a, b, dtype, what):
    rtol, atol = tol_for(dtype)
    torch.testing.assert_close(a.double().cpu(), b.double().cpu(), rtol=rtol, atol=atol,
                               equal_nan=True, msg=lambda m: f"{what}: {m}")


def check_shard_pass(dev, z_cpu, ids_cpu, vocab_start, inv_t=0.7, z_dev=None):
    z_dev = dev.to(z_cpu) if z_dev is None else z_dev
    ref = ops.shard_pass(z_cpu, ids_cpu, vocab_start, inv_t)
    with dev.active():
        got = ops.shard_pass(z_dev, dev.to(ids_cpu), vocab_start, inv_t)
    acc = ref[0].dtype
    # the max and the gathered logits are exact (same rounding); the sums are reordered
    torch.testing.assert_close(got[0].cpu(), ref[0], rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(got[2].cpu(), ref[2], rtol=0, atol=0, equal_nan=True)
    rtol = 1e-12 if acc == torch.float64 else 2e-5
    torch.testing.assert_close(got[1].cpu(), ref[1], rtol=rtol, atol=1e-30, equal_nan=True)
    return ref, got


# ---------------------------------------------------------------------------------------------
# Registration, and the emulated target really is the emulator
# ---------------------------------------------------------------------------------------------


def test_every_op_has_a_kernel_per_target():
    for name in ("shard_pass", "epilogue", "backward", "backward_"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"topk_distill_emu::{name}", "CPU"), name
        if _cuda_kernels_built():
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"topk_distill::{name}", "CUDA"), name


def test_emulated_target_runs_the_emulator():
    z, ids, lp, _ = shard_inputs(12, 700, 9, seed=1)
    with emulated_cuda_ran() as ran:
        with ops.use_backend("emulated_cuda"):
            td.topk_distill_loss(z.requires_grad_(True), ids, lp).loss.backward()
    stats = ran()
    # shard pass, epilogue, backward: three launches; every block synchronised its threads
    assert stats["launches"] == 3 and stats["barriers"] > 0 and stats["warp_collectives"] > 0, stats


# ---------------------------------------------------------------------------------------------
# shard_pass
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", LOW + [torch.float64])
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("k", KS)
def test_shard_pass_matches_cpu_with_vocab_start_and_odd_width(dev, dtype, id_dtype, k):
    z, ids, _, _ = shard_inputs(12, 1001, k, dtype=dtype, id_dtype=id_dtype, vocab_start=357,
                                extra=400, seed=k)
    check_shard_pass(dev, z, ids, 357)


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("how", ["offset1", "stride"])
def test_shard_pass_unaligned_rows(dev, dtype, how):
    z, ids, _, _ = shard_inputs(12, 1003, 9, dtype=dtype, seed=3)
    check_shard_pass(dev, z, ids, 0, z_dev=unaligned(dev.to(z), how))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,v,k", [(1, 262144 + 5, 64), (3, 100003, 1100), (64, 262144, 32),
                                   (2, 600001, 7)])
def test_shard_pass_split_row_path(dev, dtype, n, v, k):
    z, ids, _, _ = shard_inputs(n, v, k, dtype=dtype, seed=n + k)
    if n >= 1 and k >= 2:
        ids[0, 1] = ids[0, 0]  # a duplicate in a split row
    check_shard_pass(dev, z, ids, 0)


def test_shard_pass_special_values(dev):
    z, ids, _, _ = shard_inputs(12, 517, 9, seed=5)
    z[1, 3] = float("nan")
    z[2] = -math.inf
    z[3, :10] = -math.inf
    z[4] *= 5e3
    check_shard_pass(dev, z, ids, 0)


def test_shard_pass_no_teacher_id_in_this_shard(dev):
    z, ids, _, _ = shard_inputs(10, 800, 16, vocab_start=0, extra=4000, seed=6)
    ids = torch.where(ids >= 0, ids + 10_000, ids)  # every id belongs to another rank
    ref, got = check_shard_pass(dev, z, ids, 0)
    assert torch.all(got[1][:, 1:] == 0)


# ---------------------------------------------------------------------------------------------
# epilogue: the same inputs through the CPU and the CUDA kernel
# ---------------------------------------------------------------------------------------------


def run_epilogue(dev, stats, args):
    with dev.active():
        return ops.epilogue(*[dev.to(a) if isinstance(a, torch.Tensor) else a
                              for a in (*stats, *args)])


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("support", SUPPORTS)
@pytest.mark.parametrize("k", [1, 7, 300])
def test_epilogue_matches_cpu(dev, loss, support, k):
    z, ids, lp, vocab = shard_inputs(12, 700, k, seed=11 + k, invalid=True)
    stats = ops.shard_pass(z, ids, 0, 0.8)
    mask = torch.ones(12, dtype=torch.bool)
    mask[5] = False
    for clamp in (None, -6.0):
        args = (ids, lp, mask, vocab, loss, support, 0.3, 0.2, 0.1, clamp, 1.7)
        ref = ops.epilogue(*stats, *args)
        got = run_epilogue(dev, stats, args)
        for name, r, g in zip(("loss", "student_mass", "teacher_mass", "row_coefs", "g"), ref, got):
            assert g.dtype == r.dtype and g.shape == r.shape, name
            torch.testing.assert_close(g.cpu(), r, rtol=1e-7, atol=1e-9, equal_nan=True,
                                       msg=lambda m: f"{name} clamp={clamp}: {m}")


@pytest.mark.parametrize("k", [256, 257, 1100])
@pytest.mark.parametrize("lp_dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_epilogue_warp_and_block_paths(dev, k, lp_dtype):
    z, ids, lp, vocab = shard_inputs(9, 2000, k, seed=k, id_dtype=torch.int32)
    stats = ops.shard_pass(z, ids, 0, 1.0)
    args = (ids, lp.to(lp_dtype), None, vocab, "jsd", "renorm", 0.4, 0.1, 0.1, -9.0, 1.0)
    ref = ops.epilogue(*stats, *args)
    got = run_epilogue(dev, stats, args)
    for r, g in zip(ref, got):
        torch.testing.assert_close(g.cpu(), r, rtol=1e-7, atol=1e-9, equal_nan=True)


def test_epilogue_is_deterministic(dev):
    z, ids, lp, vocab = shard_inputs(64, 500, 300, seed=2)
    stats = ops.shard_pass(z, ids, 0, 1.0)
    args = (ids, lp, None, vocab, "fkl", "tail", 0.5, 0.1, 0.1, None, 1.0)
    a = run_epilogue(dev, stats, args)
    b = run_epilogue(dev, stats, args)
    for x, y in zip(a, b):
        assert torch.equal(x.nan_to_num(1.5), y.nan_to_num(1.5))


# ---------------------------------------------------------------------------------------------
# backward
# ---------------------------------------------------------------------------------------------


def backward_inputs(n, v, k, dtype, *, id_dtype=torch.int64, vocab_start=0, extra=0, seed=0,
                    loss="jsd", support="tail", clamp=-7.0):
    z, ids, lp, vocab = shard_inputs(n, v, k, dtype=dtype, id_dtype=id_dtype,
                                     vocab_start=vocab_start, extra=extra, seed=seed)
    inv_t = 0.8
    row_max, sums, gathered = ops.shard_pass(z, ids, vocab_start, inv_t)
    _, _, _, coefs, g = ops.epilogue(row_max, sums, gathered, ids, lp, None, vocab, loss, support,
                                     0.5, 0.1, 0.1, clamp, 1.0)
    grad_rows = torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=row_max.dtype)
    if n > 4:
        grad_rows[3] = 0.0  # a zero-weight row
    return z, ids, row_max, coefs, g, grad_rows, vocab_start, inv_t


def check_backward(dev, z, ids, row_max, coefs, g, grad_rows, vocab_start, inv_t, *, z_dev=None,
                   inplace=False):
    ref = ops.backward(z, ids, row_max, coefs, g, grad_rows, vocab_start, inv_t)
    zd = dev.to(z) if z_dev is None else z_dev
    dev_args = [dev.to(t) for t in (ids, row_max, coefs, g, grad_rows)]
    with dev.active():
        if inplace:
            ops.backward_(zd, *dev_args, vocab_start, inv_t)
            got = zd
        else:
            got = ops.backward(zd, *dev_args, vocab_start, inv_t)
            assert got.is_contiguous() and got.dtype == z.dtype
    assert_close_rowwise(got, ref, z.dtype, f"backward {z.dtype} inplace={inplace}")
    return ref, got


@pytest.mark.parametrize("dtype", LOW + [torch.float64])
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("k", KS)
def test_backward_matches_cpu(dev, dtype, id_dtype, k):
    args = backward_inputs(12, 1001, k, dtype, id_dtype=id_dtype, vocab_start=211, extra=300,
                           seed=k)
    check_backward(dev, *args)


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("k", [1, 64, 1100])
def test_backward_inplace_matches_cpu(dev, dtype, k):
    args = backward_inputs(12, 1001, k, dtype, seed=k + 1)
    check_backward(dev, *args, inplace=True)


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("how", ["offset1", "stride"])
@pytest.mark.parametrize("inplace", [False, True])
def test_backward_unaligned_rows(dev, dtype, how, inplace):
    args = backward_inputs(12, 1003, 9, dtype, seed=4)
    check_backward(dev, *args, z_dev=unaligned(dev.to(args[0]), how), inplace=inplace)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,v,k", [(1, 262144 + 5, 64), (3, 100003, 1100), (2, 600001, 7)])
@pytest.mark.parametrize("inplace", [False, True])
def test_backward_split_row_path(dev, dtype, n, v, k, inplace):
    args = backward_inputs(n, v, k, dtype, seed=n + k)
    check_backward(dev, *args, inplace=inplace)


def test_backward_zero_and_nan_rows(dev):
    z, ids, row_max, coefs, g, grad_rows, vs, inv_t = backward_inputs(12, 300, 5, torch.float32,
                                                                       seed=9)
    z[0, 7] = float("nan")  # non-finite shift after a fresh shard pass
    row_max, _, _ = ops.shard_pass(z, ids, vs, inv_t)
    coefs[1, 1] = float("nan")  # a non-finite loss
    g[2].zero_()
    coefs[2, 1:].zero_()  # nothing to propagate: zeros even though the logits are fine
    grad_rows[4] = 0.0
    z[4, 3] = float("inf")  # zero-weight rows are zero even with non-finite logits
    ref, got = check_backward(dev, z, ids, row_max, coefs, g, grad_rows, vs, inv_t)
    assert torch.isnan(got[0]).all() and torch.isnan(got[1]).all()
    assert (got[2] == 0).all() and (got[4] == 0).all()


def test_backward_writes_every_element(dev):
    """The output comes from an uninitialised allocation - on a GPU poisoned by freeing NaN-filled
    memory first, under the emulator NaN-filled by the emulated allocator itself - so a column
    the kernel forgot shows up as NaN where the CPU kernel has none."""
    args = backward_inputs(16, 4099, 300, torch.bfloat16, seed=13)
    if not dev.emulated:
        junk = torch.full((16 * 4099 + 64,), float("nan"), dtype=torch.bfloat16, device="cuda")
        del junk
    check_backward(dev, *args)


# ---------------------------------------------------------------------------------------------
# The public loss on the target, graphs, memory
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("loss", ["fkl", "rkl", "jsd", "tvd"])
def test_loss_and_grad_match_cpu(dev, dtype, loss):
    z, ids, lp, _ = shard_inputs(16, 2003, 20, dtype=dtype, seed=31)
    kw = dict(loss=loss, support="tail", temperature=1.3, log_prob_min_clamp=-10.0,
              reduction="sum")
    zc = z.clone().requires_grad_(True)
    out_c = td.topk_distill_loss(zc, ids, lp, **kw)
    out_c.loss.backward()
    zg = dev.to(z).requires_grad_(True)
    with dev.active():
        out_g = td.topk_distill_loss(zg, dev.to(ids), dev.to(lp), **kw)
        out_g.loss.backward()
    torch.testing.assert_close(out_g.loss.cpu(), out_c.loss, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out_g.student_mass.cpu(), out_c.student_mass, rtol=1e-4, atol=1e-6)
    assert_close_rowwise(zg.grad, zc.grad, dtype, "grad")


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_emulated_results_do_not_depend_on_the_schedule(seed, monkeypatch):
    """Different schedule seeds and OS-thread counts: bitwise identical results (nothing in the
    kernels may depend on warp or block order)."""
    args = backward_inputs(24, 3001, 300, torch.float32, seed=51)
    z, ids = args[0], args[1]
    lp = shard_inputs(24, 3001, 300, seed=51)[2]
    results = []
    for emu_seed, threads in ((0, 1), (seed, 2), (seed * 7 + 1, 3)):
        monkeypatch.setenv("TOPK_DISTILL_EMU_SEED", str(emu_seed))
        monkeypatch.setenv("TOPK_DISTILL_EMU_THREADS", str(threads))
        with ops.use_backend("emulated_cuda"):
            x = z.clone().requires_grad_(True)
            out = td.topk_distill_loss(x, ids, lp, loss="jsd", support="tail", reduction="none")
            out.loss.sum().backward()
            results.append((out.loss.detach(), x.grad))
    for loss, grad in results[1:]:
        assert torch.equal(loss.nan_to_num(1.5), results[0][0].nan_to_num(1.5))
        assert torch.equal(grad.nan_to_num(1.5), results[0][1].nan_to_num(1.5))


@pytest.mark.parametrize("pytest_mark", [pytest.param(0, marks=gpu_only("CUDA graphs"))])
def test_cuda_graph_capture_without_input_checks(pytest_mark):
    z, ids, lp, _ = shard_inputs(32, 4001, 16, dtype=torch.bfloat16, seed=41)
    static_z = z.cuda().requires_grad_(True)
    static_ids, static_lp = ids.cuda(), lp.cuda()

    def step():
        static_z.grad = None
        out = td.topk_distill_loss(static_z, static_ids, static_lp, loss="jsd", support="topk",
                                   check_inputs=False)
        out.loss.backward()
        return out.loss

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):  # warm-up outside the graph
            eager_loss = step().detach().clone()
    torch.cuda.current_stream().wait_stream(s)
    eager_grad = static_z.grad.clone()

    graph = torch.cuda.CUDAGraph()
    static_z.grad = None
    with torch.cuda.graph(graph):
        static_z.grad = None
        out = td.topk_distill_loss(static_z, static_ids, static_lp, loss="jsd", support="topk",
                                   check_inputs=False)
        out.loss.backward()
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out.loss, eager_loss, rtol=0, atol=0)
    torch.testing.assert_close(static_z.grad, eager_grad, rtol=0, atol=0)
    # new data in the static inputs: the replay follows it
    with torch.no_grad():
        static_z.mul_(0.5)
    graph.replay()
    torch.cuda.synchronize()
    ref = td.topk_distill_loss(static_z.detach().float().cpu(), ids, lp, loss="jsd",
                               support="topk").loss
    close(out.loss, ref, torch.bfloat16, "replayed loss")


@pytest.mark.parametrize("pytest_mark", [pytest.param(0, marks=gpu_only("the device allocator"))])
def test_forward_allocates_nothing_of_size_n_by_v(pytest_mark):
    n, v = 256, 32768
    z = torch.randn(n, v, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    ids = torch.randint(0, v, (n, 64), device="cuda")
    lp = torch.log_softmax(torch.randn(n, 64, device="cuda"), -1)
    td.topk_distill_loss(z, ids, lp, check_inputs=False)  # warm-up (allocator, lazy init)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = td.topk_distill_loss(z, ids, lp, check_inputs=False)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < z.numel() * z.element_size() // 4, extra
    del out


@pytest.mark.parametrize("pytest_mark", [pytest.param(0, marks=gpu_only("the device allocator"))])
def test_split_path_forward_allocates_nothing_of_size_n_by_v(pytest_mark):
    n, v = 2, 1 << 20
    z = torch.randn(n, v, device="cuda", dtype=torch.float32)
    ids = torch.randint(0, v, (n, 32), device="cuda")
    ops.shard_pass(z, ids, 0, 1.0)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    ops.shard_pass(z, ids, 0, 1.0)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - base < z.numel() * z.element_size() // 16


def test_results_are_bitwise_reproducible(dev):
    args = backward_inputs(8, 50000, 128, torch.float32, seed=51)
    z = dev.to(args[0])
    rest = [dev.to(t) if isinstance(t, torch.Tensor) else t for t in args[1:]]
    with dev.active():
        a = ops.shard_pass(z, rest[0], 0, 0.8)
        b = ops.shard_pass(z, rest[0], 0, 0.8)
        for x, y in zip(a, b):
            assert torch.equal(x, y)
        assert torch.equal(ops.backward(z, *rest), ops.backward(z, *rest))


def test_environment_variable_routes_any_script_through_the_emulator(tmp_path):
    """TOPK_DISTILL_EMULATE_CUDA=1 python script.py: the public API runs the CUDA kernels."""
    import os
    import subprocess
    import sys

    script = tmp_path / "script.py"
    script.write_text(
        "import torch, topk_distill as td\n"
        "from topk_distill import _C\n"
        "z = torch.randn(6, 300, requires_grad=True)\n"
        "ids = torch.randint(0, 300, (6, 8))\n"
        "lp = torch.log_softmax(torch.randn(6, 8), -1)\n"
        "td.topk_distill_loss(z, ids, lp, loss='jsd').loss.backward()\n"
        "print(td.ops.backend(), _C._emu_stats()['launches'])\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root, TOPK_DISTILL_EMULATE_CUDA="1")
    out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["emulated_cuda", "3"]
    env["TOPK_DISTILL_EMULATE_CUDA"] = "maybe"
    bad = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode != 0 and "TOPK_DISTILL_EMULATE_CUDA must be 0 or 1" in bad.stderr
