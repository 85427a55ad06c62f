"""SPEC 9.1 through the kernels (issue 14): logits views that fold into two leading strides
(``logits[:, :-1]``, ``[1, total, V]``, transposed leading dims, a narrowed vocab slice with a
row stride) and one that needs a copy (a 4-D view) give the contiguous call's values and
gradients; ``inplace_backward=True`` writes the gradient into the user's storage and nowhere
else; overlapping rows (``expand``) with ``inplace_backward=True`` are a ValueError; jagged nested
tensors equal the packed call; the forward allocates nothing of size [N, V] for the sliced and
jagged cases (CPU profiler)."""
import math

import pytest
import torch

import topk_distill as td
from topk_distill import _layout

from _inputs import DEVICES, tdev, teacher_batch
from _v2 import F32, F64, assert_same, equal_nan, run, upstream

V, K = 37, 5
SENTINEL_BITS = 0x7FC0BEEF  # a NaN payload no arithmetic produces (int32 view of fp32)


# ----------------------------------------------------------------------------- strided views

# name: (shape of the user's tensor, the view taken of it, zero-copy?)
LAYOUTS = {
    "x[:, :-1] of [B, T, V]": ((3, 6, V), lambda b: b[:, :-1], True),
    "[1, total, V]": ((1, 14, V), lambda b: b, True),
    "[1, total, V] inside a wider row": ((1, 14, V + 6), lambda b: b[:, :, 2:2 + V], True),
    "x.transpose(0, 1)": ((3, 5, V), lambda b: b.transpose(0, 1), True),
    "narrow()ed vocab, row stride": ((11, V + 9), lambda b: b.narrow(1, 4, V), True),
    "[B, T, V] sliced both ways": ((3, 6, V + 5), lambda b: b[:, 1:, 3:3 + V], True),
    "4-D view that needs a copy": ((2, 4, 3, V + 2), lambda b: b[:, :-1, :-1, 1:1 + V], False),
}


def _user_tensor(shape, view_of, seed, dtype, device):
    """(leaf, big, x, values): ``big`` = leaf * 1 (a non-leaf, as an LM head's output) of
    ``shape``, NaN sentinels everywhere outside ``x = view_of(big)``, which holds ``values``."""
    base = torch.empty(shape, dtype=F32).view(torch.int32).fill_(SENTINEL_BITS).view(F32)
    base = base.to(dtype) if dtype == F32 else torch.full(shape, math.nan, dtype=dtype)
    marks = torch.zeros(shape, dtype=torch.bool)
    view_of(marks).fill_(True)
    lead_v = tuple(view_of(marks).shape)
    n = math.prod(lead_v[:-1])
    z, ids, lp = teacher_batch(n, V, K, seed=seed)
    values = z.to(dtype).view(lead_v)
    view_of(base).copy_(values)
    leaf = base.to(tdev(device)).requires_grad_(True)
    big = leaf * 1.0
    x = view_of(big)
    lead = lead_v[:-1]
    return leaf, big, x, values.to(tdev(device)), ids.view(*lead, K).to(tdev(device)), \
        lp.view(*lead, K).to(tdev(device)), marks.to(tdev(device))


