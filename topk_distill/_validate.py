"""Argument checks shared by the pure-PyTorch reference and the kernel-backed API.

SPEC.md section 7: bad input raises ``ValueError`` / ``TypeError`` whose message names the
argument. Both code paths call these functions, so they raise identical errors.

* :func:`validate_options` - the scalar keywords (pure Python; usable from an ``nn.Module``
  constructor).
* :func:`validate_tensors` - shapes, dtypes, devices (metadata only, no host sync).
* :func:`validate_args` - both of the above, returned as one :class:`Args` tuple.
* :func:`check_data` - the ``check_inputs=True`` data checks: ONE host sync for all of them.
* :func:`validate_k` / :func:`check_k_fits` - the ``k`` of the student's own top-k (SPEC 9.4).

``support`` / ``beta`` / ``rkl_ratio`` / ``skew`` default to the sentinel :data:`UNSET`, so that
passing any of them beside a term list can be told from not passing it (SPEC 9.3); with a single
loss name UNSET resolves to the documented defaults ``"topk"``, 0.5, 0.1, 0.1. Plain values are
accepted as before.

The tensor-parallel shard layout (and its cross-rank N / K / vocab_start checks) lives in ONE place,
:func:`topk_distill.parallel.resolve_layout`, used by the kernel API and the reference alike.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import NamedTuple, Optional, Tuple, Union

import torch

from ._types import Term

LOSSES = ("fkl", "rkl", "jsd", "fkl+rkl", "tvd", "skl", "srkl")
SUPPORTS = ("topk", "renorm", "tail", "sampled", "generalized")
REDUCTIONS = ("mean", "sum", "none")
MISSING_TEACHER = ("error", "drop", "floor")


class _Unset:
    """Type of :data:`UNSET`: "this keyword was not passed"."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "UNSET"

    def __reduce__(self):  # pickles (e.g. to a spawned process) as the same singleton
        return "UNSET"


#: Default of ``support`` / ``beta`` / ``rkl_ratio`` / ``skew``: not passed (see the module doc).
UNSET = _Unset()

#: What UNSET means beside a single loss name (SPEC 8).
DEFAULTS = {"support": "topk", "beta": 0.5, "rkl_ratio": 0.1, "skew": 0.1}

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
ID_DTYPES = (torch.int32, torch.int64)


class Options(NamedTuple):
    """Normalised scalar keywords (floats are Python floats).

    ``terms`` is the loss as a tuple of :class:`Term` (weights and parameters normalised to
    floats): one term of weight 1.0 for a single loss name. ``loss`` / ``support`` / ``beta`` /
    ``rkl_ratio`` / ``skew`` are the single name's values (the old fields, unchanged); for a term
    list ``loss`` is the same tuple as ``terms`` and the other four are ``None``.
    """

    loss: Union[str, Tuple[Term, ...]]
    support: Optional[str]
    beta: Optional[float]
    rkl_ratio: Optional[float]
    skew: Optional[float]
    temperature: float
    t2_scale: bool
    log_prob_min_clamp: Optional[float]
    reduction: str
    inplace_backward: bool
    check_inputs: bool
    terms: Tuple[Term, ...] = ()
    return_entropy: bool = False
    student_topk: Optional[int] = None
    missing_teacher: str = "error"
    sample_weight_clip: Optional[float] = None


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


def _term(i, item) -> Term:
    """One entry of a term list, normalised (argument names ``loss[i]``, ``loss[i].weight``...)."""
    where = f"loss[{i}]"
    if not isinstance(item, (tuple, list)):
        hint = (' (a single term is written loss=[("fkl", "topk", 0.9)] or '
                'td.Term("fkl", "topk", 0.9))' if isinstance(item, str) else "")
        raise TypeError(f"{where} must be a td.Term or a tuple (loss, support, weight); got "
                        f"{type(item).__name__}{hint}")
    if not 1 <= len(item) <= len(Term._fields):
        raise ValueError(f"{where} must be a td.Term or a tuple (loss, support, weight) with 1 to "
                         f"{len(Term._fields)} entries {Term._fields}; got {len(item)} entries")
    t = Term(*item)
    weight = _real(f"{where}.weight", t.weight)
    if not math.isfinite(weight):
        raise ValueError(f"{where}.weight must be a finite real number; got {t.weight!r}")
    return Term(_choice(f"{where}.loss", t.loss, LOSSES),
                _choice(f"{where}.support", t.support, SUPPORTS),
                weight,
                _unit_interval(f"{where}.beta", t.beta),
                _unit_interval(f"{where}.rkl_ratio", t.rkl_ratio),
                _unit_interval(f"{where}.skew", t.skew))


