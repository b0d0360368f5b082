"""What `--compile` produced, kept between starts: torch's portable compile artifacts in one file per configuration.

torch.compile of the UNet and TAESD costs minutes at the first start. torch.compiler.save_cache_artifacts() bundles
what it built (inductor's compiled graphs, autotuning results, AOTAutograd's cache) into bytes that
load_cache_artifacts() puts back into torch's caches before the next compile, which then reuses them instead of
building again: on another machine or container too, as long as the key matches. The key (cache_key) names everything
the artifacts depend on: torch's version, the GPU (and its index where the code names it: device_key), the model, the
size, dtype, VAE and batch buckets, and the compile mode and module options when they are not the defaults.

A missing file is a miss; a file that cannot be read or loaded (corrupt, another torch) is ignored with a warning,
never a crash. A file that held only part of what a start compiled (a partial hit: another diffusers, another
graph) is written anew with everything that start compiled (CompileCache.refresh). Writes are atomic (a temporary
file renamed, removed if the write or the rename fails), so a start cut short leaves no half file; files get the
umask's mode, so a cache filled by one user (`turbostream warmup` as root in a Dockerfile) is read by another.

cache_folder() is the one place a --compile-cache setting becomes a folder (~ expanded); every file of the cache
(these, the --compile-aot folders of aot_folder(), aot_check.py's verdicts) is found from what it returns.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
import time
import uuid
from pathlib import Path

import torch

log = logging.getLogger("turbostream.engine")


def default_folder() -> Path:
    """$TURBOSTREAM_CACHE/compile, else $XDG_CACHE_HOME/turbostream/compile, else ~/.cache/turbostream/compile."""
    if os.environ.get("TURBOSTREAM_CACHE"):
        return Path(os.environ["TURBOSTREAM_CACHE"]) / "compile"
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "turbostream" / "compile"


def cache_folder(setting: str | None) -> Path | None:
    """The compile cache folder of EngineConfig.compile_cache: None (--no-compile-cache) stays None, "" is
    default_folder(); a leading ~ is expanded (`--compile-cache=~/cc`, TURBOSTREAM_CACHE=~/tc), which the shell
    does not do after "=" or in an environment file."""
    if setting is None:
        return None
    return Path(setting or default_folder()).expanduser()


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


def device_key(key: dict, device: torch.device) -> dict:
    """The key of torch.compile's artifacts on `device`: cache_key's, naming the CUDA device's index unless it is 0.

    inductor writes the index of the GPU it compiled for into the code it generates (device guards, raw streams).
    --aot-format dynamo's artifacts keep that code as it is: cuda:0's, loaded by an engine on cuda:1, would run on
    cuda:0. --compile's artifacts are inductor cache entries whose keys name the device, so cuda:0's only miss on
    cuda:1; but one file for both would be rewritten by each GPU's engine in turn (CompileCache.refresh). AOTInductor
    packages take the index when they are loaded and are not keyed by it. Index 0 is left out, so single-GPU machines
    keep their keys (and files).
    """
    if device.type != "cuda":
        return key
    index = device.index if device.index is not None else torch.cuda.current_device()
    return key if index == 0 else {**key, "device_index": index}


def _with_torch(key: dict) -> tuple[dict, str]:
    """The key with torch's version added, and its digest (what names a cache entry)."""
    key = {"torch": torch.__version__, **key}
    return key, hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]


