"""The CUDA kernels' v2 ops (csrc/registration.cpp) against two references on the same inputs:
the CPU ops (csrc/cpu) and an independent float64 torch computation of the contract
(tests/_op_reference.py), on two targets:

* ``cuda_emu`` - always: the CUDA kernels' source compiled for the host and run on CPU tensors
  by the CUDA emulator (csrc/emu), with its checks on (barriers, warp collectives, shared-memory
  bounds, launch limits) and its schedules drawn from TOPK_DISTILL_EMU_SEED;
* ``cuda`` - a real GPU, when there is one and the build has the CUDA kernels.

Covered: fp32 / bf16 / fp16 / fp64 logits, int32 / int64 ids and labels, K from 1 to 4096, V_r not a
multiple of 8, unaligned rows, 3-D logits with arbitrary leading strides ([B, T, V][:, :-1],
[1, total, V], transposed leading dims) for the shard pass and the backward in and out of place
(in place: written through the user's strides and nowhere else), duplicates (O(K log K), not
quadratic), padding, ids and labels outside the shard and invalid ones, the entropy sum, the
student top-k (ties, k > V_r, NaN, the split path), the split-row path (few rows, long rows:
reached at these sizes because the emulated host sees TOPK_DISTILL_EMU_SMS = 132 SMs), loss-term
lists, grad_label / grad_entropy with zero and NaN rows, overlapping rows refused in place, and
the kernels' gradient against autograd of the float64 oracle; on a real GPU also CUDA graph
capture and the forward's memory footprint.
"""
import contextlib
import math

import pytest
import torch

import topk_distill as td
from topk_distill import ops

from _inputs import (LOSSES, SUPPORTS, assert_close_rowwise, emulated_cuda_ran, teacher_batch,
                     tolerances)
import _op_reference as ref

F64 = torch.float64


def _cuda_kernels_built():
    try:
        import topk_distill._C as C
    except ImportError:
        return False
    return bool(getattr(C, "with_cuda", False)) and torch._C._dispatch_has_kernel_for_dispatch_key(
        "topk_distill::shard_pass", "CUDA")


def _cpu_kernels():
    return torch._C._dispatch_has_kernel_for_dispatch_key("topk_distill::shard_pass", "CPU")


class Target:
    """Where the CUDA kernels run: ``to(t)`` puts a CPU tensor there (a copy), ``op(name)`` is the
    op serving it (torch.ops.topk_distill_emu.* on CPU tensors, or torch.ops.topk_distill.* on
    CUDA tensors), ``empty`` allocates there."""

    def __init__(self, name):
        self.name = name
        self.emulated = name == "cuda_emu"
        self.device = "cpu" if self.emulated else "cuda"

    def to(self, t):
        if t is None or not isinstance(t, torch.Tensor):
            return t
        return t.clone() if self.emulated else t.cuda()

    def op(self, name):
        return getattr(torch.ops.topk_distill_emu if self.emulated else torch.ops.topk_distill, name)

    def run(self, name, *args):
        return self.op(name)(*[self.to(a) if isinstance(a, torch.Tensor) else a for a in args])

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


def cpu_op(name, *args):
    """The CPU op on CPU copies of the arguments, or None where no CPU kernel is registered
    (test_every_op_has_a_kernel_per_target fails then)."""
    if not _cpu_kernels():
        return None
    return getattr(torch.ops.topk_distill, name)(
        *[a.cpu() if isinstance(a, torch.Tensor) else a for a in args])


LOW = [torch.float32, torch.bfloat16, torch.float16]
KS = [1, 7, 64, 300, 1100]
INV_T = 0.75  # exact in fp32: the float64 reference scales by the same number


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


