"""Fused linear + top-k distillation vs the unfused path vs plain PyTorch: time and peak memory.

    python -m benchmarks.fused_linear                         # CPU, and CUDA when available
    python -m benchmarks.fused_linear --device cpu --shapes 4096x32000x256 --reps 3

Per shape (N rows, V vocab, H hidden; K = 32 teacher entries; loss fkl, support topk) and
method, one forward + backward of the loss w.r.t. hidden, weight and bias:

  fused     topk_distill.fused_linear_topk_distill_loss(hidden, weight, ..., bias=bias)
  unfused   topk_distill.topk_distill_loss(hidden @ weight.T + bias, ...)
  plain     topk_distill.reference.topk_distill_loss(hidden @ weight.T + bias, ...) - what users
            write today (log_softmax over [N, V] in fp32 + autograd)
  gemms     the three GEMMs alone, unchunked: logits = hidden @ weight.T + bias, then
            grad_logits @ weight and grad_logits.T @ hidden (the floor for any LM head + loss)
  gemms_chunked  the same three GEMMs cut into the fused path's chunks, into the same reused
            buffer (the floor for the fused path: fused / gemms_chunked is the loss's overhead)

Each (method, shape) runs in a fresh subprocess, so that its peak memory is its own: on CUDA
``max_memory_allocated`` minus the memory held before the call; on CPU the peak resident set
(Linux VmHWM, reset just before the call) minus the resident set before it. Time: the median
over ``--reps`` timed runs after one warm-up, wall clock and (what a machine shared with other
jobs distorts less) the process's CPU time summed over its threads. Writes benchmarks/results/fused_linear_<device>.json (`--out`: another folder)
and .md with the device, torch version, commit and command.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

from . import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
METHODS = ("fused", "unfused", "plain", "gemms", "gemms_chunked")
K = 32
CPU_SHAPES = ["4096x32000x256", "4096x32000x512", "16384x32000x256"]
CUDA_SHAPES = ["4096x32000x4096", "16384x32000x4096", "16384x128256x4096"]


# ----------------------------------------------------------------------------- one measurement

def _inputs(n, v, h, dtype, device):
    g = torch.Generator().manual_seed(0)
    hidden = (torch.randn(n, h, generator=g) / h ** 0.25).to(device, dtype).requires_grad_(True)
    weight = (torch.randn(v, h, generator=g) / h ** 0.25).to(device, dtype).requires_grad_(True)
    bias = torch.zeros(v, device=device, dtype=dtype, requires_grad=True)
    ids = torch.randint(0, v, (n, K), generator=g).to(device)
    lp = (torch.log_softmax(torch.randn(n, K, generator=g), -1) - 1.0).to(device)
    return hidden, weight, bias, ids, lp


def _step(method, hidden, weight, bias, ids, lp, chunk_size):
    import topk_distill as td

    for t in (hidden, weight, bias):
        t.grad = None
    if method == "gemms_chunked":
        from topk_distill.fused_linear import auto_chunk_size

        n, v = hidden.shape[0], weight.shape[0]
        c = chunk_size or auto_chunk_size(n, v, hidden.dtype, hidden.device)
        with torch.no_grad():
            buf = hidden.new_empty((min(c, n), v))
            gh = torch.empty_like(hidden)
            gw = torch.empty_like(weight)
            for s in range(0, n, c):
                z = buf[:min(s + c, n) - s]
                torch.addmm(bias, hidden[s:s + c], weight.t(), out=z)
                torch.mm(z, weight, out=gh[s:s + c])
                if s == 0:
                    torch.mm(z.t(), hidden[s:s + c], out=gw)
                else:
                    gw.addmm_(z.t(), hidden[s:s + c])
            del buf, gh, gw
        return
    if method == "gemms":
        with torch.no_grad():
            z = torch.addmm(bias, hidden, weight.t())
            gh = z @ weight
            gw = z.t() @ hidden
            del z, gh, gw
        return
    if method == "fused":
        out = td.fused_linear_topk_distill_loss(hidden, weight, ids, lp, bias=bias,
                                                chunk_size=chunk_size)
    else:
        fn = td.topk_distill_loss if method == "unfused" else td.reference.topk_distill_loss
        out = fn(hidden @ weight.t() + bias, ids, lp)
    out.loss.backward()


def measure(method, n, v, h, dtype_name, device, reps, chunk_size):
    dtype = getattr(torch, dtype_name)
    device = torch.device(device)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    args = _inputs(n, v, h, dtype, device)
    _step(method, *args, chunk_size)  # warm-up (allocator, kernels, page faults)
    for t in args[:3]:
        t.grad = None
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current resident set
        before = common.status_bytes("VmRSS:")
    times, cpu_times = [], []
    for _ in range(reps):
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        _step(method, *args, chunk_size)
        sync()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
        if not method.startswith("gemms"):  # drop .grad, so every rep starts from the same memory
            for t in args[:3]:
                t.grad = None
    peak = (torch.cuda.max_memory_allocated(device) if cuda else common.status_bytes("VmHWM:")) - before
    return {"time_ms": 1e3 * statistics.median(times), "times_ms": [1e3 * t for t in times],
            "cpu_time_ms": 1e3 * statistics.median(cpu_times), "peak_extra_mb": peak / 2 ** 20}


# ----------------------------------------------------------------------------- orchestration

def _run_child(method, shape, dtype, device, reps, chunk_size):
    n, v, h = (int(x) for x in shape.split("x"))
    cmd = [sys.executable, "-m", "benchmarks.fused_linear", "--child", method, shape, dtype,
           device, str(reps), str(chunk_size or 0)]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    if res.returncode != 0:
        tail = (res.stderr or res.stdout).strip().splitlines()[-1:] or ["?"]
        return {"error": tail[0][:300]}
    return json.loads(res.stdout.strip().splitlines()[-1])


def _mem_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def _device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores visible, " \
                           f"{torch.get_num_threads()} torch threads)"
    except OSError:
        pass
    return platform.processor() or "cpu"


def _commit() -> str:
    """HEAD, plus ``-dirty`` when the tree differs from it (results files aside)."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=ROOT, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True,
                                cwd=ROOT, check=True).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    dirty = [line for line in status if not line[3:].startswith("benchmarks/results")]
    return sha + ("-dirty" if dirty else "")


