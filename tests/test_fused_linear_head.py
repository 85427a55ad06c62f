"""The LM head's output transform in fused_linear_topk_distill_loss: ``logit_scale`` (Cohere) and
``final_logit_softcapping`` (Gemma, ``cap * tanh(z / cap)`` after the scale), against the float64
oracle ``reference.fused_linear_topk_distill_loss`` (autograd through the materialised head):
loss, masses, label_logprobs / entropy and the gradients of hidden, weight and bias, on the CPU
kernels, the emulated CUDA kernels and under TP (gloo, uneven shards)."""
import itertools

import pytest
import torch

import topk_distill as td
from topk_distill import ops, reference

from _dist_utils import run_distributed
from _inputs import LOSSES, SUPPORTS, assert_close

HOST_DEVICES = ["cpu", "cuda_emu"]
HEADS = [dict(logit_scale=0.7), dict(final_logit_softcapping=3.0),
         dict(logit_scale=1.8, final_logit_softcapping=2.5)]
GRAD_OUT = 1.3


def make_batch(n=13, h=16, v=50, k=6, seed=0):
    """Logits large enough that a softcap of 2.5-3 bends them (|raw| up to ~6)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64) * (3.0 / h ** 0.5)
    bias = torch.randn(v, generator=g, dtype=torch.float64) * 0.5
    t_logp = torch.log_softmax(0.5 * (hidden @ weight.T) + torch.randn(n, v, generator=g,
                                                                          dtype=torch.float64), -1)
    ids = t_logp.topk(k, dim=-1).indices
    ids[1, -1] = -1
    ids[2, 1] = ids[2, 0]
    ids[3, :] = -1
    lp = torch.where(ids >= 0, t_logp.gather(-1, ids.clamp_min(0)), 0.0)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[4] = -100
    return hidden, weight, bias, ids, lp, labels


def run(fn, hidden, weight, bias, ids, lp, labels=None, per_row=False, **kw):
    """(loss, student_mass, teacher_mass[, label_logprobs, entropy], grads of hidden, weight,
    bias); with per_row the per-row outputs also receive an upstream gradient."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (hidden, weight, bias)]
    out = fn(leaves[0], leaves[1], ids, lp, bias=leaves[2], labels=labels,
             return_entropy=per_row, **kw)
    total = out.loss * GRAD_OUT
    vals = [out.loss.detach(), out.student_mass, out.teacher_mass]
    if per_row:
        w = torch.linspace(-1.0, 1.0, hidden.shape[0], dtype=out.entropy.dtype)
        total = total + (out.label_logprobs * w).sum() + (out.entropy * w.flip(0)).sum()
        vals += [out.label_logprobs.detach(), out.entropy.detach()]
    return (*vals, *torch.autograd.grad(total, leaves))


def check(got, exp, dtype, what):
    assert len(got) == len(exp)
    for i, (a, b) in enumerate(zip(got, exp)):
        assert_close(a, b, torch.float32 if i in (1, 2) else dtype, f"{what} output {i}")


CASES = list(itertools.product(LOSSES, SUPPORTS))


