"""A two-node Ray cluster on one machine: replicas land on different nodes and both serve."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from netutil import free_port

RAY = shutil.which("ray") or str(Path(sys.executable).parent / "ray")
AFS = str(Path(sys.executable).parent / "afs")


def test_two_replicas_on_two_nodes(user_stubs, tmp_path):
    pb, rpc = user_stubs
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    ray_port, port = free_port(), free_port()
    start = [RAY, "start", "--num-cpus=1", "--disable-usage-stats"]
    server = None
    try:
        subprocess.run(
            [
                *start,
                "--head",
                f"--port={ray_port}",
                "--include-dashboard=false",
                '--resources={"node_a": 1}',
            ],
            env=env,
            check=True,
            capture_output=True,
            timeout=120,
        )
        subprocess.run(
            [*start, f"--address=127.0.0.1:{ray_port}", '--resources={"node_b": 1}'],
            env=env,
            check=True,
            capture_output=True,
            timeout=120,
        )
        log = open(tmp_path / "serve.log", "w")  # noqa: SIM115 - closed with the process
        server = subprocess.Popen(
            [
                AFS,
                "serve",
                "--address",
                f"127.0.0.1:{ray_port}",
                "--replicas",
                "2",
                "--cpus-per-worker",
                "0.5",
                "--port",
                str(port),
                "--metrics-port",
                "0",
                "--device",
                "cpu",
                "--kv-cache-gib",
                "0.05",
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        stub = rpc.InferenceStub(channel)
        deadline = time.time() + 240
        while True:
            try:
                info = stub.ServerInfo(pb.ServerInfoRequest(), timeout=5)
                if all(r.state == "ready" for r in info.replicas) and len(info.replicas) == 2:
                    break
            except grpc.RpcError:
                pass
            assert server.poll() is None, (tmp_path / "serve.log").read_text()
            assert time.time() < deadline, "the server did not come up"
            time.sleep(1)
        assert len({r.node_id for r in info.replicas}) == 2

        sampling = pb.SamplingParameters(temperature=0.0, max_tokens=24, ignore_eos=True)
        prompts = [f"Request number {i} says" for i in range(6)]
        with ThreadPoolExecutor(6) as pool:
            replies = list(
                pool.map(
                    lambda p: stub.GenerateUnary(
                        pb.GenerateRequest(text=p, sampling=sampling), timeout=120
                    ),
                    prompts,
                )
            )
        assert all(len(r.completions[0].token_ids) == 24 for r in replies)
        info = stub.ServerInfo(pb.ServerInfoRequest(), timeout=5)
        assert all(r.served > 0 for r in info.replicas)
        channel.close()
    finally:
        if server is not None:
            server.terminate()
            server.wait(30)
        subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True, timeout=120)
