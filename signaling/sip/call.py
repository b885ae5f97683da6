"""One phone call as a room participant: G.711 RTP in and out, the downstream mix, prompts.

``PhoneCall`` is the call's ``MediaSession``: subscribing it to a published
stream adds a PCM listener that feeds a small per-stream FIFO.  On every
media clock tick it sums 10 ms of each FIFO plus the menu prompt playing,
and every second tick downsamples the 20 ms to 8 kHz, encodes it and sends
one RTP packet (timestamps follow the wall clock, so a stalled loop shows up
as a gap the phone conceals, not as drift).  Upstream, ``PhoneUpstream`` is
the ``ChunkSource`` published for the caller: the G.711 jitter buffer with
loss concealment, resampled to 48 kHz.  Telephone-event packets go to the
call's ``DtmfReceiver``.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np

from mediaserver.audio_format import CHUNK
from mediaserver.room import Participant, RoomError
from mediaserver.server import MediaServer
from mediaserver.stream import PublishedStream
from signaling.sip.ivr import DtmfReceiver
from signaling.sip.jitter import G711JitterBuffer
from signaling.sip.message import SipParseError, SipRequest, SipUri
from signaling.sip.resample import Downsampler, Upsampler
from signaling.sip.rtp import RtpPacket, RtpSession
from signaling.sip.sdp import AudioParams

log = logging.getLogger(__name__)

PRIME_CHUNKS = 3  # a stream's FIFO must hold 30 ms before it is mixed (absorbs executor jitter)
MAX_CHUNKS = 12  # beyond 120 ms queued, the oldest audio is dropped
PACKET_SAMPLES_8K = 160  # 20 ms


class StreamFeed:
    """The chunks of one subscribed stream waiting to be mixed."""

    def __init__(self) -> None:
        self.chunks: collections.deque[np.ndarray] = collections.deque()
        self.primed = False
        self.dropped = 0
        self.underruns = 0

    def push(self, audio: np.ndarray, origin: float | None) -> None:
        self.chunks.append(audio)
        if len(self.chunks) > MAX_CHUNKS:
            while len(self.chunks) > PRIME_CHUNKS:
                self.chunks.popleft()
                self.dropped += 1

    def pop(self) -> np.ndarray | None:
        if not self.primed:
            if len(self.chunks) < PRIME_CHUNKS:
                return None
            self.primed = True
        if not self.chunks:
            self.primed = False  # underrun: wait for a cushion again
            self.underruns += 1
            return None
        return self.chunks.popleft()


class PromptTrack:
    """The call's own prompt (menu speech), 48 kHz, played 10 ms per tick."""

    def __init__(self) -> None:
        self.audio: np.ndarray | None = None
        self.position = 0

    def start(self, audio: np.ndarray) -> None:
        self.audio, self.position = audio, 0

    def stop(self) -> None:
        self.audio = None

    @property
    def playing(self) -> bool:
        return self.audio is not None

    def next_chunk(self) -> np.ndarray | None:
        if self.audio is None:
            return None
        chunk = self.audio[self.position:self.position + CHUNK]
        self.position += CHUNK
        if self.position >= len(self.audio):
            self.audio = None
        if len(chunk) < CHUNK:
            chunk = np.pad(chunk, (0, CHUNK - len(chunk)))
        return chunk


class PhoneUpstream:
    """ChunkSource of the caller's voice: jitter buffer + PLC at 8 kHz, resampled to 48 kHz."""

    def __init__(self, jitter: G711JitterBuffer) -> None:
        self.jitter = jitter
        self.playout = jitter  # (read by PublishedStream: the delay it may trim)
        self.stats = jitter.stats  # read by MediaServer.stream_stats like a WebRTC jitter buffer
        self._up = Upsampler()

    def pull(self) -> tuple[np.ndarray, float | None]:
        pcm, arrival = self.jitter.pull()
        return self._up.process(pcm), arrival

    def close(self) -> None:
        pass


