"""Checkpoint readers: HF safetensors, GGUF, dummy weights, and tokenizers."""
