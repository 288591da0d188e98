"""The decode matmul (kernels/skinny_matmul.py) against x W^T in fp32.

Tolerances: the kernel and the reference both sum in fp32 and round once, in another order:
fp32 1e-5 relative to the row's scale; fp16 and bf16 one rounding of the output (2e-3, 1.6e-2)
plus the interpreter's fp16 products (fp16 only runs there on CPU)."""

from __future__ import annotations

import json

import pytest
import torch

from kernels.skinny_matmul import (
    MAX_ROWS,
    Config,
    _slices,
    plan,
    rms_norm_add_matmul,
    skinny_matmul,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.float16, id="fp16"),
    pytest.param(torch.bfloat16, id="bf16", marks=pytest.mark.gpu),
]
TOLERANCE = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 1.6e-2}


def _reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (x.double() @ w.double().T).to(x.dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "m, n, k, split",
    [
        (1, 100, 300, None),
        (3, 130, 257, 1),
        (5, 64, 1024, 3),
        (16, 200, 640, None),
        (17, 96, 300, 2),
        (64, 70, 512, None),
    ],
)
def test_matches_x_w_transposed(dtype, m, n, k, split):
    gen = torch.Generator().manual_seed(m * n + k)
    x = torch.randn(m, k, generator=gen).to(DEVICE, dtype)
    w = (torch.randn(n, k, generator=gen) / k**0.5).to(DEVICE, dtype)
    got = skinny_matmul(x, w, split=split)
    want = _reference(x, w)
    assert got.shape == (m, n) and got.dtype == dtype
    scale = want.float().abs().max().item()
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(got.float(), want.float(), atol=tol * scale, rtol=tol)


@pytest.mark.parametrize("split", [1, 4])
def test_a_row_does_not_depend_on_the_others_and_calls_repeat(split):
    """Graphs pad a batch with rows: a row's result must be the same alone or with others, and a
    second call (the tiles' counters back at zero) the same as the first."""
    gen = torch.Generator().manual_seed(split)
    x = torch.randn(7, 512, generator=gen).to(DEVICE)
    w = torch.randn(96, 512, generator=gen).to(DEVICE)
    together = skinny_matmul(x, w, split=split)
    assert torch.equal(skinny_matmul(x[2:3], w, split=split)[0], together[2])
    assert torch.equal(skinny_matmul(x, w, split=split), together)
    # past 16 rows x is padded to 64: a row is the same with 17 others as with 40
    x = torch.randn(40, 512, generator=gen).to(DEVICE)
    together = skinny_matmul(x, w, split=split)
    assert torch.equal(skinny_matmul(x[3:20], w, split=split)[2], together[5])


@pytest.mark.parametrize("split", [1, 3])
def test_swiglu_on_the_way_in_is_bitwise_the_activation_kernel_then_the_matmul(split):
    from kernels.activation import silu_and_mul

    gen = torch.Generator().manual_seed(split)
    gate_up = torch.randn(5, 2 * 300, generator=gen).to(DEVICE, torch.float16)
    w = (torch.randn(70, 300, generator=gen) / 300**0.5).to(DEVICE, torch.float16)
    fused = skinny_matmul(gate_up, w, swiglu=True, split=split)
    assert torch.equal(fused, skinny_matmul(silu_and_mul(gate_up), w, split=split))
    with pytest.raises(ValueError, match="weight"):
        skinny_matmul(gate_up[:, :500], w, swiglu=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "m, config",
    [
        (1, Config(8, 64, 1, fma=True)),
        (1, Config(16, 128, 3, num_warps=2, num_stages=2, fma=True)),
        (4, Config(16, 128, 3, fma=True)),  # several rows: the tl.dot path, same cut
        (2, Config(32, 256, 2, num_stages=3)),
        (1, Config(128, 64, 1)),
    ],
)
def test_any_config_matches_x_w_transposed(dtype, m, config):
    n, k = 150, 700
    gen = torch.Generator().manual_seed(n + m)
    x = torch.randn(m, k, generator=gen).to(DEVICE, dtype)
    w = (torch.randn(n, k, generator=gen) / k**0.5).to(DEVICE, dtype)
    got = skinny_matmul(x, w, config=config)
    want = _reference(x, w)
    scale = want.float().abs().max().item()
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(got.float(), want.float(), atol=tol * scale, rtol=tol)
    again = skinny_matmul(x, w, config=config)  # counters back at zero
    assert torch.equal(again, got)