def run_device(device, shapes, dtype, reps, chunk_size, methods):
    rows = []
    for shape in shapes:
        n, v, h = (int(x) for x in shape.split("x"))
        row = {"N": n, "V": v, "H": h, "K": K, "dtype": dtype}
        for method in methods:
            # plain / unfused hold several [N, V] fp32 tensors at once: do not push a shared
            # machine into swapping or the OOM killer.
            if device == "cpu" and method in ("plain", "unfused"):
                need = (4 if method == "plain" else 3) * n * v * 4  # measured: ~2.9x, ~1.9x
                if need > 0.6 * _mem_available():
                    row[method] = {"skipped": f"needs ~{need / 2**30:.1f} GiB"}
                    continue
            row[method] = _run_child(method, shape, dtype, device, reps, chunk_size)
            print(f"  {device} {shape} {method}: {row[method]}", flush=True)
        key = "cpu_time_ms" if device == "cpu" else "time_ms"  # see write_results
        f = row.get("fused", {}).get(key)
        for base in ("gemms", "gemms_chunked"):
            g = row.get(base, {}).get(key)
            row[f"fused_over_{base}"] = (f / g) if (f and g) else None
        rows.append(row)
    return rows


def _fmt(cell, key, fmt):
    if not isinstance(cell, dict):
        return "-"
    if key in cell:
        return fmt.format(cell[key])
    return "skipped" if "skipped" in cell else "error"


