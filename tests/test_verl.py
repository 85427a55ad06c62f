"""topk_distill.integrations.verl against the REAL verl 0.9.1 (installed without its dependency
tree; its heavy imports satisfied by test-only stand-ins, tests/_verl_standins.py).

Compared: verl's own ``compute_forward_kl_topk`` of its FSDP path
(``verl.trainer.distillation.fsdp.losses``) and of its Megatron path
(``verl.trainer.distillation.megatron.losses``, ``_VocabParallelKLDivergence``) with the drop-ins,
on the same inputs: every key of the returned dict and the gradient w.r.t. the student logits
(under a random per-token upstream weight), for K in {1, 8, 64}, ``log_prob_min_clamp`` off and
on, jagged nested teacher tensors (verl's input) and already-packed ("rmpad") ones;
Megatron at TP 1 and 2 (``parallel_state.initialize_model_parallel`` over gloo) with "thd" and
"bshd" layouts; FSDP also with Ulysses sequence parallelism 2. One launch of 2 processes holds
all distributed cases. A float64 oracle of verl's definitions checks verl itself (so that the
harness is known to measure the right thing), then the drop-ins are compared with verl.

The drop-ins call ``topk_distill_loss(..., student_topk=K)`` (SPEC 9.4) for the overlap
outputs: every test that runs a drop-in needs it.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))

import topk_distill as td  # noqa: E402
from topk_distill.integrations import verl as tdv  # noqa: E402

from _dist_utils import run_distributed  # noqa: E402
from _inputs import assert_close, assert_close_rowwise  # noqa: E402
from _verl_standins import import_verl  # noqa: E402

F32, F64 = torch.float32, torch.float64
V = 96                 # even: Megatron's equal vocab shards at TP 2; >= the largest K
KS = (1, 8, 64)
CLAMPS = (None, -6.0)  # -6: clamps a good part of the K = 64 entries on both sides
LENS = (5, 2, 6)       # three sequences: odd lengths, so TP/SP alignment pads
KEYS = ("distillation_losses", "student_mass", "teacher_mass", "overlap_count",
        "overlap_token_advantage")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def verl():
    return import_verl()


def _config(verl, clamp, k, mode="forward_kl_topk"):
    cfg = verl.config
    loss = cfg.DistillationLossConfig(loss_mode=mode, topk=k, log_prob_min_clamp=clamp,
                                      use_policy_gradient=False)
    return cfg.DistillationConfig(distillation_loss=loss)


# ----------------------------------------------------------------------------- inputs

def _teacher(k, seed, lens=LENS):
    """Jagged nested ``[B, j, K]`` ids / log-probs: each token's teacher top-K (distinct ids,
    as vLLM returns them) of a teacher distribution over V; fp32 log-probs."""
    g = torch.Generator().manual_seed(seed)
    ids, lps = [], []
    for n in lens:
        t = torch.log_softmax(torch.randn(n, V, generator=g, dtype=F64) * 2.5, -1)
        top = t.topk(k, dim=-1)
        ids.append(top.indices)
        lps.append(top.values.float())
    nested = lambda ts: torch.nested.nested_tensor(ts, layout=torch.jagged)  # noqa: E731
    return nested(lps), nested(ids)


def _logits(shape, seed):
    g = torch.Generator().manual_seed(10_000 + seed)
    return (torch.randn(*shape, generator=g, dtype=F64) * 2.0).float()


def _weights(shape, seed):
    """A per-token upstream gradient, so that each row's gradient scale is exercised."""
    g = torch.Generator().manual_seed(20_000 + seed)
    return torch.rand(*shape, generator=g) + 0.5


def _packed(t):
    return t.values().unsqueeze(0)


def _laid_out(t, fmt, align):
    """An independent re-implementation of verl's CP-free layouts, for the oracle: "thd" packs
    the sequences, each zero-padded to a multiple of ``align`` (TP size), ``[1, nnz_pad, K]``;
    "bshd" pads all to the longest, rounded up to ``align``, ``[B, s, K]``."""
    seqs = list(t.unbind())
    if fmt == "thd":
        out = [torch.cat([s, s.new_zeros(-len(s) % align, *s.shape[1:])]) for s in seqs]
        return torch.cat(out).unsqueeze(0)
    longest = max(len(s) for s in seqs)
    longest += -longest % align
    return torch.stack([torch.cat([s, s.new_zeros(longest - len(s), *s.shape[1:])])
                        for s in seqs])


