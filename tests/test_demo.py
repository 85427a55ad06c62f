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


# ----------------------------------------------------------------------------- --on-policy

def test_tiny_on_policy_runs_and_reports(tiny, capsys):
    """``--on-policy`` on the tiny run's cache: every (loss, support, K) run and the
    full-vocabulary references train, are evaluated both ways and get a gradient cosine."""
    from demo.cli import main

    out, _, _ = tiny
    threads = torch.get_num_threads()
    try:
        rc = main(["--on-policy", "--tiny", "--out", str(out), "--no-progress", "--threads", "1",
                   "--ks", "1,4", "--steps", "4", "--impl", "reference"])
    finally:
        torch.set_num_threads(threads)
    stdout = capsys.readouterr().out
    assert rc == 0, stdout
    assert "teacher: cached" in stdout
    for name in ("onpolicy.md", "onpolicy.json", "onpolicy.png"):
        assert (out / name).stat().st_size > 0, name
    with open(out / "onpolicy.json") as f:
        result = json.load(f)
    op = result["onpolicy"]
    names = [r["model"] for r in op["rows"]]
    expected = [f"{lo}/{su}/K{k}" for lo in ("fkl", "rkl", "jsd") for su in ("topk", "tail", "sampled")
                for k in (1, 4)]
    assert sorted(names) == sorted(expected + ["fkl/full", "rkl/full", "jsd/full"])
    assert [b["model"] for b in op["baselines"]] == ["teacher", "warm start (before on-policy)"]
    assert op["baselines"][0]["fkl_text"] == pytest.approx(0.0, abs=1e-5)
    for r in op["rows"] + op["baselines"][1:]:
        for key in ("fkl_text", "rkl_text", "fkl_own", "rkl_own"):
            assert math.isfinite(r[key]) and r[key] > 0, (r["model"], key)
    for r in op["rows"]:
        assert -1 <= r["cos_mean"] <= 1 and math.isfinite(r["cos_of_mean"]), r["model"]
        assert len(result["onpolicy"]["curves"][r["model"]]["loss"]) == 4
        if r["support"] == "full":
            assert r["cos_mean"] == 1.0
        elif r["support"] == "sampled":   # one estimate per draw of the sampled tokens
            assert r["draws"] == op["gradient"]["draws"] > 1 and r["cos_std"] > 0, r["model"]
        else:                              # deterministic given the batch
            assert r["draws"] == 1 and r["cos_std"] == 0.0, r["model"]
    md = (out / "onpolicy.md").read_text()
    assert "python -m demo --on-policy" in md and "Commit:" in md and "| fkl/sampled/K4 |" in md


@pytest.mark.parametrize("argv, message", [
    (["--on-policy", "--support", "renorm"], "--support: unknown ['renorm'] with --on-policy"),
    (["--on-policy", "--loss", "tvd"], "--loss: unknown ['tvd'] with --on-policy"),
    (["--on-policy", "--ks", "1,x"], "--ks must be a comma list of integers"),
    (["--on-policy", "--ks", "0"], "--ks: every K must be in [1, 320]"),
    (["--on-policy", "--tp", "2"], "--on-policy runs with --tp 1 only"),
])
def test_on_policy_bad_arguments_are_clear_errors(argv, message, capsys):
    from demo.cli import parse_args

    with pytest.raises(SystemExit) as e:
        parse_args(["--tiny", *argv])
    assert e.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("loss", ["fkl", "rkl", "jsd"])
def test_sampled_estimator_is_unbiased_in_the_demo(tiny, loss):
    """In the demo's own setting - its tiny teacher, a student's own samples, the teacher scored
    as the server does, demo.onpolicy.estimator_loss - the mean of the sampled estimator's
    gradient over every possible sampled token (exact enumeration, weighted by the student's
    probabilities) is the full-vocabulary gradient; topk's is not."""
    from demo.onpolicy import (OnPolicyRun, estimator_loss, generated_mask, sample_continuations,
                               teacher_scores)
    from demo.pipeline import TINY, get_teacher, prepare_data
    from topk_distill.reference import topk_distill_loss

    out, _, _ = tiny
    cache = str(out / "cache")
    data = prepare_data(TINY, cache, log=lambda m: None)
    teacher, _ = get_teacher(TINY, data, 0, torch.device("cpu"), cache, progress=False,
                             log=lambda m: None)
    gen = torch.Generator().manual_seed(3)
    prompts = torch.from_numpy(data.train[:2 * 8].astype("int64")).view(2, 8)
    seq = sample_continuations(teacher, prompts, 20, gen)    # any sampler: positions are fixed
    sc = teacher_scores(teacher, seq, 4)
    # float64 throughout, so that the identity holds to float64 rounding
    sc.logprobs, sc.sampled_lp, sc.full_lp = (sc.logprobs.double(), sc.sampled_lp.double(),
                                              sc.full_lp.double())
    mask = generated_mask(seq.shape, 8, seq.device)
    g = torch.Generator().manual_seed(4)
    z = (torch.randn(*seq[:, :-1].shape, TINY.vocab_size, generator=g, dtype=torch.float64) * 2)
    z = z.requires_grad_()
    q = torch.softmax(z, -1).detach()

    def grad(value):
        return torch.autograd.grad(value, z, retain_graph=True)[0]

    full = grad(estimator_loss(topk_distill_loss, OnPolicyRun(loss, "full", None), z, sc,
                               seq[:, 1:], mask))
    run = OnPolicyRun(loss, "sampled", 4)
    mean = torch.zeros(())
    for v in range(TINY.vocab_size):
        y = torch.full_like(seq[:, 1:], v)
        rows = estimator_loss(topk_distill_loss, run, z, sc, y, mask, sc.full_lp[..., v],
                              reduction="none")
        mean = mean + (q[..., v] * rows).sum() / mask.sum()
    torch.testing.assert_close(grad(mean), full, rtol=1e-9, atol=1e-12)
    topk = grad(estimator_loss(topk_distill_loss, OnPolicyRun(loss, "topk", 4), z, sc,
                               seq[:, 1:], mask))
    assert (topk - full).abs().max() > 1e-3
