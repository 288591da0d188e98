"""Each broken input gets a clear error that names the problem."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from workers.weights.loader import load_model

transformers = pytest.importorskip("transformers")


@pytest.fixture()
def checkpoint(tmp_path):
    config = transformers.Olmo2Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        max_position_embeddings=64,
    )
    transformers.Olmo2ForCausalLM(config).save_pretrained(tmp_path)
    return tmp_path


def test_checkpoint_fixture_loads(checkpoint):
    assert load_model(str(checkpoint)).config.architecture == "Olmo2ForCausalLM"


def test_unknown_architecture(checkpoint):
    config = json.loads((checkpoint / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (checkpoint / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="'GPT2LMHeadModel' is not supported"):
        load_model(str(checkpoint))


def test_missing_config(checkpoint):
    (checkpoint / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(str(checkpoint))


def test_missing_weights_file(checkpoint):
    (checkpoint / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"no \*.safetensors files"):
        load_model(str(checkpoint))


def test_missing_shard(checkpoint):
    index = {"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}
    (checkpoint / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        load_model(str(checkpoint))


def test_garbage_safetensors(checkpoint):
    (checkpoint / "model.safetensors").write_bytes(b"this is not a safetensors file" * 10)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_model(str(checkpoint))


def test_truncated_safetensors(checkpoint):
    path = checkpoint / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="model.safetensors"):
        load_model(str(checkpoint))


def test_weight_missing_from_checkpoint(checkpoint):
    path = checkpoint / "model.safetensors"
    tensors = load_file(path)
    del tensors["model.layers.0.mlp.up_proj.weight"]
    save_file(tensors, path)
    with pytest.raises(ValueError, match=r"missing 1 weights: model.layers.0.mlp.gate_up_proj"):
        load_model(str(checkpoint))


def test_weight_of_wrong_shape(checkpoint):
    path = checkpoint / "model.safetensors"
    tensors = load_file(path)
    tensors["model.norm.weight"] = torch.ones(31)
    save_file(tensors, path)
    with pytest.raises(ValueError, match=r"model.norm.weight: checkpoint shape \(31,\)"):
        load_model(str(checkpoint))


def test_unexpected_weight(checkpoint):
    path = checkpoint / "model.safetensors"
    tensors = load_file(path)
    tensors["model.layers.0.self_attn.rotary_scale"] = torch.ones(4)
    save_file(tensors, path)
    with pytest.raises(ValueError, match="rotary_scale' has no place in Olmo2ForCausalLM"):
        load_model(str(checkpoint))


def test_hub_id_while_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="offline.*local HF directory.*gguf"):
        load_model("allenai/OLMo-2-0425-1B")


def test_no_such_path():
    with pytest.raises(FileNotFoundError, match="no such file or directory"):
        load_model("./does/not/exist")


def test_unknown_dummy_name():
    with pytest.raises(ValueError, match="unknown dummy model"):
        load_model("dummy:olmo2-3b")


def test_cli_error_is_one_line_and_exit_2():
    result = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "info", "allenai/OLMo-2-0425-1B"],
        capture_output=True,
        text=True,
        env={"HF_HUB_OFFLINE": "1", "PATH": ""},
    )
    assert result.returncode == 2
    assert result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1
    assert "offline" in result.stderr
