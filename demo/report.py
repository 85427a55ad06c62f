"""The demo's outputs: a table (stdout, markdown, JSON) and a PNG of the training curves."""
from __future__ import annotations

import json
import os

COLUMNS = [("model", "model", "{}"), ("params", "params", "{:,}"),
           ("kl", "KL(teacher‖model) nats/token", "{:.4f}"), ("top1", "top-1 agreement", "{:.3f}"),
           ("ppl", "held-out ppl", "{:.2f}"), ("mass_at_k", "mass on teacher top-K", "{:.3f}"),
           ("train_s", "train s", "{:.1f}")]


def _cell(row: dict, key: str, fmt: str) -> str:
    v = row.get(key)
    return "-" if v is None else fmt.format(v)


def markdown_table(rows: list[dict]) -> str:
    head = "| " + " | ".join(title for _, title, _ in COLUMNS) + " |"
    rule = "|" + "|".join("---" if k == "model" else "---:" for k, _, _ in COLUMNS) + "|"
    body = ["| " + " | ".join(_cell(r, k, f) for k, _, f in COLUMNS) + " |" for r in rows]
    return "\n".join([head, rule, *body])


def text_table(rows: list[dict]) -> str:
    cells = [[t for _, t, _ in COLUMNS]] + [[_cell(r, k, f) for k, _, f in COLUMNS] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
             for line in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_results(out: str, result: dict) -> dict:
    """Write results.json, results.md and curves.png; returns their paths."""
    paths = {"json": os.path.join(out, "results.json"), "md": os.path.join(out, "results.md"),
             "png": os.path.join(out, "curves.png")}
    with open(paths["json"], "w") as f:
        json.dump(result, f, indent=1)
    s = result["settings"]
    md = [f"# topk-distill demo: students distilled from a top-{s['k']} teacher",
          "",
          f"Corpus: {s['corpus']['files']} Python stdlib files ({s['corpus']['bytes']:,} bytes), "
          f"byte-level BPE with {s['vocab_size']} tokens; held-out: {s['eval_positions']:,} positions.",
          f"Student: {s['student']}, {s['student_steps']} steps; teacher: {s['teacher']}. "
          f"Loss implementation: `{s['impl']}`, device {s['device']}, TP={s['tp']}.",
          "",
          markdown_table(result["rows"]),
          "",
          "KL over the full vocabulary, from the teacher's exact (not top-k) distribution; "
          "top-1 agreement = argmax(student) == argmax(teacher); ppl on the held-out text.",
          ""]
    if result.get("tp_check"):
        md += ["## TP=%d vs TP=1 curves" % s["tp"], "", tp_check_text(result["tp_check"]), ""]
    md += [f"Command: `{s['command']}`  ", f"Total wall time: {result['timing']['total_s']:.0f}s "
           f"({', '.join(f'{k} {v:.0f}s' for k, v in result['timing'].items() if k != 'total_s')})",
           "", "![training curves](curves.png)", ""]
    with open(paths["md"], "w") as f:
        f.write("\n".join(md))
    plot_curves(paths["png"], result)
    return paths


def tp_check_text(check: dict) -> str:
    head = ["run", "max|Δloss|", "max|Δloss|/|loss|", "max|Δmass|", "max|Δeval KL|",
            "final ΔKL", "tolerance", "within"]
    rows = [[name, f"{c['max_abs_loss']:.2e}", f"{c['max_rel_loss']:.2e}",
             f"{c['max_abs_mass']:.2e}", f"{c.get('max_abs_eval_kl', float('nan')):.2e}",
             f"{c['final_kl_diff']:.2e}",
             f"{c.get('atol', check['atol']):g} + {c.get('rtol', check['rtol']):g}|x|",
             "yes" if c["ok"] else "NO"]
            for name, c in check["runs"].items()]
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    lines = ["  ".join(x.rjust(w) for x, w in zip(r, widths)) for r in [head] + rows]
    lines.append("Δ = |TP - TP=1| of the training loss, the student mass and the held-out KL, at "
                 "every step; x = the TP=1 value.")
    for name, c in check["runs"].items():
        if c.get("note"):
            lines.append(f"{name}: looser tolerance ({c['note']}).")
    return "\n".join(lines)


def plot_curves(path: str, result: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = result["curves"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    for i, (name, c) in enumerate(curves.items()):
        color = f"C{i}"
        if not name.startswith("ce"):
            axes[0].plot(c["step"], c["loss"], color=color, lw=1, label=name)
        axes[1].plot(c["step"], c["mass"], color=color, lw=1, label=name)
        axes[2].plot(c["eval_step"], c["eval_kl"], color=color, lw=1.5, marker=".", label=name)
    base = {r["model"]: r for r in result["rows"]}
    if "teacher" in base:
        axes[1].axhline(base["teacher"]["mass_at_k"], color="k", ls="--", lw=1, label="teacher")
    axes[0].set_title("training loss (each in its own units)")
    axes[1].set_title(f"student mass on the teacher's top-{result['settings']['k']}")
    axes[2].set_title("held-out KL(teacher ‖ student), full vocab")
    axes[2].set_yscale("log")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- --on-policy

ONPOLICY_COLUMNS = [
    ("model", "run (loss/support/K)", "{}"),
    ("fkl_text", "KL(t‖s) text", "{:.4f}"), ("rkl_text", "KL(s‖t) text", "{:.4f}"),
    ("fkl_own", "KL(t‖s) own", "{:.4f}"), ("rkl_own", "KL(s‖t) own", "{:.4f}"),
    ("cos_mean", "grad cos (mean)", "{:.3f}"), ("cos_std", "± std over draws", "{:.3f}"),
    ("cos_of_mean", "cos of mean grad", "{:.3f}"), ("seconds", "s", "{:.1f}"),
]


def onpolicy_table(rows: list[dict], markdown: bool) -> str:
    rows = [dict(r, seconds=(r["rollout_s"] + r["train_s"]) if "train_s" in r else None)
            for r in rows]
    cells = [[t for _, t, _ in ONPOLICY_COLUMNS]] + [
        [_cell(r, k, f) for k, _, f in ONPOLICY_COLUMNS] for r in rows]
    if markdown:
        rule = "|" + "|".join("---" if k == "model" else "---:" for k, _, _ in ONPOLICY_COLUMNS) + "|"
        lines = ["| " + " | ".join(c) + " |" for c in cells]
        return "\n".join([lines[0], rule, *lines[1:]])
    widths = [max(len(c[i]) for c in cells) for i in range(len(ONPOLICY_COLUMNS))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
             for line in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_onpolicy_results(out: str, result: dict) -> dict:
    """Write onpolicy.json, onpolicy.md and onpolicy.png; returns their paths."""
    paths = {k: os.path.join(out, f"onpolicy.{k}") for k in ("json", "md", "png")}
    with open(paths["json"], "w") as f:
        json.dump(result, f, indent=1)
    s, o = result["settings"], result["onpolicy"]
    z = o["sizes"]
    md = [f"# topk-distill demo: on-policy distillation, estimators compared",
          "",
          f"Command: `{s['command']}`  ",
          f"Commit: `{s.get('commit', '?')}`; machine: {s.get('machine', '?')}; torch "
          f"{s['torch']}, {s['threads']} thread(s); total wall time {result['timing']['total_s']:.0f}s"
          + (f", CPU time {result['timing']['cpu_s']:.0f}s." if "cpu_s" in result["timing"] else "."),
          "",
          f"Student: {s['student']}, warm-started with {o['warm']['steps']} cross-entropy steps on "
          f"the held-in text, then {z['steps']} on-policy steps of {z['batch']} sequences: a "
          f"{z['prompt_len']}-token prompt from the held-in text, continued by the student to "
          f"{s['sizes']['context']} tokens (temperature 1), scored by the teacher ({s['teacher']}) "
          f"as vLLM's `prompt_logprobs=K` (top-K log-probs and the sampled token's log-prob); the "
          f"loss is the mean over the generated positions. AdamW, lr {z['lr']}. JSD: beta = "
          f"{o['rows'][0]['beta'] if o['rows'] else 0.5}.",
          "",
          onpolicy_table(o["baselines"] + o["rows"], markdown=True),
          "",
          "KL columns: full vocabulary, the teacher's exact distribution, mean nats per position. "
          f"*text*: {s['eval_positions']:,} held-out text positions (teacher-forced); *own*: the "
          f"model's own continuations of {z['eval_prompts']} held-out prompts (fixed sampling seed), "
          "generated positions only - where on-policy training happens. "
          f"*grad cos*: on one fixed batch ({o['gradient']['positions']} generated positions of the "
          "warm-started student's samples), the cosine between the estimator's gradient (all "
          "student parameters) and the gradient of the same divergence over the full vocabulary; "
          f"for `sampled` the token at every position is redrawn from the student {o['gradient']['draws']} "
          "times: mean and standard deviation of the per-draw cosine, and the cosine of the "
          "gradient averaged over the draws (topk/tail are deterministic given the batch). "
          "*s*: rollout + training seconds of the run.",
          "", "![on-policy estimators](onpolicy.png)", ""]
    with open(paths["md"], "w") as f:
        f.write("\n".join(md))
    plot_onpolicy(paths["png"], result)
    return paths


def plot_onpolicy(path: str, result: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    o = result["onpolicy"]
    rows = o["rows"]
    losses = list(dict.fromkeys(r["loss"] for r in rows))
    supports = [s for s in dict.fromkeys(r["support"] for r in rows) if s != "full"]
    warm = o["baselines"][1]
    panels = [("fkl_own", "KL(teacher ‖ student), own samples"),
              ("rkl_own", "KL(student ‖ teacher), own samples"),
              ("cos_mean", "gradient cosine to the full-vocab gradient")]
    fig, axes = plt.subplots(len(losses), 3, figsize=(15, 3.4 * len(losses)), squeeze=False)
    for i, loss in enumerate(losses):
        full = next((r for r in rows if r["loss"] == loss and r["support"] == "full"), None)
        for j, (key, title) in enumerate(panels):
            ax = axes[i][j]
            for c, sup in enumerate(supports):
                pts = sorted((r["k"], r[key], r["cos_std"]) for r in rows
                             if r["loss"] == loss and r["support"] == sup)
                if not pts:
                    continue
                ks, ys, es = zip(*pts)
                if key == "cos_mean":
                    ax.errorbar(ks, ys, yerr=es, color=f"C{c}", marker="o", capsize=3, label=sup)
                    if sup == "sampled":
                        cm = [r["cos_of_mean"] for r in sorted(
                            (r for r in rows if r["loss"] == loss and r["support"] == sup),
                            key=lambda r: r["k"])]
                        ax.plot(ks, cm, color=f"C{c}", ls=":", marker="x",
                                label=f"sampled, mean of {o['gradient']['draws']} draws")
                else:
                    ax.plot(ks, ys, color=f"C{c}", marker="o", label=sup)
            if key != "cos_mean":
                if full is not None:
                    ax.axhline(full[key], color="k", ls="--", lw=1, label="full vocab")
                ax.axhline(warm[key], color="gray", ls=":", lw=1, label="warm start")
            else:
                ax.axhline(1.0, color="k", ls="--", lw=1)
            ax.set_xscale("log", base=2)
            ax.set_xticks([r for r in sorted({r["k"] for r in rows if r["k"]})])
            ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
            ax.set_xlabel("K (teacher top-K)")
            ax.set_title(f"{loss}: {title}", fontsize=10)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
