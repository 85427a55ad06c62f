"""tools.gpu_check without a GPU: its argument handling, the time limits of its steps, the
summary it writes even when a step runs out of time, and the sanitizer workload's construction.
(CI also runs the whole dry run: `make gpu-check-dry-run`, .ci/run.)"""
import json
import sys

import pytest

from tools import gpu_check


def test_budget_must_leave_time_for_the_summary(tmp_path, capsys):
    with pytest.raises(SystemExit):
        gpu_check.main(["--out", str(tmp_path), "--budget-s", "3"])
    assert "--budget-s must be more than" in capsys.readouterr().err


def test_a_step_that_runs_out_of_time_is_recorded_and_the_summary_written(tmp_path):
    chk = gpu_check.Check(tmp_path, budget_s=gpu_check.RESERVE_S + 2, dry_run=True)
    status = chk.run("tests", [sys.executable, "-c", "import time; time.sleep(30)"], "tests.log")
    assert status.startswith("timed out after")
    status = chk.run("memcheck", [sys.executable, "-c", "pass"], "sanitizer.log")
    assert status == "skipped: the budget is spent"
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"]["tests"]["status"].startswith("timed out")
    assert summary["steps"]["memcheck"]["status"] == "skipped: the budget is spent"
    md = (tmp_path / "summary.md").read_text()
    assert "| tests | timed out after" in md and "| memcheck | skipped" in md
    assert not chk.ok()


def test_step_caps_fit_one_device_call():
    # one call of at most 9 minutes with the machine started: the caps and the reserve inside it
    assert sum(gpu_check.STEP_CAPS.values()) + gpu_check.RESERVE_S <= 540
    assert set(gpu_check.SANITIZER_DTYPES) == {"memcheck", "racecheck", "synccheck"}
    assert len(set(gpu_check.SANITIZER_DTYPES.values())) == 3  # one dtype per tool
    assert gpu_check.SANITIZER_ENV["memcheck"]["PYTORCH_NO_CUDA_MEMORY_CACHING"] == "1"


@pytest.mark.parametrize("dtype", gpu_check.DTYPE_NAMES)
def test_sanitizer_workload_reaches_every_path(dtype):
    import torch

    calls = gpu_check.workload_calls(dtype)
    vec = 16 // torch.empty((), dtype=calls[0][1].dtype).element_size()
    kinds = {what.split(",")[0] for what, *_ in calls}
    assert {"warp epilogue", "split rows", "block epilogue"} <= kinds
    ks = [kw["teacher_ids"].shape[-1] for _, _, _, kw in calls]
    assert min(ks) <= 256 < max(ks)  # the warp and the block epilogue
    mis = set()
    for what, base, view, kw in calls:
        z = view(base)
        if z.dim() == 2:
            mis.add((z.storage_offset() * z.element_size()) % 16 // z.element_size())
            # the view's last row ends where the storage does: an overrun leaves the allocation
            assert z.storage_offset() + z.stride(0) * (z.shape[0] - 1) + z.shape[1] == base.numel()
        assert any(kw.get("inplace_backward") for _, _, _, kw in calls)
    assert len(mis) == min(3, vec - 1) and 0 not in mis
