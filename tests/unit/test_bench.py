"""`afs bench ceilings | latency | throughput` on CPU with tiny settings: every result matches the
schema, its figures are finite and positive, a row lands in the report; and the pieces under them
(the roofline, the workloads, the transformers peer's copy of our weights)."""

from __future__ import annotations

import argparse
import math

import pytest
import torch
from checkpoints import make_checkpoint

from cluster import cli
from workers.bench import latency
from workers.bench.ceilings import Roofline, ratios
from workers.bench.latency import hf_first_and_total, hf_peer_model
from workers.bench.results import load_result
from workers.bench.throughput import make_workload
from workers.weights.loader import load_model

transformers = pytest.importorskip("transformers")

CEILING_FLAGS = ["--device", "cpu", "--size-gib", "0.004", "--repeats", "9", "--matmul-size", "128"]
LATENCY_KEYS = {
    "prefill_ms", "prefill_tok_s", "prefill_roofline_fraction", "decode_tok_s",
    "decode_ms_per_token", "decode_roofline_fraction",
}  # fmt: skip
THROUGHPUT_KEYS = {
    "output_tok_s", "total_tok_s", "requests_s", "wall_s", "roofline_fraction", "steps",
    "decode_steps", "decode_step_ms", "decode_batch_mean", "decode_roofline_fraction",
    "peak_memory_gib", "kv_usage_peak",
}  # fmt: skip


def _bench(tmp_path, *flags: str) -> dict:
    """Run `afs bench ...` into tmp_path; the one result it wrote, after the report row."""
    report = tmp_path / "BENCHMARKS.md"
    assert cli.main(["bench", *flags, "--out-dir", str(tmp_path), "--report", str(report)]) == 0
    (path,) = tmp_path.glob(f"{flags[0]}-*.json")
    rows = [line for line in report.read_text().splitlines() if line.startswith("| 20")]
    assert len(rows) == 1 and f"| {flags[0]} |" in rows[0] and path.as_posix() in rows[0]
    return load_result(path)


def _assert_positive(figures: dict, keys: set[str]) -> None:
    assert keys <= figures.keys()
    for key in keys:
        assert math.isfinite(figures[key]) and figures[key] > 0, key


def test_ceilings(tmp_path):
    result = _bench(tmp_path, "ceilings", *CEILING_FLAGS)
    assert result["kind"] == "ceilings" and result["config"]["matmul_size"] == 128
    _assert_positive(result["figures"], {"copy_gbps", "matmul_tflops_float32"})


def test_latency_with_the_hf_peer(tmp_path, tiny_llama_dir):
    flags = ["--model", str(tiny_llama_dir), "--prompt-lens", "8,40", "--new-tokens", "12"]
    result = _bench(tmp_path, "latency", *flags, "--peer", "hf", *CEILING_FLAGS)
    figures, floors, peer = result["figures"], result["floors"], result["peers"]["hf"]
    assert set(figures) == {"prompt_len_8", "prompt_len_40"}
    _assert_positive(floors["ceilings"], {"copy_gbps", "matmul_tflops_float32"})
    for key, row in figures.items():
        _assert_positive(row, LATENCY_KEYS)
        _assert_positive(peer["figures"][key], LATENCY_KEYS)
        _assert_positive(peer["afs_over_peer"][key], LATENCY_KEYS)
        _assert_positive(floors[key], {"prefill_ms", "decode_ms_per_token", "decode_tok_s"})
        # nothing beats its floor
        assert row["decode_ms_per_token"] > floors[key]["decode_ms_per_token"]
        assert row["prefill_roofline_fraction"] < 1 and row["decode_roofline_fraction"] < 1
        assert row["decode_tok_s"] == pytest.approx(1e3 / row["decode_ms_per_token"])


def test_the_hf_peer_times_are_the_least_of_their_runs(monkeypatch):
    runs = {1: [0.009, 0.002, 0.004], 12: [0.007, 0.005, 0.006]}  # seconds, in the order run
    order = []
    monkeypatch.setattr(
        latency, "hf_generate", lambda hf, prompts, n: order.append(n) or runs[n].pop(0)
    )
    assert hf_first_and_total(None, [1, 2, 3], 12) == (0.002, 0.005)
    assert order == [1, 12] * 3  # alternating, so that a busy spell falls on both
    runs = {1: [0.004, 0.003, 0.005], 12: [0.003, 0.004, 0.003]}  # t(N) never above t(1)
    with pytest.raises(RuntimeError, match="too few new tokens"):
        hf_first_and_total(None, [1, 2, 3], 12)


