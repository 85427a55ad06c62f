"""SPEC 10.1, the torch range: the version floor on import, and the `compat` subset's list."""
import ast
import pathlib
import subprocess
import sys

import pytest

import topk_distill
from conftest import COMPAT_SUBSET

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("version", ["2.8.0", "2.8.0+cu128", "2.4.1", "1.13.1", "not-a-version"])
def test_an_older_torch_is_an_import_error_naming_the_range(version):
    with pytest.raises(ImportError, match=r"torch >= 2\.9 \(tested with torch 2\.9\.1, 2\.10\.0, 2\.11\.0, 2\.14\.1 and 2\.15\.0"):
        topk_distill._check_torch_version(version)


@pytest.mark.parametrize("version", ["2.9.0", "2.9.1+cu128", "2.10.0", "2.11.0", "2.11.0+cu130", "2.12.1", "2.14.1", "2.15.0",
                                     "2.16.0.dev20270101", "3.0.0"])
def test_supported_and_newer_torch_pass_the_check(version):
    topk_distill._check_torch_version(version)


def test_importing_under_an_older_torch_raises_import_error():
    # A fresh interpreter whose torch reports 2.8.0: the import itself must fail, by name.
    code = ("import torch; torch.__version__ = '2.8.0'\n"
            "try:\n    import topk_distill\nexcept ImportError as e:\n    print('IMPORTERROR', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "IMPORTERROR topk_distill needs torch >= 2.9" in out.stdout, out.stdout


def test_pyproject_floor_is_the_import_floor():
    text = (ROOT / "pyproject.toml").read_text()
    major, minor = topk_distill.TORCH_FLOOR
    assert f'dependencies = ["torch>={major}.{minor}"]' in text


def test_every_name_in_the_compat_subset_is_a_test_of_its_file():
    for filename, names in COMPAT_SUBSET.items():
        path = ROOT / "tests" / filename
        assert path.is_file(), filename
        defined = {node.name for node in ast.walk(ast.parse(path.read_text()))
                   if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")}
        missing = [n for n in names if n != "*" and n not in defined]
        assert not missing, f"{filename}: COMPAT_SUBSET names tests that do not exist: {missing}"
