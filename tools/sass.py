"""``python -m tools.sass``: a static instruction budget of the CUDA kernels, no GPU needed.

What it does, per ``csrc/cuda/*.cu`` file (the host launcher files; the device code they include
comes along):

1. **Compiles for one architecture (sm_90) with the build's own nvcc flags.** The flags are not
   duplicated from setup.py: they are read from the ninja file that torch's ``BuildExtension``
   writes (``build/temp.*/build.ninja``: the ``cuda_compile`` rule with ``cuda_cflags`` /
   ``cuda_post_cflags`` and any per-file bindings), with the ``-gencode`` / ``-arch`` list
   replaced by the one architecture, the object output by a cubin, and ``-Xptxas -v`` added
   (it reports, it does not change the code). No build yet: ``make build`` first (``make sass``
   does it). Results are cached in ``build/sass/<arch>/`` and recompiled when the command or any
   file in nvcc's dependency list changes.
2. **Disassembles** each cubin with ``nvdisasm`` (labels and line info) or ``cuobjdump -sass``,
   found on PATH, next to nvcc / in ``$CUDA_HOME/bin``, in triton's bundled
   ``triton/backends/nvidia/bin`` (torch brings triton) or in ``nvidia-*`` wheels' ``bin/``.
3. **Per kernel instantiation** (demangled with ``c++filt`` / ``cu++filt``; kernels are found in
   the disassembly, not listed here): registers, spills and stack frame (``ptxas -v``), local
   memory instructions, and the **hot loops**: the control-flow graph is built from the SASS,
   natural loops from its dominator tree (back edges), and a *streaming loop* is the innermost
   loop around a 16-byte global load (``LDG.E.128``). A loop body may span several basic blocks
   (branches around rare work, element-wise fallbacks); one iteration is counted along its
   *steady-state path*: the header-to-latch path that contains the most 16-byte global accesses,
   then the fewest narrower global accesses (the element-wise exception paths, e.g. a teacher
   column inside a pack), then the most instructions (every conditional computation counted:
   conservative). Logits per iteration = 16-byte loads on that path x elements per load (8
   bf16/fp16, 4 fp32, 2 fp64), which takes care of unrolled loops (several packs per iteration).
4. **The bound** (a static model, see ``model_text()`` and docs/PERFORMANCE.md): a loop is
   issue-bound on a device when instructions_per_logit / (SMs * 4 * clock * 32) exceeds
   bytes_per_logit / bandwidth; bytes per logit = the element size for a read-only stream,
   twice that when the loop also writes 16-byte packs (the backward).

Writes ``benchmarks/results/sass_sm90.json`` and ``.md`` (``sass_<arch>``) (``--out`` to change), stamped with
the nvcc version, the disassembler, the git commit and the command.

    python -m tools.sass                    # all kernels, sm_90
    python -m tools.sass --files shard_pass # only the .cu files whose name contains this
    python -m tools.sass --show shard_pass_kernel --dtype bf16   # print the hot loop SASS
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import re
import shlex
import shutil
import site
import subprocess
import sys
import sysconfig
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
DEFAULT_ARCH = "sm_90"

# ----------------------------------------------------------------------------- the model
# SMs and boost clock of the SXM parts: 1980 MHz is the max boost clock of H100 SXM5 and of H200
# SXM (both GH100 with 132 SMs enabled; it is the clock behind the published 66.9 FP32 TFLOPS
# = 16896 lanes x 2 x 1.98 GHz). 4 warp schedulers per SM, each issuing at most one
# warp-instruction per clock. Bandwidths: the published HBM peaks.
DEVICES = {
    "H100": {"name": "H100 SXM", "sms": 132, "schedulers": 4, "clock_hz": 1.98e9,
             "bandwidth": 3.35e12},
    "H200": {"name": "H200 SXM", "sms": 132, "schedulers": 4, "clock_hz": 1.98e9,
             "bandwidth": 4.8e12},
}
WARP = 32
MUFU_PER_SM_CLOCK = 16  # CUDA C++ Programming Guide, arithmetic throughput table, cc 9.0

# Issue 13's budgets: instructions per bf16/fp16 logit in the main streaming loop, and no spills.
BUDGETS = {"shard_pass_kernel": 12.0, "backward_kernel": 14.0}
BUDGET_DTYPES = ("bf16", "fp16")

DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4, "fp64": 8}
TYPE_NAMES = {
    "c10::BFloat16": "bf16", "c10::Half": "fp16", "__nv_bfloat16": "bf16", "__half": "fp16",
    "float": "fp32", "double": "fp64",
    "int": "i32", "long": "i64", "long long": "i64", "unsigned int": "u32", "short": "i16",
    "signed char": "i8", "unsigned char": "u8", "bool": "bool",
}


def issue_rate(dev: Dict) -> float:
    """Thread-instructions per second the whole device can issue."""
    return dev["sms"] * dev["schedulers"] * dev["clock_hz"] * WARP


def issue_budget(bytes_per_logit: float, dev: Dict) -> float:
    """Instructions per logit at which issue time equals memory time on ``dev``."""
    return issue_rate(dev) * bytes_per_logit / dev["bandwidth"]


def mufu_budget(bytes_per_logit: float, dev: Dict) -> float:
    """MUFU instructions per logit at which the SFU pipe's time equals memory time."""
    return dev["sms"] * MUFU_PER_SM_CLOCK * dev["clock_hz"] * bytes_per_logit / dev["bandwidth"]


def model_text() -> str:
    d = DEVICES["H100"]
    return (
        f"SMs = {d['sms']}, {d['schedulers']} warp schedulers per SM issuing one "
        f"warp-instruction per clock each, boost clock {d['clock_hz'] / 1e9:.2f} GHz (H100 SXM "
        f"and H200 alike): {issue_rate(d) / 1e12:.1f} T thread-instructions/s. A loop is "
        "issue-bound when instructions_per_logit / (SMs x 4 x clock x 32) > bytes_per_logit / "
        "bandwidth, i.e. above the budget (SMs x 4 x clock x 32) x bytes_per_logit / bandwidth; "
        "bandwidth 3.35 TB/s (H100 SXM), 4.8 TB/s (H200). Static: no latency, occupancy, "
        "dual-issue, pipe-throughput (beyond the MUFU check) or cache effects; predicated-off "
        "instructions count (they are issued)."
    )


# ----------------------------------------------------------------------------- tools

class ToolError(RuntimeError):
    pass


def _site_dirs() -> List[Path]:
    dirs = []
    for key in ("purelib", "platlib"):
        p = sysconfig.get_paths().get(key)
        if p:
            dirs.append(p)
    try:
        dirs += site.getsitepackages()
        dirs.append(site.getusersitepackages())
    except AttributeError:  # some virtualenvs
        pass
    dirs += glob.glob(str(Path(sys.executable).resolve().parent.parent / "lib" / "python3*" /
                          "site-packages"))
    out = []
    for d in dirs:
        p = Path(d)
        if p.is_dir() and p.resolve() not in [q.resolve() for q in out]:
            out.append(p)
    return out


def _tool_version(path: str) -> Optional[Tuple[int, int]]:
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+)\.(\d+)", out.stdout + out.stderr)
    return (int(m.group(1)), int(m.group(2))) if m else None


