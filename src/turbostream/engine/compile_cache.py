"""What `--compile` produced, kept between starts: torch's portable compile artifacts in one file per configuration.

torch.compile of the UNet and TAESD costs minutes at the first start. torch.compiler.save_cache_artifacts() bundles
what it built (inductor's compiled graphs, autotuning results, AOTAutograd's cache) into bytes that
load_cache_artifacts() puts back into torch's caches before the next compile, which then reuses them instead of
building again: on another machine or container too, as long as the key matches. The key (cache_key) names everything
the artifacts depend on: torch's version, the GPU, the model, the size, dtype, VAE and batch buckets, and the compile
mode and module options when they are not the defaults.

A missing file is a miss; a file that cannot be read or loaded (corrupt, another torch) is ignored with a warning,
never a crash. Writes are atomic (a temporary file renamed), so a start cut short leaves no half file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

import torch

log = logging.getLogger("turbostream.engine")


def default_folder() -> Path:
    """$TURBOSTREAM_CACHE/compile, else $XDG_CACHE_HOME/turbostream/compile, else ~/.cache/turbostream/compile."""
    if os.environ.get("TURBOSTREAM_CACHE"):
        return Path(os.environ["TURBOSTREAM_CACHE"]) / "compile"
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "turbostream" / "compile"


def cache_key(config, gpu: str, dtype: torch.dtype) -> dict:
    """The compile cache's key for an EngineConfig on a GPU (torch's version is added by CompileCache).

    The compile mode and the options that change what is compiled (compile_dynamic, attention backend, prompt_kv,
    fused_time_proj, fp8, skip_unit_rescale, feature reuse: its full and partial forwards are compiled too, and where
    its cut lies) are in it only when they differ from the values before those options existed, so a configuration
    that compiles what it compiled then keeps its key (and cache files). skip_unit_rescale is on by default since
    2026-11-26, so today's default key names it.
    """
    key = {"gpu": gpu, "model": config.model, "vae": config.vae, "dtype": str(dtype),
           "size": [config.width, config.height], "buckets": list(config.buckets),
           "unet_evals": config.default_params.unet_evals}
    for name, default in (("compile_mode", "default"), ("compile_dynamic", False), ("attention", "auto"),
                          ("fp8", False), ("skip_unit_rescale", False), ("reuse_enabled", False),
                          ("reuse_layers", None), ("compile_aot", False), ("aot_format", "aotinductor"),
                          ("prompt_kv", False), ("fused_time_proj", False)):
        if getattr(config, name, default) != default:
            key[name] = getattr(config, name)
    return key


def _with_torch(key: dict) -> tuple[dict, str]:
    """The key with torch's version added, and its digest (what names a cache entry)."""
    key = {"torch": torch.__version__, **key}
    return key, hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]


def aot_folder(folder: Path | str, key: dict) -> Path | None:
    """The folder of one configuration's AOTInductor packages (--compile-aot, engine/aot.py), its key in key.json.

    The key is cache_key's plus torch's version, as for CompileCache; a folder whose packages no longer fit is
    found out when they are loaded (each is checked against the eager network) and rebuilt in place. None (with a
    warning) if the folder cannot be written: the packages are then built for this start only.
    """
    key, digest = _with_torch(key)
    path = Path(folder).expanduser() / f"aot-{digest}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        (path / "key.json").write_text(json.dumps(key, indent=1, sort_keys=True) + "\n")
    except OSError as exc:
        log.warning("compile cache: cannot write %s (%s); building for this start only", path, exc)
        return None
    return path


class CompileCache:
    """One configuration's artifacts file in `folder`: load() before compiling, save() after a miss."""

    def __init__(self, folder: Path | str, key: dict) -> None:
        self.key, digest = _with_torch(key)
        self.path = Path(folder).expanduser() / f"compile-{digest}.bin"

    def load(self) -> bool:
        """Put saved artifacts back into torch's caches; True on a hit (logged either way)."""
        if not self.path.is_file():
            log.info("compile cache: no entry for this configuration yet (%s); compiling from scratch", self.path)
            return False
        try:
            info = torch.compiler.load_cache_artifacts(self.path.read_bytes())
        except Exception as exc:  # noqa: BLE001 - corrupt, truncated, another torch's format: compile as if missing
            log.warning("compile cache: ignoring %s (%s: %s); compiling from scratch", self.path,
                        type(exc).__name__, exc)
            return False
        entries = sum(len(v) for v in info.artifacts.values()) if info is not None else 0
        if not entries:
            log.warning("compile cache: ignoring %s (torch could not use it: corrupt, or from another version); "
                        "compiling from scratch", self.path)
            return False
        log.info("compile cache: hit, %d artifacts from %s", entries, self.path)
        return True

    def save(self) -> bool:
        """Write what torch compiled in this process; False (with a warning) if there is nothing or it fails."""
        try:
            saved = torch.compiler.save_cache_artifacts()
            if saved is None:
                log.warning("compile cache: torch had nothing to save")
                return False
            data = saved[0]
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.path.parent, prefix=".compile-", delete=False) as tmp:
                tmp.write(data)
            os.replace(tmp.name, self.path)
        except Exception as exc:  # noqa: BLE001 - a cache that cannot be written costs the next start time, no more
            log.warning("compile cache: could not write %s: %s", self.path, exc)
            return False
        log.info("compile cache: saved %.1f MiB to %s", len(data) / 2**20, self.path)
        return True
