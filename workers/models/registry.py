"""HF `architectures` names -> model classes."""

from __future__ import annotations

from torch import nn

from workers.config import ModelConfig
from workers.models.llama import LlamaForCausalLM
from workers.models.olmo2 import Olmo2ForCausalLM

MODEL_CLASSES: dict[str, type[nn.Module]] = {
    "Olmo2ForCausalLM": Olmo2ForCausalLM,
    "LlamaForCausalLM": LlamaForCausalLM,
}


def model_class(config: ModelConfig) -> type[nn.Module]:
    try:
        return MODEL_CLASSES[config.architecture]
    except KeyError:
        raise ValueError(
            f"architecture {config.architecture!r} is not supported; "
            f"supported: {', '.join(MODEL_CLASSES)}"
        ) from None
