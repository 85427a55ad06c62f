"""topk-distill: distillation losses against a top-k teacher, with fused kernels.

    import topk_distill as td
    out = td.topk_distill_loss(logits, teacher_ids, teacher_logprobs, loss="jsd")
    out.loss.backward()

See README.md and docs/SPEC.md. The kernels are ``torch.ops.topk_distill.*``.
"""
import os as _os
import re as _re

import torch as _torch

# SPEC 10.1: the torch releases this package is tested with (docs/BUILD.md, "Tested with"); the
# floor is pyproject.toml's `torch>=` too. Older torch lacks APIs the package uses, and its
# extension would fail to load with a less clear message.
TORCH_FLOOR = (2, 9)
TESTED_TORCH = "2.9.1, 2.10.0, 2.11.0, 2.14.1 and 2.15.0"


def _check_torch_version(version: str) -> None:
    """ImportError naming the supported range when ``version`` (``torch.__version__``) is older
    than the floor; local suffixes (``+cu130``) and pre-releases are read by their release."""
    m = _re.match(r"(\d+)\.(\d+)", str(version))
    if m is None or (int(m.group(1)), int(m.group(2))) < TORCH_FLOOR:
        raise ImportError(
            f"topk_distill needs torch >= {TORCH_FLOOR[0]}.{TORCH_FLOOR[1]} (tested with torch "
            f"{TESTED_TORCH}, docs/BUILD.md); this is torch {version}. Upgrade torch, then "
            f"rebuild: pip install --no-build-isolation .")


_check_torch_version(_torch.__version__)


def _load_kernels():
    # TOPK_DISTILL_LIBRARY points at a library built another way (e.g. the CMake build).
    path = _os.environ.get("TOPK_DISTILL_LIBRARY")
    if path:
        _torch.ops.load_library(path)
        return None
    try:
        from . import _C
    except ImportError as e:  # pragma: no cover - a build problem, not a test case
        raise ImportError(
            "topk_distill's compiled kernels (topk_distill._C) could not be loaded: " + str(e) +
            ". Build them with `make build` (or `pip install --no-build-isolation .`).") from e
    return _C


_C = _load_kernels()

from . import ops, parallel, reference  # noqa: E402
from ._types import Term, TopKDistillOutput  # noqa: E402
from .losses import TopKDistillLoss, student_topk, topk_distill_loss  # noqa: E402
from .fused_linear import FusedLinearTopKDistillLoss, fused_linear_topk_distill_loss  # noqa: E402

__all__ = ["topk_distill_loss", "TopKDistillLoss", "TopKDistillOutput", "Term", "student_topk",
           "reference", "ops", "parallel", "fused_linear_topk_distill_loss",
           "FusedLinearTopKDistillLoss"]
__version__ = "0.1.0"
