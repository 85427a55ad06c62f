"""Tensor-parallel bookkeeping and collectives (Megatron-style vocab sharding, SPEC section 5).

Rank r of a group of W ranks holds the vocab columns ``[vocab_start, vocab_start + V_r)``
(Megatron-Core's ``VocabUtility`` vocabulary); shards may be uneven; teacher tensors are
replicated. Per loss call:

* layout - :func:`resolve_layout`: with ``check_inputs=True`` one small ``all_gather`` of
  ``(N, K, V_r, vocab_start)`` (4 int64 per rank) and one host sync, so that ranks that disagree
  on N or K, or whose shards do not tile ``[0, V)``, ALL raise the same ``ValueError`` instead of
  hanging in a mismatched collective. With ``check_inputs=False`` the layout is cached per
  ``(group, V_r, vocab_start)``: only the first call on a group gathers it.
* forward - :func:`combine_shard_stats`, exactly two collectives on [N]- and [N, 5 + K]-sized
  tensors: ``all_reduce(MAX)`` of the row max, then ``all_reduce(SUM)`` of the packed
  ``[rescaled sums | gathered teacher logits]`` (each teacher logit is non-zero on exactly one
  rank, so the SUM assembles it exactly).
* backward - no communication.

So a call makes 2 collectives with ``check_inputs=False`` (3 on the first call of a group: the
layout is learned once) and 3 with ``check_inputs=True`` (the SPEC's "at most two" plus the
small cross-rank shape check that it puts on top). :func:`communication_bytes` gives the sizes.

Collectives go through ``torch.ops._c10d_functional`` with the group's *name*, so the whole
call stays traceable by ``torch.compile(fullgraph=True)``; they work with NCCL and gloo. Under
``torch.compile`` the layout is a trace-time constant (see :func:`resolve_layout`), so a
compiled graph holds exactly the two forward collectives (and no cross-rank shape check).

This module is the one implementation of the layout logic: the kernel-backed API, the fused
linear API and the pure-PyTorch reference all call :func:`resolve_layout`.
"""
from __future__ import annotations

from typing import Dict, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "TPLayout",
    "group_name_of",
    "resolve_layout",
    "vocab_layout",
    "clear_layout_cache",
    "combine_shard_stats",
    "merge_topk",
    "communication_bytes",
]


class TPLayout(NamedTuple):
    """Vocab sharding across a tensor-parallel group (group-local ranks)."""

    rank: int
    world_size: int
    vocab_start: int                 # this rank's first global column
    vocab_size: int                  # V = sum of all V_r
    shard_starts: Tuple[int, ...]    # per rank
    shard_sizes: Tuple[int, ...]     # per rank


# (group name, V_r, vocab_start or -1) -> TPLayout. The vocab layout of a model does not change
# between steps; with check_inputs=False it is learned once, then no layout collective.
_LAYOUT_CACHE: Dict[Tuple[str, int, int], TPLayout] = {}


def clear_layout_cache() -> None:
    """Forget every cached layout (call it on EVERY rank, e.g. after re-creating process groups
    under the same names, or after changing some rank's shard width)."""
    _LAYOUT_CACHE.clear()


def group_name_of(group: Union[str, "dist.ProcessGroup"]) -> str:
    """The registered name of a process group (accepts the name itself)."""
    if isinstance(group, str):
        return group
    if dist.is_available() and isinstance(group, dist.ProcessGroup):
        return group.group_name
    raise TypeError(f"tp_group must be a torch.distributed.ProcessGroup or its name (str); got "
                    f"{type(group).__name__}")


def _resolve(group_name: str) -> "dist.ProcessGroup":
    from torch.distributed.distributed_c10d import _resolve_process_group

    try:
        return _resolve_process_group(group_name)
    except (RuntimeError, ValueError, KeyError, AttributeError) as e:  # torch: "Could not resolve"
        initialised = dist.is_available() and dist.is_initialized()
        raise ValueError(
            f"tp_group={group_name!r} is not the name of a registered process group"
            + ("" if initialised else " (torch.distributed is not initialised)")
            + f"; pass the torch.distributed.ProcessGroup itself or its group.group_name "
            f"(torch: {e})") from None


