"""SPEC 9 under tensor parallelism with real processes (gloo): ONE launch of 4 processes holds TP
groups of size 2 (ranks 0-1 and 2-3), 3 (ranks 1-3) and 4 (the world) - tests/test_tp.py's
groups - and every rank calls ``topk_distill_loss`` on its uneven vocab shard with labels,
return_entropy, a loss mixture, student_topk (k > V_r on some ranks, k = V), missing teacher
entries and a teacher that covers the vocab (K = V). Each rank's loss, masses, label_logprobs,
entropy, top-k ids / log-probs, overlap outputs and shard gradient must equal the unsharded
call and the float64 oracle, and every output must be bitwise the same on every rank. The
same launch runs ``fused_linear_topk_distill_loss`` with each rank holding its weight / bias
shard (labels, entropy, a mixture, student_topk, missing entries, chunks).

The launch runs once with the native backend and once with every rank on the emulated CUDA
backend (``backend="emulated_cuda"``; tests/conftest.py switches the parent too)."""
from __future__ import annotations

import math
import os
import sys

import pytest
import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))

import topk_distill as td  # noqa: E402
from topk_distill import TopKDistillOutput, ops, reference  # noqa: E402

from _dist_utils import run_distributed  # noqa: E402
from _inputs import assert_close, assert_close_rowwise  # noqa: E402
from _v2 import equal_nan, upstream  # noqa: E402
from test_tp import MASK, N, V, _make_groups, make_batch, tp_groups  # noqa: E402

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")

ref = reference.topk_distill_loss
F32, F64, BF16 = torch.float32, torch.float64, torch.bfloat16
WORLD = 4
NAN = math.nan

# Uneven splits of V = 37 (group-local rank order) and explicit vocab_start where given.
SPLITS = {
    2: [dict(widths=(20, 17)), dict(widths=(36, 1), starts=(1, 0))],
    3: [dict(widths=(13, 17, 7)), dict(widths=(2, 30, 5), starts=(35, 0, 30))],
    4: [dict(widths=(1, 1, 1, 34), starts=(36, 0, 1, 2)), dict(widths=(10, 10, 10, 7))],
}
assert set(SPLITS) == set(tp_groups(WORLD))

# Each config: the call's keywords (labels / mask / the teacher variant filled in per case).
CONFIGS = [
    dict(loss=[("fkl", "topk", 0.9), ("rkl", "renorm", 0.1)], student_topk=5, temperature=1.3,
         mask=True),
    dict(loss=[("jsd", "tail", 0.6, 0.3), ("tvd", "topk", 0.4)], student_topk=V,
         log_prob_min_clamp=-3.0, missing_teacher="drop", teacher="missing"),
    dict(loss=[("srkl", "tail", 1.0, 0.5, 0.1, 0.2), ("fkl+rkl", "renorm", -0.3, 0.5, 0.4)],
         student_topk=7, missing_teacher="floor", log_prob_min_clamp=-6.0, teacher="missing",
         logits="ties", mask=True, t2_scale=True, temperature=0.7),
    dict(loss=[("fkl", "tail", 0.5), ("jsd", "tail", 0.5, 0.0), ("tvd", "topk", 1.0)],
         student_topk=3, teacher="covering"),
]
CASES = [(size, si, ci, dt) for size in SPLITS for si in range(len(SPLITS[size]))
         for ci in range(len(CONFIGS)) for dt in ("float32", "float64", "bfloat16")
         if (dt == "float32" or (dt == "float64" and ci in (0, 3) and si == 0)
             or (dt == "bfloat16" and ci == 2 and si == 0))]


def _starts(split):
    w = split["widths"]
    return split.get("starts") or tuple(sum(w[:r]) for r in range(len(w)))


