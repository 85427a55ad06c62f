"""tools.sass (the static SASS roofline, issue 13): its parsers on synthetic input (always),
and on the current kernels compiled for sm_90 with the build's own flags (needs nvcc and a
disassembler - nvdisasm / cuobjdump from the toolkit, triton or the nvidia-* wheels - and a CUDA
build's ninja file; skipped with the reason otherwise). Each needed .cu file is compiled once
per session (~0.5-1 min each on 2 cores)."""
import os
import re
import shutil
import textwrap
from pathlib import Path

import pytest

from tools import sass

REPO = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------- no toolchain needed

def test_model_budgets():
    # 132 SMs x 4 schedulers x 1.98 GHz x 32 lanes = 33.45 T thread-instructions/s
    assert sass.issue_rate(sass.DEVICES["H100"]) == pytest.approx(3.345e13, rel=1e-3)
    assert sass.issue_budget(2, sass.DEVICES["H200"]) == pytest.approx(13.94, abs=0.01)
    assert sass.issue_budget(2, sass.DEVICES["H100"]) == pytest.approx(19.97, abs=0.01)
    assert sass.issue_budget(4, sass.DEVICES["H200"]) == pytest.approx(27.88, abs=0.01)


PTXAS_LOG = textwrap.dedent("""\
    ptxas info    : 28 bytes gmem
    ptxas info    : Compiling entry function '_Z3fooIfEvv' for 'sm_90'
    ptxas info    : Function properties for _Z3fooIfEvv
        48 bytes stack frame, 38 bytes spill stores, 112 bytes spill loads
    ptxas info    : Used 64 registers, used 1 barriers, 48 bytes cumulative stack size
    ptxas info    : Compiling entry function '_Z3barv' for 'sm_90'
    ptxas info    : Function properties for _Z3barv
        0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
    ptxas info    : Used 25 registers, used 1 barriers, 256 bytes smem
    """)


def test_parse_ptxas():
    r = sass.parse_ptxas(PTXAS_LOG)
    assert r["_Z3fooIfEvv"] == {"entry": True, "stack_frame": 48, "spill_stores": 38,
                                "spill_loads": 112, "registers": 64, "barriers": 1,
                                "cumulative_stack": 48}
    assert r["_Z3barv"]["registers"] == 25 and r["_Z3barv"]["smem"] == 256
    assert r["_Z3barv"]["spill_stores"] == 0


# A streaming loop in nvdisasm syntax: two 16-byte loads, a branch around the exp work (skipped
# only while nothing was seen), an element-wise fallback store path and a packed store path.
NVDISASM = textwrap.dedent("""\
    \t.section\t.text._Z6kernelIN3c108BFloat16EEvv,"ax",@progbits
    _Z6kernelIN3c108BFloat16EEvv:
    \t//## File "/x/k.cu", line 10
            /*0000*/                   MOV R1, c[0x0][0x28] ;
            /*0010*/                   S2R R0, SR_TID.X ;
    .L_x_1:
    \t//## File "/x/common.cuh", line 51 inlined at "/x/k.cu", line 20
    \t//## File "/x/k.cu", line 20
            /*0020*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
            /*0030*/                   LDG.E.128 R8, desc[UR4][R2.64+0x10] ;
            /*0040*/                   FSETP.NEU.AND P0, PT, R20, -INF , PT ;
            /*0050*/              @!P0 BRA `(.L_x_2) ;
            /*0060*/                   FFMA R12, R4, R21, -R20 ;
            /*0070*/                   MUFU.EX2 R12, R12 ;
            /*0080*/                   FADD R22, R22, R12 ;
    .L_x_2:
            /*0090*/                   LOP3.LUT P1, RZ, R30, 0xff, RZ, 0xc0, !PT ;
            /*00a0*/               @P1 BRA `(.L_x_3) ;
            /*00b0*/                   STG.E.128 desc[UR4][R2.64], R4 ;
            /*00c0*/                   BRA `(.L_x_4) ;
    .L_x_3:
            /*00d0*/                   STG.E.U16 desc[UR4][R2.64], R4 ;
            /*00e0*/                   STG.E.U16 desc[UR4][R2.64+0x2], R5 ;
            /*00f0*/                   STG.E.U16 desc[UR4][R2.64+0x4], R6 ;
    .L_x_4:
            /*0100*/                   IADD3 R2, P2, R2, 0x20, RZ ;
            /*0110*/                   ISETP.GE.AND P0, PT, R2, R40, PT ;
            /*0120*/              @!P0 BRA `(.L_x_1) ;
            /*0130*/                   EXIT ;
    .L_x_5:
            /*0140*/                   BRA `(.L_x_5);
    """)

