"""SPEC 10.2 (support="sampled") and 10.3 (support="generalized") through the kernels: the CPU
kernels and the CUDA kernels under the emulator against the float64 oracle - values and
gradients - for every loss, with clamp, temperature, t2_scale, mask, an explicit sampling
distribution and the weight clip, every logits dtype; in mixtures beside the other supports;
missing label teacher log-probs; the errors of SPEC 7; layouts (views, jagged, in-place),
reduction="none", torch.compile, the fused LM head and tensor parallelism (uneven splits).
And RS-KD (SPEC 10.2's last item): its expected gradient over the draws, by exact enumeration,
is the full forward-KL gradient."""
import itertools
import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

import topk_distill as td  # noqa: E402
from topk_distill import ops, reference  # noqa: E402
from _dist_utils import run_distributed  # noqa: E402
from _inputs import DEVICES, LOSSES, assert_close, assert_close_rowwise, teacher_batch, tdev  # noqa: E402
from _v2 import F32, F64, compare, run  # noqa: E402

ref = reference.topk_distill_loss
BF16 = torch.bfloat16
PARAMS = dict(beta=0.3, rkl_ratio=0.25, skew=0.2)
N, V, K = 12, 40, 5


def sampled_inputs(device="cpu", logits_dtype=F64, seed=0, n=N, v=V, k=K):
    """teacher_batch's special rows, plus per row a label y, log p_y and log mu_y: most labels
    outside the teacher's ids, row 6 a teacher id, row 7 ignored (-1), row 8 at column 0."""
    z, ids, lp = teacher_batch(n, v, k, seed=seed, logits_dtype=logits_dtype, device=device)
    g = torch.Generator().manual_seed(seed + 100)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[6] = ids[6, 0].item()
    labels[7] = -1
    labels[8] = 0
    l_y = -torch.rand(n, generator=g, dtype=F64) * 6 - 0.05
    log_mu = -torch.rand(n, generator=g, dtype=F64) * 5 - 0.1
    d = tdev(device)
    return z, ids, lp, labels.to(d), l_y.to(d), log_mu.to(d)


CONFIGS = [dict(), dict(temperature=1.6, t2_scale=True), dict(log_prob_min_clamp=-3.0),
           dict(mu=True), dict(mu=True, sample_weight_clip=0.8, temperature=0.7),
           dict(mask=True, log_prob_min_clamp=-2.0, sample_weight_clip=3.0)]


def _kwargs(cfg, labels, l_y, log_mu, device):
    kw = {k: v for k, v in cfg.items() if k not in ("mu", "mask")}
    kw.update(labels=labels, label_teacher_logprobs=l_y)
    if cfg.get("mu"):
        kw["label_sample_logprobs"] = log_mu
    if cfg.get("mask"):
        m = torch.ones(N, dtype=torch.bool)
        m[[2, 9]] = False
        kw["mask"] = m.to(tdev(device))
    return kw


@pytest.mark.parametrize("cfg", range(len(CONFIGS)))
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("device", DEVICES)
def test_sampled_matches_the_oracle(device, loss, cfg):
    for dtype in (F64, F32, BF16):
        z, ids, lp, labels, l_y, log_mu = sampled_inputs(device, dtype, seed=cfg)
        kw = dict(_kwargs(CONFIGS[cfg], labels, l_y, log_mu, device), loss=loss,
                  support="sampled", reduction="none", **PARAMS)
        got = run(td.topk_distill_loss, z, ids, lp, **kw)
        exp = run(ref, z.double(), ids, lp, **kw)
        compare(got, exp, dtype, f"{device} {loss} {CONFIGS[cfg]} {dtype}")


@pytest.mark.parametrize("cfg", [0, 1, 2, 5])
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("device", DEVICES)
def test_generalized_matches_the_oracle(device, loss, cfg):
    for dtype in (F64, F32, BF16):
        z, ids, lp, labels, l_y, log_mu = sampled_inputs(device, dtype, seed=cfg)
        kw = _kwargs(CONFIGS[cfg], labels, l_y, log_mu, device)
        for name in ("label_teacher_logprobs", "label_sample_logprobs", "sample_weight_clip"):
            kw.pop(name, None)
        kw.update(loss=loss, support="generalized", reduction="none", **PARAMS)
        got = run(td.topk_distill_loss, z, ids, lp, **kw)
        exp = run(ref, z.double(), ids, lp, **kw)
        compare(got, exp, dtype, f"{device} {loss} {CONFIGS[cfg]} {dtype}")


