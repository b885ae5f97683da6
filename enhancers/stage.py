"""The stage contract every enhancement processor implements.

A :class:`Stage` is created once per process and owns what all streams share
(weights, the torch device, a pool of per-stream state).  Each audio stream
asks it for a :class:`StageStream`, a handle on that stream's state slot.
Every tick the executor calls :meth:`Stage.process` once with the chunks of
all streams that run the stage: ``audio`` is ``[N, CHUNK]`` float32, one row
per stream, and the call returns ``[N, CHUNK]``: one chunk in, one chunk out.

Internal format, fixed for the whole project: 48 kHz mono float32, 10 ms
chunks of 480 samples.  ``enhancers`` never imports aiortc.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

import torch

from enhancers.tensor_device import move_tensors

SAMPLE_RATE = 48_000
CHUNK = 480  # 10 ms at 48 kHz


@dataclass
class BatchContext:
    """What one stage call sees besides the audio, row-aligned with it.

    ``reference`` holds, for each row, the far-end audio the stream's owner
    was sent over the same 10 ms (the echo reference; zeros when none).
    Stages write per-row side information into ``side`` (e.g. ``"vad"`` ->
    ``[N]`` speech probability); the executor hands it back per stream.
    """

    reference: torch.Tensor | None = None
    side: dict[str, torch.Tensor] = field(default_factory=dict)


class StageStream:
    """One stream's handle on a stage: its state slot and its options.

    Stages that keep state in batched tensors index them with ``slot``;
    stages with per-stream native objects (e.g. RNNoise, webrtcvad) keep them
    in ``native``.  ``options`` are the per-stream settings given at open.
    """

    def __init__(self, stage: "Stage", slot: int, options: dict[str, Any]) -> None:
        self.stage = stage
        self.slot = slot
        self.options = dict(options)
        self.native: Any = None
        self.closed = False

    def reset(self) -> None:
        self.stage.reset_stream(self)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.stage.release_stream(self)


# option of an echo canceller that follows jumps of the microphone's timeline: their sum, in samples ahead
NEAR_SHIFT = "near_shift_samples"


def follow_shift(room: int, shift: int, limit: int) -> int:
    """A delay line's delay after the microphone's timeline jumped ``shift`` samples ahead (negative: behind):
    a jump ahead uses up ``room``, one behind gives it back, within 0..``limit``."""
    return min(max(room - int(shift), 0), limit)


class Stage(ABC):
    """Shared part of one processor: weights, device and the state pool.

    Subclasses set ``name`` and ``latency_samples`` and implement
    :meth:`process`.  Batched torch state lives in ``self.state``: a dict of
    tensors whose first dimension is the slot capacity; subclasses describe
    one stream's initial state in :meth:`initial_state` and the pool grows by
    doubling.  Subclasses with native per-stream objects override
    :meth:`open_native` / :meth:`close_native` instead.
    """

    name: ClassVar[str] = "stage"
    latency_samples: int = 0
    # per-stream options :meth:`retune` changes on a running stream (its state kept); a change of any
    # other option reopens the stream's state fresh
    live_options: ClassVar[frozenset[str]] = frozenset()
    # an echo canceller with ``near_shift_samples`` among its live options follows jumps of the microphone's
    # timeline; None: any jump, else the room a delay line gives it: (samples it starts with, most it holds)
    # moved by :func:`follow_shift` at each jump
    shift_room: ClassVar[tuple[int, int] | None] = None

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.state: dict[str, torch.Tensor] = {}
        self._capacity = 0
        self._free: list[int] = []
        self._live = 0

    # -- per-stream state -------------------------------------------------
    def initial_state(self) -> dict[str, torch.Tensor]:
        """One stream's fresh state, tensors without the slot dimension."""
        return {}

    def open_native(self, stream: StageStream) -> None:
        """Create per-stream native objects (stored in ``stream.native``)."""

    def close_native(self, stream: StageStream) -> None:
        """Release per-stream native objects."""

    def stream(self, **options: Any) -> StageStream:
        """Open a new stream on this stage and return its handle."""
        slot = self._alloc_slot()
        handle = StageStream(self, slot, options)
        self._write_initial(slot)
        self.open_native(handle)
        self._live += 1
        return handle

    def retune(self, stream: StageStream, changed: dict[str, Any]) -> None:
        """Apply new values of some of ``live_options`` to a running stream, keeping its state.

        ``stream.options`` still holds the old values; the caller stores the new ones after."""
        raise NotImplementedError(f"stage {self.name!r} has no live options")

    def reset_stream(self, stream: StageStream) -> None:
        self._write_initial(stream.slot)
        self.close_native(stream)
        self.open_native(stream)

    def release_stream(self, stream: StageStream) -> None:
        self.close_native(stream)
        self._free.append(stream.slot)
        self._live -= 1

    @property
    def live_streams(self) -> int:
        return self._live

    def slots(self, streams: Sequence[StageStream]) -> torch.Tensor:
        """Slot indices of ``streams`` as a long tensor on the stage device."""
        return torch.tensor([s.slot for s in streams], dtype=torch.long, device=self.device)

    def contiguous_rows(self, streams: Sequence[StageStream]) -> slice | None:
        """The pool rows of ``streams`` as one slice, in their order, or None where the caller must gather.

        Slots follow the order streams were opened in, and a call's rows follow the executor's order, so
        after streams come and go they seldom line up, and every call would copy each state tensor out
        and back (DF3 at 16 streams: ~15 % of its call).  A call over every open stream of the stage (the
        usual case) therefore moves their state to rows 0..n-1 in the call's order, once; the next calls
        in that order take views of the pool.  A call over some of them is left as it is (it gathers):
        rearranging for it would undo the order of the full calls.
        """
        if not streams:
            return None
        first = streams[0].slot
        if all(s.slot == first + i for i, s in enumerate(streams)):
            return slice(first, first + len(streams))
        if len(streams) != self._live or any(s.stage is not self or s.closed for s in streams):
            return None
        moved = {s.slot: i for i, s in enumerate(streams)}
        if len(moved) != len(streams):
            return None  # (the same stream twice: not a call the executor makes)
        order = torch.tensor(list(moved), dtype=torch.long, device=self.device)
        n = len(streams)
        for value in self.state.values():
            value[:n] = value.index_select(0, order)
        for s in streams:
            s.slot = moved[s.slot]
        self._free = list(range(self._capacity - 1, n - 1, -1))  # every other row is free
        self._slots_moved(moved)
        return slice(0, n)

    def _slots_moved(self, moved: dict[int, int]) -> None:
        """Hook for stages that key anything besides ``self.state`` by slot: ``moved`` maps old to new."""

    def _alloc_slot(self) -> int:
        if not self._free:
            self._grow(max(4, self._capacity * 2))
        return self._free.pop()

    def _grow(self, capacity: int) -> None:
        init = self.initial_state()
        for key, value in init.items():
            value = value.to(self.device)
            new = torch.zeros((capacity, *value.shape), dtype=value.dtype, device=self.device)
            old = self.state.get(key)
            if old is not None:
                new[: old.shape[0]] = old
            self.state[key] = new
        self._free.extend(range(capacity - 1, self._capacity - 1, -1))
        self._capacity = capacity

    def _write_initial(self, slot: int) -> None:
        for key, value in self.initial_state().items():
            self.state[key][slot] = value.to(self.device)

    # -- device -----------------------------------------------------------
    def to_device(self, device: str | torch.device) -> None:
        """Move the weights and every stream's batched state to ``device``, keeping the state.

        The executor calls this when the accelerator fails mid-run (moving to
        the CPU).  The default walks the instance: tensors, modules, and the
        project's own helper objects holding them (``enhancers.tensor_device``).
        Stages with device-bound objects of another kind override it; raising
        makes the executor load a fresh instance on the new device instead.
        """
        move_tensors(self, torch.device(device))
        self.device = torch.device(device)

    # -- processing -------------------------------------------------------
    @abstractmethod
    def process(
        self, audio: torch.Tensor, streams: Sequence[StageStream], ctx: BatchContext
    ) -> torch.Tensor:
        """Process ``audio`` ``[N, CHUNK]`` for ``streams`` (length N); return ``[N, CHUNK]``."""