# ----------------------------------------------------------------------------- the oracle

def oracle(z, lp, ids, clamp, masses_after_clamp, weights):
    """verl's definitions in float64 on full-vocab logits ``[B, T, V]``: (dict, grad)."""
    x = z.double().detach().requires_grad_()
    logp = torch.log_softmax(x, -1)
    s, l = logp.gather(-1, ids), lp.double()
    q_mass, p_mass = s.exp().sum(-1), l.exp().sum(-1)
    if clamp is not None:
        s, l = s.clamp_min(clamp), l.clamp_min(clamp)
        if masses_after_clamp:
            q_mass, p_mass = s.exp().sum(-1), l.exp().sum(-1)
    token = l.exp() * (l - s)
    loss = token.sum(-1)
    (grad,) = torch.autograd.grad((loss * weights.double()).sum(), x)
    student_top = logp.topk(ids.shape[-1], dim=-1).indices
    overlap = (ids.unsqueeze(-1) == student_top.unsqueeze(-2)).any(-1)
    count = overlap.sum(-1)
    adv = (-token.detach() * overlap).sum(-1) / count.clamp_min(1)
    adv = torch.where(count > 0, adv, torch.zeros_like(adv))
    out = dict(distillation_losses=loss.detach(), student_mass=q_mass.detach(),
               teacher_mass=p_mass.detach(), overlap_count=count, overlap_token_advantage=adv)
    return out, grad


def run(fn, z, lp, ids, config, fmt, weights):
    """(every output, detached; grad w.r.t. z) of one verl-style call."""
    x = z.detach().clone().requires_grad_()
    out = fn(x, lp, ids, config, fmt)
    (grad,) = torch.autograd.grad((out["distillation_losses"] * weights).sum(), x)
    return {k: v.detach() for k, v in out.items()}, grad


def assert_same(actual, expected, what, grad_slice=slice(None)):
    """actual/expected: (dict, grad). Float outputs to fp32 rounding, overlap_count exactly."""
    (a, ga), (e, ge) = actual, expected
    assert set(a) == set(KEYS), (what, sorted(a))
    for key in KEYS:
        assert a[key].shape == e[key].shape, (what, key, a[key].shape, e[key].shape)
        if key == "overlap_count":
            assert a[key].dtype == torch.int64, (what, a[key].dtype)
            assert torch.equal(a[key].cpu(), e[key].cpu()), (what, key, a[key], e[key])
        else:
            assert a[key].dtype == F32, (what, key, a[key].dtype)
            assert_close(a[key], e[key], F32, f"{what} {key}")
    assert_close_rowwise(ga.reshape(-1, ga.shape[-1]), ge[..., grad_slice].reshape(-1, ga.shape[-1]),
                         F32, f"{what} grad")


# ----------------------------------------------------------------------------- no verl needed

def test_importing_topk_distill_never_imports_verl():
    code = textwrap.dedent("""
        import sys
        import topk_distill, topk_distill.integrations, topk_distill.integrations.verl
        from topk_distill.integrations.verl import fsdp_compute_forward_kl_topk, patch_verl
        bad = sorted(m for m in sys.modules if m == "verl" or m.startswith("verl."))
        assert not bad, bad
        print("ok")
    """)
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]


# ----------------------------------------------------------------------------- the harness

def test_standins_import_the_real_verl_modules(verl):
    assert verl.version == "0.9.1"
    for mod in (verl.fsdp, verl.megatron, verl.losses, verl.ulysses, verl.config):
        assert mod is not None and os.sep + "verl" + os.sep in mod.__file__, mod
        assert not getattr(mod, "__verl_standin__", False)
    assert callable(verl.fsdp.compute_forward_kl_topk)
    assert callable(verl.megatron.compute_forward_kl_topk)
    # The stand-ins are out of sys.modules again: the rest of the session sees no fake packages.
    for name in verl.standins:
        assert not getattr(sys.modules.get(name), "__verl_standin__", False), name


