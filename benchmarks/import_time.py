"""What `import topk_distill` costs on top of `import torch` (issue 27: it was ~2 s, all of it
torch._dynamo, which parallel.py imported at module level).

    python -m benchmarks.import_time [--reps 7] [--checkout PATH ...] [--out DIR]

Every measurement is a fresh Python process (imports are cached per process) that times, with
``time.perf_counter`` inside the process, ``import torch`` and then ``import topk_distill``; it
also reports whether ``torch._dynamo`` was imported, and the slowest modules that the second
import pulled in (``python -X importtime``, cumulative). The processes of the different
checkouts run round-robin (each repetition runs one of each in turn, so all see the same
background load); the table gives medians. ``--checkout`` measures another checkout of this
repository with its own built extension (e.g. the commit before a change), default: this one.

Writes benchmarks/results/import_time_cpu.{json,md} (``--out`` another folder).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from . import common

# Runs in the child: both timings, dynamo's presence, and (with -X importtime on stderr) the
# modules. JSON on the last line of stdout.
_CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
import topk_distill
t2 = time.perf_counter()
print(json.dumps({"torch_s": t1 - t0, "topk_distill_s": t2 - t1,
                  "dynamo_imported": "torch._dynamo" in sys.modules,
                  "file": topk_distill.__file__}))
"""


def _child(checkout: Path, importtime: bool = False) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(checkout))
    env.pop("TOPK_DISTILL_LIBRARY", None)
    cmd = [sys.executable] + (["-X", "importtime"] if importtime else []) + ["-c", _CHILD]
    return subprocess.run(cmd, cwd=checkout, env=env, capture_output=True, text=True, check=True)


def _slowest_modules(stderr: str, top: int) -> list:
    """The ``top`` slowest modules imported after torch (cumulative us), from -X importtime."""
    rows, after_torch = [], False
    for line in stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        _self, cumulative, name = (p.strip() for p in line[len("import time:"):].split("|"))
        if not cumulative.isdigit():
            continue
        if after_torch:
            rows.append((int(cumulative), name))
        elif name == "torch":  # the top-level torch import closes here
            after_torch = True
    rows = [(us, name) for us, name in rows if name != "topk_distill"]
    return [{"module": name, "cumulative_ms": us / 1e3}
            for us, name in sorted(rows, reverse=True)[:top]]


def run(checkouts, reps: int, top: int) -> list:
    samples = {c: [] for c in checkouts}
    for _ in range(reps):
        for c in checkouts:
            samples[c].append(json.loads(_child(c).stdout.strip().splitlines()[-1]))
    rows = []
    for c in checkouts:
        s = samples[c]
        torch_ms = [x["torch_s"] * 1e3 for x in s]
        ours_ms = [x["topk_distill_s"] * 1e3 for x in s]
        detail = _child(c, importtime=True)
        rows.append({
            "checkout": str(c), "commit": _commit(c), "reps": reps,
            "import_torch_ms": statistics.median(torch_ms),
            "import_topk_distill_after_torch_ms": statistics.median(ours_ms),
            "import_topk_distill_after_torch_ms_min": min(ours_ms),
            "import_topk_distill_after_torch_ms_max": max(ours_ms),
            "dynamo_imported": any(x["dynamo_imported"] for x in s),
            "slowest_modules": _slowest_modules(detail.stderr, top),
        })
    return rows


def _commit(checkout: Path) -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=checkout,
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=checkout, capture_output=True, text=True,
                               check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("-dirty" if dirty else "")


def markdown(doc: dict) -> str:
    env = doc["environment"]
    lines = [
        "# `import topk_distill` on top of `import torch`", "",
        f"{env['device']}; torch {env['torch']}, Python {env['python']}; commit "
        f"{env['commit']}; {env['date']}; load average at start {env['loadavg_start']}.", "",
        f"Command: `{env['command']}`. Fresh process per measurement, medians of "
        f"{doc['rows'][0]['reps']} round-robin runs (benchmarks/import_time.py).", "",
        "| checkout (commit) | import torch (ms) | import topk_distill after torch (ms) | "
        "min - max (ms) | torch._dynamo imported |",
        "|---|---:|---:|---:|---|",
    ]
    for r in doc["rows"]:
        lines.append(
            f"| {Path(r['checkout']).name} ({r['commit']}) | {r['import_torch_ms']:.0f} | "
            f"{r['import_topk_distill_after_torch_ms']:.0f} | "
            f"{r['import_topk_distill_after_torch_ms_min']:.0f} - "
            f"{r['import_topk_distill_after_torch_ms_max']:.0f} | "
            f"{'yes' if r['dynamo_imported'] else 'no'} |")
    for r in doc["rows"]:
        lines += ["", f"Slowest modules after torch, {Path(r['checkout']).name} "
                      f"(`python -X importtime`, cumulative, one run):", ""]
        lines += [f"- `{m['module']}` {m['cumulative_ms']:.0f} ms" for m in r["slowest_modules"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.import_time",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=7, help="processes per checkout (median)")
    ap.add_argument("--top", type=int, default=8, help="slowest modules listed per checkout")
    ap.add_argument("--checkout", action="append", default=None,
                    help="a checkout with a built extension (repeatable; default: this one)")
    ap.add_argument("--out", default=str(common.RESULTS), help="results folder")
    args = ap.parse_args(argv)
    checkouts = [Path(c).resolve() for c in (args.checkout or [common.REPO])]
    rows = run(checkouts, args.reps, args.top)
    doc = {"environment": common.environment(torch.device("cpu"), "benchmarks.import_time",
                                             argv if argv is not None else sys.argv[1:]),
           "rows": rows}
    text = markdown(doc)
    print(text)
    common.write_results("import_time_cpu", doc, text, out_dir=args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
