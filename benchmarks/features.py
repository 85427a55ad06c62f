"""What the SPEC 9 additions cost on top of the loss alone, measured in one run.

    python -m benchmarks.features [--device cpu|cuda] [--n 512] [--v 32000] [--k 64] [--reps 15]

Each group is timed round-robin (common.time_fwd_bwd_interleaved: one iteration of every variant
in turn, so a shared machine's background load hits them alike) and its peak memory measured
(common.peak_memory_fwd_bwd), fwd+bwd medians in ms, fp32 and bf16 logits [N, V], K teacher ids:

  rl_outputs   the loss alone | + labels + return_entropy, backpropagating
               loss + 0.1 * label_logprobs.sum() + 0.01 * entropy.sum() (issue 15: <= 1.15x)
  mixture      fkl/topk alone | verl-recipe's kl_rkl, [fkl/topk 0.9, rkl/renorm 0.1] in one call
               (issue 15: <= 1.05x) | the same as two separate calls (what it replaces)
  student_topk the loss alone | the loss with student_topk=K (selection inside the shard pass on
               CPU) | the loss + torch.topk of the fp32 log_softmax (verl's way) | the loss +
               torch.topk of the raw logits (issue 16)
  layout       the loss on contiguous [B*T, V] logits | on logits[:, :-1] of a [B, T + 1, V]
               tensor (a view with two leading strides, no copy; issue 14)
  supports     fkl/topk with labels requested | support="sampled" (labels, label_teacher_logprobs)
               | support="generalized" with labels, each backpropagating loss + 0.1 *
               label_logprobs.sum() (issue 25: <= 1.05x, no extra pass, same peak memory)

Writes benchmarks/results/features_<device>.{json,md}; with ``--groups`` (a subset, e.g.
``--groups supports``) benchmarks/results/features_<groups>_<device>.{json,md}.
"""
from __future__ import annotations

import argparse
import sys

import torch

import topk_distill as td

from . import common


def _teacher(n, v, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(v, generator=g)[:k] for _ in range(n)])
    lp = torch.log_softmax(torch.randn(n, k, generator=g), -1) - 0.5
    labels = torch.randint(0, v, (n,), generator=g)
    return ids, lp, labels


def groups(n, v, k, dtype, device):
    """{group: (logits, {variant: forward(x) -> scalar})}."""
    g = torch.Generator().manual_seed(1)
    z = (torch.randn(n, v, generator=g) * 2).to(dtype).to(device)
    ids, lp, labels = (t.to(device) for t in _teacher(n, v, k))
    kd = dict(loss="fkl", check_inputs=False)

    def loss_alone(x):
        return td.topk_distill_loss(x, ids, lp, **kd).loss

    def rl(x):
        out = td.topk_distill_loss(x, ids, lp, labels=labels, return_entropy=True, **kd)
        return out.loss + 0.1 * out.label_logprobs.sum() + 0.01 * out.entropy.sum()

    kl_rkl = [("fkl", "topk", 0.9), ("rkl", "renorm", 0.1)]

    def mixture(x):
        return td.topk_distill_loss(x, ids, lp, loss=kl_rkl, check_inputs=False).loss

    def two_calls(x):
        a = td.topk_distill_loss(x, ids, lp, loss="fkl", check_inputs=False).loss
        b = td.topk_distill_loss(x, ids, lp, loss="rkl", support="renorm", check_inputs=False).loss
        return 0.9 * a + 0.1 * b

    def fused_topk(x):
        out = td.topk_distill_loss(x, ids, lp, student_topk=k, **kd)
        return out.loss + 0 * out.student_topk_logprobs.sum()

    def verl_topk(x):
        loss = td.topk_distill_loss(x, ids, lp, **kd).loss
        with torch.no_grad():
            torch.topk(torch.log_softmax(x.float(), -1), k, dim=-1)
        return loss

    def raw_topk(x):
        loss = td.topk_distill_loss(x, ids, lp, **kd).loss
        with torch.no_grad():
            torch.topk(x, k, dim=-1)
        return loss

    # layout: the same N rows as a contiguous [B*T, V] tensor and as logits[:, :-1]
    b = 8
    t = n // b
    big = (torch.randn(b, t + 1, v, generator=g) * 2).to(dtype).to(device)
    sliced = big[:, :-1].detach()  # a [b, t, V] view with two leading strides, no copy
    contiguous = sliced.reshape(b * t, v).contiguous()
    ids3, lp3 = ids[:b * t].view(b, t, k), lp[:b * t].view(b, t, k)

    g_lab = torch.Generator().manual_seed(2)
    label_lp = (-torch.rand(n, generator=g_lab) * 8).to(device)  # log p_y of the sampled token

    def with_labels(support, **extra):
        def fn(x):
            out = td.topk_distill_loss(x, ids, lp, support=support, labels=labels, **extra, **kd)
            return out.loss + 0.1 * out.label_logprobs.sum()
        return fn

    def layout_loss(x):
        return td.topk_distill_loss(x, ids3.reshape(*x.shape[:-1], k),
                                    lp3.reshape(*x.shape[:-1], k), **kd).loss

    return {
        "rl_outputs": (z, {"loss alone": loss_alone, "+ labels + entropy": rl}),
        "mixture": (z, {"fkl/topk alone": loss_alone, "kl_rkl mixture, one call": mixture,
                        "kl_rkl as two calls": two_calls}),
        "student_topk": (z, {"loss alone": loss_alone, "student_topk=K (fused)": fused_topk,
                             "loss + topk(log_softmax fp32)": verl_topk,
                             "loss + topk(raw logits)": raw_topk}),
        "layout": ({"contiguous [B*T, V]": contiguous, "logits[:, :-1] view": sliced},
                   {"contiguous [B*T, V]": layout_loss, "logits[:, :-1] view": layout_loss}),
        "supports": (z, {"topk + labels": with_labels("topk"),
                         "sampled": with_labels("sampled", label_teacher_logprobs=label_lp),
                         "generalized + labels": with_labels("generalized")}),
    }


