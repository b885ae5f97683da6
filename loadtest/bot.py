"""A real WebRTC participant driven over the wire: the building block of load tests.

A ``Bot`` joins a room through the public WebSocket protocol with its own
aiortc peer connection, publishes PCM audio (looped speech, noise...) paced
in real time, and records every stream it receives, keyed by the publishing
participant.  It imports nothing from the server packages.
"""

from __future__ import annotations

import asyncio
import fractions
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import aiohttp
import av
import numpy as np
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

log = logging.getLogger(__name__)

RATE = 48_000
FRAME = 960  # 20 ms
TIME_BASE = fractions.Fraction(1, RATE)


class PcmTrack(MediaStreamTrack):
    """Publishes a float32 48 kHz mono array in real time, looping or then silence."""

    kind = "audio"

    def __init__(self, samples: Optional[np.ndarray], loop: bool = True) -> None:
        super().__init__()
        self.samples = samples if samples is not None else np.zeros(FRAME, dtype=np.float32)
        self.loop = loop
        self.position = 0
        self._pts = 0
        self._start: Optional[float] = None
        self.send_log: list[tuple[float, int]] = []  # (wall time, sample position) every frame

    def next_block(self) -> np.ndarray:
        n = len(self.samples)
        out = np.zeros(FRAME, dtype=np.float32)
        got = 0
        while got < FRAME:
            if self.position >= n:
                if not self.loop:
                    break
                self.position = 0
            take = min(FRAME - got, n - self.position)
            out[got:got + take] = self.samples[self.position:self.position + take]
            self.position += take
            got += take
        return out

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        if self._start is None:
            self._start = time.monotonic()
        target = self._start + self._pts / RATE
        delay = target - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        block = self.next_block()
        self.send_log.append((time.monotonic(), self._pts))
        pcm = (np.clip(block, -1, 1) * 32767).astype(np.int16).reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(pcm, format="s16", layout="mono")
        frame.sample_rate = RATE
        frame.pts = self._pts
        frame.time_base = TIME_BASE
        self._pts += FRAME
        return frame


@dataclass
class Recording:
    """What a bot received on one transceiver: 48 kHz mono float32 blocks with arrival times."""

    mid: str
    blocks: list[np.ndarray] = field(default_factory=list)
    arrivals: list[float] = field(default_factory=list)
    participant: Optional[str] = None

    def audio(self, since: float = 0.0) -> np.ndarray:
        blocks = [b for b, t in zip(self.blocks, self.arrivals) if t >= since]
        return np.concatenate(blocks) if blocks else np.zeros(0, dtype=np.float32)