def make_labels(n, vocab, vocab_start, v, *, seed=0, dtype=torch.int64):
    """Labels in this shard, in other shards, ignored (-1, -100) and one >= V (invalid)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, vocab, (n,), generator=g)
    if n >= 4:
        y[0] = vocab_start  # the shard's first column
        y[1] = -1
        y[2] = -100
        y[3] = vocab + 2  # >= V
    if n >= 6 and vocab_start > 0:
        y[5] = vocab_start - 1  # the previous shard
    return y.to(dtype)


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


def strided_view(z3, how, device, fill=float("nan")):
    """A view of [B, T, V] values ``z3`` on ``device`` whose leading dims do not fold into one
    stride, inside a NaN-filled base. Returns (base, view, region): region(t) takes the same
    view of any tensor shaped like base (to check what a kernel wrote around the view):
      "slice":      base [B, T + 1, V + 3], view base[:, :-1, 1:V+1] (logits[:, :-1] with a gap)
      "packed":     base [1, B*T + 2, V], view base[:, 1:-1] ([1, total, V], "rmpad")
      "transposed": base [T, B, V + 1], view base[..., :V].transpose(0, 1)."""
    b, t, v = z3.shape
    if how == "slice":
        shape, region = (b, t + 1, v + 3), lambda x: x[:, :-1, 1:v + 1]
    elif how == "packed":
        shape, region = (1, b * t + 2, v), lambda x: x[:, 1:-1]
        z3 = z3.reshape(1, b * t, v)
    elif how == "transposed":
        shape, region = (t, b, v + 1), lambda x: x[..., :v].transpose(0, 1)
    else:
        raise AssertionError(how)
    base = torch.full(shape, fill, dtype=z3.dtype, device=device)
    view = region(base)
    view.copy_(z3.to(device))
    return base, view, region


def acc_of(dtype):
    return F64 if dtype == F64 else torch.float32


# ---------------------------------------------------------------------------------------------
# Checks shared by the tests
# ---------------------------------------------------------------------------------------------

def _close_to_mass(a, b, mass, rtol, what):
    ok = (torch.isnan(a) & torch.isnan(b)) | ((a - b).abs() <= rtol * (b.abs() + mass) + 1e-30)
    assert bool(ok.all()), f"{what}: {a[~ok].tolist()} vs {b[~ok].tolist()}"


def check_shard_pass(dev, z, ids, *, labels=None, vocab_start=0, inv_t=INV_T, ent=False, topk=0,
                     z_dev=None):
    """The target's shard pass against the float64 reference and the CPU op. z: the values (CPU,
    any layout), z_dev: the same values as the target should see them (default: a copy)."""
    zd = dev.to(z) if z_dev is None else z_dev
    got = [t.cpu() for t in dev.run("shard_pass", zd, ids, labels, vocab_start, inv_t, ent, topk)]
    n, k = ids.shape
    acc = acc_of(z.dtype)
    L = 0 if labels is None else 1
    shapes = [(n,), (n, 5), (n, k + L), (n, topk), (n, topk)]
    dtypes = [acc, acc, acc, acc, torch.int64]
    for t, s, d in zip(got, shapes, dtypes):
        assert tuple(t.shape) == s and t.dtype == d, (t.shape, t.dtype, s, d)
    # the float64 contract; the sums relative to the kernel's own row_max (the reference's
    # exact max and the kernel's rounded one differ by half an ulp, which a sum relative to
    # either inherits wholesale at |z| ~ 1e4)
    r = ref.shard_pass_ref(z, ids, labels, vocab_start, inv_t, ent, topk)
    rr = ref.shard_pass_ref(z, ids, labels, vocab_start, inv_t, ent, topk,
                            row_max=got[0].double())
    exact = 1e-15 if acc == F64 else 6e-8
    torch.testing.assert_close(got[0].double(), r[0], rtol=exact, atol=0, equal_nan=True,
                               msg=lambda m: f"row_max: {m}")
    torch.testing.assert_close(got[2].double(), r[2], rtol=exact, atol=0, equal_nan=True,
                               msg=lambda m: f"gathered: {m}")
    rtol = 1e-12 if acc == F64 else 2e-5
    torch.testing.assert_close(got[1][:, :4].double(), rr[1][:, :4], rtol=rtol, atol=1e-30,
                               equal_nan=True, msg=lambda m: f"sums: {m}")
    # the entropy sum: to rtol of itself plus rtol of the row's mass (its terms, e_v (z_v/T - M),
    # are exactly 0 at the max only in exact arithmetic)
    mass = rr[1][:, :3].sum(-1).nan_to_num(0)
    _close_to_mass(got[1][:, 4].double(), rr[1][:, 4], mass, rtol, "entropy sum")
    torch.testing.assert_close(got[3].double(), r[3], rtol=0, atol=0, equal_nan=True,
                               msg=lambda m: f"topk_logits: {m}")
    torch.testing.assert_close(got[4], r[4], rtol=0, atol=0, msg=lambda m: f"topk_ids: {m}")
    cpu = cpu_op("shard_pass", z, ids, labels, vocab_start, inv_t, ent, topk)
    if cpu is not None:
        # the max, the gathered logits and the top-k are exact (same rounding); sums reordered
        for i, name in ((0, "row_max"), (2, "gathered"), (3, "topk_logits"), (4, "topk_ids")):
            torch.testing.assert_close(got[i], cpu[i], rtol=0, atol=0, equal_nan=True,
                                       msg=lambda m: f"{name} vs CPU: {m}")
        torch.testing.assert_close(got[1][:, :4], cpu[1][:, :4], rtol=rtol, atol=1e-30,
                                   equal_nan=True, msg=lambda m: f"sums vs CPU: {m}")
        _close_to_mass(got[1][:, 4].double(), cpu[1][:, 4].double(), mass, rtol,
                       "entropy sum vs CPU")
    return got


def epilogue_args(ids, lp, vocab, *, mask=None, labels=None, terms=(("fkl", "topk", 1.0),),
                  beta=0.5, rkl_ratio=0.1, skew=0.1, clamp=None, loss_scale=1.0, ent=False):
    t = [tuple(x) + (beta, rkl_ratio, skew)[len(x) - 3:] if len(x) < 6 else tuple(x)
         for x in terms]
    loss, support, weight = [x[0] for x in t], [x[1] for x in t], [float(x[2]) for x in t]
    b, r, s = [float(x[3]) for x in t], [float(x[4]) for x in t], [float(x[5]) for x in t]
    return (ids, lp, mask, labels, vocab, loss, support, weight, b, r, s, clamp, loss_scale, ent)


EPILOGUE_NAMES = ("loss", "student_mass", "teacher_mass", "label_logprobs", "entropy",
                  "row_coefs", "grad_logprobs")


def check_epilogue(dev, stats, args, *, decomposition=True):
    """The target's epilogue against the CPU op (same driver: ~exact) and the float64 reference
    (loss, masses, label log-probs, entropy, row_coefs [0, 3, 4, 5], and g / dense / outside
    through the full derivatives)."""
    row_max, sums, gathered = stats[:3]
    got = [t.cpu() for t in dev.run("epilogue", row_max, sums, gathered, *args)]
    n, k = args[0].shape
    acc = row_max.dtype
    for t, name, s, d in zip(got, EPILOGUE_NAMES, [(n,)] * 5 + [(n, 7), (n, k)],
                             [acc, torch.float32, torch.float32, acc, acc, F64, F64]):
        assert tuple(t.shape) == s and t.dtype == d, (name, t.shape, t.dtype)
    cpu = cpu_op("epilogue", row_max, sums, gathered, *args)
    if cpu is not None:
        for name, r, g in zip(EPILOGUE_NAMES, cpu, got):
            torch.testing.assert_close(g, r, rtol=1e-7, atol=1e-9, equal_nan=True,
                                       msg=lambda m: f"{name} vs CPU: {m}")
    e = ref.epilogue_ref(row_max, sums, gathered, *args)
    loose = dict(rtol=1e-6, atol=1e-8, equal_nan=True)
    torch.testing.assert_close(got[0].double(), e.loss, **loose, msg=lambda m: f"loss: {m}")
    torch.testing.assert_close(got[1].double(), e.student_mass, **loose)
    torch.testing.assert_close(got[2].double(), e.teacher_mass, **loose)
    torch.testing.assert_close(got[3].double(), e.label_logprobs, **loose,
                               msg=lambda m: f"label_logprobs: {m}")
    torch.testing.assert_close(got[4].double(), e.entropy, **loose, msg=lambda m: f"entropy: {m}")
    rc = got[5]
    torch.testing.assert_close(rc[:, 0], e.log_sum, rtol=1e-12, atol=1e-12, equal_nan=True)
    torch.testing.assert_close(rc[:, 3], e.H, **loose)
    torch.testing.assert_close(rc[:, 4], e.label_factor, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(rc[:, 5], e.entropy_factor, rtol=0, atol=0, equal_nan=True)
    if decomposition:
        ref.check_epilogue_decomposition(rc, got[6], e, rtol=1e-6, atol=1e-8)
    return got


def check_backward(dev, z, ids, labels, row_max, coefs, g, gl, gy, gh, vocab_start=0,
                   inv_t=INV_T, *, z_dev=None, inplace=False):
    """The target's backward (or backward_) against the float64 reference and the CPU op."""
    zd = dev.to(z) if z_dev is None else z_dev
    args = [dev.to(t) for t in (ids, labels, row_max, coefs, g, gl, gy, gh)]
    if inplace:
        dev.op("backward_")(zd, *args, vocab_start, inv_t)
        got = zd
    else:
        got = dev.op("backward")(zd, *args, vocab_start, inv_t)
        assert got.is_contiguous() and got.dtype == z.dtype and got.shape == z.shape
    r = ref.backward_ref(z, ids, labels, row_max, coefs, g, gl, gy, gh, vocab_start, inv_t)
    what = f"backward {z.dtype} inplace={inplace}"
    assert_close_rowwise(got.reshape(-1, z.shape[-1]), r.reshape(-1, z.shape[-1]), z.dtype, what)
    cpu = cpu_op("backward", z, ids, labels, row_max, coefs, g, gl, gy, gh, vocab_start, inv_t)
    if cpu is not None:
        a, b = got.reshape(-1, z.shape[-1]).cpu(), cpu.reshape(-1, z.shape[-1])
        assert_close_rowwise(a, b, z.dtype, what + " vs CPU")
    return got


