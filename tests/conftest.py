"""pytest configuration shared by the test files.

A test parametrised with ``device="cuda_emu"`` (tests/_inputs.py DEVICES) runs the kernel-backed
API through the CUDA kernels under the CUDA emulator: its tensors live on the CPU and the
``emulated_cuda`` backend (topk_distill.ops) is selected for the test's duration here.
"""
import pytest

from topk_distill import ops


@pytest.fixture(autouse=True)
def _emulated_cuda_for_cuda_emu_tests(request):
    callspec = getattr(request.node, "callspec", None)
    device = callspec.params.get("device") if callspec is not None else None
    if device == "cuda_emu":
        with ops.use_backend("emulated_cuda"):
            yield
    else:
        yield
