"""The throughput benchmark's record of kernels compiled while its clock runs."""

from types import SimpleNamespace

from triton import knobs

from workers.bench.compiles import watch_compiles


def _compile(name: str, key: str) -> None:
    """What Triton's JIT does around one compile: the cache hook before, the post hook after."""
    fn = SimpleNamespace(module="kernels.example", name=name)
    hook = dict(key=key, repr=f"{name}(x: *fp32)", fn=fn, compile={}, is_manual_warmup=False)
    skip = knobs.runtime.jit_cache_hook and knobs.runtime.jit_cache_hook(
        **hook, already_compiled=False
    )
    assert not skip  # the watcher never stops a compile
    if knobs.runtime.jit_post_compile_hook:
        knobs.runtime.jit_post_compile_hook(**hook, already_compiled=False)


def test_compiles_inside_are_listed_and_the_hooks_restored():
    earlier = []
    knobs.runtime.jit_post_compile_hook = lambda **hook: earlier.append(hook["key"])
    try:
        _compile("_before", "k0")
        with watch_compiles() as seen:
            _compile("_kernel", "k1")
            _compile("_other", "k2")
        _compile("_after", "k3")
    finally:
        restored = knobs.runtime.jit_post_compile_hook
        knobs.runtime.jit_post_compile_hook = None
    assert [c["kernel"] for c in seen] == ["kernels.example._kernel", "kernels.example._other"]
    assert all(c["seconds"] >= 0 and c["signature"] for c in seen)
    assert earlier == ["k0", "k1", "k2", "k3"]  # a hook already there still runs, and comes back
    assert restored is not None and knobs.runtime.jit_cache_hook is None
