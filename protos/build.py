"""Generate the Python modules of the gRPC service from the .proto files.

    python -m protos.build

Runs at install (the Makefile and setup.py's build step call it); the generated `*_pb2*.py`
files are never edited or committed.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTOS = sorted((ROOT / "protos").rglob("*.proto"))


def generate(out_dir: Path = ROOT) -> list[Path]:
    from grpc_tools import protoc

    include = Path(protoc.__file__).parent / "_proto"
    for proto in PROTOS:
        args = [
            "protoc",
            f"-I{ROOT}",
            f"-I{include}",
            f"--python_out={out_dir}",
            f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            str(proto.relative_to(ROOT)),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {proto}")
    return PROTOS


if __name__ == "__main__":
    generated = generate()
    print(f"generated Python modules for {len(generated)} proto file(s)", file=sys.stderr)