def case_inputs(size, si, ci, dtype_name):
    """(full logits [N, V] in the case's dtype, ids, lp, call keywords without tp_group)."""
    split = SPLITS[size][si]
    widths, starts = split["widths"], _starts(split)
    cfg = dict(CONFIGS[ci])
    z, ids, lp = make_batch(widths, starts, seed=100 + 10 * size + si)
    g = torch.Generator().manual_seed(200 + ci)
    if cfg.pop("logits", None) == "ties":  # bf16-friendly values: many equal logits
        z = torch.randint(-8, 8, (N, V), generator=g).to(F64) / 4
    teacher = cfg.pop("teacher", None)
    if teacher == "missing":
        lp = lp.clone()
        lp[0, 0] = lp[6, 1] = lp[7, 2] = NAN  # (row 0: id 0, the first shard's column 0)
        lp[8, :] = torch.where(ids[8] >= 0, NAN, lp[8])
    elif teacher == "covering":  # K = V: rows 0-7 permutations (covered), 8 padding, 9 a dup
        teach = torch.log_softmax(torch.randn(N, V, generator=g, dtype=F64) * 2, -1)
        ids = torch.stack([torch.randperm(V, generator=g) for _ in range(N)])
        ids[8, 5] = -1
        ids[9, 5] = ids[9, 6]
        lp = teach.gather(-1, ids.clamp_min(0)).float().double()  # fp32-rounded log-probs
        lp = torch.where(ids >= 0, lp, 0.0)
    labels = torch.tensor([0, V - 1, -1, starts[-1], 5, starts[0] + widths[0] - 1, 3, -100,
                           11, 20])
    kw = dict(cfg, labels=labels, return_entropy=True, reduction="none",
              mask=MASK if cfg.get("mask") else None)
    return z.to(getattr(torch, dtype_name)), ids, lp, kw


def call(fn, x, ids, lp, kw, **extra):
    """Every output of one call (detached, CPU) and the gradient w.r.t. x of
    sum_o <upstream_o, o> over loss, label_logprobs and entropy."""
    x = x.detach().clone().requires_grad_(True)
    out = fn(x, ids, lp, **kw, **extra)
    total = sum((t * upstream(t, salt)).sum() for salt, t in
                enumerate((out.loss, out.label_logprobs, out.entropy)))
    (grad,) = torch.autograd.grad(total, x)
    return TopKDistillOutput(*(None if t is None else t.detach().cpu() for t in out)), grad.cpu()


def _values(groups):
    results = {}
    for size, (group, _members) in sorted(groups.items()):
        grank = dist.get_rank(group)
        for case in CASES:
            if case[0] != size:
                continue
            _, si, ci, dtype_name = case
            split = SPLITS[size][si]
            lo, w = _starts(split)[grank], split["widths"][grank]
            z, ids, lp, kw = case_inputs(*case)
            results[case] = call(td.topk_distill_loss, z[:, lo:lo + w], ids, lp, kw,
                                 tp_group=group, vocab_start=lo if "starts" in split else None)
    return results


# ----------------------------------------------------------------------------- fused linear

H = 12
FUSED_KW = dict(loss=[("fkl", "topk", 0.9), ("rkl", "renorm", 0.1)], return_entropy=True,
                student_topk=5, missing_teacher="drop", temperature=1.2, chunk_size=4,
                reduction="mean")
FUSED_CASES = [(size, 0, dt) for size in SPLITS for dt in ("float32", "float64")]


def fused_inputs(size, si, dtype_name):
    """hidden [N, H], weight [V, H], bias [V] in the case's dtype; ids / lp with shard-edge ids
    and two missing entries; call keywords (labels, mask)."""
    split = SPLITS[size][si]
    z, ids, lp = make_batch(split["widths"], _starts(split), seed=300 + size)
    g = torch.Generator().manual_seed(400 + size)
    dt = getattr(torch, dtype_name)
    hidden = torch.randn(N, H, generator=g, dtype=F64).to(dt)
    weight = (torch.randn(V, H, generator=g, dtype=F64) * 0.5).to(dt)
    bias = (torch.randn(V, generator=g, dtype=F64) * 0.3).to(dt)
    lp = lp.clone()
    lp[1, 0] = lp[6, 3] = NAN
    labels = torch.tensor([0, V - 1, -1, 7, 5, 19, 3, -100, 11, 20])
    return hidden, weight, bias, ids, lp, dict(FUSED_KW, labels=labels, mask=MASK)


