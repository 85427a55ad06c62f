"""Argument checks shared by the pure-PyTorch reference and the kernel-backed API.

SPEC.md section 7: bad input raises ``ValueError`` / ``TypeError`` whose message names the
argument. Both code paths call these functions, so they raise identical errors.

* :func:`validate_options` - the scalar keywords (pure Python; usable from an ``nn.Module``
  constructor).
* :func:`validate_tensors` - shapes, dtypes, devices (metadata only, no host sync).
* :func:`validate_args` - both of the above, returned as one :class:`Args` tuple.
* :func:`check_data` - the ``check_inputs=True`` data checks: ONE host sync for all of them.

The tensor-parallel shard layout (and its cross-rank N / K / vocab_start checks) lives in ONE place,
:func:`topk_distill.parallel.resolve_layout`, used by the kernel API and the reference alike.
"""
from __future__ import annotations

import math
import numbers
from typing import NamedTuple, Optional, Tuple

import torch

LOSSES = ("fkl", "rkl", "jsd", "fkl+rkl", "tvd", "skl", "srkl")
SUPPORTS = ("topk", "renorm", "tail")
REDUCTIONS = ("mean", "sum", "none")

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
ID_DTYPES = (torch.int32, torch.int64)


class Options(NamedTuple):
    """Normalised scalar keywords (floats are Python floats)."""

    loss: str
    support: str
    beta: float
    rkl_ratio: float
    skew: float
    temperature: float
    t2_scale: bool
    log_prob_min_clamp: Optional[float]
    reduction: str
    inplace_backward: bool
    check_inputs: bool


class Shapes(NamedTuple):
    """What the tensors' metadata says."""

    lead_shape: Tuple[int, ...]  # logits.shape[:-1]; per-row outputs have this shape
    n_rows: int                  # prod(lead_shape)
    local_vocab: int             # V_r = logits.shape[-1]
    k: int                       # teacher_ids.shape[-1]


# ----------------------------------------------------------------------------- scalars

def _choice(name, value, choices):
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, one of {choices}; got {type(value).__name__}")
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}; got {value!r}")
    return value


def _flag(name, value):
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool; got {type(value).__name__}")
    return value


def _real(name, value):
    # bool is an int subclass; a 0-d tensor would need a host sync: both rejected.
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number (Python int/float); got {type(value).__name__}")
    return float(value)


def _unit_interval(name, value):
    v = _real(name, value)
    if not (0.0 <= v <= 1.0):  # also rejects NaN
        raise ValueError(f"{name} must be in [0, 1]; got {value!r}")
    return v


def validate_options(*, loss="fkl", support="topk", beta=0.5, rkl_ratio=0.1, skew=0.1,
                     temperature=1.0, t2_scale=False, log_prob_min_clamp=None,
                     reduction="mean", inplace_backward=False, check_inputs=True) -> Options:
    """Check the scalar keywords; return them normalised. Pure Python, no tensors."""
    loss = _choice("loss", loss, LOSSES)
    support = _choice("support", support, SUPPORTS)
    reduction = _choice("reduction", reduction, REDUCTIONS)
    # Checked whatever the loss: a wrong value is never silently ignored or clamped.
    beta = _unit_interval("beta", beta)
    rkl_ratio = _unit_interval("rkl_ratio", rkl_ratio)
    skew = _unit_interval("skew", skew)
    temperature = _real("temperature", temperature)
    if not (math.isfinite(temperature) and temperature > 0.0):
        raise ValueError(f"temperature must be finite and > 0; got {temperature!r}")
    if log_prob_min_clamp is not None:
        log_prob_min_clamp = _real("log_prob_min_clamp", log_prob_min_clamp)
        if not (log_prob_min_clamp <= 0.0):  # also rejects NaN; -inf is allowed (no-op clamp)
            raise ValueError(f"log_prob_min_clamp must be None or a log-prob <= 0 (not NaN); "
                             f"got {log_prob_min_clamp!r}")
    return Options(loss, support, beta, rkl_ratio, skew, temperature,
                   _flag("t2_scale", t2_scale), log_prob_min_clamp, reduction,
                   _flag("inplace_backward", inplace_backward), _flag("check_inputs", check_inputs))


# ----------------------------------------------------------------------------- tensors

def _tensor(name, value):
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(value).__name__}")
    return value


def _dtype(name, t, allowed):
    if t.dtype not in allowed:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in allowed]}; got {t.dtype}")


