"""verl drop-in: verl 0.9.1's two ``compute_forward_kl_topk`` on topk-distill's kernels.

verl computes its top-k distillation loss in a "logits processor" that dispatches on the training
strategy (``verl/trainer/distillation/losses.py::compute_topk_loss``): FSDP / FSDP2 / VeOmni call
``verl.trainer.distillation.fsdp.losses.compute_forward_kl_topk``, Megatron calls
``verl.trainer.distillation.megatron.losses.compute_forward_kl_topk``. Both take
``(student_logits, teacher_topk_log_probs, teacher_topk_ids, config, data_format)`` and return a
dict of per-token ``distillation_losses``, ``student_mass``, ``teacher_mass``, ``overlap_count``
and ``overlap_token_advantage``, each of shape ``student_logits.shape[:2]``. This module has the
same two functions, built on :func:`topk_distill.topk_distill_loss` (two passes over the logits,
no ``[N, V]`` fp32 buffers, exact gradients), and :func:`patch_verl`, which swaps them into an
installed verl:

    from topk_distill.integrations.verl import patch_verl
    patch_verl()                         # every verl process; or, for a whole verl run:
    # export VERL_USE_EXTERNAL_MODULES=topk_distill.integrations.verl_autopatch

* :func:`fsdp_compute_forward_kl_topk` - the FSDP path: ``student_logits`` ``[1, nnz / sp, V]``
  (verl's remove-padding layout), teacher tensors jagged nested ``[B, j, K]`` (or already packed
  ``[1, nnz, K]``); with Ulysses sequence parallelism the packed teacher tensors are sliced with
  verl's own ``slice_input_tensor``, exactly as verl does.
* :func:`megatron_compute_forward_kl_topk` - the Megatron path: ``student_logits`` this rank's
  vocab shard ``[b, s, V / tp]``, teacher tensors jagged nested and laid out like the logits by
  verl's own ``preprocess_thd_engine`` / ``preprocess_bshd_engine`` (context parallelism
  included); the tensor-parallel group and vocab range come from
  ``megatron.core.parallel_state`` (:func:`~topk_distill.integrations.megatron.megatron_tp_layout`).

Where verl's two paths disagree, each function follows its own path (docs/VERL.md):
``log_prob_min_clamp`` set, the FSDP path reports both masses before the clamp, the Megatron path
after it (``sum_k exp(max(l_k, c))`` and ``sum_k exp(max(s_k, c))``). Loss, gradient and the
overlap diagnostics are the same definitions on both paths. Not reproduced: verl's loss wrapper
applies ``clamp_min(0)`` to the per-token loss afterwards (outside these functions, unchanged by
the patch); all float outputs are fp32 (verl's FSDP ``student_mass`` has the logits' dtype).

verl is imported only inside the functions here (importing topk_distill never imports verl).
"""
from __future__ import annotations

import importlib
import math
import sys
from typing import Dict, Mapping, Optional

import torch
from torch import Tensor

from .. import _layout
from ..losses import topk_distill_loss
from .megatron import megatron_tp_layout

__all__ = ["fsdp_compute_forward_kl_topk", "megatron_compute_forward_kl_topk", "patch_verl",
           "unpatch_verl", "sampled_token_losses", "VERL_LOSS_MODES", "VERL_SAMPLED_MODES",
           "VerlPatch"]

# The loss modes patch_verl registers with verl (verl's `register_distillation_loss`), as keywords
# of topk_distill_loss. Their names follow verl's "forward_kl_topk"; their losses follow
# verl-recipe's GKD losses (recipe/gkd/megatron/megatron_distill_losses.py): RKL of the
# renormalised top-k, JSD_beta of the top-k teacher against the full student, and its kl_rkl
# mixture 0.9 * forward KL (top-k) + 0.1 * reverse KL (renormalised), one pass (SPEC 9.3 terms).
VERL_LOSS_MODES: Dict[str, dict] = {
    "reverse_kl_topk": dict(loss="rkl", support="renorm"),
    "jsd_topk": dict(loss="jsd", support="topk", beta=0.5),
    "kl_rkl_topk": dict(loss=[("fkl", "topk", 0.9), ("rkl", "renorm", 0.1)]),
}
_FORWARD_KL = dict(loss="fkl", support="topk")  # verl's forward_kl_topk (and every other mode)