@pytest.mark.parametrize("clamp", CLAMPS)
@pytest.mark.parametrize("k", KS)
def test_verl_fsdp_itself_matches_the_oracle(verl, k, clamp):
    """The harness: verl's real FSDP function vs the float64 oracle (masses before the clamp)."""
    lp, ids = _teacher(k, seed=k)
    z = _logits((1, sum(LENS), V), seed=k)
    w = _weights((1, sum(LENS)), seed=k)
    got = run(verl.fsdp.compute_forward_kl_topk, z, lp, ids, _config(verl, clamp, k), "thd", w)
    exp = oracle(z, _packed(lp), _packed(ids), clamp, False, w)
    assert_same(got, exp, f"verl fsdp K={k} clamp={clamp}")


# ----------------------------------------------------------------------------- FSDP drop-in

@pytest.mark.parametrize("teacher", ["nested", "rmpad"])
@pytest.mark.parametrize("clamp", CLAMPS)
@pytest.mark.parametrize("k", KS)
def test_fsdp_dropin_matches_verl(verl, k, clamp, teacher):
    lp, ids = _teacher(k, seed=k)
    z = _logits((1, sum(LENS), V), seed=k)
    w = _weights((1, sum(LENS)), seed=k)
    cfg = _config(verl, clamp, k)
    expected = run(verl.fsdp.compute_forward_kl_topk, z, lp, ids, cfg, "thd", w)
    if teacher == "rmpad":
        lp, ids = _packed(lp), _packed(ids)
    got = run(tdv.fsdp_compute_forward_kl_topk, z, lp, ids, cfg, "thd", w)
    assert_same(got, expected, f"fsdp K={k} clamp={clamp} {teacher}")


def test_fsdp_dropin_bf16_logits(verl):
    """bf16 logits: verl's FSDP path rounds its log-softmax to bf16 before the loss; the drop-in
    works in fp32 from the same bf16 logits. Both against the float64 oracle of those logits:
    the drop-in to fp32 rounding, verl within bf16's."""
    k, clamp = 8, -6.0
    lp, ids = _teacher(k, seed=3)
    z = _logits((1, sum(LENS), V), seed=3).bfloat16()
    w = _weights((1, sum(LENS)), seed=3)
    cfg = _config(verl, clamp, k)
    exp, exp_grad = oracle(z, _packed(lp), _packed(ids), clamp, False, w)
    ours, ours_grad = run(tdv.fsdp_compute_forward_kl_topk, z, lp, ids, cfg, "thd", w)
    theirs, theirs_grad = run(verl.fsdp.compute_forward_kl_topk, z, lp, ids, cfg, "thd", w)
    for key in ("distillation_losses", "student_mass", "teacher_mass"):
        assert ours[key].dtype == F32
        assert_close(ours[key], exp[key], F32, f"bf16 drop-in {key}")
        assert_close(theirs[key], exp[key], torch.bfloat16, f"bf16 verl {key}")
    assert ours_grad.dtype == theirs_grad.dtype == torch.bfloat16
    assert_close_rowwise(ours_grad[0], exp_grad[0], torch.bfloat16, "bf16 drop-in grad")
    err = lambda a: (a - exp["distillation_losses"]).abs().max()  # noqa: E731
    assert err(ours["distillation_losses"].double()) <= err(theirs["distillation_losses"].double())


def test_fsdp_dropin_rejects_mismatched_teacher(verl):
    lp, ids = _teacher(8, seed=1)
    z = _logits((1, sum(LENS) + 1, V), seed=1)
    with pytest.raises(ValueError, match="teacher_topk_log_probs / teacher_topk_ids"):
        tdv.fsdp_compute_forward_kl_topk(z, lp, ids, _config(verl, None, 8), "thd")
    with pytest.raises(ValueError, match="both nested or both dense"):
        tdv.fsdp_compute_forward_kl_topk(z, lp, _packed(ids), _config(verl, None, 8), "thd")


def test_fsdp_dropin_refuses_nested_teachers_values_would_misread(verl):
    """Strided nested, or jagged whose values() hold rows outside it (lengths()): a TypeError naming
    the argument (the library's own nested-tensor checks), never a silent misread."""
    lp, ids = _teacher(8, seed=1)
    z = _logits((1, sum(LENS), V), seed=1)
    cfg = _config(verl, None, 8)
    strided = torch.nested.nested_tensor([t for t in lp.unbind()])
    with pytest.raises(TypeError, match="^teacher_topk_log_probs is a nested tensor with layout"):
        tdv.fsdp_compute_forward_kl_topk(z, strided, torch.nested.nested_tensor(
            [t for t in ids.unbind()]), cfg, "thd")
    holes = [torch.nested.nested_tensor_from_jagged(t.values(), t.offsets(),  # 2 tokens each
                                                    lengths=torch.full((len(LENS),), 2))
             for t in (lp, ids)]
    with pytest.raises(TypeError, match="^teacher_topk_log_probs is a non-contiguous jagged"):
        tdv.fsdp_compute_forward_kl_topk(z, *holes, cfg, "thd")