MIXTURE = [td.Term("fkl", "topk", 0.5), td.Term("rkl", "sampled", 0.3),
           td.Term("jsd", "generalized", 0.2, beta=0.3), td.Term("tvd", "renorm", 0.1),
           td.Term("jsd", "sampled", 0.7, beta=0.6), td.Term("srkl", "tail", 0.05, skew=0.3)]


@pytest.mark.parametrize("device", DEVICES)
def test_sampled_and_generalized_in_a_mixture(device):
    for dtype, reduction in ((F64, "none"), (F32, "mean"), (BF16, "sum")):
        z, ids, lp, labels, l_y, log_mu = sampled_inputs(device, dtype, seed=4)
        kw = dict(loss=MIXTURE, labels=labels, label_teacher_logprobs=l_y,
                  label_sample_logprobs=log_mu, sample_weight_clip=2.0, temperature=1.3,
                  log_prob_min_clamp=-6.0, reduction=reduction, return_entropy=True)
        got = run(td.topk_distill_loss, z, ids, lp, **kw)
        compare(got, run(ref, z.double(), ids, lp, **kw), dtype, f"{device} {dtype}")


@pytest.mark.parametrize("device", DEVICES)
def test_sampled_gradient_is_the_weighted_label_direction(device):
    """Independent of the oracle: with one row whose label is outside the teacher's ids, the
    loss's gradient minus the teacher entries' part is g_y (e_y - q) / T, g_y = w q_y f'(q_y)."""
    z, ids, lp, labels, l_y, log_mu = sampled_inputs(device, F64, seed=2)
    T = 1.5
    kw = dict(loss="fkl", temperature=T, reduction="sum", labels=labels,
              label_teacher_logprobs=l_y, label_sample_logprobs=log_mu)
    x = z.clone().requires_grad_(True)
    td.topk_distill_loss(x, ids, lp, support="sampled", **kw).loss.backward()
    x2 = z.clone().requires_grad_(True)
    td.topk_distill_loss(x2, ids, lp, support="generalized", loss="fkl", temperature=T,
                         reduction="sum").loss.backward()
    logq = torch.log_softmax(z / T, -1)
    q = logq.exp()
    row = 0
    y = int(labels[row])
    assert y not in ids[row].tolist()
    s_y, lpy = logq[row, y].item(), l_y[row].item()
    w = math.exp(-log_mu[row].item())
    g_y = w * -math.exp(lpy)  # d/ds [p (log p - s)] = -p
    # generalized fkl = topk fkl + sum_k (q_k - p_k): its gradient adds sum_k q_k (e_k - q)/T
    qk = q[row, ids[row]]
    gen_extra = (torch.zeros(V, dtype=F64).index_add_(0, ids[row], qk) - qk.sum() * q[row]) / T
    expected = x2.grad[row] - gen_extra + g_y * ((torch.arange(V) == y).double() - q[row]) / T
    torch.testing.assert_close(x.grad[row], expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_missing_label_teacher_logprobs(device):
    z, ids, lp, labels, l_y, log_mu = sampled_inputs(device, F32, seed=5)
    l_y = l_y.clone()
    l_y[0] = float("nan")
    base = dict(labels=labels, label_teacher_logprobs=l_y, support="sampled", loss="rkl",
                reduction="none")
    with pytest.raises(ValueError, match="label_teacher_logprobs has a NaN"):
        td.topk_distill_loss(z, ids, lp, **base)
    for extra in (dict(check_inputs=False), dict(missing_teacher="drop"),
                  dict(missing_teacher="floor", log_prob_min_clamp=-4.0)):
        kw = dict(base, **extra)
        got = run(td.topk_distill_loss, z, ids, lp, **kw)
        compare(got, run(ref, z.double(), ids, lp, **kw), F32, f"{device} {extra}")
        if extra.get("check_inputs") is False:
            assert torch.isnan(got.out.loss[0]) and not torch.isnan(got.out.loss[1:]).any()


@pytest.mark.parametrize("device", DEVICES)
def test_label_out_of_range_without_checks_is_a_nan_row(device):
    z, ids, lp, labels, l_y, log_mu = sampled_inputs(device, F32, seed=6)
    labels = labels.clone()
    labels[1] = V + 3
    kw = dict(labels=labels, label_teacher_logprobs=l_y, support="sampled", reduction="none")
    with pytest.raises(ValueError, match="labels"):
        td.topk_distill_loss(z, ids, lp, **kw)
    got = run(td.topk_distill_loss, z, ids, lp, check_inputs=False, **kw)
    compare(got, run(ref, z.double(), ids, lp, check_inputs=False, **kw), F32, device)
    assert torch.isnan(got.out.loss[1]) and torch.isnan(got.grad[1]).all()
    assert torch.isfinite(got.out.loss[2:]).all()


ERRORS = [
    (dict(labels=None), ValueError, "needs labels"),
    (dict(label_teacher_logprobs=None), ValueError, "needs label_teacher_logprobs"),
    (dict(label_teacher_logprobs="short"), ValueError, "label_teacher_logprobs must have"),
    (dict(label_sample_logprobs="short"), ValueError, "label_sample_logprobs must have"),
    (dict(label_teacher_logprobs="int"), TypeError, "label_teacher_logprobs must have dtype"),
    (dict(label_teacher_logprobs="positive"), ValueError, "label_teacher_logprobs has an entry > 0"),
    (dict(label_sample_logprobs="positive"), ValueError, "label_sample_logprobs has an entry > 0"),
    (dict(label_sample_logprobs="nan"), ValueError, "label_sample_logprobs has a NaN"),
    (dict(sample_weight_clip=0.0), ValueError, "sample_weight_clip must be"),
    (dict(sample_weight_clip=-2), ValueError, "sample_weight_clip must be"),
    (dict(support="topk"), ValueError, 'label_teacher_logprobs is only used by support="sampled"'),
    (dict(support="tail", label_teacher_logprobs=None, sample_weight_clip=2.0), ValueError,
     "sample_weight_clip is only used"),
]


def _bad_kwargs(change, labels, l_y, ids):
    kw = dict(support="sampled", labels=labels, label_teacher_logprobs=l_y)
    read = next(r for r in range(N) if labels[r] >= 0 and labels[r] not in ids[r].tolist())
    for name, value in change.items():
        if value == "short":
            value = l_y[:3]
        elif value == "int":
            value = torch.zeros_like(labels)
        elif value == "positive":
            value = l_y.clone()
            value[read] = 0.5
        elif value == "nan":
            value = l_y.clone()
            value[3] = float("nan")
        kw[name] = value
    return kw


@pytest.mark.parametrize("change,exc,msg", ERRORS, ids=[str(i) for i in range(len(ERRORS))])
def test_errors_name_the_argument_in_every_entry_point(change, exc, msg):
    z, ids, lp, labels, l_y, log_mu = sampled_inputs("cpu", F32)
    kw = _bad_kwargs(change, labels, l_y, ids)
    with pytest.raises(exc, match=msg):
        td.topk_distill_loss(z, ids, lp, **kw)
    with pytest.raises(exc, match=msg):
        ref(z, ids, lp, **kw)
    hidden = torch.randn(N, 8)
    weight = torch.randn(V, 8)
    with pytest.raises(exc, match=msg):
        td.fused_linear_topk_distill_loss(hidden, weight, ids, lp, **kw)
    module_kw = {k: kw.pop(k) for k in ("support", "sample_weight_clip") if k in kw}
    with pytest.raises(exc, match=msg):
        td.TopKDistillLoss(**module_kw)(z, ids, lp, **kw)


def test_the_ops_refuse_a_sampled_term_without_its_inputs():
    """Direct torch.ops calls (the Python API checks first): a clear error, not a crash."""
    z, ids, lp, labels, l_y, log_mu = sampled_inputs("cpu", F32)
    for emulated in (False, True):
        with ops.use_backend("emulated_cuda" if emulated else "native"):
            stats = ops.shard_pass(z, ids, 0, 1.0, labels)
            with pytest.raises(ValueError, match="label_teacher_logprobs"):
                ops.epilogue(*stats[:3], ids, lp, None, V, [("fkl", "sampled", 1.0, .5, .1, .1)],
                             None, 1.0, labels)
            with pytest.raises(ValueError, match="labels"):
                ops.epilogue(*ops.shard_pass(z, ids, 0, 1.0)[:3], ids, lp, None, V,
                             [("fkl", "sampled", 1.0, .5, .1, .1)], None, 1.0, None, False, l_y)


# ----------------------------------------------------------------------------- layouts, compile

@pytest.mark.parametrize("device", DEVICES)
def test_views_inplace_and_jagged_layouts(device):
    B, T_, d = 3, 5, tdev(device)
    g = torch.Generator().manual_seed(8)
    full = torch.randn(B, T_ + 1, V, generator=g).to(d)
    ids = torch.randint(0, V, (B, T_, K), generator=g).to(d)
    lp = torch.log_softmax(torch.randn(B, T_, K, generator=g), -1).to(d) - 0.5
    labels = torch.randint(0, V, (B, T_), generator=g).to(d)
    l_y = (-torch.rand(B, T_, generator=g) * 4).to(d)
    mu = (-torch.rand(B, T_, generator=g) * 3).to(d)
    kw = dict(loss="jsd", support="sampled", labels=labels, label_teacher_logprobs=l_y,
              label_sample_logprobs=mu, reduction="none")
    # logits[:, :-1]: a view, no copy; the gradient equals the contiguous call's
    view = full[:, :-1]
    got = run(td.topk_distill_loss, view, ids, lp, **kw)
    exp = run(ref, view.double(), ids, lp, **kw)
    compare(got, exp, F32, f"{device} view")
    # inplace_backward through the view of an intermediate (the LM head's output): the
    # gradient that reaches the leaf is the out-of-place one
    grads = []
    for inplace in (False, True):
        leaf = full.clone().requires_grad_(True)
        inter = leaf * 1.0
        out = td.topk_distill_loss(inter[:, :-1], ids, lp, inplace_backward=inplace,
                                   **dict(kw, reduction="sum"))
        (g_leaf,) = torch.autograd.grad(out.loss, leaf)
        grads.append(g_leaf)
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)
    x64 = view.double().clone().requires_grad_(True)
    (g_ref,) = torch.autograd.grad(ref(x64, ids, lp, **dict(kw, reduction="sum")).loss, x64)
    assert_close_rowwise(grads[0][:, :-1].reshape(-1, V), g_ref.reshape(-1, V), F32,
                         "inplace grad")
    assert (grads[0][:, -1] == 0).all()
    # jagged: every per-token argument jagged with the logits' offsets
    lengths = [5, 2, 4]
    offsets = torch.tensor([0, 5, 7, 11], device=d)
    nt = lambda t: torch.nested.nested_tensor_from_jagged(t, offsets)  # noqa: E731
    zs = torch.randn(11, V, generator=g).to(d).requires_grad_(True)
    packed = dict(ids=torch.randint(0, V, (11, K), generator=g).to(d),
                  lp=(torch.log_softmax(torch.randn(11, K, generator=g), -1) - 0.3).to(d),
                  labels=torch.randint(0, V, (11,), generator=g).to(d),
                  l_y=(-torch.rand(11, generator=g) * 3).to(d),
                  mu=(-torch.rand(11, generator=g) * 3).to(d))
    jag = td.topk_distill_loss(nt(zs), nt(packed["ids"]), nt(packed["lp"]), loss="rkl",
                               support="sampled", labels=nt(packed["labels"]),
                               label_teacher_logprobs=nt(packed["l_y"]),
                               label_sample_logprobs=nt(packed["mu"]), reduction="none")
    assert jag.loss.is_nested and list(jag.loss.offsets().tolist()) == offsets.tolist()
    flat = ref(zs.double(), packed["ids"], packed["lp"], loss="rkl", support="sampled",
               labels=packed["labels"], label_teacher_logprobs=packed["l_y"],
               label_sample_logprobs=packed["mu"], reduction="none")
    assert_close(jag.loss.values(), flat.loss, F32, "jagged loss")
    assert sum(lengths) == 11