# SPEC 10.2's support="sampled" as far as verl 0.9.1's data allow it (docs/VERL.md, "The sampled
# token"): verl's teacher returns the sampled token's log-prob only for its single-sample
# "estimator" loss modes (prompt_logprobs=0, no top-k); its top-k modes drop it. These modes are
# registered as estimator modes (use_estimator=True) and compute the sampled estimator with an
# empty top-k: per token w * f(p_y, q_y), w = 1 / mu_y held constant - unbiased, value and
# gradient, for the full-vocabulary divergence (:func:`sampled_token_losses`).
VERL_SAMPLED_MODES: Dict[str, dict] = {
    "forward_kl_sampled": dict(loss="fkl"),
    "reverse_kl_sampled": dict(loss="rkl"),
    "jsd_sampled": dict(loss="jsd", beta=0.5),
}

# loss_mode -> topk_distill_loss keywords (top-k modes) / sampled_token_losses keywords
# (estimator modes), while patch_verl is in effect.
_ACTIVE_MODES: Dict[str, dict] = {}
_ACTIVE_SAMPLED_MODES: Dict[str, dict] = {}

_STRATEGY_MODULES = ("verl.trainer.distillation.fsdp.losses",
                     "verl.trainer.distillation.megatron.losses")
_VERL_LOSSES = "verl.trainer.distillation.losses"


# ----------------------------------------------------------------------------- helpers

def _packed_teacher(lp: Tensor, ids: Tensor):
    """verl's jagged ``[B, j, K]`` teacher tensors as packed ``[1, total, K]`` views - the one place
    this module unpacks nested tensors. verl's packed ("remove padding") logits hold the sequences
    one after another, which is exactly the nested tensor's ``values()``; the library's own checks
    (:func:`topk_distill._layout._check_jagged_kind`) refuse what ``values()`` would misread."""
    for name, t in (("teacher_topk_log_probs", lp), ("teacher_topk_ids", ids)):
        _layout._check_jagged_kind(name, t)
    return lp.values().unsqueeze(0), ids.values().unsqueeze(0)


def _loss_config(config):
    """verl's ``DistillationLossConfig`` from a ``DistillationConfig`` (or the loss config)."""
    return getattr(config, "distillation_loss", config)


def _loss_kwargs(config) -> dict:
    """topk_distill_loss keywords for verl's config: the loss of its ``loss_mode`` (forward KL
    over the top-k unless patch_verl registered the mode) and its ``log_prob_min_clamp``."""
    loss_config = _loss_config(config)
    kwargs = dict(_ACTIVE_MODES.get(getattr(loss_config, "loss_mode", None), _FORWARD_KL))
    clamp = getattr(loss_config, "log_prob_min_clamp", None)
    kwargs["log_prob_min_clamp"] = None if clamp is None else float(clamp)
    return kwargs


def _teacher_pair(teacher_topk_log_probs: Tensor, teacher_topk_ids: Tensor):
    if teacher_topk_log_probs.is_nested != teacher_topk_ids.is_nested:
        raise ValueError("teacher_topk_log_probs and teacher_topk_ids: both nested or both dense; "
                         f"got is_nested {teacher_topk_log_probs.is_nested} and "
                         f"{teacher_topk_ids.is_nested}")
    return teacher_topk_log_probs, teacher_topk_ids


def _check_layout(student_logits: Tensor, lp: Tensor, ids: Tensor, where: str) -> None:
    if student_logits.dim() != 3:
        raise ValueError(f"student_logits: expected [batch, seq, vocab] (verl's layout), got shape "
                         f"{tuple(student_logits.shape)}")
    if lp.shape != ids.shape or lp.dim() != 3 or lp.shape[:2] != student_logits.shape[:2]:
        raise ValueError(f"teacher_topk_log_probs / teacher_topk_ids {where} must be "
                         f"[{student_logits.shape[0]}, {student_logits.shape[1]}, K] like "
                         f"student_logits {tuple(student_logits.shape)}; got "
                         f"{tuple(lp.shape)} and {tuple(ids.shape)}")


