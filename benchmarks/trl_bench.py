"""TRL 1.16.0's distillation loss paths vs the topk-distill drop-in: time and peak memory.

    python -m benchmarks.trl_bench                      # N=4096, V=32000 and 151936, K=64, CPU
    python -m benchmarks.trl_bench --device cuda --reps 20 --out /tmp/results

Methods (the ``method`` column), each a forward + backward, fp32 (TRL computes its loss in fp32):

  server_trl     ServerDistillationTrainer's loss from the student logits [B, T, V] (B = 8,
                 T = N / 8): ``F.log_softmax(logits / T)`` then TRL's own
                 ``_compute_server_forward_kl_loss`` (beta = 0, tail bucket, top-K teacher);
                 gradient w.r.t. the logits
  server_dropin  ``topk_distill.integrations.trl.server_distillation_loss`` on the same logits
                 (what ``patch_trl()`` runs in its place)
  async_trl      AsyncDistillationTrainer's ``_chunked_jsd_loss`` (256 positions per chunk under
                 ``torch.utils.checkpoint``, fp32 LM head, JSD beta = 0.5 on TRL's narrowed
                 top-1 + actual-token support, tail bucket) from hidden [N, H] and an LM head
                 [V, H] (H = --h, default 256) with a Gemma-style softcap; gradients w.r.t.
                 hidden and the weight
  async_dropin   ``topk_distill.integrations.trl.chunked_jsd_loss`` (one
                 ``fused_linear_topk_distill_loss`` call) on the same inputs

Each (V, method) runs in a fresh subprocess. Time: median over ``--reps`` runs after
``--warmup``, wall clock and process CPU time (the CPU is shared with other jobs; CPU time is
distorted less). Peak memory: the bytes on top of the inputs at the high-water mark of one
forward + backward (CUDA ``max_memory_allocated``; CPU ``torch.profiler`` allocator events,
benchmarks/common.py) and, on CPU, the peak RSS over the timed runs. Writes
``<out>/trl_<device>.json`` and ``.md`` with the device, versions, commit and command.
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

METHODS = ("server_trl", "server_dropin", "async_trl", "async_dropin")
SEQS = 8
CHUNK = 256  # TRL's _CHUNKED_LM_HEAD_CHUNK_SIZE
SOFTCAP = 30.0
TEMPERATURE = 0.9


def _server_step(method, n, v, k, device):
    """(leaf, forward(leaf) -> loss) for the server path."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import torch.nn.functional as F
    from trl.experimental.server_distillation.server_distillation_trainer import (
        ServerDistillationTrainer)

    from topk_distill.integrations.trl import server_distillation_loss

    z, ids, lp = common.make_inputs(n, v, k, torch.float32, device)
    b, t = SEQS, n // SEQS
    logits = z.view(b, t, v)
    result = {"topk_logprobs": lp.view(b, t, k), "topk_token_ids": ids.view(b, t, k),
              "actual_logprobs": lp[:, 0].view(b, t)}
    tokens = ids[:, 0].view(b, t)
    labels = tokens.clone()
    tr = ServerDistillationTrainer.__new__(ServerDistillationTrainer)
    tr.beta, tr.temperature, tr.loss_add_tail = 0.0, TEMPERATURE, True
    tr.loss_top_k, tr.reverse_kl_top_1_mode = k, "sampled"
    if method == "server_trl":
        def forward(x):
            return tr._compute_server_forward_kl_loss(
                teacher_result=result, student_log_probs=F.log_softmax(x / tr.temperature, -1),
                labels=labels)
    else:
        def forward(x):
            return server_distillation_loss(tr, result, x, tokens, labels)
    return logits.requires_grad_(), forward


def _async_step(method, n, v, k, h, device):
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.async_distillation import async_distillation_trainer as ta

    from topk_distill.integrations.trl import chunked_jsd_loss

    g = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(n, h, generator=g, device=device)
    weight = (torch.randn(v, h, generator=g, device=device) * (4.0 / h ** 0.5)).requires_grad_()
    _, ids, lp = common.make_inputs(n, 2 * k, k, torch.float32, device, seed=1)
    # A served teacher top-K over the real vocab (ids spread over V), the actual token among them.
    ids = torch.randperm(v, generator=g, device=device)[:k].expand(n, k).contiguous()
    ids = (ids + torch.arange(n, device=device).unsqueeze(-1) * 7919) % v
    actual = ids[:, 3]
    target, target_lp, valid = ta._narrow_top1_actual_support(
        ids[None], lp[None], actual[None], (ids != -1)[None], 0.5)
    target, target_lp, valid = target[0], target_lp[0], valid[0]
    fn = ta._chunked_jsd_loss if method == "async_trl" else chunked_jsd_loss

    def forward(x):
        return fn(x, weight, None, 1.0, SOFTCAP, target, target_lp, valid, 0.5, TEMPERATURE,
                  True, None, 1, CHUNK)[0]
    return hidden.requires_grad_(), forward, weight