def run(n, v, k, reps, warmup, device, only=None):
    rows = []
    for dname in ("fp32", "bf16"):
        dtype = common.DTYPES[dname]
        for group, (x, fns) in groups(n, v, k, dtype, device).items():
            if only and group not in only:
                continue
            if isinstance(x, dict):  # different inputs per variant: time each on its own input
                timings = {}
                for name, fn in fns.items():
                    leaf = x[name].requires_grad_(True)
                    timings.update(common.time_fwd_bwd_interleaved({name: fn}, leaf, reps=reps,
                                                                   warmup=warmup, device=device))
                inputs = {name: x[name] for name in fns}
            else:
                leaf = x.requires_grad_(True)
                timings = common.time_fwd_bwd_interleaved(fns, leaf, reps=reps, warmup=warmup,
                                                          device=device)
                inputs = {name: leaf for name in fns}
            base = next(iter(timings.values()))["ms_fwd_bwd"]
            for name, t in timings.items():
                peak = common.peak_memory_fwd_bwd(fns[name], inputs[name], device)
                rows.append(dict(group=group, variant=name, dtype=dname, N=n, V=v, K=k,
                                 ms_fwd=t["ms_fwd"], ms_bwd=t["ms_bwd"], ms_fwd_bwd=t["ms_fwd_bwd"],
                                 vs_first=t["ms_fwd_bwd"] / base, peak_mem_bytes=int(peak)))
                print(f"{group:13s} {dname} {name:32s} fwd+bwd {t['ms_fwd_bwd']:8.2f} ms "
                      f"({t['ms_fwd_bwd'] / base:.2f}x)  peak {peak / 2**20:7.1f} MiB", flush=True)
    return rows


def markdown(doc) -> str:
    env = doc["environment"]
    lines = [f"# SPEC 9 additions: cost on top of the loss ({env['device']})", "",
             f"- command `{env['command']}`, commit `{env['commit']}`, torch {env['torch']}",
             "- fwd+bwd medians, round-robin within each group; x = time / the group's first row;"
             " peak = bytes allocated on top of the inputs during one fwd+bwd", "",
             "| group | variant | dtype | N | V | K | fwd ms | bwd ms | fwd+bwd ms | x | peak MiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        lines.append(f"| {r['group']} | {r['variant']} | {r['dtype']} | {r['N']} | {r['V']} | "
                     f"{r['K']} | {r['ms_fwd']:.2f} | {r['ms_bwd']:.2f} | {r['ms_fwd_bwd']:.2f} | "
                     f"{r['vs_first']:.2f} | {r['peak_mem_bytes'] / 2**20:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--v", type=int, default=32000)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--groups", nargs="*", default=None,
                    help="only these groups (rl_outputs mixture student_topk layout supports)")
    args = ap.parse_args(argv)
    device = common.pick_device(args.device)
    rows = run(args.n, args.v, args.k, args.reps, args.warmup, device, args.groups)
    doc = {"environment": common.environment(device, "benchmarks.features", argv), "rows": rows}
    name = "features_" + ("_".join(args.groups) + "_" if args.groups else "") + device.type
    common.write_results(name, doc, markdown(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
