"""A real WebRTC participant driven over the wire: the building block of load tests.

A ``Bot`` joins a room through the public WebSocket protocol with its own
aiortc peer connection, publishes PCM audio (looped speech, noise...) paced
in real time, and records every stream it receives, keyed by the publishing
participant.  It imports nothing from the server packages.
"""

from __future__ import annotations

import array
import asyncio
import bisect
import fractions
import json
import logging
import random
import time
import zlib
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import av
import numpy as np
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from aiortc.rtp import is_rtcp

from loadtest.lightmedia import (
    TS_MOD,
    EncodedPcmTrack,
    InlineDecoder,
    OpusMonoDecoder,
    frame_mono,
    receive_without_decoder_thread,
)
from loadtest.wire import StreamSink, WireReceiver, WireSender

log = logging.getLogger(__name__)
_JITTER_ATTR = "_RTCRtpReceiver__jitter_buffer"

RATE = 48_000
FRAME = 960  # 20 ms
TIME_BASE = fractions.Fraction(1, RATE)


class PcmTrack(MediaStreamTrack):
    """Publishes a float32 48 kHz mono array in real time, looping or then silence."""

    kind = "audio"

    def __init__(self, samples: np.ndarray | None, loop: bool = True) -> None:
        super().__init__()
        self.samples = samples if samples is not None else np.zeros(FRAME, dtype=np.float32)
        self.loop = loop
        self.position = 0
        self._pts = 0
        self._start: float | None = None
        self.send_log: list[tuple[float, int]] = []  # (monotonic time, sample position) every frame
        # (monotonic time, sample position) of every RTP packet as it went to the transport (see Bot._tap_send)
        self.wire_log: list[tuple[float, int]] = []

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


class JoinError(RuntimeError):
    """The server answered the join or the offer with an ``error`` message."""


def _floats() -> array.array[float]:
    return array.array("d")


@dataclass
class Recording:
    """What a bot received on one transceiver: 48 kHz mono float32 blocks with arrival times.

    Besides the decoded blocks (``arrivals``: when ``track.recv()`` returned them,
    ``pts``: their RTP timestamps relative to the first frame), it keeps the
    wire-level view of the same stream: every RTP packet's arrival time,
    sequence number and raw timestamp, seen before aiortc's receive buffer
    (compact ``array`` buffers: a big load test appends tens of thousands a
    second).  Light bots keep the Opus payloads of the streams they decode
    (``add_encoded``) and decode them only when the recording is analysed
    (``decode_pending``, off the event loop).  ``owners`` logs which
    participant the server said this transceiver carried.
    """

    mid: str
    blocks: list[np.ndarray] = field(default_factory=list)
    arrivals: list[float] = field(default_factory=list)
    participant: str | None = None
    pts: list[int] = field(default_factory=list)
    rtp_arrivals: array.array[float] = field(default_factory=_floats)
    rtp_seq: array.array[int] = field(default_factory=lambda: array.array("H"))
    rtp_ts: array.array[int] = field(default_factory=lambda: array.array("I"))
    owners: list[tuple[float, str | None]] = field(default_factory=list)
    receiver: Any = None
    ts_origin: int | None = None  # set by snapshots (no receiver) and by the light receive paths
    # payloads not decoded yet, with their arrival time and pts (light bots)
    enc_payloads: list[bytes] = field(default_factory=list)
    enc_arrivals: array.array[float] = field(default_factory=_floats)
    enc_pts: array.array[int] = field(default_factory=lambda: array.array("q"))

    def add_encoded(self, arrival: float, timestamp: int, payload: bytes) -> None:
        """Keep one received Opus payload (RTP ``timestamp``) for ``decode_pending``."""
        if self.ts_origin is None:
            self.ts_origin = timestamp
        self.enc_payloads.append(payload)
        self.enc_arrivals.append(arrival)
        self.enc_pts.append((timestamp - self.ts_origin) % TS_MOD)

    def decode_pending(self, since: float | None = None) -> None:
        """Decode the kept payloads (in arrival order) into ``blocks``; those that arrived more than
        half a second before ``since`` are dropped undecoded (the half second primes the decoder)."""
        if not self.enc_payloads:
            return
        payloads, arrivals, pts = self.enc_payloads, self.enc_arrivals, self.enc_pts
        self.enc_payloads, self.enc_arrivals, self.enc_pts = [], _floats(), array.array("q")
        start = bisect.bisect_left(arrivals, since - 0.5) if since is not None else 0
        if start > 0:  # decoding restarts here: a fresh decoder, as a subscriber joining then would have
            self._decoder = None
        if self._decoder is None:
            self._decoder = OpusMonoDecoder()
        decoder = self._decoder
        for k in range(start, len(payloads)):
            block = decoder.decode(payloads[k])
            if len(block):
                self.blocks.append(block)
                self.arrivals.append(arrivals[k])
                self.pts.append(pts[k])

    def audio(self, since: float = 0.0) -> np.ndarray:
        self.decode_pending()
        blocks = [b for b, t in zip(self.blocks, self.arrivals) if t >= since]
        return np.concatenate(blocks) if blocks else np.zeros(0, dtype=np.float32)

    def set_owner(self, participant: str | None) -> None:
        if not self.owners or self.owners[-1][1] != participant:
            self.owners.append((time.monotonic(), participant))
        self.participant = participant

    def rtp_origin(self) -> int | None:
        """The raw RTP timestamp aiortc subtracted to make frame pts (its timestamp mapper's origin)."""
        if self.ts_origin is not None:
            return self.ts_origin
        mapper = getattr(self.receiver, "_RTCRtpReceiver__timestamp_mapper", None)
        origin = getattr(mapper, "_origin", None)
        if origin is not None:
            return int(origin)
        return self.rtp_ts[0] if self.rtp_ts else None

    def snapshot(self) -> Recording:
        """A copy that later arrivals do not change (for analysis off the event loop); payloads not
        decoded yet are copied as they are (the copy decodes them where it is analysed)."""
        return Recording(mid=self.mid, blocks=list(self.blocks), arrivals=list(self.arrivals),
                         participant=self.participant, pts=list(self.pts),
                         rtp_arrivals=array.array("d", self.rtp_arrivals), rtp_seq=array.array("H", self.rtp_seq),
                         rtp_ts=array.array("I", self.rtp_ts), owners=list(self.owners),
                         ts_origin=self.rtp_origin(), enc_payloads=list(self.enc_payloads),
                         enc_arrivals=array.array("d", self.enc_arrivals), enc_pts=array.array("q", self.enc_pts))

    def trim(self, before: float) -> None:
        """Forget blocks and packets that arrived before ``before`` (bounded memory in long runs)."""
        k = bisect.bisect_left(self.arrivals, before)
        del self.blocks[:k], self.arrivals[:k], self.pts[:k]
        j = bisect.bisect_left(self.rtp_arrivals, before)
        del self.rtp_arrivals[:j], self.rtp_seq[:j], self.rtp_ts[:j]
        e = bisect.bisect_left(self.enc_arrivals, before)
        del self.enc_payloads[:e], self.enc_arrivals[:e], self.enc_pts[:e]

    _decoder: OpusMonoDecoder | None = field(default=None, repr=False, compare=False)


