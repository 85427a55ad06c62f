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

    catch("tp_nope", lambda: td.topk_distill_loss(torch.randn(N, V), ids, lp, tp_group="nope"))
    catch("tp_nope_fused", lambda: fused_linear_topk_distill_loss(
        torch.randn(N, H), torch.randn(V, H), ids, lp, tp_group="nope"))
    shard = torch.nn.Parameter(torch.randn(N, V // world_size))
    catch("tp_leaf", lambda: td.topk_distill_loss(shard, ids, lp, tp_group=group,
                                                  inplace_backward=True))
    catch("tp_module_view", lambda: td.TopKDistillLoss(tp_group=group, inplace_backward=True)(
        shard[:, :], ids, lp))
    mesh = init_device_mesh("cpu", (world_size,))
    full = torch.randn(N, V, generator=torch.Generator().manual_seed(1))  # same on every rank
    dt = distribute_tensor(full, mesh, [Shard(-1)]).requires_grad_()
    catch("dtensor_leaf", lambda: dtensor_topk_distill_loss(dt, ids, lp, inplace_backward=True))
    catch("dtensor_to_plain", lambda: td.topk_distill_loss(dt, ids, lp))
    catch("dtensor_to_module", lambda: td.TopKDistillLoss()(dt * 1.0, ids, lp))
    catch("dtensor_to_reference", lambda: reference.topk_distill_loss(dt, ids, lp))
    # An intermediate DTensor is fine, and matches the unsharded call.
    x = dt * 1.0
    out = dtensor_topk_distill_loss(x, ids, lp, inplace_backward=True)
    out.loss.backward()
    errors["dtensor_ok"] = (out.loss.item(), td.topk_distill_loss(full, ids, lp).loss.item())
    # The host-sync gather behind the TP checks returns only once gloo's worker thread has let go
    # of the input (so a ValueError right after it cannot leave the thread freeing a Python-owned
    # tensor during interpreter exit). Without the wait, 3-6% of such gathers return while the
    # thread still holds it (measured); 300 gathers, each checked.
    from topk_distill import parallel
    still_held = 0
    for i in range(300):
        mine = torch.tensor([i, rank, 7, 8], dtype=torch.int64)
        table = parallel._gather_host_table(mine, world_size, group.group_name)
        still_held += mine._use_count() > 1
        assert table == [[i, r, 7, 8] for r in range(world_size)], table
    errors["host_table_still_held"] = still_held
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


def test_tp_host_table_gather_returns_after_gloo_lets_go(tp_results):
    for rank, errors in enumerate(tp_results):
        assert errors["host_table_still_held"] == 0, (rank, errors["host_table_still_held"])


# ----------------------------------------------------------------------------- 2. import cost

def test_import_does_not_import_dynamo():
    """`import topk_distill` stays cheap (benchmarks/import_time.py measures it): nothing of
    torch._dynamo (~1.5 s) is imported until a compiled call needs it."""
    import os
    import pathlib
    import subprocess
    import sys

    code = ("import sys, torch, topk_distill; "
            "print(sorted(m for m in sys.modules if m.startswith('torch._dynamo')))")
    env = dict(os.environ, PYTHONPATH=str(pathlib.Path(__file__).resolve().parents[1]))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=env)
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


# ----------------------------------------------------------------------------- 5. stderr noise

_JAGGED_SCRIPT = r"""
import warnings
warnings.simplefilter("always")  # any Python warning would reach stderr too
import torch
import topk_distill as td
N, V, K = 6, 50, 4
g = torch.Generator().manual_seed(0)
logits = torch.randn(N, V, generator=g).requires_grad_()
t = torch.log_softmax(torch.randn(N, V, generator=g), -1).topk(K, dim=-1)
jag = lambda x: torch.nested.nested_tensor([x[:3], x[3:]], layout=torch.jagged)
out = td.topk_distill_loss(jag(logits.detach()), jag(t.indices), jag(t.values), loss="jsd",
                           reduction="none", return_entropy=True)
packed = torch.nested.nested_tensor_from_jagged(logits * 1, torch.tensor([0, 3, N]))
ids = torch.nested.nested_tensor_from_jagged(t.indices, packed.offsets())
lps = torch.nested.nested_tensor_from_jagged(t.values, packed.offsets())
td.topk_distill_loss(packed, ids, lps, reduction="none").loss.values().sum().backward()
print("ok", float(out.loss.values().sum()), bool(logits.grad.abs().sum() > 0))
"""


def test_first_jagged_call_prints_nothing_on_stderr(tmp_path):
    """torch's nested_tensor_from_jagged logs an is_fx_tracing notice on its first call; our own
    calls (repacking per-token outputs, the jagged gradient) drop that one record. The script's
    own nested_tensor_from_jagged call comes after ours, so the once-only notice is spent."""
    import os
    import pathlib
    import subprocess
    import sys

    script = tmp_path / "jagged.py"
    script.write_text(_JAGGED_SCRIPT)
    env = dict(os.environ, PYTHONPATH=str(pathlib.Path(__file__).resolve().parents[1]))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         check=True, env=env)
    assert out.stdout.startswith("ok") and out.stdout.strip().endswith("True"), out.stdout
    assert out.stderr == "", out.stderr