# ----------------------------------------------------------------------------- Megatron pieces

@pytest.mark.parametrize("clamp", [-6.0, -2.0, -200.0])
def test_megatron_clamped_student_mass_from_the_kernel_mass(clamp):
    """verl's Megatron student_mass, sum_k exp(max(s_k, c)), rebuilt from the kernel's unclamped
    Q and the teacher-id logits, vs float64 - including rows whose Q underflows (s_k < -87)."""
    k = 8
    lp, ids = _teacher(k, seed=5)
    z = _logits((1, sum(LENS), V), seed=5)
    ids, lp = _packed(ids).clone(), _packed(lp)
    z[0, 0, ids[0, 0]] -= 200.0  # row 0: every teacher id far below the rest
    ids[0, 1, -1] = -1           # row 1: a padding entry
    q = td.topk_distill_loss(z, ids, lp, reduction="none").student_mass
    got = tdv._clamped_student_mass(z, ids, q, clamp, None, None)
    s = torch.log_softmax(z.double(), -1).gather(-1, ids.clamp_min(0))
    exp = torch.where(ids >= 0, s.clamp_min(clamp).exp(), torch.zeros_like(s)).sum(-1)
    if clamp < -100:  # row 0's s_k are ~-200 and Q is 0 in fp32: only the clamp is known
        got, exp = got[:, 1:], exp[:, 1:]
    assert_close(got, exp, F32, "clamped student mass")


# ----------------------------------------------------------------------------- patch_verl

def test_patch_verl_swaps_registers_and_undoes(verl):
    fsdp_orig = verl.fsdp.compute_forward_kl_topk
    mega_orig = verl.megatron.compute_forward_kl_topk
    registry = verl.losses.DISTILLATION_LOSS_REGISTRY
    before = dict(registry)
    with tdv.patch_verl() as patch:
        assert patch.active and not patch.skipped
        assert verl.fsdp.compute_forward_kl_topk is tdv.fsdp_compute_forward_kl_topk
        assert verl.megatron.compute_forward_kl_topk is tdv.megatron_compute_forward_kl_topk
        assert tdv.patch_verl() is patch  # idempotent
        final = verl.losses.get_distillation_loss_fn("forward_kl_topk")
        for name in tdv.VERL_LOSS_MODES:
            assert registry[name] is final
            assert verl.losses.get_distillation_loss_settings(name).use_topk
            # verl's config accepts the new mode (its __post_init__ looks the settings up)
            assert _config(verl, None, 8, mode=name).distillation_loss.loss_settings.use_topk
        with pytest.raises(ValueError, match="already patched"):
            tdv.patch_verl(modes={"other_topk": dict(loss="tvd")})
    assert not patch.active
    assert verl.fsdp.compute_forward_kl_topk is fsdp_orig
    assert verl.megatron.compute_forward_kl_topk is mega_orig
    assert registry == before
    with pytest.raises(ValueError, match="Unsupported loss mode"):
        _config(verl, None, 8, mode="jsd_topk")
    assert tdv.unpatch_verl() is False


def test_patch_verl_refuses_taken_names_and_bad_modes(verl):
    with pytest.raises(ValueError, match="already registers"):
        tdv.patch_verl(modes={"forward_kl_topk": dict(loss="fkl")})
    with pytest.raises(ValueError, match="log_prob_min_clamp"):
        tdv.patch_verl(modes={"x_topk": dict(loss="fkl", log_prob_min_clamp=-1.0)})
    assert not tdv.unpatch_verl()
    assert "x_topk" not in verl.losses.DISTILLATION_LOSS_REGISTRY


