"""The load generator: its statistics on hand-made traces, workloads, schedules, flags, and a run
against a small fake gRPC server."""

from __future__ import annotations

import argparse
import json
import time
from concurrent import futures

import grpc
import numpy as np
import pytest

from cluster import loadtest
from cluster.loadtest import RequestRecord
from protos.afs.v1 import inference_pb2, inference_pb2_grpc

# -- statistics on hand-made traces --


def _trace() -> RequestRecord:
    # 1 token at 0.10 s, 2 at 0.15, an empty message at 0.25, 3 at 0.30: 6 tokens
    return RequestRecord(
        prompt_len=10,
        output_len=6,
        send_time=0.0,
        arrival_times=[0.10, 0.15, 0.25, 0.30],
        token_counts=[1, 2, 0, 3],
    )


def test_request_latencies_of_a_trace():
    ttft, tpot, e2e, tokens = loadtest.request_latencies(_trace())
    assert (ttft, e2e, tokens) == (pytest.approx(0.10), pytest.approx(0.30), 6)
    assert tpot == pytest.approx((0.30 - 0.10) / 5)


def test_inter_token_latencies_count_a_gap_then_zeros():
    record = _trace()
    itl = loadtest.inter_token_latencies(record.arrival_times, record.token_counts)
    np.testing.assert_allclose(itl, [0.05, 0.0, 0.15, 0.0, 0.0], atol=1e-12)
    # the first message's extra tokens arrived with it
    np.testing.assert_array_equal(loadtest.inter_token_latencies([0.2], [3]), [0.0, 0.0])
    assert loadtest.inter_token_latencies([0.2], [1]).size == 0


def test_a_trailing_empty_message_ends_the_request():
    record = RequestRecord(10, 2, 0.0, [0.1, 0.2, 0.4], [1, 1, 0])
    ttft, tpot, e2e, _ = loadtest.request_latencies(record)
    assert (ttft, tpot, e2e) == pytest.approx((0.1, 0.3, 0.4))
    np.testing.assert_allclose(loadtest.inter_token_latencies([0.1, 0.2, 0.4], [1, 1, 0]), [0.1])


def _records() -> list[RequestRecord]:
    single = RequestRecord(20, 2, 1.0, [1.05], [1])  # asked for 2, got 1: a mismatch
    failed = [RequestRecord(5, 6, 0.0, error="UNAVAILABLE") for _ in range(2)]
    return [_trace(), single, *failed, RequestRecord(5, 6, 0.0, [0.1], [0], "EMPTY_STREAM")]


def test_summarize_gives_exact_figures():
    report = loadtest.summarize(_records(), duration_s=2.0)
    assert report["num_requests"] == 5
    assert (report["completed"], report["failed"]) == (2, 3)
    assert report["errors"] == {"EMPTY_STREAM": 1, "UNAVAILABLE": 2}
    assert report["output_len_mismatches"] == 1
    assert (report["total_input_tokens"], report["total_output_tokens"]) == (30, 7)
    assert report["request_throughput"] == pytest.approx(1.0)
    assert report["output_token_throughput"] == pytest.approx(3.5)
    assert report["total_token_throughput"] == pytest.approx(18.5)
    assert report["goodput"] is None
    # TTFT 100 and 50 ms; percentiles interpolate linearly
    assert report["ttft_ms"] == pytest.approx({"mean": 75.0, "p50": 75.0, "p90": 95.0, "p99": 99.5})
    # the one-token request has no TPOT
    assert report["tpot_ms"] == pytest.approx({"mean": 40.0, "p50": 40.0, "p90": 40.0, "p99": 40.0})
    # ITL values 0, 0, 0, 50, 150 ms
    assert report["itl_ms"] == pytest.approx({"mean": 40.0, "p50": 0.0, "p90": 110.0, "p99": 146.0})
    assert report["e2e_ms"]["mean"] == pytest.approx(175.0)


@pytest.mark.parametrize(
    ("slo_ttft_ms", "slo_tpot_ms", "goodput"),
    [(80.0, None, 0.5), (None, 30.0, 0.5), (200.0, 50.0, 1.0), (10.0, 10.0, 0.0)],
)
def test_goodput_counts_requests_meeting_every_slo(slo_ttft_ms, slo_tpot_ms, goodput):
    report = loadtest.summarize(_records(), 2.0, slo_ttft_ms, slo_tpot_ms)
    assert report["goodput"] == pytest.approx(goodput)


def test_summary_of_only_failures_has_no_latencies():
    report = loadtest.summarize([RequestRecord(5, 6, error="UNAUTHENTICATED")], 1.0, 100.0)
    assert report["completed"] == 0 and report["goodput"] == 0.0
    assert report["itl_ms"] == {"mean": None, "p50": None, "p90": None, "p99": None}
    assert "-" in loadtest.format_report(report)
    json.dumps(report, allow_nan=False)


