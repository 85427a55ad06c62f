"""Everything to do on the day a GPU is lent, as one prepared command (``make gpu-check``).

    python -m tools.gpu_check --out DIR [--budget-s 530]      # on the GPU machine
    python -m tools.gpu_check --out DIR --dry-run             # anywhere, no GPU (CI runs it)

Runs on the machine's own Python and torch (nothing is installed: the GPU machine has no package
registry), in this order, the whole inside one device call of at most 9 minutes (--budget-s; each
step gets the smaller of its own cap and what is left, less a reserve for the summary):

  1. environment   nvidia-smi, torch / CUDA versions, nvcc, compute-sanitizer, the commit
  2. build         the extension for the visible GPU's architecture only, MAX_JOBS = the cores
                   (setup.py build_ext --inplace; its own time is recorded)
  3. tests         the CUDA targets of the suite: test_cuda_kernels.py (the kernels vs the CPU op,
                   |z| ~ 1e4 rounding, CUDA graphs of the loss and of the fused LM head, the
                   allocator), the loss / op / hardening / profiling tests on the "cuda" device
  4. sanitizer     compute-sanitizer, one tool per dtype on a workload that reaches every kernel
                   and path (split rows, unaligned rows - every misalignment of a 16-byte pack -,
                   in place, warp and block epilogues, repeats, labels, entropy, a 3-D view):
                   memcheck on bf16 with PYTORCH_NO_CUDA_MEMORY_CACHING=1 (so that every tensor
                   is its own allocation and an overrun past it is seen), racecheck on fp32,
                   synccheck on fp16
  5. benchmark     benchmarks.cuda_bench --quick, benchmarks.features --device cuda,
                   benchmarks.repeated_ids --device cuda
  6. summary       DIR/summary.json and DIR/summary.md, rewritten after every step (and on
                   SIGTERM / SIGINT), so a call cut short still leaves what was done

Logs go to DIR too - 7 files (the device tool brings back at most 8): summary.json, summary.md,
environment.log, build.log, tests.log, sanitizer.log, benchmark.log.

--dry-run runs everything that needs no GPU: argument handling, the environment step, the build
against this interpreter as it is configured (TOPK_DISTILL_CUDA / TORCH_CUDA_ARCH_LIST from the
environment: after `make build` an incremental no-op), the test selection (collected, not run),
each sanitizer workload on its dtype under the CUDA emulator (CPU tensors: the same kernels and
the same calls, so its time is the proxy that sized them), the benchmarks' argument parsing, and
the summary writer. It fails where the real run would fail for a reason that is not the GPU's.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# Per-step caps in seconds. Their sum (520) stays inside the 9-minute device call with the machine
# already started; --budget-s is the hard total, each step gets min(cap, what is left - reserve).
# The build's cap: ~7m44s was measured on a 2-core box for two architectures plus the emulator
# objects; one architecture on 16 cores is bounded by the slowest translation unit (nvcc gets
# no parallelism from more cores within a file), which no GPU machine has timed yet.
STEP_CAPS = {"environment": 25, "build": 240, "tests": 100, "memcheck": 45, "racecheck": 45,
             "synccheck": 25, "benchmark": 25, "features": 15}
RESERVE_S = 5  # for the summary
# The dry run (CI, a development box) is not bound by the device call: its build is a no-op after
# `make build` but compiles on a box where sources changed, and collecting / importing is slower
# on a loaded 2-core machine than on the GPU machine.
DRY_RUN_CAPS = dict(STEP_CAPS, build=1200, tests=300, memcheck=180, racecheck=180, synccheck=180,
                    benchmark=120, features=120)
DRY_RUN_BUDGET_S = 3000.0

# One dtype per sanitizer tool, sized by the emulated-time proxy (docs/CUDA_EMULATION.md): each
# workload takes 6-12 s under the emulator on a loaded 2-core box (the old all-dtype workload,
# which every tool ran in 30 s, was about four times as large).
SANITIZER_DTYPES = {"memcheck": "bf16", "racecheck": "fp32", "synccheck": "fp16"}
# (CUDA_MODULE_LOADING=LAZY: only the kernels the workload launches are loaded, and instrumented)
SANITIZER_ENV = {"memcheck": {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1", "CUDA_MODULE_LOADING": "LAZY"},
                 "racecheck": {"CUDA_MODULE_LOADING": "LAZY"},
                 "synccheck": {"CUDA_MODULE_LOADING": "LAZY"}}

GPU_TESTS = [
    "tests/test_cuda_kernels.py", "tests/test_losses.py", "tests/test_ops.py",
    "tests/test_hardening.py", "tests/test_profiling.py",
]
GPU_TEST_FILTER = "cuda and not cuda_emu and not emulated"

BENCHMARKS = {  # step -> (argv after -m, results file it writes, if any)
    "benchmark": (["benchmarks.cuda_bench", "--quick", "--reps", "10", "--warmup", "3"], None),
    "features": (["benchmarks.features", "--device", "cuda", "--n", "8192", "--v", "32768",
                  "--reps", "5"], "features_cuda.json"),
}


class Check:
    """The run's state: a deadline, the steps recorded so far and the summary writer."""

    def __init__(self, out: Path, budget_s: float, dry_run: bool):
        self.out = out
        self.dry_run = dry_run
        self.deadline = time.time() + budget_s
        self.summary = {"mode": "dry-run (no GPU)" if dry_run else "gpu", "host": platform.node(),
                        "python": sys.executable, "budget_s": budget_s, "steps": {}}

    # -- steps
    def limit(self, step: str) -> float:
        caps = DRY_RUN_CAPS if self.dry_run else STEP_CAPS
        return max(0.0, min(caps[step], self.deadline - time.time() - RESERVE_S))

    def run(self, step: str, cmd, log: str, env=None, limit=None):
        """Runs cmd (a list) with the step's time limit, its output appended to DIR/log; records
        (status, seconds) under `step` and rewrites the summary."""
        limit = self.limit(step) if limit is None else limit
        if limit < 1:
            return self.record(step, "skipped: the budget is spent", 0.0)
        start = time.time()
        with open(self.out / log, "a") as f:
            f.write(f"\n$ {' '.join(map(str, cmd))}   (limit {limit:.0f} s)\n")
            f.flush()
            try:
                rc = subprocess.run([str(c) for c in cmd], cwd=REPO, stdout=f,
                                    stderr=subprocess.STDOUT, env=env, timeout=limit).returncode
                status = "ok" if rc == 0 else f"failed (exit {rc})"
            except subprocess.TimeoutExpired:
                status = f"timed out after {limit:.0f} s"
            except OSError as e:
                status = f"could not start: {e}"
        return self.record(step, status, time.time() - start)

    def record(self, step: str, status: str, seconds: float, **extra):
        self.summary["steps"][step] = {"status": status, "seconds": round(seconds, 1), **extra}
        self.write_summary()
        return status

    # -- summary (after every step, so that a run cut short still leaves one)
    def write_summary(self):
        s = self.summary
        (self.out / "summary.json").write_text(json.dumps(s, indent=2, default=str) + "\n")
        lines = [f"# make gpu-check{' --dry-run' if self.dry_run else ''} on {s.get('device', '?')}",
                 "", f"torch {s.get('torch')} (CUDA {s.get('cuda')}), commit {s.get('commit')}, "
                 f"budget {s['budget_s']} s", "", "| step | status | seconds |", "| --- | --- | --- |"]
        for name, st in s["steps"].items():
            detail = f" ({st['detail']})" if st.get("detail") else ""
            lines.append(f"| {name} | {st['status']}{detail} | {st['seconds']} |")
        if s.get("tests_result"):
            lines += ["", f"tests: {s['tests_result']}"]
        tests_tail = tail(self.out / "tests.log")
        if tests_tail:
            lines += ["", "## tests (tail)", "", "```", tests_tail.rstrip(), "```"]
        if s.get("benchmark_md"):
            lines += ["", "## benchmark", "", s["benchmark_md"]]
        (self.out / "summary.md").write_text("\n".join(lines) + "\n")
        return lines

    def ok(self) -> bool:
        return all(st["status"] == "ok" for name, st in self.summary["steps"].items()
                   if name != "environment")


