"""Voice activity detection stages: WebRTC VAD (per stream) and Silero VAD (batched).

Both leave the audio unchanged (latency 0) and write ``ctx.side["vad"]``, a
``[N]`` speech probability in 0..1 for the chunk just processed.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
import webrtcvad
from scipy.signal import firwin

from enhancers.stage import CHUNK, SAMPLE_RATE, BatchContext, Stage, StageStream


def smoothing_coefficient(time_ms: float, step_ms: float = 10.0) -> float:
    """One-pole coefficient reaching 63 % of a step after ``time_ms`` at ``step_ms`` updates."""
    return 1.0 - math.exp(-step_ms / max(time_ms, 1e-3))


class WebRtcVadStage(Stage):
    """Owns one native ``webrtcvad.Vad`` per stream and each stream's smoothed probability.

    webrtcvad decides speech / no speech per 10 ms frame of 16-bit PCM; the
    decisions are smoothed with a fast attack (``attack_ms``) and a slower
    release (``release_ms``) into a probability.  ``aggressiveness`` 0..3
    (also settable per stream) trades missed speech for fewer false alarms.
    """

    name = "vad"
    latency_samples = 0

    def __init__(
        self,
        device: str | torch.device = "cpu",
        aggressiveness: int = 3,
        attack_ms: float = 20.0,
        release_ms: float = 150.0,
    ) -> None:
        super().__init__(device)
        if aggressiveness not in (0, 1, 2, 3):
            raise ValueError("aggressiveness must be 0, 1, 2 or 3")
        self.aggressiveness = aggressiveness
        self.attack = smoothing_coefficient(attack_ms)
        self.release = smoothing_coefficient(release_ms)

    def initial_state(self) -> dict[str, torch.Tensor]:
        return {"probability": torch.zeros((), dtype=torch.float32)}

    def open_native(self, stream: StageStream) -> None:
        mode = int(stream.options.get("aggressiveness", self.aggressiveness))
        stream.native = webrtcvad.Vad(mode)

    def close_native(self, stream: StageStream) -> None:
        stream.native = None

    def process(self, audio: torch.Tensor, streams: Sequence[StageStream], ctx: BatchContext) -> torch.Tensor:
        pcm = (audio.clamp(-1.0, 1.0) * 32767.0).round().to(torch.int16).cpu().numpy()
        decisions = [s.native.is_speech(row.tobytes(), SAMPLE_RATE) for s, row in zip(streams, pcm)]
        speech = torch.tensor(decisions, dtype=torch.float32, device=self.device)
        slots = self.slots(streams)
        state = self.state["probability"]
        prob = state.index_select(0, slots)
        coef = torch.where(speech > prob, self.attack, self.release)
        prob = prob + coef * (speech - prob)
        state.index_copy_(0, slots, prob)
        ctx.side["vad"] = prob
        return audio


class SileroVadStage(Stage):
    """Owns the Silero VAD network (weights from the silero-vad package) and per-stream state.

    Each stream's audio is decimated 48 kHz -> 16 kHz with a batched polyphase
    FIR and buffered until a 512-sample window is full (every 3.2 chunks).
    The windows of all streams that have one are run through the network in
    one batch, each with its own LSTM state and 64-sample context gathered
    from the state pool.  ``ctx.side["vad"]`` is each stream's latest window
    probability, smoothed with ``release_ms`` on the way down.
    """

    name = "vad"
    latency_samples = 0

    WINDOW = 512  # samples at 16 kHz the network takes
    CONTEXT = 64  # samples of the previous window it prepends
    DECIMATION = 3
    TAPS = 49

    def __init__(
        self, device: str | torch.device = "cpu", release_ms: float = 100.0, attack_ms: float = 0.0
    ) -> None:
        super().__init__(device)
        from silero_vad import load_silero_vad

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            net = load_silero_vad(onnx=False)._model  # 16 kHz core: forward(x, state) -> (p, state)
        self.net = net.to(self.device).eval()
        self._warm_up()
        fir = firwin(self.TAPS, 7200.0, fs=SAMPLE_RATE).astype(np.float32)
        self.fir = torch.from_numpy(fir).view(1, 1, -1).to(self.device)
        self.hop = CHUNK // self.DECIMATION  # 160 new samples at 16 kHz per chunk
        self.offsets = torch.arange(self.hop, device=self.device)
        self.attack = smoothing_coefficient(attack_ms) if attack_ms > 0 else 1.0
        self.release = smoothing_coefficient(release_ms)

    def _warm_up(self) -> None:
        """Let TorchScript profile and optimise now, not on the first live windows (~200 ms)."""
        with torch.inference_mode():
            for batch in (1, 2, 5, 3, 8, 1, 4):
                frames = torch.zeros(batch, self.CONTEXT + self.WINDOW, device=self.device)
                self.net(frames, torch.zeros(2, batch, 128, device=self.device))

    def initial_state(self) -> dict[str, torch.Tensor]:
        return {
            "fir_history": torch.zeros(self.TAPS - 1),
            "buffer": torch.zeros(self.WINDOW + self.hop),
            "fill": torch.zeros((), dtype=torch.long),
            "context": torch.zeros(self.CONTEXT),
            "rnn": torch.zeros(2, 128),
            "window_prob": torch.zeros(()),
            "probability": torch.zeros(()),
        }

    def decimate(self, audio: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """``[N, 480]`` at 48 kHz -> ``[N, 160]`` at 16 kHz, continuing each stream's filter."""
        history = self.state["fir_history"]
        padded = torch.cat([history.index_select(0, slots), audio], dim=1)
        history.index_copy_(0, slots, padded[:, -(self.TAPS - 1) :].contiguous())
        return F.conv1d(padded.unsqueeze(1), self.fir, stride=self.DECIMATION).squeeze(1)

    def process(self, audio: torch.Tensor, streams: Sequence[StageStream], ctx: BatchContext) -> torch.Tensor:
        slots = self.slots(streams)
        low = self.decimate(audio, slots)
        buffer = self.state["buffer"].index_select(0, slots)
        fill = self.state["fill"].index_select(0, slots)
        buffer.scatter_(1, fill.unsqueeze(1) + self.offsets, low)
        fill = fill + self.hop
        full = (fill >= self.WINDOW).nonzero().squeeze(1)
        if full.numel():
            self._run_windows(buffer, slots, full)
            fill.index_add_(0, full, torch.full_like(full, -self.WINDOW))
        self.state["buffer"].index_copy_(0, slots, buffer)
        self.state["fill"].index_copy_(0, slots, fill)
        target = self.state["window_prob"].index_select(0, slots)
        prob = self.state["probability"].index_select(0, slots)
        coef = torch.where(target > prob, self.attack, self.release)
        prob = prob + coef * (target - prob)
        self.state["probability"].index_copy_(0, slots, prob)
        ctx.side["vad"] = prob
        return audio

    def _run_windows(self, buffer: torch.Tensor, slots: torch.Tensor, rows: torch.Tensor) -> None:
        """Run the network on the full windows of ``rows``; shift their leftovers to the front."""
        window_slots = slots.index_select(0, rows)
        windows = buffer.index_select(0, rows)
        context = self.state["context"].index_select(0, window_slots)
        frames = torch.cat([context, windows[:, : self.WINDOW]], dim=1)
        rnn = self.state["rnn"].index_select(0, window_slots).transpose(0, 1).contiguous()
        prob, rnn = self.net(frames, rnn)
        self.state["rnn"].index_copy_(0, window_slots, rnn.transpose(0, 1).contiguous())
        self.state["context"].index_copy_(
            0, window_slots, windows[:, self.WINDOW - self.CONTEXT : self.WINDOW]
        )
        self.state["window_prob"].index_copy_(0, window_slots, prob.reshape(-1).to(torch.float32))
        leftover = torch.zeros_like(windows)
        leftover[:, : self.hop] = windows[:, self.WINDOW :]
        buffer.index_copy_(0, rows, leftover)