def cuda_bin_dirs(nvcc: Optional[str]) -> List[Path]:
    """Where a CUDA toolkit's binaries may be: next to nvcc (through wrapper scripts too),
    $CUDA_HOME/bin, $CUDA_PATH/bin, /usr/local/cuda/bin."""
    dirs = []
    if nvcc:
        dirs.append(Path(nvcc).parent)
        dirs.append(Path(os.path.realpath(nvcc)).parent)
        try:  # a wrapper script (e.g. /usr/local/bin/nvcc -> exec /usr/local/cuda-X/bin/nvcc)
            text = Path(nvcc).read_text(errors="replace") if Path(nvcc).stat().st_size < 4096 else ""
            for m in re.finditer(r"(/\S+)/nvcc\b", text):
                dirs.append(Path(m.group(1)))
        except OSError:
            pass
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            dirs.append(Path(os.environ[var]) / "bin")
    dirs.append(Path("/usr/local/cuda/bin"))
    return list(dict.fromkeys(dirs))


def find_disassemblers(nvcc: Optional[str], explicit: Optional[str] = None) -> List[Dict]:
    """Every usable nvdisasm / cuobjdump, best first: an explicit path, then the toolkit's (same
    version as nvcc), PATH, then triton's bundled copy and the nvidia-* wheels (newest first).
    nvdisasm before cuobjdump at equal rank (labels and line info)."""
    found: List[Dict] = []
    seen = set()

    def add(path, origin, rank):
        if not path or not os.path.isfile(path) or not os.access(path, os.X_OK):
            return
        real = os.path.realpath(path)
        if real in seen:
            return
        seen.add(real)
        ver = _tool_version(path)
        if ver is None:
            return
        kind = "nvdisasm" if "nvdisasm" in os.path.basename(path) else "cuobjdump"
        found.append({"path": str(path), "kind": kind, "version": f"{ver[0]}.{ver[1]}",
                      "_key": (rank, -ver[0], -ver[1], 0 if kind == "nvdisasm" else 1),
                      "origin": origin})

    if explicit:
        add(explicit, "--disassembler", 0)
        if not found:
            raise ToolError(f"--disassembler {explicit}: not an executable nvdisasm/cuobjdump")
    for name in ("nvdisasm", "cuobjdump"):
        for d in cuda_bin_dirs(nvcc):
            add(str(d / name), f"CUDA toolkit ({d})", 1)
        add(shutil.which(name), "PATH", 2)
        for sp in _site_dirs():
            add(str(sp / "triton" / "backends" / "nvidia" / "bin" / name),
                "triton's bundled CUDA tools", 3)
            for p in sorted(glob.glob(str(sp / "nvidia" / "*" / "bin" / name))):
                add(p, "nvidia-* wheel", 3)
    found.sort(key=lambda t: t["_key"])
    return found


def disassembler_help(nvcc: Optional[str]) -> str:
    where = ", ".join(str(d) for d in cuda_bin_dirs(nvcc))
    return ("no SASS disassembler found (nvdisasm or cuobjdump). Looked on PATH, in " + where +
            ", in triton/backends/nvidia/bin (triton comes with torch on Linux) and in the "
            "nvidia-* wheels' bin/ of " + ", ".join(map(str, _site_dirs())) + ". Install one: "
            f"`{sys.executable} -m pip install nvidia-cuda-nvdisasm nvidia-cuda-cuobjdump` (or "
            "triton, or the full CUDA toolkit), or pass --disassembler /path/to/nvdisasm.")


def find_demangler(nvcc: Optional[str]) -> str:
    for name in ("c++filt", "cu++filt"):
        p = shutil.which(name)
        if p:
            return p
        for d in cuda_bin_dirs(nvcc):
            if (d / name).is_file():
                return str(d / name)
    raise ToolError("no C++ demangler: install binutils (c++filt) - nvcc needs a host compiler, "
                    "which normally brings it - or put the CUDA toolkit's cu++filt on PATH")


def demangle(names: Sequence[str], tool: str) -> Dict[str, str]:
    names = list(dict.fromkeys(names))
    if not names:
        return {}
    out = subprocess.run([tool], input="\n".join(names) + "\n", capture_output=True, text=True,
                         check=True).stdout.splitlines()
    if len(out) != len(names):
        raise ToolError(f"{tool} returned {len(out)} lines for {len(names)} names")
    return dict(zip(names, out))


# ----------------------------------------------------------------------------- build flags

def _ninja_unescape(s: str) -> str:
    return re.sub(r"\$([$ :])", r"\1", s)


def _ninja_expand(s: str, scopes: Sequence[Dict[str, str]], keep=("in", "out")) -> str:
    def sub(m):
        name = m.group(1) or m.group(2)
        if name in keep:
            return "@@" + name.upper() + "@@"
        for sc in scopes:
            if name in sc:
                return sc[name]
        return ""
    s = re.sub(r"\$\{([A-Za-z0-9_.-]+)\}|\$([A-Za-z0-9_-]+)", sub, s)
    return _ninja_unescape(s)


def parse_ninja(path: Path) -> Dict:
    """Top-level variables, rules and build statements of a ninja file (the subset torch's
    BuildExtension writes: variables, rules, build lines with indented bindings)."""
    text = path.read_text()
    text = re.sub(r"\$\n\s*", "", text)  # line continuations
    top: Dict[str, str] = {}
    rules: Dict[str, Dict[str, str]] = {}
    builds: List[Dict] = []
    cur = None
    for raw in text.splitlines():
        if not raw.strip() or raw.lstrip().startswith("#"):
            cur = None if not raw.strip() else cur
            continue
        indented = raw[0] in " \t"
        line = raw.strip()
        if indented and cur is not None:
            k, _, v = line.partition("=")
            cur[k.strip()] = v.strip()
            continue
        cur = None
        if line.startswith("rule "):
            cur = rules.setdefault(line[5:].strip(), {})
        elif line.startswith("build "):
            m = re.match(r"build\s+(.+?)(?<!\$):\s*(\S+)\s*(.*)$", line)
            if not m:
                continue
            outs, rule, rest = m.groups()
            ins = rest.split("|")[0].split()
            b = {"outputs": [_ninja_unescape(o) for o in outs.split()], "rule": rule,
                 "inputs": [_ninja_unescape(i) for i in ins], "vars": {}}
            builds.append(b)
            cur = b["vars"]
        elif "=" in line:
            k, _, v = line.partition("=")
            top[k.strip()] = _ninja_expand(v.strip(), [top], keep=())
    return {"path": str(path), "vars": top, "rules": rules, "builds": builds}


def find_build_ninja(repo: Path = REPO) -> Path:
    cands = [Path(p) for p in glob.glob(str(repo / "build" / "temp.*" / "build.ninja"))]
    cands = [p for p in cands if "cuda_compile" in p.read_text() or "$nvcc" in p.read_text()]
    if not cands:
        raise ToolError(
            f"no CUDA build found (no {repo}/build/temp.*/build.ninja with a cuda_compile rule). "
            "The SASS report compiles with the build's own nvcc flags, which that file holds: run "
            "`make build` first (with nvcc available and TOPK_DISTILL_CUDA=auto or 1), or "
            "`make sass`, which builds first.")
    return max(cands, key=lambda p: p.stat().st_mtime)


_DROP_WITH_ARG = {"-MF", "--dependency-output", "-o", "--output-file", "-gencode",
                  "--generate-code", "-arch", "--gpu-architecture", "-code", "--gpu-code",
                  "-odir", "--output-directory", "-MT", "-MQ"}
