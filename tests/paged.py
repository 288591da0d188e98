"""Test helper: run a model over the paged KV slab the way the engine does, without the engine.

Blocks are handed out from a shuffled free list so that sequences' blocks are scattered in the slab.
"""

from __future__ import annotations

import torch

from workers.attention import build_attention_metadata, get_backend
from workers.engine.kv_cache import allocate_kv_slab
from workers.forward_context import ForwardContext, forward_context


class PagedSequences:
    def __init__(
        self,
        model,
        num_blocks: int = 256,
        block_size: int = 16,
        seed: int = 0,
        backend: str = "torch_ref",
    ):
        config = model.config
        device = next(model.parameters()).device
        self.model = model
        self.block_size = block_size
        self.slab = allocate_kv_slab(
            config.num_hidden_layers,
            num_blocks,
            block_size,
            config.num_key_value_heads,
            config.head_dim,
            config.torch_dtype,
            device,
        )
        generator = torch.Generator().manual_seed(seed)
        self.free_blocks = torch.randperm(num_blocks, generator=generator).tolist()
        self.backend = get_backend(backend, device.type)
        self.device = device

    @torch.no_grad()
    def forward(
        self,
        tables: list[list[int]],
        computed: list[int],
        new_tokens: list[list[int]],
    ) -> torch.Tensor:
        """Append `new_tokens[i]` to sequence i; logits of every new token, [T, vocab]."""
        for table, done, tokens in zip(tables, computed, new_tokens, strict=True):
            while len(table) * self.block_size < done + len(tokens):
                table.append(self.free_blocks.pop())
        meta = build_attention_metadata(
            tables, computed, [len(t) for t in new_tokens], self.block_size, self.device
        )
        input_ids = torch.tensor([t for seq in new_tokens for t in seq], device=self.device)
        positions = torch.tensor(
            [
                done + j
                for done, seq in zip(computed, new_tokens, strict=True)
                for j in range(len(seq))
            ],
            device=self.device,
        )
        with forward_context(ForwardContext(meta, self.slab, self.backend)):
            hidden = self.model(input_ids, positions)
        return self.model.compute_logits(hidden)

    def greedy(self, prompts: list[list[int]], max_new_tokens: int) -> tuple[torch.Tensor, list]:
        """Prefill every prompt in one batch, then decode all one token per step.

        Returns the prompt logits ([sum of prompt lengths, vocab]) and each sequence's new tokens.
        """
        tables: list[list[int]] = [[] for _ in prompts]
        computed = [0] * len(prompts)
        prompt_logits = self.forward(tables, computed, prompts)
        ends = torch.tensor([len(p) for p in prompts]).cumsum(0) - 1
        next_tokens = prompt_logits[ends].argmax(-1).tolist()
        computed = [len(p) for p in prompts]
        outputs = [[t] for t in next_tokens]
        for _ in range(max_new_tokens - 1):
            logits = self.forward(tables, computed, [[t] for t in next_tokens])
            next_tokens = logits.argmax(-1).tolist()
            computed = [c + 1 for c in computed]
            for out, token in zip(outputs, next_tokens, strict=True):
                out.append(token)
        return prompt_logits, outputs