def _call(student_logits: Tensor, ids: Tensor, lp: Tensor, kwargs: dict, **layout):
    """Per-token loss, masses and overlap diagnostics of the student's top-K (K = the teacher's,
    as verl: ``torch.topk(..., k=teacher_topk_ids.shape[-1])``)."""
    return topk_distill_loss(student_logits, ids, lp, reduction="none",
                             student_topk=ids.shape[-1], **layout, **kwargs)


def _result(out, student_mass: Tensor, teacher_mass: Tensor) -> Dict[str, Tensor]:
    return {
        "distillation_losses": out.loss,
        "student_mass": student_mass,
        "teacher_mass": teacher_mass,
        "overlap_count": out.overlap_count,
        "overlap_token_advantage": out.overlap_token_advantage,
    }


def _ulysses_slice():
    """verl's ``slice_input_tensor`` when Ulysses sequence parallelism is on, else None."""
    ulysses = sys.modules.get("verl.utils.ulysses")
    if ulysses is None:  # never imported: no Ulysses group can have been set
        return None
    if ulysses.get_ulysses_sequence_parallel_world_size() > 1:
        return ulysses.slice_input_tensor
    return None


# ----------------------------------------------------------------------------- FSDP

def fsdp_compute_forward_kl_topk(student_logits: Tensor, teacher_topk_log_probs: Tensor,
                                 teacher_topk_ids: Tensor, config, data_format: str
                                 ) -> Dict[str, Tensor]:
    """verl's ``verl.trainer.distillation.fsdp.losses.compute_forward_kl_topk`` on the kernels.

    Args:
        student_logits: ``[1, nnz / sp, V]`` (verl's packed logits, this Ulysses rank's slice;
            any ``[B, T, V]`` whose rows match the teacher's works), fp32 / bf16 / fp16.
        teacher_topk_log_probs, teacher_topk_ids: ``[B, j, K]`` jagged nested tensors (verl),
            or the packed ``[1, nnz, K]``; the whole sequence - with Ulysses SP each rank takes
            its slice as verl does (``slice_input_tensor``, zero-padded to a multiple of sp).
        config: verl's ``DistillationConfig`` (``distillation_loss.loss_mode`` /
            ``log_prob_min_clamp`` are read; ``use_chunked_topk`` is irrelevant: nothing of size
            ``[N, V]`` is materialised either way).
        data_format: unused (as in verl's FSDP path).

    Returns:
        verl's dict, each ``[1, nnz / sp]``: ``distillation_losses`` (differentiable),
        ``student_mass`` and ``teacher_mass`` before the clamp (as verl's FSDP path),
        ``overlap_count`` (int64) and ``overlap_token_advantage``.
    """
    del data_format
    lp, ids = _teacher_pair(teacher_topk_log_probs, teacher_topk_ids)
    if lp.is_nested:
        lp, ids = _packed_teacher(lp, ids)
    sp_slice = _ulysses_slice()
    if sp_slice is not None:
        lp, ids = sp_slice(lp, dim=1), sp_slice(ids, dim=1)
    _check_layout(student_logits, lp, ids, "(packed, after the Ulysses slice)")
    out = _call(student_logits, ids, lp, _loss_kwargs(config))
    return _result(out, out.student_mass, out.teacher_mass)


# ----------------------------------------------------------------------------- Megatron

def _clamped_teacher_mass(lp: Tensor, ids: Tensor, clamp: float) -> Tensor:
    """verl's Megatron ``teacher_mass``: ``sum_k exp(max(l_k, c))`` over the valid entries."""
    p = lp.clamp_min(clamp).float().exp()
    return torch.where(ids >= 0, p, torch.zeros_like(p)).sum(-1)


