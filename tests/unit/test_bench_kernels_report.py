"""`afs bench kernels` on CPU at small shapes, and `afs bench report` over synthetic results."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from workers.attention.torch_ref import TorchRefBackend
from workers.bench import kernels, report
from workers.bench.results import load_result, write_result

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SDPA_IMPLS = {"sdpa_flash", "sdpa_cudnn", "sdpa_efficient", "sdpa_math"}
STATUSES = {"ok", "unavailable", "not implemented", "wrong"}


def _run(module, argv: list[str]) -> Path:
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return module.run(parser.parse_args(argv))


def _kernels(tmp_path: Path, *extra: str) -> dict:
    # ceilings kept tiny: they only need to exist for the fractions
    argv = [
        *("--shapes", "small", "--device", "cpu", "--rep-ms", "5"),
        *("--size-gib", "0.005", "--repeats", "2", "--matmul-size", "64"),
        *("--out-dir", str(tmp_path / "results"), "--report", str(tmp_path / "BENCHMARKS.md")),
        *extra,
    ]
    return load_result(_run(kernels, argv))


def test_kernels_small_cpu_checks_torch_ref_against_sdpa(tmp_path):
    result = _kernels(tmp_path)
    assert result["kind"] == "kernels" and result["config"]["device"] == "cpu"
    shapes = {(s.phase, s.name) for s in kernels.SHAPES["small"]}
    ours = result["figures"]["rows"]
    assert {(r["phase"], r["shape"]) for r in ours} == shapes
    assert {r["impl"] for r in ours} == {"torch_ref"}
    for row in ours:
        # checked against the fp32 reference before it was timed
        assert row["status"] == "ok", row
        assert row["max_abs_err"] <= kernels.TOLERANCE[torch.bfloat16]
        assert row["median_ms"] > 0 and row["rate"] > 0
        assert 0 < row["roofline_fraction"] and row["floor_ms"] > 0
        assert row["vs_best_sdpa"] > 0
    peers = result["peers"]["rows"]
    assert {(r["phase"], r["shape"], r["impl"]) for r in peers} == {
        (phase, name, impl) for phase, name in shapes for impl in SDPA_IMPLS
    }
    assert {r["status"] for r in peers} <= STATUSES
    for row in peers:
        assert (row["status"] == "ok") == ("rate" in row)
        if row["status"] != "ok":
            assert row["reason"]
    assert all(r["status"] == "ok" for r in peers if r["impl"] == "sdpa_math")
    ceilings = result["floors"]["ceilings"]
    assert ceilings["copy_gbps"] > 0 and ceilings["matmul_tflops_bfloat16"] > 0
    assert "| kernels |" in (tmp_path / "BENCHMARKS.md").read_text()


class _ZerosBackend(TorchRefBackend):
    def forward(self, q, k, v, kv_cache, meta, scale, kv_stored=False):
        return torch.zeros_like(q)


def test_kernels_never_times_a_wrong_or_missing_backend(tmp_path, monkeypatch):
    real = kernels.get_backend

    def get_backend(name: str, device: str):
        return _ZerosBackend() if name == "zeros" else real(name, device)

    monkeypatch.setattr(kernels, "get_backend", get_backend)
    rows = _kernels(tmp_path, "--backends", "torch_ref,zeros,nonexistent")["figures"]["rows"]
    by_impl = {impl: [r for r in rows if r["impl"] == impl] for impl in ("zeros", "nonexistent")}
    assert all(r["status"] == "wrong" and "median_ms" not in r for r in by_impl["zeros"])
    assert all(r["max_abs_err"] > kernels.TOLERANCE[torch.bfloat16] for r in by_impl["zeros"])
    assert all(r["status"] == "not implemented" for r in by_impl["nonexistent"])
    assert all(r["status"] == "ok" for r in rows if r["impl"] == "torch_ref")
    assert len(rows) == 3 * len(kernels.SHAPES["small"])


def _serving(concurrency: int, out_dir: Path, report_path: Path) -> None:
    figures = {
        "output_token_throughput": 30.0 * concurrency**0.7,
        "ttft_ms": {"mean": 100.0, "p50": 95.0 + concurrency, "p90": 120.0, "p99": 150.0},
        "itl_ms": {"mean": 31.0, "p50": 30.0, "p90": 35.0 + concurrency, "p99": 48.0},
    }
    config = {"concurrency": concurrency}
    path = write_result("serving", config, figures, out_dir=out_dir, report=report_path)
    # results of one kind written within a second share a file name
    path.rename(path.with_name(f"serving-c{concurrency}.json"))


def test_report_renders_tables_and_plots_between_markers(tmp_path):
    results, out, plots = tmp_path / "results", tmp_path / "BENCHMARKS.md", tmp_path / "plots"
    out.write_text("# Benchmarks\n\nHand-written notes.\n")
    for concurrency in (1, 4, 16):
        _serving(concurrency, results, out)
    figures = {"output_tok_s": 120.5, "roofline_fraction": 0.42}
    write_result("throughput", {"max_num_seqs": 8}, figures, out_dir=results, report=out)
    (results / "not_a_result.json").write_text(json.dumps({"rows": []}))
    argv = ["--results-dir", str(results), "--out", str(out), "--plots-dir", str(plots)]
    for _ in range(2):  # a second run replaces the section, it doesn't add one
        assert _run(report, argv) == out
    for name in ("throughput", "latency", "roofline"):
        png = (plots / f"{name}.png").read_bytes()
        assert png.startswith(PNG_MAGIC) and len(png) > 1024
    text = out.read_text()
    assert text.count(report.MARK_BEGIN) == 1 and text.count(report.MARK_END) == 1
    begin, end = text.index(report.MARK_BEGIN), text.index(report.MARK_END)
    # the generated section sits before the Runs table that write_result keeps appending to
    assert text.index("Hand-written notes.") < begin < end < text.index("## Runs")
    section = text[begin:end]
    assert "![throughput](plots/throughput.png)" in section
    assert "![roofline](plots/roofline.png)" in section
    assert "| ttft_ms | 100 | 111 | 120 | 150 |" in section  # the concurrency-16 run
    assert "| roofline_fraction | 0.42 |" in section
    assert "`not_a_result.json`" in section
    assert section.index("### throughput") < section.index("### serving")


@pytest.mark.parametrize("markers", [False, True])
def test_report_section_placement(markers):
    section = "## Report\n\nnew"
    old = f"{report.MARK_BEGIN}\nold\n{report.MARK_END}\n" if markers else ""
    text = f"# B\n\nintro\n\n{old}\n## Runs\n\n| row |\n"
    replaced = report.replace_section(text, section)
    assert "old" not in replaced and replaced.count("new") == 1
    assert replaced.index("intro") < replaced.index("new") < replaced.index("## Runs")
    assert replaced.rstrip().endswith("| row |")
