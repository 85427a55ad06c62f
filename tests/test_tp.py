"""Tensor parallelism (SPEC section 5) with real processes: gloo on CPU (NCCL with >= 2 GPUs).

ONE launch of 4 processes (spawning is slow) holds TP groups of size 2 (ranks 0-1 and 2-3, side
by side), 3 (ranks 1-3) and 4 (the world) and runs many configurations in each; the tests below
assert on its results:

* every loss x support x clamp (+ temperature, t2_scale, mask, reductions, fp64 and bf16) on even
  and uneven vocab splits of V = 37 - including 1-column shards, explicit ``vocab_start`` in a
  permuted rank order, the group given by name, a sub-group - with teacher ids at every shard's
  local index 0 and last column: loss, student/teacher masses and each rank's shard gradient
  equal the unsharded kernel call and the float64 reference;
* the collectives, counted by a ``TorchDispatchMode`` in forward and backward;
* ``torch.compile(fullgraph=True)`` of a TP call (the graph's collectives counted too), with
  aot_autograd, inductor and a dynamic N;
* ranks that disagree on N or K raise ``ValueError`` on every rank, within a deadline;
* integrations: Megatron-Core (the real package when installed, and a stand-in with its
  documented API) and DTensor on 1-D and 2-D device meshes.
"""
from __future__ import annotations

import itertools
import os
import sys
import types

import pytest
import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))

import topk_distill as td  # noqa: E402
from topk_distill import ops, parallel, reference  # noqa: E402

from _dist_utils import run_distributed  # noqa: E402
from _inputs import (LOSSES, SUPPORTS, assert_close, assert_close_rowwise,  # noqa: E402
                     emulated_cuda_ran, tdev, teacher_batch)

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")

ref = reference.topk_distill_loss
F32, F64, BF16 = torch.float32, torch.float64, torch.bfloat16
V, N, K = 37, 10, 8
MASK = torch.tensor([True, True, False, True, True, True, True, False, True, True])
ROW_WEIGHTS = torch.linspace(0.5, 1.5, N, dtype=F64)  # upstream grad of reduction="none"

# Every loss x support x clamp, then the other knobs.
CONFIGS = [dict(loss=l, support=s, log_prob_min_clamp=c)
           for l, s, c in itertools.product(LOSSES, SUPPORTS, [None, -3.0])]
CONFIGS += [
    dict(loss="jsd", support="tail", beta=0.3, temperature=1.7, t2_scale=True, reduction="sum",
         mask=True),
    dict(loss="fkl+rkl", support="topk", rkl_ratio=0.3, temperature=0.6, log_prob_min_clamp=-2.0,
         reduction="mean", mask=True),
    dict(loss="skl", support="renorm", skew=0.25, reduction="mean"),
    dict(loss="tvd", support="tail", temperature=2.5, mask=True),
]
HALF_CONFIGS = [0, 13, 26, 41, 42, 43]  # indices of CONFIGS also run with bf16 logits

# Splits of V = 37 per TP group size: shard widths (group-local rank order), explicit
# vocab_start per rank (absent: the default, sum of the lower ranks' widths), and whether the group
# is passed by name.
SPLITS = {
    2: [dict(widths=(20, 17)),
        dict(widths=(1, 36), group="name"),
        dict(widths=(36, 1), starts=(1, 0))],             # rank 0 holds [1, 37), rank 1 [0, 1)
    3: [dict(widths=(20, 10, 7)),
        dict(widths=(13, 12, 12), group="name"),
        dict(widths=(7, 20, 10), starts=(30, 0, 20)),     # permuted rank order
        dict(widths=(20, 10, 7), starts=(0, 20, 30))],    # explicit, equal to the default
    4: [dict(widths=(10, 10, 10, 7)),
        dict(widths=(1, 1, 1, 34), starts=(36, 0, 1, 2), group="name"),
        dict(widths=(13, 8, 8, 8))],
}
WORLD = 4


def tp_groups(world):
    """Global ranks of the TP groups of each size (size == world: the default group)."""
    out = {}
    for size in SPLITS:
        if size == world:
            out[size] = [tuple(range(world))]
        elif size == 2 and size < world:
            out[size] = [tuple(range(i, i + 2)) for i in range(0, world - 1, 2)]
        elif size < world:
            out[size] = [tuple(range(world - size, world))]
    return out


def _make_groups(rank, world):
    """{size: (process group, member ranks)} for this rank's groups. Every rank calls new_group
    for every group, in the same order."""
    mine = {}
    for size, members_list in tp_groups(world).items():
        for members in members_list:
            pg = dist.group.WORLD if size == world else dist.new_group(list(members))
            if rank in members:
                mine[size] = (pg, members)
    return mine


