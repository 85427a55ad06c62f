"""``python -m tools.fmad_check``: where nvcc would contract a multiply-add on its own, no GPU needed.

nvcc contracts ``a * b + c`` into one FMA by default (``--fmad=true``); the host compiler that
builds the emulator does not. Device code therefore spells the rounding it wants - ``fma_rn``
where it wants one rounding, ``mul_rn`` for a product that is stored or compared and also added
(csrc/cuda/portability.cuh) - and this tool shows that nothing is left to the compiler: it
compiles the device code of every kernel (csrc/cuda/kernels/*.cuh, explicitly instantiated for
fp32 and fp64 logits) for sm_90 twice, with the default ``--fmad=true`` and with
``--fmad=false``, disassembles both and counts, per kernel, the FMA instructions (FFMA / DFMA /
HFMA2) and the multiplies (FMUL / DMUL). A kernel whose counts differ still has a product that
nvcc fuses on its own, which the emulator rounds differently: the table says where.

    python -m tools.fmad_check                 # table; exit 1 if a kernel outside ALLOWED differs
    python -m tools.fmad_check --keep DIR      # keep the .cu, the cubins and the SASS in DIR

Needs nvcc and a disassembler (nvdisasm / cuobjdump: the toolkit's, or triton's bundled ones),
as tools/sass.py. Only the device code is compiled (no ATen): a minute or two on one core.
"""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tools import sass

REPO = Path(__file__).resolve().parent.parent

# Kernels whose contraction is accepted, with why. The epilogue's fp64 math is csrc/divergences.h,
# shared with the CPU kernel: there a contracted product changes a result by ~1e-16 relative,
# no product is both stored and summed, and the file is plain C++ (no mul_rn) by design.
ALLOWED = {
    "epilogue_warp_kernel": "fp64 bin math of csrc/divergences.h (~1e-16 relative; nothing stored twice)",
    "epilogue_block_kernel": "fp64 bin math of csrc/divergences.h (~1e-16 relative; nothing stored twice)",
}

INSTANCES = """
#include "cuda/kernels/backward.cuh"
#include "cuda/kernels/epilogue.cuh"
#include "cuda/kernels/shard_pass.cuh"

namespace tdk = topk_distill::cuda;
#define SHARD(S, E) template __global__ void tdk::shard_pass_kernel<S, int64_t, E>(const tdk::ShardArgs<S, int64_t>); \\
                    template __global__ void tdk::shard_combine_kernel<S, int64_t, E>(const tdk::ShardArgs<S, int64_t>);
#define BACKWARD(S, E) template __global__ void tdk::backward_kernel<S, int64_t, E>(const tdk::BackwardArgs<S, int64_t>);
SHARD(float, false) SHARD(float, true) SHARD(double, false) SHARD(double, true)
BACKWARD(float, false) BACKWARD(float, true) BACKWARD(double, false) BACKWARD(double, true)
template __global__ void tdk::epilogue_warp_kernel<float, int64_t, float>(const tdk::EpilogueArgs<float, int64_t, float>);
template __global__ void tdk::epilogue_block_kernel<float, int64_t, float>(const tdk::EpilogueArgs<float, int64_t, float>);
"""

FMA_OPS = ("FFMA", "DFMA", "HFMA2")
MUL_OPS = ("FMUL", "DMUL")


def short_name(mangled: str, demangled: str) -> str:
    """``shard_pass_kernel<float, long, true>`` from the demangled signature."""
    m = re.search(r"(\w+_kernel)<([^>]*)>", demangled)
    return f"{m.group(1)}<{m.group(2)}>" if m else demangled or mangled


