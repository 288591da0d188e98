"""Starting what an operator starts: a Ray head (and more nodes), and `afs serve` against it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc

RAY = shutil.which("ray") or str(Path(sys.executable).parent / "ray")
AFS = str(Path(sys.executable).parent / "afs")
# Ray's CLI turns token authentication on by default; these tests run on loopback only
ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}


@contextmanager
def ray_cluster(port: int, head_cpus: int, extra_nodes: tuple[dict, ...] = ()) -> Iterator[str]:
    """`ray start --head` (and one `ray start --address` per extra node's resources)."""
    os.environ["RAY_AUTH_MODE"] = "disabled"  # for ray.init in the test process
    start = [RAY, "start", "--disable-usage-stats"]
    try:
        subprocess.run(
            [*start, "--head", f"--port={port}", f"--num-cpus={head_cpus}",
             "--include-dashboard=false"],
            env=ENV, check=True, capture_output=True, timeout=120,
        )  # fmt: skip
        for node in extra_nodes:
            subprocess.run(
                [*start, f"--address=127.0.0.1:{port}", f"--num-cpus={node['cpus']}",
                 f"--resources={json.dumps(node.get('resources', {}))}"],
                env=ENV, check=True, capture_output=True, timeout=120,
            )  # fmt: skip
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([RAY, "stop", "--force"], env=ENV, capture_output=True, timeout=120)


@contextmanager
def afs_serve(ray_address: str, port: int, log_path: Path, *flags: str) -> Iterator:
    with open(log_path, "w") as log:
        server = subprocess.Popen(
            [AFS, "serve", "--address", ray_address, "--port", str(port), "--device", "cpu",
             *flags],
            env=ENV, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        yield server
    finally:
        server.terminate()
        server.wait(60)


def wait_ready(pb, stub, server, log_path: Path, metadata=(), seconds: float = 300):
    """ServerInfo once every replica is ready; fails with the server's log if it exits."""
    deadline = time.time() + seconds
    while True:
        try:
            info = stub.ServerInfo(pb.ServerInfoRequest(), metadata=metadata, timeout=5)
            if info.replicas and all(r.state == "ready" for r in info.replicas):
                return info
        except grpc.RpcError:
            pass
        assert server.poll() is None, log_path.read_text()
        assert time.time() < deadline, "afs serve did not become ready"
        time.sleep(0.5)
