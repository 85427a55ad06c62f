"""Everything to do on the day a GPU is lent, as one prepared command (``make gpu-check``).

    python -m tools.gpu_check --out DIR [--budget-s 520]

Runs on the GPU machine's own Python and torch (nothing is installed: the machine may have no
package registry), in this order, each step with its own time limit so that the whole stays
under ~9 minutes on one H100 / H200:

  1. environment   nvidia-smi, torch / CUDA versions, nvcc, compute-sanitizer
  2. build         the extension for this GPU's architecture only (setup.py build_ext --inplace)
  3. tests         the CUDA targets of the test suite: test_cuda_kernels.py (the CUDA kernels vs
                   the CPU kernels, CUDA graphs, allocation), the loss / op / hardening tests on
                   the "cuda" device
  4. sanitizer     compute-sanitizer memcheck, racecheck and synccheck on a small workload that
                   reaches every kernel and path (--sanitizer-workload: split rows, unaligned
                   rows, in place, warp and block epilogues, every dtype)
  5. benchmark     python -m benchmarks.cuda_bench --quick, then python -m benchmarks.features
                   --device cuda (labels / entropy / mixture / student top-k / layout costs) and
                   python -m benchmarks.repeated_ids --device cuda (a repeated id's cost)
  6. summary       DIR/summary.json and DIR/summary.md: each step's status, time and the numbers

Logs of each step go to DIR too - 7 files in all (the device tool brings back at most 8):
summary.json (the benchmarks' full results inside), summary.md, environment.log, build.log,
tests.log, sanitizer.log, benchmark.log.
A step that fails or runs out of time is recorded, and the later steps still run where they can.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# (name, seconds) - the per-step limits; their sum stays under the device tool's 10-minute call.
STEP_LIMITS = {"environment": 30, "build": 165, "tests": 120, "sanitizer": 90, "benchmark": 90,
               "features": 60, "repeated_ids": 15}

GPU_TESTS = [
    "tests/test_cuda_kernels.py", "tests/test_losses.py", "tests/test_ops.py",
    "tests/test_hardening.py", "tests/test_profiling.py",
]


def run(cmd, log, limit_s, env=None):
    """Run cmd (a list), appending its output to `log`; return (status, seconds)."""
    start = time.time()
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        try:
            rc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=env,
                                timeout=limit_s).returncode
            status = "ok" if rc == 0 else f"failed (exit {rc})"
        except subprocess.TimeoutExpired:
            status = f"timed out after {limit_s} s"
        except OSError as e:
            status = f"could not start: {e}"
    return status, round(time.time() - start, 1)


def tail(path, lines=15):
    try:
        return "".join(Path(path).read_text(errors="replace").splitlines(True)[-lines:])
    except OSError:
        return ""


def sanitizer_workload():
    """Small calls that reach every CUDA kernel and path once (run under compute-sanitizer):
    every dtype; the warp epilogue, the block epilogue (K > 256) and the split-row shard pass
    with its combine kernel; unaligned rows, 3-D strided logits (logits[:, :-1]), duplicates,
    padding; labels, entropy, a loss mixture and the student top-k; in place and not."""
    import torch

    import topk_distill as td

    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        for n, v, k in ((7, 1003, 9), (2, 70001, 300), (5, 600, 1100)):  # warp / split / block
            z = (torch.randn(n, v + 3, generator=g) * 3).to(dtype).cuda()[:, 1:v + 1]  # unaligned
            ids = torch.randint(0, v, (n, k), generator=g)
            ids[0, 1] = ids[0, 0]  # a duplicate
            ids[-1, -1] = -1  # padding
            lp = torch.log_softmax(torch.randn(n, k, generator=g), -1)
            labels = torch.randint(0, v, (n,), generator=g)
            for inplace in (False, True):
                leaf = z.clone().requires_grad_(True)
                # inplace_backward needs an intermediate (it refuses a leaf that requires grad)
                x = leaf * 1 if inplace else leaf
                out = td.topk_distill_loss(x, ids.cuda(), lp.cuda(), loss="jsd", support="tail",
                                           log_prob_min_clamp=-9.0, inplace_backward=inplace,
                                           labels=labels.cuda(), return_entropy=True,
                                           student_topk=min(k, 64))
                (out.loss + out.label_logprobs.sum() + out.entropy.sum()).backward()
        # 3-D strided logits: response positions of a [B, T + 1, V] tensor, a loss mixture
        big = torch.randn(2, 9, 4001, generator=g).to(dtype).cuda()
        x = big.requires_grad_(True).mul(1)[:, :-1]  # a view of an intermediate (in place)
        ids3 = torch.randint(0, 4001, (2, 8, 16), generator=g).cuda()
        lp3 = torch.log_softmax(torch.randn(2, 8, 16, generator=g), -1).cuda()
        td.topk_distill_loss(x, ids3, lp3, loss=[("fkl", "topk", 0.9), ("rkl", "renorm", 0.1)],
                             inplace_backward=True).loss.backward()
    torch.cuda.synchronize()
    print("sanitizer workload done")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder for summary.{json,md} and the logs")
    ap.add_argument("--sanitizer-workload", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.sanitizer_workload:
        sanitizer_workload()
        return 0

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    summary = {"host": platform.node(), "python": py, "steps": {}}
    steps = summary["steps"]

    # 1. environment
    env_log = out / "environment.log"
    for cmd in (["nvidia-smi"], [py, "-c", "import torch; print(torch.__version__, torch.version.cuda,"
                                      " torch.cuda.get_device_name(), torch.cuda.get_device_capability())"],
                ["nvcc", "--version"], ["compute-sanitizer", "--version"], ["git", "rev-parse", "HEAD"]):
        steps.setdefault("environment", [])
        steps["environment"].append((" ".join(cmd[:2]),) + run(cmd, env_log, STEP_LIMITS["environment"]))
    try:
        import torch
        summary["device"] = torch.cuda.get_device_name()
        summary["torch"] = torch.__version__
        summary["cuda"] = torch.version.cuda
        cap = torch.cuda.get_device_capability()
        arch = f"{cap[0]}.{cap[1]}"
    except Exception as e:  # noqa: BLE001 - recorded
        summary["device"] = f"unavailable: {e}"
        arch = "9.0"
    summary["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                                       text=True).stdout.strip() or "unknown"

    # 2. build (this GPU's architecture only; no pip installs)
    env = dict(os.environ, TORCH_CUDA_ARCH_LIST=arch, TOPK_DISTILL_CUDA="1",
               MAX_JOBS=str(min(16, os.cpu_count() or 2)))
    steps["build"] = run([py, "setup.py", "-q", "build_ext", "--inplace"], out / "build.log",
                         STEP_LIMITS["build"], env=env)

    # 3. tests on the real GPU (the cuda_emu targets run in CI anyway)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    steps["tests"] = run([py, "-m", "pytest", *GPU_TESTS, "-q", "-p", "no:cacheprovider",
                          "-k", "cuda and not cuda_emu and not emulated", "-rfEs",
                          ],
                         out / "tests.log", STEP_LIMITS["tests"], env=env)

    counts = [l for l in tail(out / "tests.log", 5).splitlines() if " passed" in l or " failed" in l]
    summary["tests_result"] = counts[-1].strip() if counts else "no pytest summary line"

    # 4. compute-sanitizer
    san_log = out / "sanitizer.log"
    sanitizer = shutil.which("compute-sanitizer")
    steps["sanitizer"] = {}
    per_tool = STEP_LIMITS["sanitizer"] // 3
    for tool in ("memcheck", "racecheck", "synccheck"):
        if sanitizer is None:
            steps["sanitizer"][tool] = ("compute-sanitizer not found", 0.0)
            continue
        steps["sanitizer"][tool] = run(
            [sanitizer, "--tool", tool, "--error-exitcode", "3", py, "-m", "tools.gpu_check",
             "--out", str(out), "--sanitizer-workload"], san_log, per_tool, env=env)

    # 5. benchmark (its own files go to a scratch folder; summary.json embeds them)
    scratch = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    bench = scratch / "cuda_bench.json"
    steps["benchmark"] = run([py, "-m", "benchmarks.cuda_bench", "--quick", "--out", str(bench)],
                             out / "benchmark.log", STEP_LIMITS["benchmark"], env=env)
    if bench.exists():
        summary["benchmark"] = json.loads(bench.read_text())
    steps["features"] = run([py, "-m", "benchmarks.features", "--device", "cuda", "--n", "8192",
                             "--v", "32768", "--reps", "10"], out / "benchmark.log",
                            STEP_LIMITS["features"], env=env)
    features = REPO / "benchmarks" / "results" / "features_cuda.json"
    if features.exists():
        summary["features"] = json.loads(features.read_text())
    steps["repeated_ids"] = run([py, "-m", "benchmarks.repeated_ids", "--device", "cuda"],
                                out / "benchmark.log", STEP_LIMITS["repeated_ids"], env=env)
    repeated = REPO / "benchmarks" / "results" / "repeated_ids_cuda.json"
    if repeated.exists():
        summary["repeated_ids"] = json.loads(repeated.read_text())

    # 6. summary
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = [f"# make gpu-check on {summary.get('device')}", "",
             f"torch {summary.get('torch')} (CUDA {summary.get('cuda')}), commit {summary['commit']}", "",
             "| step | status | seconds |", "| --- | --- | --- |"]
    lines.append(f"| build | {steps['build'][0]} | {steps['build'][1]} |")
    lines.append(f"| tests | {steps['tests'][0]}: {summary['tests_result']} | {steps['tests'][1]} |")
    for tool, (status, secs) in steps["sanitizer"].items():
        lines.append(f"| compute-sanitizer {tool} | {status} | {secs} |")
    lines.append(f"| benchmark | {steps['benchmark'][0]} | {steps['benchmark'][1]} |")
    lines.append(f"| features | {steps['features'][0]} | {steps['features'][1]} |")
    lines.append(f"| repeated_ids | {steps['repeated_ids'][0]} | {steps['repeated_ids'][1]} |")
    lines += ["", "## tests (tail)", "", "```", tail(out / "tests.log"), "```"]
    if bench.with_suffix(".md").exists():
        lines += ["", "## benchmark", "", bench.with_suffix(".md").read_text()]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:12 + len(steps["sanitizer"])]))
    ok = all(s[0] == "ok" for s in (steps["build"], steps["tests"], steps["benchmark"],
                                    steps["features"], *steps["sanitizer"].values()))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