def test_torch_compile_fullgraph():
    z, ids, lp, labels, l_y, log_mu = sampled_inputs("cpu", F32, seed=9)
    kw = dict(loss=[td.Term("rkl", "sampled", 1.0), td.Term("fkl", "generalized", 0.5)],
              labels=labels, label_teacher_logprobs=l_y, label_sample_logprobs=log_mu,
              sample_weight_clip=4.0, check_inputs=False, reduction="none")

    def f(x):
        return td.topk_distill_loss(x, ids, lp, **kw).loss

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    x1 = z.clone().requires_grad_(True)
    x2 = z.clone().requires_grad_(True)
    a, b = compiled(x1), f(x2)
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    (g1,) = torch.autograd.grad(a.sum(), x1)
    (g2,) = torch.autograd.grad(b.sum(), x2)
    torch.testing.assert_close(g1, g2, rtol=0, atol=0, equal_nan=True)


# ----------------------------------------------------------------------------- fused LM head

@pytest.mark.parametrize("device", DEVICES)
def test_fused_linear_head(device):
    d = tdev(device)
    g = torch.Generator().manual_seed(11)
    hidden = torch.randn(N, 16, generator=g, dtype=F64).to(d)
    weight = (torch.randn(V, 16, generator=g, dtype=F64) * 0.5).to(d)
    _, ids, lp, labels, l_y, log_mu = sampled_inputs(device, F64, seed=11)
    kw = dict(loss=[td.Term("jsd", "sampled", 1.0, beta=0.4), td.Term("fkl", "topk", 0.3)],
              labels=labels, label_teacher_logprobs=l_y, label_sample_logprobs=log_mu,
              sample_weight_clip=1.5, temperature=1.2, reduction="sum")
    for chunk in (5, None):
        h1, w1 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        out = td.fused_linear_topk_distill_loss(h1, w1, ids, lp, chunk_size=chunk, **kw)
        (out.loss + (out.label_logprobs * 0.3).sum()).backward()
        h2, w2 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        o2 = ref(h2 @ w2.T, ids, lp, **kw)
        (o2.loss + (o2.label_logprobs * 0.3).sum()).backward()
        assert_close(out.loss, o2.loss, F64, "fused loss")
        assert_close(h1.grad, h2.grad, F64, "fused grad hidden")
        assert_close(w1.grad, w2.grad, F64, "fused grad weight")


