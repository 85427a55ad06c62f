"""Kernel-vs-oracle helpers for the SPEC section 9 tests: every ``TopKDistillOutput`` field and
the gradient of a weighted sum of the differentiable outputs (loss, label_logprobs, entropy).

    got = run(td.topk_distill_loss, x, ids, lp, labels=y, return_entropy=True, ...)
    exp = run(reference.topk_distill_loss, x.double(), ids, lp, labels=y, return_entropy=True, ...)
    compare(got, exp, x.dtype, "what")
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence

import torch

from topk_distill import TopKDistillOutput

from _inputs import assert_close, assert_close_rowwise

F32, F64 = torch.float32, torch.float64
DIFFERENTIABLE = ("loss", "label_logprobs", "entropy")
INT_FIELDS = ("student_topk_ids", "overlap_count")
VALUE_FIELDS = ("loss", "label_logprobs", "entropy")  # compute dtype (fp64 for fp64 logits)


class Result(NamedTuple):
    out: TopKDistillOutput  # every tensor detached
    grad: Optional[torch.Tensor]  # of sum_o <upstream_o, out.o> over ``grad_of``


def upstream(t: torch.Tensor, salt: int) -> torch.Tensor:
    """A deterministic, nonzero upstream gradient for output ``t`` (different per output)."""
    if t.dim() == 0:
        return torch.tensor(1.3 + 0.4 * salt, dtype=t.dtype, device=t.device)
    n = t.numel()
    w = torch.linspace(-0.9, 1.6, n, dtype=F64) + 0.05 * salt
    w = torch.where(w.abs() < 0.05, torch.full_like(w, 0.3), w)  # never 0
    w = w.roll(salt)
    return w.reshape(t.shape).to(dtype=t.dtype, device=t.device)


def detach_all(out: TopKDistillOutput) -> TopKDistillOutput:
    return TopKDistillOutput(*(None if t is None else t.detach() for t in out))


def run(fn, z, ids, lp, *, grad_of: Sequence[str] = DIFFERENTIABLE, leaf=None, **kw) -> Result:
    """``fn(x, ids, lp, **kw)`` on a fresh leaf copy ``x`` of ``z``; the gradient w.r.t. x of
    ``sum_o (upstream_o * out.o).sum()`` over the requested (present) outputs ``grad_of``."""
    x = z.detach().clone().requires_grad_(True) if leaf is None else leaf
    out = fn(x, ids, lp, **kw)
    total = None
    for salt, name in enumerate(DIFFERENTIABLE):
        t = getattr(out, name)
        if name not in grad_of or t is None:
            continue
        term = (t * upstream(t, salt)).sum()
        total = term if total is None else total + term
    grad = None
    if total is not None:
        (grad,) = torch.autograd.grad(total, x)
    return Result(detach_all(out), grad)


def value_dtype(logits_dtype):
    return F64 if logits_dtype == F64 else F32


def compare(got: Result, exp: Result, logits_dtype, what="", *, rowwise_grad=True):
    """Every field of ``got`` (the kernels on logits of ``logits_dtype``) against ``exp`` (the
    float64 oracle on the same rounded values): same presence, shapes; ids and counts equal;
    floats within _inputs.tolerances of their dtype; the gradient too (row-wise scaled)."""
    for name in TopKDistillOutput._fields:
        a, b = getattr(got.out, name), getattr(exp.out, name)
        assert (a is None) == (b is None), f"{what}: {name} present in one result only"
        if a is None:
            continue
        assert a.shape == b.shape, f"{what}: {name} shape {tuple(a.shape)} vs {tuple(b.shape)}"
        if name in INT_FIELDS:
            assert a.dtype == torch.int64, f"{what}: {name} dtype {a.dtype}"
            assert torch.equal(a.cpu(), b.cpu()), f"{what}: {name} differs:\n{a}\nvs\n{b}"
            continue
        want_dtype = value_dtype(logits_dtype) if name in VALUE_FIELDS else F32
        assert a.dtype == want_dtype, f"{what}: {name} dtype {a.dtype}, expected {want_dtype}"
        assert_close(a, b, want_dtype, f"{what} {name}")
    assert (got.grad is None) == (exp.grad is None), f"{what}: gradient present in one only"
    if got.grad is not None:
        assert got.grad.dtype == logits_dtype, f"{what}: grad dtype {got.grad.dtype}"
        check = assert_close_rowwise if rowwise_grad else assert_close
        check(got.grad, exp.grad, logits_dtype, f"{what} grad")


def equal_nan(x: torch.Tensor, y: torch.Tensor) -> bool:
    """torch.equal with NaN == NaN (same dtype and shape required)."""
    if x.dtype != y.dtype or x.shape != y.shape:
        return False
    if not x.is_floating_point():
        return torch.equal(x, y)
    nx, ny = x.isnan(), y.isnan()
    return torch.equal(nx, ny) and torch.equal(torch.where(nx, 0, x), torch.where(ny, 0, y))


def assert_same(a: Result, b: Result, what=""):
    """Bitwise equality of two results (every field and the gradient; NaN == NaN)."""
    for name in TopKDistillOutput._fields:
        x, y = getattr(a.out, name), getattr(b.out, name)
        assert (x is None) == (y is None), f"{what}: {name} present in one result only"
        if x is not None:
            assert equal_nan(x, y), f"{what}: {name} differs:\n{x}\nvs\n{y}"
    assert (a.grad is None) == (b.grad is None), f"{what}: gradient present in one only"
    if a.grad is not None:
        assert equal_nan(a.grad, b.grad), f"{what}: grad differs"


def expected_overlap(z, ids, l, top_ids, mask, clamp, T):
    """Per-entry loop (SPEC 9.4, DECISIONS 23): the entries that count (valid id, row not
    masked) whose id is among the student's top-k, and the mean of -exp(l')(l' - s') over them
    (0 * (-inf) = 0)."""
    logq = torch.log_softmax(z.double() / T, -1)
    counts, advs = [], []
    for r in range(z.shape[0]):
        terms = []
        for i, lk in zip(ids[r].tolist(), l[r].tolist()):
            if not mask[r] or i < 0 or i not in top_ids[r].tolist():
                continue
            s = logq[r, i].item()
            lc, sc = (lk, s) if clamp is None else (max(lk, clamp), max(s, clamp))
            terms.append(0.0 if lc == -math.inf else -math.exp(lc) * (lc - sc))
        counts.append(len(terms))
        advs.append(sum(terms) / len(terms) if terms else 0.0)
    return torch.tensor(counts), torch.tensor(advs, dtype=F64)