def forward_stats(z, ids, lp, vocab, *, labels=None, vocab_start=0, inv_t=INV_T, ent=False,
                  mask=None, terms=(("jsd", "tail", 1.0),), clamp=-7.0):
    """Shard pass + epilogue on the emulated kernels (tested on their own above): realistic
    row_max / row_coefs / g for the backward tests."""
    E = torch.ops.topk_distill_emu
    row_max, sums, gathered, _, _ = E.shard_pass(z, ids, labels, vocab_start, inv_t, ent, 0)
    out = E.epilogue(row_max, sums, gathered,
                     *epilogue_args(ids, lp, vocab, mask=mask, labels=labels, terms=terms,
                                    clamp=clamp, ent=ent))
    return row_max, out[5], out[6]


def upstream(n, acc, *, seed=0, label=False, entropy=False):
    g = torch.Generator().manual_seed(seed)
    gl = torch.rand(n, generator=g, dtype=F64).to(acc)
    if n > 4:
        gl[3] = 0.0  # a zero-weight row
    gy = torch.randn(n, generator=g, dtype=F64).to(acc) if label else None
    gh = torch.randn(n, generator=g, dtype=F64).to(acc) if entropy else None
    return gl, gy, gh


# ---------------------------------------------------------------------------------------------
# Registration, and the emulated target really is the emulator
# ---------------------------------------------------------------------------------------------


def test_every_op_has_a_kernel_per_target():
    for name in ("shard_pass", "epilogue", "backward", "backward_"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"topk_distill_emu::{name}", "CPU"), name
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"topk_distill::{name}", "CPU"), name
        if _cuda_kernels_built():
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"topk_distill::{name}", "CUDA"), name


def test_emulated_ops_run_the_emulator():
    import topk_distill._C as C

    z, ids, lp, vocab = shard_inputs(12, 700, 9, seed=1)
    before = C._emu_stats()
    row_max, coefs, g = forward_stats(z, ids, lp, vocab)
    torch.ops.topk_distill_emu.backward(z, ids, None, row_max, coefs, g,
                                        torch.ones(12), None, None, 0, INV_T)
    stats = {k: v - before[k] for k, v in C._emu_stats().items()}
    # shard pass, epilogue, backward: three launches; every block synchronised its threads
    assert stats["launches"] == 3 and stats["barriers"] > 0 and stats["warp_collectives"] > 0, stats


# ---------------------------------------------------------------------------------------------
# shard_pass
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", LOW + [F64])
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("k", KS)
def test_shard_pass_with_vocab_start_and_odd_width(dev, dtype, id_dtype, k):
    z, ids, _, vocab = shard_inputs(12, 1001, k, dtype=dtype, id_dtype=id_dtype, vocab_start=357,
                                    extra=400, seed=k)
    labels = make_labels(12, vocab, 357, 1001, seed=k, dtype=id_dtype)
    check_shard_pass(dev, z, ids, vocab_start=357)
    check_shard_pass(dev, z, ids, labels=labels, vocab_start=357, ent=True, topk=5)


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("how", ["offset1", "stride"])
def test_shard_pass_unaligned_rows(dev, dtype, how):
    z, ids, _, _ = shard_inputs(12, 1003, 9, dtype=dtype, seed=3)
    check_shard_pass(dev, z, ids, ent=True, z_dev=unaligned(dev.to(z), how))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, F64])
@pytest.mark.parametrize("how", ["slice", "packed", "transposed"])
def test_shard_pass_3d_strided_logits(dev, dtype, how):
    """[B, T, V] views whose leading dims do not fold into one stride: no copy, same results."""
    b, t, v, k = 3, 5, 517, 9
    z, ids, _, vocab = shard_inputs(b * t, v, k, dtype=dtype, seed=17)
    labels = make_labels(b * t, vocab, 0, v, seed=17)
    _, view, _ = strided_view(z.reshape(b, t, v), how, dev.device)
    assert not view.is_contiguous() or (how == "packed" and view.storage_offset() > 0)
    check_shard_pass(dev, view.cpu(), ids, labels=labels, ent=True, topk=4, z_dev=view)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,v,k", [(1, 262144 + 5, 64), (3, 100003, 1100), (64, 262144, 32),
                                   (2, 600001, 7)])
def test_shard_pass_split_row_path(dev, dtype, n, v, k):
    z, ids, _, vocab = shard_inputs(n, v, k, dtype=dtype, seed=n + k)
    if k >= 2:
        ids[0, 1] = ids[0, 0]  # a duplicate in a split row
    labels = make_labels(n, vocab, 0, v, seed=n)
    check_shard_pass(dev, z, ids, labels=labels, ent=n <= 3, topk=3 if n <= 3 else 0)


@pytest.mark.parametrize("dtype", LOW + [F64])
def test_a_rows_results_do_not_depend_on_where_it_is_stored(dev, dtype):
    """Which thread sums which column depends on the column indices only: the same row at any
    16-byte misalignment, at any position of the batch, gives the same bits (shard pass, and so
    the epilogue and the backward), as the CPU kernel does."""
    n, v, k = 6, 1003, 9  # (v odd: consecutive rows of a contiguous tensor are misaligned)
    z, ids, lp, vocab = shard_inputs(n, v, k, dtype=dtype, seed=61)
    labels = make_labels(n, vocab, 0, v, seed=61)
    gl, gy, gh = upstream(n, acc_of(dtype), seed=61, label=True, entropy=True)

    def run_all(zd, idd, lab, gld, gyd, ghd):
        st = dev.op("shard_pass")(zd, idd, lab, 0, INV_T, True, 3)
        ep = dev.op("epilogue")(*st[:3], *[dev.to(a) if isinstance(a, torch.Tensor) else a
                                           for a in epilogue_args(ids, lp, vocab, labels=labels,
                                                                  ent=True)])
        bw = dev.op("backward")(zd, idd, lab, st[0], ep[5], ep[6], gld, gld if gyd is None else gyd,
                                ghd, 0, INV_T)
        return [t.cpu().nan_to_num(1.5) for t in (*st, *ep, bw)]

    dv = [dev.to(t) for t in (ids, labels, gl, gy, gh)]
    want = run_all(dev.to(z), *dv)
    for off in range(1, 9):  # every misalignment, with an odd row stride too
        buf = torch.full((n, v + off), float("nan"), dtype=dtype, device=dev.device)
        view = buf[:, off:]
        view.copy_(dev.to(z))
        got = run_all(view, *dv)
        for a, b in zip(got, want):
            assert torch.equal(a, b), off
    # a permutation of the rows permutes the results, bit for bit
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    got = run_all(dev.to(z[perm].contiguous()), *[dev.to(t[perm]) for t in (ids, labels, gl, gy, gh)])
    for a, b in zip(got[:3], want[:3]):  # (the shard pass' row outputs)
        assert torch.equal(a, b[perm])


