"""The similarity skip of the live-video controls: whether a new input frame may skip the engine.

It runs in each stream's producer, never on the inference thread: a /ws session's decode worker, the broadcast's
source thread, `turbostream run`'s capture thread. The model is StreamDiffusion's stochastic similarity filter: the
cosine similarity s of a small downscaled copy of the frame against the last frame the filter let through (the
reference) gives a skip probability that grows from 0 at the threshold t to 1 for an identical frame,
p = max(0, 1 - (1 - s) / (1 - t)), and at most MAX_CONSECUTIVE_SKIPS frames in a row are skipped, so a still scene
is still refreshed now and then (and a slow drift shows). A change of parameters, and the transition after it,
always runs the engine.

A skipped frame is answered with the reference frame's output: the producer hands the batcher the reference frame
itself (the same array object) marked as a skip; the batcher answers from the stream's last output when that output
came from exactly this object, and otherwise (the reference was dropped before it ran) runs the reference.
"""

from __future__ import annotations

import dataclasses
import random
import time

import cv2
import numpy as np

from .codec import fit_frame
from .config import MAX_CONSECUTIVE_SKIPS, StreamParams

COMPARE_SIDE = 32  # frames are compared at 32x32: microseconds, and sensor noise averages out


def small_copy(frame: np.ndarray) -> np.ndarray:
    """The comparison copy: downscaled to COMPARE_SIDE a side, float32 in [-1, 1], flattened."""
    small = cv2.resize(frame, (COMPARE_SIDE, COMPARE_SIDE), interpolation=cv2.INTER_AREA)
    return small.astype(np.float32).ravel() / 127.5 - 1.0


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b) / max(float(np.linalg.norm(a) * np.linalg.norm(b)), 1e-12)


class SimilarityFilter:
    """One stream's skip decisions; used by one producer thread at a time (no lock)."""

    def __init__(self, max_skips: int = MAX_CONSECUTIVE_SKIPS, seed: int | None = None,
                 clock=time.monotonic) -> None:
        self.max_skips = max_skips
        self.rng = random.Random(seed)
        self.clock = clock
        self.reference: np.ndarray | None = None  # the last frame let through (the array object itself)
        self._small: np.ndarray | None = None
        self._params: StreamParams | None = None  # its parameters, similarity aside
        self._settle_until = 0.0  # a transition under way: no skips until then
        self.consecutive = 0

    def reset(self) -> None:
        self.reference, self._small, self._params, self.consecutive = None, None, None, 0

    def check(self, frame: np.ndarray, params: StreamParams) -> np.ndarray | None:
        """None: run `frame` (it becomes the reference). Else the reference to answer from: skip `frame`."""
        if params.similarity <= 0:
            self.reset()
            return None
        small = small_copy(frame)
        rest = dataclasses.replace(params, similarity=0.0)
        now = self.clock()
        if self._params is not None and rest != self._params:
            changed = (rest.prompt, rest.seed) != (self._params.prompt, self._params.seed)
            if changed and rest.transition_s > 0:
                self._settle_until = now + rest.transition_s
        skip = False
        if self._small is not None and rest == self._params and now >= self._settle_until \
                and self.consecutive < self.max_skips:
            s = cosine(small, self._small)
            p = max(0.0, 1.0 - (1.0 - s) / (1.0 - params.similarity))
            skip = p > 0 and self.rng.random() < p
        if skip:
            self.consecutive += 1
            return self.reference
        self.reference, self._small, self._params, self.consecutive = frame, small, rest, 0
        return None


class FitAndCheck:
    """`turbostream run`'s capture transform: fit to the engine size, then the similarity check, on the capture
    thread. Returns the fitted frame, or for a skip the reference frame object (the GPU thread reuses its output)."""

    def __init__(self, width: int, height: int, params_of=None) -> None:
        self.width, self.height = width, height
        self.filter = SimilarityFilter()
        self.params_of = params_of  # () -> the run's StreamParams now (None: fit only)

    def __call__(self, frame: np.ndarray) -> np.ndarray:
        fitted = fit_frame(frame, self.width, self.height)
        if self.params_of is None:
            return fitted
        reference = self.filter.check(fitted, self.params_of())
        return fitted if reference is None else reference