# -- workload and schedule --


def test_length_distributions_are_seeded_and_within_range():
    def draw(dist, spread, seed=0):
        return loadtest.sample_lengths(np.random.default_rng(seed), 20_000, 100, dist, spread)

    np.testing.assert_array_equal(draw("fixed", 0.5), np.full(20_000, 100))
    uniform = draw("uniform", 0.1)
    assert (uniform.min(), uniform.max()) == (90, 110)
    assert abs(uniform.mean() - 100) < 0.5
    normal = draw("normal", 0.2)
    assert normal.min() >= 1 and normal.max() <= 199
    assert abs(normal.mean() - 100) < 1 and abs(normal.std() - 20) < 1
    np.testing.assert_array_equal(draw("normal", 0.2), normal)
    assert not np.array_equal(draw("normal", 0.2, seed=1), normal)
    with pytest.raises(ValueError, match="--len-dist"):
        draw("zipf", 0.1)


def test_poisson_schedule_has_the_asked_rate():
    offsets = loadtest.poisson_arrival_times(np.random.default_rng(3), 20_000, 50.0)
    gaps = np.diff(offsets)
    assert offsets[0] == 0.0 and (gaps >= 0).all()
    assert (len(offsets) - 1) / offsets[-1] == pytest.approx(50.0, rel=0.03)
    # exponential gaps: standard deviation equal to the mean
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.05)
    again = loadtest.poisson_arrival_times(np.random.default_rng(3), 20_000, 50.0)
    np.testing.assert_array_equal(again, offsets)


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    loadtest.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_workload_too_long_for_the_model_is_refused():
    card = inference_pb2.ModelCard(name="m", vocab_size=50, max_model_len=100)
    args = _args("--concurrency", "1", "--input-len", "90", "--output-len", "20")
    with pytest.raises(ValueError, match="max_model_len 100"):
        loadtest.build_workload(args, np.random.default_rng(0), card)


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--concurrency", "0"], "--concurrency"),
        (["--request-rate", "0"], "--request-rate"),
        (["--request-rate", "inf"], "--request-rate"),
        (["--concurrency", "1", "--num-requests", "0"], "--num-requests"),
        (["--concurrency", "1", "--input-len", "0"], "--input-len"),
        (["--concurrency", "1", "--output-len", "-3"], "--output-len"),
        (["--concurrency", "1", "--len-spread", "1"], "--len-spread"),
        (["--concurrency", "1", "--shared-prefix-len", "-1"], "--shared-prefix-len"),
        (["--concurrency", "1", "--temperature", "-0.5"], "--temperature"),
        (["--concurrency", "1", "--slo-ttft-ms", "0"], "--slo-ttft-ms"),
        (["--concurrency", "1", "--slo-tpot-ms", "nan"], "--slo-tpot-ms"),
        (["--concurrency", "1", "--timeout", "0"], "--timeout"),
    ],
)
def test_bad_arguments_name_their_flag(argv, flag, capsys):
    with pytest.raises(ValueError, match=f"^{flag} must be"):
        loadtest.check_args(_args(*argv))
    # the CLI: exit code 2, one line on stderr, before any connection is tried
    assert loadtest.main(["--server", "127.0.0.1:1", *argv]) == 2
    assert capsys.readouterr().err.count("\n") == 1


@pytest.mark.parametrize("argv", [[], ["--concurrency", "2", "--request-rate", "5"]])
def test_exactly_one_load_mode_is_required(argv):
    with pytest.raises(SystemExit) as exit_info:
        _args(*argv)
    assert exit_info.value.code == 2


# -- a run against a fake server --

VOCAB = 97
FIRST_DELAY_S, TOKEN_DELAY_S = 0.03, 0.01


class _FakeInference(inference_pb2_grpc.InferenceServicer):
    """Streams max_tokens tokens, two a message: the first after 30 ms, the rest 10 ms apart."""

    def __init__(self, api_key: str | None) -> None:
        self.api_key = api_key
        self.requests: list[inference_pb2.GenerateRequest] = []

    def ListModels(self, request, context):
        card = inference_pb2.ModelCard(name="fake", vocab_size=VOCAB, max_model_len=4096)
        return inference_pb2.ListModelsResponse(models=[card])

    def Generate(self, request, context):
        if self.api_key and ("authorization", f"Bearer {self.api_key}") not in tuple(
            context.invocation_metadata()
        ):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong API key")
        self.requests.append(request)
        sent, total = 0, request.sampling.max_tokens
        time.sleep(FIRST_DELAY_S)
        while sent < total:
            if sent:
                time.sleep(TOKEN_DELAY_S)
            count = min(2, total - sent)
            sent += count
            yield inference_pb2.GenerateResponse(
                token_ids=[1] * count, finished=sent == total, finish_reason="length"
            )