def _terms(loss, support, beta, rkl_ratio, skew):
    """``loss`` (a name or a term list) and the four per-loss keywords -> (loss, support, beta,
    rkl_ratio, skew, terms), see :class:`Options`."""
    given = {name: value for name, value in (("support", support), ("beta", beta),
                                              ("rkl_ratio", rkl_ratio), ("skew", skew))
             if value is not UNSET}
    if not isinstance(loss, Sequence):  # not a str, not a list: neither form
        raise TypeError(f"loss must be a str, one of {LOSSES}, or a sequence of td.Term / "
                        f"(loss, support, weight) tuples; got {type(loss).__name__}")
    if isinstance(loss, str):
        loss = _choice("loss", loss, LOSSES)
        kw = {**DEFAULTS, **given}
        support = _choice("support", kw["support"], SUPPORTS)
        # Checked whatever the loss: a wrong value is never silently ignored or clamped.
        beta = _unit_interval("beta", kw["beta"])
        rkl_ratio = _unit_interval("rkl_ratio", kw["rkl_ratio"])
        skew = _unit_interval("skew", kw["skew"])
        term = Term(loss, support, 1.0, beta, rkl_ratio, skew)
        return loss, support, beta, rkl_ratio, skew, (term,)
    if isinstance(loss, Term):  # one Term on its own: a one-term list
        loss = [loss]
    if len(loss) == 0:
        raise ValueError("loss must be a loss name or a non-empty sequence of td.Term / "
                         "(loss, support, weight) tuples; got an empty sequence")
    if given:
        raise ValueError(f"{', '.join(given)} cannot be passed beside a term list (loss=[...]): "
                         f"each td.Term carries its own support, beta, rkl_ratio and skew")
    terms = tuple(_term(i, item) for i, item in enumerate(loss))
    return terms, None, None, None, None, terms


def validate_k(name, k) -> int:
    """The ``k`` of the student's own top-k: an int >= 1 (``k <= V`` is :func:`check_k_fits`)."""
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise TypeError(f"{name} must be an int >= 1; got {type(k).__name__}")
    if k < 1:
        raise ValueError(f"{name} must be an int >= 1; got {k}")
    return int(k)


def check_k_fits(name, k, vocab_size) -> None:
    """``k <= V``, once the full vocab size V (all shards) is known."""
    if k > vocab_size:
        raise ValueError(f"{name} must be <= the vocab size V={vocab_size} (all shards); got {k}")


def validate_temperature(temperature) -> float:
    """``temperature``: a finite real number > 0."""
    temperature = _real("temperature", temperature)
    if not (math.isfinite(temperature) and temperature > 0.0):
        raise ValueError(f"temperature must be finite and > 0; got {temperature!r}")
    return temperature


