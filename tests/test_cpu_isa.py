"""Every CPU code path against the float64 reference: the AVX2 loops (the default where the CPU
has AVX2), the AVX loops (TOPK_DISTILL_CPU_NO_AVX2=1) and the scalar loops
(TOPK_DISTILL_CPU_SCALAR=1). The path is chosen once per process, so each runs in a subprocess."""
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

SCRIPT = r"""
import sys, torch
sys.path.insert(0, "tests")
import topk_distill as td
from topk_distill import reference
from _inputs import assert_close, teacher_batch
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    for loss, support, t in (("fkl", "topk", 1.0), ("jsd", "tail", 1.7), ("srkl", "renorm", 0.8)):
        z, ids, lp = teacher_batch(12, 203, 9, seed=5)  # V not a multiple of 8: the tails too
        x = z.to(dtype).requires_grad_(True)
        out = td.topk_distill_loss(x, ids, lp, loss=loss, support=support, temperature=t,
                                   reduction="none")
        (g,) = torch.autograd.grad(out.loss.sum(), x)
        xr = x.detach().double().requires_grad_(True)
        ref = reference.topk_distill_loss(xr, ids, lp, loss=loss, support=support, temperature=t,
                                          reduction="none")
        (gr,) = torch.autograd.grad(ref.loss.sum(), xr)
        assert_close(out.loss, ref.loss, torch.float32, f"{dtype} {loss} loss")
        assert_close(g, gr, dtype, f"{dtype} {loss} grad")
print("ok")
"""


@pytest.mark.parametrize("env", [{}, {"TOPK_DISTILL_CPU_NO_AVX2": "1"},
                                 {"TOPK_DISTILL_CPU_SCALAR": "1"}],
                         ids=["default", "avx", "scalar"])
def test_cpu_code_path_matches_reference(env):
    run_env = dict(os.environ, **env)
    run_env["PYTHONPATH"] = str(ROOT) + os.pathsep + run_env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=run_env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
