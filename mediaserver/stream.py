"""One published audio stream: source -> enhancement pipeline -> one encoder -> fan-out.

Every 10 ms the media clock asks each ``PublishedStream`` for a chunk; the
chunk goes to the stream's pipeline (batched with all other streams by the
executor), and the results are encoded in order, once, and handed to the
fan-out.  Sources are pluggable: a WebRTC microphone, a TTS prompt player,
a phone call.
"""

from __future__ import annotations

import collections
import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Protocol

import numpy as np

from mediaserver.audio_format import CHUNK, SAMPLE_RATE
from mediaserver.clock import MediaClock
from mediaserver.encoder_load import EncoderComplexity
from mediaserver.fanout import Fanout, StreamEncoder
from mediaserver.pipeline import PipelineResult, StreamPipeline

log = logging.getLogger(__name__)

_MAX_INFLIGHT = 16  # 160 ms of chunks at the executor, then new chunks are dropped (its deadline is far below)


PcmListener = Callable[[np.ndarray, Optional[float]], None]


class ChunkSource(Protocol):
    def pull(self) -> tuple[np.ndarray, Optional[float]]: ...

    def close(self) -> None: ...


@dataclass
class StreamCounters:
    """Per-stream figures for telemetry and the stats API."""

    chunks: int = 0
    bypassed: int = 0
    dropped_backlog: int = 0
    level_dbfs: float = -100.0
    vad: float = 0.0
    echo_delay_ms: float = -1.0  # echo path delay the aec stage uses (-1: no aec stage)
    processing_ms: float = 0.0
    server_latency_ms: float = 0.0


class _Chunk:
    """A chunk between the clock tick that pulled it and the moment it is encoded."""

    __slots__ = ("audio", "forwardable", "origin", "result", "started", "tick")

    def __init__(self, audio: np.ndarray, origin: Optional[float], started: float, tick: int,
                 forwardable: Optional[list[tuple[Optional[bytes], int]]], result: Optional[PipelineResult]) -> None:
        self.audio = audio
        self.origin = origin
        self.started = started
        self.tick = tick
        self.forwardable = forwardable
        self.result = result  # None while the executor has it


