"""The checkout's kernels/ folder (lsrt.kernels) never shadows the PyPI package `kernels`.

transformers >= 5.25 depends on and imports `kernels`; run from a checkout (`python -m`,
`python -c`), the checkout's root is on sys.path and its kernels/ folder was found first, which
broke every model import with "cannot import name 'CUDAProperties' from 'kernels'".
"""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


def _run_in_checkout(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def _pypi_kernels_installed() -> bool:
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.mark.skipif(not _pypi_kernels_installed(), reason="the PyPI package kernels is absent")
def test_top_level_kernels_is_the_pypi_package_from_a_checkout():
    code = ("import kernels, lsrt.kernels; "
            "print(kernels.__file__); print(lsrt.kernels.__file__)")
    proc = _run_in_checkout("-c", code)
    assert proc.returncode == 0, proc.stderr
    top, ours = (Path(line) for line in proc.stdout.split())
    assert top.parent != ROOT / "kernels", top  # (the venv may live inside the checkout)
    assert top.parent.name == "kernels"
    assert ours == ROOT / "kernels" / "__init__.py"


@pytest.mark.skipif(not _pypi_kernels_installed(), reason="the PyPI package kernels is absent")
def test_transformers_models_import_from_a_checkout():
    proc = _run_in_checkout("-c", "import transformers.models.llama.modeling_llama")
    assert proc.returncode == 0, proc.stderr


def test_without_the_pypi_package_kernels_reads_as_not_installed():
    """-S: no site-packages, so no PyPI `kernels`. transformers (5.17 on the GPU machine) finds
    the name, finds no metadata, imports it and reads a module with no `__file__` and no
    `__version__` as not installed; an ImportError there broke every model import."""
    code = ("import importlib, importlib.util, kernels\n"
            "assert importlib.util.find_spec('kernels') is not None\n"
            "mod = importlib.import_module('kernels')\n"
            "assert getattr(mod, '__file__', None) is None, mod.__file__\n"
            "assert getattr(mod, '__version__', 'N/A') == 'N/A'\n"
            "try:\n"
            "    mod.CUDAProperties\n"
            "except AttributeError as err:\n"
            "    print(err)\n")
    proc = _run_in_checkout("-S", "-c", code)
    assert proc.returncode == 0, proc.stderr
    assert "lsrt.kernels" in proc.stdout and "not installed" in proc.stdout