def _clamped_student_mass(logits: Tensor, ids: Tensor, student_mass: Tensor, clamp: float,
                          tp_group, vocab_start: Optional[int]) -> Tensor:
    """verl's Megatron ``student_mass``: ``sum_k exp(max(s_k, c))``, from the kernel's
    unclamped ``Q = sum_k exp(s_k)`` and the teacher-id logits ``z_k`` (a gather of ``[N, K]``,
    plus one all-reduce of it under TP): ``s_k = z_k - LSE`` with
    ``LSE = logsumexp_k(z_k) - log Q`` (exact: the same valid entries on both sides; an fp32 Q
    keeps ~7 digits down to 1e-38, below which every s_k < -87 is clamped for any c > -87).
    """
    v_local = logits.shape[-1]
    start = 0 if vocab_start is None else int(vocab_start)
    local = ids.long() - start
    in_shard = (ids >= 0) & (local >= 0) & (local < v_local)
    with torch.no_grad():
        z = torch.gather(logits.detach(), -1, local.clamp(0, v_local - 1)).float()
        z = torch.where(in_shard, z, torch.zeros_like(z))
        if tp_group is not None:
            torch.distributed.all_reduce(z, group=tp_group)  # each id lives on one rank
        valid = ids >= 0
        neg_inf = torch.full_like(z, -float("inf"))
        lse = (torch.logsumexp(torch.where(valid, z, neg_inf), -1, keepdim=True)
               - student_mass.unsqueeze(-1).float().log())
        q = (z - lse).clamp_min(clamp).exp()
        return torch.where(valid, q, torch.zeros_like(q)).sum(-1)


def megatron_compute_forward_kl_topk(student_logits: Tensor, teacher_topk_log_probs: Tensor,
                                     teacher_topk_ids: Tensor, config, data_format: str
                                     ) -> Dict[str, Tensor]:
    """verl's ``verl.trainer.distillation.megatron.losses.compute_forward_kl_topk`` on the
    kernels.

    Args:
        student_logits: this TP rank's vocab shard ``[b, s / cp, V / tp]`` (``[1, nnz_padded /
            cp, V / tp]`` for ``"thd"``), fp32 / bf16 / fp16.
        teacher_topk_log_probs, teacher_topk_ids: ``[B, j, K]`` jagged nested tensors (verl),
            laid out like the logits with verl's ``preprocess_thd_engine`` (``data_format ==
            "thd"``) or ``preprocess_bshd_engine`` (otherwise) - padding and context-parallel
            split included; or dense tensors already in the logits' layout ``[b, s / cp, K]``.
            Global vocab ids; replicated on the TP ranks.
        config: verl's ``DistillationConfig`` (``loss_mode``, ``log_prob_min_clamp``).
        data_format: ``"thd"`` or ``"bshd"``.

    Returns:
        verl's dict, each ``student_logits.shape[:2]``, identical on the TP ranks: the masses
        *after* ``log_prob_min_clamp`` as verl's Megatron path reports them (before it when the
        clamp is None), the rest as in :func:`fsdp_compute_forward_kl_topk`.
    """
    lp, ids = _teacher_pair(teacher_topk_log_probs, teacher_topk_ids)
    if lp.is_nested:
        from verl.models.mcore.util import preprocess_bshd_engine, preprocess_thd_engine

        preprocess = preprocess_thd_engine if data_format == "thd" else preprocess_bshd_engine
        lp = preprocess(lp, pre_process=True)[0]
        ids = preprocess(ids, pre_process=True)[0]
    _check_layout(student_logits, lp, ids, f"(after verl's {data_format} preprocessing)")
    tp_group, vocab_start = megatron_tp_layout(student_logits.shape[-1])
    kwargs = _loss_kwargs(config)
    out = _call(student_logits, ids, lp, kwargs, tp_group=tp_group, vocab_start=vocab_start)
    clamp = kwargs["log_prob_min_clamp"]
    if clamp is None:
        return _result(out, out.student_mass, out.teacher_mass)
    student_mass = _clamped_student_mass(student_logits, ids, out.student_mass, clamp, tp_group,
                                         vocab_start)
    return _result(out, student_mass, _clamped_teacher_mass(lp, ids, clamp))


# ----------------------------------------------------------------------------- sampled token