def fused_call(fn, hidden, weight, bias, ids, lp, kw, unfused=False, **extra):
    """Outputs and the gradients (hidden, weight, bias) of sum_o <upstream_o, o>."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (hidden, weight, bias)]
    if unfused:
        kw = {k: v for k, v in kw.items() if k != "chunk_size"}
        out = fn(leaves[0] @ leaves[1].T + leaves[2], ids, lp, **kw, **extra)
    else:
        out = fn(leaves[0], leaves[1], ids, lp, bias=leaves[2], **kw, **extra)
    total = sum((t * upstream(t, salt)).sum() for salt, t in
                enumerate((out.loss, out.label_logprobs, out.entropy)))
    grads = torch.autograd.grad(total, leaves)
    return TopKDistillOutput(*(None if t is None else t.detach().cpu() for t in out)), \
        [g.cpu() for g in grads]


def _fused_values(groups):
    results = {}
    for size, (group, _members) in sorted(groups.items()):
        grank = dist.get_rank(group)
        for case in FUSED_CASES:
            if case[0] != size:
                continue
            split = SPLITS[size][case[1]]
            lo, w = _starts(split)[grank], split["widths"][grank]
            hidden, weight, bias, ids, lp, kw = fused_inputs(*case)
            results[case] = fused_call(td.fused_linear_topk_distill_loss, hidden,
                                       weight[lo:lo + w], bias[lo:lo + w], ids, lp, kw,
                                       tp_group=group,
                                       vocab_start=lo if "starts" in split else None)
    return results


# ----------------------------------------------------------------------------- student_topk

TOPK_KS = (1, 6, V)


def _topk_values(groups):
    """td.student_topk on every rank's shard (k > V_r on the narrow ranks, k = V), every split
    and dtype of the main cases; and k = V + 1, which every rank must refuse."""
    results = {}
    for size, (group, _members) in sorted(groups.items()):
        grank = dist.get_rank(group)
        for case in CASES:
            if case[0] != size or case[2] not in (0, 2):
                continue
            split = SPLITS[size][case[1]]
            lo, w = _starts(split)[grank], split["widths"][grank]
            z, _, _, kw = case_inputs(*case)
            for k in TOPK_KS:
                ids, lps = td.student_topk(z[:, lo:lo + w], k, tp_group=group,
                                           temperature=kw.get("temperature", 1.0),
                                           vocab_start=lo if "starts" in split else None)
                results[case + (k,)] = (ids.cpu(), lps.cpu())
        errors = []
        x = torch.zeros(N, SPLITS[size][0]["widths"][grank])
        for fn in (lambda: td.student_topk(x, V + 1, tp_group=group),
                   lambda: td.topk_distill_loss(x, torch.zeros(N, 2, dtype=torch.long),
                                                torch.full((N, 2), -1.0), tp_group=group,
                                                student_topk=V + 1)):
            try:
                fn()
                errors.append(None)
            except ValueError as err:
                errors.append(str(err))
        results[("errors", size)] = errors
    return results


def _worker(rank, world, backend):
    if backend == "emulated_cuda":
        ops.set_backend("emulated_cuda")
    groups = _make_groups(rank, world)
    return {"values": _values(groups), "fused": _fused_values(groups),
            "topk": _topk_values(groups)}


_LAUNCHES = {}


def launch(backend):
    if backend not in _LAUNCHES:
        try:
            _LAUNCHES[backend] = run_distributed(_worker, WORLD, args=(backend,), timeout_s=180.0,
                                                 deadline_s=600.0)
        except BaseException as err:  # noqa: BLE001 - remembered, re-raised by every user
            _LAUNCHES[backend] = err
    if isinstance(_LAUNCHES[backend], BaseException):
        raise _LAUNCHES[backend]
    return _LAUNCHES[backend]


INT_FIELDS = ("student_topk_ids", "overlap_count")
VALUE_FIELDS = ("loss", "label_logprobs", "entropy")


def _check_outputs(out, first, unsharded, oracle, value_dtype, what):
    """Every output field of one rank: bitwise the same as on the group's first rank (replicated),
    equal to the unsharded call's and the oracle's (ids and counts exactly)."""
    for name in TopKDistillOutput._fields:
        a = getattr(out, name)
        assert equal_nan(a, getattr(first, name)), f"{what} {name} differs by rank"
        for label, want in (("unsharded", unsharded), ("oracle", oracle)):
            b = getattr(want, name)
            if name in INT_FIELDS:
                assert torch.equal(a, b), f"{what} {name} vs {label}:\n{a}\n{b}"
            else:
                dt = value_dtype if name in VALUE_FIELDS else F32
                assert_close(a, b, dt, f"{what} {name} vs {label}")


@pytest.mark.parametrize("backend", ["native", "emulated_cuda"])
@pytest.mark.parametrize("size", [2, 3, 4])
def test_new_outputs_under_tp_match_unsharded_and_oracle(size, backend):
    results = launch(backend)
    checked = 0
    for case in CASES:
        if case[0] != size:
            continue
        _, si, ci, dtype_name = case
        split = SPLITS[size][si]
        dtype = getattr(torch, dtype_name)
        z, ids, lp, kw = case_inputs(*case)
        unsharded = call(td.topk_distill_loss, z, ids, lp, kw)
        oracle = call(ref, z.double(), ids, lp, kw)
        value_dtype = F64 if dtype == F64 else F32
        for members in tp_groups(WORLD)[size]:
            first = results[members[0]]["values"][case]
            for grank, rank in enumerate(members):
                out, grad = results[rank]["values"][case]
                lo, w = _starts(split)[grank], split["widths"][grank]
                what = f"TP{size} {split} rank {rank} config {ci} {dtype_name}"
                _check_outputs(out, first[0], unsharded[0], oracle[0], value_dtype, what)
                for label, want in (("unsharded", unsharded), ("oracle", oracle)):
                    assert_close_rowwise(grad, want[1][:, lo:lo + w], dtype,
                                         f"{what} grad vs {label}")
                checked += 1
    assert checked == sum(c[0] == size for c in CASES) * size * len(tp_groups(WORLD)[size])


@pytest.mark.parametrize("backend", ["native", "emulated_cuda"])
@pytest.mark.parametrize("size", [2, 3, 4])
def test_fused_linear_under_tp_matches_unsharded_and_oracle(size, backend):
    """Each rank holds its weight / bias shard: outputs replicated and equal to the unsharded
    fused call and the oracle on hidden @ W.T + b; the weight / bias gradients are the shard's
    slice; the hidden gradient is this rank's partial one (their sum over the group is the
    full one, as for Megatron's ColumnParallelLinear)."""
    results = launch(backend)
    for case in FUSED_CASES:
        if case[0] != size:
            continue
        _, si, dtype_name = case
        split = SPLITS[size][si]
        dtype = getattr(torch, dtype_name)
        hidden, weight, bias, ids, lp, kw = fused_inputs(*case)
        unsharded = fused_call(td.fused_linear_topk_distill_loss, hidden, weight, bias, ids, lp,
                               kw)
        oracle = fused_call(ref, hidden.double(), weight.double(), bias.double(), ids, lp, kw,
                            unfused=True)
        value_dtype = F64 if dtype == F64 else F32
        for members in tp_groups(WORLD)[size]:
            first = results[members[0]]["fused"][case]
            hidden_grad_sum = 0
            for grank, rank in enumerate(members):
                out, (gh, gw, gb) = results[rank]["fused"][case]
                lo, w = _starts(split)[grank], split["widths"][grank]
                what = f"fused TP{size} {split} rank {rank} {dtype_name}"
                _check_outputs(out, first[0], unsharded[0], oracle[0], value_dtype, what)
                for label, want in (("unsharded", unsharded), ("oracle", oracle)):
                    assert_close(gw, want[1][1][lo:lo + w], dtype, f"{what} grad_weight {label}")
                    assert_close(gb, want[1][2][lo:lo + w], dtype, f"{what} grad_bias {label}")
                hidden_grad_sum = hidden_grad_sum + gh.double()
            for label, want in (("unsharded", unsharded), ("oracle", oracle)):
                assert_close(hidden_grad_sum, want[1][0], dtype, f"fused TP{size} grad_hidden sum")


