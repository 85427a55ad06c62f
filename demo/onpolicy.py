"""On-policy distillation (``python -m demo --on-policy``): the loop verl, TRL and NeMo-RL run.

Every step the student samples continuations of prompts taken from the held-in text (temperature
1, autoregressive, batched), the teacher scores the sequences as a vLLM server does for
``prompt_logprobs=K`` (at every position its top-K log-probs *and* the log-prob of the token that
is actually there, i.e. the one the student sampled), and the student trains on the generated
positions. The estimators compared (SPEC 3 and 10.2):

* ``topk`` / ``tail``: the K teacher entries (``tail`` adds the rest of the vocabulary as one bin);
* ``sampled``: the K entries plus the sampled token, importance-weighted - unbiased for the
  full-vocabulary divergence;
* ``full``: the reference - the same divergence over the whole vocabulary from the teacher's
  exact distribution (what a server cannot send; plain PyTorch here).

The estimators read only what the server returns (``ids[..., :K]``, ``logprobs[..., :K]`` and the
sampled token's log-prob); only ``full`` reads the teacher's whole distribution.

Every run starts from the same warm-started student (cross-entropy on the held-in text, cached:
on-policy distillation starts from a student that already writes plausible text; a random one
would sample noise), sees the same prompts, and uses the same sampling seed. The fixed-batch
gradient study compares each estimator's gradient (w.r.t. all student parameters) with the
full-vocabulary gradient on one batch of the warm-started student's own samples; for ``sampled``
the sampled token at every position is redrawn from the student ``draws`` times.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .model import TinyGPT
from .pipeline import DemoSizes, _atomic, _key, make_optimizer, progress_bar


@dataclass(frozen=True)
class OnPolicySizes:
    prompt_len: int       # tokens of held-in text the student continues (to the model's context)
    warm_steps: int       # cross-entropy steps of the warm start (cached)
    steps: int            # on-policy steps per run
    batch: int            # sequences sampled per step
    lr: float
    eval_every: int       # held-out curve (on curve_windows of held-out text)
    eval_prompts: int     # held-out prompts whose continuations the final table scores
    grad_batch: int       # sequences of the fixed batch of the gradient study
    draws: int            # redraws of the sampled token per position, gradient study


ONPOLICY_FULL = OnPolicySizes(prompt_len=16, warm_steps=300, steps=50, batch=16, lr=1e-3,
                              eval_every=20, eval_prompts=32, grad_batch=16, draws=32)
ONPOLICY_TINY = OnPolicySizes(prompt_len=8, warm_steps=60, steps=12, batch=8, lr=1e-3,
                              eval_every=6, eval_prompts=8, grad_batch=4, draws=8)

LOSSES = ["fkl", "rkl", "jsd"]
SUPPORTS = ["topk", "tail", "sampled", "full"]
KS = [1, 4, 32]


@dataclass(frozen=True)
class OnPolicyRun:
    loss: str
    support: str          # topk, tail, sampled, or full (the full-vocabulary reference)
    k: int | None         # None for full
    beta: float = 0.5

    @property
    def name(self) -> str:
        return f"{self.loss}/full" if self.support == "full" else f"{self.loss}/{self.support}/K{self.k}"


def make_runs(losses, supports, ks, beta) -> list[OnPolicyRun]:
    runs = []
    for lo in losses:
        for su in supports:
            if su == "full":
                runs.append(OnPolicyRun(lo, su, None, beta))
            else:
                runs += [OnPolicyRun(lo, su, k, beta) for k in ks]
    return runs


# ----------------------------------------------------------------------------- the rollout

@torch.no_grad()
def sample_continuations(model: TinyGPT, prompts: torch.Tensor, length: int,
                         gen: torch.Generator) -> torch.Tensor:
    """[B, P] prompts -> [B, length] sequences, each new token drawn from the model's softmax at
    temperature 1 given everything before it (batched, with a key/value cache)."""
    caches = [{} for _ in model.blocks]
    tokens, step_input = [prompts], prompts
    for _ in range(length - prompts.shape[1]):
        probs = torch.softmax(model.next_logits(step_input, caches).float(), -1)
        step_input = torch.multinomial(probs.cpu(), 1, generator=gen).to(prompts.device)
        tokens.append(step_input)
    return torch.cat(tokens, 1)


@dataclass
class Scored:
    """What the teacher returns for a batch of sequences (one position per next token)."""

    ids: torch.Tensor          # [B, S-1, Kmax] int32, best first (top-K = the first K columns)
    logprobs: torch.Tensor     # [B, S-1, Kmax] fp32
    sampled_lp: torch.Tensor   # [B, S-1] fp32: log p(token actually at the next position)
    full_lp: torch.Tensor      # [B, S-1, V] fp32: only the full-vocabulary reference reads it


@torch.no_grad()
def teacher_scores(teacher: TinyGPT, seq: torch.Tensor, k_max: int) -> Scored:
    """vLLM ``prompt_logprobs=K`` on the sequence: log_softmax over the full vocabulary at every
    position, its top K, and the log-prob of the token that follows (the sampled one)."""
    lp = torch.log_softmax(teacher(seq[:, :-1]).float(), -1)
    top = lp.topk(k_max, -1)
    return Scored(top.indices.to(torch.int32), top.values,
                  lp.gather(-1, seq[:, 1:, None]).squeeze(-1), lp)


# ----------------------------------------------------------------------------- the losses

def full_vocab_divergence(logits: torch.Tensor, teacher_lp: torch.Tensor, loss: str,
                          beta: float) -> torch.Tensor:
    """Per row, over the whole vocabulary from the teacher's exact distribution (SPEC 10.2's D);
    fp32, or fp64 for fp64 logits."""
    s = torch.log_softmax(logits if logits.dtype == torch.float64 else logits.float(), -1)
    if loss == "fkl" or (loss == "jsd" and beta == 0.0):
        return (teacher_lp.exp() * (teacher_lp - s)).sum(-1)
    if loss == "rkl" or (loss == "jsd" and beta == 1.0):
        return (s.exp() * (s - teacher_lp)).sum(-1)
    if loss == "jsd":
        log_m = torch.logaddexp(teacher_lp + math.log(beta), s + math.log1p(-beta))
        return (beta * (teacher_lp.exp() * (teacher_lp - log_m)).sum(-1)
                + (1 - beta) * (s.exp() * (s - log_m)).sum(-1))
    raise ValueError(f"loss {loss!r}: the on-policy demo compares fkl, rkl and jsd")


def estimator_loss(loss_fn, run: OnPolicyRun, logits: torch.Tensor, sc: Scored,
                   labels: torch.Tensor, mask: torch.Tensor,
                   sampled_lp: torch.Tensor | None = None, reduction: str = "mean") -> torch.Tensor:
    """The mean over the generated positions (``mask``) of ``run``'s per-position loss
    (``reduction="none"``: the per-position losses, 0 outside ``mask``). ``labels`` [B, S-1] are
    the sampled tokens; ``sampled_lp`` their teacher log-probs (default: ``sc.sampled_lp``, the
    ones the server returned for the actual sequence)."""
    if run.support == "full":
        rows = full_vocab_divergence(logits, sc.full_lp, run.loss, run.beta) * mask
        return rows if reduction == "none" else rows.sum() / mask.sum().clamp_min(1)
    extra = {}
    if run.support == "sampled":
        extra = dict(labels=labels, label_teacher_logprobs=sc.sampled_lp if sampled_lp is None
                     else sampled_lp)
    return loss_fn(logits, sc.ids[..., :run.k], sc.logprobs[..., :run.k], loss=run.loss,
                   support=run.support, beta=run.beta, mask=mask, reduction=reduction,
                   **extra).loss


# ----------------------------------------------------------------------------- warm start

def warm_student(sizes: DemoSizes, osz: OnPolicySizes, train_tokens: np.ndarray, data_key: str,
                 seed: int, device, cache: str, progress=True, log=print) -> tuple[dict, dict]:
    """The student every on-policy run starts from: ``warm_steps`` of cross-entropy on the
    held-in text from the demo's initial student weights (cached)."""
    cfg = sizes.student_cfg()
    key = _key("student-warm-v1", data_key, cfg.to_dict(), osz.warm_steps, sizes.student_batch,
               sizes.student_lr, seed)
    path = os.path.join(cache, f"student-warm-{key}.pt")
    if os.path.exists(path):
        saved = torch.load(path, map_location="cpu", weights_only=True)
        meta = json.loads(saved["meta"])
        log(f"warm start: cached {path} ({meta['steps']} cross-entropy steps)")
        return saved["state"], meta
    torch.manual_seed(seed)
    model = TinyGPT(cfg).to(device)
    opt, sched = make_optimizer(model, sizes.student_lr, osz.warm_steps)
    gen = torch.Generator().manual_seed(seed + 3)
    train = torch.from_numpy(train_tokens.astype(np.int64))
    span = sizes.context + 1
    t0 = time.time()
    bar = progress_bar(range(osz.warm_steps), "warm start (ce)", progress)
    for step in bar:
        starts = torch.randint(0, len(train) - span, (sizes.student_batch,), generator=gen)
        x = torch.stack([train[s:s + span] for s in starts.tolist()]).to(device)
        logits = model(x[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, cfg.vocab_size).float(), x[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    bar.close()
    meta = {"steps": osz.warm_steps, "train_s": time.time() - t0, "final_loss": loss.item()}
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    _atomic(path, lambda p: torch.save({"state": state, "meta": json.dumps(meta)}, p))
    log(f"warm start: {osz.warm_steps} cross-entropy steps in {meta['train_s']:.0f}s -> {path}")
    return state, meta


def student_from(sizes: DemoSizes, state: dict, device) -> TinyGPT:
    model = TinyGPT(sizes.student_cfg())
    model.load_state_dict(state)
    return model.to(device)


# ----------------------------------------------------------------------------- evaluation

@dataclass
class OnPolicyEval:
    x: torch.Tensor            # [E, T] held-out text
    teacher_lp: torch.Tensor   # [E, T, V]
    prompts: torch.Tensor      # [Pn, P] held-out prompts for the student's own continuations


@torch.no_grad()
def both_kls(model: TinyGPT, x: torch.Tensor, teacher_lp: torch.Tensor,
             mask: torch.Tensor | None = None, batch: int = 16) -> tuple[float, float]:
    """Mean over positions of KL(teacher || model) and KL(model || teacher), full vocabulary."""
    fkl = rkl = n = 0.0
    for i in range(0, len(x), batch):
        s = torch.log_softmax(model(x[i:i + batch]).float(), -1)
        t = teacher_lp[i:i + batch]
        m = torch.ones(s.shape[:2], dtype=torch.bool) if mask is None else mask[i:i + batch]
        fkl += ((t.exp() * (t - s)).sum(-1) * m).sum().item()
        rkl += ((s.exp() * (s - t)).sum(-1) * m).sum().item()
        n += m.sum().item()
    return fkl / n, rkl / n


@torch.no_grad()
def evaluate_onpolicy(model: TinyGPT, teacher: TinyGPT, ev: OnPolicyEval, sizes: DemoSizes,
                      seed: int, text_rows: int | None = None) -> dict:
    """Held-out text (teacher-forced) and the model's own continuations of held-out prompts
    (a fixed sampling seed), scored over the full vocabulary against the teacher."""
    rows = len(ev.x) if text_rows is None else min(text_rows, len(ev.x))
    fkl, rkl = both_kls(model, ev.x[:rows], ev.teacher_lp[:rows])
    out = {"fkl_text": fkl, "rkl_text": rkl}
    if text_rows is None:
        gen = torch.Generator().manual_seed(seed + 7)
        seq = sample_continuations(model, ev.prompts, sizes.context, gen)
        t_lp = torch.log_softmax(teacher(seq[:, :-1]).float(), -1)
        mask = generated_mask(seq.shape, ev.prompts.shape[1], seq.device)
        out["fkl_own"], out["rkl_own"] = both_kls(model, seq[:, :-1], t_lp, mask)
    return out


def generated_mask(shape, prompt_len: int, device) -> torch.Tensor:
    """[B, S-1]: True at the positions that predict a sampled token (not a prompt token)."""
    pos = torch.arange(shape[1] - 1, device=device)
    return (pos >= prompt_len - 1).expand(shape[0], -1).contiguous()


# ----------------------------------------------------------------------------- training

def _prompts(train: torch.Tensor, n: int, length: int, gen: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(train) - length, (n,), generator=gen)
    return torch.stack([train[s:s + length] for s in starts.tolist()])


def train_on_policy(run: OnPolicyRun, sizes: DemoSizes, osz: OnPolicySizes, warm: dict,
                    teacher: TinyGPT, train_tokens: np.ndarray, ev: OnPolicyEval, loss_fn,
                    k_max: int, seed: int, device, progress=True) -> tuple[TinyGPT, dict]:
    model = student_from(sizes, warm, device)
    opt, sched = make_optimizer(model, osz.lr, osz.steps)
    prompt_gen = torch.Generator().manual_seed(seed + 4)    # the same prompts in every run
    sample_gen = torch.Generator().manual_seed(seed + 5)    # and the same sampling stream
    train = torch.from_numpy(train_tokens.astype(np.int64))
    curve = {"step": [], "loss": [], "eval_step": [], "eval_fkl": [], "eval_rkl": []}
    bar = progress_bar(range(osz.steps), f"{run.name:>16}", progress)
    t_sample = t_train = 0.0
    for step in bar:
        if step % osz.eval_every == 0:
            e = evaluate_onpolicy(model, teacher, ev, sizes, seed, sizes.curve_windows)
            curve["eval_step"].append(step)
            curve["eval_fkl"].append(e["fkl_text"])
            curve["eval_rkl"].append(e["rkl_text"])
        t0 = time.time()
        prompts = _prompts(train, osz.batch, osz.prompt_len, prompt_gen).to(device)
        seq = sample_continuations(model, prompts, sizes.context, sample_gen)
        sc = teacher_scores(teacher, seq, k_max)
        t1 = time.time()
        mask = generated_mask(seq.shape, osz.prompt_len, device)
        logits = model(seq[:, :-1])
        loss = estimator_loss(loss_fn, run, logits, sc, seq[:, 1:], mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        t_sample += t1 - t0
        t_train += time.time() - t1
        curve["step"].append(step)
        curve["loss"].append(loss.item())
        bar.set_postfix(loss=f"{curve['loss'][-1]:.4f}", refresh=False)
    bar.close()
    e = evaluate_onpolicy(model, teacher, ev, sizes, seed, sizes.curve_windows)
    curve["eval_step"].append(osz.steps)
    curve["eval_fkl"].append(e["fkl_text"])
    curve["eval_rkl"].append(e["rkl_text"])
    curve["rollout_s"], curve["train_s"] = t_sample, t_train
    return model, curve


# ----------------------------------------------------------------------------- gradient study

def _flat_grad(loss: torch.Tensor, params) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params, retain_graph=True)])


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.double(), b.double(), dim=0).item()