def tail(path, lines=15):
    try:
        return "".join(Path(path).read_text(errors="replace").splitlines(True)[-lines:])
    except OSError:
        return ""


# ---------------------------------------------------------------------------------------------
# The sanitizer workload: run inside compute-sanitizer on the GPU, or under the emulator (the
# dry run, and the emulated-time proxy that sized it).
# ---------------------------------------------------------------------------------------------

DTYPE_NAMES = ("fp32", "bf16", "fp16", "fp64")


def workload_calls(dtype_name: str):
    """The calls of the sanitizer workload for one dtype, built on the CPU, as (description,
    base, view, kwargs): the loss runs on view(base), base being the leaf. Every kernel and path
    once - the warp epilogue (K <= 256), the block epilogue (K > 256), the split-row shard pass
    with its combine kernel (few long rows), rows misaligned by 1, 2, 3 elements (each a
    different composition of a 16-byte pack, fp64 has only 1) that end where their storage ends
    (an overrun past a row is outside the allocation under memcheck without caching), a 3-D
    strided view, duplicates, padding, labels, entropy, a loss mixture, the student top-k, the
    in-place backward and the out-of-place one."""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
             "fp64": torch.float64}[dtype_name]
    vec = 16 // torch.empty((), dtype=dtype).element_size()
    g = torch.Generator().manual_seed(0)
    calls = []
    shapes = [("warp epilogue", 7, 1003, 9), ("split rows", 2, 40001, 300),
              ("block epilogue", 3, 600, 309)]
    for i, (what, n, v, k) in enumerate(shapes):
        mis = 1 + i % (vec - 1)
        base = (torch.randn(n, v + mis, generator=g) * 3).to(dtype)
        ids = torch.randint(0, v, (n, k), generator=g)
        ids[0, 1] = ids[0, 0]  # a duplicate
        ids[-1, -1] = -1  # padding
        lp = torch.log_softmax(torch.randn(n, k, generator=g), -1)
        labels = torch.randint(0, v, (n,), generator=g)
        for inplace in (False, True):
            calls.append((f"{what}, {n}x{v}, K={k}, misaligned by {mis}, in place={inplace}",
                          base, lambda t, m=mis: t[:, m:],
                          dict(teacher_ids=ids, teacher_logprobs=lp, loss="jsd", support="tail",
                               log_prob_min_clamp=-9.0, inplace_backward=inplace, labels=labels,
                               return_entropy=True, student_topk=min(k, 16))))
    big = torch.randn(2, 9, 4001, generator=g).to(dtype)
    calls.append(("3-D strided view [:, :-1], a loss mixture, in place", big,
                  lambda t: t[:, :-1],
                  dict(teacher_ids=torch.randint(0, 4001, (2, 8, 16), generator=g),
                       teacher_logprobs=torch.log_softmax(torch.randn(2, 8, 16, generator=g), -1),
                       loss=[("fkl", "topk", 0.9), ("rkl", "renorm", 0.1)],
                       inplace_backward=True)))
    return calls