CUOBJDUMP = textwrap.dedent("""\
    \tcode for sm_90
    \t\tFunction : _Z6kernelIN3c108BFloat16EEvv
    \t.headerflags\t@"EF_CUDA_SM90 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"
            /*0000*/                   MOV R1, c[0x0][0x28] ;   /* 0x00000a00ff017b82 */
                                                                /* 0x000fe40000000800 */
            /*0010*/                   S2R R0, SR_TID.X ;       /* 0x0000000000007919 */
            /*0020*/                   LDG.E.128 R4, desc[UR4][R2.64] ;  /* 0x0000000402047981 */
            /*0030*/                   LDG.E.128 R8, desc[UR4][R2.64+0x10] ;
            /*0040*/                   FSETP.NEU.AND P0, PT, R20, -INF , PT ;
            /*0050*/              @!P0 BRA 0x90 ;
            /*0060*/                   FFMA R12, R4, R21, -R20 ;
            /*0070*/                   MUFU.EX2 R12, R12 ;
            /*0080*/                   FADD R22, R22, R12 ;
            /*0090*/                   LOP3.LUT P1, RZ, R30, 0xff, RZ, 0xc0, !PT ;
            /*00a0*/               @P1 BRA 0xd0 ;
            /*00b0*/                   STG.E.128 desc[UR4][R2.64], R4 ;
            /*00c0*/                   BRA 0x100 ;
            /*00d0*/                   STG.E.U16 desc[UR4][R2.64], R4 ;
            /*00e0*/                   STG.E.U16 desc[UR4][R2.64+0x2], R5 ;
            /*00f0*/                   STG.E.U16 desc[UR4][R2.64+0x4], R6 ;
            /*0100*/                   IADD3 R2, P2, R2, 0x20, RZ ;
            /*0110*/                   ISETP.GE.AND P0, PT, R2, R40, PT ;
            /*0120*/              @!P0 BRA 0x20 ;
            /*0130*/                   EXIT ;
            /*0140*/                   BRA 0x140;
    """)


@pytest.mark.parametrize("text,line_info", [(NVDISASM, True), (CUOBJDUMP, False)],
                         ids=["nvdisasm", "cuobjdump"])
def test_parse_sass_and_hot_loop(text, line_info):
    funcs = sass.parse_sass(text)
    (name, ins), = funcs.items()
    assert name == "_Z6kernelIN3c108BFloat16EEvv" and len(ins) == 21
    assert ins[5]["pred"] == "@!P0" and ins[5]["op"] == "BRA" and ins[5]["target"] == 0x90
    a = sass.analyse_function(ins, "bf16")
    assert a["loops"] == 1  # the trailing `BRA .` after EXIT is unreachable
    (h,) = a["hot_loops"]
    assert h["main"] and h["header_addr"] == "0x0020"
    # steady path: loads, the exp block, the packed store, the latch: 14 instructions of the
    # 17 in the body (the element-wise stores are the exception path)
    assert h["instructions_in_body"] == 17
    assert h["instructions_per_iteration"] == 14
    assert h["wide_loads_per_iteration"] == 2 and h["wide_stores_per_iteration"] == 1
    assert h["writes"] and h["logits_per_iteration"] == 16 and h["bytes_per_logit"] == 4
    assert h["instructions_per_logit"] == pytest.approx(14 / 16)
    assert h["classes_per_iteration"]["sfu"] == 1 and h["classes_per_iteration"]["memory"] == 3
    assert sum(h["classes_per_iteration"].values()) == 14
    assert h["devices"]["H200"]["bound"] == "memory"
    if line_info:  # the innermost location of an inlined call
        assert h["source"].startswith("common.cuh:51") and "k.cu:20" not in h["source"]