def validate_options(*, loss="fkl", support=UNSET, beta=UNSET, rkl_ratio=UNSET, skew=UNSET,
                     temperature=1.0, t2_scale=False, log_prob_min_clamp=None,
                     reduction="mean", inplace_backward=False, check_inputs=True,
                     return_entropy=False, student_topk=None, missing_teacher="error",
                     sample_weight_clip=None) -> Options:
    """Check the scalar keywords; return them normalised. Pure Python, no tensors.

    ``loss`` is a loss name or a non-empty sequence of :class:`Term` / tuples (SPEC 9.3);
    ``support`` / ``beta`` / ``rkl_ratio`` / ``skew`` beside a term list are a ValueError."""
    loss, support, beta, rkl_ratio, skew, terms = _terms(loss, support, beta, rkl_ratio, skew)
    reduction = _choice("reduction", reduction, REDUCTIONS)
    temperature = validate_temperature(temperature)
    if log_prob_min_clamp is not None:
        log_prob_min_clamp = _real("log_prob_min_clamp", log_prob_min_clamp)
        if not (log_prob_min_clamp <= 0.0):  # also rejects NaN; -inf is allowed (no-op clamp)
            raise ValueError(f"log_prob_min_clamp must be None or a log-prob <= 0 (not NaN); "
                             f"got {log_prob_min_clamp!r}")
    if student_topk is not None:
        student_topk = validate_k("student_topk", student_topk)
    missing_teacher = _choice("missing_teacher", missing_teacher, MISSING_TEACHER)
    if missing_teacher == "floor" and log_prob_min_clamp is None:
        raise ValueError('missing_teacher="floor" puts log_prob_min_clamp in place of a missing '
                         'teacher log-prob, so log_prob_min_clamp must be set; got None')
    sample_weight_clip = _sample_weight_clip(sample_weight_clip, terms)
    return Options(loss, support, beta, rkl_ratio, skew, temperature,
                   _flag("t2_scale", t2_scale), log_prob_min_clamp, reduction,
                   _flag("inplace_backward", inplace_backward), _flag("check_inputs", check_inputs),
                   terms, _flag("return_entropy", return_entropy), student_topk, missing_teacher,
                   sample_weight_clip)


def has_sampled(terms) -> bool:
    """Some term of weight != 0 has support="sampled" (SPEC 10.2): labels and
    label_teacher_logprobs are then required."""
    return any(t.support == "sampled" and t.weight != 0.0 for t in terms)


def _sample_weight_clip(clip, terms):
    """``sample_weight_clip``: None, or a real number > 0 (inf: no clip), only with a sampled term."""
    if clip is None:
        return None
    clip = _real("sample_weight_clip", clip)
    if not clip > 0.0:  # also rejects NaN
        raise ValueError(f"sample_weight_clip must be None or a number > 0 (it bounds the "
                         f"importance weight by clip / q_y); got {clip!r}")
    if not any(t.support == "sampled" for t in terms):
        raise ValueError('sample_weight_clip is only used by support="sampled"; no loss term '
                         'has that support')
    return clip


# ----------------------------------------------------------------------------- tensors

def _tensor(name, value):
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(value).__name__}")
    return value


def _dtype(name, t, allowed):
    if t.dtype not in allowed:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in allowed]}; got {t.dtype}")


def validate_tensors(logits, teacher_ids, teacher_logprobs, mask=None, *,
                     tp_group=None, vocab_start=None, labels=None,
                     label_teacher_logprobs=None, label_sample_logprobs=None) -> Shapes:
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
    if labels is not None:
        _tensor("labels", labels)
        _dtype("labels", labels, ID_DTYPES)
        if tuple(labels.shape) != lead:
            raise ValueError(f"labels must have the leading shape of logits {list(lead)}; "
                             f"got {list(labels.shape)}")
    for name, t in (("label_teacher_logprobs", label_teacher_logprobs),
                    ("label_sample_logprobs", label_sample_logprobs)):
        if t is not None:
            _tensor(name, t)
            _dtype(name, t, FLOAT_DTYPES)
            if tuple(t.shape) != lead:
                raise ValueError(f"{name} must have the leading shape of logits {list(lead)} "
                                 f"(one log-prob per row, for its label); got {list(t.shape)}")
    for name, t in (("teacher_ids", teacher_ids), ("teacher_logprobs", teacher_logprobs),
                    ("mask", mask), ("labels", labels),
                    ("label_teacher_logprobs", label_teacher_logprobs),
                    ("label_sample_logprobs", label_sample_logprobs)):
        if t is not None and t.device != logits.device:
            raise ValueError(f"{name} is on {t.device} but logits is on {logits.device}; "
                             f"all tensors must be on the same device")
    validate_vocab_start(tp_group, vocab_start)
    n = 1
    for d in lead:
        n *= d
    return Shapes(lead, n, v_r, k)


