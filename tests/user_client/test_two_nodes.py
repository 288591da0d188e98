"""A two-node Ray cluster on one machine: replicas land on different nodes and both serve."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import grpc
from netutil import free_port
from servers import afs_serve, ray_cluster, wait_ready


def test_two_replicas_on_two_nodes(user_stubs, tmp_path):
    pb, rpc = user_stubs
    port = free_port()
    nodes = ({"cpus": 1, "resources": {"node_b": 1}},)
    flags = ["--replicas", "2", "--cpus-per-worker", "0.5", "--metrics-port", "0",
             "--kv-cache-gib", "0.05"]  # fmt: skip
    with ray_cluster(free_port(), head_cpus=1, extra_nodes=nodes) as ray_address:
        with afs_serve(ray_address, port, tmp_path / "serve.log", *flags) as server:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = rpc.InferenceStub(channel)
                info = wait_ready(pb, stub, server, tmp_path / "serve.log")
                assert len(info.replicas) == 2
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
