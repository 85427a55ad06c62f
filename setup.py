# Build of the topk_distill._C extension (torch.utils.cpp_extension + ninja).
#
# Install:   pip install --no-build-isolation .      (torch must already be installed)
# Develop:   make build   (= python setup.py build_ext --inplace, incremental)
#
# Environment:
#   (The CUDA kernels are always built for the CUDA emulator too, csrc/emu/: no nvcc needed.)
#   TOPK_DISTILL_CUDA=auto|0|1  auto (default): build the CUDA kernels whenever this torch
#                               has CUDA (torch.version.cuda) and an nvcc of the same CUDA
#                               major version is found (CUDA_HOME, CUDA_PATH, /usr/local/cuda or
#                               PATH) - a visible GPU is not needed. 1: CUDA required (error if
#                               impossible). 0: CPU only.
#   TORCH_CUDA_ARCH_LIST        default: the visible GPUs' archs, or "8.0;9.0;10.0+PTX" when
#                               none is visible (e.g. building on a CPU-only CI machine): A100,
#                               H100, B200, plus PTX of the newest for a GPU not compiled for (JIT).
#   MAX_JOBS                    parallel compile jobs, default 2 (nvcc needs ~1-2 GiB each).
#   TOPK_DISTILL_DEBUG=1        -O0 -g host code and -G device code, for debugging.
import glob
import os
import shutil
import subprocess
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(ROOT, "csrc")


def log(msg):
    print(f"[topk_distill setup] {msg}", flush=True)


def _rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def find_cuda_home():
    """The CUDA toolkit root, or None.

    torch.utils.cpp_extension guesses it from `which nvcc`, which goes wrong when nvcc on
    PATH is a wrapper script (here /usr/local/bin/nvcc -> CUDA_HOME=/usr/local), so look
    for a directory that really has bin/nvcc and include/cuda_runtime.h.
    """

    def ok(home):
        return bool(home) and os.path.isfile(os.path.join(home, "bin", "nvcc")) and (
            os.path.isfile(os.path.join(home, "include", "cuda_runtime.h"))
            or glob.glob(os.path.join(home, "targets", "*", "include", "cuda_runtime.h"))
        )

    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home:
            if ok(home):
                return home
            log(f"warning: {var}={home} has no bin/nvcc + include/cuda_runtime.h; ignoring it")
    nvcc = shutil.which("nvcc")
    if nvcc:
        home = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        if ok(home):
            return home
        # A wrapper script: ask nvcc where it really lives.
        try:
            out = subprocess.run(
                [nvcc, "--dryrun", "--version"], capture_output=True, text=True, timeout=60
            )
            for line in (out.stdout + out.stderr).splitlines():
                if "_HERE_=" in line:
                    home = os.path.dirname(line.split("_HERE_=", 1)[1].strip())
                    if ok(home):
                        return home
        except (OSError, subprocess.SubprocessError):
            pass
    if ok("/usr/local/cuda"):
        return "/usr/local/cuda"
    return None


def nvcc_cuda_version(cuda_home):
    """"13.0" from `nvcc --version` ("release 13.0, V13.0.88"), or "" when it cannot be read."""
    try:
        out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"],
                             capture_output=True, text=True, timeout=120).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    for line in out.splitlines():
        if "release " in line:
            return line.split("release ", 1)[1].split(",")[0].strip()
    return ""


# --- decide whether to build CUDA, before importing cpp_extension (it reads CUDA_HOME once) ---
MODE = os.environ.get("TOPK_DISTILL_CUDA", "auto").strip().lower()
if MODE not in ("auto", "0", "1"):
    sys.exit(f"TOPK_DISTILL_CUDA must be auto, 0 or 1, not {MODE!r}")

CUDA_HOME = find_cuda_home() if MODE != "0" else None
if CUDA_HOME:
    os.environ["CUDA_HOME"] = CUDA_HOME

try:
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
except ImportError:
    sys.exit(
        "topk-distill builds against the installed torch: install torch first, then "
        "`pip install --no-build-isolation .` (or run `make build`)."
    )

WITH_CUDA = False
if MODE == "0":
    log("TOPK_DISTILL_CUDA=0: CPU-only build")
elif not torch.version.cuda:
    why = f"torch {torch.__version__} has no CUDA"
    if MODE == "1":
        sys.exit(f"TOPK_DISTILL_CUDA=1 but {why}")
    log(f"{why}: CPU-only build")
elif not CUDA_HOME:
    why = "nvcc not found (set CUDA_HOME or put nvcc on PATH)"
    if MODE == "1":
        sys.exit(f"TOPK_DISTILL_CUDA=1 but {why}")
    log(f"{why}: CPU-only build")
elif nvcc_cuda_version(CUDA_HOME).split(".")[0] != torch.version.cuda.split(".")[0]:
    # torch's cpp_extension refuses an nvcc of another CUDA major version than torch's own.
    why = (f"nvcc at {CUDA_HOME} is CUDA {nvcc_cuda_version(CUDA_HOME) or '?'}, torch "
           f"{torch.__version__} is built with CUDA {torch.version.cuda} (the major versions must match)")
    if MODE == "1":
        sys.exit(f"TOPK_DISTILL_CUDA=1 but {why}")
    log(f"{why}: CPU-only build")