class PublishedStream:
    """Owns one published stream's path from source chunks to encoded packets.

    Each tick's chunk either goes to the executor (the stream has stages; its result comes back
    through the pipeline's ``on_result`` on the loop, in order) or straight on; either way chunks
    are encoded and fanned out in tick order, synchronously, with no task or future per chunk.
    """

    def __init__(self, stream_id: str, owner_id: str, kind: str, source: ChunkSource,
                 pipeline: StreamPipeline, clock: MediaClock, *, bitrate: int = 32_000,
                 reference: Optional[Callable[[int], Optional[np.ndarray]]] = None,
                 on_chunk: Optional[Callable[["PublishedStream", np.ndarray, PipelineResult], None]] = None,
                 synthetic: bool = False, forward_unprocessed: bool = True,
                 complexity: Optional[EncoderComplexity] = None) -> None:
        self.id = stream_id
        self.owner_id = owner_id
        self.kind = kind
        self.synthetic = synthetic
        self._forward_unprocessed = forward_unprocessed
        self._take = getattr(source, "take_forwardable", None) if forward_unprocessed else None
        self.source = source
        self._playout = getattr(source, "playout", None)  # its PlayoutBuffer, if it has one
        self._shift_seen = 0  # the playout's timeline shift as of the last tick
        self._shift_unsent = 0  # timeline jumps the echo canceller was not told of yet (dropped chunks)
        self.pipeline = pipeline
        pipeline.on_result = self._on_result
        self.fanout = Fanout()
        self.encoder = StreamEncoder(bitrate=bitrate, complexity=complexity)
        self.counters = StreamCounters()
        self.muted = False
        self._clock = clock
        self._reference = reference
        self._on_chunk = on_chunk
        self._chunks: collections.deque[_Chunk] = collections.deque()  # in tick order, not yet encoded
        self._at_executor: collections.deque[_Chunk] = collections.deque()  # those the executor has
        self._pcm_listeners: list[PcmListener] = []
        self.current_tick = 0  # media clock tick of the chunk being handed to PCM listeners
        self.closed = False

    def set_reference(self, reference: Optional[Callable[[int], Optional[np.ndarray]]]) -> None:
        """Echo reference provider: called with the clock tick of each microphone chunk."""
        self._reference = reference

    def add_pcm_listener(self, listener: PcmListener) -> None:
        """Receive every processed chunk (48 kHz mono float32) as it is encoded: for mixes and echo references."""
        self._pcm_listeners.append(listener)

    def remove_pcm_listener(self, listener: PcmListener) -> None:
        if listener in self._pcm_listeners:
            self._pcm_listeners.remove(listener)

    def start(self) -> None:
        self._clock.add(self, self._on_tick)

    def _on_tick(self) -> None:
        playout = self._playout
        if playout is not None:
            playout.trim_room = self.pipeline.timeline_room
        audio, origin = self.source.pull()
        shift = 0
        if playout is not None and playout.timeline_shift != self._shift_seen:
            shift, self._shift_seen = playout.timeline_shift - self._shift_seen, playout.timeline_shift
        if self.muted:
            audio = np.zeros_like(audio)
        tick = self._clock.ticks
        pipeline = self.pipeline
        if pipeline.has_stages:
            if self._take is not None:
                self._take()  # the publisher's packets: never forwarded as they are, this chunk is processed
            if len(self._at_executor) >= _MAX_INFLIGHT:
                self.counters.dropped_backlog += 1
                self._shift_unsent += shift + CHUNK  # the canceller never sees this chunk: a skip for it
                return
            reference = self._reference(tick) if self._reference is not None else None
            shift, self._shift_unsent = shift + self._shift_unsent, 0
            if shift:  # the playout skipped or stretched just before this chunk: the canceller follows
                pipeline.note_input_shift(shift)
            chunk = _Chunk(audio, origin, time.monotonic(), tick, None, None)
            self._chunks.append(chunk)
            self._at_executor.append(chunk)
            pipeline.submit(audio, reference)
            return
        self._shift_unsent = 0
        forwardable = self._take_forwardable()
        result = PipelineResult(audio=audio)
        if self._chunks:  # chunks from before the stages went off are still out: keep the order
            self._chunks.append(_Chunk(audio, origin, time.monotonic(), tick, forwardable, result))
            return
        self._emit(audio, origin, time.monotonic(), tick, forwardable, result)

    def _take_forwardable(self) -> Optional[list[tuple[Optional[bytes], int]]]:
        """The publisher's packets to forward as they are, when this chunk will not be changed."""
        take = self._take
        if take is None:
            return None
        entries: list[tuple[Optional[bytes], int]] = take()
        return None if self.muted or self.pipeline.has_stages else entries

    def _on_result(self, out: Any) -> None:
        """The executor's answer for the oldest chunk it has (``enhancers.executor.ProcessedChunk``)."""
        if not self._at_executor:
            return  # (closed meanwhile)
        chunk = self._at_executor.popleft()
        chunk.result = PipelineResult(out.audio, out.side, out.bypassed)
        chunks = self._chunks
        while chunks and chunks[0].result is not None:
            c = chunks.popleft()
            assert c.result is not None
            if not self.closed:
                self._emit(c.audio, c.origin, c.started, c.tick, c.forwardable, c.result)

    def _emit(self, audio: np.ndarray, origin: Optional[float], started: float, tick: int,
              forwardable: Optional[list[tuple[Optional[bytes], int]]], result: PipelineResult) -> None:
        c = self.counters
        c.chunks += 1
        if result.bypassed:
            c.bypassed += 1
        c.processing_ms = (time.monotonic() - started) * 1000.0
        out = result.audio
        rms = float(np.sqrt(np.dot(out, out) / len(out)) + 1e-10)
        c.level_dbfs = 0.9 * c.level_dbfs + 0.1 * 20.0 * math.log10(rms)
        side = result.side
        if side:
            if "vad" in side:
                c.vad = float(side["vad"])
            if "aec_delay_ms" in side:
                c.echo_delay_ms = float(side["aec_delay_ms"])
        if self._on_chunk is not None:
            self._on_chunk(self, audio, result)
        self.current_tick = tick
        if origin is not None and self.pipeline.latency_samples:
            # a stage that delays the audio (look-ahead) sends out audio that arrived that much earlier
            origin -= self.pipeline.latency_samples / SAMPLE_RATE
        for listener in self._pcm_listeners:
            try:
                listener(out, origin)
            except Exception:
                log.exception("pcm listener failed on stream %s", self.id)
        if forwardable is not None and not result.bypassed:
            packets = self.encoder.forward(forwardable, origin)
        else:
            packet = self.encoder.push(out, origin)
            packets = [packet] if packet is not None else []
        for packet in packets:
            if origin is not None:
                c.server_latency_ms = (time.monotonic() - origin) * 1000.0
            self.fanout.publish(packet)

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._clock.remove(self)
        self.pipeline.on_result = None
        self._chunks.clear()
        self._at_executor.clear()
        self.fanout.close()
        self._pcm_listeners.clear()
        self.pipeline.close()
        self.source.close()
        self.encoder.close()
