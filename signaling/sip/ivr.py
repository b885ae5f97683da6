"""The voice menu: dial plan, DTMF collection (RFC 4733 and SIP INFO) and the menu dialogue.

``DialPlan`` decides from the request-URI user whether a call goes straight
to a room (``room-<name>``, or a configured mapping), hears the menu, or is
refused (404).  ``DtmfReceiver`` turns telephone-event packets and SIP INFO
bodies into digits, once per key press.  ``run_menu`` speaks the menu, lets
the caller interrupt it by typing, collects digits up to ``#`` and joins the
room they name; after the configured attempts it says goodbye and hangs up.
``MenuPrompts`` speaks the menu texts through the server's SynthService.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from mediaserver.config import SipConfig
from mediaserver.room import RoomError, RoomRegistry
from mediaserver.server import MediaServer

log = logging.getLogger(__name__)

EVENT_DIGITS = "0123456789*#ABCD"
MAX_DIGITS = 16


@dataclass(frozen=True)
class Destination:
    """Where a call goes: straight into ``room``, or to the menu (``room`` is None)."""

    room: str | None

    @property
    def menu(self) -> bool:
        return self.room is None


class DialPlan:
    """Owns the mapping from request-URI users and menu digits to rooms."""

    def __init__(self, config: SipConfig) -> None:
        self._config = config
        self._mapping = dict(config.dial_plan)

    def resolve(self, user: str) -> Destination | None:
        """The destination of a request-URI user; None: unknown (404)."""
        if user in self._mapping:
            return Destination(self._mapping[user])
        prefix = self._config.room_prefix
        if prefix and user.lower().startswith(prefix.lower()) and len(user) > len(prefix):
            room = user[len(prefix):]
            return Destination(room) if _valid_room(room) else None
        if user.lower() in {u.lower() for u in self._config.menu_users}:
            return Destination(None)
        return None

    def room_for_digits(self, digits: str) -> str | None:
        if digits in self._mapping:
            return self._mapping[digits]
        if self._config.digits_name_rooms and digits.isdigit():
            return digits
        return None


def _valid_room(room: str) -> bool:
    try:
        RoomRegistry.validate_id(room)
    except RoomError:
        return False
    return True


def parse_telephone_event(payload: bytes) -> tuple[int, bool, int]:
    """RFC 4733 payload -> (event, end, duration); raises ValueError when too short."""
    if len(payload) < 4:
        raise ValueError("telephone-event payload is 4 bytes")
    event, flags, duration = struct.unpack("!BBH", payload[:4])
    return event, bool(flags & 0x80), duration


def parse_info_digit(content_type: str, body: bytes) -> str | None:
    """The digit of a SIP INFO body (application/dtmf-relay ``Signal=5`` or application/dtmf ``5``)."""
    text = body.decode("utf-8", "replace").strip()
    if content_type == "application/dtmf-relay":
        for line in text.splitlines():
            name, _, value = line.partition("=")
            if name.strip().lower() == "signal":
                text = value.strip()
                break
        else:
            return None
    elif content_type != "application/dtmf":
        return None
    if text.isascii() and text.isdigit() and len(text) <= 2 and int(text) < 16:  # some phones send event numbers
        return EVENT_DIGITS[int(text)]
    text = text.upper()
    return text if len(text) == 1 and text in EVENT_DIGITS else None


class DtmfReceiver:
    """Owns the key presses of one call: dedupes telephone-event packets, queues digits."""

    def __init__(self) -> None:
        self.digits: asyncio.Queue[str] = asyncio.Queue(maxsize=64)
        self._last_event: tuple[int, int] | None = None  # (rtp timestamp, event) of the last key press
        self.received = 0

    def feed_rtp(self, timestamp: int, payload: bytes) -> None:
        """Every packet of an event carries the same timestamp: report the first one."""
        try:
            event, _end, _duration = parse_telephone_event(payload)
        except ValueError:
            return
        if event >= len(EVENT_DIGITS) or self._last_event == (timestamp, event):
            return
        self._last_event = (timestamp, event)
        self._put(EVENT_DIGITS[event])

    def feed_info(self, content_type: str, body: bytes) -> bool:
        digit = parse_info_digit(content_type, body)
        if digit is None:
            return False
        self._put(digit)
        return True

    def _put(self, digit: str) -> None:
        self.received += 1
        if not self.digits.full():
            self.digits.put_nowait(digit)

    def clear(self) -> None:
        while not self.digits.empty():
            self.digits.get_nowait()


class MenuCall(Protocol):
    """What the menu needs from a call."""

    dtmf: DtmfReceiver

    def start_prompt(self, audio: np.ndarray) -> float: ...

    def stop_prompt(self) -> None: ...

    async def play(self, audio: np.ndarray) -> None: ...

    async def join_room(self, room_id: str) -> bool: ...


class Prompts(Protocol):
    async def audio(self, text: str) -> np.ndarray: ...


async def collect_digits(call: MenuCall, prompt: np.ndarray, digit_timeout_s: float) -> str | None:
    """Speak ``prompt`` while reading keys: the first key stops it; ``#`` ends, ``*`` starts over.

    Returns the digits typed (possibly empty), or None when the caller typed nothing in time.
    """
    duration = call.start_prompt(prompt)
    typed = ""
    timeout = duration + digit_timeout_s
    while True:
        try:
            digit = await asyncio.wait_for(call.dtmf.digits.get(), timeout)
        except TimeoutError:
            call.stop_prompt()
            return typed or None
        call.stop_prompt()
        timeout = digit_timeout_s
        if digit == "#":
            return typed
        if digit == "*":
            typed = ""
        elif len(typed) < MAX_DIGITS:
            typed += digit


async def run_menu(call: MenuCall, prompts: Prompts, plan: DialPlan, config: SipConfig) -> bool:
    """The menu dialogue; True when the caller ended up in a room."""
    menu = await prompts.audio(config.menu_text)
    for attempt in range(config.menu_attempts):
        digits = await collect_digits(call, menu, config.digit_timeout_s)
        log.info("sip menu: attempt %d, digits %r", attempt + 1, digits)
        if digits:
            room = plan.room_for_digits(digits)
            if room is not None and _valid_room(room) and await call.join_room(room):
                return True
            await call.play(await prompts.audio(config.invalid_text))
        call.dtmf.clear()
    await call.play(await prompts.audio(config.goodbye_text))
    return False


class MenuPrompts:
    """Speech for the menu, from the server's SynthService (cached there)."""

    def __init__(self, server: MediaServer) -> None:
        self._server = server

    async def audio(self, text: str) -> np.ndarray:
        try:
            synth = await self._server.prompts.service()
            return (await synth.synthesize(text)).audio
        except Exception:
            log.exception("sip: cannot synthesize %r; the caller hears silence", text)
            return np.zeros(48_000, dtype=np.float32)
