"""Benchmarks of topk-distill against plain PyTorch (see benchmarks/README section in
docs/PERFORMANCE.md).

    python -m benchmarks            # make bench: speed, GB/s and peak memory tables + plot
    python -m benchmarks.comm       # TP communication model (gloo, 2 and 4 processes)
    python -m benchmarks.profile    # make profile: nsys (CUDA) or a torch.profiler trace

Results are written under benchmarks/results/, named by device (cpu.json, cpu.md, cpu.png, ...).
"""