def gradient_study(runs: list[OnPolicyRun], sizes: DemoSizes, osz: OnPolicySizes, warm: dict,
                   teacher: TinyGPT, train_tokens: np.ndarray, loss_fn, k_max: int, seed: int,
                   device) -> dict:
    """On one fixed batch of the warm-started student's own samples: the cosine between each
    estimator's gradient (all student parameters) and the full-vocabulary gradient of the same
    divergence. ``topk`` / ``tail`` are deterministic given the batch; for ``sampled`` the token
    at every generated position is redrawn from the student ``draws`` times (its teacher log-prob
    read from the teacher, as the server would return it): mean and standard deviation of the
    per-draw cosine, and the cosine of the gradient averaged over the draws."""
    model = student_from(sizes, warm, device)
    params = [p for p in model.parameters()]
    gen = torch.Generator().manual_seed(seed + 6)
    train = torch.from_numpy(train_tokens.astype(np.int64))
    prompts = _prompts(train, osz.grad_batch, osz.prompt_len, gen).to(device)
    seq = sample_continuations(model, prompts, sizes.context, gen)
    sc = teacher_scores(teacher, seq, k_max)
    mask = generated_mask(seq.shape, osz.prompt_len, device)
    logits = model(seq[:, :-1])
    with torch.no_grad():
        q = torch.softmax(logits.float(), -1)
    draws = [seq[:, 1:]] + [torch.multinomial(q.reshape(-1, q.shape[-1]).cpu(), 1, generator=gen)
                            .view(q.shape[:2]).to(device) for _ in range(osz.draws - 1)]
    draw_lp = [sc.full_lp.gather(-1, y[..., None]).squeeze(-1) for y in draws]
    full = {}
    out = {}
    t0 = time.time()
    for run in runs:
        if run.loss not in full:
            ref = OnPolicyRun(run.loss, "full", None, run.beta)
            full[run.loss] = _flat_grad(estimator_loss(loss_fn, ref, logits, sc, seq[:, 1:], mask),
                                        params)
        g_full = full[run.loss]
        if run.support == "full":
            out[run.name] = {"cos_mean": 1.0, "cos_std": 0.0, "cos_of_mean": 1.0, "draws": 1}
        elif run.support == "sampled":
            gs = [_flat_grad(estimator_loss(loss_fn, run, logits, sc, y, mask, lp), params)
                  for y, lp in zip(draws, draw_lp)]
            cos = torch.tensor([_cos(g, g_full) for g in gs])
            out[run.name] = {"cos_mean": cos.mean().item(), "cos_std": cos.std().item(),
                             "cos_of_mean": _cos(torch.stack(gs).mean(0), g_full),
                             "draws": len(gs)}
        else:
            c = _cos(_flat_grad(estimator_loss(loss_fn, run, logits, sc, seq[:, 1:], mask), params),
                     g_full)
            out[run.name] = {"cos_mean": c, "cos_std": 0.0, "cos_of_mean": c, "draws": 1}
    return {"runs": out, "positions": int(mask.sum()), "draws": osz.draws,
            "seconds": time.time() - t0}


