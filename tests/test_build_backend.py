"""tools/build_backend.py: the wheel it writes where setuptools cannot (< 70.1 without `wheel`).

The fallback runs here on a small project (setup.py build + egg_info + the wheel writer), and pip
installs the wheel it makes; the real package through it is the fresh-venv row of docs/BUILD.md
"Tested with" (a venv with only torch 2.11.0 and numpy: setuptools 65.5, no wheel).
"""
import base64
import csv
import hashlib
import io
import subprocess
import sys
import zipfile
from pathlib import Path

from tools import build_backend

ROOT = Path(__file__).resolve().parent.parent


def _toy_project(tmp_path: Path) -> Path:
    proj = tmp_path / "proj"
    (proj / "toy_pkg" / "sub").mkdir(parents=True)
    (proj / "toy_pkg" / "__init__.py").write_text("VALUE = 42\n")
    (proj / "toy_pkg" / "sub" / "__init__.py").write_text("from .. import VALUE\nDOUBLE = 2 * VALUE\n")
    (proj / "setup.py").write_text(
        "from setuptools import setup\n"
        "setup(name='toy-pkg', version='1.2.3', packages=['toy_pkg', 'toy_pkg.sub'],\n"
        "      install_requires=['torch>=2.9'])\n")
    return proj


def test_fallback_wheel_is_valid_and_installs(tmp_path):
    proj = _toy_project(tmp_path)
    whl = build_backend.build_wheel_without_bdist_wheel(proj, tmp_path / "dist")
    assert whl.name == f"toy_pkg-1.2.3-{build_backend.wheel_tag()}.whl"
    with zipfile.ZipFile(whl) as z:
        names = z.namelist()
        assert {"toy_pkg/__init__.py", "toy_pkg/sub/__init__.py"} <= set(names)
        info = "toy_pkg-1.2.3.dist-info"
        assert names[-1] == f"{info}/RECORD"  # RECORD last
        meta = z.read(f"{info}/METADATA").decode()
        assert "Name: toy-pkg" in meta and "Version: 1.2.3" in meta
        assert "Requires-Dist: torch>=2.9" in meta
        wheel = z.read(f"{info}/WHEEL").decode()
        assert "Root-Is-Purelib: false" in wheel and f"Tag: {build_backend.wheel_tag()}" in wheel
        rows = list(csv.reader(io.StringIO(z.read(f"{info}/RECORD").decode())))
        assert sorted(r[0] for r in rows) == sorted(names)  # every file, once
        for path, digest, size in rows:
            if path.endswith("RECORD"):
                assert digest == size == ""
                continue
            data = z.read(path)
            want = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            assert digest == f"sha256={want}" and int(size) == len(data), path
    # pip validates the wheel's name, tags and metadata, then installs it
    target = tmp_path / "site"
    out = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index",
                          "--target", str(target), str(whl)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    got = subprocess.run([sys.executable, "-c", "import toy_pkg.sub as s; print(s.DOUBLE)"],
                         capture_output=True, text=True, env={"PYTHONPATH": str(target)})
    assert got.stdout.strip() == "84", got.stderr


def test_prepare_metadata_fallback_names_the_dist_info(tmp_path, monkeypatch):
    proj = _toy_project(tmp_path)
    monkeypatch.chdir(proj)
    monkeypatch.setattr(build_backend, "setuptools_makes_wheels", lambda: False)
    name = build_backend.prepare_metadata_for_build_wheel(str(tmp_path / "meta"))
    assert name == "toy_pkg-1.2.3.dist-info"
    assert "Version: 1.2.3" in (tmp_path / "meta" / name / "METADATA").read_text()


def test_requires_txt_becomes_requires_dist():
    # setuptools < 68 (a fresh Python 3.11 venv's 65.5) writes no Requires-Dist into PKG-INFO;
    # the fallback takes them from requires.txt, as `wheel` would.
    txt = ("torch>=2.9\n\n[dev]\npytest\n\n[:python_version < \"3.10\"]\nb\n"
           "[x:os_name == \"nt\"]\nc; platform_machine == \"y\" or python_version > \"3\"\n")
    assert build_backend.requires_dist(txt) == [
        "torch>=2.9", 'pytest; extra == "dev"', 'b; (python_version < "3.10")',
        'c; (platform_machine == "y" or python_version > "3") and extra == "x" and (os_name == "nt")']


def test_backend_is_setuptools_where_setuptools_makes_wheels():
    from setuptools import build_meta

    text = (ROOT / "pyproject.toml").read_text()
    assert 'build-backend = "tools.build_backend"' in text and 'backend-path = ["."]' in text
    for hook in ("build_sdist", "get_requires_for_build_wheel", "build_editable",
                 "get_requires_for_build_sdist"):
        assert getattr(build_backend, hook) is getattr(build_meta, hook), hook
    # the test environments (requirements-dev.txt: setuptools >= 70.1, wheel) take setuptools' path
    assert build_backend.setuptools_makes_wheels()
