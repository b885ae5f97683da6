"""Spoken prompts: synthesized speech published into rooms as extra, synthetic tracks.

A prompt track is an ordinary ``PublishedStream`` (kind ``"prompt"``, ``synthetic=True``, no
enhancement stages) whose source is a :class:`PromptSource`: the media clock pulls 480 samples every
10 ms from it, it plays queued prompts back to back and is silent when idle.  Each room gets one
room-wide prompt track at its first room-wide prompt, and one per participant that a prompt was
addressed to; they stay (silent) until the room empties or the target leaves, so a prompt costs no
renegotiation once its track exists.  A new track holds its first prompt until the subscribers'
senders read from it (the renegotiation is done), so its beginning is not lost.

Synthesis (engine, watermark, resampling, normalization, padding) runs in the synthesis process of
``synth.process`` (``SynthService(isolation="process")``), never on this process's interpreter: the
event loop that paces the audio only receives a prompt's finished 16-bit samples, a read-only mapping
of the process's memory file for a long prompt, whose pages join this process as they are played and
are unmapped when the prompt is played, cut or dropped.  What a track holds is bounded in bytes
(``PromptConfig.max_queued_bytes``), the cache in its own byte budget (``cache_memory_bytes``).

``interrupt`` cuts the playing prompt at the next tick and drops the queue.  Everyone who hears a
prompt receives ``prompt.started`` when its first chunk is pulled and ``prompt.finished`` when its last
one is (or when it is cut).  Being published like any stream, prompts reach the echo reference of
every participant who hears them.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from mediaserver.audio_format import CHUNK, SAMPLE_RATE
from mediaserver.room import Participant, Room, RoomError, cancel_quietly, new_id
from mediaserver.stream import PublishedStream
from synth import (
    EmptyText,
    EngineFailure,
    InvalidOption,
    InvalidRequest,
    SynthResult,
    SynthService,
    TextTooLong,
    UnknownVoice,
    VoiceOptions,
)
from synth.cache import PromptCache
from synth.service import Isolation

if TYPE_CHECKING:
    from mediaserver.server import MediaServer

log = logging.getLogger(__name__)

MAX_QUEUED = 16  # prompts waiting on one track
MAX_PENDING_SYNTHESES = 8  # prompts of one room being synthesized at once
READY_TIMEOUT_S = 3.0  # how long a new track holds its first prompt for the subscribers' renegotiation
WARM_UP_TEXT = "Ready."
RECENT_PROMPTS = 256  # prompts findable by id after they were queued (their audio is let go once played)
MAX_QUEUED_BYTES = 32 * 1024 * 1024  # audio one track holds, playing and queued (PromptConfig.max_queued_bytes)
_INT16_SCALE = np.float32(1.0 / 32767.0)


_NO_AUDIO = np.zeros(0, dtype=np.float32)
_NO_AUDIO.flags.writeable = False


@dataclass
class Prompt:
    """One prompt: its synthesized audio (48 kHz mono, int16 or float32) and where playback stands.

    Sample positions count the samples its track's source had produced (``-1``: not yet).
    """

    id: str
    text: str
    audio: np.ndarray
    to: str | None
    voice: str
    cache_hit: bool
    queued_sample: int = -1
    started_sample: int = -1
    ended_sample: int = -1
    played: int = 0
    interrupted: bool = False
    metadata: dict[str, Any] = field(default_factory=dict)
    samples: int = -1  # len(audio) as synthesized; the audio itself is released once played

    def __post_init__(self) -> None:
        if self.samples < 0:
            self.samples = len(self.audio)

    @property
    def duration_s(self) -> float:
        return self.samples / SAMPLE_RATE

    def release_audio(self) -> None:
        """Played, cut or dropped: let go of the audio (the cache may keep its own reference)."""
        self.audio = _NO_AUDIO

    def started_event(self, stream_id: str) -> dict[str, Any]:
        return {"type": "prompt.started", "prompt": self.id, "text": self.text, "synthetic": True,
                "to": self.to, "stream": stream_id, "duration_s": round(self.duration_s, 3)}

    def finished_event(self, stream_id: str) -> dict[str, Any]:
        return {"type": "prompt.finished", "prompt": self.id, "interrupted": self.interrupted,
                "synthetic": True, "to": self.to, "stream": stream_id,
                "played_s": round(self.played / SAMPLE_RATE, 4)}


PromptEvent = Callable[[str, Prompt], None]  # ("started" | "finished", prompt)


class PromptSource:
    """A ChunkSource that owns a queue of prompts and the one playing now; silence when idle.

    ``held`` keeps it silent without starting anything (a new track waiting for its subscribers).
    ``samples`` counts every sample it produced, silence included.
    """

    def __init__(self, on_event: PromptEvent, max_queued: int = MAX_QUEUED,
                 max_queued_bytes: int = MAX_QUEUED_BYTES) -> None:
        self._on_event = on_event
        self._max_queued = max_queued
        self._max_queued_bytes = max_queued_bytes
        self._queue: collections.deque[Prompt] = collections.deque()
        self.queued_bytes = 0  # audio bytes of the queued prompts (the playing one not included)
        self.current: Prompt | None = None
        self.held = False
        self.samples = 0
        self.closed = False

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def held_bytes(self) -> int:
        """Audio bytes this track holds: the queued prompts and what is left of the playing one."""
        return self.queued_bytes + (int(self.current.audio.nbytes) if self.current is not None else 0)

    @property
    def busy(self) -> bool:
        return self.current is not None or bool(self._queue)

    def enqueue(self, prompt: Prompt, interrupt: bool = False) -> None:
        """Queue a prompt; ``interrupt`` first cuts the playing one and drops every queued one."""
        size = int(prompt.audio.nbytes)
        if interrupt:
            self._drop_queue()
            if self.current is not None:
                self._finish(self.samples, interrupted=True)
        elif len(self._queue) >= self._max_queued:
            raise RoomError("too-many-prompts", f"{self._max_queued} prompts are already queued", status=429)
        elif self.busy and self.held_bytes + size > self._max_queued_bytes:  # one always fits an idle track
            raise RoomError("too-many-prompts", f"{self.held_bytes // (1024 * 1024)} MiB of prompt audio is "
                            f"already playing or queued (at most {self._max_queued_bytes // (1024 * 1024)} MiB)",
                            status=429)
        prompt.queued_sample = self.samples
        self._queue.append(prompt)
        self.queued_bytes += size

    def _drop_queue(self) -> None:
        for prompt in self._queue:
            prompt.release_audio()
        self._queue.clear()
        self.queued_bytes = 0

    def _finish(self, at_sample: int, interrupted: bool) -> None:
        prompt = self.current
        assert prompt is not None
        prompt.interrupted = interrupted
        prompt.ended_sample = at_sample
        prompt.release_audio()
        self.current = None
        self._on_event("finished", prompt)

    def pull(self) -> tuple[np.ndarray, float | None]:
        out = np.zeros(CHUNK, dtype=np.float32)
        filled = 0
        while not self.held and filled < CHUNK:
            if self.current is None:
                if not self._queue:
                    break
                self.current = self._queue.popleft()
                self.queued_bytes -= int(self.current.audio.nbytes)
                self.current.started_sample = self.samples + filled
                self._on_event("started", self.current)
            prompt = self.current
            take = min(CHUNK - filled, len(prompt.audio) - prompt.played)
            part = prompt.audio[prompt.played:prompt.played + take]
            out[filled:filled + take] = part if part.dtype == np.float32 else part * _INT16_SCALE
            prompt.played += take
            filled += take
            if prompt.played >= len(prompt.audio):
                self._finish(self.samples + filled, interrupted=False)
        self.samples += CHUNK
        return out, time.monotonic()

    def close(self) -> None:
        self.closed = True
        self._drop_queue()
        if self.current is not None:
            self.current.release_audio()
        self.current = None


class PromptPlayer:
    """Owns one prompt track of a room (room-wide, or for one participant): its source, its published
    stream, the task that sends the prompt events and the task that releases a new track's hold."""

    def __init__(self, server: MediaServer, room: Room, target: str | None, *,
                 max_queued: int = MAX_QUEUED, ready_timeout_s: float = READY_TIMEOUT_S,
                 max_queued_bytes: int = MAX_QUEUED_BYTES) -> None:
        self.room = room
        self.target = target
        owner = f"prompt-{room.id}" if target is None else f"prompt-{room.id}-{target}"
        self.source = PromptSource(self._on_event, max_queued, max_queued_bytes)
        self.source.held = True
        pipeline = server.hub.open(f"{room.id}/{owner}", [])
        self.stream = PublishedStream(owner, owner, "prompt", self.source, pipeline, server.clock,
                                      bitrate=server.config.media.opus_bitrate, synthetic=True,
                                      complexity=server.encoder_complexity)
        self._events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        self.stream.start()
        room.add_stream(self.stream, targets=None if target is None else {target})
        self._sender = loop.create_task(self._send_events(), name=f"prompt-events-{owner}")
        self._release = loop.create_task(self._release_when_heard(ready_timeout_s), name=f"prompt-hold-{owner}")

    def listeners(self) -> list[Participant]:
        """The participants who hear this track."""
        if self.target is None:
            heard_by = list(self.room.participants.values())
        else:
            p = self.room.participants.get(self.target)
            heard_by = [p] if p is not None else []
        return [p for p in heard_by if getattr(p, "can_subscribe", True)]

    def _on_event(self, kind: str, prompt: Prompt) -> None:
        event = prompt.started_event(self.stream.id) if kind == "started" else prompt.finished_event(self.stream.id)
        self._events.put_nowait(event)

    async def _send_events(self) -> None:
        while True:
            event = await self._events.get()
            for p in self.listeners():
                try:
                    await p.send(event)
                except Exception:  # a broken socket must not stop the others
                    log.debug("prompt event to %s failed", p.id, exc_info=True)

    def _reading_tracks(self) -> list[Any]:
        tracks = []
        for p in self.listeners():
            for track in getattr(p.session, "subscriber_tracks", []):
                if track.source is self.stream.fanout:
                    tracks.append(track)
        return tracks

    async def _release_when_heard(self, timeout_s: float) -> None:
        """Hold the first prompt until every subscriber's sender reads from this track (or timeout)."""
        baseline = {id(t): t.sent for t in self._reading_tracks()}
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if all(t.sent > baseline.get(id(t), 0) for t in self._reading_tracks()):
                break
            await asyncio.sleep(0.02)
        self.source.held = False

    async def close(self) -> None:
        await cancel_quietly(self._release)
        await cancel_quietly(self._sender)
        await self.room.remove_stream(self.stream)  # closes the stream, its pipeline and the source