def _all_reduce(t: Tensor, op: str, group_name: str) -> Tensor:
    out = torch.ops._c10d_functional.all_reduce(t, op, group_name)
    return torch.ops._c10d_functional.wait_tensor(out)


def _all_gather(t: Tensor, world_size: int, group_name: str) -> Tensor:
    out = torch.ops._c10d_functional.all_gather_into_tensor(t, world_size, group_name)
    return torch.ops._c10d_functional.wait_tensor(out)


def _gather_host_table(mine: Tensor, world_size: int, group_name: str) -> list:
    """All-gather a small 1-D int64 tensor and return it as ``world_size`` rows of Python ints
    (the host sync of the layout and chunk-size checks, after which errors may be raised).

    Before returning it waits until the collective's work has let go of ``mine`` and its output:
    gloo completes a work before its worker thread drops it, and for ~0.1 ms (3-6% of calls,
    measured on the 2-core machine) that thread still co-owns both tensors. If our Python objects
    died first, the thread would free them later and take the GIL to do it - and when "later" is
    during interpreter exit (a ValueError raised right after this gather ends the script), the
    process aborts: ``terminate called without an active exception`` (pytorch/pytorch#190489,
    docs/TP.md "Teardown"). Bounded (1 s), so a backend that holds its tensors longer only costs
    that; CPU tensors only - NCCL's watchdog releases CUDA ones on its own schedule."""
    import time

    out = torch.ops._c10d_functional.all_gather_into_tensor(mine, world_size, group_name)
    out = torch.ops._c10d_functional.wait_tensor(out)
    table = out.view(world_size, -1).tolist()
    if mine.device.type == "cpu":
        deadline = time.monotonic() + 1.0
        while (mine._use_count() > 1 or out._use_count() > 1) and time.monotonic() < deadline:
            time.sleep(0)
    return table


def _collective_device(pg: "dist.ProcessGroup", device) -> torch.device:
    """Where the small layout tensor lives: the logits' device when given (the group must
    support it anyway for the loss's own collectives), else CUDA for NCCL groups, else CPU."""
    if device is not None:
        return torch.device(device)
    if "nccl" in str(dist.get_backend(pg)) and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _layout_from_table(table: Sequence[Sequence[int]], rank: int) -> TPLayout:
    """The layout from every rank's ``(N, K, V_r, vocab_start or -1)``. Every rank sees the same
    table, so every rank raises the same error."""
    world = len(table)
    ns = [row[0] for row in table]
    ks = [row[1] for row in table]
    widths = [row[2] for row in table]
    starts = [row[3] for row in table]
    if len(set(ns)) != 1:
        raise ValueError(f"logits: the ranks of tp_group disagree on the number of rows N "
                         f"(rank: N) {dict(enumerate(ns))}; every rank must pass the same tokens")
    if len(set(ks)) != 1:
        raise ValueError(f"teacher_ids: the ranks of tp_group disagree on K, the number of teacher "
                         f"entries per row (rank: K) {dict(enumerate(ks))}; teacher tensors must be "
                         f"replicated")
    given = [s >= 0 for s in starts]
    if any(given) and not all(given):
        raise ValueError(f"vocab_start must be given on every rank of tp_group or on none; got "
                         f"(rank: vocab_start) "
                         f"{ {r: (s if s >= 0 else None) for r, s in enumerate(starts)} }")
    if not any(given):
        starts = [sum(widths[:r]) for r in range(world)]
    spans = sorted((s, s + w) for s, w in zip(starts, widths))
    if spans[0][0] != 0 or any(a[1] != b[0] for a, b in zip(spans, spans[1:])):
        raise ValueError(f"vocab_start: the shards [vocab_start, vocab_start + V_r) of tp_group "
                         f"must tile [0, V) without gaps or overlaps; got (rank: [start, end)) "
                         f"{ {r: (s, s + w) for r, (s, w) in enumerate(zip(starts, widths))} }")
    return TPLayout(rank, world, starts[rank], sum(widths), tuple(starts), tuple(widths))