def _can_write(folder: Path) -> bool:
    """Whether a file can be created in `folder` (a read-only volume, another user's folder: no)."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def aot_folder(folder: Path, key: dict) -> tuple[Path | None, bool]:
    """The folder of one configuration's --compile-aot packages (engine/aot.py), its key in key.json, and whether
    it can be written.

    The key is cache_key's plus torch's version, as for CompileCache; a folder whose packages no longer fit is
    found out when they are loaded (each is checked against the eager network) and rebuilt in place. A folder that
    already holds this key is used even where it cannot be written (a read-only volume that `turbostream warmup`
    filled): its packages are loaded, and any that must be built are built for this start only. (None, False), with
    a warning, if there is no such folder and it cannot be made: the packages are then built for this start only.
    """
    key, digest = _with_torch(key)
    path = folder / f"aot-{digest}"
    try:
        kept = json.loads((path / "key.json").read_text())
    except (OSError, ValueError):
        kept = None
    if kept == json.loads(json.dumps(key)):  # as JSON gives it back (lists for tuples)
        writable = _can_write(path)
        if not writable:
            log.info("compile cache: %s cannot be written; loading its packages, building any it lacks for this "
                     "start only", path)
        return path, writable
    try:
        path.mkdir(parents=True, exist_ok=True)
        (path / "key.json").write_text(json.dumps(key, indent=1, sort_keys=True) + "\n")
    except OSError as exc:
        log.warning("compile cache: cannot write %s (%s); building for this start only", path, exc)
        return None, False
    return path, True


def _artifact_keys(info) -> set[tuple[str, str]]:
    """(type, key) of every artifact a torch CacheInfo names."""
    return {(kind, key) for kind, keys in info.artifacts.items() for key in keys} if info is not None else set()


def _recorded() -> tuple[bytes | None, set[tuple[str, str]]]:
    """What torch compiled in this process so far, or took from its caches for a compile (both are recorded): the
    bytes save_cache_artifacts() gives (None if nothing), and the (type, key) of each artifact in them."""
    from torch._dynamo import convert_frame

    # Compiles record their artifacts under dynamo's compile lock; another engine's thread may be compiling now.
    with getattr(convert_frame, "compile_lock", contextlib.nullcontext()):
        saved = torch.compiler.save_cache_artifacts()
    if saved is None:
        return None, set()
    return saved[0], _artifact_keys(saved[1])


STALE_TEMPORARY_S = 24 * 3600  # a write takes minutes at most: a temporary file this old is one that was killed


def sweep_stale_temporaries(folder: Path) -> int:
    """Remove the temporary files (.NAME*.tmp*: a package's, a compile file's) that writes killed mid-way (SIGKILL,
    a stop without a handler) left in a cache folder, once they are a day old; how many. Nothing reads them, but
    packages and compile files are large (hundreds of MB)."""
    removed, now = 0, time.time()
    with contextlib.suppress(OSError):
        for path in folder.glob(".*.tmp*"):
            with contextlib.suppress(OSError):
                if now - path.stat().st_mtime > STALE_TEMPORARY_S:
                    path.unlink()
                    removed += 1
    if removed:
        log.info("removed %d temporary file(s) of writes cut short from %s", removed, folder)
    return removed


class CompileCache:
    """One configuration's artifacts file in `folder`: load() before compiling, refresh() after."""

    def __init__(self, folder: Path | str, key: dict) -> None:
        self.key, digest = _with_torch(key)
        self.path = Path(folder) / f"compile-{digest}.bin"
        self.held: set[tuple[str, str]] = set()  # (type, key) of the artifacts load() put back into torch's caches
        self.compiled = 0  # after refresh(): artifacts this start compiled that the file did not hold
        # What torch had recorded before load(): another engine's compile in this process (serve --device
        # cuda:0,cuda:1), not this one's.
        self._before: set[tuple[str, str]] = set()
        self._unusable: tuple[int, int] | None = None  # (inode, mtime) of a file load() could not use

    def load(self) -> bool:
        """Put saved artifacts back into torch's caches; True if there were any (logged either way). Whether they
        covered this start's compile is known after it (refresh)."""
        try:
            self._before = _recorded()[1]
        except Exception:  # noqa: BLE001 - torch could not serialize what it holds: count none
            self._before = set()
        if not self.path.is_file():
            log.info("compile cache: no entry for this configuration yet (%s); compiling from scratch", self.path)
            return False
        try:
            stat = self.path.stat()
            data = self.path.read_bytes()
        except OSError as exc:  # another user's file (refresh() replaces it if this start compiles anything)
            log.warning("compile cache: cannot read %s (%s); compiling from scratch", self.path, exc)
            return False
        try:
            self.held = _artifact_keys(torch.compiler.load_cache_artifacts(data))
            why = "torch could not use it: corrupt, or from another version"
        except Exception as exc:  # noqa: BLE001 - corrupt, truncated, another torch's format: compile as if missing
            why = f"{type(exc).__name__}: {exc}"
        if not self.held:
            log.warning("compile cache: ignoring %s (%s); compiling from scratch", self.path, why)
            self._unusable = (stat.st_ino, stat.st_mtime_ns)
            return False
        log.info("compile cache: %d artifacts loaded from %s", len(self.held), self.path)
        return True

    def refresh(self) -> str:
        """After the compile: "hit" if it compiled nothing the file did not hold, else "partial hit, N artifacts
        compiled" (the file held some: another diffusers or device) or "miss", and the file written anew with all
        this process compiled, so the next start finds it. A file load() could not use that nothing replaces (every
        --aot-format dynamo artifact loaded: nothing compiled) is removed, so later starts do not warn of it again.
        """
        try:
            data, recorded = _recorded()
        except Exception as exc:  # noqa: BLE001 - a cache that cannot be written costs the next start time, no more
            log.warning("compile cache: could not serialize what torch compiled (%s: %s)", type(exc).__name__, exc)
            data, recorded = None, set()
        new = recorded - self.held - self._before
        self.compiled = len(new)
        if new and data is not None:
            self._write(data)
        elif self._unusable is not None:
            self._drop_unusable()
        if not self.held:
            return "miss"
        return f"partial hit, {len(new)} artifact{'' if len(new) == 1 else 's'} compiled" if new else "hit"

    def _write(self, data: bytes) -> None:
        # open() creates the file with the umask's mode (tempfile's 0600 would survive the rename, and a cache filled
        # by one user, `turbostream warmup` as root, could not be read by a server running as another).
        tmp = self.path.with_name(f".compile-{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            sweep_stale_temporaries(self.path.parent)
            with open(tmp, "xb") as f:
                f.write(data)
            os.replace(tmp, self.path)
        except Exception as exc:  # noqa: BLE001 - a cache that cannot be written costs the next start time, no more
            log.warning("compile cache: could not write %s: %s", self.path, exc)
            return
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)  # a write or rename that failed (a full disk) leaves no partial file
        log.info("compile cache: saved %.1f MiB to %s", len(data) / 2**20, self.path)

    def _drop_unusable(self) -> None:
        """Remove the file load() could not use, if it is still that file (not one another process wrote since)."""
        try:
            stat = self.path.stat()
            if (stat.st_ino, stat.st_mtime_ns) != self._unusable:
                return
            self.path.unlink()
        except OSError:
            return  # a read-only folder: the next start warns again
        log.info("compile cache: removed %s, which could not be used (nothing compiled at this start to write in "
                 "its place)", self.path)
