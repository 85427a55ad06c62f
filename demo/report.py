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
