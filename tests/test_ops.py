"""The registered ops: opcheck, gradcheck, torch.compile and the in-place backward."""
import pytest
import torch

import topk_distill as td
from topk_distill import ops

from _inputs import DEVICES, LOSSES, SUPPORTS, tdev, teacher_batch


def op_inputs(device="cpu", dtype=torch.float32, n=6, v=40, k=5):
    z, ids, lp = teacher_batch(n, v, k, seed=21, device=device)
    z = z.to(dtype)
    labels = torch.arange(n, device=ids.device) * 7 % v
    labels[1] = -1  # ignored
    row_max, sums, gathered, _, _ = ops.shard_pass(z, ids, 0, 0.5, labels, True, 0)
    outs = ops.epilogue(row_max, sums, gathered, ids, lp.float(), None, v,
                        [("jsd", "tail", 1.0, 0.5, 0.1, 0.1)], -8.0, 1.0, labels, True)
    return z, ids, lp.float(), labels, row_max, sums, gathered, outs[5], outs[6]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_every_op(device, dtype):
    z, ids, lp, labels, row_max, sums, gathered, row_coefs, g = op_inputs(device, dtype)
    n = z.shape[0]
    grad_rows = torch.rand(n, device=tdev(device))
    grad_label = torch.rand(n, device=tdev(device))
    grad_entropy = torch.rand(n, device=tdev(device))
    mask = torch.tensor([True, False, True, True, True, False], device=tdev(device))
    z3 = z.view(2, 3, z.shape[1])[:, :, :]  # the [B, T, V] form
    terms = (["srkl", "fkl"], ["renorm", "tail"], [0.7, 0.3], [0.5, 0.5], [0.1, 0.1], [0.3, 0.2])
    ns = torch.ops.topk_distill_emu if device == "cuda_emu" else torch.ops.topk_distill
    cases = [
        (ns.shard_pass.default, (z, ids, None, 3, 0.7, False, 0)),
        (ns.shard_pass.default, (z3, ids, labels, 0, 0.7, True, 4)),
        (ns.epilogue.default,
         (row_max, sums, gathered, ids, lp, mask, labels, 40, *terms, None, 2.0, True)),
        (ns.backward.default, (z, ids, labels, row_max, row_coefs, g, grad_rows, grad_label,
                               grad_entropy, 0, 0.5)),
        (ns.backward.default, (z3, ids, None, row_max, row_coefs, g, grad_rows, None, None, 0,
                               0.5)),
        (ns.backward_.default, (z.clone(), ids, labels, row_max, row_coefs, g, grad_rows,
                                grad_label, None, 0, 0.5)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("namespace", ["topk_distill", "topk_distill_emu"])
def test_every_op_has_a_cpu_kernel_and_fake(namespace):
    for name in ("shard_pass", "epilogue", "backward", "backward_"):
        op = getattr(getattr(torch.ops, namespace), name).default
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CPU")
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "Meta") or \
            torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CompositeExplicitAutograd") \
            or op.name() in torch._library.simple_registry.singleton._data


@pytest.mark.parametrize("loss", LOSSES)
def test_gradcheck_fp64(loss):
    z, ids, lp = teacher_batch(6, 11, 4, seed=22)
    mask = torch.tensor([True, True, True, False, True, True])
    for support, clamp in [("topk", None), ("renorm", -3.0), ("tail", None)]:
        def f(x):
            return td.topk_distill_loss(x, ids, lp, loss=loss, support=support, mask=mask,
                                        log_prob_min_clamp=clamp, temperature=1.3,
                                        reduction="none").loss
        # row 4 has a -inf teacher log-prob: RKL-type losses are +inf there; use finite rows.
        zz = z.clone().requires_grad_(True)
        if loss in ("rkl", "fkl+rkl") and clamp is None:
            # ... and row 2's duplicated id gives P > 1, a teacher tail of 0: +inf under tail.
            keep = torch.tensor([0, 1, 5] if support == "tail" else [0, 1, 2, 5])
            zz = z[keep].clone().requires_grad_(True)

            def f(x, keep=keep):  # noqa: F811
                return td.topk_distill_loss(x, ids[keep], lp[keep], loss=loss, support=support,
                                            temperature=1.3, reduction="none").loss
        assert torch.autograd.gradcheck(f, (zz,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("support", SUPPORTS)
def test_torch_compile_fullgraph_cpu(support):
    z, ids, lp = teacher_batch(8, 50, 6, seed=23)
    z = z.float()

    def step(x, ids, lp):
        out = td.topk_distill_loss(x, ids, lp, loss="jsd", support=support, check_inputs=False)
        return out.loss

    compiled = torch.compile(step, fullgraph=True, backend="inductor")
    x1 = z.clone().requires_grad_(True)
    x2 = z.clone().requires_grad_(True)
    l1 = compiled(x1, ids, lp)
    l2 = step(x2, ids, lp)
    torch.testing.assert_close(l1, l2)
    l1.backward()
    l2.backward()
    torch.testing.assert_close(x1.grad, x2.grad)


def test_torch_compile_with_default_check_inputs():
    z, ids, lp = teacher_batch(8, 50, 6, seed=24)
    compiled = torch.compile(lambda x: td.topk_distill_loss(x, ids, lp).loss, fullgraph=True)
    torch.testing.assert_close(compiled(z.float()), td.topk_distill_loss(z.float(), ids, lp).loss)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_inplace_backward_writes_the_gradient_into_the_logits(dtype):
    z, ids, lp = teacher_batch(8, 64, 6, seed=25)
    base = z.to(dtype)
    a = base.clone().requires_grad_(True)
    td.topk_distill_loss(a, ids, lp, loss="tvd", support="tail").loss.backward()
    leaf = base.clone().requires_grad_(True)
    logits = leaf * 1.0  # a non-leaf, as an LM head's output is
    seen = []  # the gradient autograd hands on from our node (retain_grad would copy it)
    logits.register_hook(lambda g: seen.append((g.data_ptr(), g.clone())))
    storage = logits.data_ptr()
    version = logits._version
    td.topk_distill_loss(logits, ids, lp, loss="tvd", support="tail",
                         inplace_backward=True).loss.backward()
    assert logits._version > version  # autograd sees the in-place write
    assert seen[0][0] == storage  # the gradient lives in the logits' storage
    assert torch.equal(seen[0][1], a.grad)
    assert torch.equal(leaf.grad, a.grad)


def test_inplace_backward_misuse_raises_instead_of_corrupting():
    z, ids, lp = teacher_batch(8, 64, 6, seed=26)
    leaf = z.float().clone().requires_grad_(True)
    logits = leaf * 1.0
    other = (logits ** 2).sum()  # saves `logits` for its backward, created before the loss
    loss = td.topk_distill_loss(logits, ids, lp, inplace_backward=True).loss
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (other + loss).backward()


def test_forward_allocates_nothing_of_size_n_by_v():
    z, ids, lp = teacher_batch(64, 4096, 8, seed=27)
    z = z.float().requires_grad_(True)
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = td.topk_distill_loss(z, ids, lp, check_inputs=False)
    big = z.numel() * z.element_size() // 2
    allocs = [e for e in prof.events() if e.cpu_memory_usage and e.cpu_memory_usage >= big]
    assert not allocs, [e.name for e in allocs]
    del out


def test_cpu_gradient_buffer_cache_never_hands_out_a_live_buffer():
    """backward reuses the most recently *freed* gradient buffer of the same size (a one-slot
    cache against page-fault cost); a gradient that is still alive is never overwritten."""
    z, ids, lp = teacher_batch(1024, 2048, 8, seed=28, special_rows=False)
    z = z.float()
    row_max, sums, gathered, _, _ = ops.shard_pass(z, ids, 0, 1.0)
    *_, coefs, g = ops.epilogue(row_max, sums, gathered, ids, lp.float(), None, 2048,
                                [("fkl", "topk", 1.0, 0.5, 0.1, 0.1)], None, 1.0)
    ones = torch.ones(1024)
    first = ops.backward(z, ids, row_max, coefs, g, ones, 0, 1.0)
    kept = first.clone()
    second = ops.backward(z, ids, row_max, coefs, g, 2 * ones, 0, 1.0)
    assert first.data_ptr() != second.data_ptr()
    assert torch.equal(first, kept)
    torch.testing.assert_close(second, 2 * kept, rtol=1e-6, atol=0)
    address = first.data_ptr()
    del first
    third = ops.backward(z, ids, row_max, coefs, g, 3 * ones, 0, 1.0)
    assert third.data_ptr() == address  # the freed buffer came back ...
    torch.testing.assert_close(third, 3 * kept, rtol=1e-6, atol=0)  # ... fully rewritten
    torch.testing.assert_close(second, 2 * kept, rtol=1e-6, atol=0)
