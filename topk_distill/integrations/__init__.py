"""Entry points that fill ``tp_group`` and ``vocab_start`` from a framework's own bookkeeping.

* :func:`megatron_topk_distill_loss` - Megatron-Core: the tensor-model-parallel group of
  ``megatron.core.parallel_state`` and the vocab range of ``VocabUtility`` (megatron-core is
  imported only when the function is called).
* :func:`dtensor_topk_distill_loss` - a ``DTensor`` of logits sharded ``Shard(-1)`` over a 1-D
  device mesh, or over the tensor-parallel dimension of a larger mesh.
* :mod:`topk_distill.integrations.verl` - drop-ins for verl 0.9.1's FSDP and Megatron
  ``compute_forward_kl_topk`` and :func:`patch_verl` (verl is imported only when called).
* :mod:`topk_distill.integrations.trl` - :func:`~topk_distill.integrations.trl.patch_trl` puts
  TRL 1.16.0's ``ServerDistillationTrainer`` / ``AsyncDistillationTrainer`` losses on these
  kernels (import the submodule; trl is imported only by ``patch_trl``).

The first two call :func:`topk_distill.topk_distill_loss` with ``tp_group`` set (docs/TP.md).
"""
from .dtensor import dtensor_topk_distill_loss
from .megatron import MegatronTopKDistillLoss, megatron_tp_layout, megatron_topk_distill_loss
from .verl import (fsdp_compute_forward_kl_topk, megatron_compute_forward_kl_topk, patch_verl,
                   unpatch_verl)

__all__ = ["dtensor_topk_distill_loss", "megatron_topk_distill_loss", "megatron_tp_layout",
           "MegatronTopKDistillLoss", "fsdp_compute_forward_kl_topk",
           "megatron_compute_forward_kl_topk", "patch_verl", "unpatch_verl"]