class Bot:
    """One participant: WebSocket signaling, a peer connection, a published track, recordings."""

    def __init__(self, url: str, room: str, name: str = "bot", audio: np.ndarray | None = None, *,
                 loop: bool = True, stages: str | list[str] | None = None,
                 echo_cancellation: bool = True, publish: bool = True,
                 token: str | None = None, local_addr: str | None = None, light: bool = False,
                 opus_packets: list[bytes] | None = None, decode_share: float = 1.0, fast: bool = False) -> None:
        self.url = url.rstrip("/")
        self.light = light  # pre-encoded sending, inline decoding (loadtest.lightmedia)
        # light bots only: once connected, media bypasses aiortc's per-packet path (loadtest.wire)
        self.fast = fast and light
        self.wire_sender: WireSender | None = None
        self._wire_rx: WireReceiver | None = None
        self._sinks: dict[Any, StreamSink] = {}  # aiortc receiver -> where the wire receiver puts its packets
        # light bots only: the share of received streams decoded (marker latency needs audio); the others
        # are counted from their RTP headers alone (loss, gaps, jitter), so big rooms fit one load-generator core
        self.decode_share = decode_share
        self.token = token
        self.local_addr = local_addr  # source address of the WebSocket (spreads per-address limits)
        self.room = room
        self.name = name
        self.track: PcmTrack | EncodedPcmTrack | None = None
        if publish:
            silence = np.zeros(FRAME, dtype=np.float32)
            self.track = EncodedPcmTrack(audio if audio is not None else silence, opus_packets) \
                if light else PcmTrack(audio, loop=loop)
        self.stages = stages
        self.echo_cancellation = echo_cancellation
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.id: str | None = None
        self.events: list[dict[str, Any]] = []
        self.recordings: dict[str, Recording] = {}
        self.track_info: dict[str, dict[str, Any]] = {}
        self._session: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._reader: asyncio.Task[None] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._answered = asyncio.Event()
        self._joined = asyncio.Event()
        self.errors: list[dict[str, Any]] = []
        self._join_error: dict[str, Any] | None = None
        self.renegotiations = 0
        self.times: dict[str, float] = {}  # monotonic milestones: join_start, joined, answered, connected
        self.pc.on("track", self._on_track)
        self.pc.on("connectionstatechange", self._on_connection_state)

    # -- lifecycle --------------------------------------------------------------
    async def _connect(self, http: aiohttp.ClientSession, deadline: float) -> aiohttp.ClientWebSocketResponse:
        """The signaling WebSocket; a 503 (the server's new-connection rate, or its connection cap) is tried
        again after its Retry-After (at most 1 s, jittered: a ramp of many bots spreads out) until ``deadline``."""
        url = self.url.replace("http", "ws", 1) + "/ws"
        while True:
            try:
                return await http.ws_connect(url)
            except aiohttp.WSServerHandshakeError as exc:
                if exc.status != 503:
                    raise
                after = float(exc.headers.get("Retry-After", "1")) if exc.headers else 1.0
                retry_s = min(1.0, after) * (0.5 + random.random())
                if time.monotonic() + retry_s > deadline:
                    raise
                await asyncio.sleep(retry_s)

    async def join(self, timeout: float = 10.0) -> None:
        self.times["join_start"] = time.monotonic()
        connector = aiohttp.TCPConnector(local_addr=(self.local_addr, 0)) if self.local_addr else None
        self._session = aiohttp.ClientSession(connector=connector)
        self._ws = await self._connect(self._session, time.monotonic() + timeout)
        self._reader = asyncio.get_running_loop().create_task(self._read())
        msg: dict[str, Any] = {"type": "join", "version": 1, "room": self.room, "name": self.name,
                               "echoCancellation": self.echo_cancellation}
        if self.stages is not None:
            msg["stages"] = self.stages
        if self.token is not None:
            msg["token"] = self.token
        await self.send(msg)
        await asyncio.wait_for(self._joined.wait(), timeout)
        self._raise_join_error()
        if self.track is not None:
            transceiver = self.pc.addTransceiver(self.track, direction="sendrecv")
            if self.fast and isinstance(self.track, EncodedPcmTrack):
                track = self.track
                WireSender.install(transceiver.sender, lambda: track.packets, track.send_log, track.wire_log,
                                   on_start=self._wire_started)
        else:
            self.pc.addTransceiver("audio", direction="recvonly")
        await self.pc.setLocalDescription(await self.pc.createOffer())
        if self.fast:  # ICE has gathered: its sockets exist, no media can have arrived yet
            self._wire_rx = WireReceiver(self.pc, self._sinks.get)
            if not self._wire_rx.attach():
                log.warning("this aiortc/aioice cannot be hooked: bots receive through aiortc's path")
                self._wire_rx = None
        await self.send({"type": "offer", "sdp": self.pc.localDescription.sdp})
        await asyncio.wait_for(self._answered.wait(), timeout)
        self._raise_join_error()

    def _raise_join_error(self) -> None:
        if self._join_error is not None:
            err = self._join_error
            raise JoinError(f"{err.get('code')}: {err.get('message')}")

    def _wire_started(self, sender: WireSender) -> None:
        self.wire_sender = sender

    async def leave(self) -> None:
        if self._wire_rx is not None:
            self._wire_rx.detach()
        if self._ws is not None and not self._ws.closed:
            try:
                await self.send({"type": "leave"})
            except (aiohttp.ClientError, ConnectionError, RuntimeError) as exc:  # the socket may be half closed
                log.debug("leave not sent: %s", exc)
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
                self.times["joined"] = time.monotonic()
                self._joined.set()
            elif mtype == "answer":
                await self.pc.setRemoteDescription(RTCSessionDescription(sdp=msg["sdp"], type="answer"))
                self.times["answered"] = time.monotonic()
                self._tap_send()
                self._answered.set()
            elif mtype == "offer":
                self.track_info.update(msg.get("tracks") or {})
                for mid, info in (msg.get("tracks") or {}).items():
                    if mid in self.recordings:
                        self.recordings[mid].set_owner(info.get("participant"))
                await self.pc.setRemoteDescription(RTCSessionDescription(sdp=msg["sdp"], type="offer"))
                await self.pc.setLocalDescription(await self.pc.createAnswer())
                await self.send({"type": "answer", "sdp": self.pc.localDescription.sdp})
                self.renegotiations += 1
                if self._wire_rx is not None:
                    self._wire_rx.attach()
                    self._wire_rx.forget_ssrcs()
            elif mtype == "error":
                self.errors.append(msg)
                if not self._answered.is_set():  # the join itself failed: do not wait for its timeout
                    self._join_error = msg
                    self._joined.set()
                    self._answered.set()

    def _on_connection_state(self) -> None:
        if self.pc.connectionState == "connected" and "connected" not in self.times:
            self.times["connected"] = time.monotonic()

    def _on_track(self, track: MediaStreamTrack) -> None:
        transceiver = next((t for t in self.pc.getTransceivers() if t.receiver.track is track), None)
        if transceiver is None or transceiver.mid is None:
            return
        mid = str(transceiver.mid)
        rec = self.recordings.setdefault(mid, Recording(mid=mid))
        rec.set_owner(self.track_info.get(mid, {}).get("participant"))
        self._tap_rtp(transceiver.receiver, rec)
        if self.light:
            decode = self._decodes(mid)
            if not isinstance(getattr(transceiver.receiver, _JITTER_ATTR, None), InlineDecoder):
                setattr(transceiver.receiver, _JITTER_ATTR, InlineDecoder(rec, decode=decode))
                receive_without_decoder_thread(transceiver.receiver)  # its thread would never get work
            if transceiver.receiver not in self._sinks:
                self._sinks[transceiver.receiver] = StreamSink(rec, decode)
            return
        self._tasks.append(asyncio.get_running_loop().create_task(self._record(track, rec)))

    def _decodes(self, mid: str) -> bool:
        """Whether this bot decodes the stream on ``mid`` (a stable pseudo-random ``decode_share`` of them)."""
        if self.decode_share >= 1.0:
            return True
        return zlib.crc32(f"{self.name}/{mid}".encode()) % 1000 < self.decode_share * 1000

    def _tap_send(self) -> None:
        """Log when each of our RTP packets reaches the transport (after aiortc's Opus encode)."""
        if self.track is None or self.fast:  # the wire sender logs its packets itself
            return
        transport = next((t.sender.transport for t in self.pc.getTransceivers()
                          if t.sender is not None and t.sender.track is self.track), None)
        if transport is None or getattr(transport, "_loadtest_tapped", False):
            return
        send = transport._send_rtp
        wire_log = self.track.wire_log
        first: list[int] = []

        async def tapped(data: bytes) -> None:
            if len(data) >= 12 and not is_rtcp(data):
                ts = int.from_bytes(data[4:8], "big")
                if not first:
                    first.append(ts)
                wire_log.append((time.monotonic(), (ts - first[0]) % (1 << 32)))
            await send(data)

        transport._send_rtp = tapped  # type: ignore[method-assign]
        transport._loadtest_tapped = True  # type: ignore[attr-defined]

    @staticmethod
    def _tap_rtp(receiver: Any, rec: Recording) -> None:
        """Log every RTP packet's arrival before aiortc's receive buffer (wire-level timing)."""
        rec.receiver = receiver
        if getattr(receiver, "_loadtest_tapped", False):
            return
        handle = receiver._handle_rtp_packet

        async def tapped(packet: Any, arrival_time_ms: int) -> None:
            rec.rtp_arrivals.append(time.monotonic())
            rec.rtp_seq.append(int(packet.sequence_number))
            rec.rtp_ts.append(int(packet.timestamp))
            await handle(packet, arrival_time_ms=arrival_time_ms)

        receiver._handle_rtp_packet = tapped
        receiver._loadtest_tapped = True

    async def _record(self, track: MediaStreamTrack, rec: Recording) -> None:
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            rec.blocks.append(frame_mono(frame))
            rec.arrivals.append(time.monotonic())
            rec.pts.append(int(frame.pts) if frame.pts is not None else -1)

    # -- results --------------------------------------------------------------------
    def received_from(self, participant_id: str, since: float = 0.0) -> np.ndarray:
        """Audio received from one participant (or stream owner), concatenated."""
        parts = [r.audio(since) for r in self.recordings.values()
                 if (r.participant or self.track_info.get(r.mid, {}).get("participant")) == participant_id]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)

    def events_of(self, mtype: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("type") == mtype]

    def trim(self, before: float) -> None:
        """Drop received audio, packets, send-log entries and events older than ``before``."""
        for rec in self.recordings.values():
            rec.trim(before)
        if self.track is not None:
            for log_ in (self.track.send_log, self.track.wire_log):
                del log_[:bisect.bisect_left(log_, before, key=lambda entry: entry[0])]
        self.events = [e for e in self.events if e.get("_t", 0.0) >= before or e.get("type") != "stats"]