def test_the_fx_notice_filter_is_narrow():
    """Only that message, only on torch's fx logger, only inside our call."""
    import logging

    from topk_distill import _layout

    logger = logging.getLogger(_layout._FX_TRACE_LOGGER)
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    try:
        with _layout._no_fx_tracing_notice():
            logger.warning("is_fx_tracing will return true for both fx.symbolic_trace and ...")
            logger.warning("something else")
        logger.warning("is_fx_tracing will return true - outside our call")
    finally:
        logger.removeHandler(handler)
    assert [r.getMessage() for r in records] == [
        "something else", "is_fx_tracing will return true - outside our call"]
    assert not logger.filters


def test_tp_errors_name_the_argument_and_the_dtensor_entry_point(tp_results):
    for rank, errors in enumerate(tp_results):
        for key in ("tp_nope", "tp_nope_fused"):
            kind, msg = errors[key]
            assert kind == "ValueError" and msg.startswith("tp_group='nope' is not the name"), (
                rank, key, msg)
        for key in ("dtensor_to_plain", "dtensor_to_module", "dtensor_to_reference"):
            kind, msg = errors[key]
            assert kind == "TypeError" and msg.startswith("logits is a DTensor"), (rank, key, msg)
            assert "topk_distill.integrations.dtensor.dtensor_topk_distill_loss" in msg


# ----------------------------------------------------------------------------- 3, 4: named errors

def test_tp_group_by_an_unknown_name_without_distributed():
    ids, lp = _teacher()
    with pytest.raises(ValueError, match=r"^tp_group='nope' is not the name of a registered "
                                         r"process group \(torch.distributed is not init"):
        td.topk_distill_loss(torch.randn(N, V), ids, lp, tp_group="nope")
    with pytest.raises(ValueError, match=r"^tp_group='nope'"):
        td.student_topk(torch.randn(N, V), 2, tp_group="nope")
    with pytest.raises(TypeError, match=r"^tp_group must be a torch.distributed.ProcessGroup"):
        td.topk_distill_loss(torch.randn(N, V), ids, lp, tp_group=3)


def _jagged(x, offsets):
    return torch.nested.nested_tensor_from_jagged(x, offsets)


