"""Echo references: exactly what the server sent each participant, tick by tick.

The server knows what every participant hears: the processed chunks of the
streams it is subscribed to, prompts included.  ``RoomMix`` keeps, per media
clock tick, the sum of a room's room-wide streams, each stream's own chunk,
and the sum of the streams targeted at one participant; a participant's
reference is ``room-wide sum - its own stream + what was targeted at it``,
O(streams) per tick whatever the room size.  Chunks are captured when they
are encoded for sending and indexed by the tick at which they were taken, so
the reference handed to the echo canceller for microphone chunk *k* is the
audio sent at tick ``k - lag``: a constant offset that the canceller's bulk
delay estimation absorbs together with the network and device delay.
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np

from mediaserver.audio_format import CHUNK
from mediaserver.stream import PublishedStream

RING_TICKS = 16
REFERENCE_LAG_TICKS = 5  # > the executor deadline (40 ms): every chunk of tick k-lag is in


class TickRing:
    """The last ``size`` chunks of a signal, addressed by media clock tick."""

    def __init__(self, size: int = RING_TICKS) -> None:
        self._buf = np.zeros((size, CHUNK), dtype=np.float32)
        self._tags = np.full(size, -1, dtype=np.int64)
        self._size = size

    def add(self, tick: int, chunk: np.ndarray) -> None:
        i = tick % self._size
        if self._tags[i] != tick:
            self._tags[i] = tick
            self._buf[i] = chunk
        else:
            self._buf[i] += chunk

    def get(self, tick: int) -> Optional[np.ndarray]:
        i = tick % self._size
        return self._buf[i] if self._tags[i] == tick else None


class RoomMix:
    """What each participant of one room was sent, per tick (see module docstring)."""

    def __init__(self, lag_ticks: int = REFERENCE_LAG_TICKS) -> None:
        self.lag = lag_ticks
        self._total = TickRing()
        self._own: dict[str, TickRing] = {}
        self._targeted: dict[str, TickRing] = {}
        self._listeners: dict[str, Callable[[np.ndarray, Optional[float]], None]] = {}
        self._users: set[str] = set()  # participants whose echo canceller reads references

    def use(self, participant_id: str, on: bool) -> None:
        """Whether ``participant_id`` reads references (its microphone runs aec).  A room where nobody
        does keeps no chunks: copying every stream's chunk on every tick was a few % of a core at 64
        forwarded streams for nothing."""
        if on:
            self._users.add(participant_id)
        else:
            self._users.discard(participant_id)

    @property
    def active(self) -> bool:
        return bool(self._users)

    def add_stream(self, stream: PublishedStream, targets: Optional[set[str]]) -> None:
        own = self._own.setdefault(stream.id, TickRing())

        users = self._users

        def listener(audio: np.ndarray, origin: Optional[float]) -> None:
            if not users:
                return
            tick = stream.current_tick
            own.add(tick, audio)
            if targets is None:
                self._total.add(tick, audio)
            else:
                for pid in targets:
                    self._targeted.setdefault(pid, TickRing()).add(tick, audio)

        self._listeners[stream.id] = listener
        stream.add_pcm_listener(listener)

    def remove_stream(self, stream: PublishedStream) -> None:
        listener = self._listeners.pop(stream.id, None)
        if listener is not None:
            stream.remove_pcm_listener(listener)
        self._own.pop(stream.id, None)

    def remove_participant(self, participant_id: str) -> None:
        self._targeted.pop(participant_id, None)
        self._users.discard(participant_id)

    def reference(self, participant_id: str, own_stream_id: Optional[str], tick: int) -> np.ndarray:
        """The audio sent to ``participant_id`` at tick ``tick - lag``."""
        t = tick - self.lag
        total = self._total.get(t)
        out = np.zeros(CHUNK, dtype=np.float32) if total is None else total.copy()
        if own_stream_id is not None:
            own = self._own.get(own_stream_id)
            mine = own.get(t) if own is not None else None
            if mine is not None:
                out -= mine
        targeted = self._targeted.get(participant_id)
        if targeted is not None:
            extra = targeted.get(t)
            if extra is not None:
                out += extra
        return out
