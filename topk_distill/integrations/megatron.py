"""Megatron-Core entry point: the loss on a vocab-parallel logits shard, group and range filled in.

    from topk_distill.integrations.megatron import megatron_topk_distill_loss

    logits = model(tokens, position_ids, attention_mask)       # GPTModel, labels=None: [b, s, V_r]
    out = megatron_topk_distill_loss(logits, teacher_ids, teacher_logprobs,   # [b, s, K] each
                                     loss="jsd", beta=0.5, mask=loss_mask.bool())
    out.loss.backward()

It uses the tensor-model-parallel group of ``megatron.core.parallel_state`` and the vocab range of
``megatron.core.tensor_parallel.utils.VocabUtility`` (``rank * V_r``: Megatron's shards are
equal-sized, its vocab padded to a multiple of the TP size), i.e. exactly the bookkeeping of
Megatron's own ``vocab_parallel_cross_entropy``. With a TP size of 1 no group is used (no
collectives). ``tp_group=`` / ``vocab_start=`` given explicitly win over Megatron's.

megatron-core is imported only when a function here is called (importing topk_distill never
needs it). Tested against the real ``megatron-core`` 0.16.1 (``initialize_model_parallel`` on
gloo/CPU) when it is installed, and always against a small stand-in with its documented API.

Padded vocab columns (Megatron pads V up to a multiple of ``make_vocab_size_divisible_by * TP``)
are part of the student's softmax, as they are in Megatron's own cross-entropy; teacher ids must
be < the padded V.
"""
from __future__ import annotations

from typing import Optional, Tuple

from torch import Tensor, nn

from .._types import TopKDistillOutput
from ..losses import topk_distill_loss

__all__ = ["megatron_tp_layout", "megatron_topk_distill_loss", "MegatronTopKDistillLoss"]


def megatron_tp_layout(local_vocab_size: int) -> Tuple[Optional[object], Optional[int]]:
    """``(tp_group, vocab_start)`` of this rank from Megatron-Core's parallel state.

    ``(None, None)`` when the tensor-model-parallel size is 1. Raises ``ImportError`` when
    megatron-core is not installed and ``RuntimeError`` when its model parallelism is not
    initialised (``parallel_state.initialize_model_parallel``).
    """
    try:
        from megatron.core import parallel_state
        from megatron.core.tensor_parallel.utils import VocabUtility
    except ImportError as err:
        raise ImportError("megatron_topk_distill_loss needs megatron-core (pip install "
                          "megatron-core); or call topk_distill.topk_distill_loss with tp_group= "
                          "and vocab_start= yourself") from err
    group = parallel_state.get_tensor_model_parallel_group(check_initialized=False)
    if group is None:
        raise RuntimeError("Megatron-Core's tensor model parallel group is not initialised; call "
                           "megatron.core.parallel_state.initialize_model_parallel(...) first")
    world = parallel_state.get_tensor_model_parallel_world_size()
    if world == 1:
        return None, None
    rank = parallel_state.get_tensor_model_parallel_rank()
    first, _last = VocabUtility.vocab_range_from_per_partition_vocab_size(
        int(local_vocab_size), rank, world)
    return group, int(first)


def megatron_topk_distill_loss(logits_shard: Tensor, teacher_ids: Tensor,
                               teacher_logprobs: Tensor, *, tp_group=None,
                               vocab_start: Optional[int] = None, **kwargs) -> TopKDistillOutput:
    """:func:`topk_distill.topk_distill_loss` on Megatron's vocab-parallel logits ``[..., V_r]``.

    ``teacher_ids`` / ``teacher_logprobs`` ``[..., K]`` are replicated on the TP ranks and laid
    out like the logits (GPTModel returns ``[b, s, V_r]`` when ``labels`` is None; the
    output layer itself gives ``[s, b, V_r]``). Every other keyword is passed through.
    """
    if tp_group is None:
        tp_group, megatron_start = megatron_tp_layout(logits_shard.shape[-1])
        if vocab_start is None:
            vocab_start = megatron_start
    return topk_distill_loss(logits_shard, teacher_ids, teacher_logprobs, tp_group=tp_group,
                             vocab_start=vocab_start, **kwargs)


class MegatronTopKDistillLoss(nn.Module):
    """``nn.Module`` form; the group is looked up at each call (so the module can be built before
    ``initialize_model_parallel``). Same keywords as :class:`topk_distill.TopKDistillLoss`."""

    def __init__(self, **kwargs):
        super().__init__()
        from .._validate import validate_options

        validate_options(**{k: v for k, v in kwargs.items()
                            if k not in ("tp_group", "vocab_start")})
        self.kwargs = kwargs

    def forward(self, logits_shard: Tensor, teacher_ids: Tensor, teacher_logprobs: Tensor,
                mask: Optional[Tensor] = None) -> TopKDistillOutput:
        return megatron_topk_distill_loss(logits_shard, teacher_ids, teacher_logprobs, mask=mask,
                                          **self.kwargs)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items() if k != "tp_group")