def sanitizer_workload(dtype_name: str, device: str) -> float:
    """Runs the workload's calls (forward and backward) on `device` ("cuda", or "cpu" under the
    emulated backend); returns the seconds it took."""
    import torch

    import topk_distill as td
    from topk_distill import ops

    start = time.time()
    with ops.use_backend("emulated_cuda" if device == "cpu" else "native"):
        for _what, base, view, kw in workload_calls(dtype_name):
            kw = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
            leaf = base.to(device).requires_grad_(True)
            # inplace_backward refuses a leaf (or a view of one) that requires grad: the
            # in-place calls run on an intermediate of the same shape, as a trainer's logits are
            src = leaf.mul(1) if kw.get("inplace_backward") else leaf
            out = td.topk_distill_loss(view(src), check_inputs=True, **kw)
            total = out.loss
            if kw.get("labels") is not None:
                total = total + out.label_logprobs.sum()
            if kw.get("return_entropy"):
                total = total + out.entropy.sum()
            total.backward()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.time() - start


# ---------------------------------------------------------------------------------------------


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m tools.gpu_check",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder for summary.{json,md} and the logs")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="hard limit of the whole run in seconds (default 530; dry run 3000)")
    ap.add_argument("--dry-run", action="store_true",
                    help="run everything that needs no GPU (CI): see the module's doc")
    ap.add_argument("--sanitizer-workload", choices=DTYPE_NAMES, help=argparse.SUPPRESS)
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.budget_s is None:
        args.budget_s = DRY_RUN_BUDGET_S if args.dry_run else 530.0
    if args.budget_s <= RESERVE_S:
        ap.error(f"--budget-s must be more than {RESERVE_S} seconds; got {args.budget_s}")
    if args.sanitizer_workload:
        secs = sanitizer_workload(args.sanitizer_workload, args.device)
        print(f"sanitizer workload ({args.sanitizer_workload}, {args.device}) done in {secs:.1f} s")
        return 0

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for f in ("environment.log", "build.log", "tests.log", "sanitizer.log", "benchmark.log"):
        (out / f).write_text("")
    chk = Check(out, args.budget_s, args.dry_run)

    def on_signal(signum, _frame):  # the device tool's timeout: leave the summary behind
        chk.summary["interrupted"] = signal.Signals(signum).name
        chk.write_summary()
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    py = sys.executable
    env = dict(os.environ, PYTHONPATH=str(REPO))

    # 1. environment
    start = time.time()
    for cmd in (["nvidia-smi"], [py, "-c", "import torch; print(torch.__version__, torch.version.cuda,"
                                      " torch.cuda.is_available())"],
                ["nvcc", "--version"], ["compute-sanitizer", "--version"]):
        chk.run("environment", cmd, "environment.log", limit=10)
    chk.summary["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                                           text=True).stdout.strip() or "unknown"
    import torch

    chk.summary["torch"], chk.summary["cuda"] = torch.__version__, torch.version.cuda
    arch = None
    if torch.cuda.is_available():
        cap = torch.cuda.get_device_capability()
        arch = f"{cap[0]}.{cap[1]}"
        chk.summary["device"] = f"{torch.cuda.get_device_name()} (sm_{cap[0]}{cap[1]})"
    else:
        chk.summary["device"] = "no CUDA device"
    if not args.dry_run and arch is None:
        chk.record("environment", "failed: no CUDA device is visible (use --dry-run without one)",
                   time.time() - start)
        return 1
    chk.record("environment", "ok", time.time() - start)

    # 2. build: this GPU's architecture only, every core (dry run: as this environment configures
    # it, which after `make build` is an incremental no-op)
    benv = dict(os.environ)
    if not args.dry_run:
        benv.update(TORCH_CUDA_ARCH_LIST=arch, TOPK_DISTILL_CUDA="1",
                    MAX_JOBS=str(os.cpu_count() or 2))
    chk.run("build", [py, "setup.py", "-q", "build_ext", "--inplace"], "build.log", env=benv)
    chk.summary["steps"]["build"]["detail"] = (
        f"TORCH_CUDA_ARCH_LIST={benv.get('TORCH_CUDA_ARCH_LIST', '(default)')}, "
        f"TOPK_DISTILL_CUDA={benv.get('TOPK_DISTILL_CUDA', 'auto')}, MAX_JOBS={benv.get('MAX_JOBS', '2')}")

    # 3. tests on the real GPU (their cuda_emu twins run in CI); dry run: the selection collected
    pytest = [py, "-m", "pytest", *GPU_TESTS, "-q", "-p", "no:cacheprovider", "-k", GPU_TEST_FILTER]
    if args.dry_run:
        chk.run("tests", pytest + ["--collect-only"], "tests.log", env=env)
    else:
        chk.run("tests", pytest + ["-rfEs"], "tests.log", env=env)
    counts = [l for l in tail(out / "tests.log", 5).splitlines()
              if " passed" in l or " failed" in l or " selected" in l or " collected" in l]
    chk.summary["tests_result"] = counts[-1].strip() if counts else "no pytest summary line"
    chk.write_summary()

    # 4. compute-sanitizer, one dtype per tool; dry run: each workload under the emulator
    sanitizer = shutil.which("compute-sanitizer")
    for tool, dtype in SANITIZER_DTYPES.items():
        workload = [py, "-m", "tools.gpu_check", "--out", out, "--sanitizer-workload", dtype]
        tenv = dict(env, **SANITIZER_ENV.get(tool, {}))
        if args.dry_run:
            chk.run(tool, workload + ["--device", "cpu"], "sanitizer.log", env=tenv)
            chk.summary["steps"][tool]["detail"] = f"{dtype} under the emulator (no sanitizer)"
        elif sanitizer is None:
            chk.record(tool, "skipped: compute-sanitizer not found", 0.0)
        else:
            chk.run(tool, [sanitizer, "--tool", tool, "--error-exitcode", "3", *workload], "sanitizer.log",
                    env=tenv)
            chk.summary["steps"][tool]["detail"] = dtype
        chk.write_summary()

    # 5. benchmarks (their files go to a scratch folder; summary.json embeds them); dry run:
    # their argument parsing only
    scratch = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    for step, (argv_, results) in BENCHMARKS.items():
        cmd = [py, "-m", *argv_]
        if step == "benchmark":
            cmd += ["--out", scratch / "cuda_bench.json"]
        if args.dry_run:
            chk.run(step, [py, "-m", argv_[0], "--help"], "benchmark.log", env=env)
            continue
        chk.run(step, cmd, "benchmark.log", env=env)
        path = scratch / "cuda_bench.json" if step == "benchmark" else REPO / "benchmarks" / "results" / results
        if path.exists():
            chk.summary[step] = json.loads(path.read_text())
            md = path.with_suffix(".md")
            if step == "benchmark" and md.exists():
                chk.summary["benchmark_md"] = md.read_text()
        chk.write_summary()

    # 6. summary
    lines = chk.write_summary()
    print("\n".join(lines[:6 + len(chk.summary["steps"])]))
    return 0 if chk.ok() else 1


if __name__ == "__main__":
    sys.exit(main())
