"""Tensor-parallel bookkeeping and collectives (Megatron-style vocab sharding).

Rank r of a group of W ranks holds the vocab columns ``[vocab_start, vocab_start + V_r)``
(Megatron-Core's ``VocabUtility`` vocabulary); teacher tensors are replicated. Per loss call:

* forward - two collectives on [N]- and [N, 3 + K]-sized tensors:
  ``all_reduce(MAX)`` of the row max, then ``all_reduce(SUM)`` of the packed
  ``[rescaled sums | gathered teacher logits]`` (each teacher logit is non-zero on exactly one
  rank, so the SUM assembles it exactly). With ``check_inputs=True`` one more small
  ``all_gather`` of ``(N, K, V_r, vocab_start)`` per rank comes first, so that ranks that
  disagree on shapes all raise instead of hanging in a mismatched collective.
* backward - no communication.

Collectives go through ``torch.ops._c10d_functional`` with the group's *name*, so the whole
call stays traceable by ``torch.compile``; they work with NCCL and gloo.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple, Union

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "group_name_of",
    "vocab_layout",
    "combine_shard_stats",
    "communication_bytes",
]

# (group name, V_r, vocab_start or -1) -> (vocab_start, global vocab size). The layout of a model
# does not change between steps; with check_inputs=False it is learned once, then no collective.
_LAYOUT_CACHE: Dict[Tuple[str, int, int], Tuple[int, int]] = {}


def group_name_of(group: Union[str, "dist.ProcessGroup"]) -> str:
    """The registered name of a process group (accepts the name itself)."""
    if isinstance(group, str):
        return group
    if isinstance(group, dist.ProcessGroup):
        return group.group_name
    raise TypeError(f"tp_group must be a torch.distributed.ProcessGroup or its name (str); got "
                    f"{type(group).__name__}")


def _resolve(group_name: str) -> "dist.ProcessGroup":
    from torch.distributed.distributed_c10d import _resolve_process_group

    return _resolve_process_group(group_name)


def _all_reduce(t: Tensor, op: str, group_name: str) -> Tensor:
    out = torch.ops._c10d_functional.all_reduce(t, op, group_name)
    return torch.ops._c10d_functional.wait_tensor(out)


def _all_gather(t: Tensor, world_size: int, group_name: str) -> Tensor:
    out = torch.ops._c10d_functional.all_gather_into_tensor(t, world_size, group_name)
    return torch.ops._c10d_functional.wait_tensor(out)


def vocab_layout(group_name: str, n: int, k: int, v_local: int, vocab_start: Optional[int], *,
                 check_inputs: bool) -> Tuple[int, int]:
    """(this rank's vocab_start, global vocab size V) for a call.

    With ``check_inputs`` every rank all-gathers ``(N, K, V_r, vocab_start)`` and every rank
    raises the same ``ValueError`` when they disagree. Without it the layout is cached per
    (group, V_r, vocab_start) after one gather.
    """
    key = (group_name, int(v_local), -1 if vocab_start is None else int(vocab_start))
    if not check_inputs and key in _LAYOUT_CACHE:
        return _LAYOUT_CACHE[key]
    pg = _resolve(group_name)
    world, rank = dist.get_world_size(pg), dist.get_rank(pg)
    device = torch.device("cpu")
    if dist.get_backend(pg) == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    mine = torch.tensor([n, k, v_local, -1 if vocab_start is None else vocab_start],
                        dtype=torch.int64, device=device)
    table = _all_gather(mine, world, group_name).view(world, 4).tolist()
    ns = [row[0] for row in table]
    ks = [row[1] for row in table]
    widths = [row[2] for row in table]
    starts = [row[3] for row in table]
    if len(set(ns)) != 1:
        raise ValueError(f"tp_group ranks disagree on the number of rows N (rank: N) "
                         f"{dict(enumerate(ns))}; every rank must pass the same tokens")
    if len(set(ks)) != 1:
        raise ValueError(f"tp_group ranks disagree on K, the number of teacher entries per row "
                         f"(rank: K) {dict(enumerate(ks))}; teacher tensors must be replicated")
    vocab_size = sum(widths)
    if all(s < 0 for s in starts):
        starts = [sum(widths[:r]) for r in range(world)]
    elif any(s < 0 for s in starts):
        raise ValueError("vocab_start must be given on every rank of tp_group or on none")
    spans = sorted((s, s + w) for s, w in zip(starts, widths))
    if spans[0][0] != 0 or any(a[1] != b[0] for a, b in zip(spans, spans[1:])):
        raise ValueError(f"vocab_start and the shard widths of tp_group must tile [0, V) "
                         f"without gaps or overlaps; got (rank: [start, end)) "
                         f"{ {r: (s, s + w) for r, (s, w) in enumerate(zip(starts, widths))} }")
    result = (starts[rank], vocab_size)
    _LAYOUT_CACHE[key] = result
    return result


def combine_shard_stats(row_max: Tensor, sums: Tensor, gathered: Tensor,
                        group_name: str) -> Tuple[Tensor, Tensor, Tensor]:
    """Turns each rank's shard statistics into the global ones (two all-reduces)."""
    global_max = _all_reduce(row_max, "max", group_name)
    # exp(local - global) rescales this shard's sums; a shard whose row is all -inf adds 0.
    scale = torch.where(row_max == float("-inf"), torch.zeros_like(row_max),
                        torch.exp(row_max - global_max))
    packed = torch.cat([sums * scale.unsqueeze(1), gathered], dim=1)
    packed = _all_reduce(packed, "sum", group_name)
    return global_max, packed[:, :3].contiguous(), packed[:, 3:].contiguous()


def communication_bytes(n: int, k: int, world_size: int, *, acc_bytes: int = 4,
                        check_inputs: bool = True) -> Dict[str, int]:
    """Payload of one forward call per rank (the backward sends nothing).

    Returns the collectives' payload sizes in bytes (what each rank contributes; a ring
    all-reduce moves about 2 * (W - 1) / W times that over the wire per rank).
    """
    out = {
        "all_reduce_max": n * acc_bytes,
        "all_reduce_sum": n * (3 + k) * acc_bytes,
    }
    if check_inputs:
        out["all_gather_check"] = 4 * 8 * world_size
    out["collectives"] = len(out)
    return out
