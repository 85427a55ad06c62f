"""CUDA speed and memory of topk-distill against plain PyTorch.

    python -m benchmarks.cuda_bench [--quick] [--reps 20] [--warmup 5]

For (N, V) in (8192, 131072), (8192, 32768), (65536, 16384), (64, 262144), K in 32 / 64 / 128,
bf16 and fp32 logits, loss fkl (support topk), it times fwd, bwd and fwd+bwd of
  topk_distill         td.topk_distill_loss (check_inputs=False: no host sync)
  reference_eager      topk_distill.reference.topk_distill_loss
  reference_compiled   torch.compile of the reference
with CUDA events (median of --reps after --warmup), and the peak memory of one fwd+bwd on top of
the inputs. gbps counts the bytes the logits force: 2 bytes/logit read in the forward, 2 read +
2 written in the backward for bf16 (6 bytes/logit for fwd+bwd; fp32: 12); frac_of_copy divides
it by the device-to-device copy bandwidth measured in the same run (a [N, V] copy_, which also
reads and writes each byte once). Configurations the reference cannot fit are recorded with the
error instead of numbers.

Writes benchmarks/results/cuda_<device>.json and a markdown table next to it.
"""
from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"

SHAPES = [(8192, 131072), (8192, 32768), (65536, 16384), (64, 262144)]
KS = [32, 64, 128]
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
IMPLS = ["topk_distill", "reference_eager", "reference_compiled"]


def git_commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("-dirty" if dirty else "")


