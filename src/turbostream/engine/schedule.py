"""Schedule math: which timesteps and sigmas an img2img run of (steps, strength) uses.

It follows diffusers' StableDiffusionImg2ImgPipeline with EulerDiscreteScheduler exactly (the scheduler object itself
computes the tables): a `steps`-step trailing schedule is built, and the run keeps its last int(steps * strength)
timesteps. For SD-Turbo, steps 2 and strength 0.5 keep one timestep, t=499 (sigma 1.61).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property, lru_cache

import torch
from diffusers import EulerDiscreteScheduler


@dataclass(frozen=True)
class Schedule:
    """The part of a schedule one frame walks: n timesteps, n + 1 sigmas (the last is 0: a clean sample)."""

    timesteps: tuple[float, ...]
    sigmas: tuple[float, ...]
    # The scale of the pure noise a text-to-image run starts from (the scheduler's init_noise_sigma): sigmas[0] for
    # trailing and linspace spacing (SD-Turbo), sqrt(sigmas[0]^2 + 1) for leading. img2img noises at sigmas[0].
    init_sigma: float = 0.0

    @property
    def unet_evals(self) -> int:
        return len(self.timesteps)

    @cached_property
    def table(self) -> torch.Tensor:
        """(n, 3) float32: row k is (timestep k, sigma k, sigma k + 1), what UNet evaluation k and its Euler step read.

        Built once per schedule (the table caches schedules), so staging a batch copies rows, not Python lists.
        """
        rows = [(t, self.sigmas[k], self.sigmas[k + 1]) for k, t in enumerate(self.timesteps)]
        return torch.tensor(rows, dtype=torch.float32)


class ScheduleTable:
    """Schedules of one scheduler config, cached per (steps, unet_evals); both are bounded, so the cache is too."""

    def __init__(self, scheduler_config) -> None:
        self._config = dict(scheduler_config)
        prediction = self._config.get("prediction_type", "epsilon")
        if prediction != "epsilon":
            # FrameMath.step is Euler on predicted noise; a v- or sample-predicting UNet would give wrong frames.
            raise ValueError(f"this model's scheduler says its UNet predicts {prediction!r}; turbostream runs models "
                             "that predict the noise ('epsilon': SD-Turbo, SD 1.x, SD 2.x base) only")
        self._cached = lru_cache(maxsize=256)(self._compute)

    def get(self, steps: int, unet_evals: int) -> Schedule:
        """Schedule of the last `unet_evals` timesteps of a `steps`-step schedule (img2img), or all (txt2img)."""
        if not 1 <= unet_evals <= steps:
            raise ValueError(f"unet_evals must be in 1..steps ({steps}), got {unet_evals}")
        return self._cached(steps, unet_evals)

    def _compute(self, steps: int, unet_evals: int) -> Schedule:
        scheduler = EulerDiscreteScheduler.from_config(self._config)
        scheduler.set_timesteps(steps)
        start = steps - unet_evals  # diffusers' t_start in get_timesteps (Euler's order is 1)
        return Schedule(
            timesteps=tuple(float(t) for t in scheduler.timesteps[start:]),
            sigmas=tuple(float(s) for s in scheduler.sigmas[start:]),
            init_sigma=float(scheduler.init_noise_sigma),
        )
