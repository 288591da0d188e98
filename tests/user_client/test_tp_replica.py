"""A tp = 2 replica behind the gateway: it serves, and losing one rank mid-stream restarts the
whole replica while the stream finishes with the text it would have had."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest
from checkpoints import make_checkpoint
from netutil import free_port
from servers import afs_serve, ray_cluster, wait_ready

from workers.engine.llm_engine import LLMEngine
from workers.engine.sampling_params import SamplingParams
from workers.weights.gguf import embedded_gguf_path
from workers.weights.tokenizer import Tokenizer

ray = pytest.importorskip("ray")
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

    port = free_port()
    flags = ["--model", str(model), "--tp", "2", "--cpus-per-worker", "0.5",
             "--metrics-port", "0", "--kv-cache-gib", "0.05"]  # fmt: skip
    log_path = tmp_path / "serve.log"
    with ray_cluster(free_port(), head_cpus=2) as ray_address:
        with afs_serve(ray_address, port, log_path, *flags) as server:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = rpc.InferenceStub(channel)
                [replica] = wait_ready(pb, stub, server, log_path).replicas
                assert replica.tp == 2
                ray.init(address=ray_address, log_to_driver=False)
                try:
                    stream_and_kill_a_rank(pb, stub, replica, want)
                    [back] = wait_ready(pb, stub, server, log_path).replicas
                    assert back.restarts == 1
                    request = pb.GenerateRequest(text=PROMPT, sampling=greedy(pb))
                    again = stub.GenerateUnary(request, timeout=120)
                    assert list(again.completions[0].token_ids) == want.token_ids
                finally:
                    ray.shutdown()


def greedy(pb):
    return pb.SamplingParameters(temperature=0.0, max_tokens=40, ignore_eos=True)


def stream_and_kill_a_rank(pb, stub, replica, want) -> None:
    """Kill rank 1 after 8 tokens; the stream still ends with exactly the expected text."""
    text, tokens, killed = "", [], False
    for message in stub.Generate(pb.GenerateRequest(text=PROMPT, sampling=greedy(pb)), timeout=300):
        text += message.text
        tokens += list(message.token_ids)
        if not killed and len(tokens) >= 8:
            ray.kill(ray.get_actor(f"afs-rank1-{replica.replica_id}-0", "afs"), no_restart=True)
            killed = True
    assert killed
    assert tokens == want.token_ids and text == want.text
