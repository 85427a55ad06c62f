"""Student training with topk-distill, and the held-out evaluation against the teacher."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from .model import CopyToTensorParallel, TinyGPT, full_head_weight
from .pipeline import DemoSizes, TopK, make_optimizer, progress_bar


@dataclass(frozen=True)
class RunSpec:
    """One student: a (loss, support) pair of topk-distill, or ``loss="ce"`` for the
    baseline trained on the data's next tokens with plain cross-entropy."""

    loss: str
    support: str = "topk"
    beta: float = 0.5

    @property
    def name(self) -> str:
        return "ce (hard labels)" if self.loss == "ce" else f"{self.loss}/{self.support}"


@dataclass
class TP:
    """This process's place in the tensor-parallel group that splits the LM head."""

    group: object
    rank: int
    size: int


@dataclass
class EvalSet:
    x: torch.Tensor            # [E, T] inputs
    y: torch.Tensor            # [E, T] next tokens
    teacher_lp: torch.Tensor   # [E, T, V] teacher log-probs (full vocab, fp32)
    teacher_topk: torch.Tensor  # [E, T, K] teacher top-k ids


@torch.no_grad()
def make_evalset(teacher: TinyGPT, win: torch.Tensor, k: int, device) -> EvalSet:
    x, y = win[:, :-1].to(device), win[:, 1:].to(device)
    lp = torch.cat([torch.log_softmax(teacher(x[i:i + 16]).float(), -1) for i in range(0, len(x), 16)])
    return EvalSet(x, y, lp, lp.topk(k, dim=-1).indices)


@torch.no_grad()
def evaluate(model: TinyGPT, ev: EvalSet, rows: int | None = None, tp: TP | None = None,
             batch: int = 16) -> dict:
    """KL(teacher || model) over the full vocab, top-1 agreement with the teacher,
    perplexity on the held-out text and the model's mass on the teacher's top-k,
    all averaged over held-out positions."""
    w = full_head_weight(model, tp.group if tp else None)
    rows = len(ev.x) if rows is None else min(rows, len(ev.x))
    kl = top1 = nll = mass = 0.0
    n = 0
    for i in range(0, rows, batch):
        j = min(i + batch, rows)
        ls = torch.log_softmax((model.hidden(ev.x[i:j]) @ w.T).float(), -1)
        lt = ev.teacher_lp[i:j]
        kl += (lt.exp() * (lt - ls)).sum().item()
        top1 += (ls.argmax(-1) == lt.argmax(-1)).sum().item()
        nll -= ls.gather(-1, ev.y[i:j, :, None]).sum().item()
        mass += ls.gather(-1, ev.teacher_topk[i:j]).exp().sum().item()
        n += ev.y[i:j].numel()
    return {"kl": kl / n, "top1": top1 / n, "ppl": math.exp(nll / n), "mass_at_k": mass / n}


def new_student(sizes: DemoSizes, seed: int, tp: TP | None, device) -> TinyGPT:
    """The same initial weights for every run and TP size: build the full model from
    ``seed``, then keep this rank's rows of the head."""
    torch.manual_seed(seed)
    model = TinyGPT(sizes.student_cfg())
    if tp is not None:
        shard = sizes.vocab_size // tp.size
        model.shard_head(tp.rank * shard, (tp.rank + 1) * shard)
    return model.to(device)


def train_student(spec: RunSpec, sizes: DemoSizes, pool: TopK, ev: EvalSet, loss_fn, seed: int,
                  device, tp: TP | None = None, steps: int | None = None, progress: bool = True,
                  ) -> tuple[TinyGPT, dict]:
    """Distil one student on the stored teacher top-k; returns it and its curves.

    Under TP each rank holds rows ``[vocab_start, vocab_start + V/size)`` of the head,
    computes ``logits_shard = hidden @ W_shard.T`` and passes ``tp_group``; the body is
    replicated and its gradient is summed over ranks by ``CopyToTensorParallel``.
    """
    steps = sizes.student_steps if steps is None else steps
    model = new_student(sizes, seed, tp, device)
    opt, sched = make_optimizer(model, sizes.student_lr, steps)
    # The batch order depends only on the seed: every run sees the same batches.
    gen = torch.Generator().manual_seed(seed + 1)
    order = torch.empty(0, dtype=torch.int64)
    curve = {"step": [], "loss": [], "mass": [], "eval_step": [], "eval_kl": []}
    show = progress and (tp is None or tp.rank == 0)
    bar = progress_bar(range(steps), f"{spec.name:>17}", show)
    t0 = time.time()
    for step in bar:
        if step % sizes.eval_every == 0:
            curve["eval_step"].append(step)
            curve["eval_kl"].append(evaluate(model, ev, sizes.curve_windows, tp)["kl"])
        if len(order) < sizes.student_batch:
            order = torch.cat([order, torch.randperm(len(pool.windows), generator=gen)])
        idx, order = order[:sizes.student_batch], order[sizes.student_batch:]
        win = pool.windows[idx].to(device)
        ids = pool.ids[idx].to(device=device, dtype=torch.int32)   # int16 is only storage
        lps = pool.logprobs[idx].to(device)                         # fp16, used as stored
        hidden = model.hidden(win[:, :-1])
        if tp is not None:
            hidden = CopyToTensorParallel.apply(hidden, tp.group)
        logits = hidden @ model.head_weight.T                       # [B, T, V_r]
        if spec.loss == "ce":
            if tp is not None:
                raise ValueError("the cross-entropy baseline runs without TP")
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), win[:, 1:].reshape(-1))
            with torch.no_grad():
                mass = torch.log_softmax(logits, -1).gather(-1, ids.long()).exp().sum(-1).mean()
        else:
            out = loss_fn(logits, ids, lps, loss=spec.loss, support=spec.support, beta=spec.beta,
                          tp_group=tp.group if tp else None,
                          vocab_start=model.vocab_start if tp else None)
            loss, mass = out.loss, out.student_mass.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        curve["step"].append(step)
        curve["loss"].append(loss.item())
        curve["mass"].append(mass.item())
        bar.set_postfix(loss=f"{curve['loss'][-1]:.4f}", mass=f"{curve['mass'][-1]:.3f}",
                        refresh=False)
    bar.close()
    curve["eval_step"].append(steps)
    curve["eval_kl"].append(evaluate(model, ev, sizes.curve_windows, tp)["kl"])
    curve["train_s"] = time.time() - t0
    return model, curve
