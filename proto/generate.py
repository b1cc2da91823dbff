"""Regenerates the committed Python code for `lsrt.proto` from `lsrt.proto`.

Run `python -m lsrt.proto.generate` after editing the .proto. The generated files are committed
so the runtime needs only `protobuf` and `grpcio`, not `grpcio-tools` (a dev dependency);
tests/unit/proto/test_generated.py regenerates into a temporary folder and fails when the
committed copies differ.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
PROTO_FILE = "lsrt.proto"
GENERATED = ("lsrt_pb2.py", "lsrt_pb2.pyi", "lsrt_pb2_grpc.py")

# protoc writes a top-level import; the module lives in the `lsrt.proto` package.
_BARE_IMPORT = "import lsrt_pb2 as lsrt__pb2"
_PACKAGE_IMPORT = "from lsrt.proto import lsrt_pb2 as lsrt__pb2"
# The grpcio the generated stubs demand at import: pyproject's floor, not the patch release of
# the grpcio-tools that happened to generate them (1.85.4 wrote '1.85.4', which made the
# committed code "stale" and would have refused grpcio 1.85.1-1.85.3 at run time).
GRPC_FLOOR = "1.85.1"
_GRPC_VERSION_LINE = re.compile(r"^GRPC_GENERATED_VERSION = '[^']*'$", re.MULTILINE)


def generate(out_dir: Path, proto_dir: Path = PROTO_DIR) -> list[Path]:
    """Writes the generated files for `proto_dir/lsrt.proto` into `out_dir`; returns their paths."""
    from importlib import resources

    from grpc_tools import protoc  # dev dependency, imported only when generating

    out_dir.mkdir(parents=True, exist_ok=True)
    well_known = str(resources.files("grpc_tools") / "_proto")
    args = [
        "grpc_tools.protoc",
        f"-I{proto_dir}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        str(proto_dir / PROTO_FILE),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {proto_dir / PROTO_FILE}")
    grpc_file = out_dir / "lsrt_pb2_grpc.py"
    text = grpc_file.read_text()
    if _BARE_IMPORT not in text:
        raise RuntimeError(f"unexpected protoc output: {_BARE_IMPORT!r} not found in {grpc_file}")
    text, found = _GRPC_VERSION_LINE.subn(f"GRPC_GENERATED_VERSION = '{GRPC_FLOOR}'", text)
    if found != 1:
        raise RuntimeError(f"unexpected protoc output: no GRPC_GENERATED_VERSION in {grpc_file}")
    grpc_file.write_text(text.replace(_BARE_IMPORT, _PACKAGE_IMPORT))
    return [out_dir / name for name in GENERATED]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=PROTO_DIR, help="output folder")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
