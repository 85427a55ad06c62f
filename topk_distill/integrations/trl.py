"""TRL drop-in: TRL 1.16.0's two served-teacher distillation trainers on topk-distill's kernels.

TRL 1.16.0 ships two trainers that distil from a teacher served as top-k log-probs, both under
``trl.experimental``:

* ``server_distillation.ServerDistillationTrainer`` - its ``compute_loss`` runs
  ``F.log_softmax(student_logits / temperature)`` over the whole ``[B, T, V]`` logits, then a
  forward KL over the teacher's top-k (``beta == 0``) or a generalised JSD over the teacher's
  top-1 plus the actual token (``beta > 0``), with a tail bucket or renormalisation;
* ``async_distillation.AsyncDistillationTrainer`` - its ``_compute_loss`` projects the valid
  positions through the LM head in fp32, 256 positions at a time under
  ``torch.utils.checkpoint`` (``_chunked_jsd_loss``), and logs the student's entropy, the
  teacher's entropy on its support and per-teacher statistics.

:func:`patch_trl` swaps in :func:`server_compute_loss` (the same steps as TRL's, with
:func:`topk_distill.topk_distill_loss` on the logits instead of the log-softmax, gather and
divergence) and :func:`chunked_jsd_loss` (TRL's signature and return values, computed by
:func:`topk_distill.fused_linear_topk_distill_loss`: one call, no ``[n, V]`` fp32 logits, no
recomputation in the backward):

    from topk_distill.integrations.trl import patch_trl
    patch_trl()          # before trainer.train(); or: with patch_trl(): ...

Everything else stays TRL's own: configuration, generation, teacher requests, the reduction
(``batchmean`` over completion tokens on the server path; the sum over positions divided by the
tokens per rank on the async path), gradient-accumulation scaling and the logged metrics.
Supports map one to one: TRL's tail bucket is ``support="tail"``, its renormalisation
``support="renorm"``; ``beta`` is the JSD's (0: forward KL, 1: reverse KL, as TRL). Where TRL's
numbers differ from the exact ones (its tail's ``log_sum`` clamp at ``-1e-7``, its
``nan_to_num``) see docs/TRL.md.

Why a patch and not subclasses: the async trainer reaches its loss through the module-level
``_chunked_jsd_loss`` from inside a 200-line ``_compute_loss`` (packing, teacher-support
narrowing, DDP/GA scaling, metrics); a subclass could only replace it by copying that method.
Swapping the two entry points keeps every other line TRL's, and a user adds one line.

TRL is imported only inside :func:`patch_trl` (importing topk_distill never imports trl).
"""
from __future__ import annotations

import importlib
from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor

from ..fused_linear import fused_linear_topk_distill_loss
from ..losses import topk_distill_loss

__all__ = ["patch_trl", "unpatch_trl", "TrlPatch", "server_compute_loss",
           "server_distillation_loss", "chunked_jsd_loss", "teacher_support_entropy"]

_SERVER_MODULE = "trl.experimental.server_distillation.server_distillation_trainer"
_ASYNC_MODULE = "trl.experimental.async_distillation.async_distillation_trainer"


def _support(add_tail: bool) -> str:
    return "tail" if add_tail else "renorm"


# ----------------------------------------------------------------------------- shared pieces

def teacher_support_entropy(teacher_logprobs: Tensor, valid: Tensor, add_tail: bool) -> Tensor:
    """Per row, the entropy of the teacher's distribution over the loss's support (TRL's
    ``teacher_entropy`` metric): the valid entries renormalised (``add_tail=False``), or the
    entries plus the tail bucket ``1 - P`` (``add_tail=True``; exact: the tail is floored at 0,
    where TRL clamps it at ``1 - exp(-1e-7)``). fp32, no gradient."""
    with torch.no_grad():
        l = torch.where(valid, teacher_logprobs.float(), float("-inf"))
        p = l.exp()
        plogp = torch.where(p > 0, p * l, 0.0).sum(-1)
        if add_tail:
            tail = (1.0 - p.sum(-1)).clamp_min(0.0)
            tail_term = torch.where(tail > 0, tail * tail.clamp_min(1e-45).log(), 0.0)
            return -(plogp + tail_term)
        log_mass = torch.logsumexp(l, -1)
        mass = log_mass.exp()
        # sum_k (p_k / P) log(p_k / P) = sum_k p_k l_k / P - log P (0 for a row with no entry).
        ent = -(plogp / mass - log_mass)
        return torch.where(torch.isfinite(log_mass), ent, 0.0)


