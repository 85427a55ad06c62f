"""Logits layouts the kernels take without a copy, and jagged nested tensors (SPEC 9.1).

The kernels read row ``n`` of the logits at ``base + b*s0 + t*s1`` with ``(b, t) = (n // T, n % T)``
and unit column stride: logits reach them as a 2-D ``[N, V_r]`` view (any row stride) or a 3-D
``[B, T, V_r]`` view (any two leading strides). The teacher tensors, mask and labels are small and
stay flat contiguous ``[N, ...]``. This module is the host-side, metadata-only part of that:

* :func:`fold_rows` - logits ``[..., V]`` -> a 2-D / 3-D VIEW of the same storage whose rows are
  the original rows in row-major order of the leading indices, or ``None`` when no such view
  exists (the caller then copies).
* :func:`rows_overlap` - whether two distinct rows of such a view share memory (an in-place
  backward must then refuse, as PyTorch's in-place ops refuse internal overlap).
* :func:`unpack_jagged` / :func:`repack_jagged` / :func:`jagged_values` / :func:`call_on_packed` /
  :func:`accepts_jagged` - jagged nested tensors (``layout=torch.jagged``): compute on the packed ``values()``, hand the
  per-token outputs back as jagged nested tensors with the same offsets.

Nothing here synchronises with a device except the offsets comparison of :func:`unpack_jagged`
(only when two arguments carry *different* offsets tensors and ``check_inputs=True``).
docs/LAYOUTS.md is the user-facing summary.
"""
from __future__ import annotations

import functools
import inspect
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import _validate

__all__ = ["fold_rows", "rows_overlap", "is_jagged", "any_nested", "jagged_values",
           "JaggedBatch", "unpack_jagged", "repack_jagged", "call_on_packed",
           "accepts_jagged"]


# ============================================================================ fold_rows

def _canonical_dims(sizes: Sequence[int], strides: Sequence[int]) -> List[Tuple[int, int]]:
    """The leading dims as (size, stride) pairs in order, size-1 dims dropped and every pair of
    adjacent dims merged when the outer one steps exactly over the inner one
    (``stride_outer == stride_inner * size_inner``; this includes two stride-0 dims).

    Merging is transitive (merging i with i+1 and then with i-1 tests the same equalities as the
    pairwise tests), so the result is unique: the fewest (size, stride) dims whose row-major
    enumeration visits the same offsets in the same order. The rows fold into ``len(result)``
    strides and into no fewer (tests/test_layout.py checks this against a brute-force search).
    """
    dims: List[Tuple[int, int]] = []
    for size, stride in zip(sizes, strides):
        if size == 1:  # contributes index 0 only: its stride is irrelevant
            continue
        if dims and dims[-1][1] == stride * size:
            dims[-1] = (dims[-1][0] * size, stride)
        else:
            dims.append((size, stride))
    return dims