def test_throughput_with_the_hf_peer(tmp_path, tiny_llama_dir):
    flags = ["--model", str(tiny_llama_dir), "--num-requests", "6", "--kv-cache-gib", "0.0002"]
    lengths = ["--input-len-range", "10,60", "--output-len-range", "4,12", "--peer-batch-size", "4"]
    result = _bench(tmp_path, "throughput", *flags, *lengths, "--peer", "hf", *CEILING_FLAGS)
    figures, peer = result["figures"], result["peers"]["hf"]
    _assert_positive(figures, THROUGHPUT_KEYS)
    _assert_positive(result["floors"], {"wall_s", "output_tok_s", "decode_step_ms"})
    _assert_positive(peer["figures"], {"output_tok_s", "total_tok_s", "requests_s", "wall_s"})
    assert 6 * 4 <= figures["output_tokens"] <= 6 * 12
    assert peer["figures"]["generated_tokens"] >= figures["output_tokens"]  # batches wait
    assert figures["wall_s"] > result["floors"]["wall_s"]
    assert 0 < figures["kv_usage_peak"] <= 1 and figures["decode_batch_mean"] >= 1
    assert peer["afs_over_peer"]["output_tok_s"] == pytest.approx(
        figures["output_tok_s"] / peer["figures"]["output_tok_s"]
    )


def test_shared_prefix_throughput_hits_the_prefix_cache(tmp_path, tiny_llama_dir):
    flags = ["--model", str(tiny_llama_dir), "--workload", "shared-prefix", "--prefix-len", "64"]
    lengths = ["--num-requests", "4", "--input-len-range", "8", "--output-len-range", "3"]
    result = _bench(tmp_path, "throughput", *flags, *lengths, *CEILING_FLAGS)
    figures = result["figures"]
    assert figures["prompt_tokens"] == 4 * (64 + 8) and figures["output_tokens"] == 4 * 3
    assert figures["prefix_hit_rate"] > 0 and figures["preemptions"] == 0


def _workload_args(workload: str, seed: int = 0) -> argparse.Namespace:
    return argparse.Namespace(
        workload=workload, num_requests=50, input_len_range=(5, 9), output_len_range=(2, 4),
        prefix_len=6, seed=seed,
    )  # fmt: skip


def test_workloads():
    default = make_workload(_workload_args("default"), vocab_size=100)
    assert default == make_workload(_workload_args("default"), vocab_size=100)
    assert default != make_workload(_workload_args("default", seed=1), vocab_size=100)
    assert {len(p) for p, _ in default} == set(range(5, 10))
    assert {n for _, n in default} == {2, 3, 4}
    assert all(0 <= t < 100 for p, _ in default for t in p)
    fixed = make_workload(_workload_args("fixed"), vocab_size=100)
    assert {(len(p), n) for p, n in fixed} == {(9, 4)}
    shared = make_workload(_workload_args("shared-prefix"), vocab_size=100)
    assert len({tuple(p[:6]) for p, _ in shared}) == 1
    assert len({tuple(p[6:]) for p, _ in shared}) == 50


def test_roofline_step_floor():
    roofline = Roofline(
        weight_bytes=1000, linear_params=10, lm_head_params=7, attention_width=3,
        kv_bytes_per_token=4, bytes_per_second=100.0, flops_per_second=50.0,
    )  # fmt: skip
    # decode: (1000 + 4·(9 + 1)) / 100 s of memory against (2·10 + 2·7 + 4·3·10) / 50 of compute
    assert roofline.step_seconds([(9, 1)], sampled=1) == pytest.approx(10.4)
    # prefill of 20: memory (1000 + 80) / 100; keys 20·10.5, FLOPs 400 + 14 + 2520
    assert roofline.step_seconds([(0, 20)], sampled=1) == pytest.approx(2934 / 50)
    assert ratios({"a": 6, "b": {"c": 1.0}, "d": 2}, {"a": 3, "b": {"c": 4}}) == {
        "a": 2.0,
        "b": {"c": 0.25},
    }


@pytest.mark.parametrize("family", ["Olmo2", "Llama"])
def test_hf_peer_holds_our_weights(tmp_path, family):
    """Our fused projections split back: the peer equals the checkpoint it was loaded from."""
    overrides = dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    original = make_checkpoint(tmp_path, family, overrides)
    ours = load_model(str(tmp_path), dtype="float32")
    peer = hf_peer_model(ours.model, ours.config)
    expected = original.state_dict()
    assert peer.state_dict().keys() == expected.keys()
    for name, tensor in peer.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    ids = torch.randint(0, ours.config.vocab_size, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(peer(ids).logits, original(ids).logits)


def test_bad_flags_exit_2(tmp_path, capsys, tiny_llama_dir):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", "throughput", "--input-len-range", "9,3"])
    assert exit_info.value.code == 2
    too_long = ["--model", str(tiny_llama_dir), "--prompt-lens", "1000", "--new-tokens", "100"]
    assert cli.main(["bench", "latency", *too_long, "--out-dir", str(tmp_path)]) == 2
    assert "exceed" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