@pytest.mark.parametrize("which", ["hidden", "teacher_ids", "teacher_logprobs", "mask", "labels"])
def test_fused_head_refuses_jagged_input_naming_the_argument(which):
    offsets = torch.tensor([0, 2, N])
    ids, lp = _teacher()
    args = dict(hidden=torch.randn(N, H), teacher_ids=ids, teacher_logprobs=lp,
                mask=torch.ones(N, dtype=torch.bool), labels=torch.zeros(N, dtype=torch.long))
    args[which] = _jagged(args[which], offsets)
    hidden = args.pop("hidden")
    with pytest.raises(TypeError, match=rf"^{which} is a nested tensor; "
                                        r"fused_linear_topk_distill_loss takes plain tensors"):
        fused_linear_topk_distill_loss(hidden, torch.randn(V, H), args.pop("teacher_ids"),
                                       args.pop("teacher_logprobs"), **args)


def test_fused_head_on_the_packed_values_equals_the_unfused_jagged_loss():
    """What the error says to do gives the jagged loss of the unfused path."""
    offsets = torch.tensor([0, 2, N])
    ids, lp = _teacher()
    hidden, weight = torch.randn(N, H, dtype=torch.float64), torch.randn(V, H, dtype=torch.float64)
    nt = _jagged(hidden, offsets)
    fused = fused_linear_topk_distill_loss(nt.values(), weight, ids, lp.double()).loss
    unfused = td.topk_distill_loss(_jagged(hidden @ weight.t(), offsets), _jagged(ids, offsets),
                                   _jagged(lp.double(), offsets)).loss
    torch.testing.assert_close(fused, unfused)


# ----------------------------------------------------------------------------- 6. visible defaults

_LOSS_PARAMS = {"support": "topk", "beta": 0.5, "rkl_ratio": 0.1, "skew": 0.1}
_WITH_LOSS_PARAMS = [td.topk_distill_loss, td.TopKDistillLoss, reference.topk_distill_loss,
                     fused_linear_topk_distill_loss, td.FusedLinearTopKDistillLoss]


@pytest.mark.parametrize("fn", _WITH_LOSS_PARAMS, ids=lambda f: f.__qualname__)
def test_signatures_show_the_documented_defaults(fn):
    import inspect

    params = inspect.signature(fn).parameters
    assert {k: params[k].default for k in _LOSS_PARAMS} == _LOSS_PARAMS
    assert "UNSET" not in str(inspect.signature(fn))


def test_none_means_the_default_for_a_wrapper():
    """A wrapper forwards its own optional arguments as None when its caller passed nothing."""
    ids, lp = _teacher()
    z = torch.randn(N, V)
    for loss in ("jsd", "fkl+rkl", "skl"):
        want = td.topk_distill_loss(z, ids, lp, loss=loss).loss
        got = td.topk_distill_loss(z, ids, lp, loss=loss, support=None, beta=None,
                                   rkl_ratio=None, skew=None).loss
        assert torch.equal(got, want), loss
        assert torch.equal(td.TopKDistillLoss(loss=loss, beta=None)(z, ids, lp).loss, want)
        ref = reference.topk_distill_loss(z, ids, lp, loss=loss, beta=None, skew=None).loss
        torch.testing.assert_close(ref, want)


def test_beside_a_term_list_only_none_or_the_default_is_accepted():
    ids, lp = _teacher()
    z = torch.randn(N, V)
    terms = [("fkl", "topk", 0.9), td.Term("jsd", "renorm", 0.1, beta=0.3)]
    want = td.topk_distill_loss(z, ids, lp, loss=terms).loss
    for kw in (dict(support=None, beta=None, rkl_ratio=None, skew=None), dict(_LOSS_PARAMS)):
        assert torch.equal(td.topk_distill_loss(z, ids, lp, loss=terms, **kw).loss, want), kw
        td.TopKDistillLoss(loss=terms, **kw)
    for name, value in (("support", "tail"), ("beta", 0.3), ("rkl_ratio", 0.0), ("skew", 1.0)):
        for call in (lambda: td.topk_distill_loss(z, ids, lp, loss=terms, **{name: value}),
                     lambda: td.TopKDistillLoss(loss=terms, **{name: value}),
                     lambda: fused_linear_topk_distill_loss(torch.randn(N, H), torch.randn(V, H),
                                                            ids, lp, loss=terms, **{name: value})):
            with pytest.raises(ValueError, match=rf"^{name} cannot be passed beside a term list"):
                call()