@pytest.mark.parametrize("v", [1, 7, 8, 9, 33])
@pytest.mark.parametrize("k", [0, 1, 3])
def test_tiny_shapes(dev, v, k):
    """V_r below one pack, K = 0 (no teacher entry at all): every op, both references."""
    n = 5
    g = torch.Generator().manual_seed(v * 10 + k)
    z = torch.randn(n, v, generator=g).to(torch.bfloat16)
    ids = torch.randint(-1, v + 2, (n, k), generator=g)
    labels = torch.randint(-1, v, (n,), generator=g)
    st = check_shard_pass(dev, z, ids, labels=labels, ent=True, topk=2)
    lp = torch.log_softmax(torch.randn(n, k, generator=g), -1) if k else torch.zeros(n, 0)
    args = epilogue_args(ids, lp, v, labels=labels, terms=(("jsd", "tail", 1.0),), ent=True)
    ep = check_epilogue(dev, [t.to(dev.device) for t in st[:3]], args)
    gl, gy, gh = upstream(n, torch.float32, seed=v, label=True, entropy=True)
    for inplace in (False, True):
        check_backward(dev, z, ids, labels, st[0], ep[5], ep[6], gl, gy, gh, inplace=inplace)


def test_shard_pass_special_values(dev):
    z, ids, _, _ = shard_inputs(12, 517, 9, seed=5)
    z[1, 3] = float("nan")
    z[2] = -math.inf
    z[3, :10] = -math.inf
    z[4] *= 5e3
    z[5, ids[5, 0]] = float("nan")  # a NaN at a teacher column
    z[10, 7] = math.inf  # +inf: the max is +inf, the sums NaN (inf - inf), no NaN logit
    z[11, 7] = math.inf
    z[11, 9] = float("nan")  # +inf and NaN: NaN wins
    for ent in (False, True):
        got = check_shard_pass(dev, z, ids, ent=ent, topk=3)
        assert torch.isnan(got[0][[1, 5, 11]]).all() and torch.isnan(got[1][[1, 5, 11], 0]).all()
        assert torch.isnan(got[1][[1, 5, 11], 1]).all()  # (each has in-shard teacher entries)
        assert got[0][10] == math.inf
        assert got[0][2] == -math.inf and (got[1][2, [0, 4]] == 0).all()


def test_shard_pass_entropy_with_minus_inf_logits(dev):
    z, ids, _, _ = shard_inputs(10, 2003, 16, seed=8)
    z[:, ::3] = -math.inf
    z[1, 1:] = -math.inf  # a single finite logit: entropy sum 0
    got = check_shard_pass(dev, z, ids, ent=True)
    assert torch.isfinite(got[1][:, 4]).all() and got[1][1, 4] == 0


def test_shard_pass_no_teacher_id_in_this_shard(dev):
    z, ids, _, _ = shard_inputs(10, 800, 16, vocab_start=0, extra=4000, seed=6)
    ids = torch.where(ids >= 0, ids + 10_000, ids)  # every id belongs to another rank
    got = check_shard_pass(dev, z, ids)
    assert torch.all(got[1][:, 1:4] == 0)


def test_shard_pass_distinct_columns_count(dev):
    """sums[3]: the distinct in-shard teacher columns, each counted once (duplicates, padding,
    other shards and invalid ids excluded), summing over the shards to the coverage count."""
    n, v, k = 6, 300, 40
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(-3, 2 * v + 5, (n, k), generator=g)
    ids[0] = torch.arange(k)  # all distinct, in shard 0
    ids[1] = 5  # one column 40 times
    z = torch.randn(n, 2 * v)
    counts = 0
    for start in (0, v):
        got = check_shard_pass(dev, z[:, start:start + v].contiguous(), ids, vocab_start=start)
        counts = counts + got[1][:, 3]
    valid = torch.where((ids >= 0) & (ids < 2 * v), ids, -1)
    expect = torch.tensor([len(set(r.tolist()) - {-1}) for r in valid], dtype=counts.dtype)
    assert torch.equal(counts, expect)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, F64])
def test_shard_pass_topk(dev, dtype):
    """The shard's top-k raw logits vs torch.sort (stable): ties by the lower column, NaN first,
    k > V_r padded with (-inf, -1), global ids."""
    n, v = 8, 97
    z = (torch.randn(n, v, dtype=F64) * 2).to(dtype)
    z[0] = 1.0  # all tied
    z[1, ::2] = 3.0  # many ties at the top
    z[2, 5] = float("nan")
    z[2, 50] = float("nan")
    z[3, :] = -math.inf
    z[4, 10] = -0.0
    z[4, 11] = 0.0
    z[4, 12:] = -1.0
    ids = torch.randint(0, v, (n, 3))
    for topk in (1, 7, v, v + 5):
        got = check_shard_pass(dev, z, ids, vocab_start=1000, topk=topk)
        if topk > v:
            assert (got[4][:, v:] == -1).all() and (got[3][:, v:] == -math.inf).all()
    got = check_shard_pass(dev, z, ids, topk=4)
    assert got[4][0].tolist() == [0, 1, 2, 3]
    assert got[4][2, :2].tolist() == [5, 50]


def test_shard_pass_topk_split_path(dev):
    z, ids, _, _ = shard_inputs(2, 300007, 8, seed=4)
    z[0, 123456] = z[0].max() + 1
    z[1, 200000:200010] = z[1].max() + 1  # ties across a split boundary region
    got = check_shard_pass(dev, z, ids, topk=16)
    assert got[4][0, 0] == 123456 and got[4][1, :10].tolist() == list(range(200000, 200010))


def test_shard_pass_3d_topk_chunks_within_and_across_b(dev, monkeypatch):
    """Top-k chunks of a 3-D view: the host takes rows in chunks that stay plain views."""
    b, t, v = 4, 3, 50
    z = torch.randn(b, t, v)
    z[1, 2, :10] = 5.0  # ties
    _, view, _ = strided_view(z, "slice", dev.device)
    ids = torch.randint(0, v, (b * t, 2))
    for rows in (1, 2, 3, 5, 7, 100):  # chunks inside one b (1, 2), one b, whole b's, all
        monkeypatch.setenv("TOPK_DISTILL_TOPK_CHUNK_BYTES", str(rows * v * 8))
        check_shard_pass(dev, view.cpu(), ids, topk=6, z_dev=view)


