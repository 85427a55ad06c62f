"""The PEP 517 build backend (pyproject.toml): ``setuptools.build_meta``, plus a wheel writer for
an environment whose setuptools cannot make wheels.

``pip install --no-build-isolation .`` builds with the environment's own setuptools (the extension
must compile against the torch already installed). setuptools before 70.1 makes wheels only with
the ``wheel`` package installed, and a fresh Python 3.11 venv holds setuptools 65.5 and no
``wheel``: a venv with only torch 2.11.0 and numpy failed there with ``invalid command
'bdist_wheel'`` (issue 23). In such an environment this backend builds with setuptools itself
(``setup.py build`` for the files, ``setup.py egg_info`` for the metadata; neither needs
``wheel``) and zips the wheel (PEP 427: the built files and a ``.dist-info`` with METADATA,
WHEEL and RECORD). Everywhere else every hook is setuptools' own, unchanged.
Editable installs (``pip install -e``) still need setuptools >= 70.1 or ``wheel``.
"""
from __future__ import annotations

import base64
import hashlib
import importlib.util
import os
import subprocess
import sys
import sysconfig
import tempfile
import zipfile
from email.parser import Parser
from pathlib import Path

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F401,F403  (every hook not defined below)

GENERATOR = "topk-distill tools/build_backend.py"


def setuptools_makes_wheels() -> bool:
    """True when setuptools has a ``bdist_wheel`` command: its own (>= 70.1) or ``wheel``'s."""
    return (importlib.util.find_spec("setuptools.command.bdist_wheel") is not None
            or importlib.util.find_spec("wheel") is not None)


def prepare_metadata_for_build_wheel(metadata_directory, config_settings=None):
    if setuptools_makes_wheels():
        return _setuptools.prepare_metadata_for_build_wheel(metadata_directory, config_settings)
    return write_dist_info(Path.cwd(), Path(metadata_directory)).name


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    if setuptools_makes_wheels():
        return _setuptools.build_wheel(wheel_directory, config_settings, metadata_directory)
    return build_wheel_without_bdist_wheel(Path.cwd(), Path(wheel_directory)).name


# ----------------------------------------------------------------------------- the fallback

def _setup_py(project: Path, *args: str) -> None:
    # A subprocess, as setuptools' own legacy path would run it: setup.py reads sys.argv.
    subprocess.run([sys.executable, "setup.py", *args], cwd=project, check=True)


def write_dist_info(project: Path, dest: Path) -> Path:
    """``<name>-<version>.dist-info/METADATA`` under ``dest`` from ``setup.py egg_info``'s
    PKG-INFO (the same core metadata, Requires-Dist included); returns the directory."""
    with tempfile.TemporaryDirectory() as tmp:
        _setup_py(project, "-q", "egg_info", "--egg-base", tmp)
        (egg,) = Path(tmp).glob("*.egg-info")
        pkg_info = (egg / "PKG-INFO").read_text(encoding="utf-8")
        requires = egg / "requires.txt"
        requires = requires.read_text(encoding="utf-8") if requires.is_file() else ""
    meta = Parser().parsestr(pkg_info)
    if "Requires-Dist" not in meta:  # setuptools < 68 keeps them in requires.txt only
        head, sep, body = pkg_info.partition("\n\n")
        lines = [f"Requires-Dist: {r}" for r in requires_dist(requires)]
        pkg_info = "\n".join([head.rstrip("\n"), *lines]) + "\n" + (sep[1:] + body if sep else "")
    name = _normalise(meta["Name"])
    out = dest / f"{name}-{meta['Version']}.dist-info"
    out.mkdir(parents=True, exist_ok=True)
    (out / "METADATA").write_text(pkg_info, encoding="utf-8")
    return out


def requires_dist(requires_txt: str) -> list:
    """egg-info ``requires.txt`` -> Requires-Dist values: a section ``[extra]``,
    ``[extra:marker]`` or ``[:marker]`` puts ``extra == "..."`` and / or its marker on the
    requirements below it."""
    out, marker = [], ""
    for line in requires_txt.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("[") and line.endswith("]"):
            extra, _, cond = line[1:-1].partition(":")
            parts = ([f'extra == "{extra}"'] if extra else []) + ([f"({cond})"] if cond else [])
            marker = " and ".join(parts)
            continue
        if marker:
            req, _, own = line.partition(";")
            line = f"{req.strip()}; ({own.strip()}) and {marker}" if own else f"{req}; {marker}"
        out.append(line)
    return out


def wheel_tag() -> str:
    """This interpreter's ``python-abi-platform`` tag, e.g. ``cp311-cp311-linux_x86_64``: the
    wheel holds a compiled extension for exactly this CPython."""
    impl = f"cp{sys.version_info.major}{sys.version_info.minor}"
    platform = sysconfig.get_platform().replace("-", "_").replace(".", "_")
    return f"{impl}-{impl}-{platform}"


def build_wheel_without_bdist_wheel(project: Path, wheel_directory: Path) -> Path:
    """``setup.py build`` (build_py + build_ext into a temporary lib dir; build/temp* stays, so a
    rebuild is incremental), then the wheel of that lib dir; returns the wheel's path."""
    with tempfile.TemporaryDirectory() as tmp:
        lib = Path(tmp) / "lib"
        _setup_py(project, "build", "--build-lib", str(lib))
        dist_info = write_dist_info(project, lib)
        return write_wheel(lib, dist_info.name, wheel_directory, wheel_tag())


def _normalise(name: str) -> str:
    return name.replace("-", "_").replace(".", "_")


def _record_hash(data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
    return "sha256=" + digest.decode("ascii")


def write_wheel(root: Path, dist_info: str, wheel_directory: Path, tag: str) -> Path:
    """Zip every file under ``root`` (which holds ``dist_info``/METADATA) into
    ``<dist_info's name-version>-<tag>.whl`` in ``wheel_directory``, adding ``WHEEL`` and
    ``RECORD`` (PEP 427: sha256 and size of each file; RECORD's own line is empty)."""
    (root / dist_info / "WHEEL").write_text(
        f"Wheel-Version: 1.0\nGenerator: {GENERATOR}\nRoot-Is-Purelib: false\nTag: {tag}\n",
        encoding="utf-8")
    record_name = f"{dist_info}/RECORD"
    files = sorted(p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    wheel_directory.mkdir(parents=True, exist_ok=True)
    path = wheel_directory / f"{dist_info[:-len('.dist-info')]}-{tag}.whl"
    records = []
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as whl:
        # dist-info last (the spec's recommendation), RECORD at the very end
        for p in sorted(files, key=lambda p: (p.relative_to(root).parts[0] == dist_info, str(p))):
            arc = p.relative_to(root).as_posix()
            data = p.read_bytes()
            whl.writestr(_zip_info(arc, p), data)
            records.append(f"{arc},{_record_hash(data)},{len(data)}")
        records.append(f"{record_name},,")
        whl.writestr(record_name, "\n".join(records) + "\n")
    return path


def _zip_info(arc: str, p: Path) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(arc, date_time=(1980, 1, 1, 0, 0, 0))  # reproducible
    info.external_attr = (os.stat(p).st_mode & 0o777 | 0o100000) << 16  # keep the .so executable
    info.compress_type = zipfile.ZIP_DEFLATED
    return info