_DROP = {"-MD", "-MMD", "-M", "-MM", "--generate-dependencies-with-compile",
         "--generate-nonsystem-dependencies-with-compile", "-c", "--compile", "-cubin", "--cubin",
         "-ptx", "--ptx", "-fatbin", "--fatbin", "@@IN@@"}
_DROP_PREFIX = ("-gencode=", "--generate-code=", "-arch=", "--gpu-architecture=", "-code=",
                "--gpu-code=", "-MF=", "--dependency-output=", "-o=", "--output-file=")


def nvcc_command(ninja: Dict, source: Path, cubin: Path, depfile: Path, arch: str) -> List[str]:
    """The build's nvcc command for ``source``, retargeted to one architecture and a cubin."""
    src = os.path.realpath(source)
    rule_builds = [b for b in ninja["builds"] if b["rule"] in ninja["rules"]
                   and "nvcc" in ninja["rules"][b["rule"]].get("command", "")]
    if not rule_builds:
        raise ToolError(f"{ninja['path']} has no nvcc rule (a CPU-only build?): "
                        "rebuild with nvcc available (`make build TOPK_DISTILL_CUDA=1`)")
    mine = [b for b in rule_builds if any(os.path.realpath(i) == src for i in b["inputs"])]
    b = mine[0] if mine else rule_builds[0]  # a file added since the build: the same flags
    rule = ninja["rules"][b["rule"]]
    cmd = _ninja_expand(rule["command"], [b["vars"], rule, ninja["vars"]])
    argv = shlex.split(cmd)
    out: List[str] = []
    skip = False
    rdc = False
    for tok in argv:
        if skip:
            skip = False
            continue
        if tok in _DROP_WITH_ARG:
            skip = True
            continue
        if tok in ("-dc", "--device-c"):
            rdc = True
            continue
        if tok in _DROP or tok.startswith(_DROP_PREFIX) or "@@OUT@@" in tok or "@@IN@@" in tok:
            continue
        out.append(tok)
    num = arch.split("_", 1)[1]
    out += [f"-gencode=arch=compute_{num},code=sm_{num}", "-cubin", "-Xptxas=-v",
            "--generate-dependencies-with-compile", "--dependency-output", str(depfile)]
    if rdc:
        out.append("-rdc=true")
    out += ["-o", str(cubin), str(source)]
    return out


def nvcc_of(ninja: Dict) -> str:
    nv = ninja["vars"].get("nvcc")
    if nv and os.path.isfile(nv):
        return nv
    nv = shutil.which("nvcc")
    if not nv:
        raise ToolError("nvcc not found (neither the build's nor on PATH)")
    return nv


def nvcc_version(nvcc: str) -> str:
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError) as e:
        raise ToolError(f"{nvcc} --version failed: {e}")
    m = re.search(r"release (\S+), (V\S+)", out.stdout)
    return f"{m.group(1).rstrip(',')} ({m.group(2)})" if m else out.stdout.strip().splitlines()[-1]


def cu_sources(repo: Path = REPO, ninja: Optional[Dict] = None) -> List[Path]:
    """The host launcher files: csrc/cuda/*.cu, plus any other .cu the build compiles."""
    srcs = {Path(p).resolve() for p in glob.glob(str(repo / "csrc" / "cuda" / "*.cu"))}
    if ninja:
        for b in ninja["builds"]:
            for i in b["inputs"]:
                p = Path(i)
                if p.suffix == ".cu" and p.is_file() and repo.resolve() in p.resolve().parents:
                    srcs.add(p.resolve())
    return sorted(srcs)


def _parse_depfile(path: Path) -> List[str]:
    text = path.read_text().replace("\\\n", " ")
    _, _, deps = text.partition(":")
    return [d.replace("\\ ", " ") for d in re.split(r"(?<!\\)\s+", deps.strip()) if d]


