"""The gateway over a real loopback port, backed by one in-process engine (no Ray)."""

from __future__ import annotations

import asyncio
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import pytest
from engine_backend import EngineBackend
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from cluster.client import AfsClient, AsyncAfsClient
from cluster.gateway import Gateway
from cluster.metrics import Metrics
from workers.engine.llm_engine import LLMEngine
from workers.engine.sampling_params import SamplingParams

PROMPT = "Once upon a time, in a small village by the sea,"
API_KEY = "test-key"


@dataclass
class Served:
    backend: EngineBackend
    metrics: Metrics
    address: str
    keyed_address: str
    metrics_url: str


@pytest.fixture(scope="module")
def backend():
    engine = LLMEngine(device="cpu", kv_cache_gib=0.1)
    backend = EngineBackend(engine)
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def served(backend):
    """Two gateways (open and keyed) on one event loop in a thread, and /metrics."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="gateway-loop", daemon=True)
    thread.start()

    def run(coroutine, timeout: float = 30):
        return asyncio.run_coroutine_threadsafe(coroutine, loop).result(timeout)

    metrics = Metrics()
    gateway = Gateway(backend, metrics)
    keyed = Gateway(backend, Metrics(), api_key=API_KEY)
    try:
        port = run(gateway.start("127.0.0.1", 0))
        keyed_port = run(keyed.start("127.0.0.1", 0))
        metrics_port = metrics.start_http_server("127.0.0.1", 0)
        yield Served(
            backend,
            metrics,
            f"127.0.0.1:{port}",
            f"127.0.0.1:{keyed_port}",
            f"http://127.0.0.1:{metrics_port}/metrics",
        )
    finally:
        run(gateway.stop(0))
        run(keyed.stop(0))
        metrics.stop()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()


@pytest.fixture
def client(served):
    with AfsClient(served.address, timeout=120) as client:
        yield client


def expected(backend: EngineBackend, prompt, params: SamplingParams):
    [result] = backend.call(lambda engine: engine.generate(prompt, params))
    return result


def greedy(**overrides) -> dict:
    return {"temperature": 0.0, "max_tokens": 12, **overrides}


def wait_for(condition: Callable[[], bool], seconds: float = 20) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def arrivals(backend: EngineBackend) -> int:
    return backend.call(lambda engine: engine._arrivals)


def all_blocks_free_now(backend: EngineBackend) -> bool:
    def check(engine: LLMEngine) -> bool:
        idle = not engine.has_unfinished_requests()
        return idle and engine.kv.pool.num_free_blocks == engine.num_kv_blocks

    return backend.call(check)


def all_blocks_free(backend: EngineBackend) -> bool:
    return wait_for(lambda: all_blocks_free_now(backend))


def scrape(served) -> dict[str, float]:
    with urllib.request.urlopen(served.metrics_url, timeout=10) as response:
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}"] = sample.value
    return samples


def collect(responses) -> dict[int, dict]:
    """Per completion index: its token ids, text and final message."""
    by_index: dict[int, dict] = {}
    for response in responses:
        entry = by_index.setdefault(response.index, {"ids": [], "text": "", "last": None})
        assert entry["last"] is None, "a message after the final one"
        entry["ids"] += response.token_ids
        entry["text"] += response.text
        if response.finished:
            entry["last"] = response
    return by_index


# -- service plumbing --


def test_health_follows_ready_replicas(served):
    with grpc.insecure_channel(served.keyed_address) as channel:  # health needs no key
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "afs.v1.Inference"):
            request = health_pb2.HealthCheckRequest(service=service)
            assert stub.Check(request).status == health_pb2.HealthCheckResponse.SERVING
        served.backend.ready = False
        try:
            status = stub.Check(health_pb2.HealthCheckRequest(service="afs.v1.Inference")).status
            assert status == health_pb2.HealthCheckResponse.NOT_SERVING
        finally:
            served.backend.ready = True
        assert stub.Check(health_pb2.HealthCheckRequest()).status == (
            health_pb2.HealthCheckResponse.SERVING
        )


def test_reflection_lists_the_services(served):
    with grpc.insecure_channel(served.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        [response] = list(stub.ServerReflectionInfo(iter([request])))
    names = {service.name for service in response.list_services_response.service}
    assert {"afs.v1.Inference", "grpc.health.v1.Health"} <= names


def test_models_info_and_tokenize_round_trip(client, served):
    [card] = client.list_models()
    assert card.name == served.backend.model.name and card.max_model_len == 8192
    info = client.server_info()
    assert info.replicas[0].state == "ready" and info.total_kv_blocks > 0
    ids = client.tokenize(PROMPT)
    assert ids == served.backend.tokenizer.encode(PROMPT, add_special_tokens=False)
    assert client.detokenize(ids) == PROMPT


def test_api_key(served):
    for api_key in (None, "wrong"):
        with AfsClient(served.keyed_address, api_key=api_key) as client:
            with pytest.raises(grpc.RpcError) as raised:
                client.tokenize("hi")
            assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.RpcError) as raised:
                list(client.generate_stream("hi", max_tokens=2))
            assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with AfsClient(served.keyed_address, api_key=API_KEY) as client:
        assert client.tokenize("hi") == served.backend.tokenizer.encode("hi", False)
        assert client.health() == "SERVING"


# -- generation --


def test_stream_and_unary_equal_the_engine(client, served):
    options = greedy(max_tokens=10, ignore_eos=True, logprobs=2, prompt_logprobs=1)
    want = expected(served.backend, PROMPT, SamplingParams(**options))
    [completion] = collect(client.generate_stream(PROMPT, request_id="mine", **options)).values()
    assert completion["ids"] == want.completions[0].token_ids
    assert completion["text"] == want.completions[0].text
    last = completion["last"]
    assert (last.finish_reason, last.request_id) == ("length", "mine")
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (
        len(want.prompt_token_ids),
        10,
    )

    result = client.generate(want.prompt_token_ids, **options)
    [unary] = result.completions
    assert list(unary.token_ids) == want.completions[0].token_ids
    assert unary.text == want.completions[0].text and unary.finish_reason == "length"
    assert len(result.request_id) == 32  # a fresh uuid when the client gives none
    assert [lp.token_id for lp in unary.logprobs] == list(unary.token_ids)
    assert all(len(lp.top) == 2 and lp.rank >= 1 for lp in unary.logprobs)
    # prompt positions 1..end: the first prompt token has no logprob
    assert [lp.token_id for lp in result.prompt_logprobs] == want.prompt_token_ids[1:]


def test_chat_equals_the_template_path(client, served):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = served.backend.tokenizer.apply_chat_template(messages)
    want = expected(served.backend, prompt, SamplingParams(**greedy(max_tokens=20)))
    [completion] = collect(client.chat_stream(messages, **greedy(max_tokens=20))).values()
    assert completion["ids"] == want.completions[0].token_ids
    assert completion["text"] == want.completions[0].text
    assert completion["last"].finish_reason == want.completions[0].finish_reason


def test_stop_string_cuts_the_text_and_frees_the_request(client, served):
    base = expected(
        served.backend, PROMPT, SamplingParams(**greedy(max_tokens=24, ignore_eos=True))
    )
    text = base.completions[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    cut = text.find(stop)
    options = greedy(max_tokens=200, ignore_eos=True, stop=[stop])
    [completion] = collect(client.generate_stream(PROMPT, **options)).values()
    assert completion["text"] == text[:cut]
    assert (completion["last"].finish_reason, completion["last"].stop_reason) == ("stop", stop)
    assert completion["ids"] == base.completions[0].token_ids[: len(completion["ids"])]
    assert len(completion["ids"]) < 24
    assert all_blocks_free(served.backend)

    kept = client.generate(PROMPT, include_stop_str_in_output=True, **options)
    assert kept.completions[0].text == text[:cut] + stop


def test_stop_token_ids_match_the_engine(client, served):
    base = expected(served.backend, PROMPT, SamplingParams(**greedy(ignore_eos=True)))
    third = base.completions[0].token_ids[2]
    options = greedy(ignore_eos=True, stop_token_ids=[third])
    want = expected(served.backend, PROMPT, SamplingParams(**options)).completions[0]
    [completion] = collect(client.generate_stream(PROMPT, **options)).values()
    assert (completion["ids"], completion["text"]) == (want.token_ids, want.text)
    assert (completion["last"].finish_reason, completion["last"].stop_reason) == (
        "stop",
        str(third),
    )


def test_n_completions_each_finish(client, served):
    options = {"n": 3, "temperature": 1.0, "seed": 7, "max_tokens": 6, "ignore_eos": True}
    want = expected(served.backend, PROMPT, SamplingParams(**options))
    got = collect(client.generate_stream(PROMPT, **options))
    assert sorted(got) == [0, 1, 2]
    for index, completion in got.items():
        assert completion["ids"] == want.completions[index].token_ids
        assert completion["text"] == want.completions[index].text
        assert completion["last"].finish_reason == "length"


def test_a_failing_completion_is_a_final_message(client, served):
    # More tokens than the whole KV slab holds: the engine fails this request alone.
    too_big = [5] * (served.backend.engine.num_kv_blocks * 16 + 16)
    [completion] = collect(client.generate_stream(too_big, max_tokens=4)).values()
    assert completion["last"].finish_reason == "error" and completion["last"].stop_reason
    assert completion["ids"] == []


def test_async_client_streams_and_cancels(served):
    options = greedy(max_tokens=6, ignore_eos=True)
    want = expected(served.backend, PROMPT, SamplingParams(**options)).completions[0]

    async def run() -> tuple[list[int], bool]:
        async with AsyncAfsClient(served.address, timeout=60) as client:
            ids = []
            async for response in client.generate_stream(PROMPT, **options):
                ids += response.token_ids
            stream = client.generate_stream(PROMPT, max_tokens=2000, ignore_eos=True)
            async for _ in stream:
                break
            busy = not all_blocks_free_now(served.backend)
            await stream.aclose()
            return ids, busy

    ids, busy_while_streaming = asyncio.run(run())
    assert ids == want.token_ids
    assert busy_while_streaming and all_blocks_free(served.backend)


# -- bad input, deadlines, cancellation --


@pytest.mark.parametrize(
    ("prompt", "options", "field"),
    [
        (PROMPT, {"temperature": -1.0}, "temperature"),
        (PROMPT, {"top_p": 0.0}, "top_p"),
        (PROMPT, {"top_k": -2}, "top_k"),
        (PROMPT, {"max_tokens": 0}, "max_tokens"),
        (PROMPT, {"n": 0}, "n"),
        (PROMPT, {"logprobs": 50}, "logprobs"),
        (PROMPT, {"seed": -1}, "seed"),
        (PROMPT, {"stop_token_ids": [10**9]}, "stop_token_ids"),
        ("", {}, "prompt"),
        ([10**9], {}, "prompt"),
        (PROMPT, {"model": "gpt-7"}, "model"),
        ([5] * 8190, {"max_tokens": 16}, "prompt"),
    ],
)
def test_bad_field_is_invalid_argument(client, served, prompt, options, field):
    before = arrivals(served.backend)
    for streamed in (True, False):
        with pytest.raises(grpc.RpcError) as raised:
            if streamed:
                list(client.generate_stream(prompt, **options))
            else:
                client.generate(prompt, **options)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert raised.value.details().startswith(f"{field}:")
    assert arrivals(served.backend) == before  # the engine never saw them


def test_bad_chat_messages(client):
    for messages, field in (([], "messages"), ([("robot", "hi")], "messages[0].role")):
        with pytest.raises(grpc.RpcError) as raised:
            list(client.chat_stream(messages, max_tokens=2))
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert raised.value.details().startswith(f"{field}:")


def test_deadline_aborts_the_request(client, served):
    before, errors = arrivals(served.backend), scrape(served)
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as raised:
        list(client.generate_stream(PROMPT, timeout=0.05, max_tokens=2000, ignore_eos=True))
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 5
    assert arrivals(served.backend) == before + 1  # it reached the engine, then was aborted
    assert all_blocks_free(served.backend)
    name = "afs_request_errors_total{code=DEADLINE_EXCEEDED}"
    assert scrape(served).get(name, 0) == errors.get(name, 0) + 1


def test_cancelled_stream_frees_its_blocks(client, served):
    errors = scrape(served)
    call = client.generate_stream(PROMPT, max_tokens=2000, ignore_eos=True)
    first = next(call)
    assert first.token_ids and not first.finished
    assert not all_blocks_free_now(served.backend)
    call.cancel()
    assert all_blocks_free(served.backend)
    name = "afs_request_errors_total{code=CANCELLED}"
    assert wait_for(lambda: scrape(served).get(name, 0) == errors.get(name, 0) + 1)


# -- metrics --


def test_metrics_count_requests_tokens_and_errors(client, served):
    before = scrape(served)
    first = client.generate(PROMPT, **greedy(max_tokens=5, ignore_eos=True))
    second = collect(client.generate_stream(PROMPT, n=2, seed=1, max_tokens=4, ignore_eos=True))
    with pytest.raises(grpc.RpcError):
        client.generate(PROMPT, top_p=0.0)
    after = scrape(served)

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    tokens = len(first.completions[0].token_ids) + sum(len(c["ids"]) for c in second.values())
    assert tokens == 5 + 2 * 4
    assert delta("afs_time_to_first_token_seconds_count{}") == 2
    assert delta("afs_inter_token_latency_seconds_count{}") == tokens - 3
    assert delta("afs_e2e_request_latency_seconds_count{}") == 2
    assert delta("afs_generation_tokens_total{}") == tokens
    assert delta("afs_prompt_tokens_total{}") == 2 * first.usage.prompt_tokens
    assert delta("afs_requests_total{finish_reason=length}") == 3
    assert delta("afs_request_errors_total{code=INVALID_ARGUMENT}") == 1
