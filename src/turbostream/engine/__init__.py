"""The GPU core: the frame math (frame.py), its schedules (schedule.py), caches (caches.py), the one place that
changes modules or process state (cuda.py, with attention.py for the UNet's attention and resnet blocks), per-stream
state of the live-video controls (streams.py), temporal feature reuse (reuse.py), and the Engine that runs it all with
static buffers and CUDA graphs (engine.py). Read them in that order.

Beside that path, each opt-in speed option in its own module: prompt_kv.py, time_proj.py, group_norm.py and
epilogue.py (with their Triton kernels, triton_support.py and kernel_warmup.py); compiling: compiling.py (what
--compile and --compile-aot swap into the frame math), with its warm starts in compile_cache.py (--compile's
artifacts), aot.py and aot_check.py (--compile-aot)."""

from .caches import encode_prompt
from .cuda import apply_options
from .engine import Engine, EngineStats


__all__ = ["Engine", "EngineStats", "apply_options", "encode_prompt"]