def validate_vocab_start(tp_group, vocab_start) -> None:
    """``vocab_start``: None, or an int >= 0 (only 0 without a ``tp_group``)."""
    if vocab_start is not None:
        if isinstance(vocab_start, bool) or not isinstance(vocab_start, numbers.Integral):
            raise TypeError(f"vocab_start must be None or an int; got {type(vocab_start).__name__}")
        if vocab_start < 0:
            raise ValueError(f"vocab_start must be >= 0; got {vocab_start}")
        if tp_group is None and vocab_start != 0:
            raise ValueError(f"vocab_start={vocab_start} needs a tp_group (without one the logits "
                             f"hold the whole vocab and vocab_start must be None or 0)")


def check_inplace_backward(logits, inplace_backward) -> None:
    """``inplace_backward=True`` overwrites the logits with their gradient, which destroys them:
    refused (``ValueError``) for what autograd itself refuses to modify in place - a leaf that
    requires grad (an ``nn.Parameter``) or a view of one (``p[:, :-1]``). Only when a backward
    can happen (grad mode on); anything else but ``True`` is left to :func:`validate_options`.
    Metadata only (``is_leaf`` / ``_base``: constants under torch.compile too)."""
    if inplace_backward is not True or not torch.is_grad_enabled():
        return
    if not (isinstance(logits, torch.Tensor) and logits.requires_grad):
        return
    base = logits._base
    if logits.is_leaf or (base is not None and base.is_leaf and base.requires_grad):
        what = "a leaf tensor" if logits.is_leaf else "a view of a leaf tensor"
        raise ValueError(
            f"inplace_backward=True would overwrite logits with their gradient, but logits is "
            f"{what} that requires grad (e.g. an nn.Parameter): its values would be lost. The "
            f"in-place backward is for logits that are an intermediate result (e.g. the LM head's "
            f"output) not read again; pass inplace_backward=False here")


def validate_logits(logits) -> Tuple[Tuple[int, ...], int, int]:
    """``logits`` alone (e.g. for ``student_topk``): ``(leading shape, N, V_r)``."""
    _tensor("logits", logits)
    _dtype("logits", logits, FLOAT_DTYPES)
    if logits.dim() < 1:
        raise ValueError("logits must have shape [..., V]; got a 0-d tensor")
    if logits.shape[-1] == 0:
        raise ValueError("logits must have a non-empty vocab dimension; got V = 0")
    lead = tuple(logits.shape[:-1])
    return lead, math.prod(lead), logits.shape[-1]


class Args(NamedTuple):
    """Everything :func:`validate_args` normalises: the :class:`Options` fields, then the
    :class:`Shapes` fields (``args.temperature``, ``args.n_rows``, ...)."""

    loss: Union[str, Tuple[Term, ...]]
    support: Optional[str]
    beta: Optional[float]
    rkl_ratio: Optional[float]
    skew: Optional[float]
    temperature: float
    t2_scale: bool
    log_prob_min_clamp: Optional[float]
    reduction: str
    inplace_backward: bool
    check_inputs: bool
    terms: Tuple[Term, ...]
    return_entropy: bool
    student_topk: Optional[int]
    missing_teacher: str
    sample_weight_clip: Optional[float]
    lead_shape: Tuple[int, ...]
    n_rows: int
    local_vocab: int
    k: int

    @property
    def options(self) -> Options:
        return Options(*self[:len(Options._fields)])


assert Args._fields == Options._fields + Shapes._fields


