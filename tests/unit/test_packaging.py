"""The wheel built from the repo contains every subpackage of every mapped folder."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = ("runtime", "kernels", "sessions", "clients", "proto")


def test_wheel_contains_every_subpackage(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    (wheel,) = tmp_path.glob("lsrt-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = set()
    for folder in FOLDERS:
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.relative_to(ROOT).as_posix()
            expected.add(f"lsrt/{rel}")
    assert expected, "no packages found"
    missing = sorted(expected - names)
    assert not missing, f"missing from the wheel: {missing}"
    assert "lsrt/proto/lsrt.proto" in names
    drafts = sorted((ROOT / "runtime" / "drafts").glob("*/*"))  # shipped LongSpec drafts
    assert any(d.name == "draft.safetensors" for d in drafts)
    for draft in drafts:
        assert f"lsrt/runtime/drafts/{draft.parent.name}/{draft.name}" in names
    # Every module of the source tree is shipped, not only the package markers.
    for folder in FOLDERS:
        for py in (ROOT / folder).rglob("*.py"):
            assert f"lsrt/{py.relative_to(ROOT).as_posix()}" in names, py
    entry = [n for n in names if n.endswith("entry_points.txt")]
    assert entry and "lsrt = lsrt.clients.cli:main" in zipfile.ZipFile(wheel).read(
        entry[0]).decode()
