"""What a new user trips over (issue 27): inplace_backward on a leaf, a jagged hidden to the
fused LM head, errors that name the argument, stderr noise, visible defaults, docs that agree
with the code. (The tensor-parallel and DTensor cases run in one gloo launch at the end.)"""
import pytest
import torch

import topk_distill as td
from topk_distill import fused_linear_topk_distill_loss, reference

from _dist_utils import run_distributed

N, V, K, H = 5, 40, 4, 8


def _teacher(n=N, v=V, k=K, seed=0, lead=()):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(v, generator=g)[:k] for _ in range(n)])
    lp = torch.log_softmax(torch.randn(n, v, generator=g), -1).gather(1, ids)
    return ids.view(*lead, k) if lead else ids, lp.view(*lead, k) if lead else lp


# ----------------------------------------------------------------------------- 1. inplace_backward

def _leaves():
    """Tensors the in-place backward would destroy: each (name, logits [N, V] or [N, V - 1])."""
    p = torch.nn.Parameter(torch.randn(N, V + 1))
    q = torch.randn(N, V, requires_grad=True)
    return [("parameter", p[:, :V].detach().requires_grad_()),  # (a leaf)
            ("nn.Parameter", torch.nn.Parameter(torch.randn(N, V))),
            ("leaf", q), ("view of a Parameter", p[:, :-1]),
            ("view of a view of a leaf", q.view(N, 2, V // 2)[:, 1].view(N, V // 2)),
            ("view of a leaf, reshaped", q.t().t())]


@pytest.mark.parametrize("name", [n for n, _ in _leaves()])
def test_inplace_backward_refuses_a_leaf_that_requires_grad(name):
    logits = dict(_leaves())[name]
    before = logits.detach().clone()
    ids, lp = _teacher(v=logits.shape[-1])
    for call in (lambda: td.topk_distill_loss(logits, ids, lp, inplace_backward=True),
                 lambda: td.TopKDistillLoss(inplace_backward=True)(logits, ids, lp),
                 lambda: reference.topk_distill_loss(logits, ids, lp, inplace_backward=True)):
        with pytest.raises(ValueError, match=r"^inplace_backward=True would overwrite logits"):
            call()
    assert torch.equal(logits.detach(), before)


def test_inplace_backward_before_the_fix_overwrote_a_parameter():
    """The issue's reproduction, out of place: the parameter keeps its values, and the same call
    on an intermediate (what the in-place backward is for) writes the gradient into it."""
    p = torch.nn.Parameter(torch.randn(N, V))
    ids, lp = _teacher()
    td.topk_distill_loss(p, ids, lp).loss.backward()
    want = p.grad.clone()
    x = p.detach().clone().requires_grad_() * 1  # e.g. the LM head's output
    (g,) = torch.autograd.grad(td.topk_distill_loss(x, ids, lp, inplace_backward=True).loss, x)
    assert g.data_ptr() == x.data_ptr() and torch.equal(g, want)


def test_inplace_backward_still_takes_intermediates_and_forward_only_calls():
    ids, lp = _teacher()
    p = torch.nn.Parameter(torch.randn(N, V + 1))
    x = p * 2.0  # an intermediate and a view of one: fine
    td.topk_distill_loss(x[:, :-1], ids, lp, inplace_backward=True).loss.backward()
    assert p.grad is not None and torch.isfinite(p.grad).all()
    with torch.no_grad():  # no backward can run: nothing is overwritten, nothing to refuse
        td.topk_distill_loss(p[:, :-1], ids, lp, inplace_backward=True)
    frozen = torch.randn(N, V)  # no grad at all: accepted (no backward either)
    td.topk_distill_loss(frozen, ids, lp, inplace_backward=True)


def test_inplace_backward_refuses_a_jagged_leaf():
    offsets = torch.tensor([0, 2, N])
    nt = torch.nested.nested_tensor_from_jagged(torch.randn(N, V), offsets).requires_grad_()
    ids, lp = _teacher()
    jids = torch.nested.nested_tensor_from_jagged(ids, offsets)
    jlp = torch.nested.nested_tensor_from_jagged(lp, offsets)
    with pytest.raises(ValueError, match=r"^inplace_backward=True would overwrite logits"):
        td.topk_distill_loss(nt, jids, jlp, inplace_backward=True)


def test_inplace_backward_refuses_a_leaf_under_torch_compile():
    ids, lp = _teacher()
    fn = torch.compile(lambda x: td.topk_distill_loss(x, ids, lp, inplace_backward=True,
                                                      check_inputs=False).loss, backend="eager")
    with pytest.raises(ValueError, match=r"^inplace_backward=True would overwrite logits"):
        fn(torch.nn.Parameter(torch.randn(N, V)))


def test_fused_head_has_no_inplace_backward():
    """The fused LM head never materialises the logits, so there is nothing to write in place:
    the keyword does not exist there (Python's own TypeError names it)."""
    with pytest.raises(TypeError, match="inplace_backward"):
        fused_linear_topk_distill_loss(torch.randn(N, H), torch.randn(V, H), *_teacher(),
                                       inplace_backward=True)
    with pytest.raises(TypeError, match="inplace_backward"):
        td.FusedLinearTopKDistillLoss(inplace_backward=True)


# ----------------------------------------------------------------------------- TP and DTensor

def _tp_worker(rank, world_size):
    """Every rank: the TP and DTensor entry points' errors (each raised before any collective,
    on every rank, so none is left waiting)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from topk_distill.integrations.dtensor import dtensor_topk_distill_loss

    group = dist.group.WORLD
    ids, lp = _teacher()
    errors = {}

    def catch(key, fn):
        try:
            fn()
            errors[key] = None
        except (TypeError, ValueError) as e:
            errors[key] = (type(e).__name__, str(e))

    shard = torch.nn.Parameter(torch.randn(N, V // world_size))
    catch("tp_leaf", lambda: td.topk_distill_loss(shard, ids, lp, tp_group=group,
                                                  inplace_backward=True))
    catch("tp_module_view", lambda: td.TopKDistillLoss(tp_group=group, inplace_backward=True)(
        shard[:, :], ids, lp))
    mesh = init_device_mesh("cpu", (world_size,))
    full = torch.randn(N, V, generator=torch.Generator().manual_seed(1))  # same on every rank
    dt = distribute_tensor(full, mesh, [Shard(-1)]).requires_grad_()
    catch("dtensor_leaf", lambda: dtensor_topk_distill_loss(dt, ids, lp, inplace_backward=True))
    # An intermediate DTensor is fine, and matches the unsharded call.
    x = dt * 1.0
    out = dtensor_topk_distill_loss(x, ids, lp, inplace_backward=True)
    out.loss.backward()
    errors["dtensor_ok"] = (out.loss.item(), td.topk_distill_loss(full, ids, lp).loss.item())
    dist.barrier()
    return errors


@pytest.fixture(scope="module")
def tp_results():
    return run_distributed(_tp_worker, world_size=2, deadline_s=300)


def test_inplace_backward_refuses_a_leaf_under_tp_and_dtensor(tp_results):
    for rank, errors in enumerate(tp_results):
        for key in ("tp_leaf", "tp_module_view", "dtensor_leaf"):
            assert errors[key] is not None, (rank, key)
            kind, msg = errors[key]
            assert kind == "ValueError" and msg.startswith("inplace_backward=True would"), (
                rank, key, msg)
        got, want = errors["dtensor_ok"]
        assert got == pytest.approx(want, rel=1e-5)


# ----------------------------------------------------------------------------- 2. import cost

def test_import_does_not_import_dynamo():
    """`import topk_distill` stays cheap (benchmarks/import_time.py measures it): nothing of
    torch._dynamo (~1.5 s) is imported until a compiled call needs it."""
    import subprocess
    import sys

    code = ("import sys, torch, topk_distill; "
            "print(sorted(m for m in sys.modules if m.startswith('torch._dynamo')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_layout_marker_is_what_assume_constant_result_sets():
    """parallel.py marks its trace-time layout function as dynamo's assume_constant_result does,
    without importing dynamo; if torch changes that decorator, this fails (and the compile
    tests of tests/test_tp.py, which learn the layout while tracing, would too)."""
    import torch._dynamo

    from topk_distill import parallel

    def probe():
        pass

    assert torch._dynamo.assume_constant_result(probe) is probe
    assert vars(probe) == {"_dynamo_marked_constant": True}
    assert parallel._traced_layout_const is parallel._traced_layout
    assert parallel._traced_layout._dynamo_marked_constant is True