def compile_and_count(src: Path, arch: str, fmad: bool, work: Path, nvcc: str, tool,
                      csrc: Path) -> dict:
    cubin = work / f"kernels_fmad_{'on' if fmad else 'off'}.cubin"
    cmd = [nvcc, "-cubin", f"-arch={arch}", "-O3", "-lineinfo", "-std=c++20", "--expt-relaxed-constexpr",
           f"--fmad={'true' if fmad else 'false'}", "-I", str(csrc), "-o", str(cubin), str(src)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise sass.ToolError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    text = sass.disassemble(str(cubin), tool)
    (work / f"kernels_fmad_{'on' if fmad else 'off'}.sass").write_text(text)
    funcs = sass.parse_sass(text)
    cxxfilt = shutil.which("cu++filt") or shutil.which("c++filt")
    names = sass.demangle(list(funcs), cxxfilt) if funcs and cxxfilt else {}
    out = {}
    for name, instrs in funcs.items():
        # (HFMA2.MMA R, -RZ, RZ, imm is how ptxas moves a constant into a register: not arithmetic)
        instrs = [i for i in instrs if not (i["op"].startswith("HFMA2") and "-RZ, RZ" in i["args"])]
        ops = Counter(i["op"].split(".")[0] for i in instrs)
        where = Counter((i["op"].split(".")[0], f"{Path(i['src'][0]).name}:{i['src'][1]}")
                        for i in instrs if i.get("src") and i["op"].split(".")[0] in FMA_OPS)
        out[short_name(name, names.get(name, name))] = (
            {op: ops.get(op, 0) for op in FMA_OPS + MUL_OPS}, where)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.fmad_check", description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--keep", default=None, help="keep the sources, cubins and SASS in this folder")
    ap.add_argument("--csrc", default=str(REPO / "csrc"),
                    help="the csrc/ folder to compile (e.g. an older commit's, for comparison)")
    args = ap.parse_args(argv)
    nvcc = shutil.which("nvcc")
    tools_ = sass.find_disassemblers(nvcc)
    if nvcc is None or not tools_:
        print("tools.fmad_check: needs nvcc and nvdisasm / cuobjdump", file=sys.stderr)
        return 2
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="fmad_check_"))
    work.mkdir(parents=True, exist_ok=True)
    src = work / "kernels.cu"
    src.write_text(INSTANCES)
    with ThreadPoolExecutor(2) as ex:
        on, off = ex.map(lambda f: compile_and_count(src, args.arch, f, work, nvcc, tools_[0],
                                           Path(args.csrc)),
                         (True, False))
    print(f"FMA / multiply counts per kernel, {args.arch}: default (--fmad=true) vs --fmad=false\n")
    print(f"| kernel | {' | '.join(FMA_OPS + MUL_OPS)} (fmad on / off) | contracted by nvcc |")
    print("| --- | --- | --- |")
    bad = []
    lines_of = {}
    for name in sorted(set(on) | set(off)):
        (a, wa), (b, wb) = on.get(name, ({}, Counter())), off.get(name, ({}, Counter()))
        lines_of[name] = sorted(((op, src, wa[(op, src)] - wb[(op, src)])
                                 for op, src in set(wa) | set(wb) if wa[(op, src)] != wb[(op, src)]),
                                key=lambda t: (t[1], t[0]))
        cells = " | ".join(f"{a.get(op, 0)} / {b.get(op, 0)}" for op in FMA_OPS + MUL_OPS)
        differs = a != b
        base = name.split("<")[0]
        verdict = "no" if not differs else (f"yes, accepted: {ALLOWED[base]}" if base in ALLOWED
                                           else "YES")
        if differs and base not in ALLOWED:
            bad.append(name)
        print(f"| {name} | {cells} | {verdict} |")
    for name in bad:
        print(f"\n{name}: FMA instructions that --fmad=false removes (+) or adds (-), by the "
              "innermost source line:")
        for op, src, d in lines_of[name]:
            print(f"  {op:6s} {src:32s} {d:+d}")
    if bad:
        print(f"\nnvcc contracts products on its own in: {', '.join(bad)} - spell the rounding "
              "with fma_rn / mul_rn (csrc/cuda/portability.cuh)")
        return 1
    print("\nno kernel outside the accepted list has a product that nvcc contracts on its own")
    return 0


if __name__ == "__main__":
    sys.exit(main())
