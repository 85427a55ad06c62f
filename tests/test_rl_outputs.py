"""SPEC 9.2 / 9.3 through the kernels (issue 15): label log-probs, entropy and loss mixtures of
``td.topk_distill_loss`` against the float64 oracle (``reference.topk_distill_loss`` on the same
rounded inputs) - every output alone and a weighted sum of all of them backpropagated together,
masks, ignored and out-of-range labels, temperature, dtypes, gradcheck, check_inputs=False,
torch.compile; every loss x support inside a mixture, one-term lists, zero weights, errors."""
import itertools
import math

import pytest
import torch

import topk_distill as td
from topk_distill import Term, reference

from _inputs import DEVICES, LOSSES, SUPPORTS, assert_close, tdev, teacher_batch
from _v2 import F32, F64, assert_same, compare, equal_nan, run, upstream

ref = reference.topk_distill_loss
N, V, K = 12, 97, 9
MASKED = [3, 8, 10]  # row 3: all padding; row 8: a label far out of range; row 10: NaN logits
IGNORED = [1, 7]  # labels < 0


def rl_batch(device="cpu", seed=0, n=N, v=V, k=K):
    """teacher_batch's special rows, then labels (ignored ones, columns 0 and V-1, and an
    out-of-range label in a masked row, which is never looked at) and a mask whose masked
    rows include one with NaN / inf logits (masked logits never enter the arithmetic)."""
    z, ids, lp = teacher_batch(n, v, k, seed=seed, device=device)
    g = torch.Generator().manual_seed(100 + seed)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[IGNORED[0]], labels[IGNORED[1]] = -1, -100
    labels[0], labels[2] = 0, v - 1
    labels[8] = 10 ** 6  # masked: may hold anything, even with check_inputs=True
    mask = torch.ones(n, dtype=torch.bool)
    mask[MASKED] = False
    z[10, 5], z[10, 6] = math.nan, math.inf
    d = tdev(device)
    return z, ids, lp, labels.to(d), mask.to(d)


def both(x, ids, lp, **kw):
    """(kernels on x, oracle on x.double())."""
    return run(td.topk_distill_loss, x, ids, lp, **kw), run(ref, x.double(), ids, lp, **kw)


def dtypes_of(device):
    return [F64, F32] if device != "cuda" else [F32]


# ----------------------------------------------------------------------------- labels / entropy

RL_CONFIGS = [dict(loss="jsd", support="tail", beta=0.3),
              dict(loss="fkl", support="topk", log_prob_min_clamp=-4.0),
              dict(loss="srkl", support="renorm", skew=0.2, reduction="mean")]
GRADS = [("loss",), ("label_logprobs",), ("entropy",), ("loss", "label_logprobs", "entropy")]


@pytest.mark.parametrize("ci", range(len(RL_CONFIGS)))
@pytest.mark.parametrize("temperature", [1.0, 1.7])
@pytest.mark.parametrize("device", DEVICES)
def test_each_output_alone_and_their_weighted_sum_match_the_oracle(ci, temperature, device):
    z, ids, lp, labels, mask = rl_batch(device, seed=ci)
    cfg = {"reduction": "none", **RL_CONFIGS[ci]}
    kw = dict(cfg, labels=labels, mask=mask, return_entropy=True, temperature=temperature)
    for dt, grad_of in itertools.product(dtypes_of(device), GRADS):
        what = f"{cfg} T={temperature} {dt} grad_of={grad_of}"
        got, exp = both(z.to(dt), ids, lp, grad_of=grad_of, **kw)
        compare(got, exp, dt, what)
        out, grad = got
        # Masked rows: every output exactly 0, gradient exactly 0 (even with NaN / inf logits).
        for name in ("loss", "label_logprobs", "entropy", "student_mass", "teacher_mass"):
            t = getattr(out, name)
            if t.dim():
                assert (t[MASKED] == 0).all(), (what, name, t[MASKED])
        assert (grad[MASKED] == 0).all(), what
        # Ignored labels: exactly 0, and no gradient from label_logprobs.
        assert (out.label_logprobs[IGNORED] == 0).all(), what
        if grad_of == ("label_logprobs",):
            assert (grad[IGNORED] == 0).all(), what
            assert torch.isfinite(grad).all(), what
        if grad_of == ("entropy",):
            assert torch.isfinite(grad).all(), what
    # Per-token outputs are never reduced; the loss with mean / sum still is.
    out = td.topk_distill_loss(z.float(), ids, lp, labels=labels, mask=mask, return_entropy=True,
                               reduction="sum", **RL_CONFIGS[0])
    assert out.loss.dim() == 0 and out.label_logprobs.shape == out.entropy.shape == (N,)