else:
    WITH_CUDA = True
    log(f"building CUDA kernels: torch CUDA {torch.version.cuda}, nvcc CUDA "
        f"{nvcc_cuda_version(CUDA_HOME)}, CUDA_HOME={CUDA_HOME}")

# No GPU visible: Ampere, Hopper and Blackwell (sm_80, sm_90, sm_100), plus PTX for the newest
# so that a newer GPU still runs the kernels (the driver JIT-compiles the PTX). Same default in
# CMakeLists.txt.
DEFAULT_CUDA_ARCHS = "8.0;9.0;10.0+PTX"
DEBUG = os.environ.get("TOPK_DISTILL_DEBUG", "0") == "1"
os.environ.setdefault("MAX_JOBS", "2")

# csrc/emu/: the CUDA kernels compiled by the host compiler against the CUDA emulator - always
# built, GPU or not, so that every build (CI's included) can run the CUDA kernels.
sources = (glob.glob(os.path.join(CSRC, "*.cpp")) + glob.glob(os.path.join(CSRC, "cpu", "*.cpp"))
           + glob.glob(os.path.join(CSRC, "emu", "*.cpp")))
if WITH_CUDA:
    sources += glob.glob(os.path.join(CSRC, "cuda", "*.cu"))
    sources += glob.glob(os.path.join(CSRC, "cuda", "*.cpp"))
sources = _rel(sources)
# setuptools skips the whole extension when the .so is newer than `sources + depends`, so
# every header must be listed here for a header edit to reach ninja (which then recompiles
# only what includes it, from its depfiles).
depends = _rel(
    p
    for ext in ("h", "hpp", "cuh", "cpp", "cu", "inc")
    for p in glob.glob(os.path.join(CSRC, "**", f"*.{ext}"), recursive=True)
) + ["setup.py"]

# The OpenMP pragmas of at::parallel_for live in ATen headers (ParallelOpenMP.h), so they are
# compiled into *this* library: without -fopenmp every parallel_for here runs on one thread.
# torch ships its own libgomp.so.1 (torch/lib); the loader reuses it for our DT_NEEDED
# libgomp.so.1 since torch is always loaded first, so there is only one OpenMP runtime.
omp = ["-fopenmp"] if torch.backends.openmp.is_available() else []

# The C++ standard is ours to state (csrc/ uses C++20: std::source_location, std::bit_cast):
# torch's cpp_extension adds -std=c++17 up to torch 2.11 and -std=c++20 from 2.12 on, each
# only when the flags have no -std= already (nvcc rejects two), so this one wins on every torch.
CXX_STD = "-std=c++20"
cxx_flags = [CXX_STD] + (["-O0", "-g"] if DEBUG else ["-O3"])
cxx_flags += ["-Wall", "-Wno-unknown-pragmas", "-fno-math-errno"] + omp
define_macros = []
extra_link_args = list(omp)
nvcc_flags = []
include_dirs = [CSRC]

if WITH_CUDA:
    define_macros.append(("TOPK_DISTILL_WITH_CUDA", "1"))
    nvcc_flags = [CXX_STD] + (["-O0", "-G", "-g"] if DEBUG else ["-O3", "-lineinfo"])
    nvcc_flags += [
        "--threads=1",  # one arch at a time per nvcc: bounds peak memory on a 2-core box
        "--expt-relaxed-constexpr",
        "--expt-extended-lambda",
        "-Xcompiler=" + ",".join(["-fno-math-errno"] + omp),
    ]
    if "TORCH_CUDA_ARCH_LIST" not in os.environ:
        if torch.cuda.is_available() and torch.cuda.device_count() > 0:
            caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
            archs = ";".join(f"{a}.{b}" for a, b in caps)
            log(f"TORCH_CUDA_ARCH_LIST unset: visible GPU(s) -> {archs}")
        else:
            archs = DEFAULT_CUDA_ARCHS
            log(f"TORCH_CUDA_ARCH_LIST unset and no GPU visible -> {archs}")
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    else:
        log(f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}")
    # torch's ATen/cuda headers include cusparse.h, cublas_v2.h, ... which a minimal CUDA
    # toolkit (nvcc + cudart only) lacks; the pip wheels torch depends on ship them. They go
    # after the toolkit's own headers (-idirafter / -isystem) so cuda_runtime.h etc. still
    # come from the toolkit that matches nvcc.
    site_dirs = {os.path.dirname(os.path.dirname(torch.__file__))}
    extra_inc = []
    for site in sorted(site_dirs):
        extra_inc += sorted(glob.glob(os.path.join(site, "nvidia", "cu*", "include")))
        extra_inc += sorted(glob.glob(os.path.join(site, "nvidia", "*", "include")))
    extra_inc = [d for d in dict.fromkeys(extra_inc) if os.path.isdir(d)]
    for d in extra_inc:
        cxx_flags += ["-idirafter", d]
        nvcc_flags += ["-isystem", d]
    if extra_inc:
        log("extra CUDA library headers from: " + ", ".join(extra_inc))

log(f"sources: {' '.join(sources)}")
log(f"MAX_JOBS={os.environ['MAX_JOBS']}")

Ext = CUDAExtension if WITH_CUDA else CppExtension
ext = Ext(
    name="topk_distill._C",
    sources=sources,
    depends=depends,
    include_dirs=include_dirs,
    define_macros=define_macros,
    extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags} if WITH_CUDA else {"cxx": cxx_flags},
    extra_link_args=extra_link_args,
)

setup(
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
