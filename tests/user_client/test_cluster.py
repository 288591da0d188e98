"""The real cluster in a local Ray instance on CPU, driven by a client generated from the .proto."""

from __future__ import annotations

import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from netutil import free_port
from prometheus_client.parser import text_string_to_metric_families
from servers import afs_serve, ray_cluster, wait_ready

from workers.engine.llm_engine import LLMEngine
from workers.engine.sampling_params import SamplingParams

ray = pytest.importorskip("ray")

SEQS_PER_REPLICA = 8
MAX_QUEUE = 16
KEY = "test-key"
AUTH = [("authorization", f"Bearer {KEY}")]
PROMPTS = [
    "Once upon a time",
    "The three primary colors are",
    "def fibonacci(n):",
    "Water boils at",
]


@pytest.fixture(scope="module")
def running(tmp_path_factory, user_stubs):
    """`afs serve` in its own process on a Ray head started here, as an operator would run it.

    The test process never imports the server's generated modules: the client is the user's.
    """
    pb, rpc = user_stubs
    port, metrics_port = free_port(), free_port()
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    flags = [
        "--replicas", "2", "--cpus-per-worker", "0.5", "--metrics-port", str(metrics_port),
        "--kv-cache-gib", "0.05", "--max-num-seqs", str(SEQS_PER_REPLICA),
        "--max-queue", str(MAX_QUEUE), "--api-key", KEY,
    ]  # fmt: skip
    with ray_cluster(free_port(), head_cpus=2) as ray_address:
        with afs_serve(ray_address, port, log_path, *flags) as server:
            address = f"127.0.0.1:{port}"
            with grpc.insecure_channel(address) as channel:
                wait_ready(pb, rpc.InferenceStub(channel), server, log_path, AUTH)
            ray.init(address=ray_address, log_to_driver=False)
            try:
                yield Running(address, metrics_port)
            finally:
                ray.shutdown()


class Running:
    def __init__(self, address, metrics_port):
        self.address, self.metrics_port = address, metrics_port


@pytest.fixture(scope="module")
def reference():
    return LLMEngine(device="cpu", kv_cache_gib=0.05)


@pytest.fixture()
def stub(running, user_stubs):
    pb, rpc = user_stubs
    channel = grpc.insecure_channel(running.address)
    yield pb, rpc.InferenceStub(channel)
    channel.close()


def greedy(pb, max_tokens=24, **extra):
    return pb.SamplingParameters(temperature=0.0, max_tokens=max_tokens, **extra)


def stream_text(pb, stub, prompt, sampling, timeout=120):
    request = pb.GenerateRequest(text=prompt, sampling=sampling)
    text, tokens, last = "", [], None
    for message in stub.Generate(request, metadata=AUTH, timeout=timeout):
        text += message.text
        tokens += list(message.token_ids)
        last = message
    return text, tokens, last


def expected(reference, prompt, **params):
    params = {"temperature": 0.0, "max_tokens": 24, **params}
    [result] = reference.generate(prompt, SamplingParams(**params))
    return result.completions[0]


def wait_for_free_blocks(pb, stub, seconds=20):
    deadline = time.time() + seconds
    while time.time() < deadline:
        info = stub.ServerInfo(pb.ServerInfoRequest(), metadata=AUTH)
        if info.free_kv_blocks == info.total_kv_blocks and info.running_requests == 0:
            return info
        time.sleep(0.2)
    raise AssertionError(f"blocks not freed: {info}")