@pytest.mark.parametrize("device", DEVICES)
def test_per_token_outputs_keep_leading_shape_and_ignore_t2_scale(device):
    z, ids, lp, labels, mask = rl_batch(device, seed=4)
    z3, ids3, lp3 = z.float().view(3, 4, V), ids.view(3, 4, K), lp.view(3, 4, K)
    kw = dict(labels=labels.view(3, 4), mask=mask.view(3, 4), return_entropy=True,
              temperature=2.0, loss="tvd", support="tail")
    got, exp = both(z3, ids3, lp3, t2_scale=True, **kw)
    compare(got, exp, F32, "[3, 4, V]")
    assert got.out.label_logprobs.shape == got.out.entropy.shape == (3, 4)
    plain = run(td.topk_distill_loss, z3, ids3, lp3, t2_scale=False, grad_of=(), **kw)
    # t2_scale multiplies the loss only, never label_logprobs or entropy.
    assert torch.equal(plain.out.label_logprobs, got.out.label_logprobs)
    assert torch.equal(plain.out.entropy, got.out.entropy)
    torch.testing.assert_close(got.out.loss, 4.0 * plain.out.loss)
    # The nn.Module twin takes the new keywords and forwards labels.
    crit = td.TopKDistillLoss(return_entropy=True, temperature=2.0, loss="tvd", support="tail",
                              t2_scale=True)
    m = crit(z3, ids3, lp3, mask=kw["mask"], labels=kw["labels"])
    assert torch.equal(m.label_logprobs, got.out.label_logprobs)
    assert torch.equal(m.entropy, got.out.entropy) and torch.equal(m.loss, got.out.loss)


