"""The wire protocol of /ws and /view/ws, Sans-I/O: parsing and checking what clients send, building what the server
sends. Nothing here touches a socket, a thread or the engine, so all of it is tested without a server.

Bad input raises ProtocolError(code, message): the session turns it into {"type": "error", ...} and goes on.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..codec import jpeg_size
from ..config import MAX_PROMPT_CHARS, MAX_SEED, Limits, StreamParams
from ..errors import CodecError

PROTOCOL_VERSION = 1

# The wire protocol itself (every message and field) is described in the README's "Wire protocol (`/ws`)".

# Error codes sent as {"type": "error", "code": ..., "message": ...}. The connection stays open unless noted.
ERROR_CODES = {
    "bad_json": "a text message that is not one JSON object",
    "bad_message": "a JSON object without a string 'type', or a text message over the text limit (64 KiB of UTF-8)",
    "unknown_type": "a 'type' this endpoint does not know",
    "bad_config": "an unknown parameter, a wrong type or a value out of range; the old parameters stay",
    "bad_image": "a binary message that is not a decodable JPEG (magic bytes, corrupt or truncated data, far too few "
                 "bytes for its declared size, more scans or segments than the limits, smaller than 8 pixels a side)",
    "image_too_large": "a JPEG whose declared width or height is over the server's limit (checked before decoding)",
    "engine_error": "the engine failed on this frame; the stream goes on",
    "server_error": "the server could not decode this frame or encode its result (a codec failure, out of memory); "
                    "the stream goes on",
    "forbidden": "a viewer tried to change the broadcast without the control token",
    "not_supported": "a binary message sent to the viewer endpoint",
    "no_source": "the viewer endpoint on a server started without --source (connection closed, 1008)",
    "source_ended": "the server-side source ended (a file) or failed for good; no more frames",
    "source_lost": "the server-side live source stopped delivering; it is being opened again (a 'source' message "
                   "with state 'live' follows when it is back)",
    "unauthorized": "/ws or /view/ws without the right ?token= on a server started with --token (connection "
                    "closed, 1008)",
    "server_full": "the client or viewer limit is reached (connection closed, 1013: try again later)",
    "engine_failed": "the engine could not be loaded or warmed up (connection closed, 1011)",
}


class ProtocolError(Exception):
    """One bad message: `code` (a key of ERROR_CODES), a message for the user, and extra fields (e.g. seq)."""

    def __init__(self, code: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.code, self.message, self.extra = code, message, extra


@dataclass
class FrameMeta:
    """What travels with a frame through the batcher: its number on its connection and when it arrived (and, for
    the broadcast of a video file, the frame's time in the file: its published streams start their sound there)."""

    seq: int  # 1, 2, ... per connection, in the order messages arrived
    t_recv: float = field(default_factory=time.perf_counter)
    pts: float | None = None


# ------------------------------------------------------------------------------------------------ client -> server


def parse_text(text: str, limits: Limits) -> dict[str, Any]:
    """A text message -> its JSON object with a string "type"; ProtocolError (bad_message, bad_json) otherwise."""
    # The limit is in UTF-8 bytes, as the README says: 64 Ki emoji are 256 KiB. A character is at most 4 bytes, so
    # only texts that could pass the limit are encoded to count them.
    size = len(text) if len(text) > limits.max_text_bytes else len(text.encode("utf-8", "surrogatepass"))
    if size > limits.max_text_bytes:
        raise ProtocolError("bad_message", f"text message of {size} bytes or more; the limit is "
                                           f"{limits.max_text_bytes} bytes of UTF-8")
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise ProtocolError("bad_json", f"text messages must be one JSON object: {exc}") from None
    if not isinstance(obj, dict):
        raise ProtocolError("bad_json", f"text messages must be one JSON object, got {type(obj).__name__}")
    if not isinstance(obj.get("type"), str):
        raise ProtocolError("bad_message", 'a message needs a "type" string, for example {"type": "config", '
                                           '"prompt": "..."}')
    return obj


def expect_config(obj: dict[str, Any]) -> dict[str, Any]:
    """The parameter fields of a {"type": "config", ...} message; ProtocolError unknown_type for another type."""
    if obj["type"] != "config":
        raise ProtocolError("unknown_type", f"unknown message type {obj['type']!r} (this endpoint knows: config)")
    return {k: v for k, v in obj.items() if k != "type"}


def expect_lora(obj: dict[str, Any]) -> tuple[int | str | None, float]:
    """(which LoRA, its scale) of a {"type": "lora", "lora": N or "name", "scale": x} message (viewers with the control
    token, --lora-live): "lora" a number from 1 or a LoRA's name, left out for the only one; ProtocolError bad_config
    for anything else. The range is the LoraTarget's to check."""
    unknown = sorted(set(obj) - {"type", "lora", "scale"})
    if unknown:
        raise ProtocolError("bad_config", f"a lora message takes lora and scale, not {', '.join(unknown)[:200]}")
    which, scale = obj.get("lora"), obj.get("scale")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise ProtocolError("bad_config", f"scale must be a number, got {str(scale)[:80]!r}")
    if which is not None and (isinstance(which, bool) or not isinstance(which, (int, str))):
        raise ProtocolError("bad_config", f"lora must be a LoRA's number (from 1) or name, got {str(which)[:80]!r}")
    return which, float(scale)


def apply_config(params: StreamParams, fields: dict[str, Any], max_steps: int, reuse: bool = True) -> StreamParams:
    """params with fields applied and checked (the one validation every parameter change goes through); max_steps
    and reuse are the engine's (EngineConfig.max_steps, EngineConfig.reuse_enabled)."""
    try:
        return params.updated((max_steps, reuse), **fields)
    except (ValueError, TypeError, ArithmeticError) as exc:  # ArithmeticError: a number too large for a float
        raise ProtocolError("bad_config", str(exc)) from None


def check_jpeg_header(data: bytes, limits: Limits) -> None:
    """ProtocolError unless data is a JPEG whose frame header fits the limits (no decode). Runs on the event loop, so
    it reads only up to the frame header (at most codec.MAX_SEGMENTS segments). The scans are counted on the codec
    worker before it decodes (codec.check_decode_cost): their walk searches the entropy-coded data for markers, and
    4 MiB crafted of 0xFF bytes cost it up to 0.05 s, which here would stall every connection."""
    try:
        width, height = jpeg_size(data)
    except CodecError as exc:
        raise ProtocolError("bad_image", str(exc)) from None
    side = limits.max_image_side
    if width > side or height > side:
        raise ProtocolError("image_too_large", f"image is {width}x{height}; the limit is {side} pixels a side")
    if width * height > limits.max_pixels_per_byte * len(data):
        raise ProtocolError("bad_image", f"a JPEG of {len(data)} bytes cannot hold {width}x{height} pixels "
                                         "(truncated, or a forged header)")


# ------------------------------------------------------------------------------------------------ server -> client


def error_message(code: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"type": "error", "code": code, "message": message, **extra}


def params_dict(p: StreamParams) -> dict[str, Any]:
    prompt = p.prompt if isinstance(p.prompt, str) else [list(entry) for entry in p.prompt]
    return {"prompt": prompt, "strength": p.strength, "steps": p.steps, "seed": p.seed,
            "similarity": p.similarity, "transition_s": p.transition_s, "feedback": p.feedback, "reuse": p.reuse}


def config_message(p: StreamParams) -> dict[str, Any]:
    """Sent after every accepted change: all of the stream's parameters."""
    return {"type": "config", **params_dict(p)}


def limits_dict(limits: Limits, *, max_steps: int, max_batch: int, reuse: bool = True) -> dict[str, Any]:
    """The limits a client should know, as the ready message carries them (reuse: whether `reuse` >= 2 is allowed)."""
    return {
        "max_message_bytes": limits.max_message_bytes, "max_image_side": limits.max_image_side,
        "max_text_bytes": limits.max_text_bytes, "max_steps": max_steps, "max_prompt_chars": MAX_PROMPT_CHARS,
        "max_seed": MAX_SEED, "max_batch": max_batch, "max_clients": limits.max_clients, "feature_reuse": reuse,
    }


def ready_message(role: str, *, model: str, random_weights: bool, device: str, width: int, height: int,
                  params: StreamParams, limits: dict[str, Any], stats_interval_s: float, loras: Sequence[dict] = (),
                  lora_live: bool = False, **extra: Any) -> dict[str, Any]:
    """The first message of every connection, once the engine is warm. loras: the merged LoRAs' summaries (only
    their display names and scales are sent); lora_live: whether their scales can change (--lora-live)."""
    return {
        "type": "ready", "role": role, "protocol": PROTOCOL_VERSION, **extra, "model": model,
        "random_weights": bool(random_weights), "loras": [{"name": x["name"], "scale": x["scale"]} for x in loras],
        "lora_live": bool(lora_live),
        "device": device, "width": width, "height": height,
        "params": params_dict(params), "limits": limits, "stats_interval_s": stats_interval_s,
    }


def loras_message(loras: Sequence[dict]) -> dict[str, Any]:
    """Sent to every client and viewer when a LoRA's scale changes (--lora-live): all the LoRAs, as in `ready`."""
    return {"type": "loras", "loras": [{"name": x["name"], "scale": x["scale"]} for x in loras]}


def frame_header(meta: FrameMeta, batch: int, now: float | None = None, skipped: bool = False) -> dict[str, Any]:
    """Sent right before a result's JPEG: which input frame it answers, the batch it ran in, the time in the server
    until now, and whether the engine was skipped for it (similarity: the result is the last output again). The
    connection's sender (sessions.Outbox) sets server_ms again once the result is encoded: arrival to encoded."""
    server_ms = ((time.perf_counter() if now is None else now) - meta.t_recv) * 1e3
    return {"type": "frame", "seq": meta.seq, "batch": batch, "server_ms": round(server_ms, 2), "skipped": skipped}