# ----------------------------------------------------------------------------- server trainer

def server_distillation_loss(trainer, teacher_result: Dict[str, Tensor], student_logits: Tensor,
                             completion_tokens: Tensor, labels: Tensor) -> Tensor:
    """The loss of ``ServerDistillationTrainer`` (its ``_compute_server_forward_kl_loss`` for
    ``beta == 0``, ``_compute_server_sparse_top_1_divergence_loss`` for ``beta > 0``) from the
    student's raw ``logits`` ``[B, T, V]`` (a view is fine: not copied) instead of their
    log-softmax: ``batchmean`` over the positions with ``labels != -100``.

    ``beta == 0``: forward KL over the teacher's top-k entries whose log-prob is finite.
    ``beta > 0``: generalised JSD over the teacher's top-1 and the actual token (the student's
    argmax with ``reverse_kl_top_1_mode="argmax"``), whose teacher log-prob is the server's
    ``actual_logprobs``; a duplicate counts once; ``beta == 1``: the actual token alone. Missing
    teacher log-probs at counted positions raise TRL's own ``ValueError``."""
    beta = float(trainer.beta)
    required = labels != -100
    topk_lp = teacher_result["topk_logprobs"]
    topk_ids = teacher_result["topk_token_ids"]
    if beta > 0:
        actual_lp = teacher_result["actual_logprobs"]
        missing = required & ~torch.isfinite(actual_lp)
        if missing.any():
            raise ValueError("Teacher server is missing actual-token logprobs for required "
                             f"reverse-KL positions: {int(missing.sum())}/{int(required.sum())}.")
        if beta < 1:
            missing = required & ~torch.isfinite(topk_lp[..., 0])
            if missing.any():
                raise ValueError("Teacher server is missing top-1 logprobs for required "
                                 f"forward-KL positions: {int(missing.sum())}/"
                                 f"{int(required.sum())}.")
        if trainer.reverse_kl_top_1_mode == "argmax":
            reverse_ids = student_logits.detach().argmax(-1)
        else:
            reverse_ids = completion_tokens
        if beta == 1:
            ids, lps = reverse_ids.unsqueeze(-1), actual_lp.unsqueeze(-1)
        else:
            top1 = topk_ids[..., 0]
            ids = torch.stack([top1, torch.where(reverse_ids == top1, -1, reverse_ids)], -1)
            lps = torch.stack([topk_lp[..., 0], actual_lp], -1)
    else:
        valid = topk_lp > float("-inf")
        ids, lps = torch.where(valid, topk_ids, -1), topk_lp
    # Positions that do not count carry -inf / fill values: out of the loss (mask), and made
    # valid input (padding ids, log-prob 0) so that the data checks see none of them.
    keep = required.unsqueeze(-1)
    ids = torch.where(keep, ids, -1)
    lps = torch.where(keep & (ids >= 0), lps, 0.0)
    out = topk_distill_loss(student_logits, ids, lps, loss="jsd", beta=beta,
                            support=_support(trainer.loss_add_tail),
                            temperature=float(trainer.temperature), mask=required,
                            reduction="mean")
    return out.loss