class PhoneCall:
    """Owns one call's media (RTP session, jitter buffer, mix, prompt) and its room membership."""

    def __init__(self, server: MediaServer, rtp: RtpSession, params: AudioParams, name: str,
                 on_removed: Callable[[str], None], gate: Callable[[str], Awaitable[bool]] | None = None) -> None:
        self.server = server
        self.rtp = rtp
        self.params = params
        self.name = name
        self.dtmf = DtmfReceiver()
        m = server.config.media
        self.jitter = G711JitterBuffer(params.codec, min_delay_ms=m.jitter_min_ms, max_delay_ms=m.jitter_max_ms,
                                       start_delay_ms=m.jitter_start_ms)
        self.upstream = PhoneUpstream(self.jitter)
        self.participant: Participant | None = None
        self.prompt = PromptTrack()
        self._feeds: dict[str, tuple[PublishedStream, StreamFeed, Callable[..., None]]] = {}
        self._down = Downsampler()
        self._pending: list[np.ndarray] = []
        self._on_removed = on_removed
        self._gate = gate  # may this call enter that room?  (rights of the caller, room caps)
        self._leaving = False
        self._closed = False
        self._ts0 = rtp.timestamp
        self._position0: int | None = None
        self._last_position: int | None = None
        self._block_position = 0
        self._marker = True
        rtp.set_remote(params.remote_ip, params.remote_port, params.remote_rtcp_port)
        rtp.on_packet = self._on_rtp
        server.clock.add(self, self._tick)

    # -- network side -------------------------------------------------------------
    def _on_rtp(self, pkt: RtpPacket, arrival: float) -> None:
        if self.params.event_pt is not None and pkt.payload_type == self.params.event_pt:
            self.dtmf.feed_rtp(pkt.timestamp, pkt.payload)
            self.jitter.note_other(pkt.seq, pkt.timestamp, pkt.ssrc)
        elif pkt.payload_type == self.params.payload_type:
            self.jitter.push(pkt.seq, pkt.timestamp, pkt.payload, arrival, pkt.ssrc)

    def update_media(self, params: AudioParams) -> None:
        """A re-INVITE changed the remote address, codec or direction (hold/resume)."""
        if params.codec is not self.params.codec:
            self.jitter.codec = params.codec
        self.params = params
        self.rtp.set_remote(params.remote_ip, params.remote_port, params.remote_rtcp_port)

    # -- MediaSession ---------------------------------------------------------------
    def subscribe(self, stream: PublishedStream) -> None:
        if stream.id in self._feeds or self._closed:
            return
        feed = StreamFeed()
        listener = feed.push
        stream.add_pcm_listener(listener)
        self._feeds[stream.id] = (stream, feed, listener)

    def unsubscribe(self, stream: PublishedStream) -> None:
        entry = self._feeds.pop(stream.id, None)
        if entry is not None:
            entry[0].remove_pcm_listener(entry[2])

    async def close(self) -> None:
        """Called when the room removes the participant; unless we left on our own, the call ends."""
        for sid in list(self._feeds):
            self.unsubscribe(self._feeds[sid][0])
        if not self._leaving and not self._closed:
            self._on_removed("removed from the room")

    # -- prompts (MenuCall) ---------------------------------------------------------------
    def start_prompt(self, audio: np.ndarray) -> float:
        self.prompt.start(audio)
        return len(audio) / 48_000

    def stop_prompt(self) -> None:
        self.prompt.stop()

    async def play(self, audio: np.ndarray) -> None:
        self.prompt.start(audio)
        while self.prompt.playing and not self._closed:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.1)  # let the last packets leave

    # -- rooms --------------------------------------------------------------------------
    async def join_room(self, room_id: str) -> bool:
        """Join ``room_id`` as a participant of kind "sip" and publish the caller's voice."""
        if self._closed or (self._gate is not None and not await self._gate(room_id)) or self._closed:
            return False
        try:
            participant = await self.server.join(room_id, self.name, self._send, kind="sip",
                                                 echo_cancellation=not aec_available(), session=self)
        except RoomError as exc:
            log.info("sip call %s: cannot join %s: %s", self.name, room_id, exc)
            return False
        if self._closed:  # the caller hung up while joining
            self._leaving = True
            await self.server.leave(participant, reason="hangup")
            return False
        self.participant = participant
        self.server.publish(participant, self.upstream)
        participant.room.subscribe_existing(participant)
        await participant.room.announce({"type": "participant-joined", "participant": participant.describe()},
                                         exclude=participant.id)
        log.info("sip call %s joined room %s as %s", self.name, room_id, participant.id)
        return True

    async def _send(self, message: dict[str, Any]) -> None:
        """Room events for this participant: a phone has no use for them."""

    async def leave_room(self, reason: str) -> None:
        participant, self.participant = self.participant, None
        if participant is not None:
            self._leaving = True
            try:
                await self.server.leave(participant, reason=reason)
            finally:
                self._leaving = False

    async def end(self, reason: str = "hangup") -> None:
        """Tear everything down (idempotent): room membership, clock, sockets."""
        if self._closed:
            return
        await self.leave_room(reason)
        self._closed = True
        self.prompt.stop()
        self.server.clock.remove(self)
        for sid in list(self._feeds):
            self.unsubscribe(self._feeds[sid][0])
        self.rtp.close()

    # -- the media clock tick ------------------------------------------------------------------
    def _tick(self) -> None:
        clock = self.server.clock
        position = clock.ticks + clock.skipped_ticks  # the media timeline, skipped ticks included
        if self._last_position is not None and position != self._last_position + 1:
            self._pending = []  # the clock skipped ticks: the phone sees a timestamp gap and conceals it
            self._marker = True
        self._last_position = position
        mix = np.zeros(CHUNK, dtype=np.float32)
        for _, feed, _ in self._feeds.values():
            chunk = feed.pop()
            if chunk is not None:
                mix += chunk
        prompt = self.prompt.next_chunk()
        if prompt is not None:
            mix += prompt
        if self.participant is None or self.participant.published is None:
            self.jitter.pull()  # nobody listens yet (menu): keep the buffer fresh
        if not self._pending:
            self._block_position = position
        self._pending.append(mix)
        if len(self._pending) >= 2:
            block = np.concatenate(self._pending)
            self._pending = []
            self._send_block(block)

    def _send_block(self, block: np.ndarray) -> None:
        """Downsample, encode and send 20 ms; the RTP timestamp follows the media clock's timeline."""
        pcm = self._down.process(np.clip(block, -1.0, 1.0))
        if self._position0 is None:
            self._position0 = self._block_position
        timestamp = self._ts0 + (self._block_position - self._position0) * (PACKET_SAMPLES_8K // 2)
        if self.params.we_send:
            self.rtp.send(self.params.payload_type, self.params.codec.encode(pcm), timestamp & 0xFFFFFFFF,
                          marker=self._marker)
            self._marker = False

    def feed_stats(self) -> dict[str, int]:
        """Underruns and drops of the downstream mix, summed over the subscribed streams."""
        feeds = [f for _, f, _ in self._feeds.values()]
        return {"streams": len(feeds), "underruns": sum(f.underruns for f in feeds),
                "dropped": sum(f.dropped for f in feeds)}


def caller_name(invite: SipRequest, max_length: int) -> str:
    """The participant name of a caller: the From display name, else its user part."""
    caller = invite.from_
    name = caller.display
    if not name:
        try:
            name = SipUri.parse(caller.uri).user
        except SipParseError:
            name = ""
    name = "".join(ch for ch in name if ch.isprintable())[:max_length]
    return name or "phone"


_AEC: bool | None = None


def aec_available() -> bool:
    """Does the "aec" stage import?  Phones then get server-side echo cancellation (once per process)."""
    global _AEC
    if _AEC is None:
        try:
            from enhancers.registry import load_stage_class

            load_stage_class("aec")
            _AEC = True
        except Exception as exc:  # noqa: BLE001 - any import failure means: no aec
            log.warning("sip: the aec stage does not load (%s); phones join without echo cancellation", exc)
            _AEC = False
    return _AEC