def measure(method, n, v, k, h, device_name, reps, warmup) -> Dict:
    device = torch.device(device_name)
    cuda = device.type == "cuda"
    weight = None
    if method.startswith("server"):
        x, forward = _server_step(method, n, v, k, device)
    else:
        x, forward, weight = _async_step(method, n, v, k, h, device)
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)

    def clear():
        x.grad = None
        if weight is not None:
            weight.grad = None
    for _ in range(warmup):
        clear()
        forward(x).backward()
    clear()
    sync()
    rss = not cuda and os.path.exists("/proc/self/clear_refs")
    if rss:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS
        rss_before = common.status_bytes("VmRSS:")
    both, cpu, loss_value = [], [], None
    for _ in range(reps):
        clear()
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        loss = forward(x)
        loss.backward()
        sync()
        both.append((time.perf_counter() - t0) * 1e3)
        cpu.append((time.process_time() - c0) * 1e3)
        loss_value = float(loss)
        del loss
    peak_rss = (common.status_bytes("VmHWM:") - rss_before) if rss else None
    clear()
    peak = common.peak_memory_fwd_bwd(forward, x, device)
    med = statistics.median
    return {"ms_fwd_bwd": med(both), "cpu_ms_fwd_bwd": med(cpu), "ms_fwd_bwd_all": both,
            "loss": loss_value, "peak_alloc_mb": peak / 2 ** 20,
            "peak_rss_mb": None if peak_rss is None else peak_rss / 2 ** 20}


def _run_child(method, v, args, device_name):
    return common.run_child("benchmarks.trl_bench", [
        "--child", method, str(args.n), str(v), str(args.k), str(args.h), device_name,
        str(args.reps), str(args.warmup)])


def write_results(device, rows: List[Dict], meta: Dict, out_dir) -> None:
    cpu = device == "cpu"
    tkey = "cpu_ms_fwd_bwd" if cpu else "ms_fwd_bwd"
    lines = [f"# TRL {meta['trl']} distillation loss paths vs the topk-distill drop-in - {device}",
             "", f"- device: {meta['device']}",
             f"- torch: {meta['torch']}, trl: {meta['trl']}, transformers: {meta['transformers']}",
             f"- commit: {meta['commit']}", f"- command: `{meta['command']}`",
             f"- date: {meta['date']}; load average at start: {meta['loadavg_start']}",
             f"- N={meta['N']} positions, K={meta['K']}, fp32, temperature {TEMPERATURE}. "
             f"server: logits [{SEQS}, N/{SEQS}, V], beta=0 forward KL over the teacher top-K "
             f"with the tail bucket. async: hidden [N, H={meta['H']}], LM head [V, H] with "
             f"softcap {SOFTCAP}, beta=0.5 JSD on the narrowed top-1 + actual support with the "
             f"tail bucket (TRL: chunks of {CHUNK} under checkpoint)",
             f"- time = median of {meta['reps']} forward + backward runs after "
             f"{meta['warmup']} warm-up" + ("; `CPU ms` = process CPU time (the machine is "
                                           "shared: wall times are inflated)" if cpu else ""),
             "- peak = memory on top of the inputs at the high-water mark of one forward + "
             "backward: " + ("torch.profiler allocator events (`peak alloc`) and peak RSS "
                             "over the timed runs" if cpu else "torch.cuda.max_memory_allocated"),
             "- `/ TRL` = the drop-in's time and peak alloc over TRL's on the same path", "",
             "| V | method | wall ms | CPU ms | / TRL time | peak alloc MB | peak RSS MB | "
             "/ TRL peak | loss |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['V']} | {r['method']} | error: {r['error']} |" + " - |" * 6)
            continue
        path = r["method"].split("_")[0]
        trl = next((b for b in rows if b["V"] == r["V"] and b["method"] == f"{path}_trl"
                    and "error" not in b), None)
        t_ratio = f"{r[tkey] / trl[tkey]:.2f}x" if trl else "-"
        m_ratio = (f"{r['peak_alloc_mb'] / trl['peak_alloc_mb']:.3f}x"
                   if trl and trl["peak_alloc_mb"] else "-")
        lines.append(f"| {r['V']} | {r['method']} | {common.cell(r, 'ms_fwd_bwd')} | "
                     f"{common.cell(r, 'cpu_ms_fwd_bwd')} | {t_ratio} | {common.cell(r, 'peak_alloc_mb')} | "
                     f"{common.cell(r, 'peak_rss_mb')} | {m_ratio} | {r['loss']:.6f} |")
    print("\n".join(lines))
    common.write_results(f"trl_{device}", {**meta, "rows": rows}, "\n".join(lines) + "\n",
                         out_dir)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        method, n, v, k, h, device_name, reps, warmup = argv[1:9]
        print(json.dumps(measure(method, int(n), int(v), int(k), int(h), device_name, int(reps),
                                 int(warmup))))
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--vs", default="32000,151936", help="vocab sizes, comma-separated")
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--h", type=int, default=256, help="hidden size of the async path's LM head")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--reps", type=int, default=None, help="default: 3 on CPU, 20 on CUDA")
    p.add_argument("--warmup", type=int, default=None, help="default: 1 on CPU, 3 on CUDA")
    p.add_argument("--out", default=str(common.RESULTS), help="results folder")
    args = p.parse_args(argv)
    if args.n % SEQS:
        p.error(f"--n must be a multiple of {SEQS}")
    device = common.pick_device(args.device)
    cuda = device.type == "cuda"
    args.reps = args.reps or (20 if cuda else 3)
    args.warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    from importlib.metadata import version
    meta = common.environment(device, "benchmarks.trl_bench", argv)
    meta.update(N=args.n, K=args.k, H=args.h, reps=args.reps, warmup=args.warmup,
                trl=version("trl"), transformers=version("transformers"))
    rows = []
    for v in (int(s) for s in args.vs.split(",")):
        for method in args.methods.split(","):
            row = {"V": v, "method": method, **_run_child(method, v, args, device.type)}
            print({k: val for k, val in row.items() if k != "ms_fwd_bwd_all"}, flush=True)
            rows.append(row)
    write_results(device.type, rows, meta, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