def test_large_k_with_a_repeated_id(dev):
    """K = 4096 with one repeated id per row, its copies as far apart as can be: the sorted-ids
    resolution (O(K log K); the O(K^2) scan it replaced) is right in the shard pass and the
    backward. What it costs is measured, not asserted: python -m benchmarks.repeated_ids."""
    n, v, k = 8, 5000, 4096
    g = torch.Generator().manual_seed(0)
    z = torch.randn(n, v, generator=g)
    ids = torch.stack([torch.randperm(v, generator=g)[:k] for _ in range(n)])
    rep = ids.clone()
    rep[:, -1] = rep[:, 0]
    for i in (ids, rep):
        check_shard_pass(dev, z, i)
    row_max, coefs, gg = forward_stats(z, rep, torch.full((n, k), -9.0), v)
    check_backward(dev, z, rep, None, row_max, coefs, gg, torch.ones(n), None, None)


# ---------------------------------------------------------------------------------------------
# epilogue
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("support", SUPPORTS)
@pytest.mark.parametrize("k", [1, 7, 300])
def test_epilogue(dev, loss, support, k):
    z, ids, lp, vocab = shard_inputs(12, 700, k, seed=11 + k, invalid=True)
    labels = make_labels(12, vocab, 0, 700, seed=k)
    stats = torch.ops.topk_distill_emu.shard_pass(z, ids, labels, 0, 0.8, True, 0)
    mask = torch.ones(12, dtype=torch.bool)
    mask[5] = False
    for clamp in (None, -6.0):
        args = epilogue_args(ids, lp, vocab, mask=mask, labels=labels, terms=((loss, support, 1.0),),
                             beta=0.3, rkl_ratio=0.2, skew=0.1, clamp=clamp, loss_scale=1.7,
                             ent=True)
        check_epilogue(dev, stats, args)


@pytest.mark.parametrize("k", [5, 300])
def test_epilogue_loss_terms(dev, k):
    """A loss mixture (SPEC 9.3): one set of statistics, the weighted sum; a weight of 0 drops
    its term exactly; a one-term list of weight 1 is the plain loss bitwise."""
    z, ids, lp, vocab = shard_inputs(12, 900, k, seed=21)
    stats = torch.ops.topk_distill_emu.shard_pass(z, ids, None, 0, 1.0, False, 0)
    mix = (("fkl", "topk", 0.9), ("rkl", "renorm", 0.1), ("jsd", "tail", 0.5, 0.3, 0.1, 0.1),
           ("tvd", "topk", -0.25), ("srkl", "tail", 0.0))
    got = check_epilogue(dev, stats, epilogue_args(ids, lp, vocab, terms=mix, clamp=-8.0))
    parts = [check_epilogue(dev, stats, epilogue_args(ids, lp, vocab, terms=(t,), clamp=-8.0))
             for t in mix[:4]]
    torch.testing.assert_close(got[0], sum(p[0] for p in parts), rtol=1e-6, atol=1e-7,
                               equal_nan=True)
    plain = check_epilogue(dev, stats, epilogue_args(ids, lp, vocab, terms=(("fkl", "topk", 1.0),)))
    once = dev.run("epilogue", *stats[:3], *epilogue_args(ids, lp, vocab, terms=(("fkl", "topk", 1.0),)))
    for a, b in zip(plain, once):
        assert torch.equal(a.nan_to_num(1.5), b.cpu().nan_to_num(1.5))


@pytest.mark.parametrize("k", [256, 257, 1100])
@pytest.mark.parametrize("lp_dtype", [torch.float32, torch.bfloat16, F64])
def test_epilogue_warp_and_block_paths(dev, k, lp_dtype):
    z, ids, lp, vocab = shard_inputs(9, 2000, k, seed=k, id_dtype=torch.int32)
    labels = make_labels(9, vocab, 0, 2000, seed=k, dtype=torch.int32)
    stats = torch.ops.topk_distill_emu.shard_pass(z, ids, labels, 0, 1.0, True, 0)
    args = epilogue_args(ids, lp.to(lp_dtype), vocab, labels=labels,
                         terms=(("jsd", "renorm", 1.0, 0.4, 0.1, 0.1),), clamp=-9.0, ent=True)
    check_epilogue(dev, stats, args)


def test_epilogue_covered_vocab_has_no_tail(dev):
    """Ids covering the whole vocabulary (issue 18): the count in sums[3] says so, and the tail
    support's loss is the full-vocabulary divergence, finite."""
    n, v = 4, 50
    z = torch.randn(n, v, dtype=F64)
    ids = torch.arange(v).repeat(n, 1)
    lp = torch.log_softmax(torch.randn(n, v) * 2, -1)
    stats = torch.ops.topk_distill_emu.shard_pass(z.float(), ids, None, 0, 1.0, False, 0)
    assert (stats[1][:, 3] == v).all()
    got = check_epilogue(dev, stats, epilogue_args(ids, lp, v, terms=(("fkl", "tail", 1.0),)))
    assert torch.isfinite(got[0]).all()


def test_epilogue_is_deterministic(dev):
    z, ids, lp, vocab = shard_inputs(64, 500, 300, seed=2)
    stats = torch.ops.topk_distill_emu.shard_pass(z, ids, None, 0, 1.0, True, 0)
    args = epilogue_args(ids, lp, vocab, terms=(("fkl", "tail", 1.0),), ent=True)
    a = dev.run("epilogue", *stats[:3], *args)
    b = dev.run("epilogue", *stats[:3], *args)
    for x, y in zip(a, b):
        assert torch.equal(x.nan_to_num(1.5), y.nan_to_num(1.5))


# ---------------------------------------------------------------------------------------------
# backward
# ---------------------------------------------------------------------------------------------


def backward_case(n, v, k, dtype, *, id_dtype=torch.int64, vocab_start=0, extra=0, seed=0,
                  label=False, entropy=False, terms=(("jsd", "tail", 1.0),)):
    z, ids, lp, vocab = shard_inputs(n, v, k, dtype=dtype, id_dtype=id_dtype,
                                     vocab_start=vocab_start, extra=extra, seed=seed)
    labels = make_labels(n, vocab, vocab_start, v, seed=seed, dtype=id_dtype) if label else None
    row_max, coefs, g = forward_stats(z, ids, lp, vocab, labels=labels, vocab_start=vocab_start,
                                      ent=entropy, terms=terms)
    gl, gy, gh = upstream(n, row_max.dtype, seed=seed, label=label, entropy=entropy)
    return z, ids, labels, row_max, coefs, g, gl, gy, gh, vocab_start


@pytest.mark.parametrize("dtype", LOW + [F64])
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("k", KS)
def test_backward(dev, dtype, id_dtype, k):
    case = backward_case(12, 1001, k, dtype, id_dtype=id_dtype, vocab_start=211, extra=300,
                         seed=k, label=True, entropy=k % 2 == 1)
    check_backward(dev, *case)


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("k", [1, 64, 1100])
def test_backward_inplace(dev, dtype, k):
    case = backward_case(12, 1001, k, dtype, seed=k + 1, label=True, entropy=True)
    check_backward(dev, *case, inplace=True)


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("how", ["offset1", "stride"])
@pytest.mark.parametrize("inplace", [False, True])
def test_backward_unaligned_rows(dev, dtype, how, inplace):
    case = backward_case(12, 1003, 9, dtype, seed=4, label=True)
    check_backward(dev, *case, z_dev=unaligned(dev.to(case[0]), how), inplace=inplace)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, F64])