class Bot:
    """One participant: WebSocket signaling, a peer connection, a published track, recordings."""

    def __init__(self, url: str, room: str, name: str = "bot", audio: Optional[np.ndarray] = None, *,
                 loop: bool = True, stages: Optional[str | list[str]] = None,
                 echo_cancellation: bool = True, publish: bool = True) -> None:
        self.url = url.rstrip("/")
        self.room = room
        self.name = name
        self.track = PcmTrack(audio, loop=loop) if publish else None
        self.stages = stages
        self.echo_cancellation = echo_cancellation
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.id: Optional[str] = None
        self.events: list[dict[str, Any]] = []
        self.recordings: dict[str, Recording] = {}
        self.track_info: dict[str, dict[str, Any]] = {}
        self._session: Optional[aiohttp.ClientSession] = None
        self._ws: Optional[aiohttp.ClientWebSocketResponse] = None
        self._reader: Optional[asyncio.Task[None]] = None
        self._tasks: list[asyncio.Task[None]] = []
        self._answered = asyncio.Event()
        self._joined = asyncio.Event()
        self.errors: list[dict[str, Any]] = []
        self.renegotiations = 0
        self.pc.on("track", self._on_track)

    # -- lifecycle --------------------------------------------------------------
    async def join(self, timeout: float = 10.0) -> None:
        self._session = aiohttp.ClientSession()
        self._ws = await self._session.ws_connect(self.url.replace("http", "ws", 1) + "/ws")
        self._reader = asyncio.get_running_loop().create_task(self._read())
        msg: dict[str, Any] = {"type": "join", "version": 1, "room": self.room, "name": self.name,
                               "echoCancellation": self.echo_cancellation}
        if self.stages is not None:
            msg["stages"] = self.stages
        await self.send(msg)
        await asyncio.wait_for(self._joined.wait(), timeout)
        if self.track is not None:
            self.pc.addTransceiver(self.track, direction="sendrecv")
        else:
            self.pc.addTransceiver("audio", direction="recvonly")
        await self.pc.setLocalDescription(await self.pc.createOffer())
        await self.send({"type": "offer", "sdp": self.pc.localDescription.sdp})
        await asyncio.wait_for(self._answered.wait(), timeout)

    async def leave(self) -> None:
        if self._ws is not None and not self._ws.closed:
            try:
                await self.send({"type": "leave"})
            except Exception:
                pass
            await self._ws.close()
        for task in [self._reader, *self._tasks]:
            if task is not None:
                task.cancel()
        await self.pc.close()
        if self._session is not None:
            await self._session.close()

    async def send(self, msg: dict[str, Any]) -> None:
        assert self._ws is not None
        await self._ws.send_str(json.dumps(msg))

    # -- signaling ----------------------------------------------------------------
    async def _read(self) -> None:
        try:
            await self._read_messages()
        except (aiohttp.ClientError, ConnectionError, asyncio.CancelledError):
            pass

    async def _read_messages(self) -> None:
        assert self._ws is not None
        async for raw in self._ws:
            if raw.type != aiohttp.WSMsgType.TEXT:
                continue
            msg = json.loads(raw.data)
            self.events.append({**msg, "_t": time.monotonic()})
            mtype = msg.get("type")
            if mtype == "joined":
                self.id = msg["participant"]["id"]
                self._joined.set()
            elif mtype == "answer":
                await self.pc.setRemoteDescription(RTCSessionDescription(sdp=msg["sdp"], type="answer"))
                self._answered.set()
            elif mtype == "offer":
                self.track_info.update(msg.get("tracks") or {})
                for mid, info in (msg.get("tracks") or {}).items():
                    if mid in self.recordings:
                        self.recordings[mid].participant = info.get("participant")
                await self.pc.setRemoteDescription(RTCSessionDescription(sdp=msg["sdp"], type="offer"))
                await self.pc.setLocalDescription(await self.pc.createAnswer())
                await self.send({"type": "answer", "sdp": self.pc.localDescription.sdp})
                self.renegotiations += 1
            elif mtype == "error":
                self.errors.append(msg)

    def _on_track(self, track: MediaStreamTrack) -> None:
        mid = next((t.mid for t in self.pc.getTransceivers() if t.receiver.track is track), None)
        if mid is None:
            return
        rec = self.recordings.setdefault(str(mid), Recording(mid=str(mid)))
        rec.participant = self.track_info.get(str(mid), {}).get("participant")
        self._tasks.append(asyncio.get_running_loop().create_task(self._record(track, rec)))

    async def _record(self, track: MediaStreamTrack, rec: Recording) -> None:
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            data = frame.to_ndarray().astype(np.float32) / 32768.0
            channels = len(frame.layout.channels)
            mono = data.reshape(-1, channels).mean(axis=1) if channels > 1 else data.reshape(-1)
            rec.blocks.append(mono.astype(np.float32))
            rec.arrivals.append(time.monotonic())

    # -- results --------------------------------------------------------------------
    def received_from(self, participant_id: str, since: float = 0.0) -> np.ndarray:
        """Audio received from one participant (or stream owner), concatenated."""
        parts = [r.audio(since) for r in self.recordings.values()
                 if (r.participant or self.track_info.get(r.mid, {}).get("participant")) == participant_id]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)

    def events_of(self, mtype: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("type") == mtype]
