"""WebRTC's echo canceller (AEC3) as a stage (``aec:webrtc``): one native canceller per stream, on CPU.

The `livekit` wheel ships WebRTC's audio processing module (the AEC3 echo
canceller: delay estimator, linear filter, residual echo suppressor) inside its
FFI library, and `livekit.rtc.AudioProcessingModule` drives one instance per
object.  Each stream gets one with only echo cancellation on (no noise
suppression, gain control or high-pass filter: those are other stages' jobs).
Every tick a stream hands it the far-end chunk (``process_reverse_stream``:
what the server sent the participant over the same 10 ms) and then the
microphone chunk (``process_stream``, processed in place), as 16-bit PCM.

It is the light echo canceller: about 0.1 ms of one core per stream per
chunk at any batch size (bench/stage_cost.py), where the batched ``aec``
stage costs 2.5 ms at one stream and 0.28 ms per stream at 16 (its fixed
cost is ~760 torch ops per call).  The batched stage batches on a GPU; this
one is a loop over native objects by nature, like RNNoise.

Per-stream options: ``delay_hint_ms`` (handed to ``set_stream_delay_ms``;
AEC3 estimates the delay itself either way) and ``suppression``, which must be
``"moderate"`` (AEC3's own setting: the module exposes no other).

Jumps of the microphone's timeline.  AEC3 cannot be told that the microphone
jumped (a jitter buffer skipped a packet): its estimator finds the new delay
itself, leaking echo for seconds meanwhile.  A stream opened with the option
``near_shift_samples`` (the SFU's streams: their timeline may jump) therefore
hands AEC3 its far end through a delay line, ``SHIFT_HEADROOM`` samples late.
When the microphone jumps ahead by ``s`` samples, the far end jumps ahead with
it (the line's delay shrinks by ``s``), so the echo keeps its delay against
what AEC3 sees; a jump behind (concealment) lengthens the line again, up to
``SHIFT_LIMIT``.  The headroom costs nothing as long as the echo's delay
exceeds it: in the SFU it includes the server's own jitter buffer, the
client's and the network's round trip.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from enhancers.stage import CHUNK, NEAR_SHIFT, SAMPLE_RATE, BatchContext, Stage, StageStream, follow_shift

PCM_SCALE = 32767.0
SHIFT_HEADROOM = 1920  # 40 ms: the far end's delay in front of AEC3 on streams whose timeline may jump ahead
SHIFT_LIMIT = SHIFT_HEADROOM + 4800  # the delay line's length: 100 ms of jumps behind on top


@functools.lru_cache(maxsize=1)
def _rtc() -> Any:
    """``livekit.rtc``, imported on first use (its FFI library starts with the first module)."""
    from livekit import rtc

    return rtc


class RenderDelayLine:
    """The far end of one stream, ``delay`` samples late: owns the last ``limit`` + one chunk of it."""

    def __init__(self, delay: int, limit: int) -> None:
        self.delay = delay
        self.limit = limit
        self._line = np.zeros(limit + CHUNK, dtype=np.float32)

    def shift(self, samples: int) -> None:
        """The microphone jumped ``samples`` ahead (negative: behind): the far end follows within the line."""
        self.delay = follow_shift(self.delay, samples, self.limit)

    def push(self, far: np.ndarray | None) -> np.ndarray:
        """Take the next chunk of the far end (None: silence); the chunk ``delay`` samples before it."""
        line = self._line
        line[:-CHUNK] = line[CHUNK:]
        if far is None:
            line[-CHUNK:] = 0.0
        else:
            line[-CHUNK:] = far
        end = len(line) - self.delay
        return line[end - CHUNK : end]


class WebRtcEchoCanceller:
    """One stream's AEC3 instance, its two 10 ms PCM frames (far end and microphone) reused every tick, and
    the far end's delay line when its microphone's timeline may jump (``render_delay``)."""

    def __init__(self, delay_hint_ms: float | None = None, render_delay: RenderDelayLine | None = None) -> None:
        rtc = _rtc()
        self._apm = rtc.AudioProcessingModule(echo_cancellation=True)
        self._far = rtc.AudioFrame(bytearray(2 * CHUNK), SAMPLE_RATE, 1, CHUNK)
        self._mic = rtc.AudioFrame(bytearray(2 * CHUNK), SAMPLE_RATE, 1, CHUNK)
        self._far_pcm = np.frombuffer(self._far._data, dtype=np.int16)
        self._mic_pcm = np.frombuffer(self._mic._data, dtype=np.int16)
        self._scratch = np.empty(CHUNK, dtype=np.float32)
        self.render_delay = render_delay
        if delay_hint_ms is not None:
            self.set_delay_hint(delay_hint_ms)

    def set_delay_hint(self, delay_ms: float) -> None:
        """The echo's delay after the far end; AEC3 sees it shorter by the delay line's."""
        if self.render_delay is not None:
            delay_ms -= self.render_delay.delay * 1000.0 / SAMPLE_RATE
        self._apm.set_stream_delay_ms(int(max(0.0, min(float(delay_ms), 1000.0))))

    def _to_pcm(self, x: np.ndarray, pcm: np.ndarray) -> None:
        np.multiply(x, PCM_SCALE, out=self._scratch)
        np.clip(self._scratch, -32768.0, 32767.0, out=self._scratch)
        np.rint(self._scratch, out=self._scratch)
        pcm[:] = self._scratch

    def process(self, mic: np.ndarray, far: np.ndarray | None, out: np.ndarray) -> None:
        """Cancel the echo of ``far`` (zeros when None) in ``mic`` (480 float samples) into ``out``."""
        if self.render_delay is not None:
            far = self.render_delay.push(far)
        if far is None:
            self._far_pcm[:] = 0
        else:
            self._to_pcm(far, self._far_pcm)
        self._apm.process_reverse_stream(self._far)
        self._to_pcm(mic, self._mic_pcm)
        self._apm.process_stream(self._mic)
        np.multiply(self._mic_pcm, 1.0 / PCM_SCALE, out=out, casting="unsafe")


class WebRtcEchoCancellerStage(Stage):
    """WebRTC AEC3 per stream: owns nothing shared but the FFI library; each stream's canceller
    lives in ``StageStream.native``.  Runs on CPU whatever the executor device."""

    name = "aec:webrtc"
    # AEC3 at 48 kHz works on three bands: its band-split filter bank delays the output by ~9 ms
    # (an impulse's energy arrives 430-473 samples later, half of it by 436; tests/test_aec_webrtc.py)
    latency_samples = 436
    # ``near_shift_samples``: AEC3 cannot be told that the microphone's timeline jumped, but its far end can
    # jump with it, within the delay line's room (module docstring)
    live_options = frozenset({"delay_hint_ms", NEAR_SHIFT})
    shift_room = (SHIFT_HEADROOM, SHIFT_LIMIT)

    def __init__(self, device: str | torch.device = "cpu") -> None:
        super().__init__(device)
        _rtc()  # fail at construction (wheel missing), not on the first chunk

    def open_native(self, stream: StageStream) -> None:
        level = str(stream.options.get("suppression", "moderate"))
        if level != "moderate":
            raise ValueError(f"aec:webrtc has one suppression level, 'moderate', not {level!r}")
        hint = stream.options.get("delay_hint_ms")
        line = RenderDelayLine(SHIFT_HEADROOM, SHIFT_LIMIT) if NEAR_SHIFT in stream.options else None
        stream.native = WebRtcEchoCanceller(None if hint is None else float(hint), line)

    def close_native(self, stream: StageStream) -> None:
        stream.native = None  # the FFI handle is released with the object

    def retune(self, stream: StageStream, changed: dict[str, Any]) -> None:
        if NEAR_SHIFT in changed:
            native = stream.native
            line = native.render_delay if isinstance(native, WebRtcEchoCanceller) else None
            if line is None:
                raise ValueError("aec:webrtc follows jumps only on streams opened with near_shift_samples")
            line.shift(int(changed[NEAR_SHIFT] or 0) - int(stream.options.get(NEAR_SHIFT) or 0))
        if "delay_hint_ms" in changed:
            self.set_delay_hint(stream, changed["delay_hint_ms"])

    def set_delay_hint(self, stream: StageStream, delay_ms: float | None) -> None:
        """Hand ``stream``'s expected echo delay to its canceller (``None``: nothing to hand)."""
        stream.options["delay_hint_ms"] = delay_ms
        if delay_ms is not None and isinstance(stream.native, WebRtcEchoCanceller):
            stream.native.set_delay_hint(delay_ms)

    def estimated_delay_ms(self, stream: StageStream) -> float | None:
        """AEC3 keeps its delay estimate to itself (the module reports no statistics)."""
        return None

    def process(self, audio: torch.Tensor, streams: Sequence[StageStream], ctx: BatchContext) -> torch.Tensor:
        mic = np.nan_to_num(audio.detach().to("cpu", torch.float32).numpy())
        far = None
        if ctx.reference is not None:
            far = np.nan_to_num(ctx.reference.detach().to("cpu", torch.float32).numpy())
        out = np.empty_like(mic)
        for row, stream in enumerate(streams):  # per-stream native state: a loop by nature
            stream.native.process(mic[row], None if far is None else far[row], out[row])
        return torch.from_numpy(out).to(audio.device)