def test_verl_dispatcher_runs_the_dropin_after_patch_verl(verl):
    """verl's own logits processor (compute_topk_loss, strategy fsdp) reaches the drop-in."""
    k, clamp = 8, -6.0
    lp, ids = _teacher(k, seed=2)
    z = _logits((1, sum(LENS), V), seed=2)
    cfg = _config(verl, clamp, k)
    data = {"teacher_logprobs": lp, "teacher_ids": ids}
    actor = type("ActorConfig", (), {"strategy": "fsdp"})()
    expected = verl.losses.compute_topk_loss(actor, cfg, data, z, "thd")
    with tdv.patch_verl():
        got = verl.losses.compute_topk_loss(actor, cfg, data, z, "thd")
    for key in KEYS:
        assert_close(got[key], expected[key], F32, key)


@pytest.mark.parametrize("mode", sorted(tdv.VERL_LOSS_MODES))
def test_registered_loss_modes_compute_their_divergence(verl, mode):
    """With loss_mode=<registered name> the drop-in computes that divergence (vs the float64
    reference); verl's final loss function then applies its metrics and clamp_min(0)."""
    k, clamp = 8, -6.0
    lp, ids = _teacher(k, seed=4)
    z = _logits((1, sum(LENS), V), seed=4)
    with tdv.patch_verl():
        cfg = _config(verl, clamp, k, mode=mode)
        got = tdv.fsdp_compute_forward_kl_topk(z, lp, ids, cfg, "thd")
    exp = td.reference.topk_distill_loss(z.double(), _packed(ids), _packed(lp),
                                         log_prob_min_clamp=clamp, reduction="none",
                                         **tdv.VERL_LOSS_MODES[mode])
    assert_close(got["distillation_losses"], exp.loss, F32, mode)
    assert_close(got["student_mass"], exp.student_mass, F32, mode)


def test_verl_autopatch_through_verls_plugin_hook(verl):
    """VERL_USE_EXTERNAL_MODULES=topk_distill.integrations.verl_autopatch: `import verl` patches
    (in a fresh process, as a Ray worker would)."""
    code = textwrap.dedent("""
        import sys
        sys.path.insert(0, "tests")
        from _verl_standins import install_standins
        install_standins()
        import verl
        import verl.trainer.distillation.fsdp.losses as fsdp
        import topk_distill.integrations.verl as tdv
        assert fsdp.compute_forward_kl_topk is tdv.fsdp_compute_forward_kl_topk
        from verl.trainer.distillation.losses import DISTILLATION_LOSS_REGISTRY
        assert set(tdv.VERL_LOSS_MODES) <= set(DISTILLATION_LOSS_REGISTRY)
        print("ok")
    """)
    env = dict(os.environ, VERL_USE_EXTERNAL_MODULES="topk_distill.integrations.verl_autopatch",
               PYTHONWARNINGS="ignore")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         env=env)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]


# ----------------------------------------------------------------------------- distributed

WORLD = 2


def _megatron_inputs(fmt, k, clamp, tp, seed):
    """(teacher nested lp/ids, full logits in verl's Megatron layout, weights, config args)."""
    lp, ids = _teacher(k, seed=seed)
    rows = _laid_out(ids, fmt, tp).shape[:2]
    return lp, ids, _logits((*rows, V), seed=seed), _weights(rows, seed=seed)


def _guarded(fn, *args):
    try:
        return fn(*args)
    except Exception as err:  # noqa: BLE001 - reported per case, asserted in the parent
        return f"{type(err).__name__}: {err}"


def _megatron_cases(verl, tp, rank):
    """verl's Megatron function and the drop-in on this rank's vocab shard, every case."""
    out = {}
    for fmt in ("thd", "bshd"):
        for k in KS:
            for clamp in CLAMPS:
                seed = 100 * tp + 10 * KS.index(k) + (clamp is not None) + (fmt == "bshd") * 5
                lp, ids, z, w = _megatron_inputs(fmt, k, clamp, tp, seed)
                width = V // tp
                shard = z[..., rank * width:(rank + 1) * width] if tp > 1 else z
                cfg = _config(verl, clamp, k)
                out[(fmt, k, clamp)] = {
                    "verl": _guarded(run, verl.megatron.compute_forward_kl_topk, shard, lp, ids,
                                     cfg, fmt, w),
                    "ours": _guarded(run, tdv.megatron_compute_forward_kl_topk, shard, lp, ids,
                                     cfg, fmt, w)}
    return out


