"""DTensor entry point: logits sharded ``Shard(-1)`` (the vocab) over a device mesh.

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    from topk_distill.integrations.dtensor import dtensor_topk_distill_loss

    mesh = init_device_mesh("cuda", (tp,))
    logits = lm_head_output                                    # DTensor, placements (Shard(-1),)
    out = dtensor_topk_distill_loss(logits, teacher_ids, teacher_logprobs, loss="fkl")
    out.loss.backward()                                        # logits.grad: a DTensor, Shard(-1)

The tensor-parallel group is the mesh's group along the dimension where the logits are
``Shard(-1)`` (found automatically; or name it with ``mesh_dim=``); ``vocab_start`` is the global
offset of the local shard (DTensor's uneven ``torch.chunk`` split is supported: V = 37 over 4
ranks is 10/10/10/7). On a larger mesh the other dimensions may ``Replicate`` the logits or
``Shard`` a leading (row) dimension - e.g. ``(Shard(0), Shard(-1))`` on a (dp, tp) mesh; the
teacher tensors (plain tensors or DTensors) then hold this rank's rows, replicated over the TP
dimension. ``Partial`` logits are rejected (reduce them first).

Returns a :class:`~topk_distill.TopKDistillOutput` of plain tensors: the loss of this rank's
rows, identical on every rank of the TP group; its gradient flows back into the DTensor through
``to_local()``. Every keyword of :func:`topk_distill.topk_distill_loss` except ``tp_group`` /
``vocab_start`` is passed through.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from .. import _validate
from .._types import TopKDistillOutput
from ..losses import topk_distill_loss

__all__ = ["dtensor_topk_distill_loss"]


def _local(name: str, t, tp_dim: int):
    """A plain local tensor from a teacher/mask argument (DTensor: must replicate over TP)."""
    from torch.distributed.tensor import DTensor, Replicate

    if t is None or not isinstance(t, DTensor):
        return t
    if not isinstance(t.placements[tp_dim], Replicate):
        raise ValueError(f"{name} must be replicated over the tensor-parallel mesh dimension "
                         f"{tp_dim}; got placements {t.placements}")
    return t.to_local()


def _tp_mesh_dim(logits, mesh_dim: Union[None, int, str]) -> int:
    from torch.distributed.tensor import Partial, Shard

    vocab_dim = logits.ndim - 1
    mesh = logits.device_mesh
    placements = logits.placements

    def is_vocab_shard(p):
        return isinstance(p, Shard) and p.dim % logits.ndim == vocab_dim

    for i, p in enumerate(placements):
        if isinstance(p, Partial):
            raise ValueError(f"logits: Partial placements are not supported (mesh dim {i}); "
                             f"reduce them first; got {placements}")
    vocab_dims = [i for i, p in enumerate(placements) if is_vocab_shard(p)]
    if mesh_dim is not None:
        if isinstance(mesh_dim, str):
            names = mesh.mesh_dim_names or ()
            if mesh_dim not in names:
                raise ValueError(f"mesh_dim={mesh_dim!r} is not a dimension of the device mesh "
                                 f"(names {names})")
            mesh_dim = names.index(mesh_dim)
        if not (0 <= mesh_dim < mesh.ndim) or not is_vocab_shard(placements[mesh_dim]):
            raise ValueError(f"logits must be Shard(-1) on mesh_dim={mesh_dim}; got placements "
                             f"{placements}")
        vocab_dims = [mesh_dim] + [d for d in vocab_dims if d != mesh_dim]
    if len(vocab_dims) != 1:
        raise ValueError(f"logits must be sharded along the vocab (last) dimension, Shard(-1), "
                         f"on exactly one mesh dimension; got placements {placements}")
    return vocab_dims[0]


def _vocab_start(logits) -> Optional[int]:
    """Global offset of the local vocab shard, from DTensor's own sharding rule."""
    try:
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    except ImportError:  # pragma: no cover - other torch versions: the default layout
        return None
    _shape, offset = compute_local_shape_and_global_offset(logits.shape, logits.device_mesh,
                                                           logits.placements)
    return int(offset[-1])


def dtensor_topk_distill_loss(logits, teacher_ids: Tensor, teacher_logprobs: Tensor, *,
                              mesh_dim: Union[None, int, str] = None,
                              mask: Optional[Tensor] = None, **kwargs) -> TopKDistillOutput:
    """:func:`topk_distill.topk_distill_loss` on a ``DTensor`` of logits sharded ``Shard(-1)``.

    Args:
        logits: ``DTensor`` ``[..., V]`` sharded over the vocab on one mesh dimension.
        teacher_ids, teacher_logprobs, mask: this rank's rows (plain tensors, or DTensors
            replicated over the TP mesh dimension); so may be ``labels``,
            ``label_teacher_logprobs`` and ``label_sample_logprobs`` in ``kwargs``.
        mesh_dim: the TP mesh dimension (index or name); default: the one where the logits are
            ``Shard(-1)``.
    """
    from torch.distributed.tensor import DTensor

    if not isinstance(logits, DTensor):
        raise TypeError(f"logits must be a torch.distributed.tensor.DTensor; got "
                        f"{type(logits).__name__} (use topk_distill.topk_distill_loss for plain "
                        f"tensors)")
    for bad in ("tp_group", "vocab_start"):
        if bad in kwargs:
            raise TypeError(f"{bad} comes from the DTensor's device mesh; do not pass it")
    # On the DTensor itself: its to_local() is a view of no leaf, whatever the DTensor is.
    _validate.check_inplace_backward(logits, kwargs.get("inplace_backward"))
    tp_dim = _tp_mesh_dim(logits, mesh_dim)
    group = logits.device_mesh.get_group(tp_dim)
    local = logits.to_local()  # differentiable: the gradient comes back as a Shard(-1) DTensor
    for name in ("labels", "label_teacher_logprobs", "label_sample_logprobs"):  # per-row tensors
        if kwargs.get(name) is not None:
            kwargs[name] = _local(name, kwargs[name], tp_dim)
    return topk_distill_loss(local, _local("teacher_ids", teacher_ids, tp_dim),
                             _local("teacher_logprobs", teacher_logprobs, tp_dim),
                             mask=_local("mask", mask, tp_dim), tp_group=group,
                             vocab_start=_vocab_start(logits), **kwargs)
