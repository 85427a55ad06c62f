"""``python -m benchmarks.profile`` (``make profile``): one representative training step, profiled.

The step: ``topk_distill_loss`` forward + backward, loss=fkl, at a mid shape (CPU: N=512,
V=32000, K=64; CUDA: N=4096, V=128256, K=64), fp32 (``--dtype bf16`` for bf16), with
``TOPK_DISTILL_NVTX=1`` so that the phases show as ``topk_distill/shard_pass``,
``topk_distill/collectives`` (TP only), ``topk_distill/epilogue`` and ``topk_distill/backward``.

* CUDA and ``nsys`` on PATH: re-runs itself under
  ``nsys profile -t cuda,nvtx -o benchmarks/results/profile_cuda`` and prints
  ``nsys stats`` (NVTX ranges and kernels) of the report.
* Otherwise: ``torch.profiler`` (CPU, plus CUDA activity when present) writes a Chrome trace to
  ``benchmarks/results/profile_<device>.json`` (open it in https://ui.perfetto.dev or
  chrome://tracing) and prints the top ops.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("TOPK_DISTILL_NVTX", "1")  # before topk_distill is imported

import torch  # noqa: E402

from . import common  # noqa: E402

SHAPES = {"cpu": (512, 32000, 64), "cuda": (4096, 128256, 64)}


def _step_fn(device: torch.device, dtype: torch.dtype, loss: str):
    import topk_distill as td

    n, v, k = SHAPES[device.type]
    z, ids, lp = common.make_inputs(n, v, k, dtype, device)
    x = z.requires_grad_()

    def step():
        x.grad = None
        td.topk_distill_loss(x, ids, lp, loss=loss).loss.backward()

    return step, (n, v, k)


def run_steps(device, dtype, loss, steps: int, warmup: int = 3):
    step, shape = _step_fn(device, dtype, loss)
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return step, shape


def with_nsys(args, out_dir: Path) -> int:
    nsys = shutil.which("nsys")
    report = out_dir / "profile_cuda"
    cmd = [nsys, "profile", "-t", "cuda,nvtx", "--capture-range=cudaProfilerApi",
           "--capture-range-end=stop", "--force-overwrite", "true", "-o", str(report),
           sys.executable, "-m", "benchmarks.profile", "--inner", "--device", "cuda",
           "--dtype", args.dtype, "--loss", args.loss, "--steps", str(args.steps)]
    print("running:", " ".join(cmd), flush=True)
    env = dict(os.environ, TOPK_DISTILL_NVTX="1")
    rc = subprocess.call(cmd, env=env)
    if rc != 0:
        return rc
    rep = report.with_suffix(".nsys-rep")
    for kind in ("nvtx_sum", "cuda_gpu_kern_sum"):
        subprocess.call([nsys, "stats", "--report", kind, "--format", "table", str(rep)])
    print(f"\nnsys report: {rep}  (open in Nsight Systems; NVTX ranges are topk_distill/<phase>)")
    return 0


def with_torch_profiler(args, device: torch.device, out_dir: Path) -> int:
    from torch.profiler import ProfilerActivity, profile

    from topk_distill import _nvtx

    _nvtx.set_enabled(True)
    step, (n, v, k) = run_steps(device, common.DTYPES[args.dtype], args.loss, args.steps)
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities, record_shapes=True, profile_memory=True) as prof:
        for _ in range(args.steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    trace = out_dir / f"profile_{device.type}.json"
    prof.export_chrome_trace(str(trace))
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"{args.steps} steps of topk_distill_loss(loss={args.loss!r}) forward+backward, "
          f"N={n} V={v} K={k} {args.dtype} on {common.device_description(device)}\n")
    print(prof.key_averages().table(sort_by=sort, row_limit=args.top))
    phases = {e.key: e for e in prof.key_averages() if e.key.startswith("topk_distill/")}
    if phases:
        print("phase ranges (per step):")
        for name, e in sorted(phases.items()):
            t = (e.device_time_total if device.type == "cuda" else e.cpu_time_total) / args.steps
            print(f"  {name:28s} {t / 1e3:8.3f} ms  ({e.count // args.steps} per step)")
    else:
        print("note: no topk_distill/<phase> ranges in the trace - topk_distill/losses.py does "
              "not wrap its phases in _nvtx.nvtx_range yet (see docs/PERFORMANCE.md)")
    print(f"\nChrome trace: {trace}  (open in https://ui.perfetto.dev or chrome://tracing)")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.profile",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--loss", default="fkl")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--top", type=int, default=20, help="rows of the ops table")
    ap.add_argument("--out", default=str(common.RESULTS))
    ap.add_argument("--no-nsys", action="store_true", help="use torch.profiler even with nsys")
    ap.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)  # run under nsys
    args = ap.parse_args(argv)
    device = common.pick_device(args.device)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.inner:  # the profiled process under nsys: just the steps, NVTX on
        step, _ = run_steps(device, common.DTYPES[args.dtype], args.loss, args.steps)
        torch.cuda.profiler.start()
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()
        return 0
    if device.type == "cuda" and shutil.which("nsys") and not args.no_nsys:
        return with_nsys(args, out_dir)
    return with_torch_profiler(args, device, out_dir)


if __name__ == "__main__":
    sys.exit(main())