def fold_rows(logits: Tensor) -> Optional[Tensor]:
    """Logits ``[..., V]`` as a view the kernels read without a copy, or ``None``.

    Contract:
      * ``logits``: a strided (non-nested) tensor with ``dim() >= 1``; ``[V]`` is one row.
      * Returns a VIEW of ``logits`` (same storage, same storage offset; autograd flows through
        plain ``view``s, whose backward is a free reshape) that is
          - 2-D ``[N, V]`` when the leading dims fold into one stride (including N <= 1 and any
            tensor with a 0-size dim),
          - else 3-D ``[B, T, V]`` (B, T > 1) when they fold into two strides,
        where N = prod(leading dims) and row ``n`` of the view (``n = b*T + t`` for 3-D) is row
        ``n`` of ``logits.reshape(-1, V)``: the fold is exact in the row-major order of the
        leading indices, so per-row outputs need no permutation. ``logits`` itself is returned
        when it already has that shape.
      * Returns ``None`` when the last dim does not have unit stride (V > 1) or the leading dims
        need three or more strides (e.g. ``x[:, ::2][:, :, :-1]`` of a 4-D tensor, or a
        ``[A, B, C, V]`` tensor permuted so that no two leading dims nest). The caller copies.
      * The unit stride of the last dim is not required when V == 1 (the view's last stride is
        then meaningless; the kernels treat it as 1).
      * Metadata only: no device access, no host sync. Expanded (stride-0) dims fold like any
        other dim; whether rows then overlap is :func:`rows_overlap`'s question.

    Examples (``x`` contiguous ``[B, T, V]``, B, T > 1): ``x`` -> ``[B*T, V]``;
    ``x[:, :-1]`` -> ``[B, T-1, V]`` strides ``(T*V, V, 1)``; ``x.transpose(0, 1)`` (logical
    ``[T, B]``) -> ``[T, B, V]`` strides ``(V, T*V, 1)``; ``x[:, 3]`` -> ``[B, V]`` stride
    ``T*V``; ``x[None]`` / ``[1, total, V]`` -> ``[total, V]``.
    """
    if not isinstance(logits, Tensor):
        raise TypeError(f"logits must be a torch.Tensor; got {type(logits).__name__}")
    if logits.is_nested or logits.layout != torch.strided:
        raise TypeError(f"fold_rows needs a strided (dense) tensor; got layout {logits.layout}"
                        + (" (nested: unpack it with unpack_jagged)" if logits.is_nested else ""))
    if logits.dim() < 1:
        raise ValueError("logits must have shape [..., V]; got a 0-d tensor")
    v = logits.shape[-1]
    if v != 1 and logits.stride(-1) != 1:
        return None
    lead = tuple(logits.shape[:-1])
    n = 1
    for d in lead:
        n *= d
    if n == 0 or logits.numel() == 0:
        dims: List[Tuple[int, int]] = []  # no memory is read: any 2-D shape will do
    else:
        dims = _canonical_dims(lead, logits.stride()[:-1])
    if len(dims) > 2:
        return None
    shape = (n, v) if len(dims) <= 1 else (dims[0][0], dims[1][0], v)
    if tuple(logits.shape) == shape:
        return logits
    # `view` succeeds exactly when the new dims are products of runs of old dims that merge
    # (ATen's computeStride), which is what _canonical_dims established; it keeps row-major order
    # by definition, and its autograd backward is a reshape of the (contiguous) gradient.
    return logits.view(shape)


# ============================================================================ rows_overlap

def _two_stride_overlap(b: int, s0: int, t: int, s1: int, span: int) -> bool:
    """Rows at ``i*s0 + j*s1`` (0 <= i < b, 0 <= j < t), each ``span`` elements long: do two
    distinct rows share memory? Exact. Needs b, t > 1 and s0, s1 >= span >= 1.

    Two rows overlap iff some (di, dj) != (0, 0) with |di| < b, |dj| < t has
    ``|di*s0 + dj*s1| < span``. By symmetry take di > 0 (di = 0 gives |dj*s1| >= s1 >= span).
    For fixed di, ``di*s0 + dj*s1`` is increasing in dj, so its smallest magnitude over the
    integers in [-(t-1), 0] is at ``-(di*s0 // s1)`` or one below (clamped). One pass over
    di = 1 .. b-1, run over the smaller of the two dims: O(min(b, t)) Python integer steps, no
    tensor (so it also runs at trace time under torch.compile).
    """
    # Nested layouts (the common case, O(1)): one dim's whole block fits inside the other's step.
    if s0 >= (t - 1) * s1 + span or s1 >= (b - 1) * s0 + span:
        return False
    if b > t:  # iterate over the smaller dim
        b, s0, t, s1 = t, s1, b, s0
    for di in range(1, b):
        x = di * s0
        q = x // s1  # dj = -q puts x + dj*s1 in [0, s1)
        for dj in (-q, -q - 1):
            dj = max(dj, -(t - 1))
            if abs(x + dj * s1) < span:
                return True
    return False


