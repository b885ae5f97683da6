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
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from enhancers.stage import CHUNK, SAMPLE_RATE, BatchContext, Stage, StageStream

PCM_SCALE = 32767.0


@functools.lru_cache(maxsize=1)
def _rtc() -> Any:
    """``livekit.rtc``, imported on first use (its FFI library starts with the first module)."""
    from livekit import rtc

    return rtc


class WebRtcEchoCanceller:
    """One stream's AEC3 instance and its two 10 ms PCM frames (far end and microphone), reused every tick."""

    def __init__(self, delay_hint_ms: float | None = None) -> None:
        rtc = _rtc()
        self._apm = rtc.AudioProcessingModule(echo_cancellation=True)
        self._far = rtc.AudioFrame(bytearray(2 * CHUNK), SAMPLE_RATE, 1, CHUNK)
        self._mic = rtc.AudioFrame(bytearray(2 * CHUNK), SAMPLE_RATE, 1, CHUNK)
        self._far_pcm = np.frombuffer(self._far._data, dtype=np.int16)
        self._mic_pcm = np.frombuffer(self._mic._data, dtype=np.int16)
        self._scratch = np.empty(CHUNK, dtype=np.float32)
        if delay_hint_ms is not None:
            self.set_delay_hint(delay_hint_ms)

    def set_delay_hint(self, delay_ms: float) -> None:
        self._apm.set_stream_delay_ms(int(max(0.0, min(float(delay_ms), 1000.0))))

    def _to_pcm(self, x: np.ndarray, pcm: np.ndarray) -> None:
        np.multiply(x, PCM_SCALE, out=self._scratch)
        np.clip(self._scratch, -32768.0, 32767.0, out=self._scratch)
        np.rint(self._scratch, out=self._scratch)
        pcm[:] = self._scratch

    def process(self, mic: np.ndarray, far: np.ndarray | None, out: np.ndarray) -> None:
        """Cancel the echo of ``far`` (zeros when None) in ``mic`` (480 float samples) into ``out``."""
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
    # not ``near_shift_samples``: AEC3 cannot be told that the microphone's timeline jumped (its own
    # estimator finds the new delay, leaking echo for seconds meanwhile), so the SFU keeps its delay steady
    live_options = frozenset({"delay_hint_ms"})

    def __init__(self, device: str | torch.device = "cpu") -> None:
        super().__init__(device)
        _rtc()  # fail at construction (wheel missing), not on the first chunk

    def open_native(self, stream: StageStream) -> None:
        level = str(stream.options.get("suppression", "moderate"))
        if level != "moderate":
            raise ValueError(f"aec:webrtc has one suppression level, 'moderate', not {level!r}")
        hint = stream.options.get("delay_hint_ms")
        stream.native = WebRtcEchoCanceller(None if hint is None else float(hint))

    def close_native(self, stream: StageStream) -> None:
        stream.native = None  # the FFI handle is released with the object

    def retune(self, stream: StageStream, changed: dict[str, Any]) -> None:
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