def test_the_one_row_path_with_swiglu_is_the_activation_then_the_matmul():
    from kernels.activation import silu_and_mul

    gen = torch.Generator().manual_seed(3)
    gate_up = torch.randn(1, 2 * 300, generator=gen).to(DEVICE, torch.float16)
    w = (torch.randn(70, 300, generator=gen) / 300**0.5).to(DEVICE, torch.float16)
    config = Config(16, 64, 2, fma=True)
    fused = skinny_matmul(gate_up, w, swiglu=True, config=config)
    assert torch.equal(fused, skinny_matmul(silu_and_mul(gate_up), w, config=config))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "m, config",
    [
        (1, Config(8, 256, 1, fma=True)),  # the one-row cut of 1B's QKV
        (1, Config(16, 128, 3, num_warps=2, num_stages=2, fma=True)),  # K in slices
        (1, Config(64, 128, 1)),  # one row padded to 16 for tl.dot (1B's gate/up)
        (1, Config(32, 64, 2)),
    ],
)
def test_the_post_norm_on_the_way_in_is_the_norm_then_the_matmul(dtype, m, config):
    """stream = residual + rms_norm(x) as the norm kernel rounds it (its mean square summed in
    another order: one rounding apart at most), and the product is bitwise the plain kernel's
    on that stream; x and residual are left as they were."""
    from kernels.rmsnorm import rms_norm_add

    n, k, eps = 150, 2700, 1e-6  # K in two chunks for the mean square
    gen = torch.Generator().manual_seed(n + m)
    x = torch.randn(m, k, generator=gen).to(DEVICE, dtype) * 3
    residual = torch.randn(m, k, generator=gen).to(DEVICE, dtype)
    norm_weight = (1 + torch.randn(k, generator=gen) / 4).to(DEVICE, dtype)
    w = (torch.randn(n, k, generator=gen) / k**0.5).to(DEVICE, dtype)
    x_before, residual_before = x.clone(), residual.clone()
    stream, product = rms_norm_add_matmul(x, residual, norm_weight, eps, w, config=config)
    assert torch.equal(x, x_before) and torch.equal(residual, residual_before)
    want = rms_norm_add(x, residual, norm_weight, eps)
    ulp = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    torch.testing.assert_close(stream.float(), want.float(), atol=ulp * 8, rtol=ulp)
    assert torch.equal(product, skinny_matmul(stream, w, config=config))
    again = rms_norm_add_matmul(x, residual, norm_weight, eps, w, config=config)
    assert torch.equal(again[0], stream) and torch.equal(again[1], product)


def test_the_post_norm_on_the_way_in_refuses_mismatched_input():
    x, w = torch.randn(1, 32, device=DEVICE), torch.randn(8, 32, device=DEVICE)
    norm_weight = torch.ones(32, device=DEVICE)
    with pytest.raises(ValueError, match="residual"):
        rms_norm_add_matmul(x, torch.randn(2, 32, device=DEVICE), norm_weight, 1e-6, w)
    with pytest.raises(ValueError, match="norm weight"):
        rms_norm_add_matmul(x, x.clone(), norm_weight[:16], 1e-6, w)
    with pytest.raises(ValueError, match="weight"):
        rms_norm_add_matmul(x, x.clone(), norm_weight, 1e-6, w[:, :16])
    two = torch.randn(2, 32, device=DEVICE)
    with pytest.raises(ValueError, match="one row"):
        rms_norm_add_matmul(two, two.clone(), norm_weight, 1e-6, w)


def test_the_post_norm_of_a_padded_cut_refuses_a_grid_past_its_scratch(monkeypatch):
    import kernels.skinny_matmul as module

    x, w = torch.randn(1, 32, device=DEVICE), torch.randn(64, 32, device=DEVICE)
    norm_weight = torch.ones(32, device=DEVICE)
    monkeypatch.setattr(module, "_STAGE_ELEMENTS", 32 * 3)  # rows for three programs
    with pytest.raises(ValueError, match="scratch"):  # four tiles of 16
        rms_norm_add_matmul(x, x.clone(), norm_weight, 1e-6, w, config=Config(16, 32, 1))
    stream, _ = rms_norm_add_matmul(x, x.clone(), norm_weight, 1e-6, w, config=Config(32, 32, 1))
    assert stream.shape == x.shape  # two tiles fit