def test_out_of_line_block_in_a_loop():
    # ptxas may move a conditional block below the loop, jumping back into its middle: that jump
    # is a forward edge of the iteration (only edges into a dominator are back edges)
    text = textwrap.dedent("""\
        \t.section\t.text._Z1kIfEvv,"ax",@progbits
                /*0000*/                   S2R R0, SR_TID.X ;
        .L_x_1:
                /*0010*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
                /*0020*/               @P0 BRA `(.L_x_3) ;
        .L_x_2:
                /*0030*/                   FADD R22, R22, R4 ;
                /*0040*/                   ISETP.GE.AND P1, PT, R2, R40, PT ;
                /*0050*/              @!P1 BRA `(.L_x_1) ;
                /*0060*/                   EXIT ;
        .L_x_3:
                /*0070*/                   MUFU.EX2 R4, R4 ;
                /*0080*/                   BRA `(.L_x_2) ;
        """)
    (ins,) = sass.parse_sass(text).values()
    a = sass.analyse_function(ins, "fp32")
    (h,) = a["hot_loops"]
    assert h["blocks_in_body"] == 3 and h["instructions_in_body"] == 7
    assert h["instructions_per_iteration"] == 7  # the moved block counted (conservative)
    assert h["logits_per_iteration"] == 4 and not h["writes"]


def test_describe_kernel():
    d = sass.describe_kernel(
        "void topk_distill::cuda::(anonymous namespace)::shard_pass_kernel<c10::BFloat16, long, "
        "false>(topk_distill::cuda::(anonymous namespace)::ShardArgs<c10::BFloat16, long>)")
    assert d == {"name": "shard_pass_kernel", "targs": ["bf16", "i64", "false"], "dtype": "bf16"}
    d = sass.describe_kernel("void ns::epilogue_warp_kernel<float, int, c10::Half>(ns::A<float>)")
    assert d["targs"] == ["fp32", "i32", "fp16"] and d["dtype"] == "fp32"


NINJA = textwrap.dedent("""\
    ninja_required_version = 1.3
    nvcc = /opt/cuda/bin/nvcc
    cuda_cflags = -DX=1 -I/r/csrc -c
    cuda_post_cflags = -D__CUDA_NO_HALF_OPERATORS__ --compiler-options ''"'"'-fPIC'"'"'' -O3 -lineinfo -gencode=arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 -std=c++20
    cuda_dlink_post_cflags =

    rule cuda_compile
      depfile = $out.d
      deps = gcc
      command = $nvcc -MD -MF $out.d $cuda_cflags -c $in -o $out $cuda_post_cflags

    build /r/build/t/csrc/cuda/a.o: cuda_compile /r/csrc/cuda/a.cu
    build /r/build/t/csrc/cuda/b.o: cuda_compile /r/csrc/cuda/b.cu
      cuda_post_cflags = -O1 -gencode=arch=compute_80,code=sm_80
    """)


def test_nvcc_command_from_ninja(tmp_path):
    f = tmp_path / "build.ninja"
    f.write_text(NINJA)
    nj = sass.parse_ninja(f)
    cmd = sass.nvcc_command(nj, Path("/r/csrc/cuda/a.cu"), Path("/o/a.cubin"), Path("/o/a.d"),
                            "sm_90")
    assert cmd[0] == "/opt/cuda/bin/nvcc"
    assert cmd[-3:] == ["-o", "/o/a.cubin", "/r/csrc/cuda/a.cu"]
    for keep in ("-DX=1", "-I/r/csrc", "-D__CUDA_NO_HALF_OPERATORS__", "-O3", "-lineinfo",
                 "-std=c++20", "'-fPIC'", "-cubin", "-Xptxas=-v",
                 "-gencode=arch=compute_90,code=sm_90"):
        assert keep in cmd, keep
    assert not any("sm_80" in c for c in cmd)
    assert sum("gencode" in c for c in cmd) == 1 and "-c" not in cmd and "-MF" not in cmd
    assert "/r/build/t/csrc/cuda/a.o" not in " ".join(cmd)
    # per-file bindings win; a file the build does not know gets the rule's flags
    b = sass.nvcc_command(nj, Path("/r/csrc/cuda/b.cu"), Path("/o/b.cubin"), Path("/o/b.d"), "sm_90")
    assert "-O1" in b and "-O3" not in b
    c = sass.nvcc_command(nj, Path("/r/csrc/cuda/new.cu"), Path("/o/c.cubin"), Path("/o/c.d"),
                          "sm_90")
    assert "-O3" in c and c[-1] == "/r/csrc/cuda/new.cu"


