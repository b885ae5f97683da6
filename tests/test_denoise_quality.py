"""Quality ordering on short real mixes: DF3 beats the unprocessed input and RNNoise.

Two mixes, through each stage's streaming path: the recorded babble mix
(``noisy/pesq_speech_babble_0dB.wav``, real babble added to real speech, with
its clean source) and clean VCTK speech plus a real kitchen recording at 5 dB
SNR.  Wideband PESQ on both; DNSMOS (P.835 OVRL) on the babble recording.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from enhancers.audio_io import read_48k
from enhancers.denoise.df3 import DeepFilterNet3Stage
from enhancers.denoise.nsnet2 import NSNet2Stage
from enhancers.denoise.rnnoise import RNNoiseStage
from enhancers.denoise.streaming import run_streams
from enhancers.eval.metrics import dnsmos, pesq_wb

EVAL = Path(__file__).resolve().parents[1].parent / "shared" / "eval"
SR = 48_000


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


Mixes = dict[str, dict[str, np.ndarray]]


@pytest.fixture(scope="module")
def mixes() -> Mixes:
    babble_noisy = read_48k(EVAL / "noisy" / "pesq_speech_babble_0dB.wav")
    babble_clean = read_48k(EVAL / "noisy" / "pesq_speech_clean.wav")[: len(babble_noisy)]
    clean = read_48k(EVAL / "speech" / "vctk_p286_011_48k.wav")[: 4 * SR]
    noise = read_48k(EVAL / "noise" / "doing_the_dishes.wav")[5 * SR : 5 * SR + len(clean)]
    noise = noise * np.sqrt(np.mean(clean**2) / np.mean(noise**2) / 10 ** (5.0 / 10))
    pairs = {"babble": (babble_noisy, babble_clean), "kitchen": ((clean + noise).astype(np.float32), clean)}
    stages = {"df3": DeepFilterNet3Stage(native_streams=0), "nsnet2": NSNet2Stage(), "rnnoise": RNNoiseStage()}
    out: Mixes = {name: {"clean": c, "noisy": n} for name, (n, c) in pairs.items()}
    for key, stage in stages.items():  # both mixes as two streams of one batch
        for name, y in zip(pairs, run_streams(stage, [n for n, _ in pairs.values()])):
            out[name][key] = y
    return out


@pytest.mark.parametrize("mix", ["babble", "kitchen"])
def test_pesq_order(mixes: Mixes, mix: str) -> None:
    m = mixes[mix]
    pesq = {k: pesq_wb(m[k], m["clean"], SR) for k in ("noisy", "df3", "nsnet2", "rnnoise")}
    assert pesq["df3"] > pesq["noisy"] + 0.1
    assert pesq["df3"] > pesq["rnnoise"]
    assert pesq["df3"] > pesq["nsnet2"]
    assert pesq["nsnet2"] > pesq["noisy"]


def test_dnsmos_order_on_recorded_babble(mixes: Mixes) -> None:
    m = mixes["babble"]
    ovrl = {k: dnsmos(m[k], SR)["ovrl"] for k in ("noisy", "df3", "rnnoise")}
    assert ovrl["df3"] > ovrl["noisy"] + 0.5
    assert ovrl["df3"] > ovrl["rnnoise"]
