"""What the engine computes once and reuses: prompt embeddings (text encoder) and per-seed noise, both bounded."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch


class LRU(OrderedDict):
    """A bounded mapping: inserting past `limit` evicts the least recently used entry."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.evictions = 0

    def lookup(self, key):
        value = self.get(key)
        if value is not None:
            self.move_to_end(key)
        return value

    def insert(self, key, value) -> None:
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.limit:
            self.popitem(last=False)
            self.evictions += 1


@torch.inference_mode()
def encode_prompt(components: Any, prompt: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(tokens, dim) text-encoder embeddings of one prompt, as diffusers' encode_prompt computes them (no CFG)."""
    ids = components.tokenizer(
        prompt, padding="max_length", max_length=components.max_tokens, truncation=True, return_tensors="pt"
    ).input_ids.to(device)
    return components.text_encoder(ids)[0][0].to(dtype)


def seed_noise(seed: int, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """`shape` float32 unit Gaussian noise of a seed, drawn on the CPU so a seed means the same on any device."""
    gen = torch.Generator("cpu").manual_seed(seed)
    # Same draw as diffusers' randn_tensor with one CPU generator per sample.
    return torch.randn((1, *shape), generator=gen, dtype=torch.float32)[0].to(device)
