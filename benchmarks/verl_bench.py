"""verl's FSDP top-k distillation loss vs the topk-distill drop-in: time and peak memory.

    python -m benchmarks.verl_bench                  # N=4096, V=32000, K=64, fp32 and bf16
    python -m benchmarks.verl_bench --device cuda --n 16384 --v 151936 --reps 20

Methods (the ``method`` column), each a forward + backward of ``distillation_losses.sum()``
w.r.t. verl's packed student logits ``[1, N, V]``, the teacher as verl passes it (jagged nested
``[B, j, K]``, 8 sequences of N/8 tokens, fp32 log-probs, distinct ids), ``log_prob_min_clamp =
-10`` (verl's default):

  verl            verl 0.9.1 ``verl.trainer.distillation.fsdp.losses.compute_forward_kl_topk``
                  (its default path: ``F.log_softmax`` over ``[1, N, V]``, ``torch.topk``,
                  ``gather``, autograd)
  verl_chunked    the same with ``use_chunked_topk=True`` (verl's long-context option: fp32
                  logsumexp in chunks of 4096 tokens, no ``[N, V]`` log-softmax)
  dropin          ``topk_distill.integrations.verl.fsdp_compute_forward_kl_topk``: all five
                  outputs, the student top-K included (needs ``student_topk``, SPEC 9.4)
  dropin_no_topk  ``topk_distill.topk_distill_loss(..., reduction="none")`` on the same packed
                  inputs: the drop-in's loss, masses and gradient without the student top-K /
                  overlap outputs (what runs before SPEC 9.4)

Each (dtype, method) runs in a fresh subprocess. Time: medians over ``--reps`` runs after
``--warmup``, wall clock of the forward, the backward and both, and (what a machine shared with
other jobs distorts less) the process CPU time of both. Peak memory, in the same subprocess
after the timed runs, the bytes on top of the inputs at the high-water mark of one forward +
backward: CUDA ``max_memory_allocated``; CPU from ``torch.profiler`` with
``profile_memory=True`` (every allocation and free of torch's CPU allocator, summed over time;
benchmarks/common.py, which also adds our CPU backward's recycled gradient buffer that the
allocator never sees) and, as a cross-check, the peak resident set over the timed runs (Linux
VmHWM reset before them, minus VmRSS then).

verl is imported as installed; where its heavy dependencies (ray, transformers, ...) are missing
(the development environment installs verl with ``--no-deps``), the stand-ins of
tests/_verl_standins.py satisfy the imports (recorded in the results). Writes
benchmarks/results/verl_<device>.json and .md with the device, versions, commit and command.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Dict, List

import torch

from . import common

METHODS = ("verl", "verl_chunked", "dropin", "dropin_no_topk")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CLAMP = -10.0
SEQS = 8


# ----------------------------------------------------------------------------- verl

def _import_verl():
    """(verl's FSDP loss module, verl.workers.config, version, stand-ins used)."""
    import importlib
    import warnings
    from importlib.metadata import version

    added = []
    try:
        importlib.import_module("verl")
    except ImportError:
        sys.path.insert(0, str(common.REPO / "tests"))
        from _verl_standins import install_standins

        added = install_standins()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fsdp = importlib.import_module("verl.trainer.distillation.fsdp.losses")
            config = importlib.import_module("verl.workers.config")
    finally:
        if added:
            from _verl_standins import remove_standins

            remove_standins(added)
    return fsdp, config, version("verl"), sorted({m.split(".")[0] for m in added})


def _inputs(n, v, k, dtype, device):
    """verl's packed logits [1, n, v] and the jagged teacher [SEQS, n/SEQS, k] (ids distinct)."""
    z, ids, lp = common.make_inputs(n, v, k, dtype, device)
    offsets = torch.arange(0, n + 1, n // SEQS, device=device)
    offsets[-1] = n
    lp_nt = torch.nested.nested_tensor_from_jagged(lp, offsets)
    ids_nt = torch.nested.nested_tensor_from_jagged(ids, offsets)
    return z.unsqueeze(0), lp_nt, ids_nt


def _forward_for(method, fsdp, cfg_mod, k):
    import topk_distill as td
    from topk_distill.integrations.verl import fsdp_compute_forward_kl_topk

    loss_cfg = cfg_mod.DistillationLossConfig(
        loss_mode="forward_kl_topk", topk=k, log_prob_min_clamp=CLAMP, use_policy_gradient=False,
        use_chunked_topk=(method == "verl_chunked"))
    config = cfg_mod.DistillationConfig(distillation_loss=loss_cfg)
    if method in ("verl", "verl_chunked"):
        fn = fsdp.compute_forward_kl_topk
    elif method == "dropin":
        fn = fsdp_compute_forward_kl_topk
    else:
        def fn(x, lp, ids, config, data_format):
            out = td.topk_distill_loss(x, ids.values().unsqueeze(0), lp.values().unsqueeze(0),
                                       reduction="none", log_prob_min_clamp=CLAMP)
            return {"distillation_losses": out.loss, "student_mass": out.student_mass,
                    "teacher_mass": out.teacher_mass}
    return lambda x, lp, ids: fn(x, lp, ids, config, "thd")["distillation_losses"].sum()


# ----------------------------------------------------------------------------- one measurement

def measure(method, n, v, k, dtype_name, device_name, reps, warmup) -> Dict:
    device = torch.device(device_name)
    cuda = device.type == "cuda"
    fsdp, cfg_mod, _, _ = _import_verl()
    z, lp, ids = _inputs(n, v, k, DTYPES[dtype_name], device)
    x = z.requires_grad_()
    step = _forward_for(method, fsdp, cfg_mod, k)
    forward = lambda t: step(t, lp, ids)  # noqa: E731
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    for _ in range(warmup):
        x.grad = None
        forward(x).backward()
    x.grad = None
    sync()
    rss = not cuda and os.path.exists("/proc/self/clear_refs")
    if rss:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS
        rss_before = common.status_bytes("VmRSS:")
    fwd, bwd, both, cpu = [], [], [], []
    for _ in range(reps):
        x.grad = None
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        loss = forward(x)
        sync()
        t1 = time.perf_counter()
        loss.backward()
        sync()
        t2, c2 = time.perf_counter(), time.process_time()
        del loss
        fwd.append((t1 - t0) * 1e3)
        bwd.append((t2 - t1) * 1e3)
        both.append((t2 - t0) * 1e3)
        cpu.append((c2 - c0) * 1e3)
    peak_rss = (common.status_bytes("VmHWM:") - rss_before) if rss else None
    x.grad = None
    peak = common.peak_memory_fwd_bwd(forward, x, device)
    med = statistics.median
    return {"ms_fwd": med(fwd), "ms_bwd": med(bwd), "ms_fwd_bwd": med(both),
            "cpu_ms_fwd_bwd": med(cpu), "ms_fwd_bwd_all": both, "reps": reps,
            "peak_alloc_mb": peak / 2 ** 20,
            "peak_rss_mb": None if peak_rss is None else peak_rss / 2 ** 20}


# ----------------------------------------------------------------------------- orchestration

def _run_child(method, args, dtype_name, device_name):
    return common.run_child("benchmarks.verl_bench", [
        "--child", method, str(args.n), str(args.v), str(args.k), dtype_name, device_name,
        str(args.reps), str(args.warmup)])


def write_results(device, rows: List[Dict], meta: Dict, out_dir) -> None:
    cpu = device == "cpu"
    lines = [f"# verl FSDP top-k distillation loss vs the topk-distill drop-in - {device}", "",
             f"- device: {meta['device']}", f"- torch: {meta['torch']}, verl: {meta['verl']}"
             + (f" (imported with the stand-ins of tests/_verl_standins.py for: "
                f"{', '.join(meta['verl_standins'])})" if meta["verl_standins"] else ""),
             f"- commit: {meta['commit']}", f"- command: `{meta['command']}`",
             f"- date: {meta['date']}; load average at start: {meta['loadavg_start']}",
             f"- N={meta['N']} tokens (packed [1, N, V], {SEQS} sequences), V={meta['V']}, "
             f"K={meta['K']}, log_prob_min_clamp={CLAMP}; forward + backward of "
             f"distillation_losses.sum(); time = median of {meta['reps']} runs after "
             f"{meta['warmup']} warm-up",
             "- peak = memory on top of the inputs at the high-water mark of one forward + "
             "backward: " + ("torch.profiler allocator events (`peak alloc`) and, as a "
                             "cross-check, peak RSS over the timed runs (`peak RSS`)" if cpu
                             else "torch.cuda.max_memory_allocated"),
             "- `/ verl` = the method's time (CPU time on CPU) and peak alloc over verl's "
             "default path's" + ("; the CPU is shared with other jobs (see the load average): "
                                 "wall times are inflated, CPU times much less" if cpu else ""),
             *(["- peak RSS sees only pages that become resident during the timed runs: what "
                "the warm-up left resident does not show - e.g. our CPU backward's recycled "
                "gradient buffer (N x V x element size), which peak alloc counts; compare peak "
                "alloc"] if cpu else []),
             "- `dropin` needs `topk_distill_loss(..., student_topk=K)` (SPEC 9.4); "
             "`dropin_no_topk` is the drop-in's loss, masses and gradient without the student "
             "top-K / overlap outputs", "",
             "| dtype | method | fwd ms | bwd ms | fwd+bwd ms | CPU ms | / verl time | "
             "peak alloc MB | peak RSS MB | / verl peak |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        base_row = next((b for b in rows if b["dtype"] == r["dtype"] and b["method"] == "verl"
                         and "error" not in b), None)
        tkey = "cpu_ms_fwd_bwd" if cpu else "ms_fwd_bwd"
        if "error" in r:
            lines.append(f"| {r['dtype']} | {r['method']} | error: {r['error']} |"
                         + " - |" * 7)
            continue
        t_ratio = f"{r[tkey] / base_row[tkey]:.2f}x" if base_row else "-"
        m_ratio = (f"{r['peak_alloc_mb'] / base_row['peak_alloc_mb']:.2f}x"
                   if base_row and base_row["peak_alloc_mb"] else "-")
        lines.append(f"| {r['dtype']} | {r['method']} | {common.cell(r, 'ms_fwd')} | "
                     f"{common.cell(r, 'ms_bwd')} | {common.cell(r, 'ms_fwd_bwd')} | "
                     f"{common.cell(r, 'cpu_ms_fwd_bwd')} | {t_ratio} | {common.cell(r, 'peak_alloc_mb')} | "
                     f"{common.cell(r, 'peak_rss_mb')} | {m_ratio} |")
    print("\n".join(lines))
    common.write_results(f"verl_{device}", {**meta, "rows": rows}, "\n".join(lines) + "\n",
                         out_dir)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        method, n, v, k, dtype_name, device_name, reps, warmup = argv[1:9]
        print(json.dumps(measure(method, int(n), int(v), int(k), dtype_name, device_name,
                                 int(reps), int(warmup))))
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--v", type=int, default=32000)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--reps", type=int, default=None, help="default: 5 on CPU, 20 on CUDA")
    p.add_argument("--warmup", type=int, default=None, help="default: 1 on CPU, 3 on CUDA")
    p.add_argument("--out", default=str(common.RESULTS), help="results folder")
    args = p.parse_args(argv)
    device = common.pick_device(args.device)
    cuda = device.type == "cuda"
    args.reps = args.reps or (20 if cuda else 5)
    args.warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    _, _, verl_version, standins = _import_verl()
    meta = common.environment(device, "benchmarks.verl_bench", argv)
    meta.update(N=args.n, V=args.v, K=args.k, reps=args.reps, warmup=args.warmup,
                verl=verl_version, verl_standins=standins)
    rows = []
    for dtype_name in args.dtypes.split(","):
        for method in args.methods.split(","):
            row = {"dtype": dtype_name, "method": method,
                   **_run_child(method, args, dtype_name, device.type)}
            print({k: v for k, v in row.items() if k != "ms_fwd_bwd_all"}, flush=True)
            rows.append(row)
    write_results(device.type, rows, meta, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