def _synth_error(exc: Exception) -> RoomError:
    """The protocol error for a synth package error."""
    if isinstance(exc, TextTooLong):
        return RoomError("too-large", str(exc), status=413)
    if isinstance(exc, EmptyText):
        return RoomError("empty-text", str(exc))
    if isinstance(exc, UnknownVoice):
        return RoomError("unknown-voice", str(exc))
    if isinstance(exc, InvalidOption):
        return RoomError("bad-option", str(exc))
    if isinstance(exc, InvalidRequest):
        return RoomError("bad-request", str(exc))
    return RoomError("synth-failed", f"speech synthesis failed: {exc}", status=503)


class PromptManager:
    """Owns the server's one SynthService and the prompt players of every room."""

    def __init__(self, server: MediaServer, *, max_queued: int = MAX_QUEUED,
                 max_pending: int = MAX_PENDING_SYNTHESES, ready_timeout_s: float = READY_TIMEOUT_S,
                 synth: SynthService | None = None, isolation: Isolation = "process") -> None:
        self._server = server
        self._synth = synth
        self.isolation = isolation  # where synthesis runs: a process of its own (the server), or a thread
        self.max_queued = max_queued
        self.max_pending = max_pending
        self.ready_timeout_s = ready_timeout_s
        self.players: dict[tuple[str, str | None], PromptPlayer] = {}
        self._pending: collections.Counter[str] = collections.Counter()
        self._synth_lock: asyncio.Lock | None = None
        self._recent: collections.OrderedDict[str, Prompt] = collections.OrderedDict()
        self._warm_up: asyncio.Task[None] | None = None
        self.config = server.config.prompts  # byte bounds of the cache and of each track's queue

    def start(self) -> None:
        """Load the TTS engine and speak a warm-up phrase in the background, so the first prompt is quick."""
        self._warm_up = asyncio.get_running_loop().create_task(self._warm(), name="synth-warm-up")

    @property
    def ready(self) -> bool:
        """The synthesizer is loaded and has spoken its warm-up phrase (or failed to: nothing more to load)."""
        return self._warm_up is not None and self._warm_up.done()

    async def _warm(self) -> None:
        try:
            await (await self.service()).synthesize(WARM_UP_TEXT)
        except Exception:  # the first prompt will say what is wrong
            log.warning("the speech synthesizer could not be loaded", exc_info=True)

    async def service(self) -> SynthService:
        """The synthesis service, created on first use off the event loop (loading the engine takes a while)."""
        if self._synth is None:
            if self._synth_lock is None:
                self._synth_lock = asyncio.Lock()
            async with self._synth_lock:
                if self._synth is None:
                    cache = PromptCache(memory_bytes=self.config.cache_memory_bytes)
                    # process isolation: nothing is loaded here, the synthesis process starts on the first request
                    self._synth = await asyncio.to_thread(SynthService, None, cache, isolation=self.isolation)
        return self._synth

    def _target(self, room: Room, to: str | None) -> None:
        if to is not None and to not in room.participants:
            raise RoomError("unknown-participant", f"no participant {to[:64]!r} in room {room.id!r}", status=404)

    async def play(self, room_id: str, text: str, options: VoiceOptions | None = None, *,
                   to: str | None = None, interrupt: bool = False) -> Prompt:
        """Synthesize ``text`` (off the event loop, cached) and queue it on the room's (or ``to``'s) track.

        Raises RoomError: unknown room or participant (404), synthesis errors (400/413/503), too many
        prompts queued or being synthesized (429).
        """
        room = self._server.rooms.get(room_id)
        self._target(room, to)
        player = self.players.get((room.id, to))
        if not interrupt and player is not None and player.source.queued >= self.max_queued:
            raise RoomError("too-many-prompts", f"{self.max_queued} prompts are already queued", status=429)
        if self._pending[room.id] >= self.max_pending:
            raise RoomError("too-many-prompts", "too many prompts are being synthesized", status=429)
        self._pending[room.id] += 1
        try:
            synth = await self.service()
            max_chars = (await synth.engine_info()).max_chars
            if len(text) > max_chars:  # refuse before queueing work behind other syntheses
                raise TextTooLong(len(text), max_chars)
            # 16-bit samples, as the track holds them: from a synthesis process exactly as they came back
            result = await synth.synthesize(text, options or VoiceOptions(), pcm16=True)
        except (InvalidRequest, EngineFailure) as exc:
            raise _synth_error(exc) from exc
        finally:
            self._pending[room.id] -= 1
            if self._pending[room.id] <= 0:
                del self._pending[room.id]
        # the room or the target may have gone while the text was being synthesized
        room = self._server.rooms.get(room_id)
        self._target(room, to)
        prompt = self._prompt(text, to, result)
        self._player(room, to).source.enqueue(prompt, interrupt=interrupt)
        self._recent[prompt.id] = prompt
        while len(self._recent) > RECENT_PROMPTS:
            self._recent.popitem(last=False)
        log.info("room %s: prompt %s queued (%.2f s%s)", room.id, prompt.id, prompt.duration_s,
                 f", to {to}" if to else "")
        return prompt

    def find(self, prompt_id: str) -> Prompt | None:
        """A recently queued prompt (its playback state included), or None."""
        return self._recent.get(prompt_id)

    @staticmethod
    def _prompt(text: str, to: str | None, result: SynthResult) -> Prompt:
        # held as 16-bit samples while queued and playing: half the memory of float32, and nothing a
        # listener can hear after a 32 kbit/s Opus encode (a 5000-character prompt is ~27 MiB, not ~55).
        # From the synthesis process a long prompt's samples are a read-only view of a mapping of its memory file:
        # its pages join this process's RSS as they are played, and go when the prompt lets go of them.
        return Prompt(id=new_id("prompt-"), text=text, audio=result.audio, to=to, voice=result.voice,
                      cache_hit=result.cache_hit, metadata=result.metadata())

    def _player(self, room: Room, to: str | None) -> PromptPlayer:
        player = self.players.get((room.id, to))
        if player is None or player.room is not room or player.stream.closed:
            player = PromptPlayer(self._server, room, to, max_queued=self.max_queued,
                                  ready_timeout_s=self.ready_timeout_s,
                                  max_queued_bytes=self.config.max_queued_bytes)
            self.players[(room.id, to)] = player
        return player

    async def participant_left(self, participant: Participant) -> None:
        """Close the tracks nobody can hear any more: the one addressed to ``participant``, and all of
        the room's once it is empty (so that the room can be dropped)."""
        room = participant.room
        for key, player in list(self.players.items()):
            if player.room is room and (not room.participants or player.target == participant.id):
                del self.players[key]
                await player.close()

    async def close(self) -> None:
        await cancel_quietly(self._warm_up)
        for player in list(self.players.values()):
            await player.close()
        self.players.clear()
        if self._synth is not None:
            await self._synth.aclose()
