"""pytest configuration shared by the test files.

A test parametrised with ``device="cuda_emu"`` (tests/_inputs.py DEVICES), or with
``backend="emulated_cuda"``, runs the kernel-backed API through the CUDA kernels under the CUDA
emulator: its tensors live on the CPU and the ``emulated_cuda`` backend (topk_distill.ops) is
selected here for the test's duration.
"""
import pytest

from topk_distill import ops


@pytest.fixture(autouse=True)
def _backend_of_the_test(request):
    callspec = getattr(request.node, "callspec", None)
    params = callspec.params if callspec is not None else {}
    if params.get("device") == "cuda_emu" or params.get("backend") == "emulated_cuda":
        with ops.use_backend("emulated_cuda"):
            yield
    else:
        yield
