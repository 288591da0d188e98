"""Every benchmark result as markdown tables and plots in BENCHMARKS.md.

    afs bench report [--results-dir benchmarks/results] [--out benchmarks/BENCHMARKS.md]
                     [--plots-dir benchmarks/plots]

Each result JSON that `load_result` accepts becomes a table set under its kind (ceilings,
latency, throughput, kernels, serving, then any other); files that are not results are named and
skipped. Plots (PNG, matplotlib's Agg backend; left out when matplotlib is not installed):
throughput against batch size or concurrency where runs give several points, TTFT / ITL
percentiles of the serving runs, and every `*roofline_fraction` figure of every run. The output
replaces what lies between the report markers; the text around them is kept. Without markers the
section goes before `## Runs`, so that the rows `write_result` appends stay in that table, or at
the end when there is no such heading.
"""

from __future__ import annotations

import argparse
import json
import os
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from workers.bench.results import REPORT, RESULTS_DIR, RUNS_HEADING, load_result

MARK_BEGIN, MARK_END = "<!-- report:begin -->", "<!-- report:end -->"
KIND_ORDER = ("ceilings", "latency", "throughput", "kernels", "serving")
X_KEYS = ("concurrency", "batch_size", "max_num_seqs")  # config keys that set a run's batch
Y_KEYS = ("output_tok_s", "output_token_throughput")  # figures that give a run's throughput
PERCENTILES = ("p50", "p90", "p99")
LATENCY_METRICS = ("ttft_ms", "itl_ms")
ROW_LABEL_SKIP = ("status", "unit", "reason")  # string fields of a row that don't name it
MAX_CELL = 160

Result = tuple[Path, dict[str, Any]]


def load_results(results_dir: Path) -> tuple[list[Result], list[Path]]:
    """Results oldest first, and the JSON files that are not results."""
    results, skipped = [], []
    for path in sorted(results_dir.glob("*.json")):
        try:
            results.append((path, load_result(path)))
        except (ValueError, TypeError):
            skipped.append(path)
    return sorted(results, key=lambda item: item[1]["timestamp"]), skipped


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, str | int | float | bool)


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    if len(text) > MAX_CELL:  # the whole text stays in the JSON
        text = text[: MAX_CELL - 1] + "…"
    return text.replace("|", "\\|").replace("\n", " ")


def _table(columns: list[str], rows: list[list[Any]]) -> list[str]:
    return [
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
        *("| " + " | ".join(_fmt(cell) for cell in row) + " |" for row in rows),
        "",
    ]


