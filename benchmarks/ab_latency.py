"""Batch-1 decode rates of code variants that differ only in environment variables, side by side
in one run (one GPU, rounds interleaved so that drift falls on every variant alike).

    python3 benchmarks/ab_latency.py [--models 1b,7b] [--rounds 2] [--out DIR] \
        base= wide=AFS_PREFETCH_MB=24 evict=AFS_PREFETCH_MB=24,AFS_WEIGHT_EVICT=evict_first

Each variant is NAME=VAR=VALUE[,VAR=VALUE...] (nothing after the first '=' for the defaults);
the variable CWD names another checkout to run from instead of this one (an older commit, say).
Every (round, model, variant) runs `afs bench latency --model dummy:olmo2-<model> --prompt-lens
128 --new-tokens 256` in its own process with those variables set (a model written `7b@2` runs
at `--tp 2`); its result JSON lands under
DIR/<variant>. Prints a table last (decode tok/s, each round and the mean) and writes
ab_latency.json under DIR.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from workers.bench.results import load_result


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    """'name=A=1,B=2' -> ('name', {'A': '1', 'B': '2'}); 'name=' -> ('name', {})."""
    name, sep, rest = text.partition("=")
    if not sep or not name:
        raise ValueError(f"variant {text!r}: expected NAME=VAR=VALUE[,VAR=VALUE...] or NAME=")
    env = {}
    for item in filter(None, rest.split(",")):
        var, sep, value = item.partition("=")
        if not sep or not var:
            raise ValueError(f"variant {text!r}: {item!r} is not VAR=VALUE")
        env[var] = value
    return name, env


def decode_rate(out_dir: Path, before: set[Path]) -> float:
    """decode tok/s of the latency result a run just wrote under out_dir."""
    new = sorted(set(out_dir.glob("latency-*.json")) - before)
    if len(new) != 1:
        raise RuntimeError(f"expected one new latency result under {out_dir}, found {len(new)}")
    return load_result(new[0])["figures"]["prompt_len_128"]["decode_tok_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("variants", nargs="+")
    parser.add_argument("--models", default="1b,7b")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/ab_latency"))
    parser.add_argument("--timeout", type=int, default=180, help="seconds per run")
    args = parser.parse_args()
    variants = dict(parse_variant(v) for v in args.variants)
    models = args.models.split(",")
    rates: dict[str, dict[str, list[float | None]]] = {
        name: {m: [] for m in models} for name in variants
    }
    for _ in range(args.rounds):
        for model in models:
            for name, env in variants.items():
                out_dir = (args.out / name / model).resolve()
                out_dir.mkdir(parents=True, exist_ok=True)
                before = set(out_dir.glob("latency-*.json"))
                size, _, tp = model.partition("@")
                command = [
                    sys.executable, "-m", "cluster.cli", "bench", "latency",
                    "--model", f"dummy:olmo2-{size}", "--prompt-lens", "128",
                    "--new-tokens", "256", "--out-dir", str(out_dir), "--tp", tp or "1",
                ]  # fmt: skip
                try:
                    subprocess.run(
                        command, env={**os.environ, **env}, check=True, timeout=args.timeout,
                        stdout=subprocess.DEVNULL, cwd=env.get("CWD"),
                    )  # fmt: skip
                    rate = decode_rate(out_dir, before)
                except (subprocess.SubprocessError, RuntimeError) as error:
                    print(f"{name} {model}: failed: {error}", file=sys.stderr)
                    rate = None
                rates[name][model].append(rate)
                print(f"{name:>12} {model}: {rate}", flush=True)
                (args.out / "ab_latency.json").write_text(
                    json.dumps({"variants": variants, "decode_tok_s": rates}, indent=2)
                )
    print(f"\n{'variant':>12} | " + " | ".join(f"{m:>24}" for m in models))
    for name in variants:
        cells = []
        for model in models:
            got = [r for r in rates[name][model] if r is not None]
            mean = sum(got) / len(got) if got else float("nan")
            each = "/".join(f"{r:.1f}" for r in got) or "failed"
            cells.append(f"{each} (mean {mean:.1f})".rjust(24))
        print(f"{name:>12} | " + " | ".join(cells))


if __name__ == "__main__":
    main()