# ----------------------------------------------------------------------------- tensor parallel

SPLITS = [(13, 20, 7), (38, 1, 1), (1, 1, 38)]  # uneven; one-column shards


def _tp_worker(rank, world, backend):
    import torch.distributed as dist
    if backend == "emulated_cuda":
        ops.set_backend("emulated_cuda")
    results = {}
    for si, widths in enumerate(SPLITS):
        lo = sum(widths[:rank])
        for dtype in (F64, F32):
            z, ids, lp, labels, l_y, log_mu = sampled_inputs("cpu", dtype, seed=si)
            for ci, kw in enumerate(_tp_configs(labels, l_y, log_mu)):
                x = z[:, lo:lo + widths[rank]].clone().requires_grad_(True)
                out = td.topk_distill_loss(x, ids, lp, tp_group=dist.group.WORLD,
                                           vocab_start=lo, **kw)
                total = (out.loss * torch.linspace(-1, 1.5, N, dtype=out.loss.dtype)).sum()
                total = total + (out.label_logprobs * 0.7).sum()
                (g,) = torch.autograd.grad(total, x)
                results[(si, str(dtype), ci)] = (out.loss.detach(), out.label_logprobs.detach(),
                                                 g)
    return results


def _tp_configs(labels, l_y, log_mu):
    base = dict(labels=labels, label_teacher_logprobs=l_y, reduction="none")
    return [dict(base, loss="rkl", support="sampled"),
            dict(base, loss=MIXTURE, label_sample_logprobs=log_mu, sample_weight_clip=2.0,
                 temperature=1.3, log_prob_min_clamp=-5.0),
            dict(loss="skl", support="generalized", labels=labels, reduction="none", skew=0.3)]