def write_results(device, rows, meta, out_dir=RESULTS):
    os.makedirs(out_dir, exist_ok=True)
    base = os.path.join(out_dir, f"fused_linear_{device}")
    with open(base + ".json", "w") as f:
        json.dump({**meta, "rows": rows}, f, indent=2)
    key = "cpu_time_ms" if device == "cpu" else "time_ms"
    clock = "process CPU time" if device == "cpu" else "wall clock (CUDA synchronised)"
    lines = [f"# fused linear top-k distillation - {device}", "",
             f"- device: {meta['device_name']}", f"- torch: {meta['torch']}",
             f"- commit: {meta['commit']}", f"- command: `{meta['command']}`",
             f"- loss fkl, support topk, K={K}, forward + backward w.r.t. hidden, weight and "
             f"bias; time = median of {meta['reps']} runs after a warm-up; peak = extra memory "
             f"over the inputs ({'max_memory_allocated' if device == 'cuda' else 'peak RSS'})",
             f"- ratios use the {clock}: on a CPU shared with other jobs the wall clock mostly "
             f"measures the other jobs" if device == "cpu" else f"- ratios use the {clock}",
             "",
             f"| N | V | H | dtype | method | wall ms | CPU-time ms | / GEMMs | / chunked GEMMs "
             f"| peak MB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for m in METHODS:
            cell = r.get(m)
            if not isinstance(cell, dict):
                continue
            ratios = []
            for ref_method in ("gemms", "gemms_chunked"):
                b = r.get(ref_method, {})
                ok = key in cell and isinstance(b, dict) and key in b
                ratios.append(f"{cell[key] / b[key]:.2f}x" if ok else "-")
            lines.append(f"| {r['N']} | {r['V']} | {r['H']} | {r['dtype']} | {m} | "
                         f"{_fmt(cell, 'time_ms', '{:.0f}')} | "
                         f"{_fmt(cell, 'cpu_time_ms', '{:.0f}')} | {' | '.join(ratios)} | "
                         f"{_fmt(cell, 'peak_extra_mb', '{:.0f}')} |")
    errors = [(r["N"], r["V"], r["H"], m, r[m]["error"]) for r in rows for m in METHODS
              if isinstance(r.get(m), dict) and "error" in r[m]]
    if errors:
        lines += ["", "Errors:"] + [f"- {n}x{v}x{h} {m}: {e}" for n, v, h, m, e in errors]
    with open(base + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\nwrote {base}.json and {base}.md")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        method, shape, dtype, device, reps, chunk = argv[1:7]
        n, v, h = (int(x) for x in shape.split("x"))
        out = measure(method, n, v, h, dtype, device, int(reps), int(chunk) or None)
        print(json.dumps(out))
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto: cpu, then cuda when available")
    p.add_argument("--shapes", default=None,
                   help="comma-separated NxVxH (default: CPU %s; CUDA %s)" % (
                       ",".join(CPU_SHAPES), ",".join(CUDA_SHAPES)))
    p.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--chunk-size", type=int, default=None, help="default: automatic")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--out", default=str(RESULTS), help="results folder")
    args = p.parse_args(argv)
    devices = ["cpu", "cuda"] if args.device == "auto" else [args.device]
    if "cuda" in devices and not torch.cuda.is_available():
        if args.device == "cuda":
            sys.exit("--device cuda: no CUDA device")
        devices.remove("cuda")
    for device in devices:
        shapes = (args.shapes.split(",") if args.shapes
                  else (CUDA_SHAPES if device == "cuda" else CPU_SHAPES))
        dtype = args.dtype or ("bfloat16" if device == "cuda" else "float32")
        rows = run_device(device, shapes, dtype, args.reps, args.chunk_size,
                          args.methods.split(","))
        meta = {"device": device, "device_name": _device_name(device), "torch": torch.__version__,
                "cuda": torch.version.cuda, "commit": _commit(), "reps": args.reps,
                "command": ("python -m benchmarks.fused_linear " + " ".join(argv)).strip()}
        write_results(device, rows, meta, args.out)


if __name__ == "__main__":
    main()
