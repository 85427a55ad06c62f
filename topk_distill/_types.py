"""Types shared by the kernel-backed API and the pure-PyTorch reference."""
from typing import NamedTuple

import torch


class TopKDistillOutput(NamedTuple):
    """What a loss call returns.

    loss:          the reduced loss (``reduction``), or per-row with ``reduction="none"``.
    student_mass:  per row, sum of the student's probabilities on the valid teacher ids (fp32).
    teacher_mass:  per row, sum of the teacher's probabilities on its valid ids (fp32).
    """

    loss: torch.Tensor
    student_mass: torch.Tensor
    teacher_mass: torch.Tensor
