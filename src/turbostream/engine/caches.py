"""What the engine computes once and reuses: prompt embeddings (text encoder), per-seed noise and the arrays it hands
frames out in, all bounded."""

from __future__ import annotations

import sys
from collections import OrderedDict
from typing import Any

import numpy as np
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


class FramePool:
    """uint8 (H, W, 3) arrays to hand frames out in, each taken again only once nothing outside the pool refers to it.

    Why: a fresh 512x512 result array costs its page faults at every call (about 2 ms for a batch of 8, on the
    engine's thread, before any of the 8 results goes out); writing into an array used before costs a quarter of that.
    Whoever keeps a frame (an outbox, a writer's queue, the similarity skip's last output, a numpy view of it, a
    tensor from torch.from_numpy) holds a reference to the array, and an array is reused only when its reference count
    is back to the pool's own: so nothing handed out is ever overwritten. At most `limit` arrays are kept; when all
    of them are held, take() returns a fresh array that the pool does not keep. Use from one thread (the engine's).
    """

    def __init__(self, shape: tuple[int, ...], limit: int) -> None:
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        self.shape, self.limit = tuple(shape), limit
        self._arrays: list[np.ndarray] = []
        self._next = 0  # where the next search starts: the array taken longest ago is the likeliest free
        self.fresh = 0  # arrays made (pooled or not): grows only while the pool fills, or when all are held
        # The count an array has when only the pool holds it, measured the way _free() measures (interpreters
        # differ in the temporary references they count).
        self._arrays.append(np.empty((1,), np.uint8))
        self._baseline = self._refs(0)
        self._arrays.clear()

    def _refs(self, i: int) -> int:
        return sys.getrefcount(self._arrays[i])

    def take(self) -> np.ndarray:
        """An array of `shape` (contents undefined) that nobody else holds."""
        n = len(self._arrays)
        for k in range(n):
            i = (self._next + k) % n
            if self._refs(i) <= self._baseline:
                self._next = (i + 1) % n
                return self._arrays[i]
        self.fresh += 1
        arr = np.empty(self.shape, np.uint8)
        if n < self.limit:
            self._arrays.append(arr)
        return arr

    def __len__(self) -> int:
        return len(self._arrays)