def _fsdp_sp_cases(verl, rank, world):
    """Ulysses SP over the world: verl slices the packed teacher; each rank gets its slice of the
    (zero-padded to a multiple of sp) packed logits."""
    verl.ulysses.set_ulysses_sequence_parallel_group(dist.group.WORLD)
    out = {}
    try:
        for k in KS:
            for clamp in CLAMPS:
                seed = 500 + 10 * KS.index(k) + (clamp is not None)
                lp, ids = _teacher(k, seed=seed)
                nnz = sum(LENS) + (-sum(LENS) % world)
                z = _logits((1, nnz, V), seed=seed)
                w = _weights((1, nnz), seed=seed)
                part = nnz // world
                rows = slice(rank * part, (rank + 1) * part)
                cfg = _config(verl, clamp, k)
                out[(k, clamp)] = {
                    "verl": _guarded(run, verl.fsdp.compute_forward_kl_topk, z[:, rows], lp, ids,
                                     cfg, "thd", w[:, rows]),
                    "ours": _guarded(run, tdv.fsdp_compute_forward_kl_topk, z[:, rows], lp, ids,
                                     cfg, "thd", w[:, rows])}
    finally:
        verl.ulysses.set_ulysses_sequence_parallel_group(None)
    return out


def _worker(rank, world):
    try:
        verl = import_verl()
    except BaseException as err:  # noqa: BLE001 - pytest.skip's exception included
        return f"{type(err).__name__}: {err}"
    from megatron.core import parallel_state

    out = {}
    for tp in (2, 1):
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
        try:
            assert parallel_state.get_tensor_model_parallel_world_size() == tp
            out[f"megatron_tp{tp}"] = _megatron_cases(verl, tp, rank if tp > 1 else 0)
        finally:
            parallel_state.destroy_model_parallel()
    out["fsdp_sp2"] = _fsdp_sp_cases(verl, rank, world)
    return out


_LAUNCH = []


def launch():
    """The one 2-process launch, shared by the tests below."""
    if not _LAUNCH:
        try:
            _LAUNCH.append(run_distributed(_worker, WORLD, timeout_s=180.0, deadline_s=420.0))
        except BaseException as err:  # noqa: BLE001 - remembered, re-raised by every user
            _LAUNCH.append(err)
    if isinstance(_LAUNCH[0], BaseException):
        raise _LAUNCH[0]
    results = _LAUNCH[0]
    if isinstance(results[0], str):  # the workers could not import verl
        if results[0].startswith("Skipped"):
            pytest.skip(results[0])
        pytest.fail(results[0])
    return results


def _result(res, what):
    assert not isinstance(res, str), f"{what}: {res}"
    return res


needs_gloo = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                     reason="needs torch.distributed with gloo")


@needs_gloo
@pytest.mark.parametrize("tp", [1, 2])
def test_verl_megatron_itself_matches_the_oracle(verl, tp):
    """The harness: verl's real Megatron function at TP 1 / 2 vs the float64 oracle (masses
    after the clamp), every case, each rank's shard gradient."""
    results = launch()
    for rank, res in enumerate(results):
        for (fmt, k, clamp), case in res[f"megatron_tp{tp}"].items():
            what = f"verl megatron tp{tp} rank{rank} {fmt} K={k} clamp={clamp}"
            seed = 100 * tp + 10 * KS.index(k) + (clamp is not None) + (fmt == "bshd") * 5
            lp, ids, z, w = _megatron_inputs(fmt, k, clamp, tp, seed)
            exp = oracle(z, _laid_out(lp, fmt, tp), _laid_out(ids, fmt, tp), clamp, True, w)
            width = V // tp
            cols = slice(rank * width, (rank + 1) * width) if tp > 1 else slice(None)
            assert_same(_result(case["verl"], what), exp, what, grad_slice=cols)


@needs_gloo
@pytest.mark.parametrize("tp", [1, 2])
def test_megatron_dropin_matches_verl(tp):
    results = launch()
    for rank, res in enumerate(results):
        for (fmt, k, clamp), case in res[f"megatron_tp{tp}"].items():
            what = f"megatron tp{tp} rank{rank} {fmt} K={k} clamp={clamp}"
            assert_same(_result(case["ours"], what), _result(case["verl"], what), what)