def rows_overlap(view: Tensor) -> bool:
    """Whether two distinct rows of a folded logits view share memory.

    Contract:
      * ``view``: 2-D ``[N, V]`` or 3-D ``[B, T, V]`` strided tensor with unit last stride (or
        V == 1), e.g. what :func:`fold_rows` returns; otherwise ``ValueError``.
      * Row ``n`` occupies the ``V`` consecutive elements from its start offset (``n*s`` for
        2-D, ``b*s0 + t*s1`` for 3-D). Returns True iff two different rows share an element:
        a stride 0 on a dim of size > 1 (``expand``), a row stride smaller than V, or
        interleaved 3-D strides that land one row inside another (e.g. s0 = 3V, s1 = 2V with
        B > 2, T > 3: rows (2, 0) and (0, 3) coincide). False for N <= 1 or V == 0.
      * Exact, host-only (metadata), no device access. O(1) for 2-D views, contiguous, expanded
        and nested 3-D layouts; O(min(B, T)) Python integer steps otherwise.

    An in-place backward on overlapping rows would write several rows' gradients to the same
    memory (a race on CUDA): SPEC 9.1 makes ``inplace_backward=True`` a ``ValueError`` there,
    as PyTorch refuses in-place ops on tensors with internal overlap.
    """
    if not isinstance(view, Tensor) or view.is_nested or view.layout != torch.strided:
        raise TypeError("rows_overlap needs a strided (dense) torch.Tensor")
    if view.dim() not in (2, 3):
        raise ValueError(f"rows_overlap needs a 2-D [N, V] or 3-D [B, T, V] view; got "
                         f"{view.dim()}-D (fold it with fold_rows first)")
    v = view.shape[-1]
    if v > 1 and view.stride(-1) != 1:
        raise ValueError(f"rows_overlap needs unit stride on the last dim; got {view.stride(-1)}")
    if view.numel() == 0:
        return False
    # PyTorch's own check, when definitive: 0 = no overlap (non-overlapping and dense),
    # 1 = overlap (a dim of size > 1 with stride 0), 2 = too hard to tell. (Only a shortcut: the
    # arithmetic below is exact on its own, and is what runs while compiling.)
    if not torch.compiler.is_compiling():
        quick = torch._debug_has_internal_overlap(view)
        if quick != 2:
            return quick == 1
    # The elements within a row are distinct (unit stride), so overlap is between rows only.
    dims = [(size, stride) for size, stride in zip(view.shape[:-1], view.stride()[:-1])
            if size > 1]
    if not dims:
        return False
    if any(stride < v for _, stride in dims):
        return True  # neighbours along that dim are closer than a row (includes stride 0)
    if len(dims) == 1:
        return False
    (b, s0), (t, s1) = dims
    return _two_stride_overlap(b, s0, t, s1, v)


# ============================================================================ jagged nested tensors

def is_jagged(t) -> bool:
    """True for a nested tensor with ``layout=torch.jagged``."""
    return isinstance(t, Tensor) and t.is_nested and t.layout == torch.jagged


def any_nested(*tensors) -> bool:
    """True if any argument is a nested tensor (jagged or strided); ``None`` entries allowed."""
    return any(isinstance(t, Tensor) and t.is_nested for t in tensors)


def _check_jagged_kind(name: str, t: Tensor) -> None:
    """TypeError for the nested tensors that :func:`unpack_jagged` cannot take without a copy,
    each with the conversion to use."""
    if t.layout != torch.jagged:
        raise TypeError(
            f"{name} is a nested tensor with layout={t.layout}; only jagged nested tensors "
            f"(layout=torch.jagged) are supported. Convert it (one copy) with "
            f"torch.nested.nested_tensor(list({name}.unbind()), layout=torch.jagged), or pad it "
            f"with torch.nested.to_padded_tensor({name}, 0.0) and pass a mask")
    ragged = getattr(t, "_ragged_idx", 1)
    if ragged != 1:
        raise TypeError(
            f"{name} is a jagged nested tensor whose ragged dim is {ragged}; it must be dim 1 "
            f"([B, j, ...], one row per token). Transpose it back ({name}.transpose(1, {ragged})) "
            f"or rebuild it with the ragged dim first")
    if t.lengths() is not None:
        raise TypeError(
            f"{name} is a non-contiguous jagged nested tensor (it has lengths(), e.g. from "
            f"narrow): its values() hold rows that are not part of it. Pass {name}.contiguous() "
            f"(one copy)")


