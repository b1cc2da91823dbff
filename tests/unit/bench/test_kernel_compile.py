"""bench/kernel_compile.py: the tree kernel compiled for an H100 without one (Triton's compiler
and the wheel's ptxas), reported as registers, spills, shared memory and operand placement."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[3] / "bench"

# Looked up, not imported: importing Triton here, at collection time, would come before the
# kernel tests' conftest sets TRITON_INTERPRET=1 (which must precede Triton's first import).
pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="needs Triton (its compiler alone: no GPU)")


def _run(*args: str) -> subprocess.CompletedProcess:
    # In a subprocess: the kernel tests' conftest sets TRITON_INTERPRET=1 for this process,
    # and an interpreted kernel cannot be compiled.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, str(BENCH / "kernel_compile.py"), *args], env=env,
                          capture_output=True, text=True, timeout=300)


def test_reports_the_sm90_build_of_the_shipped_tile(tmp_path):
    run = _run("--arch", "90", "--keep", str(tmp_path))
    if run.returncode and "no ptxas in the Triton wheel" in run.stderr:
        pytest.skip(run.stderr.strip().splitlines()[-1])  # its assemblers refuse its own PTX
    assert run.returncode == 0, run.stderr
    rows = {}
    for line in run.stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 2 and cells[0] not in ("what", "---"):
            rows[cells[0]] = cells[1]
    assert 32 <= int(rows["registers per thread"]) <= 255
    assert int(rows["shared memory (bytes)"]) > 0
    assert int(rows["wgmma instructions in the PTX (Hopper)"]) > 0
    # Q @ K^T takes Q from shared memory; P @ V takes P from registers.
    in_smem, in_regs = (int(x) for x in
                        rows["matrix products with A in shared memory / registers"].split(" / "))
    assert in_smem > 0 and in_regs > 0
    assert "warp_group_dot" in (tmp_path / "tree_partial.ttgir").read_text()
    assert ".target sm_90a" in (tmp_path / "tree_partial.ptx").read_text()


def test_tma_build_copies_key_tiles_with_tma():
    """--tma 1 over 64-token pages: the prefix loop's K/V tiles come by TMA, so the PTX has
    bulk tensor copies (the gather build has none) and fewer 16-byte async copies."""
    counts = {}
    for tma in ("0", "1"):
        run = _run("--arch", "90", "--page", "64", "--tma", tma)
        if run.returncode and "no ptxas in the Triton wheel" in run.stderr:
            pytest.skip(run.stderr.strip().splitlines()[-1])
        assert run.returncode == 0, run.stderr
        rows = dict(tuple(c.strip() for c in line.strip().strip("|").split("|"))
                    for line in run.stdout.splitlines() if line.startswith("| ") and "|" in
                    line[2:] and line.count("|") == 3)
        counts[tma] = (int(rows["TMA tile copies (cp.async.bulk.tensor) in the PTX"]),
                       int(rows["16-byte async copies (cp.async.cg) in the PTX"]))
    assert counts["0"][0] == 0 and counts["1"][0] > 0
    assert counts["1"][1] < counts["0"][1]


def test_halves_build_scores_each_half_on_its_own(tmp_path):
    """--halves 1 (the default for 128-row tiles): the prefix loop's score products are two
    64-row wgmmas (a [64, 64] result each) in place of one 128-row product; --halves 0 has
    none of those."""
    ttgir = {}
    for halves in ("0", "1"):
        run = _run("--arch", "90", "--page", "64", "--tma", "1", "--halves", halves, "--keep",
                   str(tmp_path / halves))
        if run.returncode and "no ptxas in the Triton wheel" in run.stderr:
            pytest.skip(run.stderr.strip().splitlines()[-1])
        assert run.returncode == 0, run.stderr
        assert f"halves: {halves == '1'}" in run.stdout
        ttgir[halves] = [line for line in (tmp_path / halves / "tree_partial.ttgir").read_text()
                         .splitlines() if "warp_group_dot " in line]
    half_scores = "-> tensor<64x64xf32"
    assert sum(half_scores in line for line in ttgir["1"]) >= 2
    assert not any(half_scores in line for line in ttgir["0"])


def test_refuses_to_run_under_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, str(BENCH / "kernel_compile.py")], env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "TRITON_INTERPRET" in run.stderr
