"""Prompt requests from the outside: ``POST /api/rooms/{id}/prompts`` and the ``prompt`` WebSocket message.

Both take the same fields (``text``, and optionally ``voice``, ``rate``, ``pitch``, ``ssml``, ``to``,
``interrupt``), validate their types here and hand the request to ``MediaServer.play_prompt``, whose
``prompts`` manager synthesizes, queues and plays it.  Errors are ``RoomError``s: the HTTP middleware
and the WebSocket loop turn them into their usual JSON errors.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from mediaserver.prompts import Prompt
from mediaserver.room import Participant, RoomError
from mediaserver.server import MediaServer
from signaling.protocol import error
from synth import VoiceOptions

log = logging.getLogger(__name__)

MAX_VOICE_CHARS = 64
MAX_ID_CHARS = 64


@dataclass(frozen=True)
class PromptRequest:
    """A validated prompt request: what to say, how, to whom, and whether to cut the current prompt."""

    text: str
    options: VoiceOptions
    to: str | None
    interrupt: bool


def _optional_str(body: dict[str, Any], key: str, max_len: int, code: str) -> str | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value or len(value) > max_len:
        raise RoomError(code, f"'{key}' must be a non-empty string of at most {max_len} characters")
    return value


def _optional_number(body: dict[str, Any], key: str, default: float, code: str) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RoomError(code, f"'{key}' must be a number")
    return float(value)


def _optional_bool(body: dict[str, Any], key: str, code: str) -> bool:
    value = body.get(key, False)
    if not isinstance(value, bool):
        raise RoomError(code, f"'{key}' must be true or false")
    return value


def parse_prompt_request(body: dict[str, Any], code: str = "bad-request") -> PromptRequest:
    """Check the field types of a prompt request; ``code`` is the error code for a wrong type.

    Text limits, voices and option ranges are the synthesizer's to check (``empty-text``,
    ``too-large``, ``unknown-voice``, ``bad-option``).
    """
    text = body.get("text")
    if not isinstance(text, str):
        raise RoomError(code, "'text' is required and must be a string")
    options = VoiceOptions(
        voice=_optional_str(body, "voice", MAX_VOICE_CHARS, code),
        rate=_optional_number(body, "rate", 1.0, code),
        pitch=_optional_number(body, "pitch", 1.0, code),
        ssml=_optional_bool(body, "ssml", code),
    )
    return PromptRequest(text=text, options=options, to=_optional_str(body, "to", MAX_ID_CHARS, code),
                         interrupt=_optional_bool(body, "interrupt", code))


def prompt_reply(prompt: Prompt) -> dict[str, Any]:
    """What the requester learns about a queued prompt."""
    return {"prompt": prompt.id, "duration_s": round(prompt.duration_s, 3), "to": prompt.to,
            "voice": prompt.voice, "cached": prompt.cache_hit, "synthetic": True}


async def _play(server: MediaServer, room_id: str, req: PromptRequest) -> Prompt:
    """Through ``MediaServer.play_prompt``, so that every prompt is seen the same way (telemetry)."""
    prompt_id = await server.play_prompt(room_id, req.text, req.options, to=req.to, interrupt=req.interrupt)
    prompt = server.prompts.find(prompt_id)
    assert prompt is not None  # just queued
    return prompt


async def post_prompt(request: web.Request) -> web.Response:
    """``POST /api/rooms/{room_id}/prompts``: 202 ``{prompt, duration_s, ...}`` once the prompt is queued."""
    from signaling.app import SERVER_KEY, read_json, require_admin  # signaling.app imports this module

    server = request.app[SERVER_KEY]
    room_id = request.match_info["room_id"]
    require_admin(request, room_id)
    server.rooms.get(room_id)  # 404 before reading the body
    req = parse_prompt_request(await read_json(request))
    prompt = await _play(server, room_id, req)
    return web.json_response({"room": room_id, **prompt_reply(prompt)}, status=202)


_running: set[asyncio.Task[None]] = set()


async def handle_prompt_message(server: MediaServer, participant: Participant, msg: dict[str, Any],
                                send: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
    """The ``prompt`` message of a joined participant with admin rights: a prompt into its own room.

    Field types are checked at once (``bad-message``); synthesis runs in a task so that the
    connection's other messages (answers to server offers) do not wait for it.  The reply is
    ``prompt.queued``, or an ``error`` with ``"request": "prompt"``.
    """
    try:
        if not participant.is_admin:
            raise RoomError("forbidden", "playing prompts needs the admin permission", status=403)
        req = parse_prompt_request(msg, code="bad-message")
    except RoomError as exc:
        await send(error(exc.code, str(exc), request="prompt"))
        return
    room_id = participant.room.id

    async def play() -> None:
        try:
            prompt = await _play(server, room_id, req)
        except RoomError as exc:
            log.info("participant %s: prompt refused: %s", participant.id, exc)
            await send(error(exc.code, str(exc), request="prompt"))
            return
        except Exception:
            log.exception("participant %s: prompt failed", participant.id)
            await send(error("internal", "the prompt could not be played", request="prompt"))
            return
        await send({"type": "prompt.queued", **prompt_reply(prompt)})

    task = asyncio.get_running_loop().create_task(play(), name=f"prompt-request-{participant.id}")
    _running.add(task)
    task.add_done_callback(_running.discard)
