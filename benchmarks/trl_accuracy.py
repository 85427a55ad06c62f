"""Where TRL 1.16.0's tail-bucket loss differs from the exact one, and by how much.

    python -m benchmarks.trl_accuracy [--out DIR]

TRL's ``_add_tail_bucket`` computes the tail as ``log(1 - exp(min(logsumexp_k(s_k), -1e-7)))``
(fp32): a tail of at least ``1 - exp(-1e-7)`` ~ 1e-7 on both sides, and no gradient through a
clamped tail. topk-distill's ``support="tail"`` uses the exact tails ``p_tail = max(1 - P, 0)``
and ``q_tail = 1 - Q`` (the latter summed over the columns outside the support, no
cancellation). This measures both against the float64 oracle on the server path
(``_compute_server_forward_kl_loss``, beta = 0, one position per row, V = 32000, K = 8) while
the student's mass on the teacher's top-K, Q, approaches 1 (``1 - Q`` from 1e-2 to 1e-12) with
the teacher's top-K mass P = 0.95, and while the teacher's P approaches 1. Also the non-finite
cases TRL maps through ``nan_to_num`` (a student log-prob of -inf at a teacher token).
Writes ``<out>/trl_accuracy.json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch

from . import common

V, K = 32000, 8


def _row(one_minus_q: float, teacher_p: float, seed: int = 0):
    """Logits [1, 1, V] whose softmax puts 1 - one_minus_q on the K teacher ids (spread evenly
    over the rest), and a teacher top-K of total mass teacher_p."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randperm(V, generator=g)[:K]
    w = torch.softmax(torch.randn(K, generator=g, dtype=torch.float64), -1)
    logits = torch.full((V,), math.log(one_minus_q / (V - K)), dtype=torch.float64)
    logits[ids] = torch.log((1 - one_minus_q) * w)
    t_w = torch.softmax(torch.randn(K, generator=g, dtype=torch.float64) * 0.5, -1)
    t_lp = torch.log(teacher_p * t_w)
    return logits.view(1, 1, V), ids.view(1, 1, K), t_lp.view(1, 1, K)


def _trl_and_ours(logits, ids, t_lp):
    import torch.nn.functional as F
    from trl.experimental.server_distillation.server_distillation_trainer import (
        ServerDistillationTrainer)

    import topk_distill as td
    from topk_distill.integrations.trl import server_distillation_loss

    tr = ServerDistillationTrainer.__new__(ServerDistillationTrainer)
    tr.beta, tr.temperature, tr.loss_add_tail = 0.0, 1.0, True
    tr.loss_top_k, tr.reverse_kl_top_1_mode = K, "sampled"
    result = {"topk_logprobs": t_lp.float(), "topk_token_ids": ids,
              "actual_logprobs": t_lp[..., 0].float()}
    labels = ids[..., 0]
    out = {}
    for name in ("trl", "ours", "exact"):
        x = logits.clone().float() if name != "exact" else logits.clone()
        x.requires_grad_(True)
        if name == "trl":
            loss = tr._compute_server_forward_kl_loss(
                teacher_result=result, student_log_probs=F.log_softmax(x, -1), labels=labels)
        elif name == "ours":
            loss = server_distillation_loss(tr, result, x, labels, labels)
        else:
            loss = td.reference.topk_distill_loss(x, ids, t_lp, loss="fkl", support="tail")
            loss = loss.loss
        (g,) = torch.autograd.grad(loss, x)
        out[name] = (float(loss), g.double())
    return out


def main(argv=None):
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(common.RESULTS), help="results folder")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    rows = []
    cases = [("student", q, 0.95) for q in (1e-2, 1e-4, 1e-6, 1e-7, 1e-8, 1e-10, 1e-12)]
    cases += [("teacher", 0.3, 1 - t) for t in (1e-4, 1e-6, 1e-7, 1e-8, 0.0)]
    for which, q, pm in cases:
        r = _trl_and_ours(*_row(q, pm))
        exact_l, exact_g = r["exact"]
        row = {"case": which, "1-Q": q, "1-P": 1 - pm, "exact": exact_l}
        for name in ("trl", "ours"):
            l, g = r[name]
            row[f"{name}_loss_err"] = abs(l - exact_l)
            row[f"{name}_grad_err"] = float((g - exact_g).abs().max())
        rows.append(row)

    # nan_to_num: a student log-prob of -inf at a teacher token (a logit of -inf there).
    logits, ids, t_lp = _row(1e-2, 0.95)
    logits[0, 0, ids[0, 0, 1]] = float("-inf")
    r = _trl_and_ours(logits, ids, t_lp)
    inf_case = {name: r[name][0] for name in r}

    lines = ["# TRL 1.16.0 tail bucket vs the exact tail (server path, beta = 0, forward KL)", "",
             f"- torch {torch.__version__}; `python -m benchmarks.trl_accuracy`; commit "
             f"{common.git_commit()}",
             f"- one position, V = {V}, K = {K}; the student puts 1 - Q on the vocab outside the "
             "teacher's top-K, the teacher's top-K has mass P; `exact` = the float64 oracle "
             "(`reference.topk_distill_loss(..., loss='fkl', support='tail')`); errors are "
             "absolute, the gradient's the largest over the logits", "",
             "| varied | 1 - Q | 1 - P | exact loss | TRL loss error | TRL grad error | "
             "drop-in loss error | drop-in grad error |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['1-Q']:.0e} | {r['1-P']:.0e} | {r['exact']:.6g} | "
                     f"{r['trl_loss_err']:.2e} | {r['trl_grad_err']:.2e} | "
                     f"{r['ours_loss_err']:.2e} | {r['ours_grad_err']:.2e} |")
    lines += ["", "A student logit of -inf at one teacher token (forward KL is +inf there): "
              + ", ".join(f"{k} = {v:.6g}" for k, v in inf_case.items())]
    md = "\n".join(lines) + "\n"
    print(md)
    os.makedirs(args.out, exist_ok=True)
    base = os.path.join(args.out, "trl_accuracy")
    with open(base + ".json", "w") as f:
        json.dump({"rows": rows, "student_logit_minus_inf": inf_case,
                   **common.environment(torch.device("cpu"), "benchmarks.trl_accuracy")}, f,
                  indent=2)
    with open(base + ".md", "w") as f:
        f.write(md)
    print(f"wrote {base}.json and {base}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
