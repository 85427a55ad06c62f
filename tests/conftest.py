"""pytest configuration shared by the test files.

A test parametrised with ``device="cuda_emu"`` (tests/_inputs.py DEVICES), or with
``backend="emulated_cuda"``, runs the kernel-backed API through the CUDA kernels under the CUDA
emulator: its tensors live on the CPU and the ``emulated_cuda`` backend (topk_distill.ops) is
selected here for the test's duration.
"""
import atexit
import os
import shutil
import tempfile

import pytest

# A fresh torch.compile (inductor) cache for every test session: inductor's on-disk cache does not
# key on a custom op's fake kernel, so a graph compiled before a change of an output's shape (the
# epilogue's row_coefs grew from 6 to 7 columns) is reloaded and fails its own size assertions.
# Set before topk_distill / torch compile anything; TP workers inherit it.
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    _inductor_cache = tempfile.mkdtemp(prefix="topk_distill_inductor_")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = _inductor_cache
    atexit.register(shutil.rmtree, _inductor_cache, ignore_errors=True)

from topk_distill import ops  # noqa: E402


@pytest.fixture(autouse=True)
def _backend_of_the_test(request):
    callspec = getattr(request.node, "callspec", None)
    params = callspec.params if callspec is not None else {}
    if params.get("device") == "cuda_emu" or params.get("backend") == "emulated_cuda":
        with ops.use_backend("emulated_cuda"):
            yield
    else:
        yield


# --- the `compat` subset: `make compat TORCH=<version>` runs `pytest -m compat` -----------------
# The tests that prove a torch version works (SPEC 10.1): the float64 oracle for every loss x
# support on the CPU kernels and the emulated CUDA kernels, the CUDA kernels against the CPU ones,
# tensor parallelism over gloo, the fused LM head, the verl drop-in (verl 0.9.1 with its
# stand-ins), torch.compile and the registered ops (opcheck, fake kernels), jagged input, and the
# version floor. File -> test function names (every parametrisation runs). tests/test_compat.py
# checks that each name still exists, so a renamed test cannot leave the subset silently.
COMPAT_SUBSET = {
    "test_losses.py": ["test_matches_reference_fp64_and_fp32", "test_matches_reference_half_logits",
                       "test_mask_reduction_and_leading_dims"],
    "test_reference.py": ["test_matches_brute_force", "test_gradcheck"],
    "test_cuda_kernels.py": ["test_every_op_has_a_kernel_per_target",
                             "test_emulated_ops_run_the_emulator",
                             "test_gradient_matches_autograd_of_the_oracle",
                             "test_loss_and_grad_through_the_public_api"],
    "test_ops.py": ["test_opcheck_every_op", "test_every_op_has_a_cpu_kernel_and_fake",
                    "test_torch_compile_fullgraph_cpu", "test_torch_compile_with_default_check_inputs",
                    "test_inplace_backward_writes_the_gradient_into_the_logits"],
    "test_rl_outputs.py": ["test_torch_compile_fullgraph_inductor_with_labels_and_entropy"],
    "test_tp.py": ["test_every_loss_support_clamp_matches_unsharded_and_reference_on_uneven_splits",
                   "test_emulated_cuda_kernels_under_tp_match_unsharded_and_reference",
                   "test_forward_makes_two_collectives_backward_none",
                   "test_torch_compile_fullgraph_has_two_collectives_and_matches_eager"],
    "test_fused_linear.py": ["test_every_loss_and_support_matches_reference_and_unfused",
                             "test_fused_linear_runs_the_emulated_cuda_kernels_per_chunk",
                             "test_tensor_parallel_uneven_shards_match_unsharded"],
    "test_layout.py": ["test_compile_fullgraph_reduced_loss_on_jagged_input",
                       "test_compile_per_token_outputs_repacked_outside_the_graph",
                       "test_fold_and_overlap_trace_under_compile_fullgraph"],
    "test_layouts_kernels.py": ["test_jagged_equals_the_packed_call"],
    "test_verl.py": ["*"],  # the whole file: the drop-in is what verl's users run
    "test_compat.py": ["*"],
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        names = COMPAT_SUBSET.get(item.path.name, ())
        if "*" in names or getattr(item, "originalname", item.name) in names:
            item.add_marker(pytest.mark.compat)
