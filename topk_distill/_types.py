"""Types shared by the kernel-backed API and the pure-PyTorch reference."""
from typing import NamedTuple, Optional

import torch


class Term(NamedTuple):
    """One term of a loss mixture (SPEC 9.3): ``loss=[Term("fkl", "topk", 0.9),
    Term("rkl", "renorm", 0.1)]`` computes ``0.9 * fkl/topk + 0.1 * rkl/renorm`` per row.

    loss:       fkl | rkl | jsd | fkl+rkl | tvd | skl | srkl
    support:    topk | renorm | tail
    weight:     a finite real number; 0 drops the term exactly (it is never computed)
    beta, rkl_ratio, skew: this term's JSD weight, fkl+rkl mix and skew-KL lambda, in [0, 1]

    A plain tuple ``(loss,)``, ``(loss, support)`` or ``(loss, support, weight)`` is accepted
    wherever a Term is (it is read as ``Term(*tuple)``).
    """

    loss: str
    support: str = "topk"
    weight: float = 1.0
    beta: float = 0.5
    rkl_ratio: float = 0.1
    skew: float = 0.1


class TopKDistillOutput(NamedTuple):
    """What a loss call returns (SPEC 6, 9.6). Read the fields by name.

    loss:          the reduced loss (``reduction``), or per-row with ``reduction="none"``.
    student_mass:  per row, sum of the student's probabilities on the valid teacher ids (fp32).
    teacher_mass:  per row, sum of the teacher's probabilities on its valid ids (fp32).
    label_logprobs: per row, ``z_y / T - LSE`` (``labels=``; differentiable, never reduced).
    entropy:       per row, ``-sum_v q_v log q_v`` (``return_entropy=True``; differentiable).
    student_topk_ids, student_topk_logprobs: ``[..., k]`` the student's own top-k
                   (``student_topk=k``; int64 / fp32, no gradient).
    overlap_count, overlap_token_advantage: per row, verl's teacher/student overlap
                   diagnostics (``student_topk=k``; int64 / fp32, no gradient).
    The fields after ``teacher_mass`` are ``None`` when not requested.
    """

    loss: torch.Tensor
    student_mass: torch.Tensor
    teacher_mass: torch.Tensor
    label_logprobs: Optional[torch.Tensor] = None
    entropy: Optional[torch.Tensor] = None
    student_topk_ids: Optional[torch.Tensor] = None
    student_topk_logprobs: Optional[torch.Tensor] = None
    overlap_count: Optional[torch.Tensor] = None
    overlap_token_advantage: Optional[torch.Tensor] = None
