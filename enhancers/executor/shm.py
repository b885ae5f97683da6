"""The shared memory that job audio crosses in between the server's process and the worker process.

A :class:`JobArea` is one POSIX shared-memory block holding ``slots`` job slots;
each slot has three ``[rows, 480]`` float32 arrays: the chunks of the job's
rounds one after another (``input``), their far-end references (``reference``,
aec streams) and what the stages made of them (``output``).  The parent writes a
job's rows into the inputs of slot ``job_id % slots`` and sends only the row
layout over the pipe (:class:`~enhancers.executor.messages.RunJob`); the child
runs its stages on views of those rows and writes the results into the slot's
outputs (:class:`~enhancers.executor.messages.JobDone` carries only side info).
No audio is pickled, and no message grows with the number of streams beyond a
list of stream ids, so the pipe never fills.

The parent creates (and unlinks) the block; the child attaches by name and only
closes its mapping.  A job with more rows than a slot holds gets a bigger area
first (:class:`~enhancers.executor.messages.AttachArea`, sent ahead of the job on
the same ordered pipe).
"""

from __future__ import annotations

from multiprocessing import shared_memory

import numpy as np

from enhancers.stage import CHUNK

ARRAYS = 3  # input, reference, output
ROW_BYTES = CHUNK * 4


class JobArea:
    """Owns one mapping of the job slots' shared memory (created by the parent, attached by the child)."""

    def __init__(self, rows: int, slots: int = 2, name: str | None = None) -> None:
        if rows <= 0 or slots <= 0:
            raise ValueError("a job area needs rows and slots")
        self.rows = rows
        self.slots = slots
        size = slots * ARRAYS * rows * ROW_BYTES
        self.owner = name is None
        if name is None:
            self._shm = shared_memory.SharedMemory(create=True, size=size)
        else:
            # Python < 3.13 registers an attached block with the resource tracker too; a spawned child
            # shares its parent's tracker, where that is a no-op (a set), and the parent's unlink ends it
            self._shm = shared_memory.SharedMemory(name=name)
        self.name = self._shm.name
        whole = np.ndarray((slots, ARRAYS, rows, CHUNK), dtype=np.float32, buffer=self._shm.buf)
        self._views = [(whole[s, 0], whole[s, 1], whole[s, 2]) for s in range(slots)]

    def input(self, slot: int) -> np.ndarray:
        return self._views[slot][0]

    def reference(self, slot: int) -> np.ndarray:
        return self._views[slot][1]

    def output(self, slot: int) -> np.ndarray:
        return self._views[slot][2]

    def close(self) -> None:
        """Drop this process's mapping; the owner also removes the block's name (idempotent)."""
        if self._shm is None:
            return
        self._views = []
        shm, self._shm = self._shm, None  # type: ignore[assignment]
        try:
            shm.close()
        except BufferError:  # a view is still alive somewhere: the mapping goes with the process
            pass
        if self.owner:
            try:
                shm.unlink()
            except FileNotFoundError:
                pass