def test_measured_configs_are_read_per_gpu_and_shape(tmp_path, monkeypatch):
    import kernels.skinny_matmul as module

    table = {
        "Some GPU": {
            module.table_key(4096, 4096, 1): {"config": [16, 256, 4, 4, 3, True], "us": 9.0},
            module.table_key(4096, 11008, 8, swiglu=True): {"config": [64, 128, 2, 4, 4, False]},
        }
    }
    path = tmp_path / "configs.json"
    path.write_text(json.dumps(table))
    monkeypatch.setattr(module, "_TABLE_PATH", path)
    module._table.cache_clear()
    try:
        got = module._table("Some GPU")
        assert got["4096x4096 m1"] == Config(16, 256, 4, 4, 3, True)
        assert got["4096x11008 m16 swiglu"].block_n == 64
        assert module._table("Another GPU") == {}
        # a CPU tensor never takes a measured config
        x, w = torch.zeros(1, 4096), torch.zeros(4096, 4096)
        assert module.measured_config(x, w) is None
    finally:
        module._table.cache_clear()


def test_layers_send_only_measured_shapes_by_default(monkeypatch):
    """Unset AFS_SKINNY_MATMUL: a decode batch takes the kernel only where a config was measured
    faster; =1 takes it everywhere (the measured config or the plan); =0 never."""
    import kernels.skinny_matmul as module
    from workers.layers import fused

    monkeypatch.setattr(fused, "FORCE_TRITON", True)
    seen = []

    def kernel(x, w, swiglu=False, split=None, config=None, push=None):
        seen.append(config)
        return x @ w.T

    monkeypatch.setattr(module, "skinny_matmul", kernel)
    x, w = torch.randn(2, 32), torch.randn(8, 32)
    measured = Config(16, 64, 1)
    for mode, table, want in [
        (None, {}, []),
        (None, {"8x32 m16": measured}, [measured]),
        (True, {}, [None]),
        (False, {"8x32 m16": measured}, []),
    ]:
        seen.clear()
        monkeypatch.setattr(fused, "SKINNY_MATMUL", mode)

        def lookup(x, w, swiglu=False, table=table):
            return table.get(module.table_key(w.shape[0], w.shape[1], x.shape[0], swiglu))

        monkeypatch.setattr(module, "measured_config", lookup)
        torch.testing.assert_close(fused.linear(x, w), x @ w.T)
        assert seen == want, mode
    # each class of rows has its own entry; past 64 rows (a prompt) F.linear, whatever is set
    monkeypatch.setattr(fused, "SKINNY_MATMUL", None)
    table = {"8x32 m64": measured}
    monkeypatch.setattr(
        module,
        "measured_config",
        lambda x, w, swiglu=False: table.get(module.table_key(*w.shape, x.shape[0], swiglu)),
    )
    for rows, want in ((16, []), (17, [measured]), (64, [measured]), (65, [])):
        seen.clear()
        x = torch.randn(rows, 32)
        torch.testing.assert_close(fused.linear(x, w), x @ w.T)
        assert seen == want, rows
    monkeypatch.setattr(fused, "SKINNY_MATMUL", True)
    seen.clear()
    fused.linear(torch.randn(65, 32), w)
    assert seen == []


