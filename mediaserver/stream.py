"""One published audio stream: source -> enhancement pipeline -> one encoder -> fan-out.

Every 10 ms the media clock asks each ``PublishedStream`` for a chunk; the
chunk goes to the stream's pipeline (batched with all other streams by the
executor), and the results are encoded in order, once, and handed to the
fan-out.  Sources are pluggable: a WebRTC microphone, a TTS prompt player,
a phone call.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass
from typing import Callable, Optional, Protocol

import numpy as np

from mediaserver.audio_format import SAMPLE_RATE
from mediaserver.clock import MediaClock
from mediaserver.fanout import Fanout, StreamEncoder
from mediaserver.pipeline import PipelineResult, StreamPipeline

log = logging.getLogger(__name__)

_MAX_INFLIGHT = 16  # 160 ms of chunks awaiting the executor, then new chunks are dropped


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


class PublishedStream:
    """Owns one published stream's path from source chunks to encoded packets."""

    def __init__(self, stream_id: str, owner_id: str, kind: str, source: ChunkSource,
                 pipeline: StreamPipeline, clock: MediaClock, *, bitrate: int = 32_000,
                 reference: Optional[Callable[[int], Optional[np.ndarray]]] = None,
                 on_chunk: Optional[Callable[["PublishedStream", np.ndarray, PipelineResult], None]] = None,
                 synthetic: bool = False, forward_unprocessed: bool = True) -> None:
        self.id = stream_id
        self.owner_id = owner_id
        self.kind = kind
        self.synthetic = synthetic
        self._forward_unprocessed = forward_unprocessed
        self.source = source
        self.pipeline = pipeline
        self.fanout = Fanout()
        self.encoder = StreamEncoder(bitrate=bitrate)
        self.counters = StreamCounters()
        self.muted = False
        self._clock = clock
        self._reference = reference
        self._on_chunk = on_chunk
        self._inflight: asyncio.Queue[
            tuple[asyncio.Future[PipelineResult], np.ndarray, Optional[float], float, int,
                  Optional[list[tuple[Optional[bytes], int]]]]
        ] = asyncio.Queue()
        self._drain_task: Optional[asyncio.Task[None]] = None
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
        loop = asyncio.get_running_loop()
        self._drain_task = loop.create_task(self._drain(), name=f"stream-{self.id}")
        self._clock.add(self, self._on_tick)

    def _on_tick(self) -> None:
        audio, origin = self.source.pull()
        if self.muted:
            audio = np.zeros_like(audio)
        if self._inflight.qsize() >= _MAX_INFLIGHT:
            self.counters.dropped_backlog += 1
            return
        tick = self._clock.ticks
        reference = self._reference(tick) if self._reference is not None else None
        forwardable = self._take_forwardable()
        fut = asyncio.ensure_future(self.pipeline.process(audio, reference))
        self._inflight.put_nowait((fut, audio, origin, time.monotonic(), tick, forwardable))

    def _take_forwardable(self) -> Optional[list[tuple[Optional[bytes], int]]]:
        """The publisher's packets to forward as they are, when this chunk will not be changed."""
        take = getattr(self.source, "take_forwardable", None) if self._forward_unprocessed else None
        if take is None:
            return None
        entries: list[tuple[Optional[bytes], int]] = take()
        return None if self.muted or self.pipeline.has_stages else entries

    async def _drain(self) -> None:
        c = self.counters
        while True:
            fut, audio, origin, started, tick, forwardable = await self._inflight.get()
            try:
                result = await fut
            except asyncio.CancelledError:
                raise
            except Exception:  # fail open: the chunk goes out unprocessed
                log.exception("pipeline failed on stream %s", self.id)
                result = PipelineResult(audio=audio, bypassed=True)
            c.chunks += 1
            if result.bypassed:
                c.bypassed += 1
            c.processing_ms = (time.monotonic() - started) * 1000.0
            rms = float(np.sqrt(np.mean(result.audio * result.audio)) + 1e-10)
            c.level_dbfs = 0.9 * c.level_dbfs + 0.1 * 20.0 * math.log10(rms)
            if "vad" in result.side:
                c.vad = float(result.side["vad"])
            if "aec_delay_ms" in result.side:
                c.echo_delay_ms = float(result.side["aec_delay_ms"])
            if self._on_chunk is not None:
                self._on_chunk(self, audio, result)
            self.current_tick = tick
            if origin is not None and self.pipeline.latency_samples:
                # a stage that delays the audio (look-ahead) sends out audio that arrived that much earlier
                origin -= self.pipeline.latency_samples / SAMPLE_RATE
            for listener in self._pcm_listeners:
                try:
                    listener(result.audio, origin)
                except Exception:
                    log.exception("pcm listener failed on stream %s", self.id)
            if forwardable is not None and not result.bypassed:
                packets = self.encoder.forward(forwardable, origin)
            else:
                packet = self.encoder.push(result.audio, origin)
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
        if self._drain_task is not None:
            self._drain_task.cancel()
            try:
                await self._drain_task
            except asyncio.CancelledError:
                pass
        while not self._inflight.empty():
            fut = self._inflight.get_nowait()[0]
            fut.cancel()
        self.fanout.close()
        self._pcm_listeners.clear()
        self.pipeline.close()
        self.source.close()
        self.encoder.close()
