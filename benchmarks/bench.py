"""``python -m benchmarks`` (``make bench``): topk-distill against plain PyTorch.

Implementations (the ``impl`` column):
  topk_distill        ``topk_distill.topk_distill_loss`` (our kernels)
  reference_eager     ``topk_distill.reference.topk_distill_loss``: pure PyTorch as users write it
                      (fp32 ``log_softmax`` over the full vocab, ``gather``, the divergence,
                      autograd)
  reference_compiled  the same function under ``torch.compile(dynamic=False)``; every distinct
                      (loss, shape, dtype) is compiled once, before its warm-up

The implementations of one configuration are timed round-robin (one iteration of each in turn),
so that on a shared machine they see the same background load and their ratios hold.

All three run with ``check_inputs=False`` in the tables (the compiled reference would otherwise
graph-break on the data checks' host syncs). The headline comparison runs our op with its
defaults (``check_inputs=True``) against a minimal user-written FKL ("plain PyTorch fp32
log_softmax + gather + autograd") at N=512, V=32000, K=64, fp32; the issue asks for >= 3x on CPU.

Rows: every loss at the default shape, then sweeps over N, V (fp32 and bf16) and K with loss=fkl.
Writes ``<out>/<device>.json``, ``<out>/<device>.md`` and ``<out>/<device>.png``.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

import topk_distill as td
from topk_distill import reference

from . import common
from .common import DTYPES

LOSSES = ["fkl", "rkl", "jsd", "fkl+rkl", "tvd", "skl", "srkl"]
IMPLS = ["topk_distill", "reference_eager", "reference_compiled"]
HEADLINE = dict(n=512, v=32000, k=64, dtype="fp32")
REQUIRED_SPEEDUP = 3.0


@dataclass
class Grid:
    default: Dict
    ns: List[int]
    vs: List[int]
    ks: List[int]
    dtypes: List[str]
    reps: int
    warmup: int


def grid_for(device: torch.device, quick: bool) -> Grid:
    if device.type == "cuda":
        if quick:
            return Grid(dict(n=2048, v=32000, k=64), [512, 2048, 8192], [32000, 128256],
                        [8, 64, 256], ["fp32", "bf16"], reps=20, warmup=3)
        return Grid(dict(n=4096, v=128256, k=64), [1024, 4096, 16384], [32000, 128256, 256000],
                    [8, 64, 512], ["fp32", "bf16"], reps=50, warmup=5)
    if quick:
        return Grid(dict(n=256, v=8192, k=64), [64, 256], [4096, 8192, 16384], [8, 64],
                    ["fp32", "bf16"], reps=20, warmup=2)
    return Grid(dict(n=512, v=32000, k=64), [128, 512, 2048], [8192, 32000, 131072],
                [8, 64, 256], ["fp32", "bf16"], reps=20, warmup=2)


@dataclass
class Config:
    loss: str
    n: int
    v: int
    k: int
    dtype: str
    sweeps: List[str] = field(default_factory=list)

    @property
    def key(self):
        return (self.loss, self.n, self.v, self.k, self.dtype)


def configs_for(grid: Grid) -> List[Config]:
    d = grid.default
    out: Dict[tuple, Config] = {}

    def add(sweep, loss, n, v, k, dtype):
        c = Config(loss, n, v, k, dtype)
        out.setdefault(c.key, c).sweeps.append(sweep)

    for loss in LOSSES:
        add("loss", loss, d["n"], d["v"], d["k"], "fp32")
    for n in grid.ns:
        add("N", "fkl", n, d["v"], d["k"], "fp32")
    for dtype in grid.dtypes:
        for v in grid.vs:
            add("V", "fkl", d["n"], v, d["k"], dtype)
    for k in grid.ks:
        add("K", "fkl", d["n"], d["v"], k, "fp32")
    return list(out.values())


# ----------------------------------------------------------------------------- the callables

def _reference_loss(x, ids, lp, loss: str):
    return reference.topk_distill_loss(x, ids, lp, loss=loss, check_inputs=False).loss


_compiled_reference = None


def compiled_reference():
    global _compiled_reference
    if _compiled_reference is None:
        import torch._dynamo

        # One specialised graph per (loss, shape, dtype): raise dynamo's recompile limit.
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, 256)
        _compiled_reference = torch.compile(_reference_loss, dynamic=False)
    return _compiled_reference


def forward_fn(impl: str, loss: str, ids, lp, check_inputs: bool = False
               ) -> Callable[[torch.Tensor], torch.Tensor]:
    if impl == "topk_distill":
        return lambda x: td.topk_distill_loss(x, ids, lp, loss=loss, check_inputs=check_inputs).loss
    if impl == "reference_eager":
        return lambda x: _reference_loss(x, ids, lp, loss)
    if impl == "reference_compiled":
        fn = compiled_reference()
        return lambda x: fn(x, ids, lp, loss)
    raise ValueError(impl)


def plain_pytorch_fkl(x, ids, lp):
    """The baseline users write today: fp32 log_softmax over the vocab, gather, FKL, autograd."""
    logq = torch.log_softmax(x.float(), dim=-1)
    s = logq.gather(-1, ids)
    p = lp.exp()
    return (p * (lp - s)).sum(-1).mean()


# ----------------------------------------------------------------------------- measurements

def _free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure_config(cfg: Config, impls: List[str], device: torch.device, grid: Grid,
                   copy_gbps: float, inputs) -> List[Dict]:
    """One row per implementation; their timings are interleaved (see time_fwd_bwd_interleaved)."""
    z, ids, lp = inputs
    x = z.detach().requires_grad_()
    rows, forwards = {}, {}
    for impl in impls:
        row = dict(impl=impl, loss=cfg.loss, N=cfg.n, V=cfg.v, K=cfg.k, dtype=cfg.dtype, tp=1,
                   sweeps=list(cfg.sweeps), ms_fwd=None, ms_bwd=None, ms_fwd_bwd=None, gbps=None,
                   gbps_fwd=None, gbps_bwd=None, frac_of_copy=None, peak_mem_bytes=None)
        rows[impl] = row
        fwd = forward_fn(impl, cfg.loss, ids, lp)
        try:  # first call outside the clock: torch.compile compiles here
            t0 = time.perf_counter()
            fwd(x).backward()
            x.grad = None
            if impl == "reference_compiled":
                row["compile_s"] = time.perf_counter() - t0
            row["peak_mem_bytes"] = common.peak_memory_fwd_bwd(fwd, x, device)
            forwards[impl] = fwd
        except Exception as e:  # one broken implementation must not lose the others
            traceback.print_exc()
            row["error"] = f"{type(e).__name__}: {e}"
            x.grad = None
    try:
        times = common.time_fwd_bwd_interleaved(forwards, x, reps=grid.reps, warmup=grid.warmup,
                                                device=device) if forwards else {}
    except Exception as e:
        traceback.print_exc()
        times = {}
        for impl in forwards:
            rows[impl]["error"] = f"{type(e).__name__}: {e}"
    mb = common.model_bytes(cfg.n, cfg.v, z.element_size())
    for impl, t in times.items():
        gbps = mb["fwd_bwd"] / (t["ms_fwd_bwd"] * 1e-3) / 1e9
        rows[impl].update(
            ms_fwd=t["ms_fwd"], ms_bwd=t["ms_bwd"], ms_fwd_bwd=t["ms_fwd_bwd"], gbps=gbps,
            gbps_fwd=mb["fwd"] / (t["ms_fwd"] * 1e-3) / 1e9,
            gbps_bwd=mb["bwd"] / (t["ms_bwd"] * 1e-3) / 1e9,
            frac_of_copy=gbps / copy_gbps, copy_gbps_row=copy_gbps, reps=t["reps"])
    return [rows[impl] for impl in impls]


def headline(device: torch.device, reps: int = 30, warmup: int = 3) -> Dict:
    """Our op (defaults) vs plain PyTorch fp32 FKL at N=512, V=32000, K=64, forward+backward,
    interleaved so that both see the same machine load."""
    n, v, k = HEADLINE["n"], HEADLINE["v"], HEADLINE["k"]
    z, ids, lp = common.make_inputs(n, v, k, torch.float32, device)
    x = z.detach().requires_grad_()

    def ours_fwd(t):
        return td.topk_distill_loss(t, ids, lp, loss="fkl").loss

    def plain_fwd(t):
        return plain_pytorch_fkl(t, ids, lp)

    def step(f):
        # Each step releases its own gradient (as zero_grad(set_to_none=True) does), so that no
        # implementation is charged for freeing the other's 64 MB.
        def run():
            f(x).backward()
            x.grad = None
        return run

    # Same loss, same gradient: a benchmark of two different things would be meaningless.
    l_ours, l_plain = ours_fwd(x), plain_fwd(x)
    g_ours = torch.autograd.grad(l_ours, x)[0]
    g_plain = torch.autograd.grad(l_plain, x)[0]
    loss_rel = abs(l_ours.item() - l_plain.item()) / max(abs(l_plain.item()), 1e-30)
    grad_err = (g_ours - g_plain).abs().max().item()
    del g_ours, g_plain

    samples = common.time_interleaved({"ours": step(ours_fwd), "plain": step(plain_fwd)},
                                      reps=reps, warmup=warmup, device=device, stat=None)
    ms = {name: statistics.median(s) for name, s in samples.items()}
    out = dict(N=n, V=v, K=k, dtype="fp32", loss="fkl", reps=reps,
               ours_ms_fwd_bwd=ms["ours"], plain_ms_fwd_bwd=ms["plain"],
               speedup=ms["plain"] / ms["ours"], required=REQUIRED_SPEEDUP,
               ours_ms_min=min(samples["ours"]), plain_ms_min=min(samples["plain"]),
               speedup_of_min=min(samples["plain"]) / min(samples["ours"]),
               ours_peak_mem_bytes=common.peak_memory_fwd_bwd(ours_fwd, x, device),
               plain_peak_mem_bytes=common.peak_memory_fwd_bwd(plain_fwd, x, device),
               loss_rel_diff=loss_rel, grad_max_abs_diff=grad_err)
    out["passed"] = out["speedup"] >= REQUIRED_SPEEDUP
    out["phases"] = phase_timings(z, ids, lp, device, reps=reps)
    return out


def phase_timings(z, ids, lp, device, reps: int = 30) -> Optional[Dict[str, float]]:
    """Median ms of each kernel of our op alone (torch.ops.topk_distill.*), FKL, no TP."""
    try:
        from topk_distill import ops
        n, v = z.shape
        terms = [("fkl", "topk", 1.0, 0.5, 0.1, 0.1)]
        row_max, sums, gathered, _, _ = ops.shard_pass(z, ids, 0, 1.0)
        ep = ops.epilogue(row_max, sums, gathered, ids, lp, None, v, terms, None, 1.0)
        grad_rows = torch.full((n,), 1.0 / n, dtype=row_max.dtype, device=z.device)
        fns = {
            "shard_pass": lambda: ops.shard_pass(z, ids, 0, 1.0),
            "epilogue": lambda: ops.epilogue(row_max, sums, gathered, ids, lp, None, v, terms,
                                             None, 1.0),
            "backward": lambda: ops.backward(z, ids, row_max, ep[5], ep[6], grad_rows, 0, 1.0),
        }
        return common.time_interleaved(fns, reps=reps, warmup=3, device=device)
    except Exception as e:  # report, do not fail the whole benchmark run
        print(f"(phase timings unavailable: {type(e).__name__}: {e})")
        return None


# ----------------------------------------------------------------------------- reporting

def _fmt(x, spec=".2f"):
    return "-" if x is None else format(x, spec)


def headline_text(h: Dict) -> str:
    verdict = "PASS" if h["passed"] else "FAIL"
    lines = [
        "=" * 78,
        f"HEADLINE  FKL forward+backward, N={h['N']} V={h['V']} K={h['K']} fp32, "
        f"median of {h['reps']} (interleaved)",
        f"  topk_distill (ours, defaults)                      {h['ours_ms_fwd_bwd']:9.2f} ms"
        f"   peak {h['ours_peak_mem_bytes'] / 2**20:7.1f} MiB",
        f"  plain PyTorch (fp32 log_softmax + gather + autograd) {h['plain_ms_fwd_bwd']:7.2f} ms"
        f"   peak {h['plain_peak_mem_bytes'] / 2**20:7.1f} MiB",
        f"  speedup {h['speedup']:.2f}x   (required >= {h['required']:.0f}x: {verdict})"
        f"   loss rel diff {h['loss_rel_diff']:.1e}, "
        f"grad max abs diff {h['grad_max_abs_diff']:.1e}",
        f"  (fastest of {h['reps']}: ours {h['ours_ms_min']:.2f} ms, "
        f"plain {h['plain_ms_min']:.2f} ms, {h['speedup_of_min']:.2f}x)",
    ]
    if h.get("phases"):
        p = h["phases"]
        lines.append("  our kernels alone: " + ", ".join(f"{k} {v:.2f} ms" for k, v in p.items()))
    lines.append("=" * 78)
    return "\n".join(lines)


def rows_table(rows: List[Dict]) -> str:
    eager = {(r["loss"], r["N"], r["V"], r["K"], r["dtype"]): r["ms_fwd_bwd"] for r in rows
             if r["impl"] == "reference_eager"}
    head = ("| impl | loss | N | V | K | dtype | fwd ms | bwd ms | fwd+bwd ms | GB/s | of copy "
            "| peak MiB | vs eager |")
    lines = [head, "|" + "---|" * 13]
    for r in rows:
        base = eager.get((r["loss"], r["N"], r["V"], r["K"], r["dtype"]))
        ratio = (base / r["ms_fwd_bwd"]) if base and r["ms_fwd_bwd"] else None
        peak = None if r["peak_mem_bytes"] is None else r["peak_mem_bytes"] / 2**20
        frac = None if r["frac_of_copy"] is None else 100 * r["frac_of_copy"]
        lines.append(
            f"| {r['impl']} | {r['loss']} | {r['N']} | {r['V']} | {r['K']} | {r['dtype']} "
            f"| {_fmt(r['ms_fwd'])} | {_fmt(r['ms_bwd'])} | {_fmt(r['ms_fwd_bwd'])} "
            f"| {_fmt(r['gbps'], '.1f')} | {_fmt(frac, '.0f')}% | {_fmt(peak, '.1f')} "
            f"| {_fmt(ratio, '.1f')}x |")
    return "\n".join(lines)


def markdown(result: Dict) -> str:
    env, h = result, result["headline"]
    p = h.get("phases") or {}
    md = [
        f"# topk-distill benchmark: {env['device_type']}",
        "",
        f"- device: {env['device']}",
        f"- torch {env['torch']}" + (f", CUDA {env['cuda']}" if env["cuda"] else ""),
        f"- commit: `{env['commit']}`",
        f"- command: `{env['command']}`  ({env['date']}, {env['wall_s']:.0f} s; 1-min load "
        f"average {_fmt(env.get('loadavg_start'), '.1f')} at start, "
        f"{_fmt(env.get('loadavg_end'), '.1f')} at end)",
        f"- copy bandwidth (`dst.copy_(src)`, 256 MiB, read+write): {env['copy_gbps']:.1f} GB/s "
        f"at the start, {env['copy_gbps_end']:.1f} GB/s at the end; `of copy` divides a row's "
        "GB/s by the copy bandwidth measured right before its configuration (`copy_gbps_row`)",
        f"- timing: median of {result['reps']} repetitions after {result['warmup']} warm-up "
        f"({'CUDA events' if env['device_type'] == 'cuda' else 'time.perf_counter'}); "
        "GB/s = 3 x N x V x element size / fwd+bwd time (forward reads the logits, backward "
        "reads them and writes the gradient); peak = bytes allocated above the inputs during "
        "one forward+backward (see benchmarks/common.py)",
        "",
        "## Headline: ours vs plain PyTorch (FKL, forward+backward)",
        "",
        f"N={h['N']}, V={h['V']}, K={h['K']}, fp32; median of {h['reps']}, interleaved.",
        "",
        "| | fwd+bwd ms | peak MiB |",
        "|---|---|---|",
        f"| topk_distill (defaults) | {h['ours_ms_fwd_bwd']:.2f} | "
        f"{h['ours_peak_mem_bytes'] / 2**20:.1f} |",
        f"| plain PyTorch (fp32 log_softmax + gather + autograd) | {h['plain_ms_fwd_bwd']:.2f} | "
        f"{h['plain_peak_mem_bytes'] / 2**20:.1f} |",
        "",
        f"**Speedup {h['speedup']:.2f}x** (required >= {h['required']:.0f}x: "
        f"{'PASS' if h['passed'] else 'FAIL'}). Loss relative difference {h['loss_rel_diff']:.1e}, "
        f"gradient max abs difference {h['grad_max_abs_diff']:.1e}. Fastest of the "
        f"{h['reps']} repetitions: ours {h['ours_ms_min']:.2f} ms, "
        f"plain {h['plain_ms_min']:.2f} ms "
        f"({h['speedup_of_min']:.2f}x).",
    ]
    if p:
        md += ["", "Our kernels alone (`torch.ops.topk_distill.*`, ms): " +
               ", ".join(f"{k} {v:.2f}" for k, v in p.items())]
    md += ["", "## All rows", "",
           "`vs eager` = reference_eager fwd+bwd time / this row's fwd+bwd time. "
           "Sweeps use loss=fkl; `of copy` = GB/s as a fraction of the copy bandwidth.", "",
           rows_table(result["rows"]), ""]
    if result.get("plot"):
        md += [f"![time and peak memory against V]({Path(result['plot']).name})", ""]
    return "\n".join(md)


def plot(result: Dict, path: Path) -> Optional[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no plot)")
        return None
    rows = [r for r in result["rows"] if "V" in r["sweeps"] and r["ms_fwd_bwd"] is not None]
    if not rows:
        return None
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = {"topk_distill": "tab:blue", "reference_eager": "tab:red",
              "reference_compiled": "tab:orange"}
    styles = {"fp32": "-", "bf16": "--", "fp16": ":"}
    for impl in IMPLS:
        for dtype in [d for d in DTYPES if any(r["dtype"] == d for r in rows)]:
            sel = sorted((r for r in rows if r["impl"] == impl and r["dtype"] == dtype),
                         key=lambda r: r["V"])
            if not sel:
                continue
            vs = [r["V"] for r in sel]
            kw = dict(color=colors[impl], linestyle=styles.get(dtype, "-"), marker="o",
                      label=f"{impl} {dtype}")
            ax_t.plot(vs, [r["ms_fwd_bwd"] for r in sel], **kw)
            ax_m.plot(vs, [r["peak_mem_bytes"] / 2**20 for r in sel], **kw)
    n, k = rows[0]["N"], rows[0]["K"]
    for ax, title, ylabel in ((ax_t, "forward+backward time", "ms (median)"),
                              (ax_m, "peak memory above inputs", "MiB")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("V (vocab)")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{title}, FKL, N={n}, K={k}")
        ax.grid(True, which="both", alpha=0.3)
    ax_t.legend(fontsize=8)
    fig.suptitle(f"topk-distill vs PyTorch - {result['device']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- main

def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small shapes (a smoke run, ~2 min)")
    ap.add_argument("--device", default="auto", help="auto (default: cuda if present) | cpu | cuda")
    ap.add_argument("--out", default=str(common.RESULTS), help="results folder")
    ap.add_argument("--no-compile", action="store_true", help="skip reference_compiled")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions (>= 20)")
    ap.add_argument("--headline-only", action="store_true",
                    help="only the ours-vs-plain-PyTorch comparison (prints, writes nothing)")
    args = ap.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv

    device = common.pick_device(args.device)
    grid = grid_for(device, args.quick)
    if args.reps is not None:
        grid.reps = max(args.reps, 20)
    impls = [i for i in IMPLS if not (args.no_compile and i == "reference_compiled")]
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    result = common.environment(device, "benchmarks", argv)
    print(f"device: {result['device']}\ntorch {result['torch']}, commit {result['commit']}")
    result["copy_gbps"] = common.copy_gbps(device)
    print(f"copy bandwidth: {result['copy_gbps']:.1f} GB/s (read+write)")
    result["reps"], result["warmup"] = grid.reps, grid.warmup

    h = headline(device)
    result["headline"] = h
    print(headline_text(h), flush=True)
    if args.headline_only:
        return 0

    rows = []
    configs = configs_for(grid)
    for i, cfg in enumerate(configs):
        dtype = DTYPES[cfg.dtype]
        _free(device)
        inputs = common.make_inputs(cfg.n, cfg.v, cfg.k, dtype, device)
        # The copy roofline again, right before this configuration: on a shared machine the
        # background load drifts, and the fraction should compare like with like.
        copy_now = common.copy_gbps(device, reps=10)
        for row in measure_config(cfg, impls, device, grid, copy_now, inputs):
            rows.append(row)
            impl = row["impl"]
            peak = row["peak_mem_bytes"]
            print(f"[{i + 1:2d}/{len(configs)} {time.perf_counter() - t_start:5.0f}s] "
                  f"{impl:18s} {cfg.loss:7s} N={cfg.n:<5d} V={cfg.v:<6d} K={cfg.k:<3d} {cfg.dtype}"
                  f"  fwd {_fmt(row['ms_fwd']):>8s}  bwd {_fmt(row['ms_bwd']):>8s}"
                  f"  both {_fmt(row['ms_fwd_bwd']):>8s} ms  {_fmt(row['gbps'], '.1f'):>6s} GB/s"
                  f"  peak {_fmt(None if peak is None else peak / 2**20, '.1f'):>7s} MiB"
                  + (f"  ERROR {row['error']}" if "error" in row else ""), flush=True)
        del inputs
    result["rows"] = rows
    result["copy_gbps_end"] = common.copy_gbps(device)
    result["loadavg_end"] = common._loadavg()
    result["wall_s"] = time.perf_counter() - t_start

    name = device.type
    png = plot(result, out_dir / f"{name}.png")
    result["plot"] = str(png) if png else None
    (out_dir / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    (out_dir / f"{name}.md").write_text(markdown(result))
    print()
    print(rows_table(rows))
    print()
    print(headline_text(h))
    print(f"copy bandwidth {result['copy_gbps']:.1f} GB/s (start), "
          f"{result['copy_gbps_end']:.1f} GB/s (end); wall {result['wall_s']:.0f} s")
    print(f"wrote {out_dir / (name + '.json')}, {out_dir / (name + '.md')}"
          + (f", {png}" if png else ""))
    return 0
