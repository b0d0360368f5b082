"""The GPU core: the frame math (frame.py), its schedules (schedule.py), caches (caches.py), the one place that
changes modules or process state (cuda.py, with attention.py for the UNet's attention and resnet blocks), and the
Engine that runs it all with static buffers and CUDA graphs (engine.py). Read them in that order."""

from .caches import encode_prompt
from .cuda import apply_options
from .engine import Engine, EngineStats


def build_engine(config, components=None) -> Engine:
    """An Engine whose modules carry every option of `config` (attention, skip_unit_rescale, fp8): use it, not
    Engine(), wherever the options matter. ValueError (clear) when an option cannot run here.

    Engine.__init__ prepares its components without the config (prepare_cuda(components)); apply_options here makes
    them match it before the first frame. It is idempotent, so this stays right once Engine passes its config on.
    """
    engine = Engine(config, components)
    apply_options(engine.components, config)
    return engine


__all__ = ["Engine", "EngineStats", "apply_options", "build_engine", "encode_prompt"]