def validate_args(logits, teacher_ids, teacher_logprobs, *, loss="fkl", support=UNSET,
                  beta=UNSET, rkl_ratio=UNSET, skew=UNSET, temperature=1.0, t2_scale=False,
                  log_prob_min_clamp=None, mask=None, reduction="mean", tp_group=None,
                  vocab_start=None, inplace_backward=False, check_inputs=True, labels=None,
                  return_entropy=False, student_topk=None, missing_teacher="error",
                  label_teacher_logprobs=None, label_sample_logprobs=None,
                  sample_weight_clip=None) -> Args:
    """All host-side checks of a ``topk_distill_loss`` call (no host sync, no collective).
    ``student_topk <= V`` needs the full vocab size: :func:`check_k_fits` once it is known."""
    opts = validate_options(loss=loss, support=support, beta=beta, rkl_ratio=rkl_ratio, skew=skew,
                            temperature=temperature, t2_scale=t2_scale,
                            log_prob_min_clamp=log_prob_min_clamp, reduction=reduction,
                            inplace_backward=inplace_backward, check_inputs=check_inputs,
                            return_entropy=return_entropy, student_topk=student_topk,
                            missing_teacher=missing_teacher,
                            sample_weight_clip=sample_weight_clip)
    shapes = validate_tensors(logits, teacher_ids, teacher_logprobs, mask,
                              tp_group=tp_group, vocab_start=vocab_start, labels=labels,
                              label_teacher_logprobs=label_teacher_logprobs,
                              label_sample_logprobs=label_sample_logprobs)
    validate_sampled_inputs(opts.terms, labels, label_teacher_logprobs, label_sample_logprobs)
    check_inplace_backward(logits, opts.inplace_backward)
    return Args(*opts, *shapes)


def validate_sampled_inputs(terms, labels, label_teacher_logprobs, label_sample_logprobs):
    """SPEC 10.2: a sampled term (of nonzero weight) needs ``labels`` and
    ``label_teacher_logprobs``; the two label log-prob tensors are an error when no term has
    support="sampled" (they would be silently ignored; a term of weight 0 still allows them)."""
    if has_sampled(terms):
        for name, t in (("labels", labels), ("label_teacher_logprobs", label_teacher_logprobs)):
            if t is None:
                raise ValueError(f'support="sampled" needs {name} (the sampled token y of each '
                                 f'row and the teacher\'s log-prob of it, log p_y); got None')
    if any(t.support == "sampled" for t in terms):
        return
    for name, t in (("label_teacher_logprobs", label_teacher_logprobs),
                    ("label_sample_logprobs", label_sample_logprobs)):
        if t is not None:
            raise ValueError(f'{name} is only used by support="sampled"; no loss term has '
                             f'that support')


# ----------------------------------------------------------------------------- data

def data_flags(teacher_ids, teacher_logprobs, mask=None, *, labels=None,
               missing_teacher="error", label_teacher_logprobs=None,
               label_sample_logprobs=None):
    """The ``check_inputs`` data facts as a device tensor, no host sync: ``[largest id that
    counts (-1 if none), NaN log-prob bits, log-prob > 0 bits, largest label that counts (-1 if
    none or no labels)]`` (4 int64). The bits say which tensor has the bad entry: 1
    ``teacher_logprobs``, 2 ``label_teacher_logprobs``, 4 ``label_sample_logprobs`` (a NaN
    teacher log-prob only counts with missing_teacher="error"). Padding entries (id < 0),
    ignored labels (< 0) and masked rows are ignored everywhere else, so their contents may be
    anything; so are the label log-probs of a label that is a valid teacher id (never read,
    SPEC 10.2). ``labels`` has the shape of ``mask`` (the rows)."""
    counted = teacher_ids >= 0
    if mask is not None:
        counted = counted & mask.unsqueeze(-1)
    lp = teacher_logprobs
    nan_lp = (counted & torch.isnan(lp)).any().long()
    if missing_teacher != "error":  # NaN marks an entry the teacher did not score (SPEC 9.5)
        nan_lp = torch.zeros_like(nan_lp)
    pos_lp = (counted & (lp > 0)).any().long()
    if label_teacher_logprobs is not None or label_sample_logprobs is not None:
        read = sampled_label_read(teacher_ids, teacher_logprobs, labels, mask, missing_teacher)
        for bit, t, nan_counts in ((2, label_teacher_logprobs, missing_teacher == "error"),
                                   (4, label_sample_logprobs, True)):
            if t is None:
                continue
            if nan_counts:
                nan_lp = nan_lp + bit * (read & torch.isnan(t)).any().long()
            pos_lp = pos_lp + bit * (read & (t > 0)).any().long()
    return torch.stack([_largest(teacher_ids, counted), nan_lp, pos_lp,
                        _largest_label(labels, mask, teacher_ids.device)])


