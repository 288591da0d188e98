"""Every benchmark run as one JSON file and one row of `benchmarks/BENCHMARKS.md`.

A result holds what the run measured (`figures`), what bounds it (`floors`: the time or rate the
machine's measured ceilings allow), the peers measured in the same run (`peers`), and enough
about the machine, the software and the command to repeat it.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

RESULTS_DIR = Path("benchmarks/results")
REPORT = Path("benchmarks/BENCHMARKS.md")
RUNS_HEADING = "## Runs"
SCHEMA_KEYS = (
    "kind", "timestamp", "command", "machine", "software", "git_commit", "config", "figures",
    "floors", "peers",
)  # fmt: skip


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = props.name
        info["gpu_memory_bytes"] = props.total_memory
        info["gpu_sms"] = props.multi_processor_count
        try:
            query = "clocks.sm,clocks.max.sm,clocks.mem,power.draw"
            out = subprocess.run(
                ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=10,
            )  # fmt: skip
            info["gpu_clocks"] = out.stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            info["gpu_clocks"] = None
    return info


def software_info() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        **{name: _version(name) for name in ("triton", "transformers", "ray", "grpcio")},
    }


def git_commit() -> str | None:
    commit = os.environ.get("AFS_GIT_COMMIT")
    if commit:
        return commit
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):  # no git where the run happens
        return None
    return out.stdout.strip() or None


def command_line() -> str:
    """The command as a user would type it: `afs ...` also when run as `python -m cluster.cli`."""
    program = Path(sys.argv[0]).name
    program = "afs" if program in ("afs", "cli.py") else program
    return " ".join([program, *sys.argv[1:]])


def write_result(
    kind: str,
    config: dict[str, Any],
    figures: dict[str, Any],
    floors: dict[str, Any] | None = None,
    peers: dict[str, Any] | None = None,
    summary: str = "",
    out_dir: Path | str = RESULTS_DIR,
    report: Path | str | None = REPORT,
) -> Path:
    """Write `<out_dir>/<kind>-<timestamp>.json`; append a row to the report's Runs table."""
    now = datetime.datetime.now(datetime.UTC)
    result = {
        "kind": kind,
        "timestamp": now.isoformat(timespec="seconds"),
        "command": command_line(),
        "machine": machine_info(),
        "software": software_info(),
        "git_commit": git_commit(),
        "config": config,
        "figures": figures,
        "floors": floors or {},
        "peers": peers or {},
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{kind}-{now.strftime('%Y%m%dT%H%M%S-%f')}.json"  # runs a second apart too
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    if report is not None:
        append_run(Path(report), result, path, summary)
    return path


def append_run(report: Path, result: dict[str, Any], path: Path, summary: str) -> None:
    device = result["machine"].get("gpu") or result["machine"]["processor"]
    row = (
        f"| {result['timestamp']} | {result['kind']} | {device} | `{result['command']}` | "
        f"{summary} | `{path.as_posix()}` |\n"
    )
    text = report.read_text() if report.exists() else "# Benchmarks\n"
    if RUNS_HEADING not in text:
        text = text.rstrip("\n") + (
            f"\n\n{RUNS_HEADING}\n\nEvery `afs bench` run, newest last.\n\n"
            "| when (UTC) | kind | device | command | figures | result |\n"
            "|---|---|---|---|---|---|\n"
        )
    report.write_text(text.rstrip("\n") + "\n" + row)


def load_result(path: Path | str) -> dict[str, Any]:
    result = json.loads(Path(path).read_text())
    missing = [key for key in SCHEMA_KEYS if key not in result]
    if missing:
        raise ValueError(f"{path}: not a benchmark result, missing {missing}")
    return result