def _starts(split):
    w = split["widths"]
    return split.get("starts") or tuple(sum(w[:r]) for r in range(len(w)))


def _cases(size):
    """(size, split, config index, logits dtype name): on the first (uneven) split every config in
    fp32; on each other split all losses at one (support, clamp) pair plus the extra configs
    (together they cover every support and clamp again); fp64 (size 3) and bf16 (size 4) on the
    first split. Kept short: the parent recomputes every expectation."""
    out = [(size, 0, ci, "float32") for ci in range(len(CONFIGS))]
    for si in range(1, len(SPLITS[size])):
        out += [(size, si, ci, "float32") for ci in range(len(CONFIGS))
                if ci >= 42 or ci % 6 == (2 * si + size) % 6]
    if size == 3:
        out += [(size, 0, ci, "float64") for ci, cfg in enumerate(CONFIGS)
                if cfg.get("log_prob_min_clamp") is None]
    if size == 4:
        out += [(size, 0, ci, "bfloat16") for ci in HALF_CONFIGS]
    return out


def make_batch(widths, starts, seed, v=V):
    """teacher_batch's special rows (0: ids 0 and V-1, 1: padding, 2: duplicate, 3: all padding,
    4: a -inf log-prob, 5: teacher covers ~all mass), then rows 6-9 hold teacher ids at every
    shard's first and last column (at random positions k), valid log-probs of one teacher."""
    z, ids, lp = teacher_batch(N, v, K, seed=seed, logits_dtype=F64)
    firsts = sorted(set(starts))
    lasts = sorted({s + w - 1 for s, w in zip(starts, widths)})
    edges = sorted(set(firsts) | set(lasts))
    g = torch.Generator().manual_seed(1000 + seed)
    t_logp = torch.log_softmax(torch.randn(N, v, generator=g, dtype=F64) * 2.0, -1)
    for row, chosen in ((6, edges), (7, firsts), (8, lasts), (9, edges[len(edges) // 2:])):
        chosen = list(chosen)[:K]
        fill = [c for c in torch.randperm(v, generator=g).tolist() if c not in chosen]
        row_ids = torch.tensor(chosen + fill[:K - len(chosen)])[torch.randperm(K, generator=g)]
        ids[row] = row_ids
        lp[row] = t_logp[row, row_ids]
    ids[9, 0], lp[9, 0] = -1, 0.0  # and one padding entry
    return z, ids, lp


def _call(fn, x, ids, lp, cfg, **kw):
    """(loss, student_mass, teacher_mass, grad w.r.t. x) of one call; reduction="none" losses
    are weighted by ROW_WEIGHTS so that the per-row upstream gradient is exercised."""
    cfg = dict(cfg)
    mask = MASK.to(x.device) if cfg.pop("mask", False) else None
    reduction = cfg.pop("reduction", "none")
    x = x.detach().clone().requires_grad_(True)
    out = fn(x, ids, lp, mask=mask, reduction=reduction, **cfg, **kw)
    total = out.loss
    if reduction == "none":
        total = (out.loss * ROW_WEIGHTS.to(device=x.device, dtype=out.loss.dtype)).sum()
    (grad,) = torch.autograd.grad(total, x)
    return tuple(t.detach().cpu() for t in (out.loss, out.student_mass, out.teacher_mass, grad))


def _batch(size, si):
    split = SPLITS[size][si]
    return make_batch(split["widths"], _starts(split), seed=10 * size + si)


def _values(groups, device="cpu"):
    """This rank's TP results for every case of its groups: {case: (loss, masses, grad)}."""
    results = {}
    for size, (group, _members) in sorted(groups.items()):
        grank = dist.get_rank(group)
        for i, case in enumerate(_cases(size)):
            _, si, ci, dtype_name = case
            split = SPLITS[size][si]
            widths, starts = split["widths"], _starts(split)
            z, ids, lp = _batch(size, si)
            lo = starts[grank]
            x = z[:, lo:lo + widths[grank]].to(device=tdev(device), dtype=getattr(torch, dtype_name))
            results[case] = _call(
                td.topk_distill_loss, x, ids.to(tdev(device)), lp.to(tdev(device)), CONFIGS[ci],
                tp_group=group.group_name if split.get("group") == "name" else group,
                vocab_start=lo if "starts" in split else None,
                check_inputs=(i % 2 == 0))  # both the checked and the cached-layout path
    return results


# ----------------------------------------------------------------------------- collectives

COLLECTIVE_NAMESPACES = ("_c10d_functional", "c10d", "_c10d_functional_autograd")


def _counter():
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    class CollectiveCounter(TorchDispatchMode):
        """Every collective dispatched while active: (op, reduce op, bytes this rank sends);
        ``ops`` lists every op seen (to prove the mode saw the computation at all)."""

        def __init__(self):
            super().__init__()
            self.calls, self.ops = [], []

        def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
            kwargs = kwargs or {}
            ns, _, name = func._schema.name.partition("::")
            self.ops.append(func._schema.name)
            if ns in COLLECTIVE_NAMESPACES and name not in ("wait_tensor", "wait", "barrier_"):
                sent = [t for a, spec in zip(args, func._schema.arguments)
                        if not spec.name.startswith("output") for t in tree_flatten(a)[0]
                        if isinstance(t, torch.Tensor)]
                reduce_op = next((a for a in args if isinstance(a, str)
                                  and a in ("sum", "max", "min", "avg")), None)
                self.calls.append((name, reduce_op,
                                   sum(t.numel() * t.element_size() for t in sent)))
            return func(*args, **kwargs)

    return CollectiveCounter()


def _count_collectives(group):
    """Collectives of a TP-2 call in forward and backward, cold and cached layout."""
    z, ids, lp = make_batch((20, 17), (0, 20), seed=7)
    grank = dist.get_rank(group)
    x = z[:, [0, 20][grank]:[20, 37][grank]].float().requires_grad_()
    counts = {}
    parallel.clear_layout_cache()
    for label, check in (("fwd_cold_nocheck", False), ("fwd_nocheck", False),
                         ("fwd_check", True)):
        fwd, bwd = _counter(), _counter()
        with fwd:
            out = td.topk_distill_loss(x, ids, lp, loss="jsd", support="tail", tp_group=group,
                                       check_inputs=check)
        with bwd:
            out.loss.backward()
        counts[label] = fwd.calls
        counts[label.replace("fwd", "bwd")] = bwd.calls
        counts[label + "_saw_kernels"] = ("topk_distill::shard_pass" in fwd.ops
                                          and "topk_distill::backward" in bwd.ops)
    sanity = _counter()  # the counter does see plain c10d collectives too
    with sanity:
        dist.all_reduce(torch.ones(3), group=group)
    counts["sanity"] = sanity.calls
    return counts


# ----------------------------------------------------------------------------- torch.compile

def _compile_check(group):
    """torch.compile(fullgraph=True) of a TP call: the collectives in the compiled forward /
    backward graphs (aot_autograd with counting compilers), then inductor against eager."""
    from functorch.compile import make_boxed_func, min_cut_rematerialization_partition
    from torch._dynamo.backends.common import aot_autograd

    z, ids, lp = make_batch((20, 17), (0, 20), seed=8)
    grank = dist.get_rank(group)
    x = z[:, [0, 20][grank]:[20, 37][grank]].float()
    name = group.group_name
    out = {}

    def step_for(check):
        def step(x, ids, lp):
            return td.topk_distill_loss(x, ids, lp, loss="jsd", support="tail", tp_group=name,
                                        check_inputs=check).loss
        return step

    eager_x = x.clone().requires_grad_()
    eager = step_for(True)(eager_x, ids, lp)
    (eager_g,) = torch.autograd.grad(eager, eager_x)
    for check in (True, False):
        graphs = {"fw": [], "bw": []}

        def compiler(kind):
            def fn(gm, example_inputs):
                graphs[kind].append([str(n.target) for n in gm.graph.nodes
                                     if n.op == "call_function"
                                     and "c10d" in str(n.target) and "wait" not in str(n.target)])
                return make_boxed_func(gm.forward)
            return fn

        torch._dynamo.reset()
        parallel.clear_layout_cache()  # the layout is learned while tracing
        # inductor's partitioner (min-cut), so these are the graphs inductor compiles. (aot's
        # default partitioner of torch 2.9 copies the forward's sum all_reduce, dead, into the
        # backward graph; inductor's never did.)
        backend = aot_autograd(fw_compiler=compiler("fw"), bw_compiler=compiler("bw"),
                               partition_fn=min_cut_rematerialization_partition)
        cx = x.clone().requires_grad_()
        loss = torch.compile(step_for(check), fullgraph=True, backend=backend)(cx, ids, lp)
        (g,) = torch.autograd.grad(loss, cx)
        out[f"graphs_check={check}"] = graphs
        out[f"aot_check={check}"] = (loss.detach(), g)
    torch._dynamo.reset()
    cx = x.clone().requires_grad_()
    loss = torch.compile(step_for(False), fullgraph=True, backend="inductor")(cx, ids, lp)
    (g,) = torch.autograd.grad(loss, cx)
    out["inductor"] = (loss.detach(), g)
    out["eager"] = (eager.detach(), eager_g)
    # Another N: automatic dynamic shapes retrace with a symbolic N (the layout stays cached).
    torch._dynamo.reset()
    compiled = torch.compile(step_for(True), fullgraph=True, backend="aot_eager")
    out["dynamic"] = []
    for n in (N, 7, 5):
        cx = x[:n].clone().requires_grad_()
        loss = compiled(cx, ids[:n], lp[:n])
        (g,) = torch.autograd.grad(loss, cx)
        ex = x[:n].clone().requires_grad_()
        e = step_for(True)(ex, ids[:n], lp[:n])
        (eg,) = torch.autograd.grad(e, ex)
        out["dynamic"].append((loss.detach(), g, e.detach(), eg))
    return out


# ----------------------------------------------------------------------------- integrations

def _megatron_real(rank, world):
    """The real megatron-core: initialize_model_parallel on gloo, then the wrapper."""
    try:
        from megatron.core import parallel_state
    except Exception as err:  # not installed (or broken): reported as a skip
        return f"unavailable: {type(err).__name__}: {err}"
    from topk_distill.integrations.megatron import megatron_topk_distill_loss

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)  # TP 2 x DP 2
    try:
        # Megatron's shards are equal (V = 40); each data-parallel pair on its own data.
        z, ids, lp = make_batch((20, 20), (0, 20), seed=9 + rank // 2, v=40)
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        x = z[:, tp_rank * 20:(tp_rank + 1) * 20].float()
        res = _call(megatron_topk_distill_loss, x, ids, lp, dict(loss="jsd", support="tail"))
        return dict(tp_rank=tp_rank, result=res,
                    tp_size=parallel_state.get_tensor_model_parallel_world_size())
    finally:
        parallel_state.destroy_model_parallel()


def _install_fake_megatron(group):
    """A stand-in for megatron.core with the documented API the integration uses."""

    class VocabUtility:
        @staticmethod
        def vocab_range_from_per_partition_vocab_size(per_partition_vocab_size, rank, world_size):
            first = rank * per_partition_vocab_size
            return first, first + per_partition_vocab_size

    ps = types.ModuleType("megatron.core.parallel_state")
    ps.get_tensor_model_parallel_group = lambda check_initialized=True: group
    ps.get_tensor_model_parallel_world_size = lambda: dist.get_world_size(group)
    ps.get_tensor_model_parallel_rank = lambda: dist.get_rank(group)
    utils = types.ModuleType("megatron.core.tensor_parallel.utils")
    utils.VocabUtility = VocabUtility
    tp = types.ModuleType("megatron.core.tensor_parallel")
    tp.utils = utils
    core = types.ModuleType("megatron.core")
    core.parallel_state, core.tensor_parallel = ps, tp
    pkg = types.ModuleType("megatron")
    pkg.core = core
    sys.modules.update({"megatron": pkg, "megatron.core": core,
                        "megatron.core.parallel_state": ps, "megatron.core.tensor_parallel": tp,
                        "megatron.core.tensor_parallel.utils": utils})


def _megatron_fake(rank, world, pair):
    """Two TP groups of 2 (Megatron puts TP ranks next to each other), each on its own data;
    then TP size 1 (no group, no collective)."""
    from topk_distill.integrations.megatron import (MegatronTopKDistillLoss,
                                                    megatron_topk_distill_loss)

    singles = [dist.new_group([r]) for r in range(world)]
    dp = rank // 2
    for name in [m for m in sys.modules if m == "megatron" or m.startswith("megatron.")]:
        del sys.modules[name]  # the real package, if _megatron_real imported it
    _install_fake_megatron(pair)
    z, ids, lp = make_batch((20, 20), (0, 20), seed=20 + dp, v=40)
    tp_rank = rank % 2
    x = z[:, tp_rank * 20:(tp_rank + 1) * 20].float()
    out = {"tp2": _call(megatron_topk_distill_loss, x, ids, lp, dict(loss="rkl", support="renorm",
                                                                     log_prob_min_clamp=-3.0)),
           "tp2_module": _call(lambda x, i, l, mask=None, **kw:
                               MegatronTopKDistillLoss(loss="tvd", **kw)(x, i, l, mask=mask),
                               x, ids, lp, dict(reduction="mean"))}
    _install_fake_megatron(singles[rank])
    counter = _counter()
    with counter:
        out["tp1"] = _call(megatron_topk_distill_loss, z.float(), ids, lp, dict(loss="fkl"))
    out["tp1_collectives"] = counter.calls
    for name in [m for m in sys.modules if m == "megatron" or m.startswith("megatron.")]:
        del sys.modules[name]
    return out


def _dtensor_check(rank, world):
    """DTensor logits Shard(-1): a 1-D mesh of 4 (V = 37 -> 10/10/10/7) and a (dp=2, tp=2) mesh
    with rows Shard(0) and vocab Shard(-1), teacher tensors as DTensors (Shard(0), Replicate())."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from topk_distill.integrations.dtensor import dtensor_topk_distill_loss

    out = {}
    z, ids, lp = make_batch((10, 10, 10, 7), (0, 10, 20, 30), seed=30)
    mesh = init_device_mesh("cpu", (world,))
    zd = distribute_tensor(z.float(), mesh, [Shard(-1)]).requires_grad_()
    # The gradient the loss gives back, as it reaches the leaf. (What autograd then stores in
    # zd.grad is torch's: up to 2.11 its accumulation makes this uneven Shard(-1) a Replicate;
    # 2.14 keeps Shard(-1). The values are the same.)
    returned = []
    zd.register_hook(lambda g: returned.append(g.placements) or g)
    res = dtensor_topk_distill_loss(zd, ids, lp, loss="jsd", support="topk", reduction="sum")
    res.loss.backward()
    (placements,) = returned
    grad_is_vocab_sharded = (len(placements) == 1 and isinstance(placements[0], Shard)
                             and placements[0].dim % 2 == 1)
    out["1d"] = (res.loss.detach(), res.student_mass, res.teacher_mass,
                 zd.grad.full_tensor(), grad_is_vocab_sharded, zd.to_local().shape[-1])

    mesh2 = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    z2, ids2, lp2 = make_batch((19, 18), (0, 19), seed=31)
    z2b, ids2b, lp2b = (torch.cat([t, t.flip(0)]) for t in (z2, ids2, lp2))  # 2N rows
    zd2 = distribute_tensor(z2b.float(), mesh2, [Shard(0), Shard(1)]).requires_grad_()
    ids_d = distribute_tensor(ids2b, mesh2, [Shard(0), Replicate()])
    lp_d = distribute_tensor(lp2b, mesh2, [Shard(0), Replicate()])
    res2 = dtensor_topk_distill_loss(zd2, ids_d, lp_d, mesh_dim="tp", loss="srkl",
                                     support="tail", reduction="none")
    res2.loss.sum().backward()
    out["2d"] = (res2.loss.detach(), res2.student_mass, zd2.grad.full_tensor(),
                 mesh2.get_coordinate())
    errors = []
    for bad in (lambda: dtensor_topk_distill_loss(distribute_tensor(z.float(), mesh, [Replicate()]),
                                                  ids, lp),
                lambda: dtensor_topk_distill_loss(z.float(), ids, lp),
                lambda: dtensor_topk_distill_loss(zd2.detach(), ids_d, lp_d, mesh_dim="dp")):
        try:
            bad()
            errors.append(None)
        except (TypeError, ValueError) as err:
            errors.append(f"{type(err).__name__}: {err}")
    out["errors"] = errors
    return out


# ----------------------------------------------------------------------------- faults

def _disagreement_check(group):
    """Ranks that disagree on N or K: ValueError on every rank (nobody hangs), for the function,
    the module and the reference; afterwards the group still works."""
    z, ids, lp = make_batch((20, 10, 7), (0, 20, 30), seed=40)
    grank = dist.get_rank(group)
    lo, hi = [(0, 20), (20, 30), (30, 37)][grank]
    x = z[:, lo:hi].float()
    last = grank == 2
    n = N - 1 if last else N
    k = K - 2 if last else K
    crit = td.TopKDistillLoss(loss="jsd", tp_group=group)
    attempts = {
        "N": lambda: td.topk_distill_loss(x[:n], ids[:n], lp[:n], tp_group=group),
        "K": lambda: td.topk_distill_loss(x, ids[:, :k], lp[:, :k],
                                          tp_group=group.group_name),
        "N-module": lambda: crit(x[:n], ids[:n], lp[:n]),
        "K-reference": lambda: ref(x, ids[:, :k], lp[:, :k], tp_group=group),
        "after": lambda: td.topk_distill_loss(x, ids, lp, tp_group=group),
    }
    out = {}
    for key, fn in attempts.items():
        try:
            out[key] = f"ok:{float(fn().loss):.6f}"
        except ValueError as err:
            out[key] = f"ValueError:{err}"
    return out


# ----------------------------------------------------------------------------- the launch

def _worker(rank, world, device="cpu"):
    groups = _make_groups(rank, world)
    if device == "cuda_emu":  # every rank runs the CUDA kernels under the CUDA emulator
        ops.set_backend("emulated_cuda")
        with emulated_cuda_ran() as ran:
            out = {"values": _values(groups, device)}
        out["emulator"] = ran()
        return out
    out = {"values": _values(groups, device)}
    if device != "cpu" or world != WORLD:
        return out
    pair_group, pair = groups[2]
    out["counts"] = _count_collectives(pair_group)
    if pair == (0, 1):  # the other pair idles meanwhile (compiling is the slow part)
        out["compile"] = _compile_check(pair_group)
    out["megatron_real"] = _megatron_real(rank, world)
    out["megatron_fake"] = _megatron_fake(rank, world, pair_group)
    out["dtensor"] = _dtensor_check(rank, world)
    if 3 in groups:
        out["disagree"] = _disagreement_check(groups[3][0])
    return out


_LAUNCHES = {}


def launch(device="cpu"):
    """The one launch per device ("cpu": the CPU kernels; "cuda_emu": the CUDA kernels under the
    emulator), shared by the tests (if it failed, each of them re-raises its error)."""
    if device not in _LAUNCHES:
        try:
            _LAUNCHES[device] = run_distributed(_worker, WORLD, args=(device,), timeout_s=180.0,
                                                deadline_s=600.0)
        except BaseException as err:  # noqa: BLE001 - remembered, re-raised by every user
            _LAUNCHES[device] = err
    if isinstance(_LAUNCHES[device], BaseException):
        raise _LAUNCHES[device]
    return _LAUNCHES[device]


def _expected(size, si, ci, dtype_name, device="cpu"):
    """(unsharded kernel call, float64 reference) for a case."""
    z, ids, lp = _batch(size, si)
    x = z.to(getattr(torch, dtype_name))
    backend = "emulated_cuda" if device == "cuda_emu" else "native"
    with ops.use_backend(backend):
        d = tdev(device)
        kernel = _call(td.topk_distill_loss, x.to(d), ids.to(d), lp.to(d), CONFIGS[ci])
    oracle = _call(ref, x.double(), ids, lp, CONFIGS[ci])
    return kernel, oracle


def _check_values(results, size, world=WORLD, device="cpu"):
    """Every rank's result for every case of a group size against the unsharded kernel and the
    float64 reference; returns how many (rank, case) pairs were checked."""
    names = ("loss", "student_mass", "teacher_mass", "grad")
    checked = 0
    for case in _cases(size):
        _, si, ci, dtype_name = case
        split = SPLITS[size][si]
        kernel, oracle = _expected(size, si, ci, dtype_name, device)
        dtype = getattr(torch, dtype_name)
        value_dtype = F64 if dtype == F64 else F32
        for members in tp_groups(world)[size]:
            first = results[members[0]]["values"][case]
            for grank, rank in enumerate(members):
                got = results[rank]["values"][case]
                lo, w = _starts(split)[grank], split["widths"][grank]
                what = f"TP{size} ranks {members} split={split} rank={rank} {CONFIGS[ci]} {dtype_name}"
                for name, a, b, c in zip(names, got, kernel, oracle):
                    if name == "grad":
                        b, c = b[:, lo:lo + w], c[:, lo:lo + w]
                        assert_close_rowwise(a, b, dtype, f"{what} {name} vs unsharded")
                        assert_close_rowwise(a, c, dtype, f"{what} {name} vs float64 reference")
                    else:
                        dt = value_dtype if name == "loss" else F32
                        assert_close(a, b, dt, f"{what} {name} vs unsharded")
                        assert_close(a, c, dt, f"{what} {name} vs float64 reference")
                        # Replicated: every rank of the group returns bitwise the same values.
                        torch.testing.assert_close(a, first[names.index(name)], rtol=0, atol=0,
                                                   equal_nan=True)
                checked += 1
    return checked


# ----------------------------------------------------------------------------- tests

@pytest.mark.parametrize("size", [2, 3, 4])
def test_every_loss_support_clamp_matches_unsharded_and_reference_on_uneven_splits(size):
    results = launch()
    checked = _check_values(results, size)
    assert checked == len(_cases(size)) * size * len(tp_groups(WORLD)[size])


@pytest.mark.parametrize("size", [2, 3, 4])
def test_emulated_cuda_kernels_under_tp_match_unsharded_and_reference(size):
    """The same cases with every rank running the CUDA kernels under the CUDA emulator."""
    results = launch("cuda_emu")
    for rank in range(WORLD):
        assert results[rank]["emulator"]["launches"] > 0, results[rank]["emulator"]
    checked = _check_values(results, size, device="cuda_emu")
    assert checked == len(_cases(size)) * size * len(tp_groups(WORLD)[size])


def test_forward_makes_two_collectives_backward_none():
    for rank, res in enumerate(launch()):
        counts = res["counts"]
        assert counts["sanity"] == [("allreduce_", None, 12)], counts["sanity"]
        model = parallel.communication_bytes(N, K, 2, check_inputs=False)
        steady = [("all_reduce", "max", model["all_reduce_max"]),
                  ("all_reduce", "sum", model["all_reduce_sum"])]
        assert counts["fwd_nocheck"] == steady, counts["fwd_nocheck"]
        check = parallel.communication_bytes(N, K, 2, check_inputs=True)
        gather = [("all_gather_into_tensor", None, check["all_gather_check"])]
        assert counts["fwd_check"] == gather + steady, counts["fwd_check"]
        assert check["collectives"] == 3 and model["collectives"] == 2
        # check_inputs=False learns the layout on the first call of a group, then caches it.
        # (the layout alone: 4 int64, without the data-check facts)
        cold = [("all_gather_into_tensor", None, 4 * 8)]
        assert counts["fwd_cold_nocheck"] == cold + steady, counts["fwd_cold_nocheck"]
        for label in ("bwd_cold_nocheck", "bwd_nocheck", "bwd_check"):
            assert counts[label] == [], (rank, label, counts[label])
            assert counts[label.replace("bwd", "fwd") + "_saw_kernels"]


def test_torch_compile_fullgraph_has_two_collectives_and_matches_eager():
    compiled = [res["compile"] for res in launch() if "compile" in res]
    assert len(compiled) == 2
    for c in compiled:
        eager_loss, eager_grad = c["eager"]
        for check in (True, False):
            graphs = c[f"graphs_check={check}"]
            assert len(graphs["fw"]) == 1 and len(graphs["bw"]) == 1, graphs
            fw = graphs["fw"][0]
            assert len(fw) == 2 and all("all_reduce" in t for t in fw), fw
            assert graphs["bw"][0] == [], graphs["bw"]
            loss, grad = c[f"aot_check={check}"]
            torch.testing.assert_close(loss, eager_loss)
            torch.testing.assert_close(grad, eager_grad)
        loss, grad = c["inductor"]
        torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad, eager_grad, rtol=1e-5, atol=1e-6)
        for loss, grad, e_loss, e_grad in c["dynamic"]:
            torch.testing.assert_close(loss, e_loss)
            torch.testing.assert_close(grad, e_grad)


def test_shape_disagreement_raises_value_error_on_every_rank():
    # run_distributed's deadline turns a hang into a failure.
    results = [res["disagree"] for res in launch() if "disagree" in res]
    assert len(results) == 3
    for d in results:
        for key in ("N", "N-module"):
            assert d[key].startswith("ValueError:logits: the ranks of tp_group disagree on the "
                                     "number of rows N"), (key, d[key])
        for key in ("K", "K-reference"):
            assert d[key].startswith("ValueError:teacher_ids:") and "disagree on K" in d[key]
        assert d["after"].startswith("ok:"), d["after"]
    for key in ("N", "K", "after"):
        assert len({d[key] for d in results}) == 1  # the same on every rank


def test_megatron_core_real_package():
    results = launch()
    if isinstance(results[0]["megatron_real"], str):
        pytest.skip(results[0]["megatron_real"])
    for rank, res in enumerate(results):
        r = res["megatron_real"]
        assert r["tp_size"] == 2 and r["tp_rank"] == rank % 2
        z, ids, lp = make_batch((20, 20), (0, 20), seed=9 + rank // 2, v=40)
        exp = _call(ref, z.float().double(), ids, lp, dict(loss="jsd", support="tail"))
        lo = r["tp_rank"] * 20
        for name, a, b in zip(("loss", "student_mass", "teacher_mass"), r["result"][:3], exp[:3]):
            assert_close(a, b, F32, f"megatron {name}")
        assert_close_rowwise(r["result"][3], exp[3][:, lo:lo + 20], F32, "megatron grad")


def test_megatron_documented_api_standin_tp2_and_tp1():
    results = launch()
    for rank, res in enumerate(results):
        m = res["megatron_fake"]
        dp, tp_rank = rank // 2, rank % 2
        z, ids, lp = make_batch((20, 20), (0, 20), seed=20 + dp, v=40)
        z = z.float().double()
        sl = slice(tp_rank * 20, tp_rank * 20 + 20)
        for key, cfg in (("tp2", dict(loss="rkl", support="renorm", log_prob_min_clamp=-3.0)),
                         ("tp2_module", dict(loss="tvd", reduction="mean"))):
            exp = _call(ref, z, ids, lp, cfg)
            for a, b in zip(m[key][:3], exp[:3]):
                assert_close(a, b, F32, key)
            assert_close_rowwise(m[key][3], exp[3][:, sl], F32, key)
        exp = _call(ref, z, ids, lp, dict(loss="fkl"))
        for a, b in zip(m["tp1"], exp):
            assert_close_rowwise(a, b, F32, "tp1")
        assert m["tp1_collectives"] == []  # TP size 1: no group, no collective


def test_dtensor_shard_minus_one_on_1d_and_2d_meshes():
    results = launch()
    z, ids, lp = make_batch((10, 10, 10, 7), (0, 10, 20, 30), seed=30)
    exp = _call(ref, z.float().double(), ids, lp, dict(loss="jsd", support="topk", reduction="sum"))
    z2, ids2, lp2 = make_batch((19, 18), (0, 19), seed=31)
    z2b, ids2b, lp2b = (torch.cat([t, t.flip(0)]) for t in (z2, ids2, lp2))
    zz = z2b.float().double().requires_grad_()
    out2 = ref(zz, ids2b, lp2b, loss="srkl", support="tail", reduction="none")
    (grad2_exp,) = torch.autograd.grad(out2.loss.sum(), zz)
    for rank, res in enumerate(results):
        d = res["dtensor"]
        loss, s_mass, t_mass, grad, grad_is_vocab_sharded, width = d["1d"]
        assert width == [10, 10, 10, 7][rank] and grad_is_vocab_sharded
        assert_close(loss, exp[0], F32, "dtensor 1d loss")
        assert_close(s_mass, exp[1], F32, "dtensor 1d student_mass")
        assert_close(t_mass, exp[2], F32, "dtensor 1d teacher_mass")
        assert_close_rowwise(grad, exp[3], F32, "dtensor 1d grad")
        loss2, s_mass2, grad2, (dp, tp) = d["2d"]
        rows = slice(dp * N, dp * N + N)
        assert_close(loss2, out2.loss.detach()[rows], F32, "dtensor 2d loss")
        assert_close(s_mass2, out2.student_mass[rows], F32, "dtensor 2d student_mass")
        assert_close_rowwise(grad2, grad2_exp, F32, "dtensor 2d grad")
        bad_placement, not_dtensor, wrong_dim = d["errors"]
        assert bad_placement.startswith("ValueError: logits must be sharded along the vocab")
        assert not_dtensor.startswith("TypeError: logits must be a torch.distributed.tensor")
        assert wrong_dim.startswith("ValueError: logits must be Shard(-1) on mesh_dim=0")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL path needs >= 2 GPUs")
def test_nccl_matches_unsharded():
    if not torch._C._dispatch_has_kernel_for_dispatch_key("topk_distill::shard_pass", "CUDA"):
        pytest.skip("the CUDA kernels were not built")
    world = min(torch.cuda.device_count(), WORLD)
    results = run_distributed(_worker, world, args=("cuda",), deadline_s=300.0, backend="nccl")
    for size in tp_groups(world):
        assert _check_values(results, size, world=world, device="cuda") > 0


# ----------------------------------------------------------------------------- single process

def test_layout_table_errors_and_defaults():
    from topk_distill.parallel import _layout_from_table

    lay = _layout_from_table([[4, 3, 20, -1], [4, 3, 10, -1], [4, 3, 7, -1]], rank=1)
    assert (lay.vocab_start, lay.vocab_size, lay.shard_starts) == (20, 37, (0, 20, 30))
    lay = _layout_from_table([[4, 3, 7, 30], [4, 3, 20, 0], [4, 3, 10, 20]], rank=0)
    assert (lay.vocab_start, lay.vocab_size) == (30, 37)
    cases = [([[4, 3, 5, -1], [5, 3, 5, -1]], "logits: the ranks of tp_group disagree on the number"),
             ([[4, 3, 5, -1], [4, 2, 5, -1]], "teacher_ids: the ranks of tp_group disagree on K"),
             ([[4, 3, 5, 0], [4, 3, 5, -1]], "vocab_start must be given on every rank"),
             ([[4, 3, 5, 0], [4, 3, 5, 0]], "vocab_start: the shards"),
             ([[4, 3, 5, 1], [4, 3, 5, 6]], "vocab_start: the shards")]
    for table, msg in cases:
        with pytest.raises(ValueError, match="^" + msg.replace("(", r"\(")):
            _layout_from_table(table, rank=0)


def test_communication_bytes_model():
    assert parallel.communication_bytes(1000, 64, 8, check_inputs=False) == dict(
        all_reduce_max=4000, all_reduce_sum=1000 * 69 * 4, collectives=2)
    assert parallel.communication_bytes(1000, 64, 8, acc_bytes=8) == dict(
        all_reduce_max=8000, all_reduce_sum=1000 * 69 * 8, all_gather_check=64, collectives=3)
    # labels: one more gathered column; the student's top-k: one all_gather of (value, id) pairs
    assert parallel.communication_bytes(1000, 64, 8, labels=True, student_topk=16) == dict(
        all_reduce_max=4000, all_reduce_sum=1000 * 70 * 4, all_gather_topk=1000 * 32 * 8,
        all_gather_check=64, collectives=4)


def test_tp_group_type_error_and_integrations_import_without_megatron():
    with pytest.raises(TypeError, match="^tp_group must be a torch.distributed.ProcessGroup"):
        parallel.group_name_of(3)
    import topk_distill.integrations as integ

    assert callable(integ.megatron_topk_distill_loss) and callable(integ.dtensor_topk_distill_loss)
    assert "megatron" not in sys.modules or hasattr(sys.modules["megatron"], "__file__")