def sampled_label_read(teacher_ids, teacher_logprobs, labels, mask=None,
                       missing_teacher="error"):
    """[...] bool, the rows whose ``label_teacher_logprobs`` / ``label_sample_logprobs`` a sampled
    term reads (SPEC 10.2): counted, label >= 0 and not among the row's valid teacher ids."""
    valid = teacher_ids >= 0
    if missing_teacher == "drop":  # a dropped entry is padding: the label is not its id
        valid = valid & ~torch.isnan(teacher_logprobs)
    among = ((teacher_ids == labels.unsqueeze(-1)) & valid).any(-1)
    read = (labels >= 0) & ~among
    return read if mask is None else read & mask


def _largest(values, counted):
    """max of ``values`` where ``counted`` (int64, 0-d), -1 if none."""
    largest = torch.where(counted, values.long(), -1)
    return largest.max().reshape(()) if largest.numel() else torch.tensor(-1, device=values.device)


def _largest_label(labels, mask, device):
    if labels is None:
        return torch.tensor(-1, dtype=torch.int64, device=device)
    counted = labels >= 0
    if mask is not None:
        counted = counted & mask
    return _largest(labels, counted)


def raise_data_errors(largest_id, nan_lp, pos_lp, vocab_size, where="",
                      largest_label=-1) -> None:
    """The ValueError of a failed data check (``where``: e.g. " on rank 1 of tp_group")."""
    if largest_id >= vocab_size:
        raise ValueError(f"teacher_ids has an id >= the vocab size V={vocab_size}{where} "
                         f"(ids must be in [0, V), negative = padding)")
    if largest_label >= vocab_size:
        raise ValueError(f"labels has a label >= the vocab size V={vocab_size}{where} "
                         f"(labels must be in [0, V), negative = ignored)")
    for bit, name in ((1, "teacher_logprobs"), (2, "label_teacher_logprobs"),
                      (4, "label_sample_logprobs")):
        if nan_lp & bit:
            hint = ("" if bit == 4 else
                    ". If NaN marks an entry the teacher did not score, pass "
                    'missing_teacher="drop" or missing_teacher="floor" (SPEC 9.5)')
            raise ValueError(f"{name} has a NaN entry{where} (log-probs must be <= 0; "
                             f"-inf allowed){hint}")
        if pos_lp & bit:
            raise ValueError(f"{name} has an entry > 0{where} (log-probs must be <= 0; "
                             f"-inf allowed)")


def check_data(teacher_ids, teacher_logprobs, vocab_size, mask=None, *, labels=None,
               missing_teacher="error", label_teacher_logprobs=None,
               label_sample_logprobs=None) -> None:
    """``check_inputs=True`` data checks, with exactly one host sync.

    Only entries that count are checked: padding entries (id < 0), ignored labels (< 0) and
    masked rows are ignored everywhere else, so their contents may be anything.
      * an id >= ``vocab_size`` (the full vocab V, all shards): ValueError naming teacher_ids
      * a label >= ``vocab_size``: ValueError naming labels
      * a NaN teacher log-prob (with ``missing_teacher="error"`` only) or one > 0 (-inf is
        fine): ValueError naming teacher_logprobs
    Under tensor parallelism the same facts travel in the layout all_gather instead
    (``parallel.resolve_layout(..., data=...)``), so that every rank raises, not just the one
    whose copy of the teacher tensors is bad.
    """
    largest_id, nan_lp, pos_lp, largest_label = data_flags(
        teacher_ids, teacher_logprobs, mask, labels=labels, missing_teacher=missing_teacher,
        label_teacher_logprobs=label_teacher_logprobs,
        label_sample_logprobs=label_sample_logprobs).tolist()
    raise_data_errors(largest_id, nan_lp, pos_lp, vocab_size, largest_label=largest_label)