# ----------------------------------------------------------------------------- the real kernels

def _toolchain_or_skip():
    try:
        ninja_path = sass.find_build_ninja(REPO)
        nvcc = sass.nvcc_of(sass.parse_ninja(ninja_path))
    except sass.ToolError as e:
        if not shutil.which("nvcc"):
            pytest.skip("no nvcc: the SASS report needs the CUDA compiler")
        if os.environ.get("TOPK_DISTILL_CUDA", "auto") == "0":
            pytest.skip("TOPK_DISTILL_CUDA=0: no CUDA build, so no nvcc flags to reuse")
        try:
            import torch
            if not torch.version.cuda:
                pytest.skip("torch without CUDA: the build compiled no CUDA kernels")
        except ImportError:
            pytest.skip("no torch")
        import topk_distill
        if REPO not in Path(topk_distill.__file__).resolve().parents:
            # make compat's whole-suite run: an installed package, no in-place build here
            pytest.skip("the tests run against an installed topk_distill: the SASS report reads "
                        "the in-place build's nvcc flags (make sass in the checkout)")
        pytest.fail(f"nvcc is available but: {e}")
    if not sass.find_disassemblers(nvcc):
        pytest.skip(sass.disassembler_help(nvcc))
    return ninja_path


def _sources_with(*kernels):
    out = []
    for src in sass.cu_sources(REPO):
        text = src.read_text()
        if any(re.search(rf"\b{k}\b", text) for k in kernels):
            out.append(src)
    return out


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    ninja_path = _toolchain_or_skip()
    sources = _sources_with("shard_pass_kernel", "backward_kernel")
    assert sources, "no csrc/cuda/*.cu launches shard_pass_kernel or backward_kernel"
    return sass.analyse(sources, "sm_90", out_dir=tmp_path_factory.mktemp("sass"), jobs=2,
                        force=True, ninja_path=ninja_path, log=lambda *a: None)


@pytest.mark.parametrize("kernel", ["shard_pass_kernel", "backward_kernel"])
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_hot_loops_of_current_kernels(report, kernel, dtype):
    ks = [k for k in report["kernels"] if k["kernel"] == kernel and k["dtype"] == dtype]
    assert ks, f"no {kernel} instantiation for {dtype} in the disassembly"
    elems = 16 // sass.DTYPE_BYTES[dtype]
    for k in ks:
        assert isinstance(k["registers"], int) and 0 < k["registers"] <= 255, k
        assert isinstance(k["spill_stores"], int) and k["spill_stores"] >= 0
        assert isinstance(k["spill_loads"], int) and k["spill_loads"] >= 0
        main = [h for h in k["hot_loops"] if h["main"]]
        assert len(main) == 1, f"{k['demangled']}: no streaming loop found"
        h = main[0]
        assert h["logits_per_iteration"] % elems == 0
        assert 5 <= h["instructions_per_logit"] <= 60, h["instructions_per_logit"]
        assert h["writes"] == (kernel == "backward_kernel")  # the backward stores 16-byte packs
        assert h["bytes_per_logit"] == sass.DTYPE_BYTES[dtype] * (2 if h["writes"] else 1)
        assert h["classes_per_iteration"]["sfu"] >= h["logits_per_iteration"]  # one exp a logit
        assert sum(h["classes_per_iteration"].values()) == h["instructions_per_iteration"]
        assert set(h["devices"]) == {"H100", "H200"}
        assert "no_spills" in k["checks"]
        if dtype == "bf16":
            assert "instructions_per_logit" in k["checks"]


def test_report_renders(report):
    md = sass.render_markdown(report, {"command": "python -m tools.sass", "commit": "x",
                                       "date": "today"})
    assert "## Issue 13 budgets" in md and "| shard_pass_kernel | bf16 |" in md
    assert "| backward_kernel | bf16 |" in md
    data = sass.strip_private(report)
    assert all("_path_ins" not in h for k in data["kernels"] for h in k["hot_loops"])