@pytest.fixture
def fake_server():
    servicer = _FakeInference(api_key="secret")
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    inference_pb2_grpc.add_InferenceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", servicer
    server.stop(grace=None)


def test_closed_loop_run_measures_the_fake_server(fake_server, tmp_path, capsys):
    address, servicer = fake_server
    out = tmp_path / "report.json"
    args = _args(
        *("--server", address, "--api-key", "secret", "--concurrency", "4", "--seed", "1"),
        *("--num-requests", "8", "--input-len", "12", "--output-len", "6"),
        *("--shared-prefix-len", "5", "--slo-ttft-ms", "10000", "--out", str(out)),
    )
    report = loadtest.run(args)
    assert json.loads(out.read_text()) == report
    assert "TTFT" in capsys.readouterr().out
    assert (report["completed"], report["errors"], report["output_len_mismatches"]) == (8, {}, 0)
    assert report["total_output_tokens"] == 48 and report["total_input_tokens"] == 8 * 17
    # messages at 30, 40, 50 ms: TTFT >= 30 ms, TPOT = 20 ms / 5 tokens, ITL = 0, 10, 0, 10, 0
    assert 30 <= report["ttft_ms"]["p50"] < 300
    assert 4 <= report["tpot_ms"]["p50"] < 40
    assert report["itl_ms"]["p50"] == 0.0
    assert report["goodput"] == pytest.approx(report["request_throughput"])
    assert report["request_throughput"] <= 8 / (2 * 0.05)  # two rounds of four 50 ms streams
    # what the server was sent: exact lengths, ignore_eos, a shared prefix, ids in the vocabulary
    prompts = [list(request.token_ids.ids) for request in servicer.requests]
    assert all(len(prompt) == 17 and max(prompt) < VOCAB for prompt in prompts)
    assert len({tuple(prompt[:5]) for prompt in prompts}) == 1
    assert len({tuple(prompt[5:]) for prompt in prompts}) == 8
    assert all(r.sampling.ignore_eos and r.sampling.max_tokens == 6 for r in servicer.requests)
    assert all(r.sampling.temperature == 0.0 and r.model == "fake" for r in servicer.requests)


def test_open_loop_run_and_errors_by_code(fake_server):
    address, _ = fake_server
    argv = ("--server", address, "--request-rate", "200", "--num-requests", "6")
    argv += ("--output-len", "3", "--len-dist", "uniform", "--len-spread", "0.5")
    report = loadtest.run(_args(*argv, "--api-key", "secret"))
    assert report["completed"] == 6 and report["output_len_mismatches"] == 0
    assert report["config"]["request_rate"] == 200 and "api_key" not in report["config"]
    unauthenticated = loadtest.run(_args(*argv))
    assert unauthenticated["errors"] == {"UNAUTHENTICATED": 6}
    assert unauthenticated["ttft_ms"]["mean"] is None


def test_main_reports_an_unknown_model_and_an_unreachable_server(fake_server, capsys):
    address, _ = fake_server
    assert loadtest.main(["--server", address, "--concurrency", "1", "--model", "other"]) == 2
    assert "'other'" in capsys.readouterr().err
    assert loadtest.main(["--server", "127.0.0.1:1", "--concurrency", "1"]) == 1
    assert "UNAVAILABLE" in capsys.readouterr().err


def test_a_run_is_a_serving_result_in_the_report(fake_server, tmp_path):
    from workers.bench import report as bench_report
    from workers.bench.results import load_result

    address, _ = fake_server
    runs = tmp_path / "BENCHMARKS.md"
    args = _args(
        *("--server", address, "--api-key", "secret", "--concurrency", "2", "--num-requests", "4"),
        *("--input-len", "8", "--output-len", "4", "--out-dir", str(tmp_path / "results")),
        *("--report", str(runs)),
    )
    report = loadtest.run(args)
    [path] = (tmp_path / "results").glob("serving-*.json")
    result = load_result(path)
    assert result["kind"] == "serving" and result["figures"] == report
    assert "api_key" not in result["config"] and "| serving |" in runs.read_text()
    parser = argparse.ArgumentParser()
    bench_report.add_arguments(parser)
    bench_report.run(parser.parse_args([
        "--results-dir", str(tmp_path / "results"), "--out", str(runs),
        "--plots-dir", str(tmp_path / "plots"),
    ]))  # fmt: skip
    assert "### serving" in runs.read_text()
    assert any(p.stat().st_size > 1000 for p in (tmp_path / "plots").glob("*.png"))