@pytest.mark.parametrize("how", ["slice", "packed", "transposed"])
@pytest.mark.parametrize("inplace", [False, True])
def test_backward_3d_strided_logits(dev, dtype, how, inplace):
    """[B, T, V] views: out of place a contiguous [B, T, V] result; in place, the gradient lands
    in the user's view through its strides and nowhere else (the NaN sentinels around it stay)."""
    b, t, v, k = 3, 5, 517, 9
    z, ids, labels, row_max, coefs, g, gl, gy, gh, vs = backward_case(
        b * t, v, k, dtype, seed=23, label=True, entropy=True)
    base, view, region = strided_view(z.reshape(b, t, v), how, dev.device)
    before = view.cpu().clone()
    got = check_backward(dev, before, ids, labels, row_max, coefs, g, gl, gy, gh, vs,
                         z_dev=view, inplace=inplace)
    outside = torch.ones(base.shape, dtype=torch.bool)
    region(outside).fill_(False)
    assert torch.isnan(base.cpu()[outside].float()).all()  # nothing written around the view
    if inplace:
        assert got.data_ptr() == view.data_ptr() and got.stride() == view.stride()
    else:
        assert torch.equal(view.cpu(), before)  # the logits are only read


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,v,k", [(1, 262144 + 5, 64), (3, 100003, 1100), (2, 600001, 7)])
@pytest.mark.parametrize("inplace", [False, True])
def test_backward_split_row_path(dev, dtype, n, v, k, inplace):
    case = backward_case(n, v, k, dtype, seed=n + k, label=True, entropy=inplace)
    check_backward(dev, *case, inplace=inplace)


@pytest.mark.parametrize("label,entropy", [(False, False), (True, False), (False, True), (True, True)])
def test_backward_upstream_gradients_zero_and_nan_rows(dev, label, entropy):
    """grad_label / grad_entropy, with and without the loss's: a row with no active part is
    exactly 0 (even with non-finite logits or NaN coefficients behind a zero gradient); an
    active part with a NaN coefficient, or a non-finite shift, makes the row NaN."""
    n, v, k = 14, 300, 5
    z, ids, labels, row_max, coefs, g, gl, gy, gh, vs = backward_case(
        n, v, k, torch.float32, seed=9, label=True, entropy=True)
    gy = gy if label else None
    gh = gh if entropy else None
    gl = gl.clone()
    coefs = coefs.clone()
    g = g.clone()
    z = z.clone()
    z[0, 7] = float("nan")  # non-finite shift after a fresh shard pass
    row_max = row_max.clone()
    row_max[0] = float("nan")
    coefs[1, 1] = float("nan")  # a non-finite loss: NaN when the loss part is active
    g[2].zero_()
    coefs[2, 1:3] = 0.0  # loss part inactive...
    gl[4] = 0.0
    z[4, 3] = float("inf")  # ...and a zero-weight row with a non-finite logit
    coefs[5, 4] = float("nan")  # label >= V: NaN label factor
    coefs[6, 3] = float("nan")  # a NaN entropy
    gl[7] = 0.0
    coefs[7, 1] = float("nan")  # NaN dense_coef behind a zero loss gradient: no effect
    if gy is not None:
        gy = gy.clone()
        gy[2] = 0.0
        gy[4] = 0.0
        gy[8] = 0.0
        coefs[8, 4] = float("nan")  # NaN factor behind a zero label gradient: no effect
    if gh is not None:
        gh = gh.clone()
        gh[2] = 0.0
        gh[4] = 0.0
        gh[9] = 0.0
        coefs[9, 3] = float("nan")
    got = check_backward(dev, z, ids, labels, row_max, coefs, g, gl, gy, gh, vs)
    got = got.cpu()
    assert torch.isnan(got[0]).all() and torch.isnan(got[1]).all()
    assert (got[2] == 0).all() and (got[4] == 0).all()
    assert torch.isnan(got[5]).all() == (label)
    assert torch.isnan(got[6]).all() == (entropy)
    assert torch.isfinite(got[7]).all() and torch.isfinite(got[8]).all()
    assert torch.isfinite(got[9]).all()


def test_backward_label_column_is_exact(dev):
    """The label's column (a teacher id or not, in this shard or not) is written once, in fp64:
    a label gradient alone gives (1/T)(gy - gy q_y) there and -(1/T) gy q_v elsewhere."""
    n, v, k = 6, 400, 4
    z, ids, lp, vocab = shard_inputs(n, v, k, seed=31)
    labels = torch.tensor([ids[0, 1].item(), 7, -1, v + 5, ids[4, 0].item(), 399])
    row_max, coefs, g = forward_stats(z, ids, lp, vocab, labels=labels)
    gl = torch.zeros(n)
    gy = torch.linspace(0.5, 2.0, n)
    got = check_backward(dev, z, ids, labels, row_max, coefs, g, gl, gy, None)
    assert (got[2] == 0).all()  # ignored label, no other part: exact zeros
    assert torch.isnan(got[3]).all()  # label >= V
    q = torch.softmax(z.double() * INV_T, -1)
    for r in (0, 1, 4, 5):
        expect = -INV_T * gy[r].double() * q[r]
        expect[labels[r]] += INV_T * gy[r].double()
        torch.testing.assert_close(got[r].double(), expect, rtol=2e-5, atol=1e-7)


def test_backward_inplace_refuses_overlapping_rows(dev):
    n, v, k = 4, 64, 3
    z, ids, labels, row_max, coefs, g, gl, gy, gh, vs = backward_case(n, v, k, torch.float32)
    zz = dev.to(z[:1]).expand(n, v)
    args = [dev.to(t) for t in (ids, labels, row_max, coefs, g, gl, gy, gh)]
    with pytest.raises(ValueError, match="overlap"):
        dev.op("backward_")(zz, *args, vs, INV_T)
    # out of place, the same view is fine (read only)
    out = dev.op("backward")(zz, *args, vs, INV_T)
    assert out.shape == (n, v) and out.is_contiguous()
    base = dev.to(torch.randn(2, 3, v))
    with pytest.raises(ValueError, match="overlap"):
        dev.op("backward_")(base[:, :1].expand(2, 2, v), *[a[:4] if a is not None else a
                                                          for a in args], vs, INV_T)


def test_backward_writes_every_element(dev):
    """The output comes from an uninitialised allocation - on a GPU poisoned by freeing NaN-filled
    memory first, under the emulator NaN-filled by the emulated allocator itself - so a column
    the kernel forgot shows up as NaN where the reference has none."""
    case = backward_case(16, 4099, 300, torch.bfloat16, seed=13, label=True, entropy=True)
    if not dev.emulated:
        junk = torch.full((16 * 4099 + 64,), float("nan"), dtype=torch.bfloat16, device="cuda")
        del junk
    got = check_backward(dev, *case)
    assert not torch.isnan(got[[0, 1, 2, 4, 5]].float()).any()


