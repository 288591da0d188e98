"""A tp = 2 replica behind the gateway: it serves, and losing one rank mid-stream restarts the
whole replica while the stream finishes with the text it would have had."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from checkpoints import make_checkpoint
from netutil import free_port

from workers.engine.llm_engine import LLMEngine
from workers.engine.sampling_params import SamplingParams
from workers.weights.gguf import embedded_gguf_path
from workers.weights.tokenizer import Tokenizer

ray = pytest.importorskip("ray")
RAY = shutil.which("ray") or str(Path(sys.executable).parent / "ray")
AFS = str(Path(sys.executable).parent / "afs")
PROMPT = "The history of the printing press"


def tiny_model_with_tokenizer(path: Path) -> None:
    """A tiny random Llama that splits over 2 ranks, with SmolLM2's tokenizer beside it."""
    make_checkpoint(
        path,
        "Llama",
        dict(vocab_size=49152, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=512, tie_word_embeddings=True),
    )  # fmt: skip
    tokenizer = Tokenizer.from_gguf(embedded_gguf_path())
    tokenizer.backend.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))


def test_tp2_replica_serves_and_survives_losing_a_rank(tmp_path, user_stubs):
    pb, rpc = user_stubs
    model = tmp_path / "tiny"
    tiny_model_with_tokenizer(model)
    reference = LLMEngine(model=str(model), device="cpu", num_kv_blocks=64)
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    [want] = reference.generate(PROMPT, params)
    want = want.completions[0]

    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    os.environ.update(RAY_AUTH_MODE="disabled")
    ray_port, port = free_port(), free_port()
    server = None
    try:
        subprocess.run(
            [
                RAY,
                "start",
                "--head",
                f"--port={ray_port}",
                "--num-cpus=2",
                "--include-dashboard=false",
                "--disable-usage-stats",
            ],
            env=env,
            check=True,
            capture_output=True,
            timeout=120,
        )
        with open(tmp_path / "serve.log", "w") as log:
            server = subprocess.Popen(
                [
                    AFS,
                    "serve",
                    "--address",
                    f"127.0.0.1:{ray_port}",
                    "--model",
                    str(model),
                    "--tp",
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
        info = wait_ready(pb, stub, server, tmp_path / "serve.log")
        [replica] = info.replicas
        assert replica.tp == 2
        ray.init(address=f"127.0.0.1:{ray_port}", log_to_driver=False)

        sampling = pb.SamplingParameters(temperature=0.0, max_tokens=40, ignore_eos=True)
        text, tokens, killed = "", [], False
        for message in stub.Generate(
            pb.GenerateRequest(text=PROMPT, sampling=sampling), timeout=300
        ):
            text += message.text
            tokens += list(message.token_ids)
            if not killed and len(tokens) >= 8:
                rank1 = ray.get_actor(f"afs-rank1-{replica.replica_id}-0", "afs")
                ray.kill(rank1, no_restart=True)
                killed = True
        assert killed
        assert tokens == want.token_ids and text == want.text

        info = wait_ready(pb, stub, server, tmp_path / "serve.log")
        assert info.replicas[0].restarts == 1
        again = stub.GenerateUnary(pb.GenerateRequest(text=PROMPT, sampling=sampling), timeout=120)
        assert list(again.completions[0].token_ids) == want.token_ids
        channel.close()
    finally:
        if server is not None:
            server.terminate()
            server.wait(60)
        ray.shutdown()
        subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True, timeout=120)


def wait_ready(pb, stub, server, log_path, seconds=240):
    deadline = time.time() + seconds
    while True:
        try:
            info = stub.ServerInfo(pb.ServerInfoRequest(), timeout=5)
            if info.replicas and all(r.state == "ready" for r in info.replicas):
                return info
        except grpc.RpcError:
            pass
        assert server.poll() is None, log_path.read_text()
        assert time.time() < deadline, "the replica did not become ready"
        time.sleep(0.5)
