"""The files under ray_configs/ pass the checks that `ray up` and `ray job submit` make first."""

from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.runtime_env import RuntimeEnv

CONFIG_DIR = Path(__file__).resolve().parents[2] / "ray_configs"
RUNTIME_ENV = CONFIG_DIR / "runtime_env.yaml"
CLUSTER_CONFIGS = sorted(path for path in CONFIG_DIR.glob("*.yaml") if path != RUNTIME_ENV)


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _ray_validate(config: dict) -> dict:
    """What `ray up` does before it talks to a provider: fill defaults, then check the schema."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def test_the_expected_cluster_configs_exist():
    assert {path.name for path in CLUSTER_CONFIGS} >= {"local.yaml", "aws.yaml"}


@pytest.mark.parametrize("path", CLUSTER_CONFIGS, ids=lambda path: path.name)
def test_cluster_config_passes_ray_validation(path):
    config = _load(path)
    prepared = _ray_validate(config)
    assert prepared["cluster_name"] == "afs"
    assert prepared["head_node_type"] in prepared["available_node_types"]
    # every node gets the project, and the start commands are ours, not Ray's defaults
    assert "~/afs" in prepared["file_mounts"]
    assert any("protos.build" in command for command in prepared["setup_commands"])
    assert any("--head" in command for command in prepared["head_start_ray_commands"])
    assert any("$RAY_HEAD_IP:6379" in command for command in prepared["worker_start_ray_commands"])


def test_local_config_lists_head_and_workers():
    prepared = _ray_validate(_load(CONFIG_DIR / "local.yaml"))
    provider = prepared["provider"]
    assert provider["type"] == "local"
    assert provider["head_ip"] not in provider["worker_ips"]
    # Ray keeps every listed worker in the cluster
    assert prepared["max_workers"] == len(provider["worker_ips"])


def test_aws_config_has_a_gpu_worker_type():
    prepared = _ray_validate(_load(CONFIG_DIR / "aws.yaml"))
    workers = {
        name: node
        for name, node in prepared["available_node_types"].items()
        if name != prepared["head_node_type"]
    }
    assert [node["node_config"]["InstanceType"] for node in workers.values()] == ["p5en.48xlarge"]


@pytest.mark.parametrize("path", CLUSTER_CONFIGS, ids=lambda path: path.name)
def test_config_without_provider_is_rejected(path):
    broken = _load(path)
    del broken["provider"]
    with pytest.raises((jsonschema.ValidationError, KeyError)):
        _ray_validate(broken)
    # the schema alone names what is missing
    with pytest.raises(jsonschema.ValidationError, match="'provider' is a required property"):
        validate_config(broken)


@pytest.mark.parametrize("path", CLUSTER_CONFIGS, ids=lambda path: path.name)
def test_config_with_a_misspelt_field_is_rejected(path):
    broken = _load(path)
    broken["setup_command"] = broken.pop("setup_commands")
    with pytest.raises(jsonschema.ValidationError, match="setup_command"):
        _ray_validate(broken)


def test_runtime_env_is_valid_and_turns_nvls_off():
    runtime_env = RuntimeEnv(**_load(RUNTIME_ENV))
    assert runtime_env["env_vars"]["NCCL_NVLS_ENABLE"] == "0"
    # an uploaded working_dir would drop the generated, git-ignored protobuf modules
    assert "working_dir" not in runtime_env