def server_compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
    """``ServerDistillationTrainer.compute_loss`` with :func:`server_distillation_loss` in place
    of the ``[B, T, V]`` log-softmax and TRL's sparse losses; every other step is TRL's (the
    batch layout, the student forward, the teacher request, the gradient-accumulation
    scaling)."""
    prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
    completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    completion_labels = torch.where(completion_mask.bool(), completion_ids,
                                    torch.full_like(completion_ids, -100))
    labels = torch.cat([torch.full_like(prompt_ids, -100), completion_labels], dim=1)
    inputs = {**inputs, "input_ids": input_ids, "attention_mask": attention_mask,
              "labels": labels, "prompt_attention_mask": prompt_mask}

    student_outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    prompt_length = self._compute_prompt_length(inputs)
    labels = inputs["labels"][:, prompt_length:]
    completion_tokens = inputs["input_ids"][:, prompt_length:]
    teacher_result = self._get_teacher_token_logprobs_from_server(inputs, prompt_length)

    comp_len = teacher_result["actual_logprobs"].shape[1]
    # A view of the logits (no copy); the temperature is applied inside the kernels.
    student_logits = student_outputs.logits[:, prompt_length - 1:-1, :][:, :comp_len, :]
    loss = server_distillation_loss(self, teacher_result, student_logits,
                                    completion_tokens[:, :comp_len], labels[:, :comp_len])
    if self.model.training:
        loss = loss / self.current_gradient_accumulation_steps
    return (loss, student_outputs) if return_outputs else loss


# ----------------------------------------------------------------------------- async trainer

def chunked_jsd_loss(hidden_valid: Tensor, lm_head_weight: Tensor, lm_head_bias: Optional[Tensor],
                     logit_scale: float, final_logit_softcapping: Optional[float],
                     target_ids: Tensor, teacher_target_logps: Tensor,
                     valid_candidate_mask: Tensor, beta: float, temperature: float,
                     add_tail_bucket: bool, teacher_id_idx: Optional[Tensor], num_teachers: int,
                     chunk_size: int) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """TRL's ``_chunked_jsd_loss`` (same arguments, same five results) on
    :func:`topk_distill.fused_linear_topk_distill_loss`: ``(loss, jsd_sum, entropy_sum,
    teacher_entropy_sum, per_teacher_stats)``, the first differentiable (the sum over positions
    of the per-position divergence), the others sums without gradient; ``per_teacher_stats`` is
    ``[count, jsd_sum, teacher_entropy_sum]`` per teacher (zeros without ``teacher_id_idx``).

    As TRL, the head runs in fp32 (``hidden.float()``, ``weight.float()``), applies
    ``logit_scale``, then the softcap, then ``1 / temperature``. ``chunk_size`` (TRL's 256) is
    not used: the fused loss picks its own chunk (docs/FUSED_LINEAR.md) and needs no
    recomputation. With several teachers, each teacher's rows go through one fused call (the
    per-teacher divergence sums are then exact per-row sums)."""
    del chunk_size
    hidden = hidden_valid.float()
    weight = lm_head_weight.float()
    bias = None if lm_head_bias is None else lm_head_bias.float()
    valid = valid_candidate_mask.bool()
    ids = torch.where(valid, target_ids, -1)
    lps = torch.where(valid, teacher_target_logps.float(), 0.0)
    kw = dict(loss="jsd", beta=float(beta), support=_support(add_tail_bucket),
              temperature=float(temperature), reduction="sum", return_entropy=True,
              logit_scale=float(logit_scale), final_logit_softcapping=final_logit_softcapping)
    t_ent = teacher_support_entropy(lps, valid, add_tail_bucket)

    def run(rows: Optional[Tensor]):
        if rows is None:
            out = fused_linear_topk_distill_loss(hidden, weight, ids, lps, bias=bias, **kw)
        else:
            out = fused_linear_topk_distill_loss(hidden[rows], weight, ids[rows], lps[rows],
                                                 bias=bias, **kw)
        return out.loss, out.entropy.detach().sum()

    stats = hidden.new_zeros(3 * num_teachers)
    if teacher_id_idx is None:
        loss, entropy_sum = run(None)
    else:
        loss = hidden.new_zeros(())
        entropy_sum = hidden.new_zeros(())
        per_teacher = []
        groups = [(i, teacher_id_idx == i) for i in range(num_teachers)]
        other = ~torch.zeros_like(teacher_id_idx, dtype=torch.bool)
        for _, sel in groups:
            other &= ~sel
        for i, sel in groups + [(None, other)]:
            rows = sel.nonzero().squeeze(-1)
            if rows.numel() == 0:
                group_loss, group_ent = hidden.new_zeros(()), hidden.new_zeros(())
            else:
                group_loss, group_ent = run(rows)
            loss = loss + group_loss
            entropy_sum = entropy_sum + group_ent
            if i is not None:
                per_teacher += [sel.sum().float(), group_loss.detach(), t_ent[sel].sum()]
        stats = torch.stack(per_teacher) if per_teacher else stats
    return loss, loss.detach(), entropy_sum, t_ent.sum(), stats


