"""topk_distill/_layout.py (SPEC 9.1): folding logits views into 2 strides, the overlap rule,
jagged nested tensors (unpack / repack / autograd / in-place / torch.compile / TP) and the
reference oracle on jagged input.

The fold and overlap properties are checked against brute force on tensors whose storage is
``arange``: an element's value is its memory position, so equal values mean the same memory.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, os.path.dirname(__file__))

import topk_distill as td  # noqa: E402
from topk_distill import _layout, reference  # noqa: E402
from topk_distill._layout import (fold_rows, jagged_values, repack_jagged,  # noqa: E402
                                  rows_overlap, unpack_jagged)

from _inputs import teacher_batch  # noqa: E402

TORCH_2_14 = torch.__version__.startswith("2.14.")


# ============================================================================ brute force helpers

def _positions(shape, strides, offset=0, last_stride=None):
    """A tensor of that layout over an ``arange`` storage (values = memory positions)."""
    shape, strides = list(shape), list(strides)
    if last_stride is not None:
        strides[-1] = last_stride
    extent = offset + sum((s - 1) * st for s, st in zip(shape, strides) if s > 0) + 1
    base = torch.arange(max(extent, 1) + 3, dtype=torch.float64)
    return base.as_strided(shape, strides, offset)


def _min_strides(row_offsets):
    """Fewest strides (1 or 2) whose fold ``n -> (n // T)*s0 + (n % T)*s1`` reproduces the row
    offsets in order, over every split T of N; None if no 2-stride fold exists."""
    n = len(row_offsets)
    if n <= 1:
        return 1
    o = [x - row_offsets[0] for x in row_offsets]
    best = None
    for t in range(1, n + 1):
        if n % t:
            continue
        s1 = o[1] if t > 1 else 0
        s0 = o[t] if n // t > 1 else 0
        if s0 < 0 or s1 < 0:  # torch strides are non-negative
            continue
        if all(o[i] == (i // t) * s0 + (i % t) * s1 for i in range(n)):
            k = 1 if t in (1, n) else 2
            best = k if best is None else min(best, k)
    return best


def _check_fold(x):
    """fold_rows(x) is None exactly when no fold exists; else an exact view in row order."""
    v = x.shape[-1]
    folded = fold_rows(x)
    if v > 1 and x.stride(-1) != 1:
        assert folded is None
        return None
    rows = x.reshape(-1, v)
    expected = _min_strides(rows[:, 0].long().tolist()) if x.numel() else 1
    if folded is None:
        assert expected is None, f"{tuple(x.shape)} {x.stride()}: a {expected}-stride fold exists"
        return None
    assert expected is not None
    assert folded.dim() == (2 if expected == 1 else 3), (tuple(x.shape), x.stride(), folded.shape)
    assert folded.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
    assert folded.storage_offset() == x.storage_offset() or x.numel() == 0
    if folded.dim() == 3:
        assert folded.shape[0] > 1 and folded.shape[1] > 1
    assert folded.shape[-1] == v and (v == 1 or folded.stride(-1) == 1)
    assert torch.equal(folded.reshape(-1, v), rows)  # same memory, same row order
    return folded


def _overlap_brute(view):
    return view.numel() > 0 and view.reshape(-1).unique().numel() < view.numel()


# ========================================================================== fold_rows: named cases

def _bt(b=3, t=5, v=4):
    return _positions((b, t, v), (t * v, v, 1))


FOLD_CASES = {
    # name: (make, expected folded shape, expected leading strides)
    "contiguous [B,T,V]": (lambda: _bt(), (15, 4), (4,)),
    "x[:, :-1]": (lambda: _bt()[:, :-1], (3, 4, 4), (20, 4)),
    "x[:, 1:] (storage offset)": (lambda: _bt()[:, 1:], (3, 4, 4), (20, 4)),
    "x.transpose(0, 1)": (lambda: _bt().transpose(0, 1), (5, 3, 4), (4, 20)),
    "[1, total, V]": (lambda: _bt()[:1], (5, 4), (4,)),
    "x[None] of [total, V]": (lambda: _positions((7, 4), (4, 1))[None], (7, 4), (4,)),
    "x[:, 2] (select)": (lambda: _bt()[:, 2], (3, 4), (20,)),
    "x.narrow(1, 1, 3)": (lambda: _bt().narrow(1, 1, 3), (3, 3, 4), (20, 4)),
    "x[::2] (step)": (lambda: _bt(4)[::2], (2, 5, 4), (40, 4)),
    "x[:, ::2]": (lambda: _bt()[:, ::2], (3, 3, 4), (20, 8)),
    "vocab slice x[..., :3]": (lambda: _bt()[..., :3], (15, 3), (4,)),
    "vocab slice of x[:, :-1]": (lambda: _bt()[:, :-1, 1:], (3, 4, 3), (20, 4)),
    "[N, V] row stride": (lambda: _positions((6, 8), (8, 1))[:, 2:5], (6, 3), (8,)),
    "1-D [V]": (lambda: _positions((4,), (1,)), (1, 4), None),
    "expand over B": (lambda: _positions((1, 5, 4), (20, 4, 1)).expand(3, 5, 4), (3, 5, 4),
                      (0, 4)),
    "expand over T": (lambda: _positions((3, 1, 4), (4, 4, 1)).expand(3, 5, 4), (3, 5, 4),
                      (4, 0)),
    "expand over all": (lambda: _positions((1, 4), (4, 1)).expand(6, 4), (6, 4), (0,)),
    "[A,B,T,V] sliced on T": (lambda: _positions((2, 3, 5, 4), (60, 20, 4, 1))[:, :, :-1],
                              (6, 4, 4), (20, 4)),
    "[T,B,V] -> [B,T] with size-1 dims": (
        lambda: _positions((5, 1, 3, 1, 4), (12, 12, 4, 4, 1)).transpose(0, 2), (3, 1, 5, 1, 4),
        None),
    "V == 1, odd last stride": (lambda: _positions((3, 5, 1), (10, 2, 7)), (15, 1), (2,)),
    "0-size B": (lambda: _bt(0), (0, 4), None),
    "0-size T of a slice": (lambda: _bt()[:, 5:], (0, 4), None),
}


@pytest.mark.parametrize("name", list(FOLD_CASES))
def test_fold_rows_named_layouts(name):
    make, shape, lead_strides = FOLD_CASES[name]
    x = make()
    folded = _check_fold(x)
    if name == "[T,B,V] -> [B,T] with size-1 dims":
        assert folded.shape == (3, 5, 4) and folded.stride()[:2] == (4, 12)
        return
    assert tuple(folded.shape) == shape
    if lead_strides is not None:
        assert folded.stride()[:-1] == lead_strides


@pytest.mark.parametrize("make", [
    lambda: _bt().transpose(1, 2),                                    # last stride V*... != 1
    lambda: _positions((2, 3, 5, 4), (60, 20, 4, 1))[:, ::2, :-1],    # three strides
    lambda: _positions((2, 3, 5, 4), (60, 20, 4, 1)).permute(2, 1, 0, 3),  # no two nest
    lambda: _positions((3, 3, 3, 2), (18, 6, 2, 1))[:, ::2, ::2],
], ids=["vocab not last", "three strides", "permuted 4-D", "strided 4-D"])
def test_fold_rows_returns_none_when_no_two_stride_fold_exists(make):
    x = make()
    assert fold_rows(x) is None
    _check_fold(x)  # and brute force agrees


def test_fold_rows_returns_the_tensor_itself_when_already_folded():
    x = _positions((6, 4), (9, 1))
    assert fold_rows(x) is x
    y = _bt()[:, :-1]
    assert fold_rows(y) is y


def test_fold_rows_rejects_non_tensors_nested_and_0d():
    with pytest.raises(TypeError):
        fold_rows([1.0])
    with pytest.raises(ValueError, match="0-d"):
        fold_rows(torch.tensor(1.0))
    nt = torch.nested.nested_tensor([torch.randn(2, 3), torch.randn(1, 3)], layout=torch.jagged)
    with pytest.raises(TypeError, match="unpack_jagged"):
        fold_rows(nt)


def test_fold_rows_view_is_differentiable_and_writes_reach_the_user_tensor():
    leaf = torch.randn(3, 6, 5, dtype=torch.float64, requires_grad=True)
    x = leaf[:, :-1]
    folded = fold_rows(x)
    assert folded.dim() == 3
    w = torch.randn(3, 5, 5, dtype=torch.float64)
    (folded * w).sum().backward()
    expected = torch.zeros_like(leaf)
    expected[:, :-1] = w
    assert torch.equal(leaf.grad, expected)

    y = torch.zeros(4, 7, 3)
    fold_rows(y.transpose(0, 1)[:, 1:]).fill_(1.0)  # [7, 3] logical rows, strides (3, 21)
    assert y[1:].eq(1).all() and y[0].eq(0).all()


# ============================================================================ fold_rows: properties

@st.composite
def _as_strided_layouts(draw):
    m = draw(st.integers(0, 4))
    sizes = draw(st.lists(st.integers(0, 4), min_size=m, max_size=m))
    v = draw(st.integers(1, 4))
    strides = [draw(st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 24, 36]))
               * draw(st.sampled_from([1, v])) for _ in range(m)]
    last = 1 if v > 1 and draw(st.integers(0, 9)) else draw(st.sampled_from([1, 2, 5]))
    return _positions(sizes + [v], strides + [last], draw(st.integers(0, 3)))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_as_strided_layouts())
def test_fold_rows_is_exact_and_complete_on_arbitrary_strides(x):
    folded = _check_fold(x)
    if folded is not None:
        assert rows_overlap(folded) == _overlap_brute(folded)


@st.composite
def _view_chains(draw):
    """Realistic views: a contiguous tensor, then slicing, transposes, select, expand..."""
    m = draw(st.integers(1, 4))
    shape = draw(st.lists(st.integers(1, 4), min_size=m, max_size=m)) + [draw(st.integers(1, 4))]
    x = _positions(shape, torch.empty(shape).stride(), draw(st.integers(0, 2)))
    for _ in range(draw(st.integers(0, 4))):
        lead = x.dim() - 1
        op = draw(st.sampled_from(["slice", "step", "transpose", "select", "expand", "unsqueeze",
                                   "vocab"]))
        d = draw(st.integers(0, max(lead - 1, 0)))
        if op == "slice" and lead and x.shape[d] > 0:
            start = draw(st.integers(0, x.shape[d] - 1))
            x = x.narrow(d, start, draw(st.integers(0, x.shape[d] - start)))
        elif op == "step" and lead:
            idx = [slice(None)] * x.dim()
            idx[d] = slice(None, None, draw(st.integers(2, 3)))
            x = x[tuple(idx)]
        elif op == "transpose" and lead >= 2:
            x = x.transpose(d, draw(st.integers(0, lead - 1)))
        elif op == "select" and lead >= 2 and x.shape[d] > 0:
            x = x.select(d, draw(st.integers(0, x.shape[d] - 1)))
        elif op == "expand" and lead:
            x = x.unsqueeze(d).expand(*x.shape[:d], draw(st.integers(1, 3)), *x.shape[d:])
        elif op == "unsqueeze":
            x = x.unsqueeze(d)
        elif op == "vocab" and x.shape[-1] > 1:
            x = x[..., 1:]
    return x


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_view_chains())
def test_fold_rows_on_chains_of_views(x):
    folded = _check_fold(x)
    if folded is not None:
        assert rows_overlap(folded) == _overlap_brute(folded)


# ============================================================================ rows_overlap

OVERLAP_CASES = {
    # name: (make, overlaps)
    "contiguous": (lambda: _positions((6, 4), (4, 1)), False),
    "row stride > V": (lambda: _positions((6, 4), (9, 1)), False),
    "row stride < V": (lambda: _positions((6, 4), (3, 1)), True),
    "expand rows (stride 0)": (lambda: _positions((1, 4), (4, 1)).expand(6, 4), True),
    "expand 3-D over B": (lambda: _positions((1, 5, 4), (20, 4, 1)).expand(3, 5, 4), True),
    "one row": (lambda: _positions((1, 4), (0, 1)), False),
    "empty": (lambda: _positions((0, 4), (0, 1)), False),
    "x[:, :-1]": (lambda: _bt()[:, :-1], False),
    "transposed": (lambda: _bt().transpose(0, 1), False),
    # offsets b*4 + t*8: 0 8 16 | 4 12 20 - interleaved, disjoint
    "interleaved, disjoint": (lambda: _positions((2, 3, 4), (4, 8, 1)), False),
    # s0 = 3V, s1 = 2V: rows (2, 0) and (0, 3) both start at 6V
    "interleaved, colliding": (lambda: _positions((3, 4, 4), (12, 8, 1)), True),
    # s0 = 3V, s1 = 2V but too few rows to collide (|db| <= 1, |dt| <= 1)
    "interleaved, too small to collide": (lambda: _positions((2, 2, 4), (12, 8, 1)), False),
    # both strides >= V but a difference db*s0 + dt*s1 = 5*7 - 3*11 = 2 < V
    "lattice near-collision": (lambda: _positions((6, 4, 3), (7, 11, 1)), True),
    # same strides, V = 1: db*7 + dt*11 = 0 needs |db| >= 11
    "lattice, no collision": (lambda: _positions((6, 4, 1), (7, 11, 1)), False),
    "as_strided 2-D overlap": (lambda: _positions((5, 4), (2, 1)), True),
    "V == 1 distinct": (lambda: _positions((3, 4, 1), (4, 1, 9)), False),
    "V == 1 coinciding": (lambda: _positions((3, 4, 1), (2, 1, 9)), True),
}


@pytest.mark.parametrize("name", list(OVERLAP_CASES))
def test_rows_overlap_named_layouts(name):
    make, overlaps = OVERLAP_CASES[name]
    x = make()
    assert _overlap_brute(x) == overlaps
    assert rows_overlap(x) == overlaps
    folded = fold_rows(x)
    assert folded is not None and rows_overlap(folded) == overlaps


@settings(max_examples=600, deadline=None)
@given(st.integers(1, 5), st.sampled_from([2, 3]), st.data())
def test_rows_overlap_matches_brute_force(v, dims, data):
    sizes = [data.draw(st.integers(0, 7)) for _ in range(dims - 1)]
    strides = [data.draw(st.integers(0, 40)) for _ in range(dims - 1)]
    x = _positions(sizes + [v], strides + [1])
    assert rows_overlap(x) == _overlap_brute(x)


@pytest.mark.parametrize("shape, strides, overlaps", [
    ((3000, 3000, 4), (12005, 4, 1), False),     # nested with a gap
    ((3000, 3000, 4), (7, 3, 1), True),          # strides below V
    ((100000, 30, 4), (41, 400004, 1), True),    # 5 * 400004 - 48781 * 41 = -1
    ((2000, 2000, 4), (8004, 7996, 1), False),   # interleaved lattice, no collision
])
def test_rows_overlap_is_metadata_only_for_large_views(shape, strides, overlaps):
    x = torch.empty(0, device="meta").as_strided(shape, strides)  # no memory behind it
    assert rows_overlap(x) is overlaps


@pytest.mark.parametrize("name", ["x[:, :-1]", "expand rows (stride 0)", "interleaved, colliding",
                                  "lattice, no collision"])
def test_fold_and_overlap_trace_under_compile_fullgraph(name):
    """losses.py calls both inside compiled regions: metadata-only Python, no graph break."""
    make, overlaps = OVERLAP_CASES[name]

    def f(x):
        view = fold_rows(x)
        return view.sum() + (1.0 if rows_overlap(view) else 0.0)

    x = make()
    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True, backend="eager")(x)
    assert got.item() == x.sum().item() + overlaps


def test_rows_overlap_argument_errors():
    with pytest.raises(ValueError, match="2-D"):
        rows_overlap(torch.zeros(2, 2, 2, 2))
    with pytest.raises(ValueError, match="unit stride"):
        rows_overlap(torch.zeros(4, 3).t())
    with pytest.raises(TypeError):
        rows_overlap(torch.zeros(3).to_sparse())


# ============================================================================ jagged: helpers

V, K = 13, 4
LENGTHS = [3, 5, 1, 4]
OFFSETS = torch.tensor([0, 3, 8, 9, 13])
TOTAL = 13


def _packed(seed=0, dtype=torch.float64):
    z, ids, lp = teacher_batch(TOTAL, V, K, seed=seed, logits_dtype=dtype)
    mask = torch.ones(TOTAL, dtype=torch.bool)
    mask[[2, 9]] = False
    return z, ids, lp, mask


def _nested(t, offsets=OFFSETS):
    return torch.nested.nested_tensor_from_jagged(t, offsets)


def _grad_mock(values):
    """An autograd Function mimicking the kernels' in-place backward on ``values``: writes a
    gradient (3 * upstream) into the saved logits' storage, bumps the version, returns it."""
    class InplaceBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x.sum(-1)

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            with torch.autograd._unsafe_preserve_version_counter(x):  # a raw kernel write
                x.copy_(3 * g.unsqueeze(-1).expand_as(x))
            torch.autograd.graph.increment_version(x)  # as losses.py does
            return x

    return InplaceBackward.apply(values)


# ============================================================================ jagged_values

def test_jagged_values_is_a_differentiable_view():
    z = torch.randn(TOTAL, V, dtype=torch.float64)
    nt = _nested(z.clone()).requires_grad_(True)
    vals = jagged_values(nt)
    assert vals.shape == (TOTAL, V) and vals.data_ptr() == nt.values().data_ptr()
    w = torch.randn(TOTAL, V, dtype=torch.float64)
    (vals * w).sum().backward()
    assert nt.grad.is_nested and nt.grad.offsets() is nt.offsets()
    assert torch.equal(nt.grad.values(), w)
    with torch.no_grad():
        assert jagged_values(nt).data_ptr() == nt.values().data_ptr()


def test_inplace_backward_through_jagged_values_lands_in_the_users_storage():
    h = torch.randn(TOTAL, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(V, 6, dtype=torch.float64, requires_grad=True)
    packed = h @ w.t()  # an LM head's output, then wrapped as jagged (no copy)
    nt = _nested(packed)
    seen = []
    packed.register_hook(lambda g: seen.append(g.data_ptr()))
    _grad_mock(jagged_values(nt)).sum().backward()
    assert seen == [packed.data_ptr()]  # the gradient autograd passes on IS the user's storage
    torch.testing.assert_close(h.grad, torch.full((TOTAL, V), 3.0, dtype=torch.float64) @ w)


@pytest.mark.skipif(not TORCH_2_14, reason="documents torch 2.14's behaviour")
def test_torch_values_breaks_the_inplace_backward():
    """Why jagged_values exists: NestedGetValuesBackward0 saves the nested tensor, so the in-place
    backward's version bump trips autograd's saved-tensor check, whose error message then fails."""
    nt = _nested(torch.randn(TOTAL, V, dtype=torch.float64, requires_grad=True) * 1.0)
    with pytest.raises(NotImplementedError, match="_nested_tensor_size"):
        _grad_mock(nt.values()).sum().backward()


def test_inplace_kernel_backward_on_jagged_values():
    """The kernels' in-place backward (2-D packed values today) writes into the nested storage."""
    z, ids, lp, mask = _packed(1, torch.float32)
    leaf = z.clone().requires_grad_(True)
    packed = leaf * 1.0
    seen = []
    packed.register_hook(lambda g: seen.append(g.data_ptr()))
    nt = _nested(packed)
    td.topk_distill_loss(jagged_values(nt), ids, lp, mask=mask, loss="jsd",
                         inplace_backward=True).loss.backward()
    expected = z.clone().requires_grad_(True)
    td.topk_distill_loss(expected, ids, lp, mask=mask, loss="jsd").loss.backward()
    assert seen == [packed.data_ptr()]
    torch.testing.assert_close(leaf.grad, expected.grad)


# ============================================================================ unpack / repack

def test_unpack_jagged_returns_views_and_the_shared_offsets():
    z, ids, lp, mask = _packed()
    nt = _nested(z)
    b = unpack_jagged(nt, _nested(ids), _nested(lp), _nested(mask), _nested(ids[:, 0]))
    assert b.like is nt and b.offsets is nt.offsets()
    for got, want in [(b.logits, z), (b.teacher_ids, ids), (b.teacher_logprobs, lp),
                      (b.mask, mask), (b.labels, ids[:, 0])]:
        assert got.data_ptr() == want.data_ptr() and torch.equal(got, want)


def test_unpack_jagged_without_nested_arguments_is_the_identity():
    z, ids, lp, mask = _packed()
    b = unpack_jagged(z, ids, lp, mask)
    assert b.logits is z and b.teacher_ids is ids and b.mask is mask and b.like is None
    assert b.repack(z) is z


def test_unpack_jagged_accepts_plain_packed_teacher_with_jagged_logits():
    z, ids, lp, mask = _packed()
    b = unpack_jagged(_nested(z), ids, lp, mask)
    assert b.teacher_ids is ids and b.mask is mask and b.logits.shape == (TOTAL, V)


@pytest.mark.parametrize("lead", [(TOTAL,), (1, TOTAL)])
def test_unpack_jagged_with_packed_plain_logits_and_jagged_teacher(lead):
    z, ids, lp, mask = _packed()
    logits = z.view(*lead, V)
    b = unpack_jagged(logits, _nested(ids), _nested(lp), _nested(mask))
    assert b.like is None and b.logits is logits
    assert b.teacher_ids.shape == (*lead, K) and b.mask.shape == lead
    assert b.teacher_ids.data_ptr() == ids.data_ptr()
    out = reference.topk_distill_loss(logits, _nested(ids), _nested(lp), mask=_nested(mask),
                                      reduction="none")
    want = reference.topk_distill_loss(logits, ids.view(*lead, K), lp.view(*lead, K),
                                       mask=mask.view(lead), reduction="none")
    assert not out.loss.is_nested and torch.equal(out.loss, want.loss)


def test_unpack_jagged_rejects_padded_plain_logits_with_a_jagged_teacher():
    z, ids, lp, _ = _packed()
    with pytest.raises(ValueError, match="teacher_ids is a jagged nested tensor.*logits"):
        unpack_jagged(torch.zeros(4, 5, V), _nested(ids), _nested(lp))


def test_offsets_equal_by_value_are_accepted():
    z, ids, lp, mask = _packed()
    b = unpack_jagged(_nested(z), _nested(ids, OFFSETS.clone()), _nested(lp, OFFSETS.clone()),
                      _nested(mask, OFFSETS.clone()))
    assert b.offsets is b.like.offsets()


@pytest.mark.parametrize("arg", ["teacher_ids", "teacher_logprobs", "mask", "labels"])
@pytest.mark.parametrize("how", ["values", "count", "total"])
def test_mismatched_offsets_raise_value_error_naming_the_argument(arg, how):
    z, ids, lp, mask = _packed()
    tensors = dict(teacher_ids=ids, teacher_logprobs=lp, mask=mask, labels=ids[:, 0])
    t = tensors[arg]
    if how == "values":    # same B and total, different lengths
        bad = _nested(t, torch.tensor([0, 4, 8, 9, 13]))
    elif how == "count":   # different B
        bad = _nested(t, torch.tensor([0, 8, 9, 13]))
    else:                  # different total
        bad = _nested(t[:-1], torch.tensor([0, 3, 8, 9, 12]))
    args = {k: _nested(v) for k, v in tensors.items()}
    args[arg] = bad
    with pytest.raises(ValueError, match=f"^{arg} must have the offsets of logits"):
        unpack_jagged(_nested(z), args["teacher_ids"], args["teacher_logprobs"], args["mask"],
                      args["labels"])
    if how == "values":  # check_inputs=False: no sync, equal-shaped offsets are trusted
        unpack_jagged(_nested(z), args["teacher_ids"], args["teacher_logprobs"], args["mask"],
                      args["labels"], check_inputs=False)


def test_mismatched_offsets_through_the_reference():
    z, ids, lp, _ = _packed()
    with pytest.raises(ValueError, match="teacher_logprobs must have the offsets of logits"):
        reference.topk_distill_loss(_nested(z), _nested(ids),
                                    _nested(lp, torch.tensor([0, 2, 8, 9, 13])))


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
def test_strided_nested_tensor_is_a_type_error_saying_how_to_convert():
    z, ids, lp, _ = _packed()
    strided = torch.nested.nested_tensor([z[:3], z[3:8], z[8:9], z[9:]], layout=torch.strided)
    with pytest.raises(TypeError, match=r"logits .*layout=torch.strided.*"
                                        r"torch.nested.nested_tensor\(list\(logits.unbind"):
        reference.topk_distill_loss(strided, _nested(ids), _nested(lp))
    # the suggested conversion works
    converted = torch.nested.nested_tensor(list(strided.unbind()), layout=torch.jagged)
    reference.topk_distill_loss(converted, _nested(ids, converted.offsets()),
                                _nested(lp, converted.offsets()))


def test_other_jagged_kinds_are_type_errors():
    z, ids, lp, _ = _packed()
    transposed = _nested(z).transpose(1, 2)  # [B, V, j]: ragged dim 2
    with pytest.raises(TypeError, match="ragged dim is 2.*transpose"):
        unpack_jagged(transposed, _nested(ids), _nested(lp))
    holes = torch.nested.nested_tensor_from_jagged(z, OFFSETS, lengths=torch.tensor([2, 5, 1, 3]))
    with pytest.raises(TypeError, match="lengths.*contiguous"):
        unpack_jagged(holes, _nested(ids), _nested(lp))
    with pytest.raises(ValueError, match=r"\[B, j, V_r\]"):
        unpack_jagged(_nested(z[:, 0]), _nested(ids), _nested(lp))
    with pytest.raises(TypeError, match="extra cannot be a nested tensor"):
        _layout.call_on_packed(reference.topk_distill_loss, _nested(z), ids, lp,
                               extra=_nested(ids))


def test_repack_jagged_shares_offsets_and_flows_gradients():
    nt = _nested(torch.randn(TOTAL, V, dtype=torch.float64))
    per_token = torch.randn(TOTAL, dtype=torch.float64, requires_grad=True)
    out = repack_jagged(per_token, nt)
    assert out.is_nested and out.offsets() is nt.offsets() and out.shape[1] == nt.shape[1]
    assert out.values().data_ptr() == per_token.data_ptr()
    (out.values() * 2).sum().backward()
    assert torch.equal(per_token.grad, torch.full_like(per_token, 2.0))
    k_out = repack_jagged(torch.zeros(TOTAL, 3), nt)  # student top-k [total, k] -> [B, j, k]
    assert k_out.dim() == 3 and k_out.shape[2] == 3 and k_out.offsets() is nt.offsets()
    assert [t.shape for t in k_out.unbind()] == [(n, 3) for n in LENGTHS]
    with pytest.raises(ValueError, match="total=13"):
        repack_jagged(torch.zeros(TOTAL - 1), nt)
    with pytest.raises(TypeError):
        repack_jagged(per_token, torch.zeros(TOTAL, V))


# ====================================================================== the oracle on jagged input

REF_CONFIGS = [
    dict(loss="fkl"),
    dict(loss="jsd", support="tail", beta=0.3, temperature=1.7),
    dict(loss="rkl", support="renorm", log_prob_min_clamp=-5.0),
    dict(loss="tvd", t2_scale=True, temperature=0.7),
]


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("cfg", REF_CONFIGS, ids=lambda c: c["loss"])
def test_reference_on_jagged_equals_reference_on_packed_rows(cfg, reduction):
    z, ids, lp, mask = _packed(2)
    leaf_nt = _nested(z.clone()).requires_grad_(True)
    out = reference.topk_distill_loss(leaf_nt, _nested(ids), _nested(lp), mask=_nested(mask),
                                      reduction=reduction, **cfg)
    packed = z.clone().requires_grad_(True)
    want = reference.topk_distill_loss(packed, ids, lp, mask=mask, reduction=reduction, **cfg)

    # Per-token outputs (masses always, the loss with reduction="none") are jagged, same offsets.
    per_token = ["student_mass", "teacher_mass"] + (["loss"] if reduction == "none" else [])
    for name in out._fields:
        got, exp = getattr(out, name), getattr(want, name)
        if got is None:  # an output not requested (SPEC 9.6)
            assert exp is None, name
            continue
        if name in per_token:
            assert got.is_nested and got.offsets() is leaf_nt.offsets(), name
            assert [t.shape[0] for t in got.unbind()] == LENGTHS
            got = got.values()
        else:
            assert not got.is_nested
        torch.testing.assert_close(got, exp, rtol=0, atol=0, equal_nan=True, msg=name)

    weights = torch.linspace(0.5, 1.5, TOTAL, dtype=torch.float64)
    if reduction == "none":
        (out.loss.values() * weights).sum().backward()
        (want.loss * weights).sum().backward()
    else:
        out.loss.backward()
        want.loss.backward()
    assert leaf_nt.grad.is_nested and leaf_nt.grad.offsets() is leaf_nt.offsets()
    torch.testing.assert_close(leaf_nt.grad.values(), packed.grad, rtol=0, atol=0)


def test_reference_on_jagged_matches_per_sequence_calls():
    """The packed computation equals calling the oracle on each sequence alone."""
    z, ids, lp, _ = _packed(3)
    out = reference.topk_distill_loss(_nested(z), _nested(ids), _nested(lp), loss="skl",
                                      reduction="none")
    for i, (a, b) in enumerate(zip(OFFSETS[:-1].tolist(), OFFSETS[1:].tolist())):
        one = reference.topk_distill_loss(z[a:b], ids[a:b], lp[a:b], loss="skl",
                                          reduction="none")
        torch.testing.assert_close(out.loss.unbind()[i], one.loss)


# ============================================================================ torch.compile

def _jagged_inputs(seed=4):
    z, ids, lp, mask = _packed(seed, torch.float32)
    leaf = z.clone().requires_grad_(True)
    return leaf, _nested(leaf * 1.0), _nested(ids), _nested(lp), _nested(mask)


def _compiled(fn):
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, backend="aot_eager")


@pytest.mark.parametrize("impl", ["reference", "kernels"])
def test_compile_fullgraph_reduced_loss_on_jagged_input(impl):
    fn = reference.topk_distill_loss if impl == "reference" else td.topk_distill_loss

    def step(nt, ids, lp, mask):
        return _layout.call_on_packed(fn, nt, ids, lp, mask=mask, loss="jsd",
                                      check_inputs=False).loss

    leaf, *args = _jagged_inputs()
    got = _compiled(step)(*args)
    got.backward()
    leaf2, *args2 = _jagged_inputs()
    want = step(*args2)
    want.backward()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(leaf.grad, leaf2.grad)


def test_compile_per_token_outputs_repacked_outside_the_graph():
    """The workaround for the failure below: compile on the packed values, repack eagerly."""
    def step(nt, ids, lp, mask):
        b = unpack_jagged(nt, ids, lp, mask, check_inputs=False)
        return td.topk_distill_loss(b.logits, b.teacher_ids, b.teacher_logprobs, mask=b.mask,
                                    reduction="none", check_inputs=False).loss

    leaf, nt, *rest = _jagged_inputs()
    rows = repack_jagged(_compiled(step)(nt, *rest), nt)
    assert rows.is_nested and rows.offsets() is nt.offsets()
    rows.values().sum().backward()
    leaf2, nt2, *rest2 = _jagged_inputs()
    step(nt2, *rest2).sum().backward()
    torch.testing.assert_close(leaf.grad, leaf2.grad)


@pytest.mark.skipif(not TORCH_2_14, reason="documents torch 2.14's behaviour")
def test_compile_cannot_return_a_2d_jagged_tensor_that_requires_grad():
    """torch 2.14.1 limitation: AOTAutograd regenerates an output [B, j] aliasing an intermediate
    with view(), which the jagged view rejects for fewer than 3 dims. [B, j, k] outputs work."""
    leaf, nt, *_ = _jagged_inputs()
    with pytest.raises(RuntimeError, match=r"view\(\): cannot view shape"):
        _compiled(lambda x: repack_jagged(jagged_values(x).sum(-1), x))(nt)
    out = _compiled(lambda x: repack_jagged(jagged_values(x)[:, :2], x))(nt)
    assert out.shape[2] == 2
    with torch.no_grad():  # without autograd the [B, j] output is fine
        assert _compiled(lambda x: repack_jagged(jagged_values(x).sum(-1), x))(nt).is_nested


@pytest.mark.skipif(not TORCH_2_14, reason="documents torch 2.14's behaviour")
@pytest.mark.filterwarnings("ignore:Error detected in")
def test_compile_inplace_backward_with_a_jagged_graph_input():
    """torch 2.14.1 limitation: a mutable custom op (backward_) on the values of a jagged graph
    INPUT fails to functionalize; a jagged tensor built inside the compiled function works."""
    z, ids, lp, mask = _packed(5, torch.float32)

    def inside(packed):
        nt = _nested(packed * 1.0)
        return td.topk_distill_loss(jagged_values(nt), ids, lp, mask=mask, check_inputs=False,
                                    inplace_backward=True).loss

    leaf = z.clone().requires_grad_(True)
    _compiled(inside)(leaf).backward()
    expected = z.clone().requires_grad_(True)
    td.topk_distill_loss(expected, ids, lp, mask=mask).loss.backward()
    torch.testing.assert_close(leaf.grad, expected.grad)

    nt_input = _nested(z.clone().requires_grad_(True) * 1.0)
    step = _compiled(lambda nt: td.topk_distill_loss(jagged_values(nt), ids, lp, mask=mask,
                                                     check_inputs=False,
                                                     inplace_backward=True).loss)
    with pytest.raises(Exception, match="FakeTensorMode should not be set when dispatching "
                                        "auto_functionalized_v2"):
        step(nt_input).backward()


# ============================================================================ tensor parallelism

def _tp_worker(rank, world_size, z, ids, lp, mask, bounds):
    lo, hi = bounds[rank]
    shard = _nested(z[:, lo:hi].clone()).requires_grad_(True)
    out = reference.topk_distill_loss(shard, _nested(ids), _nested(lp), mask=_nested(mask),
                                      loss="jsd", support="tail", reduction="none",
                                      tp_group=torch.distributed.group.WORLD)
    (out.loss.values() * torch.arange(1.0, TOTAL + 1, dtype=torch.float64)).sum().backward()
    assert out.loss.offsets() is shard.offsets() and out.student_mass.is_nested
    return out.loss.values().detach(), out.student_mass.values(), shard.grad.values()


def test_reference_on_jagged_under_tensor_parallelism():
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("needs torch.distributed with gloo")
    from _dist_utils import run_distributed
    z, ids, lp, mask = _packed(6)
    bounds = [(0, 5), (5, V)]  # uneven vocab shards
    results = run_distributed(_tp_worker, 2, args=(z, ids, lp, mask, bounds), deadline_s=180)
    full = z.clone().requires_grad_(True)
    want = reference.topk_distill_loss(full, ids, lp, mask=mask, loss="jsd", support="tail",
                                       reduction="none")
    (want.loss * torch.arange(1.0, TOTAL + 1, dtype=torch.float64)).sum().backward()
    for (loss, smass, grad), (lo, hi) in zip(results, bounds):
        torch.testing.assert_close(loss, want.loss)
        torch.testing.assert_close(smass, want.student_mass)
        torch.testing.assert_close(grad, full.grad[:, lo:hi])