def _gather_layout(group_name: str, n: int, k: int, v_local: int, start: int,
                   device, data: Optional[Tensor] = None) -> TPLayout:
    """One all_gather of 4 int64 per rank (8 with ``data``), one host sync; raises ValueError
    on every rank.

    ``data``: this rank's :func:`_validate.data_flags` (largest counted id, NaN log-prob,
    log-prob > 0, largest counted label). Gathered with the layout, so a bad entry in any rank's
    copy of the teacher tensors or labels makes EVERY rank raise - not one rank raising while the
    others wait in the next collective until the group's timeout. The data facts have the same
    size whatever the call's options (no labels: -1), so ranks that disagree on an option still
    gather equal shapes."""
    from . import _validate

    pg = _resolve(group_name)
    world, rank = dist.get_world_size(pg), dist.get_rank(pg)
    coll_device = _collective_device(pg, device)
    mine = torch.tensor([n, k, v_local, start], dtype=torch.int64, device=coll_device)
    if data is not None:
        mine = torch.cat([mine, data.to(device=coll_device, dtype=torch.int64)])
    table = _gather_host_table(mine, world, group_name)  # the host sync
    layout = _layout_from_table([row[:4] for row in table], rank)
    if data is not None:
        for r, row in enumerate(table):
            where = "" if r == rank else f" on rank {r} of tp_group"
            _validate.raise_data_errors(row[4], row[5], row[6], layout.vocab_size, where,
                                        largest_label=row[7])
    return layout


def _traced_layout(group_name: str, v_local: int, start: int) -> tuple:
    """The layout as a plain tuple, a trace-time constant of torch.compile (resolve_layout):
    the cached one, else gathered (with N = K = 0 on every rank: not checked) and cached."""
    key = (group_name, v_local, start)
    layout = _LAYOUT_CACHE.get(key)
    if layout is None:
        layout = _gather_layout(group_name, 0, 0, v_local, start, None)
        _LAYOUT_CACHE[key] = layout
    return tuple(layout)


# Dynamo runs it once while tracing and bakes the result into the graph (guards: the args).
# This is what torch._dynamo.assume_constant_result(fn) does (torch 2.0 to 2.15: it sets this
# attribute and returns fn), written out because importing torch._dynamo to call it costs
# ~1.5 s at `import topk_distill` (issue 27); tests/test_first_use.py checks the two agree, and
# the compile tests in tests/test_tp.py that the compiled graph holds no layout collective.
_traced_layout._dynamo_marked_constant = True
_traced_layout_const = _traced_layout


def resolve_layout(group: Union[str, "dist.ProcessGroup"], n: int, k: int, v_local: int,
                   vocab_start: Optional[int], *, check_inputs: bool = True,
                   device=None, data: Optional[Tensor] = None) -> TPLayout:
    """This call's vocab layout over the group ``group``: this rank's ``vocab_start`` and the
    global V (plus every rank's shard, for the reference).

    * ``check_inputs=True``: every rank all-gathers ``(N, K, V_r, vocab_start)``; ranks that
      disagree on N or K, give ``vocab_start`` on some ranks only, or whose shards do not tile
      ``[0, V)`` all raise the same ``ValueError`` (nobody is left waiting in a collective).
      The result refreshes the cache.
    * ``check_inputs=False``: the layout cached for ``(group, V_r, vocab_start)``; gathered (and
      checked) once on a miss. Every rank must pass the same ``check_inputs`` (it decides whether
      a collective happens), and a rank's shard width must not change while another's cached
      layout stays in use (:func:`clear_layout_cache` on every rank when it does).
    * under ``torch.compile``: a trace-time constant (``torch._dynamo.assume_constant_result``):
      the cached layout, or on a miss one gathered while tracing (every rank traces the same
      call). The compiled graph holds no layout collective and no host sync, only the two
      forward all-reduces - and, like the data checks of ``check_inputs``, no cross-rank N / K
      check (dynamo may trace N symbolically and cannot hand it to a trace-time function). Make
      one eager call with ``check_inputs=True`` to validate a new setup.

    ``vocab_start=None`` on every rank: rank r starts at the sum of the lower ranks' V_r.
    """
    group_name = group_name_of(group)
    start = -1 if vocab_start is None else int(vocab_start)
    v_local = int(v_local)
    if torch.compiler.is_compiling():
        # N and K may be symbolic here (dynamic shapes), and dynamo cannot tell: they stay out of
        # the trace-time constant, so no cross-rank N / K check under compile.
        return TPLayout(*_traced_layout_const(group_name, v_local, start))
    key = (group_name, v_local, start)
    if not check_inputs:
        cached = _LAYOUT_CACHE.get(key)
        if cached is not None:
            return cached
    layout = _gather_layout(group_name, int(n), int(k), v_local, start, device,
                            data if check_inputs else None)
    _LAYOUT_CACHE[key] = layout
    return layout