@needs_gloo
def test_fsdp_dropin_matches_verl_under_ulysses_sp2():
    results = launch()
    for rank, res in enumerate(results):
        for (k, clamp), case in res["fsdp_sp2"].items():
            what = f"fsdp sp2 rank{rank} K={k} clamp={clamp}"
            assert_same(_result(case["ours"], what), _result(case["verl"], what), what)


# ----------------------------------------------------------------------------- sampled token
# verl 0.9.1 returns the teacher's log-prob of the sampled token only to its estimator modes
# (prompt_logprobs=0; docs/VERL.md "The sampled token"), so the sampled modes are SPEC 10.2's
# support="sampled" with an empty top-k, on verl's per-token log-probs.

@pytest.mark.parametrize("loss, beta", [("fkl", 0.5), ("rkl", 0.5), ("jsd", 0.5), ("jsd", 0.0),
                                        ("jsd", 1.0)])
@pytest.mark.parametrize("clamp", CLAMPS)
@pytest.mark.parametrize("explicit_mu, clip", [(False, None), (True, None), (True, 2.0)])
def test_sampled_token_losses_equal_the_sampled_support_with_no_teacher_entries(
        loss, beta, clamp, explicit_mu, clip):
    """sampled_token_losses(log q_y, log p_y) is topk_distill_loss(support="sampled") with every
    teacher entry padding: value and gradient w.r.t. the logits (through log q_y), against the
    float64 reference (the oracle every backend is tested against)."""
    n = 40
    g = torch.Generator().manual_seed(7)
    z = (torch.randn(n, V, generator=g, dtype=F64) * 2.0)
    y = torch.randint(0, V, (n,), generator=g)
    teacher_lp = torch.log_softmax(torch.randn(n, V, generator=g, dtype=F64) * 2.5, -1)
    lp_y = teacher_lp.gather(-1, y[:, None]).squeeze(-1)
    mu = (torch.log_softmax(torch.randn(n, V, generator=g, dtype=F64), -1)
          .gather(-1, y[:, None]).squeeze(-1) if explicit_mu else None)
    w = torch.rand(n, generator=g, dtype=F64) + 0.5
    pad_ids = torch.full((n, 1), -1, dtype=torch.int64)
    kw = dict(loss=loss, beta=beta, log_prob_min_clamp=clamp)

    x = z.clone().requires_grad_()
    s_y = torch.log_softmax(x, -1).gather(-1, y[:, None]).squeeze(-1)
    ours = tdv.sampled_token_losses(s_y, lp_y, sample_log_probs=mu, sample_weight_clip=clip, **kw)
    (g_ours,) = torch.autograd.grad((ours * w).sum(), x)
    xr = z.clone().requires_grad_()
    out = td.reference.topk_distill_loss(
        xr, pad_ids, torch.zeros(n, 1, dtype=F64), support="sampled", labels=y,
        label_teacher_logprobs=lp_y, label_sample_logprobs=mu, sample_weight_clip=clip,
        reduction="none", **kw)
    (g_ref,) = torch.autograd.grad((out.loss * w).sum(), xr)
    assert_close(ours, out.loss.detach(), F64, "value")
    assert_close_rowwise(g_ours, g_ref, F64, "gradient")


def test_sampled_token_losses_mean_over_draws_is_the_full_vocabulary_divergence():
    """By enumeration of y ~ q: E[value] = KL over the full vocabulary, E[gradient] = its
    gradient (reverse KL; the unbiasedness behind the verl modes)."""
    g = torch.Generator().manual_seed(8)
    z = torch.randn(3, V, generator=g, dtype=F64).requires_grad_()
    t = torch.log_softmax(torch.randn(3, V, generator=g, dtype=F64) * 2, -1)
    s = torch.log_softmax(z, -1)
    q = s.exp().detach()
    expected = (s.exp() * (s - t)).sum(-1)
    mean = (q * tdv.sampled_token_losses(s, t, loss="rkl")).sum(-1)
    assert_close(mean, expected, F64, "value")
    (g_mean,) = torch.autograd.grad(mean.sum(), z, retain_graph=True)
    (g_full,) = torch.autograd.grad(expected.sum(), z)
    assert_close(g_mean, g_full, F64, "gradient")