# ---------------------------------------------------------------------------------------------
# The three ops chained, against autograd of the float64 oracle
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("terms", [(("fkl", "tail", 1.0),), (("fkl", "topk", 0.9), ("rkl", "renorm", 0.1)),
                                   (("jsd", "topk", 1.0),), (("tvd", "tail", 0.5), ("srkl", "topk", 2.0))])
def test_gradient_matches_autograd_of_the_oracle(dev, dtype, terms):
    """shard_pass -> epilogue -> backward on the target equals d/dz of
    sum_n gl_n loss_n + gy_n label_logprobs_n + gh_n entropy_n, by autograd of the float64
    reference (topk_distill.reference), at T != 1 with a clamp and a mask."""
    n, v, k, T = 12, 701, 20, 1.25
    z, ids, lp, vocab = shard_inputs(n, v, k, dtype=dtype, seed=41)
    labels = make_labels(n, vocab, 0, v, seed=41)
    labels[3] = 5  # (>= V is a separate test: the oracle refuses it with check_inputs)
    mask = torch.ones(n, dtype=torch.bool)
    mask[6] = False
    gl, gy, gh = upstream(n, torch.float32, seed=41, label=True, entropy=True)
    inv_t = 1.0 / T
    stats = dev.run("shard_pass", z, ids, labels, 0, inv_t, True, 0)
    e = dev.run("epilogue", *stats[:3], *epilogue_args(ids, lp, vocab, mask=mask, labels=labels,
                                                       terms=terms, clamp=-10.0, ent=True))
    grad = dev.run("backward", z, ids, labels, stats[0], e[5], e[6], gl, gy, gh, 0, inv_t).cpu()

    zr = z.double().requires_grad_(True)
    out = td.reference.topk_distill_loss(
        zr, ids, lp.double(), loss=[td.Term(*t) for t in terms], temperature=T,
        log_prob_min_clamp=-10.0, mask=mask, labels=labels, return_entropy=True,
        reduction="none")
    total = (gl.double() * out.loss).sum() + (gy.double() * out.label_logprobs).sum() + \
        (gh.double() * out.entropy).sum()
    (expect,) = torch.autograd.grad(total, zr)
    torch.testing.assert_close(e[0].cpu().double(), out.loss.detach(), rtol=1e-4, atol=1e-5,
                               equal_nan=True)
    torch.testing.assert_close(e[3].cpu().double(), out.label_logprobs.detach(), rtol=1e-5,
                               atol=1e-5)
    torch.testing.assert_close(e[4].cpu().double(), out.entropy.detach(), rtol=1e-5, atol=1e-5)
    assert_close_rowwise(grad, expect, dtype, f"gradient {terms}")


# ---------------------------------------------------------------------------------------------
# Schedules, graphs, memory, the public API on the target
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_emulated_results_do_not_depend_on_the_schedule(seed, monkeypatch):
    """Different schedule seeds and OS-thread counts: bitwise identical results (nothing in the
    kernels may depend on warp or block order), the split path and repeats included."""
    E = torch.ops.topk_distill_emu
    z, ids, lp, vocab = shard_inputs(24, 3001, 300, seed=51)
    z2, ids2, _, _ = shard_inputs(2, 300007, 40, seed=52)
    ids2[:, 1] = ids2[:, 0]
    labels = make_labels(24, vocab, 0, 3001, seed=51)
    gl, gy, gh = upstream(24, torch.float32, seed=51, label=True, entropy=True)
    results = []
    for emu_seed, threads in ((0, 1), (seed, 2), (seed * 7 + 1, 3)):
        monkeypatch.setenv("TOPK_DISTILL_EMU_SEED", str(emu_seed))
        monkeypatch.setenv("TOPK_DISTILL_EMU_THREADS", str(threads))
        st = E.shard_pass(z, ids, labels, 0, 0.9, True, 3)
        ep = E.epilogue(*st[:3], *epilogue_args(ids, lp, vocab, labels=labels,
                                                terms=(("jsd", "tail", 1.0),), ent=True))
        bw = E.backward(z, ids, labels, st[0], ep[5], ep[6], gl, gy, gh, 0, 0.9)
        sp = E.shard_pass(z2, ids2, None, 0, 1.0, True, 2)
        results.append([*st, *ep, bw, *sp])
    for res in results[1:]:
        for a, b in zip(res, results[0]):
            assert torch.equal(a.nan_to_num(1.5), b.nan_to_num(1.5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, F64])
def test_large_logits_with_repeated_ids_match_the_cpu_op_tightly(dev, dtype):
    """|z| ~ 1e4 at T = 0.7 (z / T not exact), repeated ids in every other row: the teacher sums
    and gathered logits match the CPU op to a few ulp. nvcc contracts a product that is stored
    and also summed (x = z / T; exp(x - M)) into an FMA unless device code spells mul_rn: then
    the rows with a repeat (which read the stored x back) and the others differ from the CPU by
    |x| 2^-24 ~ 9e-4 relative here - which this tolerance catches on a GPU."""
    n, v, k, inv_t = 16, 4099, 24, 1.0 / 0.7
    g = torch.Generator().manual_seed(61)
    sign = torch.where(torch.arange(n) % 2 == 0, 1.0, -1.0).to(F64)[:, None]
    z = (sign * 1e4 + 3.0 * torch.randn(n, v, generator=g, dtype=F64)).to(dtype)
    ids = torch.randint(0, v, (n, k), generator=g)
    ids[:, :12] = z.double().topk(12, dim=-1).indices  # terms that weigh in the sums
    ids[::2, 13] = ids[::2, 0]
    ids[::2, 14] = ids[::2, 3]
    lp = torch.log_softmax(torch.randn(n, k, generator=g, dtype=F64), -1).float()
    labels = ids[:, 2].clone()
    want = cpu_op("shard_pass", z, ids, labels, 0, inv_t, True, 0)
    got = [t.cpu() for t in dev.run("shard_pass", z, ids, labels, 0, inv_t, True, 0)]
    assert torch.equal(got[0], want[0])  # M = fl(zmax * fl(1 / T)): the same rounding
    assert torch.equal(got[2], want[2])  # gathered x = fl(z * fl(1 / T))
    assert torch.equal(got[1][:, 3], want[1][:, 3])  # distinct columns
    rtol = 4e-6 if dtype != F64 else 1e-13
    for col, what in ((1, "teach"), (2, "dup"), (0, "rest"), (4, "entropy sum")):
        # (fp64's 4099-term sums: the emulated exp2 with its exact correction vs the CPU's exp)
        tol = rtol if dtype != F64 or col in (1, 2) else 5e-12
        torch.testing.assert_close(got[1][:, col], want[1][:, col], rtol=tol, atol=0, msg=what)
    # the backward's sparse columns recompute x from the logits: the same rounding again
    ep = torch.ops.topk_distill.epilogue(*want[:3], *epilogue_args(ids, lp, v, labels=labels,
                                                                   ent=True))
    gl, gy, gh = upstream(n, want[0].dtype, seed=61, label=True, entropy=True)
    args = (ids, labels, want[0], ep[5], ep[6], gl, gy, gh, 0, inv_t)
    grad_want = cpu_op("backward", z, *args)
    grad_got = dev.run("backward", z, *args).cpu()
    cols = ids[:, :15]
    torch.testing.assert_close(grad_got.gather(1, cols).double(), grad_want.gather(1, cols).double(),
                               rtol=rtol if dtype != torch.bfloat16 else 8e-3, atol=1e-30)