@pytest.mark.parametrize("backend", ["native", "emulated_cuda"])
def test_tensor_parallel_uneven_splits_match_the_unsharded_call(backend):
    results = run_distributed(_tp_worker, 3, args=(backend,), timeout_s=300.0)
    for si, widths in enumerate(SPLITS):
        for dtype in (F64, F32):
            z, ids, lp, labels, l_y, log_mu = sampled_inputs("cpu", dtype, seed=si)
            for ci, kw in enumerate(_tp_configs(labels, l_y, log_mu)):
                x = z.double().clone().requires_grad_(True)
                out = ref(x, ids, lp, **kw)
                total = (out.loss * torch.linspace(-1, 1.5, N, dtype=F64)).sum()
                total = total + (out.label_logprobs * 0.7).sum()
                (g,) = torch.autograd.grad(total, x)
                for rank in range(3):
                    lo = sum(widths[:rank])
                    loss, lab, grad = results[rank][(si, str(dtype), ci)]
                    what = f"{backend} split {widths} rank {rank} {dtype} config {ci}"
                    assert_close(loss, out.loss, dtype, what)
                    assert_close(lab, out.label_logprobs, dtype, what)
                    assert_close_rowwise(grad, g[:, lo:lo + widths[rank]], dtype, what + " grad")


