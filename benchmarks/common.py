"""Shared pieces of the benchmarks: environment record, inputs, timing, peak memory, copy roofline.

Timing: one loop of ``warmup + reps`` iterations; each iteration times the forward (loss from
logits, reduction included) and the backward (``loss.backward()``) separately and the two
together, end to end. On CUDA with CUDA events (a sync at the end of every iteration), on CPU
with ``time.perf_counter``. The gradient of the previous iteration is freed before the clock
starts. Reported numbers are medians.

Peak memory: the bytes allocated *on top of* what existed before one forward+backward (the
inputs), at the high-water mark of that step; the gradient the step leaves in ``logits.grad``
counts. CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` (minus the
allocated bytes before the step). CPU: torch has no CPU peak counter, so the step runs once
under ``torch.profiler`` with ``profile_memory=True``; every allocation / free of the CPU
allocator is a ``[memory]`` event with a signed byte count, and the peak is the maximum of their
running sum. That counts every tensor torch allocates (eager ops, our kernels' outputs, the
buffers of torch.compile's generated code) and nothing else (no Python objects, no allocator
slack, no libgomp scratch), which is the number that matters for a training step's activation
memory. One correction: our CPU backward recycles its gradient buffer outside torch's allocator
(csrc/cpu/backward.cpp, GradBufferCache), so the profiler does not see it; when the gradient
left in ``logits.grad`` was not allocated under the profiler, its bytes are added to every point
of the backward (an upper bound, and a tight one: our backward allocates nothing else of note).
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

REPO = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
          "fp64": torch.float64}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


# ----------------------------------------------------------------------------- environment

def git_commit() -> str:
    """``git rev-parse HEAD``, plus ``-dirty`` when tracked files differ from HEAD or there are
    untracked files (other than the results this package writes)."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True,
                                text=True, check=True).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    dirty = [line for line in status if not line[3:].startswith("benchmarks/results")]
    return head + ("-dirty" if dirty else "")


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()} ({torch.get_num_threads()} torch threads, {os.cpu_count()} cpus)"


def environment(device: torch.device, module: str = "benchmarks",
                argv: Optional[List[str]] = None) -> Dict:
    argv = sys.argv[1:] if argv is None else argv
    return {
        "device": device_description(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "python": platform.python_version(),
        "commit": git_commit(),
        "command": " ".join(["python", "-m", module] + list(argv)),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "threads": torch.get_num_threads(),
        "loadavg_start": _loadavg(),
    }


def write_results(stem: str, doc: dict, markdown: str, out_dir=RESULTS) -> Path:
    """<out_dir>/<stem>.json (``doc``) and .md (``markdown``), out_dir defaulting to
    benchmarks/results (a benchmark's ``--out``); returns the .json path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"{stem}.json"
    out.write_text(json.dumps(doc, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown)
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return out


def status_bytes(field: str) -> int:
    """A byte count of this process from /proc/self/status (``"VmRSS:"``, ``"VmHWM:"``)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def run_child(module: str, argv: List[str]) -> Dict:
    """``python -m module *argv`` from the repository root, one measurement per fresh process
    (a clean allocator and peak RSS); returns the JSON dict its last stdout line prints, or
    ``{"error": its last output line}``."""
    cmd = [sys.executable, "-m", module, *argv]
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               PYTHONWARNINGS="ignore")
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=str(REPO), env=env)
    if res.returncode != 0:
        tail = (res.stderr or res.stdout).strip().splitlines()[-1:] or ["?"]
        return {"error": tail[0][:300]}
    return json.loads(res.stdout.strip().splitlines()[-1])


def cell(row: Dict, key: str, fmt: str = "{:.0f}") -> str:
    """A results-table cell: ``row[key]`` formatted, ``-`` when missing."""
    return fmt.format(row[key]) if row.get(key) is not None else "-"