def _columns(rows: list[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(key for row in rows for key in row))


def render_mapping(title: str, mapping: dict[str, Any]) -> list[str]:
    """Tables for one mapping: its scalars; each list of rows; sibling dicts of the same keys
    (percentiles, one dict per prompt length) as one table; deeper dicts in turn."""
    lines: list[str] = []
    scalars = [[key, value] for key, value in mapping.items() if _is_scalar(value)]
    if scalars:
        lines += [f"*{title}*", "", *_table(["figure", "value"], scalars)]
    groups: dict[tuple[str, ...], list[tuple[str, dict]]] = defaultdict(list)
    for key, value in mapping.items():
        if isinstance(value, list) and value and all(isinstance(row, dict) for row in value):
            columns = _columns(value)
            rows = [[row.get(column) for column in columns] for row in value]
            lines += [f"*{title} · {key}*", "", *_table(columns, rows)]
        elif isinstance(value, list):
            lines += [f"*{title} · {key}*: {_fmt(value)}", ""]
        elif isinstance(value, dict) and value and all(map(_is_scalar, value.values())):
            groups[tuple(value)].append((key, value))
        elif isinstance(value, dict) and value:
            lines += render_mapping(f"{title} · {key}", value)
    for columns, members in groups.items():
        rows = [[key, *value.values()] for key, value in members]
        lines += [f"*{title} · {', '.join(k for k, _ in members)}*", ""]
        lines += _table(["", *columns], rows)
    return lines


def run_label(result: dict[str, Any]) -> str:
    config = result["config"]
    batch = next((f"{key}={config[key]}" for key in X_KEYS if key in config), None)
    return f"{result['kind']} {batch or result['timestamp'][:16]}"


def render_result(path: Path, result: dict[str, Any], out: Path) -> list[str]:
    device = result["machine"].get("gpu") or result["machine"].get("processor")
    link = Path(os.path.relpath(path, out.parent)).as_posix()
    config = ", ".join(f"{key}={_fmt(value)}" for key, value in result["config"].items())
    lines = [
        f"#### {result['timestamp']} · {device} · `{result['command']}`",
        "",
        f"[result]({link}), commit {result['git_commit']}; config: {config}",
        "",
    ]
    for part in ("figures", "floors", "peers"):
        if result[part]:
            lines += render_mapping(part, result[part])
    return lines


def _numbers(mapping: dict[str, Any], keys: tuple[str, ...]) -> Any:
    return next((mapping[k] for k in keys if isinstance(mapping.get(k), int | float)), None)


def _fractions(node: Any, label: list[str]) -> Iterator[tuple[str, float]]:
    """Every `*roofline_fraction` below `node`, named by the path to it."""
    if isinstance(node, list):
        for row in node:
            if isinstance(row, dict):
                names = [
                    v for k, v in row.items() if isinstance(v, str) and k not in ROW_LABEL_SKIP
                ]
                yield from _fractions(row, label + [" ".join(names)])
    elif isinstance(node, dict):
        for key, value in node.items():
            if key.endswith("roofline_fraction") and isinstance(value, int | float):
                name = key.removesuffix("roofline_fraction").strip("_")
                yield " · ".join(part for part in label + [name] if part), value
            # ceilings are rates, and `*_over_peer` ratios between runs: neither is a fraction
            elif isinstance(value, dict | list) and not key.endswith(("ceilings", "_over_peer")):
                yield from _fractions(value, label + [key] * (key not in ("figures", "rows")))


def plot_throughput(results: list[Result], path: Path) -> bool:
    """Throughput against batch size or concurrency, one line per kind (and peer)."""
    series: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for _, result in results:
        x_key = next((key for key in X_KEYS if key in result["config"]), None)
        if x_key is None:
            continue
        sources = {result["kind"]: result["figures"]}
        for name, peer in result["peers"].items():
            if isinstance(peer, dict):
                sources[f"{result['kind']} · {name}"] = peer.get("figures", {})
        for name, figures in sources.items():
            y = _numbers(figures, Y_KEYS)
            if y is not None:
                series[f"{name} ({x_key})"].append((result["config"][x_key], y))
    series = {name: sorted(xy) for name, xy in series.items() if len({x for x, _ in xy}) > 1}
    if not series:
        return False
    figure, axes = _figure(1)
    for name, points in series.items():
        axes[0].plot(*zip(*points, strict=True), marker="o", label=name)
    axes[0].set(xlabel="batch size / concurrency", ylabel="output tokens/s", xscale="log")
    axes[0].legend()
    figure.savefig(path, dpi=120)
    return True


def plot_latency(results: list[Result], path: Path) -> bool:
    """TTFT and ITL p50 / p90 / p99 per serving run, grouped bars."""
    runs = [
        r for _, r in results if any(isinstance(r["figures"].get(m), dict) for m in LATENCY_METRICS)
    ]
    if not runs:
        return False
    figure, axes = _figure(len(LATENCY_METRICS))
    width = 0.8 / len(PERCENTILES)
    for ax, metric in zip(axes, LATENCY_METRICS, strict=True):
        for i, percentile in enumerate(PERCENTILES):
            values = [(r["figures"].get(metric) or {}).get(percentile) or 0.0 for r in runs]
            ax.bar([j + i * width for j in range(len(runs))], values, width, label=percentile)
        ax.set_xticks(
            [j + width for j in range(len(runs))],
            [run_label(r) for r in runs],
            rotation=30,
            ha="right",
        )
        ax.set(title=metric.removesuffix("_ms").upper(), ylabel="ms")
        ax.legend()
    figure.savefig(path, dpi=120)
    return True


def plot_roofline(results: list[Result], path: Path) -> bool:
    """Every fraction of the roofline, one bar each, labelled by run and figure."""
    bars = [
        (f"{run_label(r)} · {name}" if name else run_label(r), value)
        for _, r in results
        for name, value in _fractions({"figures": r["figures"], "peers": r["peers"]}, [])
    ]
    if not bars:
        return False
    # the labels take the left half
    figure, axes = _figure(1, height=1.5 + 0.3 * len(bars), width=13)
    # positions, not label strings: runs of the same minute may share a label
    axes[0].barh(range(len(bars)), [value for _, value in bars])
    axes[0].set_yticks(range(len(bars)), [label for label, _ in bars])
    axes[0].invert_yaxis()
    axes[0].axvline(1.0, color="black", linewidth=0.8)
    axes[0].set(xlabel="fraction of the measured roofline")
    figure.savefig(path, dpi=120)
    return True


def _figure(columns: int, height: float = 4.5, width: float = 6.5) -> tuple[Any, list[Any]]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width * columns, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure, list(figure.subplots(1, columns, squeeze=False).flat)


def draw_plots(results: list[Result], plots_dir: Path, out: Path) -> list[str]:
    """The PNGs that have data, and the markdown lines that show them."""
    plots = {"throughput": plot_throughput, "latency": plot_latency, "roofline": plot_roofline}
    try:
        import matplotlib  # noqa: F401  # only a dev dependency: the GPU machine may lack it
    except ImportError:
        return ["Plots left out: matplotlib is not installed.", ""]
    plots_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for name, plot in plots.items():
        png = plots_dir / f"{name}.png"
        if plot(results, png):
            lines += [f"![{name}]({Path(os.path.relpath(png, out.parent)).as_posix()})", ""]
    return ["### Plots", "", *lines] if lines else []


def replace_section(text: str, section: str) -> str:
    block = f"{MARK_BEGIN}\n{section.strip()}\n{MARK_END}"
    begin, end = text.find(MARK_BEGIN), text.find(MARK_END)
    if 0 <= begin < end:
        return text[:begin] + block + text[end + len(MARK_END) :]
    runs = text.find(f"\n{RUNS_HEADING}\n")
    if runs >= 0:
        return f"{text[:runs].rstrip()}\n\n{block}\n{text[runs:]}"
    return f"{text.rstrip()}\n\n{block}\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--results-dir", type=Path, default=RESULTS_DIR, help="where the result JSONs are")
    add("--out", type=Path, default=REPORT, help="markdown file whose report section is replaced")
    add("--plots-dir", type=Path, default=Path("benchmarks/plots"), help="where the PNGs go")


def run(args: argparse.Namespace) -> Path:
    results, skipped = load_results(args.results_dir)
    source = args.results_dir.as_posix()
    lines = [
        "## Report",
        "",
        f"Generated by `afs bench report` from {len(results)} results in `{source}`; "
        "edits between the markers are overwritten.",
        "",
    ]
    if skipped:
        lines += ["Not results (skipped): " + ", ".join(f"`{p.name}`" for p in skipped), ""]
    kinds = {r["kind"]: None for _, r in results}
    for kind in [*(k for k in KIND_ORDER if k in kinds), *sorted(set(kinds) - set(KIND_ORDER))]:
        lines += [f"### {kind}", ""]
        for path, result in results:
            if result["kind"] == kind:
                lines += render_result(path, result, args.out)
    lines += draw_plots(results, args.plots_dir, args.out)
    text = args.out.read_text() if args.out.exists() else "# Benchmarks\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(replace_section(text, "\n".join(lines)))
    print(f"{len(results)} results, {len(skipped)} other files skipped -> {args.out}")
    return args.out