def copy_gbps(reps: int = 20) -> float:
    """Device-to-device copy bandwidth (read + write bytes / s) of a 1 GiB buffer."""
    n = 1 << 29  # bf16 elements: 1 GiB
    src = torch.empty(n, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    ms = statistics.median(times)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * n * 2 / (ms * 1e-3) / 1e9


def make_inputs(n, v, k, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    z = torch.randn(n, v, device="cuda", dtype=dtype, generator=g) * 2
    ids = torch.randint(0, v, (n, k), device="cuda", generator=g)
    lp = torch.log_softmax(torch.randn(n, k, device="cuda", generator=g), -1) - 0.5
    return z, ids, lp


def loss_fn(impl):
    import topk_distill as td
    from topk_distill import reference

    if impl == "topk_distill":
        return lambda z, ids, lp: td.topk_distill_loss(z, ids, lp, loss="fkl",
                                                       check_inputs=False).loss
    if impl == "reference_eager":
        return lambda z, ids, lp: reference.topk_distill_loss(z, ids, lp, loss="fkl").loss
    if impl == "reference_compiled":
        compiled = torch.compile(reference.topk_distill_loss, dynamic=False)
        return lambda z, ids, lp: compiled(z, ids, lp, loss="fkl").loss
    raise ValueError(impl)


def time_config(fn, z0, ids, lp, warmup, reps):
    """Medians (ms) of fwd, bwd and fwd+bwd, and the peak bytes of one step over the inputs."""
    z = z0.detach().requires_grad_(True)
    fwd, bwd, both = [], [], []
    for it in range(warmup + reps):
        z.grad = None
        e0, e1, e2 = (torch.cuda.Event(enable_timing=True) for _ in range(3))
        e0.record()
        loss = fn(z, ids, lp)
        e1.record()
        loss.backward()
        e2.record()
        torch.cuda.synchronize()
        if it >= warmup:
            fwd.append(e0.elapsed_time(e1))
            bwd.append(e1.elapsed_time(e2))
            both.append(e0.elapsed_time(e2))
        del loss
    z.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn(z, ids, lp).backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    z.grad = None
    return statistics.median(fwd), statistics.median(bwd), statistics.median(both), peak


def markdown(doc):
    lines = [
        f"# topk-distill CUDA benchmark: {doc['device']}",
        "",
        f"torch {doc['torch']}, CUDA {doc['cuda']}, commit `{doc['commit']}`, "
        f"copy bandwidth {doc['copy_gbps']:.0f} GB/s. Command: `{doc['command']}`",
        "",
        "| impl | dtype | N | V | K | fwd ms | bwd ms | fwd+bwd ms | GB/s | of copy | peak MiB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in doc["rows"]:
        if r.get("error"):
            lines.append(f"| {r['impl']} | {r['dtype']} | {r['N']} | {r['V']} | {r['K']} | "
                         f"{r['error']} | | | | | |")
            continue
        lines.append(
            f"| {r['impl']} | {r['dtype']} | {r['N']} | {r['V']} | {r['K']} | {r['ms_fwd']:.3f} | "
            f"{r['ms_bwd']:.3f} | {r['ms_fwd_bwd']:.3f} | {r['gbps']:.0f} | "
            f"{r['frac_of_copy']:.2f} | {r['peak_mem_bytes'] / 2**20:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="one K, bf16 only, topk_distill + eager")
    ap.add_argument("--impls", default=",".join(IMPLS))
    ap.add_argument("--out", default=None, help="output path (default results/cuda_<device>.json)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("benchmarks.cuda_bench needs a CUDA GPU; none is visible "
                 "(torch.cuda.is_available() is False). Nothing was measured.")
    import topk_distill  # noqa: F401  (loads the ops)
    from topk_distill import _C

    if not getattr(_C, "with_cuda", False):
        sys.exit("topk_distill was built without its CUDA kernels; rebuild with nvcc available "
                 "(make build) before benchmarking.")
    args.reps = max(args.reps, 20)
    impls = [i for i in args.impls.split(",") if i]
    ks = [64] if args.quick else KS
    dtypes = {"bf16": DTYPES["bf16"]} if args.quick else DTYPES
    if args.quick:
        impls = [i for i in impls if i != "reference_compiled"]

    device = torch.cuda.get_device_name()
    copy = copy_gbps()
    print(f"{device}: device-to-device copy {copy:.0f} GB/s", flush=True)
    rows = []
    fns = {impl: loss_fn(impl) for impl in impls}
    for (n, v) in SHAPES:
        for k in ks:
            for dname, dtype in dtypes.items():
                z, ids, lp = make_inputs(n, v, k, dtype)
                bytes_per_logit = 6 if dtype == torch.bfloat16 else 12
                for impl in impls:
                    row = {"impl": impl, "loss": "fkl", "N": n, "V": v, "K": k, "dtype": dname,
                           "tp": 1}
                    try:
                        f, b, fb, peak = time_config(fns[impl], z, ids, lp, args.warmup, args.reps)
                        gbps = bytes_per_logit * n * v / (fb * 1e-3) / 1e9
                        row.update(ms_fwd=f, ms_bwd=b, ms_fwd_bwd=fb, gbps=gbps,
                                   frac_of_copy=gbps / copy, peak_mem_bytes=int(peak))
                        print(f"{impl:19s} {dname} N={n:6d} V={v:6d} K={k:3d}  fwd {f:7.3f} ms  "
                              f"bwd {b:7.3f} ms  fwd+bwd {fb:7.3f} ms  {gbps:6.0f} GB/s "
                              f"({gbps / copy:.2f} of copy)  peak {peak / 2**20:.0f} MiB",
                              flush=True)
                    except torch.cuda.OutOfMemoryError as e:
                        row.update(ms_fwd=None, ms_bwd=None, ms_fwd_bwd=None, gbps=None,
                                   frac_of_copy=None, peak_mem_bytes=None, error="OOM")
                        print(f"{impl:19s} {dname} N={n} V={v} K={k}: OOM ({str(e)[:80]})",
                              flush=True)
                    torch.cuda.empty_cache()
                    rows.append(row)
                del z, ids, lp
                torch.cuda.empty_cache()

    doc = {
        "device": device,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "commit": git_commit(),
        "command": "python -m benchmarks.cuda_bench " + " ".join(argv if argv is not None
                                                                 else sys.argv[1:]),
        "host": platform.node(),
        "copy_gbps": copy,
        "rows": rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9]+", "_", device).strip("_").lower()
    out = Path(args.out) if args.out else RESULTS / f"cuda_{slug}.json"
    out.write_text(json.dumps(doc, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(doc))
    print(f"wrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