# ----------------------------------------------------------------------------- RS-KD

def _rs_kd_gradient(z, ids, lp, **kw):
    x = z.clone().requires_grad_(True)
    td.topk_distill_loss(x, ids, lp, loss="fkl", support="topk", reduction="sum",
                         **kw).loss.backward()
    return x.grad


@pytest.mark.parametrize("form", ["counts", "draws"])
@pytest.mark.parametrize("T", [1.0, 1.7])
def test_rs_kd_expected_gradient_is_the_full_forward_kl_gradient(form, T):
    """RS-KD (Anshumann et al. 2025): n ids drawn from the teacher's p; distinct id u drawn c_u
    times enters as log(c_u / n) ("counts"), or every draw as its own entry of log(1/n)
    ("draws", duplicates accumulate). Over every possible sequence of draws, weighted by its
    probability, the mean gradient of loss="fkl", support="topk" is exactly the gradient of the
    full-vocabulary KL(p || q) - and a plain top-n teacher's is not."""
    v, n_draws = 5, 3
    g = torch.Generator().manual_seed(3)
    z = torch.randn(1, v, generator=g, dtype=F64)
    logp = torch.log_softmax(torch.randn(1, v, generator=g, dtype=F64) * 1.5, -1)[0]
    mean_grad = torch.zeros(1, v, dtype=F64)
    total_prob = 0.0
    for seq in itertools.product(range(v), repeat=n_draws):
        prob = math.exp(sum(logp[u].item() for u in seq))
        total_prob += prob
        if form == "draws":
            ids = torch.tensor([list(seq)])
            lp = torch.full((1, n_draws), -math.log(n_draws), dtype=F64)
        else:
            distinct = sorted(set(seq))
            ids = torch.tensor([distinct + [-1] * (n_draws - len(distinct))])
            lp = torch.tensor([[math.log(seq.count(u) / n_draws) for u in distinct]
                               + [0.0] * (n_draws - len(distinct))], dtype=F64)
        mean_grad += prob * _rs_kd_gradient(z, ids, lp, temperature=T)
    assert total_prob == pytest.approx(1.0, abs=1e-12)
    x = z.clone().requires_grad_(True)
    logq = torch.log_softmax(x / T, -1)[0]
    (logp.exp() * (logp - logq)).sum().backward()
    torch.testing.assert_close(mean_grad, x.grad, rtol=1e-10, atol=1e-12)
    # The check can fail: the deterministic top-3 teacher (renormalised or not) is biased.
    top = logp.topk(n_draws)
    biased = _rs_kd_gradient(z, top.indices.unsqueeze(0), top.values.unsqueeze(0), temperature=T)
    assert (biased - x.grad).abs().max() > 1e-3