def compile_cubin(ninja: Dict, source: Path, out_dir: Path, arch: str = DEFAULT_ARCH,
                  force: bool = False) -> Dict:
    """Compiles ``source`` to ``out_dir/<stem>.cubin`` (cached: reused when the command is the
    same and no dependency is newer). Returns paths, the command, the ptxas log and the time."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = source.stem + "-" + hashlib.sha1(str(source).encode()).hexdigest()[:6]
    cubin, dep, log, cmdf = (out_dir / f"{stem}{ext}" for ext in (".cubin", ".d", ".log", ".cmd"))
    cmd = nvcc_command(ninja, source, cubin, dep, arch)
    if not os.path.isfile(cmd[0]) and not shutil.which(cmd[0]):
        cmd[0] = nvcc_of(ninja)  # a build made elsewhere: this machine's nvcc
    if not force and cubin.is_file() and log.is_file() and dep.is_file() and cmdf.is_file() \
            and json.loads(cmdf.read_text()) == cmd:
        t = cubin.stat().st_mtime
        try:
            fresh = all(os.stat(d).st_mtime <= t for d in _parse_depfile(dep))
        except OSError:
            fresh = False
        if fresh:
            return {"source": str(source), "cubin": str(cubin), "command": cmd,
                    "ptxas_log": log.read_text(), "seconds": 0.0, "cached": True}
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=str(REPO))
    if proc.returncode != 0:
        raise ToolError(f"nvcc failed on {source} (exit {proc.returncode}):\n" +
                        " ".join(shlex.quote(c) for c in cmd) + "\n" + proc.stdout[-4000:] +
                        proc.stderr[-8000:])
    log.write_text(proc.stdout + proc.stderr)
    cmdf.write_text(json.dumps(cmd))
    return {"source": str(source), "cubin": str(cubin), "command": cmd,
            "ptxas_log": proc.stdout + proc.stderr, "seconds": round(time.time() - t0, 1),
            "cached": False}


def parse_ptxas(log: str) -> Dict[str, Dict]:
    """Per mangled function: registers, stack frame, spill stores/loads (bytes), smem, barriers."""
    res: Dict[str, Dict] = {}
    cur = None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '([^']+)'", line)
        if m:
            cur = res.setdefault(m.group(1), {"entry": True})
            continue
        m = re.search(r"Function properties for (\S+)", line)
        if m:
            cur = res.setdefault(m.group(1), {"entry": False})
            continue
        if cur is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads",
                      line)
        if m:
            cur.update(stack_frame=int(m.group(1)), spill_stores=int(m.group(2)),
                       spill_loads=int(m.group(3)))
            continue
        m = re.search(r"Used (\d+) registers", line)
        if m:
            cur["registers"] = int(m.group(1))
            for key, pat in (("barriers", r"used (\d+) barriers"), ("smem", r"(\d+) bytes smem"),
                             ("cumulative_stack", r"(\d+) bytes cumulative stack size")):
                mm = re.search(pat, line)
                if mm:
                    cur[key] = int(mm.group(1))
    return res


# ----------------------------------------------------------------------------- disassembly

_INSTR = re.compile(r"^\s*/\*([0-9a-fA-F]{4,})\*/\s+(.*?)\s*;")
_LINEINFO = re.compile(r'//## File "([^"]+)", line (\d+)')


def disassemble(cubin: str, tool: Dict) -> str:
    if tool["kind"] == "nvdisasm":
        argv = [tool["path"], "-c", "-g", "-gi", cubin]
    else:
        argv = [tool["path"], "-sass", cubin]
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0 or "/*0000*/" not in proc.stdout:
        raise ToolError(f"{' '.join(argv)} failed (exit {proc.returncode}): "
                        f"{(proc.stderr or proc.stdout)[-2000:]}")
    return proc.stdout


def parse_sass(text: str) -> Dict[str, List[Dict]]:
    """Function name -> instructions [{addr, pred, op, args, text, label(s), src}] from nvdisasm
    (``.section .text.NAME``, labels ``.L_x_N:``, branch targets ``(.L_x_N)``) or cuobjdump
    (``Function : NAME``, hex branch targets)."""
    funcs: Dict[str, List[Dict]] = {}
    cur: Optional[List[Dict]] = None
    labels: Dict[str, int] = {}
    pending_labels: List[str] = []
    src = None
    all_labels: Dict[str, Dict[str, int]] = {}
    name = None
    in_lineinfo = False  # nvdisasm -gi prints a location, then the ones it is inlined into
    for line in text.splitlines():
        m = re.match(r"\s*\.section\s+\.text\.([^,\s]+)", line) or \
            re.match(r"\s*Function\s*:\s*(\S+)", line)
        if m:
            name = m.group(1)
            cur = funcs.setdefault(name, [])
            labels = all_labels.setdefault(name, {})
            pending_labels, src = [], None
            continue
        if cur is None:
            continue
        m = _LINEINFO.search(line)
        if m:
            if not in_lineinfo:  # the innermost location of the group
                src = (m.group(1), int(m.group(2)))
            in_lineinfo = True
            continue
        in_lineinfo = False
        m = re.match(r"^\s*(\.L\w+|[A-Za-z_$][\w$.]*):\s*$", line)
        if m:
            pending_labels.append(m.group(1))
            continue
        m = _INSTR.match(line)
        if not m:
            continue
        addr = int(m.group(1), 16)
        body = m.group(2).strip()
        pred = None
        pm = re.match(r"^(@!?U?P(?:T|\d+))\s+(.*)$", body)
        if pm:
            pred, body = pm.group(1), pm.group(2)
        op, _, args = body.partition(" ")
        for lab in pending_labels:
            labels[lab] = addr
        pending_labels = []
        cur.append({"addr": addr, "pred": pred, "op": op, "args": args.strip(), "src": src,
                    "text": (pred + " " if pred else "") + body})
    # resolve branch targets
    for name, ins in funcs.items():
        labels = all_labels.get(name, {})
        for i in ins:
            i["target"] = None
            base = i["op"].split(".")[0]
            if base in ("BRA", "JMP", "CALL", "BSSY", "BREAK", "BRX", "JMX", "WARPSYNC", "BPT"):
                m = re.search(r"`\(([^)]+)\)", i["args"])
                if m and m.group(1) in labels:
                    i["target"] = labels[m.group(1)]
                elif base in ("BRA", "JMP", "CALL", "BSSY"):
                    m = re.search(r"(?:^|[\s,])(0x[0-9a-fA-F]+)\s*$", i["args"])
                    if m:
                        i["target"] = int(m.group(1), 16)
    return funcs


# ----------------------------------------------------------------------------- classification

CLASSES = ("memory", "fp", "sfu", "cvt/pack", "int", "move", "pred/select", "control", "other")

_MEM = {"LDG", "STG", "LDS", "STS", "LDL", "STL", "LD", "ST", "LDC", "ULDC", "ATOM", "ATOMG",
        "ATOMS", "RED", "REDG", "LDSM", "STSM", "SHFL", "MATCH", "LDGSTS", "LDGDEPBAR", "CCTL",
        "UBLKCP", "UTMALDG", "UTMASTG", "UTMAPF", "SUST", "SULD", "TEX", "TLD", "LDTRAM", "ALD",
        "AST", "QSPC", "ULDCU"}
_FP = {"FADD", "FMUL", "FFMA", "FMNMX", "FSWZADD", "FADD32I", "FMUL32I", "FFMA32I", "HADD2",
       "HMUL2", "HFMA2", "HMNMX2", "HADD2_32I", "HMUL2_32I", "HFMA2_32I", "DADD", "DMUL", "DFMA",
       "DMNMX", "FCHK", "FRND", "DRND", "FMNMX3", "FADD2", "FMUL2", "FFMA2"}
_SFU = {"MUFU"}
_CVT = {"F2F", "F2I", "I2F", "F2FP", "I2FP", "F2IP", "I2IP", "PRMT", "UPRMT", "I2F64", "F2I64"}
_PRED = {"ISETP", "FSETP", "DSETP", "HSETP2", "PSETP", "PLOP3", "SEL", "FSEL", "P2R", "R2P",
         "VOTE", "VOTEU", "UISETP", "UPLOP3", "USEL", "UP2UR", "UR2UP", "CSETP", "FSET", "ISET",
         "HSET2", "PRED"}
_MOVE = {"MOV", "UMOV", "S2R", "S2UR", "CS2R", "R2UR", "MOV32I", "B2R", "R2B", "BMOV", "UMOV32I"}
_CTRL = {"BRA", "BRX", "JMP", "JMX", "CALL", "RET", "EXIT", "BSSY", "BSYNC", "BREAK", "WARPSYNC",
         "BAR", "NOP", "YIELD", "BPT", "KILL", "DEPBAR", "MEMBAR", "ERRBAR", "NANOSLEEP",
         "ELECT", "ACQBULK", "ARRIVES", "SYNCS", "WARPGROUP", "ENDCOLLECTIVE", "CGAERRBAR",
         "FENCE", "UCGABAR_ARV", "UCGABAR_WAIT"}


def classify(ins: Dict) -> str:
    op = ins["op"]
    base = op.split(".")[0]
    if base in _MEM:
        return "memory"
    if base in _SFU:
        return "sfu"
    if op.startswith("HADD2.F32"):
        return "cvt/pack"  # the fp16 -> fp32 unpack idiom
    if base in _FP:
        return "fp"
    if base in _CVT:
        return "cvt/pack"
    if base in ("IMAD", "UIMAD") and re.search(r"\bIMAD\.MOV", op):
        return "move"
    if base == "IMAD" and ".U32" in op and re.search(r",\s*0x10000,\s*RZ$", ins["args"]):
        return "cvt/pack"  # bf16 -> fp32: x << 16 as a multiply
    if base in ("SHF", "USHF") and op.startswith(("SHF.L.U32", "USHF.L.U32")) and \
            re.search(r",\s*0x10,\s*RZ$", ins["args"]):
        return "cvt/pack"  # bf16 -> fp32: x << 16
    if base in _PRED:
        return "pred/select"
    if base in _MOVE:
        return "move"
    if base in _CTRL:
        return "control"
    if base.startswith("U") and base[1:] in ("IADD3", "IMAD", "LEA", "LOP3", "SHF", "FLO", "POPC",
                                              "BREV", "BMSK", "SGXT", "IABS", "IMNMX", "LOP32I",
                                              "IADD32I", "VIADD"):
        return "int"
    if base in ("IADD3", "IADD", "IMAD", "IMUL", "LEA", "SHF", "SHL", "SHR", "LOP3", "LOP",
                "LOP32I", "IADD32I", "IMAD32I", "IMUL32I", "IABS", "IMNMX", "VIADD", "VIMNMX",
                "VIADDMNMX", "POPC", "FLO", "BREV", "BMSK", "SGXT", "IDP", "IDP4A", "REDUX",
                "BMMA", "VABSDIFF", "VABSDIFF4", "ISCADD", "XMAD", "IMADSP"):
        return "int"
    return "other"


def mem_space(ins: Dict) -> Optional[str]:
    base = ins["op"].split(".")[0]
    if base in ("LDG", "STG", "ATOMG", "RED", "REDG", "LDGSTS", "ATOM", "LD", "ST"):
        return "global"
    if base in ("LDS", "STS", "ATOMS", "LDSM", "STSM"):
        return "shared"
    if base in ("LDL", "STL"):
        return "local"
    if base in ("LDC", "ULDC", "ULDCU"):
        return "const"
    return None


def access_bytes(ins: Dict) -> int:
    mods = ins["op"].split(".")[1:]
    for m, b in (("256", 32), ("128", 16), ("64", 8), ("U16", 2), ("S16", 2), ("U8", 1),
                 ("S8", 1)):
        if m in mods:
            return b
    return 4


def is_wide_global(ins: Dict) -> bool:
    return mem_space(ins) == "global" and access_bytes(ins) >= 16 and \
        ins["op"].split(".")[0] in ("LDG", "STG", "LD", "ST")


def is_load(ins: Dict) -> bool:
    return ins["op"].split(".")[0] in ("LDG", "LD", "LDS", "LDL", "LDC", "ULDC")


# ----------------------------------------------------------------------------- CFG and loops

_TERMINATORS = {"BRA", "BRX", "JMP", "JMX", "RET", "EXIT", "BPT", "KILL"}


def _guarded(ins: Dict) -> bool:
    return ins["pred"] is not None and ins["pred"] not in ("@PT",)


def build_cfg(ins: List[Dict]) -> Dict:
    """Basic blocks (index ranges into ``ins``), successors, predecessors, roots (the entry and
    every CALL target) and whether some branch target could not be resolved."""
    if not ins:
        return {"blocks": [], "succ": [], "pred": [], "roots": [], "unresolved": False}
    index = {i["addr"]: n for n, i in enumerate(ins)}
    leaders = {0}
    unresolved = False
    for n, i in enumerate(ins):
        base = i["op"].split(".")[0]
        if base in _TERMINATORS and i["pred"] != "@!PT":
            if n + 1 < len(ins):
                leaders.add(n + 1)
            if base in ("BRA", "JMP"):
                if i["target"] in index:
                    leaders.add(index[i["target"]])
                else:
                    unresolved = True
            elif base in ("BRX", "JMX"):  # indirect: successors unknown
                unresolved = True
        if base == "CALL" and i["target"] in index:
            leaders.add(index[i["target"]])
    starts = sorted(leaders)
    blocks = [(s, (starts[k + 1] if k + 1 < len(starts) else len(ins)))
              for k, s in enumerate(starts)]
    block_of = {}
    for b, (s, e) in enumerate(blocks):
        for n in range(s, e):
            block_of[n] = b
    succ: List[List[int]] = [[] for _ in blocks]
    roots = [0]
    for b, (s, e) in enumerate(blocks):
        last = ins[e - 1]
        base = last["op"].split(".")[0]
        nxt = block_of.get(e)
        out = []
        if base in _TERMINATORS and last["pred"] != "@!PT":
            if base in ("BRA", "JMP") and last["target"] in index:
                out.append(block_of[index[last["target"]]])
            conditional = _guarded(last) or (base == "BRA" and "," in last["args"]) or \
                ".DIV" in last["op"]
            if conditional and nxt is not None:
                out.append(nxt)
        elif nxt is not None:
            out.append(nxt)
        succ[b] = list(dict.fromkeys(out))
        for n in range(s, e):
            if ins[n]["op"].startswith("CALL") and ins[n]["target"] in index:
                roots.append(block_of[index[ins[n]["target"]]])
    pred: List[List[int]] = [[] for _ in blocks]
    for b, ss in enumerate(succ):
        for t in ss:
            pred[t].append(b)
    return {"blocks": blocks, "succ": succ, "pred": pred, "roots": sorted(set(roots)),
            "unresolved": unresolved}


def dominators(cfg: Dict) -> Dict[int, int]:
    """Immediate dominators (Cooper-Harvey-Kennedy) over the blocks reachable from the roots; a
    virtual root (-1) precedes every root."""
    succ = cfg["succ"]
    order, seen = [], set()

    def dfs(b0):
        stack = [(b0, iter(succ[b0]))]
        seen.add(b0)
        while stack:
            b, it = stack[-1]
            for t in it:
                if t not in seen:
                    seen.add(t)
                    stack.append((t, iter(succ[t])))
                    break
            else:
                order.append(b)
                stack.pop()

    for r in cfg["roots"]:
        if r not in seen:
            dfs(r)
    rpo = list(reversed(order))
    pos = {b: k for k, b in enumerate(rpo)}
    pos[-1] = -1
    idom = {-1: -1}
    for r in cfg["roots"]:
        idom[r] = -1

    def intersect(a, b):
        while a != b:
            while pos[a] > pos[b]:
                a = idom[a]
            while pos[b] > pos[a]:
                b = idom[b]
        return a

    changed = True
    while changed:
        changed = False
        for b in rpo:
            if b in cfg["roots"]:
                continue
            ps = [p for p in cfg["pred"][b] if p in idom]
            if not ps:
                continue
            new = ps[0]
            for p in ps[1:]:
                new = intersect(p, new)
            if idom.get(b) != new:
                idom[b] = new
                changed = True
    return idom


def dominates(idom: Dict[int, int], a: int, b: int) -> bool:
    while b != -1:
        if a == b:
            return True
        b = idom.get(b, -1)
    return False


def natural_loops(cfg: Dict) -> Tuple[List[Dict], int]:
    """Natural loops (one per header: the union of its back edges' bodies) and the number of
    retreating edges that are not back edges (irreducible flow, not analysed)."""
    idom = dominators(cfg)
    cfg["idom"] = idom
    by_header: Dict[int, Dict] = {}
    irreducible = 0
    for u, ss in enumerate(cfg["succ"]):
        if u not in idom:
            continue
        for h in ss:
            if dominates(idom, h, u):
                lp = by_header.setdefault(h, {"header": h, "latches": set(), "body": {h}})
                lp["latches"].add(u)
                stack = [u]
                while stack:
                    x = stack.pop()
                    if x not in lp["body"]:
                        lp["body"].add(x)
                        stack.extend(p for p in cfg["pred"][x] if p in idom)
            elif cfg["blocks"][h][0] <= cfg["blocks"][u][0]:
                irreducible += 1
    loops = list(by_header.values())
    for lp in loops:
        lp["inner"] = [o["header"] for o in loops if o is not lp and o["body"] < lp["body"]]
    return loops, irreducible


def steady_path(cfg: Dict, ins: List[Dict], lp: Dict) -> List[int]:
    """The header-to-latch path through the loop (back edges removed, inner loops' too) that
    maximises (16-byte global accesses, -narrower global accesses, instructions)."""
    body = lp["body"]
    idom = cfg["idom"]
    # the DAG of one iteration: no edge into a block that dominates its source (this loop's and
    # inner loops' back edges); an out-of-line block jumping back up is a forward edge
    edges = {b: [t for t in cfg["succ"][b] if t in body and not dominates(idom, t, b)]
             for b in body}

    def weight(b):
        s, e = cfg["blocks"][b]
        wide = sum(1 for i in ins[s:e] if is_wide_global(i))
        narrow = sum(1 for i in ins[s:e] if mem_space(i) == "global" and not is_wide_global(i))
        return (wide, -narrow, e - s)

    indeg = Counter(t for b in body for t in edges[b])
    order, ready = [], [b for b in body if indeg[b] == 0]
    while ready:
        b = ready.pop()
        order.append(b)
        for t in edges[b]:
            indeg[t] -= 1
            if indeg[t] == 0:
                ready.append(t)
    best: Dict[int, Tuple] = {lp["header"]: weight(lp["header"])}
    back: Dict[int, Optional[int]] = {lp["header"]: None}
    for b in order:
        if b not in best:
            continue
        for t in edges[b]:
            w = tuple(x + y for x, y in zip(best[b], weight(t)))
            if t not in best or w > best[t]:
                best[t], back[t] = w, b
    latches = [b for b in lp["latches"] if b in best]
    if not latches:
        return sorted(body)
    end = max(latches, key=lambda b: best[b])
    path = []
    while end is not None:
        path.append(end)
        end = back[end]
    return list(reversed(path))


# ----------------------------------------------------------------------------- kernels

def split_template_args(s: str) -> List[str]:
    out, depth, cur = [], 0, ""
    for ch in s:
        if ch in "<(":
            depth += 1
        elif ch in ">)":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if cur.strip():
        out.append(cur.strip())
    return out


def describe_kernel(demangled: str) -> Dict:
    """``ns::(anonymous namespace)::shard_pass_kernel<c10::BFloat16, long, false>(args)`` ->
    name, short template args, logits dtype (the first floating-point template argument)."""
    text = demangled.replace("(anonymous namespace)", "{anon}")
    depth, head = 0, text
    for k, ch in enumerate(text):  # cut the parameter list
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == "(" and depth == 0:
            head = text[:k]
            break
    targs: List[str] = []
    m = re.match(r"^(.*?)<(.*)>$", head)
    if m:
        qual, inner = m.group(1), m.group(2)
        targs = split_template_args(inner)
    else:
        qual = head
    name = re.split(r"::", qual)[-1].strip()
    short = [TYPE_NAMES.get(a, a) for a in targs]
    dtype = next((s for s in short if s in DTYPE_BYTES), None)
    return {"name": name, "targs": short, "dtype": dtype}


def analyse_function(ins: List[Dict], dtype: Optional[str]) -> Dict:
    cfg = build_cfg(ins)
    loops, irreducible = natural_loops(cfg)
    block_of_ins = {}
    for b, (s, e) in enumerate(cfg["blocks"]):
        for n in range(s, e):
            block_of_ins[n] = b
    # streaming loops: the innermost loop around each 16-byte global load
    stream = {}
    for n, i in enumerate(ins):
        if is_wide_global(i) and is_load(i):
            b = block_of_ins[n]
            around = [lp for lp in loops if b in lp["body"]]
            if around:
                lp = min(around, key=lambda lp: len(lp["body"]))
                stream[lp["header"]] = lp
    hot = []
    elems = 16 // DTYPE_BYTES[dtype] if dtype else None
    for lp in stream.values():
        path = steady_path(cfg, ins, lp)
        pins = [i for b in path for i in ins[cfg["blocks"][b][0]:cfg["blocks"][b][1]]]
        body_n = sum(cfg["blocks"][b][1] - cfg["blocks"][b][0] for b in lp["body"])
        wide_ld = sum(1 for i in pins if is_wide_global(i) and is_load(i))
        wide_st = sum(1 for i in pins if is_wide_global(i) and not is_load(i))
        classes = Counter(classify(i) for i in pins)
        ops = Counter(i["op"] for i in pins)
        local = sum(1 for i in pins if mem_space(i) == "local")
        entry = {
            "header_addr": f"0x{ins[cfg['blocks'][lp['header']][0]]['addr']:04x}",
            "blocks_in_body": len(lp["body"]), "blocks_on_path": len(path),
            "instructions_in_body": body_n, "instructions_per_iteration": len(pins),
            "wide_loads_per_iteration": wide_ld, "wide_stores_per_iteration": wide_st,
            "writes": wide_st > 0, "local_memory_instructions": local,
            "mufu_per_iteration": classes.get("sfu", 0),
            "classes_per_iteration": {c: classes.get(c, 0) for c in CLASSES},
            "opcodes_per_iteration": dict(ops.most_common()),
            "has_inner_loops": bool(lp["inner"]),
            "source": source_summary(pins),
            "_path_ins": pins,
        }
        if elems and wide_ld:
            lpi = wide_ld * elems
            nbytes = DTYPE_BYTES[dtype] * (2 if wide_st else 1)
            entry.update(logits_per_iteration=lpi, bytes_per_logit=nbytes,
                         instructions_per_logit=round(len(pins) / lpi, 3),
                         classes_per_logit={c: round(classes.get(c, 0) / lpi, 3) for c in CLASSES},
                         mufu_per_logit=round(classes.get("sfu", 0) / lpi, 3))
            entry["devices"] = {}
            for key, dev in DEVICES.items():
                budget = issue_budget(nbytes, dev)
                ipl = len(pins) / lpi
                entry["devices"][key] = {
                    "issue_budget": round(budget, 2),
                    "bound": "issue" if ipl > budget else "memory",
                    "max_fraction_of_bandwidth": round(min(1.0, budget / ipl), 3),
                    "mufu_budget": round(mufu_budget(nbytes, dev), 2),
                }
        hot.append(entry)
    hot.sort(key=lambda h: (-h["wide_loads_per_iteration"], int(h["header_addr"], 16)))
    for k, h in enumerate(hot):
        h["main"] = k == 0
    return {
        "instructions": len(ins),
        "loops": len(loops),
        "irreducible_retreating_edges": irreducible,
        "unresolved_branches": cfg["unresolved"],
        "local_memory_instructions": sum(1 for i in ins if mem_space(i) == "local"),
        "hot_loops": hot,
    }


def source_summary(pins: List[Dict], limit: int = 6) -> str:
    """``file.cu:12-15,20; common.cuh:40`` for the instructions' (innermost) source lines."""
    per_file: Dict[str, set] = defaultdict(set)
    for i in pins:
        if i.get("src"):
            per_file[os.path.basename(i["src"][0])].add(i["src"][1])
    parts = []
    for f, lines in sorted(per_file.items(), key=lambda kv: -len(kv[1])):
        ls = sorted(lines)
        ranges, a, b = [], ls[0], ls[0]
        for x in ls[1:]:
            if x <= b + 2:
                b = x
            else:
                ranges.append((a, b))
                a = b = x
        ranges.append((a, b))
        txt = ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in ranges[:limit])
        if len(ranges) > limit:
            txt += ",..."
        parts.append(f"{f}:{txt}")
    return "; ".join(parts)


# ----------------------------------------------------------------------------- driver

def analyse(sources: Sequence[Path], arch: str = DEFAULT_ARCH, out_dir: Optional[Path] = None,
            jobs: int = 1, force: bool = False, disassembler: Optional[str] = None,
            ninja_path: Optional[Path] = None, log=print) -> Dict:
    """Compile, disassemble and analyse ``sources``; returns the report (JSON-able except the
    ``_path_ins`` of each hot loop, dropped by ``strip_private``)."""
    ninja = parse_ninja(ninja_path or find_build_ninja())
    nvcc = nvcc_of(ninja)
    tools = find_disassemblers(nvcc, disassembler)
    if not tools:
        raise ToolError(disassembler_help(nvcc))
    cxxfilt = find_demangler(nvcc)
    out_dir = out_dir or (REPO / "build" / "sass" / arch)

    def one(src):
        t0 = time.time()
        r = compile_cubin(ninja, Path(src), out_dir, arch, force)
        log(f"[sass] {os.path.relpath(src, REPO)}: "
            + ("cached cubin" if r["cached"] else f"compiled in {time.time() - t0:.0f} s"))
        return r

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as ex:
        compiled = list(ex.map(one, sources))

    kernels = []
    used_tool = None
    for comp in compiled:
        text, err = None, []
        for tool in tools:
            try:
                text = disassemble(comp["cubin"], tool)
                used_tool = used_tool or tool
                break
            except ToolError as e:
                err.append(str(e))
        if text is None:
            raise ToolError("every disassembler failed:\n" + "\n".join(err))
        funcs = parse_sass(text)
        ptx = parse_ptxas(comp["ptxas_log"])
        names = demangle(list(funcs), cxxfilt)
        for mangled, ins in funcs.items():
            if not ins:
                continue
            desc = describe_kernel(names[mangled])
            res = ptx.get(mangled, {})
            a = analyse_function(ins, desc["dtype"])
            kernels.append({
                "kernel": desc["name"], "template_args": desc["targs"], "dtype": desc["dtype"],
                "demangled": names[mangled], "mangled": mangled,
                "file": os.path.relpath(comp["source"], REPO),
                "entry": res.get("entry", True),
                "registers": res.get("registers"), "spill_stores": res.get("spill_stores"),
                "spill_loads": res.get("spill_loads"), "stack_frame": res.get("stack_frame"),
                "smem_static": res.get("smem"), "barriers": res.get("barriers"),
                **a,
            })
    order = {d: n for n, d in enumerate(DTYPE_BYTES)}
    kernels.sort(key=lambda k: (k["file"], k["kernel"], order.get(k["dtype"], 9),
                                k["template_args"]))
    for k in kernels:
        k["checks"] = budget_checks(k)
    return {
        "arch": arch,
        "nvcc": nvcc, "nvcc_version": nvcc_version(nvcc),
        "disassembler": {k: v for k, v in (used_tool or tools[0]).items() if not k.startswith("_")},
        "demangler": cxxfilt,
        "build_ninja": os.path.relpath(ninja["path"], REPO),
        "compile_commands": {os.path.relpath(c["source"], REPO): c["command"] for c in compiled},
        "model": {"devices": DEVICES, "warp": WARP, "mufu_per_sm_clock": MUFU_PER_SM_CLOCK,
                  "text": model_text(),
                  "budgets": {k: {"max_instructions_per_logit": v, "dtypes": BUDGET_DTYPES}
                              for k, v in BUDGETS.items()}},
        "kernels": kernels,
    }


def budget_checks(k: Dict) -> Dict:
    checks = {}
    spills = (k.get("spill_stores") or 0) + (k.get("spill_loads") or 0)
    checks["no_spills"] = spills == 0
    main = next((h for h in k["hot_loops"] if h["main"]), None)
    if k["kernel"] in BUDGETS and k["dtype"] in BUDGET_DTYPES:
        ok = bool(main and "instructions_per_logit" in main
                  and main["instructions_per_logit"] <= BUDGETS[k["kernel"]])
        checks["instructions_per_logit"] = ok
    return checks


def strip_private(report: Dict) -> Dict:
    r = json.loads(json.dumps(report, default=lambda o: None))
    for k in r["kernels"]:
        for h in k["hot_loops"]:
            h.pop("_path_ins", None)
    return r


# ----------------------------------------------------------------------------- output

_ABBR = {"memory": "mem", "fp": "fp", "sfu": "mufu", "cvt/pack": "cvt", "int": "int",
         "move": "mov", "pred/select": "p/sel", "control": "ctl", "other": "oth"}


def _breakdown(h: Dict) -> str:
    c = h.get("classes_per_logit") or {}
    return " ".join(f"{_ABBR[k]} {v:.2f}" for k, v in c.items() if v)


def render_markdown(r: Dict, env: Dict) -> str:
    lines = [f"# topk-distill: static SASS instruction budget ({r['arch']})", ""]
    lines += [
        f"- command `{env['command']}`, commit `{env['commit']}`, {env['date']}",
        f"- nvcc {r['nvcc_version']} (`{r['nvcc']}`), flags from `{r['build_ninja']}` "
        f"(the build's own; -gencode replaced by {r['arch']}, -cubin, -Xptxas=-v)",
        f"- disassembler: {r['disassembler']['kind']} {r['disassembler']['version']} "
        f"(`{r['disassembler']['path']}`, {r['disassembler']['origin']}); demangler "
        f"`{r['demangler']}`",
        f"- model: {r['model']['text']}",
        "- hot loop = the innermost loop around a 16-byte global load; one iteration counted "
        "along its steady-state path (most 16-byte global accesses, then fewest narrower ones, "
        "then most instructions); breakdown per logit: mem = loads/stores (global, shared, "
        "local, const), fp = FP arithmetic incl. FMNMX, mufu = MUFU (SFU), cvt = conversions and "
        "pack/unpack (F2FP, PRMT, bf16 `x<<16`), int = integer/address, mov = moves (MOV, "
        "IMAD.MOV, S2R), p/sel = compares, predicate logic and selects (FSETP, ISETP, PLOP3, "
        "FSEL, SEL), ctl = branches and convergence (BRA, BSSY, BSYNC)",
        "",
    ]
    budgets = [k for k in r["kernels"] if "instructions_per_logit" in k["checks"]]
    spills = [k for k in r["kernels"] if not k["checks"]["no_spills"]]
    lines += ["## Issue 13 budgets", ""]
    for name, lim in BUDGETS.items():
        ks = [k for k in budgets if k["kernel"] == name]
        if not ks:
            continue
        vals = [next(h for h in k["hot_loops"] if h["main"]).get("instructions_per_logit")
                for k in ks if any(h["main"] for h in k["hot_loops"])]
        ok = all(k["checks"]["instructions_per_logit"] for k in ks)
        lines.append(f"- `{name}` main loop <= {lim:g} instructions per bf16/fp16 logit: "
                     f"**{'PASS' if ok else 'FAIL'}** ({min(vals):.2f}-{max(vals):.2f} over "
                     f"{len(ks)} instantiations)")
    lines.append(f"- no spills in any kernel: **{'PASS' if not spills else 'FAIL'}**" +
                 (" - " + ", ".join(f"`{k['kernel']}<{', '.join(k['template_args'])}>` "
                                    f"{k['spill_stores']}/{k['spill_loads']} B"
                                    for k in spills) if spills else ""))
    lines += ["", "## Summary: main streaming loop per kernel and dtype", "",
              "Over the instantiations (id type; the bool template argument: with_entropy in the shard pass, a grad_entropy in the backward); the breakdown is the worst one's.",
              "", "| kernel | dtype | inst. | regs | spills st/ld B | logits/iter | B/logit |"
              " instr/logit | breakdown per logit (worst) | H100: budget, bound |"
              " H200: budget, bound | issue 13 |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    groups: Dict[Tuple[str, str], List[Tuple[Dict, Dict]]] = defaultdict(list)
    for k in r["kernels"]:
        h = next((h for h in k["hot_loops"] if h["main"] and "instructions_per_logit" in h), None)
        if h:
            groups[(k["kernel"], k["dtype"])].append((k, h))
    for (name, dtype), kh in groups.items():
        ipl = [h["instructions_per_logit"] for _, h in kh]
        k_w, h_w = max(kh, key=lambda t: t[1]["instructions_per_logit"])
        regs = sorted({k["registers"] for k, _ in kh})
        st = max(k["spill_stores"] or 0 for k, _ in kh)
        ld = max(k["spill_loads"] or 0 for k, _ in kh)
        d = h_w["devices"]
        verdict = ""
        if name in BUDGETS and dtype in BUDGET_DTYPES:
            ok = all(k["checks"].get("instructions_per_logit") for k, _ in kh)
            verdict = f"{'pass' if ok else '**FAIL**'} (<= {BUDGETS[name]:g})"
        rng = f"{min(ipl):.2f}" if min(ipl) == max(ipl) else f"{min(ipl):.2f}-{max(ipl):.2f}"
        lines.append(
            f"| {name} | {dtype} | {len(kh)} | {regs[0]}" + (f"-{regs[-1]}" if len(regs) > 1 else "")
            + f" | {st}/{ld} | {h_w['logits_per_iteration']} | {h_w['bytes_per_logit']} | "
            f"**{rng}** | {_breakdown(h_w)} | {d['H100']['issue_budget']:.1f}, {d['H100']['bound']} | "
            f"{d['H200']['issue_budget']:.1f}, {d['H200']['bound']} | {verdict} |")
    lines += ["", "## Hot loops", "",
              "| kernel | template args | regs | spills st/ld B | loop | logits/iter | instr/iter |"
              " instr/logit | breakdown per logit | H100 (budget) | H200 (budget) | budget |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for k in r["kernels"]:
        for h in k["hot_loops"]:
            if "instructions_per_logit" not in h:
                continue
            devs = h["devices"]
            check = ""
            if h["main"] and "instructions_per_logit" in k["checks"]:
                check = ("pass" if k["checks"]["instructions_per_logit"] else "**FAIL**") + \
                    f" (<= {BUDGETS[k['kernel']]:g})"
            kind = ("main" if h["main"] else "tail") + (", r+w" if h["writes"] else ", read") + \
                (f", {h['local_memory_instructions']} local" if h["local_memory_instructions"]
                 else "")
            lines.append(
                f"| {k['kernel']} | {', '.join(k['template_args'])} | {k['registers']} | "
                f"{k['spill_stores']}/{k['spill_loads']} | {h['header_addr']} {kind} | "
                f"{h['logits_per_iteration']} | {h['instructions_per_iteration']} | "
                f"**{h['instructions_per_logit']:.2f}** | {_breakdown(h)} | "
                f"{devs['H100']['bound']} ({devs['H100']['issue_budget']:.1f}) | "
                f"{devs['H200']['bound']} ({devs['H200']['issue_budget']:.1f}) | {check} |")
    lines += ["", "## Every kernel: resources", "",
              "| file | kernel | template args | regs | spills st/ld B | stack B | local instr |"
              " SASS instr | loops | streaming loops |", "|---|---|---|---|---|---|---|---|---|---|"]
    for k in r["kernels"]:
        lines.append(f"| {k['file']} | {k['kernel']} | {', '.join(k['template_args'])} | "
                     f"{k['registers']} | {k['spill_stores']}/{k['spill_loads']} | "
                     f"{k['stack_frame']} | {k['local_memory_instructions']} | "
                     f"{k['instructions']} | {k['loops']} | {len(k['hot_loops'])} |")
    # opcode detail of the budgeted loops: the worst instantiation per kernel and dtype
    lines += ["", "## Opcodes of the budgeted main loops (worst instantiation, per iteration)", ""]
    for (name, dtype), kh in groups.items():
        if name not in BUDGETS:
            continue
        k, h = max(kh, key=lambda t: t[1]["instructions_per_logit"])
        ops = ", ".join(f"{op} {n}" for op, n in h["opcodes_per_iteration"].items())
        lines.append(f"- `{k['kernel']}<{', '.join(k['template_args'])}>` loop {h['header_addr']}: "
                     f"{h['instructions_per_iteration']} instr / {h['logits_per_iteration']} logits"
                     f" (source lines: {h['source'] or 'n/a'}): {ops}")
    lines += ["", "Static model: it counts issue slots only. It ignores latency and occupancy "
              "(whether enough loads are in flight to reach the bandwidth), dual issue, the "
              "throughput of individual pipes (only MUFU is checked, in the JSON: 16/clk/SM), "
              "cache and DRAM efficiency, the prologue/epilogue of each block and the tail "
              "loops, and clocks below the boost clock (the budget scales with the clock).", ""]
    return "\n".join(lines)


def print_loop(r: Dict, kernel: str, dtype: Optional[str]):
    for k in r["kernels"]:
        if kernel not in k["kernel"] or (dtype and k["dtype"] != dtype):
            continue
        for h in k["hot_loops"]:
            print(f"== {k['demangled']}\n   loop {h['header_addr']} ({'main' if h['main'] else 'tail'}):"
                  f" {h['instructions_per_iteration']} instructions / "
                  f"{h.get('logits_per_iteration')} logits; {h['source']}")
            for i in h["_path_ins"]:
                print(f"   /*{i['addr']:04x}*/ {classify(i):12s} {i['text']}")
        return
    print(f"no kernel matching {kernel!r} dtype {dtype!r}")


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.sass", description=__doc__.split("\n")[0])
    p.add_argument("--arch", default=DEFAULT_ARCH, help="real architecture (default sm_90)")
    p.add_argument("--files", default="", help="only the .cu files whose name contains this")
    p.add_argument("--out", default=str(RESULTS), help="results directory")
    p.add_argument("--jobs", type=int, default=int(os.environ.get("MAX_JOBS", "2")),
                   help="parallel nvcc (default $MAX_JOBS or 2)")
    p.add_argument("--force", action="store_true", help="recompile even if cached")
    p.add_argument("--disassembler", help="path to nvdisasm or cuobjdump")
    p.add_argument("--show", metavar="KERNEL", help="print the hot loops' SASS of this kernel")
    p.add_argument("--dtype", help="with --show: bf16, fp16, fp32 or fp64")
    p.add_argument("--no-write", action="store_true", help="print only, write no results")
    p.add_argument("--check", action="store_true",
                   help="exit 1 when a budget of issue 13 is missed (default: report only)")
    args = p.parse_args(argv)
    arg_list = sys.argv[1:] if argv is None else argv
    try:
        ninja = parse_ninja(find_build_ninja())
        sources = [s for s in cu_sources(REPO, ninja) if args.files in s.name]
        if not sources:
            raise ToolError(f"no .cu file matches {args.files!r} in csrc/cuda")
        report = analyse(sources, args.arch, jobs=args.jobs, force=args.force,
                         disassembler=args.disassembler)
    except ToolError as e:
        print(f"tools.sass: {e}", file=sys.stderr)
        return 2
    if args.show:
        print_loop(report, args.show, args.dtype)
    from benchmarks.common import git_commit  # (imports torch: only for the stamp)
    env = {"commit": git_commit(), "command": " ".join(["python", "-m", "tools.sass"] +
                                                      arg_list),
           "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    md = render_markdown(report, env)
    if not args.show:
        print(md)
    if not args.no_write:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        data = strip_private(report)
        data["environment"] = env
        stem = "sass_" + args.arch.replace("_", "")  # sass_sm90
        (out / f"{stem}.json").write_text(json.dumps(data, indent=1) + "\n")
        (out / f"{stem}.md").write_text(md)
        print(f"[sass] wrote {out / stem}.json and .md")
    failed = [k for k in report["kernels"] if not all(k["checks"].values())]
    if args.check and failed:
        print(f"[sass] --check: {len(failed)} kernel instantiations miss a budget", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