def validate_tensors(logits, teacher_ids, teacher_logprobs, mask=None, *,
                     tp_group=None, vocab_start=None) -> Shapes:
    """Check shapes, dtypes and devices (metadata only: no host sync)."""
    _tensor("logits", logits)
    _tensor("teacher_ids", teacher_ids)
    _tensor("teacher_logprobs", teacher_logprobs)
    _dtype("logits", logits, FLOAT_DTYPES)
    _dtype("teacher_ids", teacher_ids, ID_DTYPES)
    _dtype("teacher_logprobs", teacher_logprobs, FLOAT_DTYPES)
    if logits.dim() < 1:
        raise ValueError("logits must have shape [..., V]; got a 0-d tensor")
    lead = tuple(logits.shape[:-1])
    if tuple(teacher_ids.shape[:-1]) != lead or teacher_ids.dim() != logits.dim():
        raise ValueError(f"teacher_ids must have shape [..., K] with the leading shape of logits "
                         f"{list(lead)}; got {list(teacher_ids.shape)}")
    if tuple(teacher_logprobs.shape) != tuple(teacher_ids.shape):
        raise ValueError(f"teacher_logprobs must have the shape of teacher_ids "
                         f"{list(teacher_ids.shape)}; got {list(teacher_logprobs.shape)}")
    k, v_r = teacher_ids.shape[-1], logits.shape[-1]
    if k == 0:  # DECISIONS 14
        raise ValueError("teacher_ids must have K >= 1 entries per row; got K = 0")
    if v_r == 0:
        raise ValueError("logits must have a non-empty vocab dimension; got V = 0")
    if mask is not None:
        _tensor("mask", mask)
        _dtype("mask", mask, (torch.bool,))
        if tuple(mask.shape) != lead:
            raise ValueError(f"mask must have the leading shape of logits {list(lead)}; "
                             f"got {list(mask.shape)}")
    for name, t in (("teacher_ids", teacher_ids), ("teacher_logprobs", teacher_logprobs), ("mask", mask)):
        if t is not None and t.device != logits.device:
            raise ValueError(f"{name} is on {t.device} but logits is on {logits.device}; "
                             f"all tensors must be on the same device")
    if vocab_start is not None:
        if isinstance(vocab_start, bool) or not isinstance(vocab_start, numbers.Integral):
            raise TypeError(f"vocab_start must be None or an int; got {type(vocab_start).__name__}")
        if vocab_start < 0:
            raise ValueError(f"vocab_start must be >= 0; got {vocab_start}")
        if tp_group is None and vocab_start != 0:
            raise ValueError(f"vocab_start={vocab_start} needs a tp_group (without one the logits "
                             f"hold the whole vocab and vocab_start must be None or 0)")
    n = 1
    for d in lead:
        n *= d
    return Shapes(lead, n, v_r, k)


class Args(NamedTuple):
    """Everything :func:`validate_args` normalises: the :class:`Options` fields, then the
    :class:`Shapes` fields (``args.temperature``, ``args.n_rows``, ...)."""

    loss: str
    support: str
    beta: float
    rkl_ratio: float
    skew: float
    temperature: float
    t2_scale: bool
    log_prob_min_clamp: Optional[float]
    reduction: str
    inplace_backward: bool
    check_inputs: bool
    lead_shape: Tuple[int, ...]
    n_rows: int
    local_vocab: int
    k: int

    @property
    def options(self) -> Options:
        return Options(*self[:len(Options._fields)])


def validate_args(logits, teacher_ids, teacher_logprobs, *, loss="fkl", support="topk",
                  beta=0.5, rkl_ratio=0.1, skew=0.1, temperature=1.0, t2_scale=False,
                  log_prob_min_clamp=None, mask=None, reduction="mean", tp_group=None,
                  vocab_start=None, inplace_backward=False, check_inputs=True) -> Args:
    """All host-side checks of a ``topk_distill_loss`` call (no host sync, no collective)."""
    opts = validate_options(loss=loss, support=support, beta=beta, rkl_ratio=rkl_ratio, skew=skew,
                            temperature=temperature, t2_scale=t2_scale,
                            log_prob_min_clamp=log_prob_min_clamp, reduction=reduction,
                            inplace_backward=inplace_backward, check_inputs=check_inputs)
    shapes = validate_tensors(logits, teacher_ids, teacher_logprobs, mask,
                              tp_group=tp_group, vocab_start=vocab_start)
    return Args(*opts, *shapes)


# ----------------------------------------------------------------------------- data

def data_flags(teacher_ids, teacher_logprobs, mask=None):
    """The ``check_inputs`` data facts as a device tensor, no host sync: ``[largest id that
    counts (-1 if none), any NaN log-prob, any log-prob > 0]`` (int64). Padding entries (id < 0)
    and masked rows are ignored everywhere else, so their contents may be anything."""
    counted = teacher_ids >= 0
    if mask is not None:
        counted = counted & mask.unsqueeze(-1)
    lp = teacher_logprobs
    largest = torch.where(counted, teacher_ids.long(), -1)
    largest = largest.max() if largest.numel() else torch.tensor(-1, device=teacher_ids.device)
    return torch.stack([largest.reshape(()),
                        (counted & torch.isnan(lp)).any().long(),
                        (counted & (lp > 0)).any().long()])


def raise_data_errors(largest_id, nan_lp, pos_lp, vocab_size, where="") -> None:
    """The ValueError of a failed data check (``where``: e.g. " on rank 1 of tp_group")."""
    if largest_id >= vocab_size:
        raise ValueError(f"teacher_ids has an id >= the vocab size V={vocab_size}{where} "
                         f"(ids must be in [0, V), negative = padding)")
    if nan_lp:
        raise ValueError(f"teacher_logprobs has a NaN entry{where} (log-probs must be <= 0; "
                         f"-inf allowed)")
    if pos_lp:
        raise ValueError(f"teacher_logprobs has an entry > 0{where} (log-probs must be <= 0; "
                         f"-inf allowed)")


def check_data(teacher_ids, teacher_logprobs, vocab_size, mask=None) -> None:
    """``check_inputs=True`` data checks, with exactly one host sync.

    Only entries that count are checked: padding entries (id < 0) and masked rows are ignored
    everywhere else, so their contents may be anything.
      * an id >= ``vocab_size`` (the full vocab V, all shards)  -> ValueError naming teacher_ids
      * a NaN or > 0 teacher log-prob (-inf is fine)             -> ValueError naming teacher_logprobs
    Under tensor parallelism the same facts travel in the layout all_gather instead
    (``parallel.resolve_layout(..., data=...)``), so that every rank raises, not just the one
    whose copy of the teacher tensors is bad.
    """
    largest_id, nan_lp, pos_lp = data_flags(teacher_ids, teacher_logprobs, mask).tolist()
    raise_data_errors(largest_id, nan_lp, pos_lp, vocab_size)