class _JaggedValues(torch.autograd.Function):
    """``nt.values()`` (a view of the nested tensor's storage) whose backward wraps the gradient
    into a jagged nested tensor with ``nt``'s offsets.

    Not plain ``nt.values()``: its autograd node (NestedGetValuesBackward0) keeps ``nt`` as a
    saved variable only to read its offsets, so any in-place change of the values between the
    forward and that node - the in-place backward's version-counter bump included - makes autograd
    raise (in torch 2.14.1 not even its "modified by an inplace operation" error: formatting that
    message fails with ``NotImplementedError: aten._nested_tensor_size.default``). This node saves
    no tensor, only the offsets object (whose identity gives the gradient the same ragged size).
    """

    @staticmethod
    def forward(ctx, nt):
        ctx.offsets = nt.offsets()
        ctx.seqlens = (getattr(nt, "_maybe_min_seqlen", None),
                       getattr(nt, "_maybe_max_seqlen", None))
        return nt.values()

    @staticmethod
    def backward(ctx, grad):
        return torch.nested.nested_tensor_from_jagged(grad, ctx.offsets, min_seqlen=ctx.seqlens[0],
                                                      max_seqlen=ctx.seqlens[1])


def jagged_values(nt: Tensor) -> Tensor:
    """The packed ``[total, ...]`` values of a jagged nested tensor: a view of its storage (an
    in-place write lands in ``nt``), differentiable (the gradient reaches ``nt`` as a jagged
    nested tensor with the same offsets), and safe for an in-place backward (see
    :class:`_JaggedValues`). Without grad it is exactly ``nt.values()``."""
    if not is_jagged(nt):
        raise TypeError("jagged_values needs a jagged nested tensor")
    if torch.is_grad_enabled() and nt.requires_grad:
        return _JaggedValues.apply(nt)
    return nt.values()


class JaggedBatch(NamedTuple):
    """What :func:`unpack_jagged` returns.

    logits, teacher_ids, teacher_logprobs, mask, labels: plain tensors. Jagged arguments are
        replaced by their packed values (``[total, V_r]``, ``[total, K]``, ``[total]``; views of
        their storage), reshaped to the plain logits' leading shape when logits is plain
        (``[1, total, ...]``); plain arguments (and ``None``) are passed through.
    like: the jagged logits (the template for :func:`repack_jagged`), or None when the logits
        are plain (per-token outputs then keep the logits' plain leading shape).
    offsets: the shared offsets tensor ``[B + 1]`` (None when nothing was jagged).
    """

    logits: Tensor
    teacher_ids: Tensor
    teacher_logprobs: Tensor
    mask: Optional[Tensor]
    labels: Optional[Tensor]
    like: Optional[Tensor]
    offsets: Optional[Tensor]
    extra: Optional[Dict[str, Optional[Tensor]]] = None  # the ``extra`` per-row arguments

    def repack(self, per_token: Tensor) -> Tensor:
        """``repack_jagged(per_token, self.like)``; ``per_token`` unchanged when logits is plain."""
        return per_token if self.like is None else repack_jagged(per_token, self.like)