# ----------------------------------------------------------------------------- 8. smaller

@pytest.fixture
def fresh_teacher_warning(monkeypatch):
    from topk_distill import _validate

    monkeypatch.setattr(_validate, "_warned_teacher_grad", False)


@pytest.mark.parametrize("entry", ["loss", "module", "reference", "fused"])
def test_teacher_logprobs_that_requires_grad_warns_once(entry, fresh_teacher_warning):
    import warnings

    ids, lp = _teacher()
    lp = lp.clone().requires_grad_()
    z = torch.randn(N, V, requires_grad=True)
    call = {"loss": lambda: td.topk_distill_loss(z, ids, lp),
            "module": lambda: td.TopKDistillLoss()(z, ids, lp),
            "reference": lambda: reference.topk_distill_loss(z, ids, lp),
            "fused": lambda: fused_linear_topk_distill_loss(torch.randn(N, H, requires_grad=True),
                                                            torch.randn(V, H),
                                                            ids, lp)}[entry]
    with pytest.warns(UserWarning, match="^teacher_logprobs requires grad, but no gradient"):
        out = call()
    out.loss.backward()
    assert lp.grad is None  # indeed no gradient reached it
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process: the second call is silent
        call()


def test_no_teacher_warning_for_a_detached_teacher_or_without_grad(fresh_teacher_warning):
    import warnings

    ids, lp = _teacher()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        td.topk_distill_loss(torch.randn(N, V, requires_grad=True), ids, lp)
        with torch.no_grad():
            td.topk_distill_loss(torch.randn(N, V), ids, lp.requires_grad_())


def test_module_docstrings():
    for fn in (td.TopKDistillLoss.__init__, td.TopKDistillLoss.forward):
        assert fn.__doc__ and len(fn.__doc__.split()) > 20, fn.__qualname__
    assert "teacher_ids" in td.TopKDistillLoss.forward.__doc__
    assert "topk_distill_loss" in td.TopKDistillLoss.__init__.__doc__


_TEARDOWN_SCRIPT = r"""
import torch
import torch.distributed as dist
import topk_distill as td

dist.init_process_group("gloo")
try:
    n = 4 + dist.get_rank()  # the ranks disagree on N: a ValueError on every rank
    ids = torch.randint(0, 20, (n, 3))
    lp = torch.log_softmax(torch.randn(n, 3), -1)
    td.topk_distill_loss(torch.randn(n, 10), ids, lp, tp_group=dist.group.WORLD)
finally:
    dist.destroy_process_group()
"""


def test_documented_tp_teardown_exits_cleanly_after_a_value_error(tmp_path):
    """docs/TP.md's teardown (destroy_process_group in a finally) around a bad-input call under
    torchrun: every rank raises the ValueError and exits through the normal path, no abort."""
    import os
    import pathlib
    import re
    import subprocess
    import sys

    from _dist_utils import free_port

    root = pathlib.Path(__file__).resolve().parents[1]
    tp_md = (root / "docs" / "TP.md").read_text()
    assert re.search(r"## Teardown.*try:.*finally:\n\s+dist\.destroy_process_group\(\)", tp_md,
                     re.S)
    script = tmp_path / "bad_tp.py"
    script.write_text(_TEARDOWN_SCRIPT)
    env = dict(os.environ, PYTHONPATH=str(root), GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
                          str(script)], capture_output=True, text=True, env=env, timeout=300)
    log = out.stdout + out.stderr
    assert out.returncode != 0  # the exception still ends the job, as it should
    assert log.count("ValueError: logits: the ranks of tp_group disagree") == 2, log[-3000:]
    assert "terminate called" not in log and "Signal 6" not in log and "SIGABRT" not in log, log
