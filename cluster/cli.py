"""The `afs` command line."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from workers.model_info import describe_model
from workers.weights.loader import DEFAULT_MODEL, load_model


class _Parser(argparse.ArgumentParser):
    """Bad flags: exit 2 with one line on stderr, not the whole usage."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="afs", description="Attention From Scratch: LLM serving from scratch.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    info = commands.add_parser("info", help="describe a model: shapes, parameters, bytes")
    info.add_argument("model", nargs="?", default=DEFAULT_MODEL, help="model name or path")
    info.add_argument("--dtype", default=None, help="float32, bfloat16 or float16")
    info.add_argument("--json", action="store_true", help="print JSON instead of a table")
    info.add_argument(
        "--load", action="store_true", help="also load the weights and report the time it took"
    )
    info.add_argument("--device", default="cpu", help="device for --load: cpu, cuda, cuda:N")
    return parser


def _info(args: argparse.Namespace) -> int:
    facts = describe_model(args.model, dtype=args.dtype, device=args.device)
    if args.load:
        loaded = load_model(args.model, dtype=facts["dtype"], device=args.device)
        facts["load_seconds"] = round(loaded.load_seconds, 3)
    if args.json:
        print(json.dumps(facts, indent=2))
        return 0
    width = max(len(key) for key in facts)
    for key, value in facts.items():
        shown = f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else value
        print(f"{key:<{width}}  {shown}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    try:
        return {"info": _info}[args.command](args)
    except (ValueError, FileNotFoundError) as error:
        print(f"afs {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