def test_sampled_token_losses_bad_arguments():
    a = torch.zeros(3)
    with pytest.raises(ValueError, match="loss"):
        tdv.sampled_token_losses(a, a, loss="tvd")
    with pytest.raises(ValueError, match="beta"):
        tdv.sampled_token_losses(a, a, loss="jsd", beta=1.5)
    with pytest.raises(ValueError, match="sample_weight_clip"):
        tdv.sampled_token_losses(a, a, sample_weight_clip=0.0)
    with pytest.raises(ValueError, match="same shape"):
        tdv.sampled_token_losses(a, torch.zeros(4))


def _estimator_batch(seed):
    """verl's estimator-mode micro batch for LENS sequences of prompt + response: nested
    ``prompts`` / ``responses`` / full-sequence ``teacher_logprobs`` [B, j, 1], the actor's
    ``log_probs`` (packed, differentiable) and the response slices an oracle reads."""
    g = torch.Generator().manual_seed(seed)
    prompt_lens, resp_lens = (2, 3, 1), LENS
    nested = lambda ts: torch.nested.nested_tensor(ts, layout=torch.jagged)  # noqa: E731
    seq_lens = [p + r for p, r in zip(prompt_lens, resp_lens)]
    student = (torch.rand(sum(seq_lens), generator=g, dtype=F64) * -4).float().requires_grad_()
    teacher = [torch.rand(n, 1, generator=g) * -4 for n in seq_lens]
    data = {"prompts": nested([torch.zeros(p, dtype=torch.int64) for p in prompt_lens]),
            "responses": nested([torch.zeros(r, dtype=torch.int64) for r in resp_lens]),
            "teacher_logprobs": nested(teacher),
            "response_mask": nested([torch.ones(r, dtype=torch.bool) for r in resp_lens])}
    # verl's left shift: response token i of a sequence is predicted at position p + i - 1
    offsets = [0] + list(torch.tensor(seq_lens).cumsum(0).tolist())
    rows = [list(range(offsets[b] + p - 1, offsets[b] + p - 1 + r))
            for b, (p, r) in enumerate(zip(prompt_lens, resp_lens))]
    return data, student, teacher, rows


@pytest.mark.parametrize("mode", sorted(tdv.VERL_SAMPLED_MODES))
def test_sampled_modes_are_verl_estimator_modes(verl, mode):
    """Registered with use_estimator=True (verl then asks its teacher for the sampled token's
    log-prob), accepted by verl's config, and verl's registry function computes
    sampled_token_losses on verl's response slices of the packed log-probs."""
    data, student, teacher, rows = _estimator_batch(seed=5)
    with tdv.patch_verl() as patch:
        settings = verl.losses.get_distillation_loss_settings(mode)
        assert settings.use_estimator and not settings.use_topk
        cfg = _config(verl, -3.0, None, mode=mode)
        assert cfg.distillation_loss.loss_settings.use_estimator
        fn = verl.losses.get_distillation_loss_fn(mode)
        assert patch.registered[mode] is fn
        losses, metrics = fn(config=None, distillation_config=cfg,
                             model_output={"log_probs": student}, data=data)
    assert "distillation/abs_loss" in metrics
    assert mode not in verl.losses.DISTILLATION_LOSS_REGISTRY   # undone on exit
    teacher_packed = torch.cat(teacher)[:, 0]   # verl shifts both by the same one position
    for b, r in enumerate(rows):
        s, t = student[r], teacher_packed[r]
        exp = tdv.sampled_token_losses(s, t, log_prob_min_clamp=-3.0, **tdv.VERL_SAMPLED_MODES[mode])
        assert_close(losses[b, :len(r)], exp, F32, f"{mode} sequence {b}")
    (grad,) = torch.autograd.grad(losses.sum(), student)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_reverse_kl_sampled_has_verls_k1_value_and_the_unbiased_gradient(verl):
    """Without clamp and with mu = q, reverse_kl_sampled's per-token value is verl's k1
    (log q_y - log p_y); its gradient is (log q_y - log p_y + 1) grad log q_y, not k1's
    grad log q_y, whose mean over y ~ q is 0."""
    s = torch.tensor([-0.5, -2.0, -4.0], dtype=F64, requires_grad=True)
    t = torch.tensor([-1.0, -1.5, -6.0], dtype=F64)
    ours = tdv.sampled_token_losses(s, t, loss="rkl")
    assert_close(ours, s - t, F64, "value = k1")
    (grad,) = torch.autograd.grad(ours.sum(), s)
    assert_close(grad, (s - t + 1).detach(), F64, "gradient")
