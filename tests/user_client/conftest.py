"""Tests that drive the real cluster through a client generated from the .proto, as a user would.

The generated modules register the same protobuf symbols as the server's own, so this folder runs
in a pytest process of its own (the Makefile's second run) and starts servers as subprocesses.
"""

from __future__ import annotations

import importlib
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def user_stubs(tmp_path_factory):
    """Python modules generated from protos/ into a temporary directory, as a client would."""
    from grpc_tools import protoc

    out = tmp_path_factory.mktemp("user-client")
    shutil.copytree(
        REPO / "protos" / "afs",
        out / "proto_src" / "afs",
        ignore=lambda d, f: [
            name for name in f if not (name.endswith(".proto") or (Path(d) / name).is_dir())
        ],
    )
    include = Path(protoc.__file__).parent / "_proto"
    status = protoc.main(
        [
            "protoc",
            f"-I{out / 'proto_src'}",
            f"-I{include}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            "afs/v1/inference.proto",
        ]
    )
    assert status == 0
    sys.path.insert(0, str(out))
    try:
        pb = importlib.import_module("afs.v1.inference_pb2")
        rpc = importlib.import_module("afs.v1.inference_pb2_grpc")
        yield pb, rpc
    finally:
        sys.path.remove(str(out))
        for name in [n for n in sys.modules if n == "afs" or n.startswith("afs.")]:
            del sys.modules[name]
