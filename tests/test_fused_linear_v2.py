"""SPEC 9.2-9.5 through ``fused_linear_topk_distill_loss``: labels, return_entropy,
student_topk, missing_teacher and term lists against ``topk_distill_loss`` on
``hidden @ weight.T + bias`` (and, in fp64, the float64 oracle) - values, every output, and the
gradients of hidden / weight / bias, including those that come from label_logprobs and entropy
(formed in the fused backward by recomputing each chunk's logits)."""
import itertools
import math

import pytest
import torch

import topk_distill as td
from topk_distill import reference

from _inputs import DEVICES, assert_close, tdev
from _v2 import DIFFERENTIABLE, F32, F64, detach_all, upstream

ref = reference.topk_distill_loss
N, H, V, K = 10, 12, 41, 5
NAN = math.nan


def make_batch(device, seed=0, dtype=F64):
    """hidden [N, H], weight [V, H], bias [V]; a teacher top-k correlated with the student with a
    padding entry, a duplicate and an all-padding row; labels (two ignored); a mask; and the
    teacher log-probs with some entries missing (NaN) for missing_teacher."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g, dtype=F64)
    weight = torch.randn(V, H, generator=g, dtype=F64) * (1.5 / H ** 0.5)
    bias = torch.randn(V, generator=g, dtype=F64) * 0.5
    z = hidden @ weight.T + bias
    t_logp = torch.log_softmax(0.6 * z + torch.randn(N, V, generator=g, dtype=F64), -1)
    ids = t_logp.topk(K, dim=-1).indices
    ids[0, 0], ids[0, -1] = 0, V - 1
    ids[1, -1] = -1
    ids[2, 1] = ids[2, 0]
    ids[3, :] = -1
    lp = torch.where(ids >= 0, t_logp.gather(-1, ids.clamp_min(0)), 0.0)
    lp_nan = lp.clone()
    lp_nan[4, 1] = lp_nan[6, 0] = lp_nan[2, 1] = NAN
    lp_nan[7, :] = NAN
    labels = torch.randint(0, V, (N,), generator=g)
    labels[1], labels[5] = -1, -100
    mask = torch.ones(N, dtype=torch.bool)
    mask[8] = False
    d = tdev(device)
    return dict(hidden=hidden.to(d, dtype), weight=weight.to(d, dtype), bias=bias.to(d, dtype),
                ids=ids.to(d), lp=lp.to(d), lp_nan=lp_nan.to(d), labels=labels.to(d),
                mask=mask.to(d))


def _grads(out, leaves, grad_of):
    total = None
    for salt, name in enumerate(DIFFERENTIABLE):
        t = getattr(out, name)
        if name in grad_of and t is not None:
            term = (t * upstream(t, salt)).sum()
            total = term if total is None else total + term
    return torch.autograd.grad(total, leaves, allow_unused=True)


def run_fused(b, lp, grad_of, **kw):
    leaves = [b[k].detach().clone().requires_grad_(True) for k in ("hidden", "weight", "bias")]
    out = td.fused_linear_topk_distill_loss(leaves[0], leaves[1], b["ids"], lp, bias=leaves[2],
                                            **kw)
    return detach_all(out), _grads(out, leaves, grad_of)


def run_unfused(fn, b, lp, grad_of, dtype=None, **kw):
    kw = {k: v for k, v in kw.items() if k != "chunk_size"}
    leaves = [b[k].detach().clone().requires_grad_(True) for k in ("hidden", "weight", "bias")]
    if dtype is not None:
        leaves = [t.detach().to(dtype).requires_grad_(True) for t in leaves]
    out = fn(leaves[0] @ leaves[1].T + leaves[2], b["ids"], lp, **kw)
    return detach_all(out), _grads(out, leaves, grad_of)


def check(got, exp, dtype, what):
    (a_out, a_grads), (b_out, b_grads) = got, exp
    for name in a_out._fields:
        a, b = getattr(a_out, name), getattr(b_out, name)
        assert (a is None) == (b is None), f"{what}: {name}"
        if a is None:
            continue
        if name in ("student_topk_ids", "overlap_count"):
            assert torch.equal(a.cpu(), b.cpu()), f"{what}: {name}"
        else:
            dt = dtype if name in ("loss", "label_logprobs", "entropy") else F32
            assert_close(a, b, dt, f"{what} {name}")
    for name, a, b in zip(("grad_hidden", "grad_weight", "grad_bias"), a_grads, b_grads):
        assert a is not None and b is not None, f"{what}: {name} missing"
        assert a.dtype == dtype, f"{what}: {name} dtype"
        assert_close(a, b, dtype, f"{what} {name}")


CONFIGS = {
    "mixture+labels+entropy+topk": dict(loss=[("fkl", "topk", 0.9), ("rkl", "renorm", 0.1)],
                                        labels=True, return_entropy=True, student_topk=4,
                                        temperature=1.3, mask=True, reduction="mean"),
    "drop": dict(loss="jsd", support="tail", beta=0.3, labels=True, return_entropy=True,
                 missing_teacher="drop", reduction="sum", student_topk=6),
    "floor": dict(loss=[("rkl", "topk", 0.5), ("tvd", "tail", 0.5)], labels=True,
                  return_entropy=True, missing_teacher="floor", log_prob_min_clamp=-5.0,
                  student_topk=V, mask=True, t2_scale=True, temperature=0.8),
}
GRADS = [("loss",), ("label_logprobs",), ("entropy",), ("label_logprobs", "entropy"),
         ("loss", "label_logprobs", "entropy")]


def _kw(b, name, chunk_size):
    cfg = dict(CONFIGS[name])
    if cfg.pop("labels", False):
        cfg["labels"] = b["labels"]
    if cfg.pop("mask", False):
        cfg["mask"] = b["mask"]
    lp = b["lp_nan"] if cfg.get("missing_teacher", "error") != "error" else b["lp"]
    return lp, dict(cfg, chunk_size=chunk_size)


@pytest.mark.parametrize("chunk_size", [3, None])
@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("device", DEVICES)
def test_fused_matches_unfused_and_the_oracle(name, chunk_size, device):
    for dt in ([F64, F32] if device != "cuda" else [F32]):
        b = make_batch(device, seed=list(CONFIGS).index(name), dtype=dt)
        lp, kw = _kw(b, name, chunk_size)
        for grad_of in GRADS:
            what = f"{name} chunk={chunk_size} {dt} grad_of={grad_of}"
            got = run_fused(b, lp, grad_of, **kw)
            check(got, run_unfused(td.topk_distill_loss, b, lp, grad_of, **kw), dt, what)
            if dt == F64:
                check(got, run_unfused(ref, b, lp, grad_of, **kw), dt, what + " vs oracle")
            if "loss" not in grad_of:  # only the per-token outputs feed the backward
                assert torch.isfinite(got[1][0]).all(), what


@pytest.mark.parametrize("device", DEVICES)
def test_module_form_with_the_new_keywords(device):
    b = make_batch(device, seed=9, dtype=F32)
    crit = td.FusedLinearTopKDistillLoss(loss=[("fkl", "topk", 0.9), ("rkl", "renorm", 0.1)],
                                         return_entropy=True, student_topk=3, chunk_size=4,
                                         missing_teacher="drop")
    out = crit(b["hidden"], b["weight"], b["ids"], b["lp_nan"], bias=b["bias"], mask=b["mask"],
               labels=b["labels"])
    want = td.fused_linear_topk_distill_loss(
        b["hidden"], b["weight"], b["ids"], b["lp_nan"], bias=b["bias"], mask=b["mask"],
        labels=b["labels"], loss=[("fkl", "topk", 0.9), ("rkl", "renorm", 0.1)],
        return_entropy=True, student_topk=3, chunk_size=4, missing_teacher="drop")
    for name in out._fields:
        assert torch.equal(getattr(out, name), getattr(want, name)), name
    unfused = td.topk_distill_loss(b["hidden"] @ b["weight"].T + b["bias"], b["ids"], b["lp_nan"],
                                   mask=b["mask"], labels=b["labels"], return_entropy=True,
                                   student_topk=3, missing_teacher="drop",
                                   loss=[("fkl", "topk", 0.9), ("rkl", "renorm", 0.1)])
    assert_close(out.loss, unfused.loss, F32, "module loss")
    assert torch.equal(out.student_topk_ids, unfused.student_topk_ids)
