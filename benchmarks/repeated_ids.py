"""What a repeated teacher id costs the kernels (issue 13: O(K log K), not O(K^2)).

    python -m benchmarks.repeated_ids [--device cpu|cuda] [--n 8] [--v 32000] [--k 4096]

A row that repeats an id makes the kernels resolve which entry owns the column (SPEC 3: the
first one). They do it from each row's ids sorted once (O(K log K)); the scan it replaced
compared every entry with every other (O(K^2): 8.4 M pairs per row at K = 4096). This
times the shard pass and the backward ops on their own, with K = 4096 distinct ids per row and
with the same ids but the last one repeating the first (as far apart as they can be), against
the O(V) pass with K = 1. The claim: `repeat - distinct` (the cost of resolving the repeat) is
below the K = 1 pass. Backends: the native kernels and the CUDA kernels (emulated on CPU
tensors, `emulated_cuda`; the real ones with --device cuda). Medians of round-robin runs.

Writes benchmarks/results/repeated_ids_<device>.{json,md} (`--out` another folder).
"""
from __future__ import annotations

import argparse
import sys

import torch

from topk_distill import ops

from . import common


def _inputs(n, v, k, device):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(n, v, generator=g)
    distinct = torch.stack([torch.randperm(v, generator=g)[:k] for _ in range(n)])
    repeat = distinct.clone()
    repeat[:, -1] = repeat[:, 0]
    one = distinct[:, :1].contiguous().to(device)
    return z.to(device), {"K = 1 (the O(V) pass)": one, f"K = {k}, distinct": distinct.to(device),
                          f"K = {k}, one repeat per row": repeat.to(device)}


def _steps(z, ids):
    """(shard pass step, backward step) for one set of ids, on the current backend."""
    k = ids.shape[1]
    lp = torch.full((z.shape[0], k), -9.0, device=z.device)
    row_max, sums, gathered, _, _ = ops.shard_pass(z, ids, 0, 1.0)
    terms = [("fkl", "tail", 1.0, 0.5, 0.1, 0.1)]
    out = ops.epilogue(row_max, sums, gathered, ids, lp, None, z.shape[1], terms, None, 1.0)
    gl = torch.ones(z.shape[0], device=z.device, dtype=row_max.dtype)
    return (lambda: ops.shard_pass(z, ids, 0, 1.0),
            lambda: ops.backward(z, ids, row_max, out[5], out[6], gl, 0, 1.0))


def run(n, v, k, reps, warmup, device):
    backends = ["native", "emulated_cuda"] if device.type == "cpu" else ["native"]
    rows = []
    for backend in backends:
        with ops.use_backend(backend):
            z, id_sets = _inputs(n, v, k, device)
            steps = {name: _steps(z, ids) for name, ids in id_sets.items()}
            for kernel, i in (("shard_pass", 0), ("backward", 1)):
                ms = common.time_interleaved({name: s[i] for name, s in steps.items()},
                                             reps=reps, warmup=warmup, device=device)
                names = list(ms)
                extra = ms[names[2]] - ms[names[1]]
                label = "cuda" if device.type == "cuda" else backend
                rows.append(dict(backend=label, kernel=kernel, N=n, V=v, K=k,
                                 ms_k1=ms[names[0]], ms_distinct=ms[names[1]],
                                 ms_repeat=ms[names[2]], ms_repeat_extra=extra,
                                 extra_below_k1=extra < ms[names[0]]))
                print(f"{label:14s} {kernel:10s} K=1 {ms[names[0]]:8.3f} ms  distinct "
                      f"{ms[names[1]]:8.3f} ms  repeat {ms[names[2]]:8.3f} ms  "
                      f"(repeat - distinct {extra:+.3f} ms)", flush=True)
    return rows


def markdown(doc) -> str:
    env = doc["environment"]
    lines = [f"# Repeated teacher ids: what resolving them costs ({env['device']})", "",
             f"- command `{env['command']}`, commit `{env['commit']}`, torch {env['torch']}",
             "- each kernel op alone, medians in ms, the three id sets round-robin; `repeat - "
             "distinct` = the cost of resolving one repeated id per row, to compare with the O(V) "
             "pass (K = 1)", "",
             "| backend | kernel | N | V | K | K = 1 ms | distinct ms | one repeat ms | "
             "repeat - distinct ms | below the K = 1 pass |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        lines.append(f"| {r['backend']} | {r['kernel']} | {r['N']} | {r['V']} | {r['K']} | "
                     f"{r['ms_k1']:.3f} | {r['ms_distinct']:.3f} | {r['ms_repeat']:.3f} | "
                     f"{r['ms_repeat_extra']:+.3f} | {'yes' if r['extra_below_k1'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--v", type=int, default=32000)
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--out", default=str(common.RESULTS), help="results folder")
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args(argv)
    device = common.pick_device(args.device)
    rows = run(args.n, args.v, args.k, args.reps, args.warmup, device)
    doc = {"environment": common.environment(device, "benchmarks.repeated_ids", argv),
           "rows": rows}
    common.write_results(f"repeated_ids_{device.type}", doc, markdown(doc), out_dir=args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