# ----------------------------------------------------------------------------- patch

class TrlPatch:
    """What :func:`patch_trl` changed; a context manager whose exit undoes it."""

    def __init__(self):
        self.originals: Dict[Tuple[str, str, str], Any] = {}  # (module, owner, name) -> TRL's
        self.skipped: Dict[str, str] = {}                     # module -> why not patched

    @property
    def active(self) -> bool:
        return _PATCH is self

    def __enter__(self) -> "TrlPatch":
        return self

    def __exit__(self, *exc) -> None:
        if self.active:
            unpatch_trl()

    def __repr__(self) -> str:
        names = sorted(".".join(k[1:]).lstrip(".") for k in self.originals)
        return f"TrlPatch(active={self.active}, patched={names}, skipped={self.skipped})"


_PATCH: Optional[TrlPatch] = None


def patch_trl() -> TrlPatch:
    """Run TRL's served-teacher distillation trainers on topk-distill's kernels:

    * ``ServerDistillationTrainer.compute_loss`` becomes :func:`server_compute_loss`;
    * ``async_distillation_trainer._chunked_jsd_loss`` (a module global, looked up at each
      ``_compute_loss``) becomes :func:`chunked_jsd_loss`.

    Call it once, before training, in every process that computes the loss (under
    ``accelerate launch`` each process runs the training script, so one line at the top of the
    script does it). Trainers already built are patched too (the method is the class's, the
    function the module's). A module that does not import (the async trainer needs TRL's own
    optional dependencies) is skipped and listed in ``.skipped``; if neither imports, the
    ``ImportError`` is raised. Idempotent; ``with patch_trl(): ...`` or :func:`unpatch_trl`
    undoes it."""
    global _PATCH
    if _PATCH is not None:
        return _PATCH
    patch = TrlPatch()
    errors = {}
    try:
        server = importlib.import_module(_SERVER_MODULE)
        cls = server.ServerDistillationTrainer
        patch.originals[(_SERVER_MODULE, "ServerDistillationTrainer", "compute_loss")] = \
            cls.__dict__["compute_loss"]
        cls.compute_loss = server_compute_loss
    except ImportError as e:
        patch.skipped[_SERVER_MODULE] = f"{type(e).__name__}: {e}"
        errors[_SERVER_MODULE] = e
    try:
        mod = importlib.import_module(_ASYNC_MODULE)
        patch.originals[(_ASYNC_MODULE, "", "_chunked_jsd_loss")] = mod._chunked_jsd_loss
        mod._chunked_jsd_loss = chunked_jsd_loss
    except ImportError as e:
        patch.skipped[_ASYNC_MODULE] = f"{type(e).__name__}: {e}"
        errors[_ASYNC_MODULE] = e
    if not patch.originals:
        raise next(iter(errors.values()))
    _PATCH = patch
    return patch


def unpatch_trl() -> bool:
    """Undo :func:`patch_trl`. Returns False when TRL was not patched."""
    global _PATCH
    patch = _PATCH
    if patch is None:
        return False
    for (module_name, owner, name), original in patch.originals.items():
        target = importlib.import_module(module_name)
        if owner:
            target = getattr(target, owner)
        setattr(target, name, original)
    _PATCH = None
    return True