def test_backward_runs_on_the_backend_the_forward_ran_on():
    """The backend is part of the autograd graph: a forward under use_backend("emulated_cuda")
    backpropagates through the emulated kernel after the block has ended, and a native forward
    through the CPU kernel inside such a block (the loss and the fused LM head)."""
    z, ids, lp, vocab = shard_inputs(8, 500, 6, seed=71)
    za = z.clone().requires_grad_(True)
    with ops.use_backend("emulated_cuda"):
        out = td.topk_distill_loss(za, ids, lp, loss="jsd")
    with emulated_cuda_ran() as ran:
        out.loss.backward()
    assert ran()["launches"] == 1
    zb = z.clone().requires_grad_(True)
    out = td.topk_distill_loss(zb, ids, lp, loss="jsd")
    with ops.use_backend("emulated_cuda"), emulated_cuda_ran() as ran:
        out.loss.backward()
    assert ran()["launches"] == 0
    assert_close_rowwise(za.grad, zb.grad, torch.float32, "grad")

    g = torch.Generator().manual_seed(72)
    hidden = torch.randn(8, 16, generator=g).requires_grad_(True)
    weight = (0.3 * torch.randn(500, 16, generator=g)).requires_grad_(True)
    labels = ids[:, 0].clone()
    with ops.use_backend("emulated_cuda"):
        out = td.fused_linear_topk_distill_loss(hidden, weight, ids, lp, labels=labels,
                                                chunk_size=4)
    with emulated_cuda_ran() as ran:  # label_logprobs' gradient: one backward kernel per chunk
        (out.loss + out.label_logprobs.sum()).backward()
    assert ran()["launches"] == 2


@pytest.mark.parametrize("pytest_mark", [pytest.param(0, marks=gpu_only("CUDA graphs"))])
def test_cuda_graph_capture_of_the_fused_lm_head(pytest_mark):
    """The fused LM head with check_inputs=False and a fixed chunk_size makes no host sync (no
    mem_get_info, no validation): it captures into a CUDA graph, and replays match eager."""
    g = torch.Generator().manual_seed(43)
    n, h, v, k = 64, 128, 4001, 16
    hidden = (torch.randn(n, h, generator=g) * 0.5).to(torch.bfloat16).cuda().requires_grad_(True)
    weight = (torch.randn(v, h, generator=g) * 0.1).to(torch.bfloat16).cuda().requires_grad_(True)
    _, ids, lp, _ = shard_inputs(n, v, k, seed=43)
    ids, lp = ids.cuda(), lp.cuda()

    def step():
        hidden.grad = weight.grad = None
        out = td.fused_linear_topk_distill_loss(hidden, weight, ids, lp, loss="jsd",
                                                support="topk", chunk_size=16,
                                                check_inputs=False)
        out.loss.backward()
        return out.loss

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):  # warm-up outside the graph
            eager_loss = step().detach().clone()
    torch.cuda.current_stream().wait_stream(s)
    eager_gh, eager_gw = hidden.grad.clone(), weight.grad.clone()

    graph = torch.cuda.CUDAGraph()
    hidden.grad = weight.grad = None
    with torch.cuda.graph(graph):
        loss = step()
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(loss, eager_loss, rtol=0, atol=0)
    torch.testing.assert_close(hidden.grad, eager_gh, rtol=0, atol=0)
    torch.testing.assert_close(weight.grad, eager_gw, rtol=0, atol=0)
    with torch.no_grad():
        hidden.mul_(0.5)
    graph.replay()
    torch.cuda.synchronize()
    expect = td.fused_linear_topk_distill_loss(hidden.detach().float().cpu(),
                                               weight.detach().float().cpu(), ids.cpu(),
                                               lp.cpu(), loss="jsd", support="topk").loss
    rtol, atol = tolerances(torch.bfloat16)
    torch.testing.assert_close(loss.double().cpu(), expect.double(), rtol=rtol, atol=atol)


def test_results_are_bitwise_reproducible(dev):
    case = backward_case(8, 50000, 128, torch.float32, seed=51, label=True, entropy=True)
    z, ids, labels = (dev.to(t) for t in case[:3])
    rest = [dev.to(t) for t in case[3:9]]
    a = dev.op("shard_pass")(z, ids, labels, 0, 0.8, True, 4)
    b = dev.op("shard_pass")(z, ids, labels, 0, 0.8, True, 4)
    for x, y in zip(a, b):
        assert torch.equal(x.nan_to_num(1.5), y.nan_to_num(1.5))
    bw = dev.op("backward")
    assert torch.equal(bw(z, ids, labels, *rest, 0, 0.8).nan_to_num(1.5),
                       bw(z, ids, labels, *rest, 0, 0.8).nan_to_num(1.5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("loss", ["fkl", "rkl", "jsd", "tvd"])
def test_loss_and_grad_through_the_public_api(dev, dtype, loss):
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
    with torch.no_grad():
        static_z.mul_(0.5)
    graph.replay()
    torch.cuda.synchronize()
    expect = td.topk_distill_loss(static_z.detach().float().cpu(), ids, lp, loss="jsd",
                                  support="topk").loss
    rtol, atol = tolerances(torch.bfloat16)
    torch.testing.assert_close(out.loss.double().cpu(), expect.double(), rtol=rtol, atol=atol)


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
def test_shard_pass_allocates_nothing_of_size_n_by_v(pytest_mark):
    """Split path, a 3-D strided view, labels, entropy: O(N K + N splits) workspace only (the
    top-k's chunks are bounded separately: ~128 MiB of keys)."""
    b, t, v = 2, 2, 1 << 20
    base = torch.randn(b, t + 1, v, device="cuda", dtype=torch.float32)
    z = base[:, :-1]
    ids = torch.randint(0, v, (b * t, 32), device="cuda")
    labels = torch.randint(0, v, (b * t,), device="cuda")
    torch.ops.topk_distill.shard_pass(z, ids, labels, 0, 1.0, True, 0)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    mem0 = torch.cuda.memory_allocated()
    torch.ops.topk_distill.shard_pass(z, ids, labels, 0, 1.0, True, 0)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - mem0 < z.numel() * z.element_size() // 16


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