def sampled_token_losses(student_log_probs: Tensor, teacher_log_probs: Tensor, *, loss: str = "rkl",
                         beta: float = 0.5, log_prob_min_clamp: Optional[float] = None,
                         sample_log_probs: Optional[Tensor] = None,
                         sample_weight_clip: Optional[float] = None) -> Tensor:
    """SPEC 10.2's ``support="sampled"`` with no teacher top-k entries, per token:
    ``w * f(p_y, q_y)`` from the log-probs of the sampled token y alone.

    ``student_log_probs`` = ``log q_y`` (differentiable; verl's ``model_output["log_probs"]``),
    ``teacher_log_probs`` = ``log p_y`` (verl's ``teacher_logprobs`` of an estimator mode),
    ``sample_log_probs`` = ``log mu_y``, the distribution y was drawn from (default: ``log q_y``
    detached). ``w = 1 / mu_y`` is a constant (with ``sample_weight_clip = c``:
    ``min(1 / mu_y, c / q_y)``); ``log_prob_min_clamp`` applies to ``log q_y`` and ``log p_y`` in
    ``f``. ``f`` is the loss's per-token term of SPEC 10.2: fkl ``p (log p - log q)``, rkl
    ``q (log q - log p)``, jsd ``beta p log(p/m) + (1-beta) q log(q/m)``, ``m = beta p + (1-beta) q``.
    For y ~ mu the mean over draws of the value and of its gradient are the full-vocabulary
    divergence and its gradient (the ``topk_distill_loss(..., support="sampled")`` estimator with
    every teacher entry padding; tests/test_verl.py checks the two agree). Returns fp32 (fp64 for
    fp64 input) of the inputs' shape.
    """
    if loss not in ("fkl", "rkl", "jsd"):
        raise ValueError(f"loss: 'fkl', 'rkl' or 'jsd', not {loss!r}")
    if loss == "jsd" and not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if student_log_probs.shape != teacher_log_probs.shape:
        raise ValueError(f"student_log_probs {tuple(student_log_probs.shape)} and teacher_log_probs "
                         f"{tuple(teacher_log_probs.shape)}: the same shape expected")
    if sample_weight_clip is not None and not sample_weight_clip > 0:
        raise ValueError(f"sample_weight_clip must be > 0, got {sample_weight_clip}")
    dtype = torch.float64 if student_log_probs.dtype == torch.float64 else torch.float32
    s, l = student_log_probs.to(dtype), teacher_log_probs.to(dtype)
    mu = s.detach() if sample_log_probs is None else sample_log_probs.to(dtype).detach()
    w = torch.exp(-mu)
    if sample_weight_clip is not None:
        w = torch.minimum(w, sample_weight_clip * torch.exp(-s.detach()))
    if log_prob_min_clamp is not None:
        s, l = s.clamp_min(log_prob_min_clamp), l.clamp_min(log_prob_min_clamp)
    if loss == "jsd" and beta == 0.0:
        loss = "fkl"
    if loss == "jsd" and beta == 1.0:
        loss = "rkl"
    if loss == "fkl":
        f = l.exp() * (l - s)
    elif loss == "rkl":
        f = s.exp() * (s - l)
    else:
        log_m = torch.logaddexp(l + math.log(beta), s + math.log1p(-beta))
        f = beta * l.exp() * (l - log_m) + (1 - beta) * s.exp() * (s - log_m)
    return w * f


def _padded(t: Tensor, data) -> Tensor:
    from verl.workers.utils.padding import no_padding_2_padding

    return no_padding_2_padding(t, data)


