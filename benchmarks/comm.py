"""``python -m benchmarks.comm``: the tensor-parallel communication of one loss call, measured.

W gloo processes (W = 2 and 4, torch.multiprocessing spawn, CPU) each hold a vocab shard of the
logits; every ``torch.ops._c10d_functional`` / ``c10d`` call made by
``topk_distill_loss(..., tp_group=WORLD)`` is intercepted by a ``TorchDispatchMode`` that counts
the collectives and their payload bytes (the tensors each rank contributes; for an all-gather
also its output), separately for the forward and the backward. The measured numbers are printed
next to the analytic model:

    forward, per rank:  all_reduce(MAX) of the row max          N * 4 bytes
                        all_reduce(SUM) of [sums(5) | gathered(K)] N * (5 + K) * 4 bytes
                        check_inputs=True: all_gather of (N, K, V_r, vocab_start, 4 data facts)  8 * 8 bytes
    backward:           nothing

(the accumulation dtype is fp32 for fp32 / bf16 / fp16 logits). On the wire a ring all-reduce of
B bytes moves 2 (W-1)/W * B per rank and an all-gather (W-1)/W * W * b. The plain-PyTorch TP
reference (all-gather the logits shards) is measured at one shape for comparison: it moves the
logits, N * V * 4 bytes per rank, instead of N * (4 + K) * 4.

Writes ``<out>/comm_cpu.json`` and ``<out>/comm_cpu.md``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Dict, List

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from . import common

COLLECTIVE_NAMESPACES = ("_c10d_functional", "c10d", "_c10d_functional_autograd")
NOT_COLLECTIVES = ("wait_tensor", "wait", "barrier_")


def _nbytes(tree) -> int:
    return sum(t.numel() * t.element_size() for t in tree_flatten(tree)[0]
               if isinstance(t, torch.Tensor))


class CommCounter(TorchDispatchMode):
    """Records every collective op dispatched while active: (op name, input bytes, output bytes)."""

    def __init__(self):
        super().__init__()
        self.calls: List[Dict] = []
        self.waits = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        ns, _, name = func._schema.name.partition("::")
        if ns in COLLECTIVE_NAMESPACES:
            if name in NOT_COLLECTIVES:
                self.waits += 1
            else:
                # What this rank contributes: every tensor argument except the pre-allocated
                # outputs of the in-place c10d ops (e.g. allgather_'s output_tensors).
                contributed = [a for a, spec in zip(args, func._schema.arguments)
                               if not spec.name.startswith("output")]
                contributed += [v for key, v in kwargs.items() if not key.startswith("output")]
                reduce_op = next((a for a in args if isinstance(a, str) and a in
                                  ("sum", "max", "min", "avg", "product")), None)
                self.calls.append(dict(op=name, reduce=reduce_op, in_bytes=_nbytes(contributed),
                                       out_bytes=_nbytes(out)))
        return out

    def summary(self) -> Dict:
        return dict(collectives=len(self.calls), bytes=sum(c["in_bytes"] for c in self.calls),
                    ops=[f"{c['op']}{'(' + c['reduce'] + ')' if c['reduce'] else ''}:"
                         f"{c['in_bytes']}B" for c in self.calls])


def analytic(n: int, k: int, world: int, check_inputs: bool, acc_bytes: int = 4) -> Dict:
    """The model: collectives and payload bytes per rank for one forward; the backward is 0."""
    ar_max, ar_sum = n * acc_bytes, n * (5 + k) * acc_bytes
    check = 8 * 8 if check_inputs else 0  # N, K, V_r, vocab_start + 4 data-check facts
    wire = 2 * (world - 1) / world * (ar_max + ar_sum) + (world - 1) * check
    return dict(collectives=2 + int(check_inputs), bytes=ar_max + ar_sum + check,
                wire_bytes=wire)


# ----------------------------------------------------------------------------- the worker

def _worker_body(rank: int, world: int, cfg: Dict) -> List[Dict]:
    import topk_distill as td
    from topk_distill import parallel, reference

    group = dist.group.WORLD
    rows = []
    v = cfg["V"]
    width = v // world
    for n in cfg["ns"]:
        for k in cfg["ks"]:
            z, ids, lp = common.make_inputs(n, v, k, torch.float32, torch.device("cpu"), seed=n + k)
            shard = z[:, rank * width:(rank + 1) * width].contiguous()
            for check in (True, False):
                row = dict(W=world, N=n, K=k, V=v, check_inputs=check, impl="topk_distill")
                try:
                    x = shard.clone().requires_grad_()
                    # Warm-up call: with check_inputs=False the layout is learned once (one
                    # all_gather), then cached; the steady state is what a training step sees.
                    td.topk_distill_loss(x, ids, lp, tp_group=group,
                                         check_inputs=check).loss.backward()
                    x.grad = None
                    fwd, bwd = CommCounter(), CommCounter()
                    with fwd:
                        out = td.topk_distill_loss(x, ids, lp, tp_group=group, check_inputs=check)
                    with bwd:
                        out.loss.backward()
                    full = td.topk_distill_loss(z, ids, lp).loss
                    row.update(fwd=fwd.summary(), bwd=bwd.summary(),
                               loss_abs_diff_vs_unsharded=abs(out.loss.item() - full.item()),
                               model=analytic(n, k, world, check))
                    try:
                        row["library_model"] = parallel.communication_bytes(
                            n, k, world, check_inputs=check)
                    except Exception as e:  # the helper may change; the measurement stands
                        row["library_model"] = f"{type(e).__name__}: {e}"
                except Exception as e:
                    row["error"] = f"{type(e).__name__}: {e}"
                    if rank == 0:
                        traceback.print_exc()
                rows.append(row)
    # Plain-PyTorch TP (reference.py): all-gather the logits shards, every rank computes the loss.
    n, k = cfg["ref_shape"]
    z, ids, lp = common.make_inputs(n, v, k, torch.float32, torch.device("cpu"), seed=1)
    x = z[:, rank * width:(rank + 1) * width].contiguous().requires_grad_()
    row = dict(W=world, N=n, K=k, V=v, check_inputs=False, impl="reference (all-gather logits)")
    try:
        fwd, bwd = CommCounter(), CommCounter()
        with fwd:
            out = reference.topk_distill_loss(x, ids, lp, tp_group=group, check_inputs=False)
        with bwd:
            out.loss.backward()
        row.update(fwd=fwd.summary(), bwd=bwd.summary())
    except Exception as e:
        row["error"] = f"{type(e).__name__}: {e}"
    rows.append(row)
    return rows


def _entry(rank, world, port, out_dir, cfg, timeout_s):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)  # several ranks share few cores
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=timeout_s))
    try:
        rows = _worker_body(rank, world, cfg)
        torch.save(rows, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_world(world: int, cfg: Dict, timeout_s: float = 300.0) -> List[List[Dict]]:
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_entry, args=(world, _free_port(), out_dir, cfg, timeout_s), nprocs=world,
                 join=True)
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False)
                for r in range(world)]


# ----------------------------------------------------------------------------- report

def _kib(b):
    return f"{b / 1024:.1f}"


def table(rows: List[Dict]) -> str:
    lines = ["| impl | W | N | K | check_inputs | fwd collectives (measured / model) "
             "| fwd bytes/rank (measured / model) | fwd wire bytes/rank (model, ring) "
             "| bwd collectives | bwd bytes | ops (forward) |",
             "|" + "---|" * 10]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['impl']} | {r['W']} | {r['N']} | {r['K']} | {r['check_inputs']} "
                         f"| ERROR: {r['error']} | | | | | |")
            continue
        m = r.get("model")
        f, b = r["fwd"], r["bwd"]
        coll = f"{f['collectives']} / {m['collectives']}" if m else f"{f['collectives']}"
        byt = f"{f['bytes']} / {m['bytes']}" if m else f"{f['bytes']}"
        wire = f"{m['wire_bytes']:.0f}" if m else "-"
        lines.append(f"| {r['impl']} | {r['W']} | {r['N']} | {r['K']} | {r['check_inputs']} "
                     f"| {coll} | {byt} | {wire} | {b['collectives']} | {b['bytes']} "
                     f"| {', '.join(f['ops'])} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.comm",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer shapes")
    ap.add_argument("--worlds", default="2,4", help="TP sizes (comma-separated)")
    ap.add_argument("--out", default=str(common.RESULTS))
    args = ap.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    if not dist.is_available() or not dist.is_gloo_available():
        print("torch.distributed with gloo is not available: nothing to measure")
        return 1
    cfg = dict(V=32000, ns=[128, 2048] if args.quick else [128, 512, 2048],
               ks=[8, 256] if args.quick else [8, 64, 256], ref_shape=(128, 64))
    worlds = [int(w) for w in args.worlds.split(",")]
    t0 = time.perf_counter()
    result = common.environment(torch.device("cpu"), "benchmarks.comm", argv)
    result.update(backend="gloo", V=cfg["V"], rows=[], errors=[])
    for w in worlds:
        try:
            per_rank = run_world(w, cfg)
        except Exception as e:  # e.g. the TP path is broken: report and go on
            msg = f"W={w}: {type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e) else ''}"
            print("FAILED", msg)
            result["errors"].append(msg)
            continue
        # The loss is replicated, so every rank must have made the same calls.
        for r, rows in enumerate(per_rank[1:], 1):
            for a, b in zip(per_rank[0], rows):
                for phase in ("fwd", "bwd"):
                    if a.get(phase, {}).get("ops") != b.get(phase, {}).get("ops"):
                        result["errors"].append(f"W={w}: rank {r} differs from rank 0: {a} {b}")
        result["rows"] += per_rank[0]
    result["wall_s"] = time.perf_counter() - t0
    ok = [r for r in result["rows"] if "error" not in r and r["impl"] == "topk_distill"]
    agree = all(r["fwd"]["collectives"] == r["model"]["collectives"]
                and r["fwd"]["bytes"] == r["model"]["bytes"] and r["bwd"]["collectives"] == 0
                for r in ok)
    result["model_matches_measurement"] = bool(ok) and agree

    text = table(result["rows"])
    print(text)
    verdict = ("the model matches every measurement" if result["model_matches_measurement"]
               else "MODEL AND MEASUREMENT DISAGREE (or nothing was measured)")
    print(f"\n{verdict}; max |loss(TP) - loss(unsharded)| = "
          f"{max((r['loss_abs_diff_vs_unsharded'] for r in ok), default=float('nan')):.2e}")
    for e in result["errors"]:
        print("error:", e)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "comm_cpu.json").write_text(json.dumps(result, indent=1) + "\n")
    md = [
        "# topk-distill: tensor-parallel communication per loss call (measured with gloo)",
        "",
        f"- torch {result['torch']}, commit `{result['commit']}`, command "
        f"`{result['command']}`, {result['date']}",
        f"- V = {cfg['V']} (split evenly over W ranks; V does not enter the model), fp32 logits",
        "- measured: every `_c10d_functional` / `c10d` op dispatched during the forward and "
        "during the backward of `topk_distill_loss(..., tp_group=WORLD)` on rank 0 (all ranks "
        "make the same calls), after one warm-up call; bytes = the tensors one rank contributes",
        "- model (per rank, forward): `all_reduce(max)` N*4 B + `all_reduce(sum)` N*(5+K)*4 B "
        "(+ `all_gather` 8*8 B when check_inputs=True); backward: nothing. Wire bytes per rank "
        "for a ring: 2(W-1)/W * all-reduce bytes + (W-1) * 64 B",
        f"- **{verdict}**",
        "",
        text,
        "",
    ]
    if result["errors"]:
        md += ["Errors:", ""] + [f"- {e}" for e in result["errors"]] + [""]
    (out / "comm_cpu.md").write_text("\n".join(md))
    print(f"wrote {out / 'comm_cpu.json'}, {out / 'comm_cpu.md'} ({result['wall_s']:.0f} s)")
    return 0 if not result["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