@pytest.mark.parametrize("backend", ["native", "emulated_cuda"])
@pytest.mark.parametrize("size", [2, 3, 4])
def test_student_topk_under_tp_is_the_unsharded_one_on_every_rank(size, backend):
    """SPEC 9.4: td.student_topk with a tp_group - ids equal to the unsharded call and the
    oracle (ties by the lower id across shards: the bf16 case has many), log-probs close, the
    same tensors on every rank; k > V_r is fine, k > V a ValueError naming k on every rank."""
    results = launch(backend)
    checked = 0
    for case in CASES:
        if case[0] != size or case[2] not in (0, 2):
            continue
        z, _, _, kw = case_inputs(*case)
        temperature = kw.get("temperature", 1.0)
        for k in TOPK_KS:
            want_ids, want_lps = td.student_topk(z, k, temperature=temperature)
            ref_ids, ref_lps = reference.student_topk(z.double(), k, temperature=temperature)
            for members in tp_groups(WORLD)[size]:
                first = results[members[0]]["topk"][case + (k,)]
                for rank in members:
                    ids, lps = results[rank]["topk"][case + (k,)]
                    what = f"TP{size} {case} k={k} rank {rank}"
                    assert torch.equal(ids, first[0]) and torch.equal(lps, first[1]), what
                    assert torch.equal(ids, want_ids) and torch.equal(ids, ref_ids), what
                    assert_close(lps, want_lps, F32, what)
                    assert_close(lps, ref_lps, F32, what)
                    checked += 1
    assert checked > 0
    for members in tp_groups(WORLD)[size]:
        for rank in members:
            topk_err, loss_err = results[rank]["topk"][("errors", size)]
            assert topk_err is not None and topk_err.startswith(
                f"k must be <= the vocab size V={V}"), (rank, topk_err)
            assert loss_err is not None and loss_err.startswith(
                f"student_topk must be <= the vocab size V={V}"), (rank, loss_err)
