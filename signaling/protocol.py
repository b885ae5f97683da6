"""The WebSocket signaling protocol: message shapes, validation and limits.

Every inbound message is a JSON object with a string ``type``.  Validation
here turns anything malformed into a ``ProtocolError`` carrying the error
code the client receives; the connection stays open for the next message.
See docs/PROTOCOL.md.
"""

from __future__ import annotations

import json
import time
from typing import Any

PROTOCOL_VERSION = 1

CLIENT_TYPES = {"join", "offer", "answer", "mute", "set-stages", "leave", "ping", "prompt"}


class ProtocolError(Exception):
    """A message the server refuses; ``code`` goes into the error reply."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def parse_message(text: str, max_bytes: int) -> dict[str, Any]:
    if len(text.encode("utf-8", "surrogatepass")) > max_bytes:
        raise ProtocolError("too-large", f"messages are limited to {max_bytes} bytes")
    try:
        msg = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise ProtocolError("bad-json", f"not valid JSON: {exc}") from None
    if not isinstance(msg, dict):
        raise ProtocolError("bad-message", "a message is a JSON object")
    mtype = msg.get("type")
    if not isinstance(mtype, str):
        raise ProtocolError("bad-message", "a message needs a string 'type'")
    if mtype not in CLIENT_TYPES:
        raise ProtocolError("unknown-type", f"unknown message type {mtype[:40]!r}")
    return msg


def require_str(msg: dict[str, Any], key: str, *, max_len: int, optional: bool = False,
                default: str = "") -> str:
    value = msg.get(key)
    if value is None:
        if optional:
            return default
        raise ProtocolError("bad-message", f"'{key}' is required")
    if not isinstance(value, str):
        raise ProtocolError("bad-message", f"'{key}' must be a string")
    if len(value) > max_len:
        raise ProtocolError("too-large", f"'{key}' is limited to {max_len} characters")
    return value


def require_bool(msg: dict[str, Any], key: str, default: bool) -> bool:
    value = msg.get(key, default)
    if not isinstance(value, bool):
        raise ProtocolError("bad-message", f"'{key}' must be true or false")
    return value


def check_version(msg: dict[str, Any]) -> None:
    version = msg.get("version", PROTOCOL_VERSION)
    if version != PROTOCOL_VERSION:
        raise ProtocolError("unsupported-version", f"this server speaks protocol version {PROTOCOL_VERSION}")


def error(code: str, message: str, request: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "error", "code": code, "message": message}
    if request:
        out["request"] = request
    return out


class TokenBucket:
    """Message-rate limit of one connection."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.capacity = float(burst)
        self.tokens = float(burst)
        self.stamp = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False