def unpack_jagged(logits, teacher_ids, teacher_logprobs, mask=None, labels=None, *,
                  check_inputs: bool = True,
                  extra: Optional[Dict[str, Optional[Tensor]]] = None) -> JaggedBatch:
    """Replace jagged nested tensor arguments by their packed values.

    Contract:
      * Any argument may be a jagged nested tensor ``[B, j, ...]`` (ragged dim 1, no holes):
        logits ``[B, j, V_r]``, teacher_ids / teacher_logprobs ``[B, j, K]``, mask / labels
        ``[B, j]``. Its values are taken with :func:`jagged_values` (a view: no copy; gradients
        flow back to the nested logits; an in-place backward writes into its storage).
      * Mixing, when logits is jagged: every other argument is either jagged with the same
        offsets, or a plain tensor already packed as ``[total, ...]`` (e.g. ``x.values()``;
        its shape is checked later with the usual shape errors).
      * Mixing, when logits is plain and another argument is jagged (verl's "rmpad" layout):
        logits must be packed, leading shape ``[total]`` or ``[1, total]``; the jagged values
        are viewed to that leading shape. Anything else (e.g. padded ``[B, T, V]`` logits with a
        jagged teacher) is a ``ValueError``: the rows would not line up.
      * All jagged arguments share the offsets: the same offsets tensor object is accepted for
        free (the usual case: built from one ``offsets``, or ``values()``-derived with
        ``nested_tensor_from_jagged(v, nt.offsets())``); a different number of sequences or a
        different total is a ``ValueError`` naming the argument (metadata, free); otherwise the
        offsets' values are compared - one host sync on CUDA for all arguments together, none on
        CPU - and only with ``check_inputs=True`` and not while compiling (``check_inputs=False``
        promises no sync: equal-shaped offsets are then trusted).
      * A strided nested tensor, a jagged one with another ragged dim, or one with holes
        (``lengths()``) is a ``TypeError`` saying how to convert it; a jagged logits with fewer
        than 3 dims is a ``ValueError``.
      * Nothing nested: the arguments come back unchanged with ``like = offsets = None``.
      * ``extra``: more per-row ``[B, j]`` arguments by name (the sampled support's
        ``label_teacher_logprobs`` / ``label_sample_logprobs``), treated like ``labels`` and
        returned in ``JaggedBatch.extra``.
    """
    extra = dict(extra or {})
    named = [("logits", logits), ("teacher_ids", teacher_ids),
             ("teacher_logprobs", teacher_logprobs), ("mask", mask), ("labels", labels),
             *extra.items()]
    jagged = []
    for name, t in named:
        if isinstance(t, Tensor) and t.is_nested:
            _check_jagged_kind(name, t)
            jagged.append((name, t))
    if not jagged:
        return JaggedBatch(logits, teacher_ids, teacher_logprobs, mask, labels, None, None, extra)

    ref_name, ref = jagged[0]  # logits when it is jagged
    if ref_name == "logits" and logits.dim() < 3:
        raise ValueError(f"logits as a jagged nested tensor must be [B, j, V_r]; got "
                         f"{logits.dim()} dims")
    offsets = ref.offsets()
    total = ref.values().shape[0]
    pending = []  # (name, offsets) to compare by value
    for name, t in jagged[1:]:
        o = t.offsets()
        if o is offsets:
            continue
        n_tok = t.values().shape[0]
        if o.shape != offsets.shape or n_tok != total:
            raise ValueError(
                f"{name} must have the offsets of {ref_name} (same sequences and lengths); got "
                f"{o.shape[0] - 1} sequences / {n_tok} tokens vs {offsets.shape[0] - 1} / {total}")
        pending.append((name, o))
    if pending and check_inputs and not torch.compiler.is_compiling():
        differs = torch.stack([(o.to(offsets.device) != offsets).any() for _, o in pending])
        for (name, _), bad in zip(pending, differs.tolist()):  # one sync for all of them
            if bad:
                raise ValueError(f"{name} must have the offsets of {ref_name} (same sequence "
                                 f"lengths); its offsets differ")

    lead = None  # plain logits: the packed leading shape the jagged values are viewed to
    if ref_name != "logits":
        if not isinstance(logits, Tensor) or logits.dim() < 1:
            lead = None  # let the usual argument checks report it
        elif tuple(logits.shape[:-1]) in ((total,), (1, total)):
            lead = tuple(logits.shape[:-1])
        else:
            raise ValueError(
                f"{ref_name} is a jagged nested tensor ({total} tokens) but logits is a plain "
                f"tensor with leading shape {list(logits.shape[:-1])}: pass logits as a jagged "
                f"nested tensor with the same offsets, or packed as [total, V_r] or "
                f"[1, total, V_r]")

    def unpack(t):
        if not (isinstance(t, Tensor) and t.is_nested):
            return t
        vals = jagged_values(t)
        return vals if lead is None or len(lead) == 1 else vals.view(lead + vals.shape[1:])

    return JaggedBatch(unpack(logits), unpack(teacher_ids), unpack(teacher_logprobs),
                       unpack(mask), unpack(labels), logits if ref_name == "logits" else None,
                       offsets, {name: unpack(t) for name, t in extra.items()})