def vocab_layout(group_name: str, n: int, k: int, v_local: int, vocab_start: Optional[int], *,
                 check_inputs: bool, device=None,
                 data: Optional[Tensor] = None) -> Tuple[int, int]:
    """``(this rank's vocab_start, global vocab size V)``: :func:`resolve_layout`, short form.
    ``data``: :func:`_validate.data_flags`, checked across the ranks with ``check_inputs``."""
    layout = resolve_layout(group_name, n, k, v_local, vocab_start, check_inputs=check_inputs,
                            device=device, data=data)
    return layout.vocab_start, layout.vocab_size


def layout_and_checks(tp_group, n: int, k: int, v_local: int, vocab_start: Optional[int],
                      teacher_ids: Tensor, teacher_logprobs: Tensor, mask: Optional[Tensor], *,
                      check_inputs: bool, device=None, labels: Optional[Tensor] = None,
                      missing_teacher: str = "error",
                      label_logprobs: Tuple[Optional[Tensor], Optional[Tensor]] = (None, None)
                      ) -> Tuple[Optional[str], int, int]:
    """``(group name or None, this rank's vocab_start, global V)`` of a loss call, with its
    ``check_inputs`` data checks (``[N, K]`` ids / log-probs, ``[N]`` mask and labels, and the
    sampled support's ``label_logprobs`` = (label_teacher_logprobs, label_sample_logprobs) [N];
    a NaN log-prob is an error only with ``missing_teacher="error"``).

    Without a group: V = V_r and the data are checked locally (one host sync). With one: the
    data-check facts ride in the layout all_gather (:func:`resolve_layout`), so a bad entry in any
    rank's copy of the teacher tensors makes every rank raise. Under ``torch.compile`` the data
    are not checked (that would be a host sync)."""
    from . import _validate

    checked = check_inputs and not torch.compiler.is_compiling()
    if tp_group is None:
        if checked:
            _validate.check_data(teacher_ids, teacher_logprobs, v_local, mask, labels=labels,
                                 missing_teacher=missing_teacher,
                                 label_teacher_logprobs=label_logprobs[0],
                                 label_sample_logprobs=label_logprobs[1])
        return None, 0, v_local
    group_name = group_name_of(tp_group)
    data = (_validate.data_flags(teacher_ids, teacher_logprobs, mask, labels=labels,
                                 missing_teacher=missing_teacher,
                                 label_teacher_logprobs=label_logprobs[0],
                                 label_sample_logprobs=label_logprobs[1])
            if checked else None)
    start, vocab_size = vocab_layout(group_name, n, k, v_local, vocab_start,
                                     check_inputs=check_inputs, device=device, data=data)
    return group_name, start, vocab_size


def combine_shard_stats(row_max: Tensor, sums: Tensor, gathered: Tensor, group_name: str,
                        with_entropy: bool = False) -> Tuple[Tensor, Tensor, Tensor]:
    """Each rank's shard statistics -> the global ones, with exactly two all-reduces.

    ``row_max`` [N], ``sums`` [N, 5] (csrc/registration.cpp: rest, teach, dup relative to this
    shard's row max, the count of distinct teacher columns, the entropy sum), ``gathered``
    [N, K (+1 with labels)] (teacher / label logits in this shard, 0 elsewhere), all in the
    accumulation dtype. The sums of exp are rescaled by e^(m - M) to the global max M; the
    entropy sum S2 = sum e (z/T - m) by (S2 + (m - M) S1) e^(m - M) with S1 = rest + teach, the
    sum over all of the shard's columns (SPEC 9.2); the column count is a plain count.
    """
    global_max = _all_reduce(row_max, "max", group_name)
    # A shard whose row is all -inf adds 0 (and m - M would be -inf - -inf = NaN there).
    empty = row_max == float("-inf")
    delta = torch.where(empty, torch.zeros_like(row_max), row_max - global_max)
    scale = torch.where(empty, torch.zeros_like(row_max), torch.exp(delta))
    parts = [sums[:, :3] * scale.unsqueeze(1), sums[:, 3:4]]
    if with_entropy:
        s1 = sums[:, 0] + sums[:, 1]
        parts.append(((sums[:, 4] + delta * s1) * scale).unsqueeze(1))
    else:
        parts.append(sums[:, 4:5])
    packed = _all_reduce(torch.cat(parts + [gathered], dim=1), "sum", group_name)
    return global_max, packed[:, :5].contiguous(), packed[:, 5:].contiguous()


