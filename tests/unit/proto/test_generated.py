"""The committed generated code must match what `lsrt.proto.generate` produces from lsrt.proto."""

from __future__ import annotations

import difflib
from pathlib import Path

import pytest

pytest.importorskip("grpc_tools", reason="grpcio-tools (a dev dependency) regenerates the code")

from lsrt.proto import generate  # noqa: E402


def test_committed_code_is_fresh(tmp_path: Path) -> None:
    fresh = generate.generate(tmp_path)
    assert [p.name for p in fresh] == list(generate.GENERATED)
    for path in fresh:
        committed = (generate.PROTO_DIR / path.name).read_text()
        regenerated = path.read_text()
        if committed != regenerated:
            lines = committed.splitlines(True), regenerated.splitlines(True)
            diff = "".join(difflib.unified_diff(*lines, "committed", "fresh", n=1))
            hint = "run `python -m lsrt.proto.generate`"
            pytest.fail(f"{path.name} is stale; {hint}:\n{diff[:3000]}")


def test_staleness_is_detected(tmp_path: Path) -> None:
    """A changed .proto must give different code (else the check above could never fail)."""
    proto = (generate.PROTO_DIR / generate.PROTO_FILE).read_text()
    changed = tmp_path / "src"
    changed.mkdir()
    (changed / generate.PROTO_FILE).write_text(
        proto.replace("message CancelResponse {", "message CancelResponse {\n  string why = 2;", 1)
    )
    out = generate.generate(tmp_path / "out", proto_dir=changed)
    committed = (generate.PROTO_DIR / "lsrt_pb2.py").read_text()
    assert out[0].read_text() != committed


def test_generated_imports_resolve_inside_the_package() -> None:
    from lsrt.proto import lsrt_pb2, lsrt_pb2_grpc

    text = (generate.PROTO_DIR / "lsrt_pb2_grpc.py").read_text()
    assert "\nimport lsrt_pb2" not in text
    assert lsrt_pb2_grpc.lsrt__pb2 is lsrt_pb2
    assert lsrt_pb2.DESCRIPTOR.package == "lsrt.v1"
    assert "Lsrt" in lsrt_pb2.DESCRIPTOR.services_by_name


def test_stubs_demand_the_grpcio_floor_of_pyproject() -> None:
    """The generated stubs refuse a grpcio older than GRPC_FLOOR: it must be pyproject's floor
    (whatever grpcio-tools patch release generated them)."""
    import re

    pyproject = Path(__file__).resolve().parents[3] / "pyproject.toml"
    if not pyproject.exists():
        pytest.skip("runs from a checkout")
    floor = re.search(r'"grpcio>=([0-9.]+)"', pyproject.read_text())
    assert floor is not None and floor.group(1) == generate.GRPC_FLOOR
    stubs = (generate.PROTO_DIR / "lsrt_pb2_grpc.py").read_text()
    assert f"GRPC_GENERATED_VERSION = '{generate.GRPC_FLOOR}'" in stubs