@pytest.mark.parametrize("logits_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("device", DEVICES)
def test_half_precision_logits(logits_dtype, device):
    z, ids, lp, labels, mask = rl_batch(device, seed=5)
    kw = dict(labels=labels, mask=mask, return_entropy=True, temperature=1.7, t2_scale=True,
              loss=[("jsd", "tail", 0.7), ("fkl", "topk", 0.3)], log_prob_min_clamp=-9.0,
              reduction="none")
    for grad_of in GRADS:
        got, exp = both(z.to(logits_dtype), ids, lp, grad_of=grad_of, **kw)
        compare(got, exp, logits_dtype, f"{logits_dtype} {grad_of}")


# ----------------------------------------------------------------------------- labels >= V

SENTINEL_BITS = 0x7FC0BEEF  # a NaN with a payload no arithmetic produces


def _in_sentinel_storage(z):
    """(big, x): ``x`` = z as a row-strided view inside a larger non-leaf fp32 tensor ``big``
    whose other elements are NaN sentinels; ``big`` comes from a leaf with requires_grad."""
    n, v = z.shape
    base = torch.full((n + 2, v + 8), 0, dtype=torch.int32).fill_(SENTINEL_BITS).view(F32)
    base[1:-1, 4:4 + v] = z.float().cpu()
    leaf = base.to(z.device).requires_grad_(True)
    big = leaf * 1.0  # non-leaf, as an LM head's output
    return big, big[1:-1, 4:4 + v]


def _outside(big, v):
    keep = torch.ones(big.shape, dtype=torch.bool)
    keep[1:-1, 4:4 + v] = False
    return big.detach().cpu().view(torch.int32)[keep].clone()


@pytest.mark.parametrize("device", DEVICES)
def test_labels_out_of_range(device):
    z, ids, lp, labels, mask = rl_batch(device, seed=6)
    bad_rows = [4, 5, 9]
    bad = labels.clone()
    bad[4], bad[5], bad[9] = V, V + 3, 2 ** 40
    kw = dict(labels=bad, mask=mask, return_entropy=True, loss="jsd", support="tail",
              reduction="none")
    with pytest.raises(ValueError, match=f"^labels has a label >= the vocab size V={V}"):
        td.topk_distill_loss(z.float(), ids, lp, **kw)
    good = bad.clone()
    good[bad_rows] = -1
    others = [r for r in range(N) if r not in bad_rows]

    for inplace in (False, True):
        for grad_of in [("loss", "entropy"), ("label_logprobs",), GRADS[-1]]:
            what = f"inplace={inplace} grad_of={grad_of}"
            big, x = _in_sentinel_storage(z)
            before = _outside(big, V)
            got = run(td.topk_distill_loss, None, ids, lp, leaf=x, grad_of=grad_of,
                      check_inputs=False, inplace_backward=inplace, **kw)
            assert torch.equal(_outside(big, V), before), f"{what}: wrote outside the logits"
            exp = run(ref, z.float().double(), ids, lp, grad_of=grad_of, check_inputs=False, **kw)
            compare(got, exp, F32, what)
            lab = got.out.label_logprobs
            assert torch.isnan(lab[bad_rows]).all() and torch.isfinite(lab[others]).all(), what
            # A bad label leaves the loss and the entropy as they are without it.
            clean = run(td.topk_distill_loss, z.float(), ids, lp, grad_of=grad_of,
                        **{**kw, "labels": good})
            assert equal_nan(got.out.loss, clean.out.loss), what
            assert equal_nan(got.out.entropy, clean.out.entropy), what
            assert torch.isfinite(got.grad[others]).all(), what
            if "label_logprobs" in grad_of:  # its gradient row is all NaN, the others intact
                assert torch.isnan(got.grad[bad_rows]).all(), what
            else:  # no gradient through label_logprobs: the bad labels change nothing
                assert equal_nan(got.grad, clean.grad), what

    # An upstream gradient of 0 on a bad row's label_logprobs leaves that row finite.
    x = z.float().clone().requires_grad_(True)
    out = td.topk_distill_loss(x, ids, lp, check_inputs=False, **kw)
    w = upstream(out.label_logprobs, 1)
    w[bad_rows] = 0
    (g,) = torch.autograd.grad((out.label_logprobs * w).sum(), x)
    xr = z.double().clone().requires_grad_(True)
    out_r = ref(xr, ids, lp, check_inputs=False, **kw)
    (gr,) = torch.autograd.grad((out_r.label_logprobs * w.double()).sum(), xr)
    assert torch.isfinite(g).all()
    assert_close(g, gr, F32, "zero upstream on bad rows")


@pytest.mark.parametrize("device", DEVICES)
def test_a_bad_teacher_id_poisons_only_the_loss(device):
    """DECISIONS 18: each output poisons only its own gradient contribution - a teacher id >= V
    (check_inputs=False) makes the row's loss NaN, its label_logprobs and entropy stay finite."""
    z, ids, lp, labels, mask = rl_batch(device, seed=16)
    ids[5, 2] = V + 4
    kw = dict(labels=labels, mask=mask, return_entropy=True, check_inputs=False,
              reduction="none", loss="jsd", support="tail")
    with pytest.raises(ValueError, match="^teacher_ids has an id >= the vocab size"):
        td.topk_distill_loss(z.float(), ids, lp, **{**kw, "check_inputs": True})
    for grad_of in GRADS:
        got, exp = both(z.float(), ids, lp, grad_of=grad_of, **kw)
        compare(got, exp, F32, f"{grad_of}")
        assert torch.isnan(got.out.loss[5]) and torch.isfinite(got.out.student_mass[5])
        assert torch.isfinite(got.out.label_logprobs[5]) and torch.isfinite(got.out.entropy[5])
        assert torch.isnan(got.grad[5]).all() == ("loss" in grad_of), grad_of


@pytest.mark.parametrize("device", DEVICES)
def test_empty_and_all_masked_batches(device):
    """SPEC 7: no rows, or every row masked: loss 0 (not NaN), zero gradient, every per-token
    output empty or 0."""
    z, ids, lp, labels, mask = rl_batch(device, seed=17)
    z = z.float()
    kw = dict(labels=labels, return_entropy=True, student_topk=3,
              loss=[("fkl", "topk", 0.5), ("rkl", "tail", 0.5)])
    for reduction in ("mean", "sum"):
        none = run(td.topk_distill_loss, z, ids, lp, mask=torch.zeros_like(mask),
                   reduction=reduction, **kw)
        assert none.out.loss.item() == 0 and (none.grad == 0).all()
        for name in ("label_logprobs", "entropy", "overlap_count", "overlap_token_advantage",
                     "student_mass", "teacher_mass"):
            assert (getattr(none.out, name) == 0).all(), name
        empty = run(td.topk_distill_loss, z[:0], ids[:0], lp[:0], reduction=reduction,
                    **{**kw, "labels": labels[:0]})
        assert empty.out.loss.item() == 0 and empty.grad.shape == (0, V)
        assert empty.out.student_topk_ids.shape == (0, 3) and empty.out.entropy.shape == (0,)


# ----------------------------------------------------------------------------- gradcheck, checks

@pytest.mark.parametrize("cfg", [
    dict(loss="jsd", support="tail", beta=0.3, log_prob_min_clamp=-2.5),
    dict(loss=[("fkl", "topk", 0.9), ("rkl", "renorm", 0.1), Term("tvd", "tail", -0.4)]),
], ids=["jsd-tail-clamp", "mixture"])
@pytest.mark.parametrize("device", [d for d in DEVICES if d != "cuda"])
def test_gradcheck_fp64_of_loss_labels_and_entropy(cfg, device):
    z, ids, lp = teacher_batch(5, 7, 3, seed=7, special_rows=False, device=device)
    d = tdev(device)
    labels = torch.tensor([0, 6, -1, 2, 3], device=d)
    mask = torch.tensor([True, True, True, False, True], device=d)
    kw = dict(cfg, temperature=1.3, labels=labels, mask=mask, return_entropy=True,
              reduction="none")

    def each(x):
        out = td.topk_distill_loss(x, ids, lp, **kw)
        return out.loss, out.label_logprobs, out.entropy

    def weighted(x):
        out = td.topk_distill_loss(x, ids, lp, **kw)
        return 0.7 * out.loss + 1.3 * out.label_logprobs - 0.4 * out.entropy

    zz = z.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(each, (zz,), eps=1e-6, atol=1e-7)
    assert torch.autograd.gradcheck(weighted, (zz,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("device", DEVICES)
def test_check_inputs_false_gives_the_same_results(device):
    z, ids, lp, labels, mask = rl_batch(device, seed=8)
    kw = dict(labels=labels, mask=mask, return_entropy=True, student_topk=5, temperature=0.8,
              loss=[("fkl", "topk", 0.9), ("rkl", "renorm", 0.1)], reduction="none")
    for dt in dtypes_of(device) + [torch.bfloat16]:
        a = run(td.topk_distill_loss, z.to(dt), ids, lp, check_inputs=True, **kw)
        b = run(td.topk_distill_loss, z.to(dt), ids, lp, check_inputs=False, **kw)
        assert_same(a, b, f"{dt}")


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph_inductor_with_labels_and_entropy(device):
    z, ids, lp, labels, mask = rl_batch(device, seed=9)
    lp[4, -1] = -30.0  # no -inf here: the renormalised RKL stays finite
    z = z.float()

    lp[6, 2] = math.nan  # a missing teacher entry, dropped

    def step(x, ids, lp, labels, mask):
        out = td.topk_distill_loss(x, ids, lp, labels=labels, mask=mask, return_entropy=True,
                                   loss=[("fkl", "topk", 0.9), ("rkl", "renorm", 0.1)],
                                   temperature=1.3, check_inputs=False, student_topk=4,
                                   missing_teacher="drop")
        return (out.loss, out.label_logprobs, out.entropy, out.student_topk_ids,
                out.student_topk_logprobs, out.overlap_count, out.overlap_token_advantage)

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="inductor")
    results = []
    for fn in (compiled, step):
        x = z.clone().requires_grad_(True)
        loss, lab, ent, *topk = fn(x, ids, lp, labels, mask)
        total = 1.3 * loss + (lab * upstream(lab, 1)).sum() + (ent * upstream(ent, 2)).sum()
        (g,) = torch.autograd.grad(total, x)
        results.append((loss.detach(), lab.detach(), ent.detach(), *topk, g))
    torch._dynamo.reset()
    names = ("loss", "label_logprobs", "entropy", "student_topk_ids", "student_topk_logprobs",
             "overlap_count", "overlap_token_advantage", "grad")
    for name, a, b in zip(names, *results):  # (row 10: NaN logits, masked)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, equal_nan=True,
                                   msg=lambda m: f"{name}: {m}")
    assert torch.isfinite(results[0][0]) and (results[0][-1][MASKED] == 0).all()


# ----------------------------------------------------------------------------- mixtures

SECOND = {"topk": ("tvd", "tail", -0.35), "renorm": ("jsd", "topk", 0.6),
          "tail": ("skl", "renorm", 1.7)}


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("device", DEVICES)
def test_every_loss_and_support_inside_a_two_term_mixture(loss, device):
    z, ids, lp, labels, mask = rl_batch(device, seed=10)
    for support, clamp in itertools.product(SUPPORTS, [None, -3.0]):
        terms = [Term(loss, support, 0.8, beta=0.3, rkl_ratio=0.4, skew=0.25), SECOND[support]]
        kw = dict(loss=terms, log_prob_min_clamp=clamp, temperature=1.4, mask=mask,
                  reduction="none")
        for dt in dtypes_of(device):
            got, exp = both(z.to(dt), ids, lp, **kw)
            compare(got, exp, dt, f"{terms} clamp={clamp} {dt}")
    # reductions and t2_scale apply to the mixture's sum
    for reduction in ("mean", "sum"):
        kw = dict(loss=[(loss, "tail", 0.5), ("fkl", "renorm", 0.5)], mask=mask,
                  reduction=reduction, t2_scale=True, temperature=2.0)
        got, exp = both(z.float(), ids, lp, **kw)
        compare(got, exp, F32, f"{reduction}")


@pytest.mark.parametrize("support", SUPPORTS)
@pytest.mark.parametrize("device", DEVICES)
def test_one_term_list_is_bitwise_the_plain_call(support, device):
    z, ids, lp, labels, mask = rl_batch(device, seed=11)
    z = z.float()
    params = dict(beta=0.3, rkl_ratio=0.4, skew=0.2)
    for loss, clamp in itertools.product(LOSSES, [None, -3.0]):
        common = dict(log_prob_min_clamp=clamp, mask=mask, labels=labels, return_entropy=True,
                      reduction="none", temperature=1.2)
        plain = run(td.topk_distill_loss, z, ids, lp, loss=loss, support=support, **params,
                    **common)
        term = Term(loss, support, 1.0, params["beta"], params["rkl_ratio"], params["skew"])
        for form in ([term], term, [tuple(term)], (list(term),)):
            other = run(td.topk_distill_loss, z, ids, lp, loss=form, **common)
            assert_same(plain, other, f"{loss} {support} clamp={clamp} {form!r}")
    # A tuple's defaults are SPEC 8's.
    a = run(td.topk_distill_loss, z, ids, lp, loss=[("jsd", support)], reduction="none")
    b = run(td.topk_distill_loss, z, ids, lp, loss="jsd", support=support, reduction="none")
    assert_same(a, b, "defaults")


@pytest.mark.parametrize("device", DEVICES)
def test_zero_weight_next_to_an_infinite_term(device):
    z, ids, lp = teacher_batch(6, 30, 4, seed=12, special_rows=False, device=device)
    lp[2, 1] = -math.inf  # RKL against a teacher probability of 0: +inf
    z = z.float()
    rkl = run(td.topk_distill_loss, z, ids, lp, loss="rkl", reduction="none")
    assert rkl.out.loss[2].item() == math.inf and torch.isnan(rkl.grad[2]).all()
    for fkl_weight in (1.0, 0.7):
        alone = run(td.topk_distill_loss, z, ids, lp, loss=[("fkl", "tail", fkl_weight)],
                    reduction="none")
        for order in ([("fkl", "tail", fkl_weight), ("rkl", "topk", 0.0)],
                      [("rkl", "topk", 0.0), ("fkl", "tail", fkl_weight)]):
            mix = run(td.topk_distill_loss, z, ids, lp, loss=order, reduction="none")
            assert torch.isfinite(mix.out.loss).all() and torch.isfinite(mix.grad).all(), order
            assert_same(mix, alone, f"{order}")
        exp = run(ref, z.double(), ids, lp, loss=[("fkl", "tail", fkl_weight),
                                                  ("rkl", "topk", 0.0)], reduction="none")
        compare(alone, exp, F32, f"w={fkl_weight}")
    fkl = run(td.topk_distill_loss, z, ids, lp, loss="fkl", support="tail", reduction="none")
    torch.testing.assert_close(
        run(td.topk_distill_loss, z, ids, lp, loss=[("fkl", "tail", 0.7), ("rkl", "topk", 0.0)],
            reduction="none").out.loss, 0.7 * fkl.out.loss)
    # Only zero weights: loss 0, gradient 0. A tiny nonzero weight keeps the infinity.
    zero = run(td.topk_distill_loss, z, ids, lp, loss=[("rkl", "topk", 0.0)], reduction="none")
    assert (zero.out.loss == 0).all() and (zero.grad == 0).all()
    tiny = run(td.topk_distill_loss, z, ids, lp, loss=[("fkl", "topk", 1.0), ("rkl", "topk", 1e-3)],
               reduction="none")
    assert tiny.out.loss[2].item() == math.inf and torch.isnan(tiny.grad[2]).all()
    assert torch.isfinite(tiny.grad[[0, 1, 3, 4, 5]]).all()


@pytest.mark.parametrize("device", DEVICES)
def test_verl_recipe_kl_rkl_equals_two_separate_calls(device):
    z, ids, lp, labels, mask = rl_batch(device, seed=13)
    lp[4, -1] = -30.0  # no -inf here: the renormalised RKL stays finite
    z = z.float()
    for reduction in ("mean", "none"):
        kw = dict(mask=mask, temperature=1.1, reduction=reduction)
        mix = run(td.topk_distill_loss, z, ids, lp, grad_of=("loss",),
                  loss=[("fkl", "topk", 0.9), ("rkl", "renorm", 0.1)], **kw)
        x = z.clone().requires_grad_(True)
        fkl = td.topk_distill_loss(x, ids, lp, loss="fkl", support="topk", **kw).loss
        rkl = td.topk_distill_loss(x, ids, lp, loss="rkl", support="renorm", **kw).loss
        want = 0.9 * fkl + 0.1 * rkl
        (g,) = torch.autograd.grad((want * upstream(want, 0)).sum(), x)
        assert torch.isfinite(mix.out.loss).all()
        assert_close(mix.out.loss, want.detach(), F32, f"{reduction} loss")
        assert_close(mix.grad, g, F32, f"{reduction} grad")
        exp = run(ref, z.double(), ids, lp, grad_of=("loss",),
                  loss=[("fkl", "topk", 0.9), ("rkl", "renorm", 0.1)], **kw)
        compare(mix, exp, F32, reduction)


_LIST = [("fkl",), ("rkl", "renorm", 0.1)]
MIXTURE_ERRORS = [
    (dict(loss=_LIST, support="renorm"), ValueError, "support cannot be passed beside"),
    (dict(loss=_LIST, beta=0.25), ValueError, "beta cannot be passed beside"),
    (dict(loss=_LIST, rkl_ratio=0.5), ValueError, "rkl_ratio cannot be passed beside"),
    (dict(loss=_LIST, skew=0.9), ValueError, "skew cannot be passed beside"),
    (dict(loss=[Term("fkl")], support="renorm"), ValueError, "support cannot be passed beside"),
    (dict(loss=[]), ValueError, "loss must be a loss name or a non-empty sequence"),
    (dict(loss=()), ValueError, "loss must be a loss name or a non-empty sequence"),
    (dict(loss=[("fkl", "topk", math.inf)]), ValueError, "loss[0].weight"),
    (dict(loss=[("fkl",), ("rkl", "topk", -math.inf)]), ValueError, "loss[1].weight"),
    (dict(loss=[("fkl",), ("rkl", "topk", math.nan)]), ValueError, "loss[1].weight"),
    (dict(loss=[("fkl", "topk", "0.5")]), TypeError, "loss[0].weight"),
    (dict(loss=[("fkl", "topk", True)]), TypeError, "loss[0].weight"),
    (dict(loss=[("fkl", "topk", torch.tensor(0.5))]), TypeError, "loss[0].weight"),
    (dict(loss=[("fkl",), ("fkl", "all")]), ValueError, "loss[1].support"),
    (dict(loss=[("kl",)]), ValueError, "loss[0].loss"),
    (dict(loss=[Term("jsd", beta=1.5)]), ValueError, "loss[0].beta"),
    (dict(loss=[("fkl",), ("fkl",), Term("srkl", skew=-0.1)]), ValueError, "loss[2].skew"),
    (dict(loss=["fkl"]), TypeError, "loss[0] must be a td.Term"),
    (dict(loss=[()]), ValueError, "loss[0] must be"),
]


@pytest.mark.parametrize("kw,exc,msg", MIXTURE_ERRORS, ids=[str(i) for i in range(len(MIXTURE_ERRORS))])
def test_mixture_errors_name_the_argument(kw, exc, msg):
    import re

    z, ids, lp = teacher_batch(4, 20, 3, seed=14, special_rows=False)
    for call in (lambda: td.topk_distill_loss(z.float(), ids, lp, **kw),
                 lambda: td.TopKDistillLoss(**kw),
                 lambda: td.fused_linear_topk_distill_loss(torch.randn(4, 5), torch.randn(20, 5),
                                                           ids, lp, **kw)):
        with pytest.raises(exc, match="^" + re.escape(msg)):
            call()


# ----------------------------------------------------------------------------- -inf logits

@pytest.mark.parametrize("device", DEVICES)
def test_a_logit_of_minus_inf_is_a_column_of_probability_zero(device):
    """DECISIONS 15 and 19: a logit of -inf is valid - probability 0, its column contributes
    exactly 0 to the entropy and gets a gradient of exactly 0, never NaN - in the loss, the
    label log-probs and the entropy alike. (-inf columns here are never teacher ids or labels.)"""
    z, ids, lp, labels, mask = rl_batch(device, seed=15)
    z[10] = 0.0  # (no NaN row here)
    lp[4, -1] = -30.0

    def free(r):  # columns of row r that are neither teacher ids nor its label
        return [c for c in range(V) if not (ids[r] == c).any() and labels[r] != c]

    cols = {0: free(0)[:2], 2: free(2)[-1:], 6: free(6)[20:60], 11: free(11)[-1:]}
    for r, cs in cols.items():
        z[r, cs] = -math.inf
    for dt, (loss, support) in itertools.product(
            dtypes_of(device) + [torch.bfloat16], [("fkl", "topk"), ("jsd", "renorm"),
                                                   ("tvd", "tail"), ("rkl", "topk")]):
        what = f"{dt} {loss}/{support}"
        kw = dict(loss=loss, support=support, labels=labels, mask=mask, return_entropy=True,
                  temperature=1.3, reduction="none")
        for grad_of in GRADS:
            got, exp = both(z.to(dt), ids, lp, grad_of=grad_of, **kw)
            assert torch.isfinite(got.out.entropy).all(), what
            for r, cs in cols.items():
                assert (got.grad[r, cs] == 0).all(), (what, grad_of, r, got.grad[r, cs])
            compare(got, exp, dt, f"{what} {grad_of}")