def merge_topk(values: Tensor, ids: Tensor, group_name: str) -> Tuple[Tensor, Tensor]:
    """Every rank's top-k ``(values [N, k], global ids [N, k])`` -> the top-k of the whole vocab,
    identical on every rank, with ONE all_gather of the k (value, id) pairs per row (packed as
    float64: ids below 2^53 and fp32 / fp64 values are exact in it). Larger value first (NaN
    above everything), then lower id; a rank's padding (-inf, id -1) ranks last."""
    n, k = values.shape
    world = dist.get_world_size(_resolve(group_name))
    mine = torch.cat([values.to(torch.float64), ids.to(torch.float64)], dim=1)
    table = _all_gather(mine, world, group_name).view(world, n, 2 * k)
    all_values = table[:, :, :k].permute(1, 0, 2).reshape(n, world * k).to(values.dtype)
    all_ids = table[:, :, k:].permute(1, 0, 2).reshape(n, world * k).to(torch.int64)
    # Two stable sorts: by id ascending (padding, -1, treated as the largest id), then by value
    # descending - equal values keep the lower id first.
    key = torch.where(all_ids < 0, torch.full_like(all_ids, 2 ** 62), all_ids)
    by_id = torch.sort(key, dim=1, stable=True).indices
    v1 = all_values.gather(1, by_id)
    by_value = torch.sort(v1, dim=1, descending=True, stable=True).indices[:, :k]
    order = by_id.gather(1, by_value)
    return all_values.gather(1, order), all_ids.gather(1, order)


def communication_bytes(n: int, k: int, world_size: int, *, acc_bytes: int = 4,
                        check_inputs: bool = True, labels: bool = False,
                        student_topk: int = 0) -> Dict[str, int]:
    """What each rank contributes to the collectives of one forward call, in bytes (the backward
    sends nothing).

    ``acc_bytes`` is 4 (fp32 / bf16 / fp16 logits) or 8 (fp64 logits). Keys: ``all_reduce_max``
    (N values), ``all_reduce_sum`` (N * (5 + K) values: the five shard sums, the K gathered
    teacher logits, and one more column with ``labels``; the entropy rides in the sums), with
    ``student_topk=k`` also ``all_gather_topk`` (N * 2k float64: the k (value, id) pairs per row;
    every rank receives W times that), with ``check_inputs`` also ``all_gather_check`` (8 int64 =
    64 bytes: N, K, V_r, vocab_start and the four data-check facts - largest teacher id, any NaN
    log-prob, any positive log-prob, largest label (-1 without labels); every rank receives the
    64 * W byte table), and ``collectives`` (how many: 2, +1 with ``check_inputs``, +1 with
    ``student_topk``). On the wire a ring all-reduce of B bytes moves about 2 * (W - 1) / W * B per
    rank. With ``check_inputs=False`` the first call on a group also makes the layout gather once,
    4 int64 without the data facts (it is then cached). ``world_size`` is accepted for symmetry;
    no payload depends on it.
    """
    out = {
        "all_reduce_max": n * acc_bytes,
        "all_reduce_sum": n * (5 + k + int(labels)) * acc_bytes,
    }
    if student_topk:
        out["all_gather_topk"] = n * 2 * student_topk * 8
    if check_inputs:
        out["all_gather_check"] = 8 * 8
    out["collectives"] = len(out)
    return out
