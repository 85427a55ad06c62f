"""Input builders and comparison helpers shared by the kernel test files."""
from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch

LOSSES = ["fkl", "rkl", "jsd", "fkl+rkl", "tvd", "skl", "srkl"]
SUPPORTS = ["topk", "renorm", "tail"]

# Where the kernel-backed API runs in parametrised tests: the CPU kernels, the CUDA kernels under
# the CUDA emulator (CPU tensors, "cuda_emu": tests/conftest.py selects the emulated backend for
# the test's duration), and a real GPU when there is one.
DEVICES = ["cpu", "cuda_emu"] + (["cuda"] if torch.cuda.is_available() else [])


def tdev(device: str) -> str:
    """The torch device of a test device name ("cuda_emu" tensors live on the CPU)."""
    return "cpu" if device == "cuda_emu" else device


@contextlib.contextmanager
def emulated_cuda_ran():
    """``with emulated_cuda_ran() as ran: ...; ran()`` - what the CUDA emulator ran inside the
    block (launches, blocks, threads, barriers, warp collectives), for tests that must prove the
    emulated kernels really ran."""
    import topk_distill._C as C

    before = C._emu_stats()
    yield lambda: {k: v - before[k] for k, v in C._emu_stats().items()}


def teacher_batch(n: int, v: int, k: int, *, seed: int = 0, scale: float = 2.0,
                  special_rows: bool = True, logits_dtype=torch.float64, device="cpu",
                  teacher_scale: Optional[float] = None):
    """Student logits [n, v], teacher top-k ids [n, k] and their log-probs.

    The teacher is the top-k of a random distribution correlated with the student (so
    divergences are moderate, as in training). With ``special_rows`` (n >= 6):
      row 0: ids at local column 0 and at the last column    row 1: a padding entry
      row 2: a duplicated id                                 row 3: all padding
      row 4: a teacher log-prob of -inf                      row 5: teacher covers ~all mass
    """
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, v, generator=g, dtype=torch.float64) * scale
    ts = scale if teacher_scale is None else teacher_scale
    t_logits = 0.6 * z + torch.randn(n, v, generator=g, dtype=torch.float64) * ts
    t_logp = torch.log_softmax(t_logits, -1)
    kk = min(k, v)
    ids = t_logp.topk(kk, dim=-1).indices
    if k > v:  # K > V: pad with repeats of valid ids and padding
        extra = torch.randint(0, v, (n, k - v), generator=g)
        extra[:, ::2] = -1
        ids = torch.cat([ids, extra], dim=1)
    lp = t_logp.gather(-1, ids.clamp_min(0))
    if special_rows and n >= 6:
        ids[0, 0], ids[0, -1] = 0, v - 1
        lp[0, 0], lp[0, -1] = t_logp[0, 0], t_logp[0, v - 1]
        ids[1, -1] = -1
        if k >= 2:
            ids[2, 1] = ids[2, 0]
            lp[2, 1] = lp[2, 0]
        ids[3, :] = -1
        lp[4, -1] = -math.inf
        z[5] = z[5] * 0.1
        z[5, ids[5].clamp_min(0)] += 12.0
    lp = torch.where(ids >= 0, lp, torch.zeros_like(lp))
    device = tdev(device)
    return z.to(device=device, dtype=logits_dtype), ids.to(device), lp.to(device)


def tolerances(dtype: torch.dtype):
    """(rtol, atol) for comparing a kernel result in ``dtype`` against the float64 oracle."""
    if dtype == torch.float64:
        return 1e-10, 1e-12
    if dtype == torch.float32:
        return 2e-5, 2e-6
    return 2e-2, 2e-3  # bf16 / fp16 outputs (gradients are rounded to the logits' dtype)


def assert_close(actual, expected, dtype, what=""):
    rtol, atol = tolerances(dtype)
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), rtol=rtol,
                               atol=atol, equal_nan=True, msg=lambda m: f"{what}: {m}")


def assert_close_rowwise(actual, expected, dtype, what=""):
    """Like assert_close, but each row's absolute tolerance also scales with that row's largest
    expected magnitude: the right yardstick for gradients of rows whose terms are huge (teacher
    log-probs of -1e30), where both sides carry rounding noise of size eps * max|row|."""
    rtol, atol = tolerances(dtype)
    a, e = actual.double().cpu(), expected.double().cpu()
    finite = torch.where(torch.isfinite(e), e.abs(), torch.zeros_like(e))
    scale = finite.amax(-1, keepdim=True) if e.dim() > 1 else finite.amax()
    tol = atol + rtol * e.abs().nan_to_num(posinf=0, neginf=0) + rtol * scale
    same_nan = torch.isnan(a) == torch.isnan(e)
    ok = same_nan & (torch.isnan(e) | (a == e) | ((a - e).abs() <= tol))
    assert bool(ok.all()), (f"{what}: {int((~ok).sum())} of {ok.numel()} elements differ; first at "
                            f"{(~ok).nonzero()[0].tolist()}: {a[~ok][0].item()} vs {e[~ok][0].item()}")
