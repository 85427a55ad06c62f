"""Profiling ranges: ``topk_distill/<phase>`` in torch.profiler traces only when switched on.

The ranges come from ``topk_distill._nvtx.nvtx_range`` (NVTX on CUDA + ``record_function``
everywhere), wrapped around the phases of a loss call in ``topk_distill/losses.py``; they are
on only with ``TOPK_DISTILL_NVTX=1`` (read at import) or ``_nvtx.set_enabled(True)``.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import topk_distill as td
from topk_distill import _nvtx

from _inputs import DEVICES, teacher_batch

REPO = Path(__file__).resolve().parent.parent
PHASES_NO_TP = ("topk_distill/shard_pass", "topk_distill/epilogue", "topk_distill/backward")


@pytest.fixture
def nvtx_on():
    previous = _nvtx.set_enabled(True)
    yield
    _nvtx.set_enabled(previous)


@pytest.fixture
def nvtx_off():
    previous = _nvtx.set_enabled(False)
    yield
    _nvtx.set_enabled(previous)


def _profiled_step_event_names(device: str, **kwargs) -> set:
    from torch.profiler import ProfilerActivity, profile

    z, ids, lp = teacher_batch(16, 96, 5, logits_dtype=torch.float32, device=device)
    leaf = z.requires_grad_()
    x = leaf * 1  # an intermediate, as the logits of a model (inplace_backward refuses a leaf)
    activities = [ProfilerActivity.CPU]
    if device == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        out = td.topk_distill_loss(x, ids, lp, **kwargs)
        out.loss.backward()
        if device == "cuda":
            torch.cuda.synchronize()
    assert leaf.grad is not None
    return {e.name for e in prof.events()}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("loss", ["fkl", "jsd"])
def test_profiler_trace_has_phase_ranges_when_nvtx_enabled(nvtx_on, device, loss):
    names = _profiled_step_event_names(device, loss=loss)
    missing = [p for p in PHASES_NO_TP if p not in names]
    seen = sorted(n for n in names if n.startswith("topk_distill/"))
    assert not missing, (f"ranges {missing} missing from the torch.profiler trace; "
                         f"topk_distill/ events seen: {seen}")
    # No tensor parallelism: no collectives, so no collectives range either.
    assert "topk_distill/collectives" not in names


@pytest.mark.parametrize("device", DEVICES)
def test_profiler_trace_has_no_phase_ranges_when_nvtx_disabled(nvtx_off, device):
    names = _profiled_step_event_names(device)
    assert not [n for n in names if n.startswith("topk_distill/")]
    op = "topk_distill_emu::shard_pass" if device == "cuda_emu" else "topk_distill::shard_pass"
    assert op in names  # the ops themselves are still traced


def test_inplace_backward_is_also_a_backward_range(nvtx_on):
    names = _profiled_step_event_names("cpu", inplace_backward=True)
    assert "topk_distill/backward" in names


def test_nvtx_range_disabled_is_one_shared_noop_context(nvtx_off):
    a, b = _nvtx.nvtx_range("shard_pass"), _nvtx.nvtx_range("epilogue")
    assert a is b
    with a:
        with b:  # re-entrant
            pass


def test_nvtx_range_names_carry_the_prefix_once(nvtx_on):
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with _nvtx.nvtx_range("shard_pass"):
            pass
        with _nvtx.nvtx_range("topk_distill/epilogue"):
            pass
    names = {e.name for e in prof.events()}
    assert {"topk_distill/shard_pass", "topk_distill/epilogue"} <= names
    assert "topk_distill/topk_distill/epilogue" not in names


def test_set_enabled_returns_the_previous_setting(nvtx_off):
    assert _nvtx.set_enabled(True) is False
    assert _nvtx.is_enabled() and _nvtx.ENABLED
    assert _nvtx.set_enabled(False) is True
    assert not _nvtx.ENABLED


@pytest.mark.parametrize("value, expected", [("1", True), ("0", False), (None, False)])
def test_nvtx_env_var_is_read_at_import(value, expected):
    env = {k: v for k, v in os.environ.items() if k != "TOPK_DISTILL_NVTX"}
    if value is not None:
        env["TOPK_DISTILL_NVTX"] = value
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-c",
                          "import topk_distill._nvtx as n; print(n.ENABLED)"],
                         env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == str(expected)


# ----------------------------------------------------------------------------- tensor parallel

def _tp_worker(rank, world_size):
    from torch.profiler import ProfilerActivity, profile

    from topk_distill import _nvtx as nvtx

    nvtx.set_enabled(True)
    z, ids, lp = teacher_batch(8, 64, 4, logits_dtype=torch.float32)
    width = 64 // world_size
    x = z[:, rank * width:(rank + 1) * width].contiguous().requires_grad_()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out = td.topk_distill_loss(x, ids, lp, tp_group=dist.group.WORLD)
        out.loss.backward()
    return sorted({e.name for e in prof.events() if e.name.startswith("topk_distill/")})


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                    reason="needs torch.distributed with gloo")
def test_tp_trace_has_collectives_range():
    from _dist_utils import run_distributed

    for names in run_distributed(_tp_worker, world_size=2):
        assert set(PHASES_NO_TP) | {"topk_distill/collectives"} <= set(names), names