def _sampled_estimator_loss(config, distillation_config, model_output, data):
    """verl's estimator-mode loss function (the signature of ``compute_distillation_loss_reverse_
    kl_estimator``) for the :data:`VERL_SAMPLED_MODES`: per-token ``[bsz, resp_len]`` losses of
    :func:`sampled_token_losses` and verl's ``distillation/abs_loss`` metric. ``mu`` is the
    policy that sampled the response, ``data["old_log_probs"]`` when verl provides it (the
    rollout's log-probs, recomputed by the actor), else the student's current log-probs."""
    from verl.utils.metric import AggregationType, Metric

    loss_config = _loss_config(distillation_config)
    kwargs = _ACTIVE_SAMPLED_MODES[loss_config.loss_mode]
    student = _padded(model_output["log_probs"], data)
    teacher = _padded(data["teacher_logprobs"], data).squeeze(-1)
    old = data.get("old_log_probs", None)
    if old is not None and old.is_nested:
        old = old.to_padded_tensor(0.0)
    if old is not None and old.shape != student.shape:
        old = None
    mask = data["response_mask"]
    mask = (mask.to_padded_tensor(False) if mask.is_nested else mask).bool()
    if not teacher.shape == student.shape == mask.shape:
        raise ValueError(f"{loss_config.loss_mode}: teacher_logprobs {tuple(teacher.shape)}, student "
                         f"log_probs {tuple(student.shape)} and response_mask {tuple(mask.shape)} "
                         f"differ (an estimator mode's teacher returns one log-prob per token)")
    clamp = getattr(loss_config, "log_prob_min_clamp", None)
    losses = sampled_token_losses(student, teacher, sample_log_probs=old,
                                  log_prob_min_clamp=None if clamp is None else float(clamp),
                                  **kwargs)
    return losses, {"distillation/abs_loss": Metric(AggregationType.MEAN, losses[mask].abs().mean())}


# ----------------------------------------------------------------------------- patching verl

class VerlPatch:
    """What :func:`patch_verl` changed; a context manager whose exit undoes it."""

    def __init__(self):
        self.originals: Dict[str, object] = {}   # strategy module -> verl's function
        self.skipped: Dict[str, str] = {}        # strategy module -> why it was not patched
        self.registered: Dict[str, object] = {}  # loss mode -> the function registered for it

    @property
    def active(self) -> bool:
        return _PATCH is self

    def __enter__(self) -> "VerlPatch":
        return self

    def __exit__(self, *exc) -> None:
        if self.active:
            unpatch_verl()

    def __repr__(self) -> str:
        return (f"VerlPatch(active={self.active}, patched={sorted(self.originals)}, "
                f"skipped={self.skipped}, loss_modes={sorted(self.registered)})")


_PATCH: Optional[VerlPatch] = None
_DROP_INS = {_STRATEGY_MODULES[0]: fsdp_compute_forward_kl_topk,
             _STRATEGY_MODULES[1]: megatron_compute_forward_kl_topk}


