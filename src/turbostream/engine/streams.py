"""Per-stream device state for the live-video controls: prompt and seed transitions, feedback latents, prompt blends.

Everything here runs on the engine's thread between graph replays, as ordinary tensor ops whose results are copied
into the static input rows (embeddings, noise, previous latents): the captured graphs never change, a stream that
changes a control costs no capture and no stall, and nothing here reads a tensor back to the host.

State is kept per stream key (the batcher's stream, or the one stream of `turbostream run`), bounded twice: the
batcher frees a stream's state when the stream closes (Engine.release_stream), and the table itself is an LRU of
`limit` streams for callers that never free.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass

import torch

from ..config import Prompt, StreamParams, blend_weights


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation from a (t=0) to b (t=1), float32, without a host sync.

    Two independent unit Gaussians are nearly orthogonal: a straight line between them passes through vectors of
    smaller norm (at t=0.5 the standard deviation is about 0.71), which the UNet reads as too little noise; the arc
    keeps the norm, so every step of a seed transition is noise of the right variance. Parallel inputs fall back to
    the straight line.
    """
    a, b = a.float(), b.float()
    cos = (a * b).sum() / (a.norm() * b.norm()).clamp_min(1e-12)
    theta = torch.acos(cos.clamp(-1.0, 1.0))
    sin = torch.sin(theta)
    safe = sin > 1e-4
    inv = 1.0 / sin.clamp_min(1e-12)
    wa = torch.where(safe, torch.sin((1.0 - t) * theta) * inv, torch.full_like(sin, 1.0 - t))
    wb = torch.where(safe, torch.sin(t * theta) * inv, torch.full_like(sin, t))
    return wa * a + wb * b


def lerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Linear interpolation in float32 (embeddings may be float16)."""
    return torch.lerp(a.float(), b.float(), t)


def blend_embeddings(prompt: Prompt, embed: Callable[[str], torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """Embeddings of a weighted prompt blend: sum of w_i / sum(w) x embed(text_i), accumulated in float32."""
    parts = blend_weights(prompt)
    total = None
    for text, weight in parts:
        term = embed(text).float() * weight
        total = term if total is None else total + term
    return total.to(dtype)


@dataclass
class StreamState:
    """One stream's controls state: what it moves to, the transition under way, its previous output latent."""

    target: tuple[Prompt, int] | None = None  # (prompt, seed) of the last frame
    start: float = 0.0  # when the transition under way started (engine clock)
    duration: float = 0.0
    from_emb: torch.Tensor | None = None  # where the embeddings come from; None: not moving
    from_noise: torch.Tensor | None = None  # where the noise comes from; None: not moving
    latent: torch.Tensor | None = None  # the previous output's latents (feedback > 0 only)
    # Temporal feature reuse: the deep UNet features of the stream's last full frame, one tensor per UNet evaluation
    # (each step runs at its own timestep, so each has features of its own), which parameters they were computed with
    # (a change forces a full frame; None: valid for no frame, as those kept in a transition), and how many partial
    # frames have used them since.
    deep: list[torch.Tensor] | None = None
    deep_params: tuple | None = None
    deep_age: int = 0

    @property
    def moving(self) -> bool:
        """Whether a transition is under way (after step() this call's: an ended one is cleared there)."""
        return self.from_emb is not None or self.from_noise is not None

    def progress(self, now: float) -> float | None:
        """How far the transition under way is (0..1), or None when none is (an ended one is cleared)."""
        if not self.moving:
            return None
        a = (now - self.start) / self.duration
        if a >= 1.0:
            self.from_emb = self.from_noise = None
            return None
        return max(a, 0.0)

    def step(self, p: StreamParams, now: float, emb_of: Callable[[Prompt], torch.Tensor],
             noise_of: Callable[[int], torch.Tensor]) -> float | None:
        """Account for this frame's parameters; returns the transition weight to use now, or None (no blend).

        A change of prompt or seed with transition_s > 0 starts a transition from what the stream shows at this
        moment (mid-transition too, so a second change never jumps) to the new target.
        """
        target = (p.prompt, p.seed)
        if target != self.target:
            if self.target is not None and p.transition_s > 0:
                old_prompt, old_seed = self.target
                a = self.progress(now)
                if p.prompt != old_prompt or (a is not None and self.from_emb is not None):
                    old = emb_of(old_prompt)
                    self.from_emb = old if a is None or self.from_emb is None else lerp(self.from_emb, old, a)
                else:
                    self.from_emb = None
                if p.seed != old_seed or (a is not None and self.from_noise is not None):
                    old = noise_of(old_seed)
                    self.from_noise = old if a is None or self.from_noise is None else slerp(self.from_noise, old, a)
                else:
                    self.from_noise = None
                self.start, self.duration = now, float(p.transition_s)
            else:
                self.from_emb = self.from_noise = None
            self.target = target
        elif p.transition_s == 0:
            self.from_emb = self.from_noise = None  # transitions switched off mid-way: jump to the target
        return self.progress(now)


class StreamStates:
    """StreamState per stream key, least recently used first; at most `limit` of them."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._states: OrderedDict[Hashable, StreamState] = OrderedDict()

    def get(self, key: Hashable) -> StreamState:
        state = self._states.get(key)
        if state is None:
            state = self._states[key] = StreamState()
            while len(self._states) > self.limit:
                self._states.popitem(last=False)
        self._states.move_to_end(key)
        return state

    def release(self, key: Hashable) -> None:
        self._states.pop(key, None)

    def forget_deep(self) -> None:
        """Every stream's kept deep features become valid for no frame (the weights changed): each runs a full frame
        next."""
        for state in self._states.values():
            state.deep_params = None

    def __len__(self) -> int:
        return len(self._states)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._states
