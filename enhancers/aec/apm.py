"""Single-stream echo canceller with an API in the spirit of WebRTC's APM.

    aec = EchoCanceller()
    aec.set_stream_delay_ms(120)              # optional hint
    aec.process_reverse_stream(far_frame)     # what the loudspeaker plays
    clean = aec.process_stream(mic_frame)     # what the microphone picked up

Frames are 48 kHz mono float32 of any length.  Internally everything runs
in 10 ms chunks through :class:`~enhancers.aec.stage.EchoCancellerStage` (one
stream of it), so the single-stream and the batched server path are the same
code.  When frames are multiples of 480 samples the output is not delayed;
otherwise up to 479 samples of buffering latency are added (``latency_samples``).
"""

from __future__ import annotations

import numpy as np
import torch

from enhancers.aec.stage import EchoCancellerStage
from enhancers.stage import CHUNK, BatchContext

MAX_FAR_BACKLOG = 48_000  # far-end samples kept ahead of the capture side (1 s)


class _Fifo:
    """A growable float32 sample queue."""

    def __init__(self) -> None:
        self._buf = np.zeros(0, dtype=np.float32)

    def __len__(self) -> int:
        return len(self._buf)

    def push(self, x: np.ndarray) -> None:
        self._buf = np.concatenate([self._buf, np.asarray(x, dtype=np.float32).reshape(-1)])

    def pop(self, n: int) -> np.ndarray:
        """The oldest ``n`` samples, zero-padded in front when fewer are queued."""
        out, self._buf = self._buf[:n], self._buf[n:]
        if len(out) < n:
            out = np.concatenate([np.zeros(n - len(out), dtype=np.float32), out])
        return out

    def pop_front(self, n: int) -> np.ndarray:
        """The oldest ``n`` samples, zero-padded at the end when fewer are queued."""
        out, self._buf = self._buf[:n], self._buf[n:]
        if len(out) < n:
            out = np.concatenate([out, np.zeros(n - len(out), dtype=np.float32)])
        return out

    def drop_oldest(self, keep: int) -> None:
        if len(self._buf) > keep:
            self._buf = self._buf[len(self._buf) - keep :]


class EchoCanceller:
    """One stream's echo canceller: owns a stage stream and the far/near sample queues.

    ``suppression`` is ``"off"``, ``"moderate"`` or ``"aggressive"``; pass an
    existing ``stage`` to share one stage (and its device) between cancellers.
    """

    def __init__(
        self,
        suppression: str = "moderate",
        delay_hint_ms: float | None = None,
        device: str = "cpu",
        stage: EchoCancellerStage | None = None,
    ) -> None:
        self.stage = stage if stage is not None else EchoCancellerStage(device=device)
        self.stream = self.stage.stream(suppression=suppression, delay_hint_ms=delay_hint_ms)
        self._far = _Fifo()
        self._near = _Fifo()
        self._out = _Fifo()
        self._padded = 0

    @property
    def latency_samples(self) -> int:
        """Buffering delay of :meth:`process_stream` output (0 while frames are whole chunks)."""
        return self._padded

    def process_reverse_stream(self, far: np.ndarray) -> None:
        """Queue far-end (render) audio; it is consumed in step with the capture side."""
        self._far.push(far)
        self._far.drop_oldest(MAX_FAR_BACKLOG)

    def process_stream(self, near: np.ndarray) -> np.ndarray:
        """Cancel echo from a capture frame; returns as many samples as given."""
        near = np.asarray(near, dtype=np.float32).reshape(-1)
        self._near.push(near)
        chunks = len(self._near) // CHUNK
        if chunks:
            mic = self._near.pop(chunks * CHUNK).reshape(chunks, CHUNK)
            far = self._far.pop_front(chunks * CHUNK).reshape(chunks, CHUNK)
            for i in range(chunks):
                ctx = BatchContext(reference=torch.from_numpy(far[i : i + 1]))
                out = self.stage.process(torch.from_numpy(mic[i : i + 1]), [self.stream], ctx)
                self._out.push(out[0].cpu().numpy())
        # Until a whole chunk is through, the output starts with zeros (buffering latency).
        self._padded += max(0, len(near) - len(self._out))
        return self._out.pop(len(near))

    def set_stream_delay_ms(self, delay_ms: float | None) -> None:
        """Hint the echo delay (render to capture); the estimator takes over once it locks."""
        self.stage.set_delay_hint(self.stream, delay_ms)

    def estimated_delay_ms(self) -> float | None:
        """The bulk delay the canceller has locked on (None before it locks)."""
        return self.stage.estimated_delay_ms(self.stream)

    def reset(self) -> None:
        """Forget all adaptation (e.g. after a device change)."""
        self.stream.reset()

    def close(self) -> None:
        self.stream.close()
