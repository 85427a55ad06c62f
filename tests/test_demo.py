"""The demo (``python -m demo``, ``make demo``) end to end, at its ``--tiny`` size.

One tiny run trains the teacher, extracts its top-k, distils every default student and writes
the table and the PNG (about 10-20 s on 2 cores); the ``--tp 2`` run reuses its cache and
checks that the vocab-sharded LM head reproduces the TP=1 curves.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_demo(*args, timeout=300):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-m", "demo", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    return proc


def _fail_text(proc) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-6000:]}\n--- stderr\n{proc.stderr[-6000:]}"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo_out")
    proc = run_demo("--tiny", "--out", str(out), "--no-progress", "--threads", "1")
    assert proc.returncode == 0, _fail_text(proc)
    with open(out / "results.json") as f:
        result = json.load(f)
    return out, proc, result


def test_tiny_demo_writes_table_and_png(tiny):
    out, proc, result = tiny
    for name in ("results.md", "results.json", "curves.png"):
        assert (out / name).stat().st_size > 0, name
    with open(out / "curves.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    md = (out / "results.md").read_text()
    assert "| teacher |" in md and "![training curves](curves.png)" in md
    # The table is printed at the end of the run, one line per model.
    models = [r["model"] for r in result["rows"]]
    assert models[:2] == ["teacher", "student (untrained)"]
    for m in models:
        assert m in proc.stdout, m
    assert {"fkl/topk", "rkl/topk", "jsd/topk", "fkl/tail", "tvd/renorm",
            "ce (hard labels)"} <= set(models)
    # Compact top-k storage: int16 ids, fp16 log-probs, K = 32.
    assert "int16 ids + fp16 log-probs" in proc.stdout
    assert result["settings"]["k"] == 32


def test_tiny_demo_numbers_are_finite_and_students_improve(tiny):
    _, _, result = tiny
    rows = {r["model"]: r for r in result["rows"]}
    for name, r in rows.items():
        for key in ("kl", "top1", "ppl", "mass_at_k"):
            assert math.isfinite(r[key]), (name, key, r[key])
        assert 0.0 <= r["top1"] <= 1.0 and 0.0 <= r["mass_at_k"] <= 1.0 + 1e-6
    assert rows["teacher"]["kl"] == pytest.approx(0.0, abs=1e-5)
    assert rows["teacher"]["top1"] == 1.0
    untrained = rows["student (untrained)"]["kl"]
    for name, curve in result["curves"].items():
        assert all(math.isfinite(x) for x in curve["loss"] + curve["mass"] + curve["eval_kl"])
        assert len(curve["loss"]) == result["settings"]["student_steps"]
        # Every student ends closer to the teacher than it started, on held-out text.
        assert curve["eval_kl"][-1] < curve["eval_kl"][0], name
        assert rows[name]["kl"] < untrained, name
    # The KL-type losses go down over training.
    for name in ("fkl/topk", "fkl/tail", "jsd/topk"):
        c = result["curves"][name]["loss"]
        assert sum(c[-5:]) < sum(c[:5]), name


def test_cached_rerun_and_single_loss(tiny, capsys):
    """In-process (no second torch import): the cache is reused, one (loss, support) runs."""
    from demo.cli import main

    out, _, _ = tiny
    threads = torch.get_num_threads()
    try:
        rc = main(["--tiny", "--out", str(out), "--no-progress", "--threads", "1",
                   "--loss", "srkl", "--support", "tail", "--steps", "10", "--k", "32"])
    finally:
        torch.set_num_threads(threads)
    stdout = capsys.readouterr().out
    assert rc == 0, stdout
    assert "teacher: cached" in stdout and "top-k: cached" in stdout
    with open(out / "results.json") as f:
        result = json.load(f)
    assert [r["model"] for r in result["rows"]] == ["teacher", "student (untrained)", "srkl/tail"]
    assert len(result["curves"]["srkl/tail"]["loss"]) == 10


@pytest.mark.parametrize("argv, message", [
    (["--loss", "kl"], "--loss: unknown ['kl']"),
    (["--loss", "fkl", "--support", "full"], "--support: unknown ['full']"),
    (["--tp", "3"], "--tp must divide the vocab size 320"),
    (["--k", "0"], "--k must be in [1, 320]"),
    (["--device", "tpu"], "--device must be cpu, cuda or cuda:N, not 'tpu'"),
    (["--device", "meta"], "--device must be cpu, cuda or cuda:N, not 'meta'"),
])
def test_bad_arguments_are_clear_errors(argv, message, capsys):
    from demo.cli import parse_args

    with pytest.raises(SystemExit) as e:
        parse_args(["--tiny", *argv])
    assert e.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_device_cuda_without_a_gpu_is_a_clear_error(capsys):
    from demo.cli import parse_args

    with pytest.raises(SystemExit) as e:
        parse_args(["--tiny", "--device", "cuda"])
    assert e.value.code == 2 and "sees no CUDA device" in capsys.readouterr().err


def test_compare_curves_flags_a_difference():
    from demo.cli import compare_curves

    c = {"loss": [1.0, 0.5], "mass": [0.1, 0.2], "eval_kl": [2.0, 1.0]}
    rows = [{"model": "fkl/topk", "kl": 1.0}]
    assert compare_curves({"fkl/topk": c}, {"fkl/topk": c}, rows, rows)["ok"]
    off = dict(c, loss=[1.0, 0.51])
    check = compare_curves({"fkl/topk": off}, {"fkl/topk": c}, rows, rows)
    assert not check["ok"] and check["runs"]["fkl/topk"]["max_abs_loss"] == pytest.approx(0.01)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
def test_tiny_demo_tp2_matches_tp1(tiny):
    out, _, _ = tiny
    proc = run_demo("--tiny", "--out", str(out), "--no-progress", "--threads", "2",
                    "--loss", "fkl,jsd", "--support", "topk,tail", "--steps", "15", "--tp", "2")
    assert proc.returncode == 0, _fail_text(proc)
    assert "TP=2 vs TP=1 training curves" in proc.stdout
    with open(out / "results.json") as f:
        result = json.load(f)
    check = result["tp_check"]
    assert check["ok"], check
    assert set(check["runs"]) == {"fkl/topk", "fkl/tail", "jsd/topk", "jsd/tail"}
    for name, c in check["runs"].items():
        assert c["max_rel_loss"] < 1e-4 and c["final_kl_diff"] < 1e-4, (name, c)
    assert {r["model"] for r in result["rows"]} >= {"fkl/topk (TP=2)", "jsd/tail (TP=2)"}
