"""Fuzzing the signaling messages and SDP handling: only clean refusals, never a crash or a hang."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiortc import RTCConfiguration, RTCPeerConnection
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mediaserver.auth import AuthError
from mediaserver.config import AuthConfig, EnhanceConfig, ServerConfig
from mediaserver.room import RoomError
from mediaserver.server import MediaServer
from mediaserver.session import NegotiationError
from signaling.protocol import CLIENT_TYPES, ProtocolError, parse_message
from signaling.websocket import SignalingConnection

REFUSALS = (ProtocolError, RoomError, NegotiationError, AuthError)
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class RecordingSocket:
    """Stands in for the WebSocket: collects what the server sends."""

    closed = False

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []

    async def send_json(self, message: dict[str, Any]) -> None:
        json.dumps(message)  # everything the server sends must be valid JSON
        self.sent.append(message)


json_leaf = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
                      st.text(max_size=80))
json_value = st.recursive(json_leaf, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)), max_leaves=12)
message = st.fixed_dictionaries(
    {"type": st.one_of(st.sampled_from(sorted(CLIENT_TYPES)), st.text(max_size=12))},
    optional={"room": st.one_of(st.sampled_from(["r", "lobby", "bad room", ""]), json_value),
              "name": json_value, "sdp": st.one_of(st.text(max_size=300), json_value),
              "stages": st.one_of(st.sampled_from(["vad", "denoise,aec", "nope", ""]), json_value),
              "muted": json_value, "token": json_value, "version": json_value,
              "echoCancellation": json_value})


def _config() -> ServerConfig:
    # no stages: the executor is not started in these in-process harnesses
    return ServerConfig(host="127.0.0.1", port=0, auth=AuthConfig(dev_mode=True),
                        enhance=EnhanceConfig(default_stages=()))


async def _drive(messages: list[str]) -> list[dict[str, Any]]:
    server = MediaServer(_config())
    ws = RecordingSocket()
    conn = SignalingConnection(ws, server, "fuzz")  # type: ignore[arg-type]
    try:
        for raw in messages:
            try:
                await asyncio.wait_for(conn.handle(parse_message(raw, 64 * 1024)), 5.0)
            except REFUSALS:
                pass
    finally:
        if conn.participant is not None:
            await server.leave(conn.participant)
        await server.close()
    return ws.sent


@FUZZ
@given(st.lists(message, min_size=1, max_size=5))
def test_signaling_messages_are_refused_cleanly(msgs: list[dict[str, Any]]) -> None:
    asyncio.run(_drive([json.dumps(m) for m in msgs]))


@FUZZ
@given(st.lists(st.text(max_size=200), min_size=1, max_size=4))
def test_arbitrary_text_frames_are_refused_cleanly(frames: list[str]) -> None:
    asyncio.run(_drive(frames))


def _valid_offer() -> str:
    async def make() -> str:
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        pc.addTransceiver("audio", direction="sendrecv")
        await pc.setLocalDescription(await pc.createOffer())
        sdp = str(pc.localDescription.sdp)
        await pc.close()
        return sdp

    return asyncio.run(make())


OFFER_LINES = _valid_offer().splitlines()


@st.composite
def mutated_sdp(draw: st.DrawFn) -> str:
    lines = list(OFFER_LINES)
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["drop", "dup", "garble", "insert", "swap"]))
        i = draw(st.integers(0, len(lines) - 1))
        if op == "drop" and len(lines) > 1:
            lines.pop(i)
        elif op == "dup":
            lines.insert(i, lines[i])
        elif op == "garble":
            line = lines[i]
            j = draw(st.integers(0, max(0, len(line) - 1)))
            lines[i] = line[:j] + draw(st.text(max_size=8)) + line[j + 1:]
        elif op == "insert":
            lines.insert(i, draw(st.sampled_from(["m=audio 9 UDP/TLS/RTP/SAVPF 0", "a=rtpmap:96 opus/48000/2",
                                                  "m=video 9 UDP/TLS/RTP/SAVPF 96", "a=group:BUNDLE 7",
                                                  "a=extmap:99 urn:x", "a=setup:active", "c=IN IP4 999.1.1.1"])))
        else:
            j = draw(st.integers(0, len(lines) - 1))
            lines[i], lines[j] = lines[j], lines[i]
    return "\r\n".join(lines) + "\r\n"


@FUZZ
@given(mutated_sdp())
def test_mutated_offers_are_answered_or_refused(sdp: str) -> None:
    async def run() -> None:
        ws = RecordingSocket()
        server = MediaServer(_config())
        conn = SignalingConnection(ws, server, "fuzz")  # type: ignore[arg-type]
        try:
            await conn.handle({"type": "join", "room": "fz"})
            try:
                await asyncio.wait_for(conn.handle({"type": "offer", "sdp": sdp}), 5.0)
            except REFUSALS:
                pass
        finally:
            await server.close()

    asyncio.run(run())