def test_health_and_reflection(running, user_stubs):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(running.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "afs.v1.Inference"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        [reply] = list(reflection.ServerReflectionInfo(iter([request]), metadata=AUTH, timeout=10))
        names = {s.name for s in reply.list_services_response.service}
        assert {"afs.v1.Inference", "grpc.health.v1.Health"} <= names


def test_streaming_and_unary_equal_the_in_process_engine(stub, reference):
    pb, client = stub
    for prompt in PROMPTS[:3]:
        want = expected(reference, prompt)
        text, tokens, last = stream_text(pb, client, prompt, greedy(pb))
        assert tokens == want.token_ids and text == want.text
        assert last.finished and last.finish_reason == want.finish_reason
        assert last.usage.completion_tokens == len(want.token_ids)
        unary = client.GenerateUnary(
            pb.GenerateRequest(text=prompt, sampling=greedy(pb)), metadata=AUTH, timeout=120
        )
        assert list(unary.completions[0].token_ids) == want.token_ids
        assert unary.completions[0].text == want.text


def test_chat_and_tokenize_round_trip(stub, reference):
    pb, client = stub
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = reference.tokenizer.apply_chat_template(messages)
    want = expected(reference, prompt, max_tokens=32)
    request = pb.ChatRequest(
        messages=[pb.ChatMessage(**m) for m in messages], sampling=greedy(pb, max_tokens=32)
    )
    text = "".join(m.text for m in client.Chat(request, metadata=AUTH, timeout=120))
    assert text == want.text and "Paris" in text

    ids = client.Tokenize(pb.TokenizeRequest(text="Hello, 世界 123!"), metadata=AUTH).token_ids
    assert list(ids) == reference.tokenizer.encode("Hello, 世界 123!")
    back = client.Detokenize(pb.DetokenizeRequest(token_ids=ids), metadata=AUTH)
    assert back.text == "Hello, 世界 123!"


@pytest.mark.parametrize(
    "field,request_kwargs",
    [
        ("temperature", {"sampling": {"temperature": -1.0}}),
        ("top_p", {"sampling": {"top_p": 0.0}}),
        ("top_k", {"sampling": {"top_k": -2}}),
        ("max_tokens", {"sampling": {"max_tokens": 0}}),
        ("n", {"sampling": {"n": 0}}),
        ("logprobs", {"sampling": {"logprobs": 50}}),
        ("seed", {"sampling": {"seed": -1}}),
        ("min_tokens", {"sampling": {"min_tokens": 30, "max_tokens": 10}}),
        ("prompt", {"text": ""}),
        ("prompt", {"token_ids": {"ids": [10**9]}}),
        ("model", {"model": "no-such-model"}),
    ],
)
def test_bad_fields_are_invalid_argument(stub, field, request_kwargs):
    pb, client = stub
    kwargs = {"text": "hello", **request_kwargs}
    if "sampling" in kwargs:
        kwargs["sampling"] = pb.SamplingParameters(**kwargs["sampling"])
    if "token_ids" in kwargs:
        kwargs.pop("text")
        kwargs["token_ids"] = pb.TokenIds(**kwargs["token_ids"])
    with pytest.raises(grpc.RpcError) as error:
        list(client.Generate(pb.GenerateRequest(**kwargs), metadata=AUTH, timeout=30))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in error.value.details()


def test_api_key_is_required(stub):
    pb, client = stub
    for metadata in ([], [("authorization", "Bearer wrong")]):
        with pytest.raises(grpc.RpcError) as error:
            client.ServerInfo(pb.ServerInfoRequest(), metadata=metadata, timeout=10)
        assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_deadline_and_cancellation_free_their_blocks(stub):
    pb, client = stub
    long = greedy(pb, max_tokens=400, ignore_eos=True)
    with pytest.raises(grpc.RpcError) as error:
        list(
            client.Generate(
                pb.GenerateRequest(text=PROMPTS[0], sampling=long), metadata=AUTH, timeout=0.5
            )
        )
    assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_for_free_blocks(pb, client)

    call = client.Generate(pb.GenerateRequest(text=PROMPTS[1], sampling=long), metadata=AUTH)
    for _, _ in zip(range(3), call, strict=False):
        pass
    call.cancel()
    info = wait_for_free_blocks(pb, client)
    assert info.free_kv_blocks == info.total_kv_blocks > 0


def test_32_concurrent_streams_are_each_exact(stub, reference):
    pb, client = stub
    prompts = [f"{PROMPTS[i % 4]} {i}" for i in range(32)]
    results = reference.generate(prompts, SamplingParams(temperature=0.0, max_tokens=16))
    with ThreadPoolExecutor(32) as pool:
        got = list(pool.map(lambda p: stream_text(pb, client, p, greedy(pb, 16)), prompts))
    for (text, tokens, last), want in zip(got, results, strict=True):
        assert tokens == want.completions[0].token_ids
        assert text == want.completions[0].text
        assert last.finished


def test_full_queue_is_resource_exhausted_and_earlier_requests_finish(stub):
    pb, client = stub
    capacity = 2 * SEQS_PER_REPLICA + MAX_QUEUE  # running in replicas, then queued at the head
    sampling = greedy(pb, max_tokens=48, ignore_eos=True)
    with ThreadPoolExecutor(capacity) as pool:
        first = [
            pool.submit(stream_text, pb, client, f"{PROMPTS[0]} {i}", sampling, 600)
            for i in range(capacity)
        ]
        deadline = time.time() + 60
        while time.time() < deadline:
            info = client.ServerInfo(pb.ServerInfoRequest(), metadata=AUTH)
            if info.running_requests + info.waiting_requests >= capacity:
                break
            time.sleep(0.1)
        with pytest.raises(grpc.RpcError) as error:
            stream_text(pb, client, "one too many", sampling)
        assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        finished = [f.result(timeout=600) for f in first]
    assert all(last.finished and len(tokens) == 48 for _, tokens, last in finished)


def test_failover_mid_stream_keeps_the_text(stub, reference):
    pb, client = stub
    prompt = PROMPTS[3]
    want = expected(reference, prompt, max_tokens=40, ignore_eos=True)
    request = pb.GenerateRequest(text=prompt, sampling=greedy(pb, max_tokens=40, ignore_eos=True))
    text, tokens, victim = "", [], None
    for message in client.Generate(request, metadata=AUTH, timeout=300):
        text += message.text
        tokens += list(message.token_ids)
        if victim is None and len(tokens) >= 8:
            info = client.ServerInfo(pb.ServerInfoRequest(), metadata=AUTH)
            [victim] = [r for r in info.replicas if r.running == 1]
            actor = ray.get_actor(f"afs-worker-{victim.replica_id}-{victim.restarts}", "afs")
            ray.kill(actor, no_restart=True)
    assert victim is not None
    assert tokens == want.token_ids and text == want.text

    deadline = time.time() + 120
    while time.time() < deadline:
        info = client.ServerInfo(pb.ServerInfoRequest(), metadata=AUTH)
        [back] = [r for r in info.replicas if r.replica_id == victim.replica_id]
        if back.state == "ready" and back.restarts == victim.restarts + 1:
            break
        time.sleep(0.5)
    assert back.state == "ready" and back.restarts == victim.restarts + 1
    # the restarted replica serves again: enough concurrent requests reach every replica
    before = back.served
    prompts = [f"{PROMPTS[0]} again {i}" for i in range(6)]
    with ThreadPoolExecutor(6) as pool:
        list(pool.map(lambda p: stream_text(pb, client, p, greedy(pb, 8)), prompts))
    info = client.ServerInfo(pb.ServerInfoRequest(), metadata=AUTH)
    [back] = [r for r in info.replicas if r.replica_id == victim.replica_id]
    assert back.served > before


def test_metrics_count_requests_and_tokens(stub, running):
    pb, client = stub

    def samples():
        url = f"http://127.0.0.1:{running.metrics_port}/metrics"
        body = urllib.request.urlopen(url, timeout=10).read().decode()
        values = {}
        for family in text_string_to_metric_families(body):
            for sample in family.samples:
                if sample.name.endswith("_count") and not sample.labels:
                    values[sample.name] = sample.value
        return values

    before = samples()
    lengths = []
    for prompt in PROMPTS:
        _, tokens, _ = stream_text(pb, client, prompt, greedy(pb, 12, ignore_eos=True))
        lengths.append(len(tokens))
    after = samples()
    ttft = "afs_time_to_first_token_seconds_count"
    gaps = "afs_inter_token_latency_seconds_count"
    assert after[ttft] - before.get(ttft, 0) == len(PROMPTS)
    assert after[gaps] - before.get(gaps, 0) == sum(lengths) - len(PROMPTS)