def test_which_post_norms_go_inside_the_matmul(monkeypatch):
    """AFS_FUSED_POST_NORM: "1" takes a one-row call inside where a "... norm" config is listed
    or the plain config sums on the CUDA cores; "all" wherever a plain config is listed, the
    tl.dot cuts too; "0" never; a wider batch never."""
    import kernels.skinny_matmul as module
    from workers.layers import fused

    monkeypatch.setattr(fused, "FORCE_TRITON", True)
    monkeypatch.setattr(fused, "SKINNY_MATMUL", None)
    dot, fma, norm = Config(16, 64, 1), Config(8, 256, 1, fma=True), Config(16, 128, 1, fma=True)
    tables = {
        "dot": {"8x32 m1": dot},
        "fma": {"8x32 m1": fma},
        "norm": {"8x32 m1": dot, "8x32 m1 norm": norm},
        "none": {},
    }
    want = {
        "0": {"dot": None, "fma": None, "norm": None, "none": None},
        "1": {"dot": None, "fma": fma, "norm": norm, "none": None},
        "all": {"dot": dot, "fma": fma, "norm": norm, "none": None},
    }
    w = torch.randn(8, 32)
    for mode, by_table in want.items():
        monkeypatch.setattr(fused, "FUSED_POST_NORM", mode)
        for name, config in by_table.items():
            table = tables[name]

            def lookup(x, w, swiglu=False, norm=False, table=table):
                key = module.table_key(w.shape[0], w.shape[1], x.shape[0], swiglu, norm)
                return table.get(key)

            monkeypatch.setattr(module, "measured_config", lookup)
            takes, got = fused.post_norm_route(torch.randn(1, 32), w)
            assert (takes, got) == (config is not None, config), (mode, name)
            assert fused.post_norm_route(torch.randn(2, 32), w) == (False, None)


def test_bad_input_is_refused():
    w = torch.randn(8, 32, device=DEVICE)
    with pytest.raises(ValueError, match="rows"):
        skinny_matmul(torch.randn(MAX_ROWS + 1, 32, device=DEVICE), w)
    with pytest.raises(ValueError, match="weight"):
        skinny_matmul(torch.randn(2, 31, device=DEVICE), w)
    with pytest.raises(ValueError, match="dtype"):
        skinny_matmul(torch.randn(2, 32, device=DEVICE, dtype=torch.float16), w)


