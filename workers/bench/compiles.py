"""The Triton kernels compiled while a benchmark's clock runs.

A kernel compiled inside the timed region is a stall of a second or so that a warmed-up server
would not see, so a result lists them: what was compiled (module.function and its specialization)
and how long it took. Uses Triton's JIT hooks; where this Triton has none, nothing is listed.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


@contextmanager
def watch_compiles() -> Iterator[list[dict[str, Any]]]:
    """Yield a list that gets one {kernel, signature, seconds} per compile inside the block."""
    seen: list[dict[str, Any]] = []
    try:
        from triton import knobs

        runtime = knobs.runtime
        saved = runtime.jit_cache_hook, runtime.jit_post_compile_hook
    except (ImportError, AttributeError):
        yield seen
        return
    started: dict[Any, float] = {}

    def before(**hook: Any) -> bool:
        started[hook["key"]] = time.perf_counter()
        chained = saved[0]
        return bool(chained and chained(**hook))  # True would skip the compile

    def after(**hook: Any) -> None:
        fn = hook["fn"]
        start = started.pop(hook["key"], None)
        seen.append(
            {
                "kernel": f"{fn.module}.{fn.name}",
                "signature": hook.get("repr", ""),
                "seconds": time.perf_counter() - start if start is not None else None,
            }
        )
        if saved[1]:
            saved[1](**hook)

    runtime.jit_cache_hook, runtime.jit_post_compile_hook = before, after
    try:
        yield seen
    finally:
        runtime.jit_cache_hook, runtime.jit_post_compile_hook = saved