def patch_verl(modes: Optional[Mapping[str, dict]] = None,
               sampled_modes: Optional[Mapping[str, dict]] = None) -> VerlPatch:
    """Swap the drop-ins into the installed verl and register extra top-k loss modes.

    * ``verl.trainer.distillation.{fsdp,megatron}.losses.compute_forward_kl_topk`` become
      :func:`fsdp_compute_forward_kl_topk` / :func:`megatron_compute_forward_kl_topk` (verl's
      dispatcher looks them up at every call). A strategy module that does not import (the
      Megatron one without megatron-core) is skipped and listed in ``.skipped``.
    * Each loss mode of ``modes`` (default :data:`VERL_LOSS_MODES`: ``reverse_kl_topk``,
      ``jsd_topk``, ``kl_rkl_topk``; ``{name: topk_distill_loss keywords}``) is registered the
      way verl registers its own, ``register_distillation_loss(DistillationLossSettings(names=
      [name], use_topk=True))``, with verl's ``forward_kl_topk`` loss function (its metrics and
      ``clamp_min(0)``); with ``distillation_loss.loss_mode=<name>`` the drop-ins then compute
      that divergence. A name verl already has is a ``ValueError``.
    * Each loss mode of ``sampled_modes`` (default :data:`VERL_SAMPLED_MODES`:
      ``forward_kl_sampled``, ``reverse_kl_sampled``, ``jsd_sampled``; ``{name:
      sampled_token_losses keywords}``) is registered as an estimator mode
      (``use_estimator=True``: verl's teacher then returns the sampled token's log-prob) with
      :func:`_sampled_estimator_loss`.

    Idempotent (a second call returns the active patch; new ``modes`` are an error). Call it in
    every process that runs verl's loss - with Ray, e.g. through verl's plugin hook
    ``VERL_USE_EXTERNAL_MODULES=topk_distill.integrations.verl_autopatch``. Returns a
    :class:`VerlPatch`; ``with patch_verl(): ...`` undoes it on exit (:func:`unpatch_verl`).
    """
    global _PATCH
    modes = dict(VERL_LOSS_MODES if modes is None else modes)
    sampled_modes = dict(VERL_SAMPLED_MODES if sampled_modes is None else sampled_modes)
    if _PATCH is not None:
        if (modes != {n: _ACTIVE_MODES[n] for n in _PATCH.registered if n in _ACTIVE_MODES}
                or sampled_modes != {n: _ACTIVE_SAMPLED_MODES[n] for n in _PATCH.registered
                                     if n in _ACTIVE_SAMPLED_MODES}):
            raise ValueError("patch_verl: verl is already patched with other loss modes "
                             f"({sorted(_PATCH.registered)}); call unpatch_verl() first")
        return _PATCH
    from verl.trainer.distillation import losses as verl_losses

    final_loss_fn = verl_losses.get_distillation_loss_fn("forward_kl_topk")
    both = sorted(set(modes) & set(sampled_modes))
    if both:
        raise ValueError(f"patch_verl: {both} in both modes and sampled_modes")
    taken = sorted((set(modes) | set(sampled_modes)) & set(verl_losses.DISTILLATION_LOSS_REGISTRY))
    if taken:
        raise ValueError(f"patch_verl: verl already registers the loss mode(s) {taken}; pass "
                         f"modes= with other names")
    for name, kwargs in modes.items():
        if not isinstance(kwargs, Mapping) or {"reduction", "tp_group", "vocab_start",
                                               "student_topk", "log_prob_min_clamp"} & set(kwargs):
            raise ValueError(f"patch_verl: modes[{name!r}] must be a dict of topk_distill_loss "
                             f"loss keywords (loss, support, beta, ...; the clamp comes from "
                             f"verl's config); got {kwargs!r}")
    sampled_keywords = {"loss", "beta", "sample_weight_clip"}
    for name, kwargs in sampled_modes.items():
        if not isinstance(kwargs, Mapping) or set(kwargs) - sampled_keywords:
            raise ValueError(f"patch_verl: sampled_modes[{name!r}] must be a dict of "
                             f"sampled_token_losses keywords {sorted(sampled_keywords)}; got "
                             f"{kwargs!r}")
        sampled_token_losses(torch.zeros(1), torch.zeros(1), **kwargs)   # bad values raise here

    patch = VerlPatch()
    for module_name in _STRATEGY_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            patch.skipped[module_name] = f"{type(err).__name__}: {err}"
            continue
        patch.originals[module_name] = module.compute_forward_kl_topk
        module.compute_forward_kl_topk = _DROP_INS[module_name]
    if not patch.originals:
        raise ImportError(f"patch_verl: no verl distillation module imports: {patch.skipped}")
    for name, kwargs in modes.items():
        settings = verl_losses.DistillationLossSettings(names=[name], use_topk=True)
        verl_losses.register_distillation_loss(settings)(final_loss_fn)
        patch.registered[name] = final_loss_fn
        _ACTIVE_MODES[name] = dict(kwargs)
    for name, kwargs in sampled_modes.items():
        settings = verl_losses.DistillationLossSettings(names=[name], use_estimator=True)
        verl_losses.register_distillation_loss(settings)(_sampled_estimator_loss)
        patch.registered[name] = _sampled_estimator_loss
        _ACTIVE_SAMPLED_MODES[name] = dict(kwargs)
    _PATCH = patch
    return patch


def unpatch_verl() -> bool:
    """Undo :func:`patch_verl`: verl's own functions back, the loss modes unregistered.
    Returns False when verl was not patched."""
    global _PATCH
    patch = _PATCH
    if patch is None:
        return False
    for module_name, original in patch.originals.items():
        importlib.import_module(module_name).compute_forward_kl_topk = original
    verl_losses = importlib.import_module(_VERL_LOSSES)
    for name, fn in patch.registered.items():
        if verl_losses.DISTILLATION_LOSS_REGISTRY.get(name) is fn:
            del verl_losses.DISTILLATION_LOSS_REGISTRY[name]
            verl_losses.DISTILLATION_SETTINGS_REGISTRY.pop(name, None)
        _ACTIVE_MODES.pop(name, None)
        _ACTIVE_SAMPLED_MODES.pop(name, None)
    _PATCH = None
    return True