def repack_jagged(per_token: Tensor, like: Tensor) -> Tensor:
    """Per-token values ``[total, ...]`` -> a jagged nested tensor ``[B, j, ...]`` with the
    offsets of ``like`` (the same offsets object, so it has the same ragged size ``j`` and
    combines with ``like`` in pointwise ops). A view of ``per_token`` (no copy), differentiable:
    a loss built from the result backpropagates into ``per_token``. ``like``'s cached min/max
    sequence lengths are carried over (no sync when a consumer asks for them).

    ``per_token.shape[0]`` must be ``like``'s total number of tokens (``ValueError``).
    """
    if not is_jagged(like):
        raise TypeError("repack_jagged: like must be a jagged nested tensor")
    total = like.values().shape[0]
    if per_token.dim() < 1 or per_token.shape[0] != total:
        raise ValueError(f"repack_jagged: per_token must be [total={total}, ...]; got "
                         f"{list(per_token.shape)}")
    return torch.nested.nested_tensor_from_jagged(
        per_token, like.offsets(), min_seqlen=getattr(like, "_maybe_min_seqlen", None),
        max_seqlen=getattr(like, "_maybe_max_seqlen", None))


#: Per-row keyword arguments that may be jagged like ``mask`` (``[B, j]``).
PER_ROW_KWARGS = ("labels", "label_teacher_logprobs", "label_sample_logprobs")


def call_on_packed(fn: Callable, logits, teacher_ids, teacher_logprobs, mask=None, **kwargs):
    """``fn(packed logits, packed teacher_ids, packed teacher_logprobs, mask=..., **kwargs)``
    with every jagged argument unpacked (:func:`unpack_jagged`), then every per-token field of
    the result (a NamedTuple such as ``TopKDistillOutput``: each tensor field with ``dim() >= 1``,
    shape ``[total, ...]``) repacked as a jagged nested tensor with the logits' offsets. A reduced
    (0-d) loss stays a plain tensor. When the logits are plain (a jagged teacher with packed
    logits) nothing is repacked. ``labels`` (and the other per-row arguments of
    :data:`PER_ROW_KWARGS`) are unpacked too when passed in ``kwargs``.

    This is how the ``topk_distill_loss`` functions take jagged input (:func:`accepts_jagged`).
    """
    for name, value in kwargs.items():  # (else fn, seeing a nested tensor, would recurse)
        if name not in PER_ROW_KWARGS and isinstance(value, Tensor) and value.is_nested:
            raise TypeError(f"{name} cannot be a nested tensor (only logits, teacher_ids, "
                            f"teacher_logprobs, mask, {', '.join(PER_ROW_KWARGS)} can be "
                            f"jagged)")
    # Checked here, on the nested tensor itself: its packed values are a view of no leaf.
    _validate.check_inplace_backward(logits, kwargs.get("inplace_backward"))
    has_labels = "labels" in kwargs
    extra = {name: kwargs[name] for name in PER_ROW_KWARGS[1:] if name in kwargs}
    batch = unpack_jagged(logits, teacher_ids, teacher_logprobs, mask, kwargs.get("labels"),
                          check_inputs=kwargs.get("check_inputs", True), extra=extra)
    if has_labels:
        kwargs["labels"] = batch.labels
    kwargs.update(batch.extra)
    out = fn(batch.logits, batch.teacher_ids, batch.teacher_logprobs, mask=batch.mask, **kwargs)
    if batch.like is None:
        return out
    return out._replace(**{
        name: batch.repack(value) for name, value in zip(out._fields, out)
        if isinstance(value, Tensor) and value.dim() >= 1})


def accepts_jagged(fn: Callable) -> Callable:
    """Decorator: ``fn`` called with any nested tensor argument runs as
    ``call_on_packed(fn, **every argument)`` (SPEC 9.1), else as itself.

    The arguments are bound by name from ``fn``'s signature, read once here, with dict operations
    that torch.compile traces on every supported torch (``locals()`` inside ``fn`` did the same,
    but torch 2.11's dynamo cannot trace the builtin ``locals()``). Parameters added to
    ``fn`` later are forwarded, and checked for nesting, without a change here.
    """
    params = inspect.signature(fn).parameters
    names = tuple(params)
    defaults = {name: p.default for name, p in params.items()
                if p.default is not inspect.Parameter.empty}

    @functools.wraps(fn)
    def with_jagged(*args, **kwargs):
        if any_nested(*args, *kwargs.values()):
            call = dict(defaults)
            call.update(zip(names, args))
            call.update(kwargs)
            return call_on_packed(fn, **call)
        return fn(*args, **kwargs)

    return with_jagged