def _extras(lead, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = math.prod(lead)
    mask = (torch.arange(n) % 4 != 2).view(lead)
    labels = torch.randint(-1, V, (n,), generator=g).view(lead)
    return mask.to(tdev(device)), labels.to(tdev(device))


def _bits_outside(big, marks):
    """The fp32 bit patterns of ``big`` outside the view (``marks``), on the host."""
    assert big.dtype == F32
    return big.detach().cpu().view(torch.int32)[~marks.cpu()].clone()


@pytest.mark.parametrize("dtype", [F32, torch.bfloat16])
@pytest.mark.parametrize("name", list(LAYOUTS))
@pytest.mark.parametrize("device", DEVICES)
def test_views_equal_the_contiguous_call(name, dtype, device):
    shape, view_of, zero_copy = LAYOUTS[name]
    leaf, big, x, values, ids, lp, marks = _user_tensor(shape, view_of, 1, dtype, device)
    mask, labels = _extras(ids.shape[:-1], device)
    assert (_layout.fold_rows(x) is not None) == zero_copy, name  # the case is what it says
    kw = dict(loss=[("jsd", "tail", 0.7), ("fkl", "topk", 0.3)], mask=mask, labels=labels,
              return_entropy=True, student_topk=4, temperature=1.3, reduction="none")
    want = run(td.topk_distill_loss, values.contiguous(), ids, lp, **kw)
    got = run(td.topk_distill_loss, None, ids, lp, leaf=x, **kw)
    assert_same(got, want, name)
    for reduction in ("mean", "sum"):
        a = run(td.topk_distill_loss, None, ids, lp, leaf=x, **{**kw, "reduction": reduction})
        b = run(td.topk_distill_loss, values.contiguous(), ids, lp,
                **{**kw, "reduction": reduction})
        assert_same(a, b, f"{name} {reduction}")


@pytest.mark.parametrize("name", list(LAYOUTS))
@pytest.mark.parametrize("device", DEVICES)
def test_inplace_backward_writes_into_the_users_storage_and_nowhere_else(name, device):
    shape, view_of, zero_copy = LAYOUTS[name]
    leaf, big, x, values, ids, lp, marks = _user_tensor(shape, view_of, 2, F32, device)
    mask, labels = _extras(ids.shape[:-1], device, seed=1)
    kw = dict(loss="tvd", support="tail", mask=mask, labels=labels, return_entropy=True,
              reduction="none")
    want = run(td.topk_distill_loss, values.contiguous(), ids, lp, **kw)
    before = _bits_outside(big, marks)
    seen = []  # the gradient autograd hands on from our node
    x.register_hook(lambda g: seen.append((g.data_ptr(), g.clone())))
    storage = x.data_ptr()
    version = x._version
    out = td.topk_distill_loss(x, ids, lp, inplace_backward=True, **kw)
    total = sum((t * upstream(t, salt)).sum() for salt, t in
                enumerate((out.loss, out.label_logprobs, out.entropy)))
    total.backward()
    assert len(seen) == 1 and equal_nan(seen[0][1], want.grad), name
    if zero_copy:  # the gradient lives in the view's own storage
        assert x._version > version, name  # autograd sees the in-place write
        assert seen[0][0] == storage, name
        assert equal_nan(x.detach(), want.grad), name
    else:  # written into the copy: the user's logits are untouched
        assert equal_nan(x.detach(), values), name
    # Nothing outside the view was written; the leaf's gradient is the view's, 0 elsewhere.
    assert torch.equal(_bits_outside(big, marks), before), f"{name}: wrote outside the view"
    assert (leaf.grad[~marks] == 0).all()
    assert equal_nan(view_of(leaf.grad), want.grad), name


@pytest.mark.parametrize("device", DEVICES)
def test_overlapping_rows_with_inplace_backward_are_a_value_error(device):
    z, ids, lp = teacher_batch(6, V, K, seed=3, device=device)
    # Views of intermediates (a view of a leaf that requires grad is refused for another reason).
    base = z[:1].float().clone().requires_grad_(True) * 1
    base3 = z[:2].float().view(2, 1, V).clone().requires_grad_(True) * 1
    storage = z.float().flatten().clone().requires_grad_(True) * 1
    cases = {
        "expand, stride 0": lambda: base.expand(6, V),
        "expand of [B, 1, V]": lambda: base3.expand(2, 3, V),
        "row stride < V": lambda: torch.as_strided(storage, (6, V), (V // 2, 1)),
    }
    for name, make in cases.items():
        x = make()
        ids_, lp_ = ids.view(*x.shape[:-1], K), lp.view(*x.shape[:-1], K)
        with pytest.raises(ValueError, match="^inplace_backward=True: the rows of logits overlap"):
            td.topk_distill_loss(x, ids_, lp_, inplace_backward=True)
        # Out of place they are valid inputs (read-only), equal to the materialised call.
        got = run(td.topk_distill_loss, None, ids_, lp_, leaf=x, labels=ids_[..., 0],
                  return_entropy=True, reduction="none")
        want = run(td.topk_distill_loss, x.detach().contiguous(), ids_, lp_,
                   labels=ids_[..., 0], return_entropy=True, reduction="none")
        assert_same(got, want, name)


# ----------------------------------------------------------------------------- jagged

OFFSETS = [0, 3, 8, 9, 13]
TOTAL = 13


def _nested(t, offsets):
    return torch.nested.nested_tensor_from_jagged(t, offsets)


def _jagged_batch(device, seed=4, dtype=F32):
    z, ids, lp = teacher_batch(TOTAL, V, K, seed=seed, device=device)
    d = tdev(device)
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(-1, V, (TOTAL,), generator=g).to(d)
    mask = (torch.arange(TOTAL) % 5 != 3).to(d)
    return z.to(dtype), ids, lp, mask, labels, torch.tensor(OFFSETS, device=d)


def _jagged_call(leaf, ids, lp, mask, labels, offsets, labels_form="jagged", **kw):
    """topk_distill_loss on jagged logits (leaf * 1), teacher tensors and mask; labels jagged
    too, or already packed as [total] (accepted beside jagged logits, _layout.unpack_jagged)."""
    nt = _nested(leaf * 1.0, offsets)
    labels = _nested(labels, offsets) if labels_form == "jagged" else labels
    return td.topk_distill_loss(nt, _nested(ids, offsets), _nested(lp, offsets),
                                mask=_nested(mask, offsets), labels=labels, **kw), nt


@pytest.mark.parametrize("labels_form", ["jagged", "packed"])
@pytest.mark.parametrize("device", DEVICES)
def test_jagged_equals_the_packed_call(device, labels_form):
    z, ids, lp, mask, labels, offsets = _jagged_batch(device)
    kw = dict(loss=[("rkl", "renorm", 0.4), ("tvd", "tail", 0.6)], return_entropy=True,
              student_topk=3, temperature=1.2, log_prob_min_clamp=-20.0)
    want = run(td.topk_distill_loss, z, ids, lp, mask=mask, labels=labels, reduction="none", **kw)
    leaf = z.clone().requires_grad_(True)
    out, nt = _jagged_call(leaf, ids, lp, mask, labels, offsets, labels_form,
                           reduction="none", **kw)
    for name in out._fields:  # every per-token output is jagged with the logits' offsets
        t = getattr(out, name)
        assert t.is_nested and t.layout == torch.jagged, name
        assert t.offsets() is nt.offsets(), name
        assert equal_nan(t.values().detach(), getattr(want.out, name)), name
    assert out.student_topk_ids.values().shape == (TOTAL, 3)
    assert [u.shape[0] for u in out.loss.unbind()] == [3, 5, 1, 4]
    total = sum((t.values() * upstream(t.values(), salt)).sum() for salt, t in
                enumerate((out.loss, out.label_logprobs, out.entropy)))
    total.backward()
    assert equal_nan(leaf.grad, want.grad)
    # Reduced losses stay plain tensors; a nested leaf gets a nested gradient.
    for reduction in ("mean", "sum"):
        a = run(td.topk_distill_loss, z, ids, lp, mask=mask, labels=labels, reduction=reduction,
                grad_of=("loss",), **kw)
        leaf = z.clone().requires_grad_(True)
        out, _ = _jagged_call(leaf, ids, lp, mask, labels, offsets, labels_form,
                              reduction=reduction, **kw)
        assert not out.loss.is_nested and out.loss.dim() == 0
        assert equal_nan(out.loss.detach(), a.out.loss), reduction
        (out.loss * upstream(out.loss, 0)).backward()
        assert equal_nan(leaf.grad, a.grad), reduction
    ntl = _nested(z.clone(), offsets).requires_grad_(True)
    out = td.topk_distill_loss(ntl, _nested(ids, offsets), _nested(lp, offsets), reduction="sum")
    out.loss.backward()
    x = z.clone().requires_grad_(True)
    td.topk_distill_loss(x, ids, lp, reduction="sum").loss.backward()
    assert ntl.grad.is_nested and ntl.grad.offsets() is ntl.offsets()
    assert equal_nan(ntl.grad.values(), x.grad)


@pytest.mark.parametrize("device", DEVICES)
def test_jagged_teacher_with_packed_logits_and_inplace_backward(device):
    z, ids, lp, mask, labels, offsets = _jagged_batch(device, seed=5)
    want = run(td.topk_distill_loss, z, ids, lp, mask=mask, labels=labels, reduction="none",
               return_entropy=True)
    for lead in ((TOTAL,), (1, TOTAL)):  # verl's "rmpad" layout
        x = z.clone().view(*lead, V).requires_grad_(True)
        out = td.topk_distill_loss(x, _nested(ids, offsets), _nested(lp, offsets),
                                   mask=_nested(mask, offsets), labels=labels.view(lead),
                                   reduction="none", return_entropy=True)
        assert not out.loss.is_nested and out.loss.shape == lead
        assert equal_nan(out.loss.detach().view(TOTAL), want.out.loss)
        assert equal_nan(out.label_logprobs.detach().view(TOTAL), want.out.label_logprobs)
    # inplace_backward through a jagged logits: the gradient lands in the packed storage.
    leaf = z.clone().requires_grad_(True)
    packed = leaf * 1.0
    seen = []
    packed.register_hook(lambda g: seen.append(g.data_ptr()))
    nt = _nested(packed, offsets)
    out = td.topk_distill_loss(nt, _nested(ids, offsets), _nested(lp, offsets),
                               mask=_nested(mask, offsets), labels=labels,
                               reduction="none", return_entropy=True, inplace_backward=True)
    total = sum((t.values() * upstream(t.values(), salt)).sum() for salt, t in
                enumerate((out.loss, out.label_logprobs, out.entropy)))
    total.backward()
    assert seen == [packed.data_ptr()]
    assert equal_nan(leaf.grad, want.grad)


@pytest.mark.parametrize("arg", ["teacher_ids", "teacher_logprobs", "mask", "labels"])
@pytest.mark.parametrize("device", DEVICES)
def test_mismatched_offsets_are_a_value_error_naming_the_argument(arg, device):
    z, ids, lp, mask, labels, offsets = _jagged_batch(device, seed=6)
    d = offsets.device
    others = {"values": torch.tensor([0, 2, 8, 9, 13], device=d),  # same count and total
              "count": torch.tensor([0, 3, 8, 13], device=d),
              "total": torch.tensor([0, 3, 8, 9, 12], device=d)}
    for how, bad in others.items():
        args = dict(teacher_ids=ids, teacher_logprobs=lp, mask=mask, labels=labels)
        nested = {k: _nested(v if k != arg or how != "total" else v[:12],
                             bad if k == arg else offsets) for k, v in args.items()}
        if arg != "labels":  # (jagged labels: their own case)
            nested["labels"] = labels
        with pytest.raises(ValueError, match=f"^{arg} must have the offsets of logits"):
            td.topk_distill_loss(_nested(z, offsets), nested["teacher_ids"],
                                 nested["teacher_logprobs"], mask=nested["mask"],
                                 labels=nested["labels"])


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
@pytest.mark.parametrize("device", DEVICES)
def test_strided_nested_tensors_are_a_type_error_saying_how_to_convert(device):
    z, ids, lp, mask, labels, offsets = _jagged_batch(device, seed=7)
    cut = OFFSETS
    parts = lambda t: [t[a:b] for a, b in zip(cut[:-1], cut[1:])]  # noqa: E731
    strided = torch.nested.nested_tensor(parts(z), layout=torch.strided)
    with pytest.raises(TypeError, match=r"^logits is a nested tensor with layout=torch.strided.*"
                                        r"torch.nested.nested_tensor\(list\(logits.unbind"):
        td.topk_distill_loss(strided, _nested(ids, offsets), _nested(lp, offsets))
    strided_ids = torch.nested.nested_tensor(parts(ids), layout=torch.strided)
    with pytest.raises(TypeError, match=r"^teacher_ids is a nested tensor with layout=torch.strided"):
        td.topk_distill_loss(_nested(z, offsets), strided_ids, _nested(lp, offsets))
    # the suggested conversion works
    converted = torch.nested.nested_tensor(list(strided.unbind()), layout=torch.jagged)
    out = td.topk_distill_loss(converted, _nested(ids, converted.offsets()),
                               _nested(lp, converted.offsets()))
    assert torch.isfinite(out.loss)


# ----------------------------------------------------------------------------- allocations

def _big_allocations(fn, nbytes):
    """Names of the events of fn()'s CPU profile that allocated >= nbytes / 2 at once."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    del out
    return [e.name for e in prof.events() if e.cpu_memory_usage and e.cpu_memory_usage >= nbytes // 2]


@pytest.mark.parametrize("device", [d for d in DEVICES if d != "cuda"])  # host memory
def test_forward_allocates_nothing_of_size_n_by_v_for_sliced_and_jagged_logits(device):
    v = 4096
    z, ids, lp = teacher_batch(4 * 32, v, 8, seed=8, special_rows=False)
    kw = dict(labels=ids[:, 0], return_entropy=True, student_topk=8, check_inputs=False,
              loss=[("fkl", "topk", 0.5), ("jsd", "tail", 0.5)])
    user = z.float().view(4, 32, v).requires_grad_(True)  # [B, T, V]
    x = user[:, :-1]  # the response positions: 4 * 31 rows
    n_bytes = x.numel() * 4
    ids3, lp3 = ids.view(4, 32, 8)[:, :-1], lp.view(4, 32, 8)[:, :-1]
    lab = kw["labels"].view(4, 32)[:, :-1]
    sliced = lambda: td.topk_distill_loss(x, ids3, lp3, **{**kw, "labels": lab})  # noqa: E731
    assert _big_allocations(sliced, n_bytes) == []
    # A view that needs three strides IS copied: the measurement sees an [N, V] allocation (so
    # it would catch a copy of the sliced case).
    four = z.float().view(4, 4, 8, v)[:, :-1, :-1]
    four_ids, four_lp = ids.view(4, 4, 8, 8)[:, :-1, :-1], lp.view(4, 4, 8, 8)[:, :-1, :-1]
    copying = lambda: td.topk_distill_loss(four, four_ids, four_lp)  # noqa: E731
    assert _big_allocations(copying, four.numel() * 4) != []
    # Jagged logits: computed on the packed values, no copy either.
    offsets = torch.tensor([0, 50, 51, 100, 128])
    leaf = z.float().clone().requires_grad_(True)
    nt = _nested(leaf * 1.0, offsets)
    jagged = lambda: td.topk_distill_loss(  # noqa: E731
        nt, _nested(ids, offsets), _nested(lp, offsets), labels=ids[:, 0],
        return_entropy=True, student_topk=8, check_inputs=False, reduction="none")
    assert _big_allocations(jagged, leaf.numel() * 4) == []