def _loadavg():
    """1-minute load average (a shared machine's background load makes timings noisy)."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    return dev


# ----------------------------------------------------------------------------- inputs

def make_inputs(n: int, v: int, k: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """Student logits [n, v] (dtype) and a teacher's top-k (ids int64, log-probs fp32) drawn from
    a distribution correlated with the student, as in training (moderate divergences)."""
    gen_device = device if device.type == "cuda" else torch.device("cpu")
    g = torch.Generator(device=gen_device).manual_seed(seed)
    z = torch.randn(n, v, generator=g, device=gen_device) * 2.0
    t = 0.6 * z
    t.add_(torch.randn(n, v, generator=g, device=gen_device), alpha=2.0)
    t = torch.log_softmax(t, -1)
    lp, ids = t.topk(min(k, v), dim=-1)
    del t
    return z.to(dtype).contiguous(), ids.contiguous(), lp.float().contiguous()


# ----------------------------------------------------------------------------- timing

def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fwd_bwd(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, *, reps: int,
                 warmup: int, device: torch.device) -> Dict[str, float]:
    """Medians (ms) of the forward, the backward and both, over ``reps`` iterations after
    ``warmup``. ``forward(x)`` returns a scalar loss; ``x`` requires grad."""
    return time_fwd_bwd_interleaved({"only": forward}, x, reps=reps, warmup=warmup,
                                    device=device)["only"]


def time_fwd_bwd_interleaved(forwards: Dict[str, Callable[[torch.Tensor], torch.Tensor]],
                             x: torch.Tensor, *, reps: int, warmup: int,
                             device: torch.device) -> Dict[str, Dict[str, float]]:
    """:func:`time_fwd_bwd` for several implementations at once, round-robin: each repetition
    runs one iteration of every implementation in turn, so that on a shared machine they all
    see the same background load and their ratios stay meaningful."""
    samples = {name: ([], [], []) for name in forwards}
    cuda = device.type == "cuda"
    for i in range(warmup + reps):
        for name, forward in forwards.items():
            x.grad = None
            if cuda:
                e0, e1, e2 = (torch.cuda.Event(enable_timing=True) for _ in range(3))
                torch.cuda.synchronize(device)
                e0.record()
                loss = forward(x)
                e1.record()
                loss.backward()
                e2.record()
                torch.cuda.synchronize(device)
                t_f, t_b = e0.elapsed_time(e1), e1.elapsed_time(e2)
            else:
                t0 = time.perf_counter()
                loss = forward(x)
                t1 = time.perf_counter()
                loss.backward()
                t2 = time.perf_counter()
                t_f, t_b = (t1 - t0) * 1e3, (t2 - t1) * 1e3
            del loss
            if i >= warmup:
                fwd, bwd, both = samples[name]
                fwd.append(t_f)
                bwd.append(t_b)
                both.append(t_f + t_b)
    x.grad = None
    med = statistics.median
    return {name: {"ms_fwd": med(f), "ms_bwd": med(b), "ms_fwd_bwd": med(fb), "reps": reps}
            for name, (f, b, fb) in samples.items()}


def time_interleaved(fns: Dict[str, Callable[[], None]], *, reps: int, warmup: int,
                     device: torch.device, stat=statistics.median) -> Dict[str, float]:
    """``stat`` (median) ms of each zero-argument step function, run round-robin (one iteration of
    each in turn) so that every function sees the same background load on a shared machine."""
    samples: Dict[str, List[float]] = {name: [] for name in fns}
    for i in range(warmup + reps):
        for name, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            if i >= warmup:
                samples[name].append((time.perf_counter() - t0) * 1e3)
    if stat is None:
        return samples
    return {name: stat(s) for name, s in samples.items()}


# ----------------------------------------------------------------------------- memory

def _cpu_peak_from_profile(forward: Callable[[torch.Tensor], torch.Tensor],
                           x: torch.Tensor) -> int:
    from torch.profiler import ProfilerActivity, profile, record_function

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loss = forward(x)
        with record_function(_BWD_MARK):
            loss.backward()
        del loss
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    finally:
        os.unlink(path)
    marks = [e["ts"] for e in events if e.get("name") == _BWD_MARK and e.get("ph") == "X"]
    t_bwd = min(marks) if marks else float("inf")
    mem = sorted((e for e in events if e.get("name") == "[memory]"
                  and e.get("args", {}).get("Device Type", 0) == 0), key=lambda e: e["ts"])
    cur = peak_fwd = 0
    peak_bwd = None
    seen = set()
    for e in mem:
        if e["ts"] >= t_bwd and peak_bwd is None:
            peak_bwd = cur
        cur += int(e["args"]["Bytes"])
        if int(e["args"]["Bytes"]) > 0:
            seen.add(int(e["args"]["Addr"]))
        if e["ts"] < t_bwd:
            peak_fwd = max(peak_fwd, cur)
        else:
            peak_bwd = max(peak_bwd, cur)
    if peak_bwd is None:
        peak_bwd = cur
    # A gradient whose storage torch's allocator never handed out (our CPU backward recycles its
    # gradient buffer outside the allocator) is invisible to the profiler: count it as live for
    # the whole backward - an upper bound, tight when the backward allocates little else.
    untracked = 0
    if x.grad is not None and x.grad.untyped_storage().data_ptr() not in seen:
        untracked = x.grad.untyped_storage().nbytes()
    return max(peak_fwd, peak_bwd + untracked)


_BWD_MARK = "benchmarks::backward"


def peak_memory_fwd_bwd(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                        device: torch.device) -> int:
    """Bytes allocated on top of the inputs at the high-water mark of one forward+backward."""
    x.grad = None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        forward(x).backward()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        peak = _cpu_peak_from_profile(forward, x)
    x.grad = None
    return int(peak)


# ----------------------------------------------------------------------------- copy roofline

def copy_gbps(device: torch.device, nbytes: int = 256 << 20, reps: int = 20) -> float:
    """Bandwidth of a large ``dst.copy_(src)`` (device-to-device on CUDA, memcpy-like on CPU), in
    GB/s counting the bytes read plus the bytes written (2 * nbytes), median of ``reps``."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    times = []
    for i in range(reps + 3):
        if device.type == "cuda":
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            dst.copy_(src)
            e1.record()
            torch.cuda.synchronize(device)
            t = e0.elapsed_time(e1) / 1e3
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            t = time.perf_counter() - t0
        if i >= 3:
            times.append(t)
    return 2 * nbytes / statistics.median(times) / 1e9


def model_bytes(n: int, v: int, elem: int) -> Dict[str, int]:
    """Bytes a loss must move at minimum: the forward reads the logits once, the backward reads
    them once and writes the gradient once (teacher tensors and [N, K] / [N] state ignored)."""
    one = n * v * elem
    return {"fwd": one, "bwd": 2 * one, "fwd_bwd": 3 * one}