@pytest.mark.parametrize("n, k", [(2048, 2048), (6144, 2048), (2048, 8192), (100352, 4096)])
def test_the_plan_spreads_small_matrices_and_leaves_no_empty_slice(n, k):
    config = plan(n, k, num_sms=132)
    block_n = config.block_n
    split, k_per_split = _slices(n, k, config)
    assert (split - 1) * k_per_split < k <= split * k_per_split
    tiles = -(-n // block_n)
    if tiles < 132:  # a few dozen tiles of N: K is split (slices of two steps at least)
        assert tiles * split >= min(2 * 132, tiles * (k // 128 // 2))
    if tiles >= 4 * 132:
        assert split == 1


def test_an_olmo2_engine_decodes_the_same_through_it(tmp_path, monkeypatch):
    """Decode steps' projections (down_proj with SwiGLU inside) and LM head through the kernel
    (the interpreter on CPU) give the tokens and log-probabilities of the engine through
    F.linear; the prompts' step (60 tokens) takes it with its rows padded to 64."""
    from checkpoints import make_checkpoint

    from workers.engine.llm_engine import LLMEngine
    from workers.engine.sampling_params import SamplingParams
    from workers.layers import fused

    make_checkpoint(tmp_path, "Olmo2", dict(num_attention_heads=4, num_key_value_heads=2))
    monkeypatch.setattr(fused, "FORCE_TRITON", True)
    import kernels.skinny_matmul as module

    calls = {"swiglu": 0, "plain": 0}
    real = module.skinny_matmul

    def counted(x, weight, swiglu=False, split=None, config=None, push=None):
        calls["swiglu" if swiglu else "plain"] += 1
        return real(x, weight, swiglu, split, config, push)

    monkeypatch.setattr(module, "skinny_matmul", counted)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=3)
    prompts = [list(range(5, 5 + n)) for n in (3, 17, 40)]
    runs = {}
    for skinny in (False, True):
        monkeypatch.setattr(fused, "SKINNY_MATMUL", skinny)
        engine = LLMEngine(model=str(tmp_path), device=DEVICE, dtype="float32", num_kv_blocks=64)
        try:
            runs[skinny] = [r.completions[0] for r in engine.generate(prompts, params)]
        finally:
            engine.shutdown()
    assert calls["swiglu"] and calls["plain"]  # the kernel ran, both ways
    for want, got in zip(runs[False], runs[True], strict=True):
        assert got.token_ids == want.token_ids
        for a, b in zip(want.logprobs, got.logprobs, strict=True):
            assert b.logprob == pytest.approx(a.logprob, abs=1e-4)


def test_an_olmo2_engine_at_batch_one_forms_its_post_norms_inside_the_matmul(tmp_path, monkeypatch):
    """A one-sequence decode step forms each post-norm's stream inside the next projection's
    kernel (QKV, gate/up): tokens and log-probabilities as with the norm's own kernel; a wider
    batch keeps the norm's kernel."""
    from checkpoints import make_checkpoint

    from workers.engine.llm_engine import LLMEngine
    from workers.engine.sampling_params import SamplingParams
    from workers.layers import fused

    make_checkpoint(tmp_path, "Olmo2", dict(num_attention_heads=4, num_key_value_heads=2))
    monkeypatch.setattr(fused, "FORCE_TRITON", True)
    monkeypatch.setattr(fused, "SKINNY_MATMUL", True)
    import kernels.skinny_matmul as module

    rows_seen = []
    real = module.rms_norm_add_matmul

    def counted(x, *args, **kwargs):
        rows_seen.append(x.shape[0])
        return real(x, *args, **kwargs)

    monkeypatch.setattr(module, "rms_norm_add_matmul", counted)
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=3)
    runs = {}
    for fused_norm in ("0", "1"):
        monkeypatch.setattr(fused, "FUSED_POST_NORM", fused_norm)
        engine = LLMEngine(model=str(tmp_path), device=DEVICE, dtype="float32", num_kv_blocks=64)
        try:
            runs[fused_norm] = engine.generate([list(range(5, 12))], params)[0].completions[0]
            if fused_norm == "1":
                alone = len(rows_seen)
                engine.generate([list(range(5, 12)), list(range(3, 9))], params)
        finally:
            engine.shutdown()
    # 5 decode steps of 3 layers: each layer's post-attention norm (into gate/up) and each
    # post-feedforward norm but the last (into the next QKV; the last goes to the final norm);
    # all one row, and the batch of two never took it
    assert alone == 5 * (2 * 3 - 1) and rows_seen == [1] * alone
    want, got = runs["0"], runs["1"]
    assert got.token_ids == want.token_ids
    for a, b in zip(want.logprobs, got.logprobs, strict=True):
        assert b.logprob == pytest.approx(a.logprob, abs=1e-4)


def test_programmatic_dependent_launch_is_gpu_only(monkeypatch):
    from kernels import launch

    monkeypatch.setattr(launch, "PDL", False)
    assert launch.pdl_options(torch.device(DEVICE)) == {"PDL": False}
    monkeypatch.setattr(launch, "PDL", True)
    assert launch.pdl_options(torch.device("cpu")) == {"PDL": False}  # the interpreter: never
    if DEVICE == "cuda" and torch.cuda.get_device_capability()[0] >= 9:
        assert launch.pdl_options(torch.device("cuda")) == {"PDL": True, "launch_pdl": True}


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
    reason="needs a Hopper or later GPU",
)
def test_chained_launches_with_pdl_give_what_they_give_without(monkeypatch):
    """Each kernel waits for the one before it: a chain of dependent matmuls (and the activation)
    replayed from a graph gives bitwise what it gives launched plainly."""
    from kernels import launch
    from kernels.activation import silu_and_mul

    gen = torch.Generator("cuda").manual_seed(0)
    weights = [
        torch.randn(512, 256, device="cuda", generator=gen).bfloat16() / 16 for _ in range(6)
    ]
    down = torch.randn(256, 256, device="cuda", generator=gen).bfloat16() / 16
    x = torch.randn(3, 256, device="cuda", generator=gen).bfloat16()

    def chain():
        y = x
        for w in weights:
            y = silu_and_mul(skinny_matmul(y, w))  # [3, 512] -> [3, 256]
        return skinny_matmul(y, down)

    monkeypatch.setattr(launch, "PDL", False)
    plain = chain()
    monkeypatch.setattr(launch, "PDL", True)
    eager = chain()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = chain()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(eager, plain) and torch.equal(captured, plain)