def run_onpolicy(runs, sizes: DemoSizes, osz: OnPolicySizes, data, teacher, ev_text, loss_fn,
                 seed: int, device, cache: str, progress=True, log=print) -> dict:
    """Warm start, gradient study, then every run; returns rows and curves for the report."""
    t_start = time.time()
    k_max = max([r.k for r in runs if r.k is not None], default=1)
    warm, warm_meta = warm_student(sizes, osz, data.train, data.key, seed, device, cache,
                                   progress, log)
    ev = OnPolicyEval(ev_text.x, ev_text.teacher_lp, ev_text.x[:osz.eval_prompts, :osz.prompt_len])
    teacher_row = {"model": "teacher", **evaluate_onpolicy(teacher, teacher, ev, sizes, seed)}
    warm_row = {"model": "warm start (before on-policy)",
                **evaluate_onpolicy(student_from(sizes, warm, device), teacher, ev, sizes, seed)}
    log(f"warm start: KL(t||s) {warm_row['fkl_text']:.4f}  KL(s||t) {warm_row['rkl_text']:.4f} "
        f"on held-out text")
    t = time.time()
    grads = gradient_study(runs, sizes, osz, warm, teacher, data.train, loss_fn, k_max, seed,
                           device)
    log(f"gradient study: {grads['positions']} positions, {grads['draws']} draws of the sampled "
        f"token ({time.time() - t:.1f}s)")
    rows, curves = [], {}
    for run in runs:
        model, curve = train_on_policy(run, sizes, osz, warm, teacher, data.train, ev, loss_fn,
                                       k_max, seed, device, progress)
        metrics = evaluate_onpolicy(model, teacher, ev, sizes, seed)
        g = grads["runs"][run.name]
        rows.append({"model": run.name, **asdict(run), **metrics, **g,
                     "rollout_s": curve["rollout_s"], "train_s": curve["train_s"]})
        curves[run.name] = curve
        log(f"{run.name:>16}: KL(t||s) {metrics['fkl_text']:.4f} / own {metrics['fkl_own']:.4f}  "
            f"KL(s||t) {metrics['rkl_text']:.4f} / own {metrics['rkl_own']:.4f}  "
            f"grad cos {g['cos_mean']:.3f}±{g['cos_std']:.3f}  "
            f"({curve['rollout_s'] + curve['train_s']:.1f}s)")
    return {"rows": rows, "baselines": [teacher_row, warm_row], "curves": curves,
            "gradient": grads, "warm": warm_meta, "sizes": asdict(osz),
            "total_s": time.time() - t_start}
