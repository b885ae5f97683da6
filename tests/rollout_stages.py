"""A deliberately worse candidate for the rollout tests: a "denoiser" that adds noise.

``NoisyDenoiser`` adds white noise at -26 dBFS (RMS 0.05) to every chunk: what a broken model, a
bad export or a wrong sample rate can do to a call.  DNSMOS BAK and OVRL fall well below the
input's, so the OVRL gain of the rollout's candidate arm goes negative.  Registered by the tests with
``monkeypatch.setitem(registry.STAGES, "denoise:noisy", "tests.rollout_stages:NoisyDenoiser")`` (the
executor sends the class path to its worker process).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from enhancers.stage import BatchContext, Stage, StageStream

NOISE_RMS = 0.05


class NoisyDenoiser(Stage):
    name = "denoise"

    def __init__(self, device: str | torch.device = "cpu") -> None:
        super().__init__(device)
        self._gen = torch.Generator().manual_seed(18)

    def process(self, audio: torch.Tensor, streams: Sequence[StageStream], ctx: BatchContext) -> torch.Tensor:
        noise = torch.randn(audio.shape, generator=self._gen) * NOISE_RMS
        return audio + noise.to(audio.device, audio.dtype)
