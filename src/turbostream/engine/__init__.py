"""The GPU core: the frame math (frame.py), its schedules (schedule.py), caches (caches.py), the one place that
changes modules or process state (cuda.py, with attention.py for the UNet's attention and resnet blocks), and the
Engine that runs it all with static buffers and CUDA graphs (engine.py). Read them in that order."""

from .caches import encode_prompt
from .cuda import apply_options
from .engine import Engine, EngineStats


__all__ = ["Engine", "EngineStats", "apply_options", "encode_prompt"]