@pytest.mark.parametrize("loss,support", CASES)
@pytest.mark.parametrize("device", HOST_DEVICES)
def test_scale_and_softcap_match_the_oracle(loss, support, device):
    i = CASES.index((loss, support))
    head = HEADS[i % len(HEADS)]
    kw = dict(loss=loss, support=support, temperature=[1.0, 1.7][i % 2],
              chunk_size=[1, 5, None][i % 3], reduction=["mean", "sum"][(i // 2) % 2],
              mask=torch.arange(13) != 7, **head)
    batch = make_batch(seed=i)
    exp = run(reference.fused_linear_topk_distill_loss, *batch[:5], **kw)
    got = run(td.fused_linear_topk_distill_loss, *batch[:5], **kw)
    check(got, exp, torch.float64, f"{loss}/{support} {head}")
    # The transform changes the student: the oracle is not the untransformed head.
    plain = run(reference.fused_linear_topk_distill_loss, *batch[:5],
                **{k: v for k, v in kw.items() if k not in head})
    assert not torch.allclose(plain[1], exp[1])  # student_mass


@pytest.mark.parametrize("head", HEADS, ids=str)
@pytest.mark.parametrize("device", HOST_DEVICES)
def test_per_row_outputs_recompute_through_the_head(head, device):
    """label_logprobs and entropy receive gradients: the backward recomputes the chunk's logits
    through the same scale / softcap."""
    batch = make_batch(seed=3)
    kw = dict(loss="jsd", support="tail", beta=0.3, temperature=0.8, chunk_size=4, **head)
    exp = run(reference.fused_linear_topk_distill_loss, *batch, per_row=True, **kw)
    got = run(td.fused_linear_topk_distill_loss, *batch, per_row=True, **kw)
    check(got, exp, torch.float64, str(head))


def test_fp32_and_no_grad_inputs():
    """fp32 against the fp32 kernels on materialised logits; a frozen weight / no-grad hidden."""
    hidden, weight, bias, ids, lp, _ = make_batch(seed=5)
    h32, w32, b32, lp32 = hidden.float(), weight.float(), bias.float(), lp.float()
    kw = dict(loss="fkl", support="tail", logit_scale=1.5, final_logit_softcapping=4.0,
              chunk_size=6)
    unfused = lambda h, w, i, l, *, bias, labels, return_entropy, **k: td.topk_distill_loss(
        reference.lm_head_logits(h, w, bias, logit_scale=k.pop("logit_scale"),
                                 final_logit_softcapping=k.pop("final_logit_softcapping")),
        i, l, labels=labels, return_entropy=return_entropy,
        **{a: b for a, b in k.items() if a != "chunk_size"})
    check(run(td.fused_linear_topk_distill_loss, h32, w32, b32, ids, lp32, **kw),
          run(unfused, h32, w32, b32, ids, lp32, **kw), torch.float32, "fp32")
    w = w32.clone().requires_grad_(True)
    with torch.no_grad():
        out = td.fused_linear_topk_distill_loss(h32, w, ids, lp32, bias=b32, **kw)
    assert_close(out.loss, run(unfused, h32, w32, b32, ids, lp32, **kw)[0], torch.float32, "no_grad")


def test_bad_head_arguments_name_themselves():
    hidden, weight, bias, ids, lp, _ = make_batch()
    for kw, err, word in [(dict(logit_scale=float("nan")), ValueError, "logit_scale"),
                          (dict(logit_scale="2"), TypeError, "logit_scale"),
                          (dict(final_logit_softcapping=0.0), ValueError, "final_logit_softcapping"),
                          (dict(final_logit_softcapping=-3.0), ValueError, "final_logit_softcapping"),
                          (dict(final_logit_softcapping=True), TypeError, "final_logit_softcapping")]:
        with pytest.raises(err, match=word):
            td.fused_linear_topk_distill_loss(hidden, weight, ids, lp, **kw)
        with pytest.raises(err, match=word):
            td.FusedLinearTopKDistillLoss(**kw)


def test_softcap_halves_the_automatic_chunk():
    """The softcap's derivative buffer takes the other half of the chunk's byte budget."""
    from topk_distill import fused_linear
    calls = []
    orig = fused_linear.auto_chunk_size
    try:
        fused_linear.auto_chunk_size = lambda n, v, *a: calls.append(v) or orig(n, v, *a)
        hidden, weight, bias, ids, lp, _ = make_batch()
        td.fused_linear_topk_distill_loss(hidden, weight, ids, lp)
        td.fused_linear_topk_distill_loss(hidden, weight, ids, lp, final_logit_softcapping=5.0)
    finally:
        fused_linear.auto_chunk_size = orig
    assert calls == [50, 100]


TP_WIDTHS = (21, 29)
TP_CASES = [dict(loss="fkl", support="tail", chunk_size=4, final_logit_softcapping=2.5),
            dict(loss="jsd", support="renorm", beta=0.5, chunk_size=5, logit_scale=1.6,
                 final_logit_softcapping=3.0, temperature=1.4)]


def _tp_worker(rank, world_size, cases, backend):
    import torch.distributed as dist
    ops.set_backend(backend)
    hidden, weight, bias, ids, lp, _ = make_batch(11, 12, sum(TP_WIDTHS), 5, seed=10)
    lo = sum(TP_WIDTHS[:rank])
    w, b = weight[lo:lo + TP_WIDTHS[rank]], bias[lo:lo + TP_WIDTHS[rank]]
    return [run(td.fused_linear_topk_distill_loss, hidden, w, b, ids, lp,
                tp_group=dist.group.WORLD, **kw) for kw in cases]


@pytest.mark.parametrize("backend", ["native", "emulated_cuda"])
def test_tensor_parallel_softcap_matches_the_oracle(backend):
    per_rank = run_distributed(_tp_worker, world_size=2, args=(TP_CASES, backend), deadline_s=180)
    batch = make_batch(11, 12, sum(TP_WIDTHS), 5, seed=10)
    for i, kw in enumerate(TP_CASES):
        exp = run(reference.fused_linear_topk_distill_loss, *batch[:5], **kw)
        r0, r1 = per_rank[0][i], per_rank[1][i]
        for r in (r0, r1):
            check(r[:3], exp[:3], torch.float64, f"TP {kw}")
        assert_close(r0[3] + r1[3], exp[3], torch.float64, f"TP {kw} grad_hidden (sum)")
        assert_close(torch.cat([r0[4], r1[4]]), exp[4], torch.float64, f"TP {kw} grad_weight")
        assert_close(torch.cat([r0[5], r1[5]]), exp[5], torch.float64, f"TP {kw} grad_bias")
