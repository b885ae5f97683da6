"""Provenance watermark: real eSpeak prompts keep their id through Opus 32k and G.711; real speech does not."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from scipy.signal import resample_poly

from bench.watermark import g711_round_trip, opus_round_trip
from signaling.sip.g711 import PCMA, PCMU
from synth.cli import main
from synth.espeak import EspeakEngine
from synth.service import resample_to
from synth.watermark import WatermarkConfig, detect

SPEECH = Path(__file__).resolve().parents[2] / "shared" / "eval" / "speech"
TEXT = ("Welcome to the meeting. The recording has started and every participant "
        "is now being recorded for the minutes.")


@pytest.fixture(scope="module")
def prompt() -> tuple[np.ndarray, str]:
    result = EspeakEngine().synthesize(TEXT)
    assert result.metadata()["synthetic"] is True
    audio = resample_to(result.audio, result.sample_rate, 48_000)
    return audio / np.max(np.abs(audio)) * 0.7, str(result.extra["watermark_id"])


def excerpts(audio: np.ndarray, n: int = 5) -> list[np.ndarray]:
    starts = np.linspace(0, len(audio) - 3 * 48_000, n).astype(int)
    return [audio[s : s + 3 * 48_000] for s in starts]


@pytest.mark.parametrize("channel", ["none", "opus32k", "pcmu", "pcma"])
def test_prompt_id_survives_codecs(prompt: tuple[np.ndarray, str], channel: str) -> None:
    audio, prompt_id = prompt
    heard = {
        "none": lambda a: a,
        "opus32k": opus_round_trip,
        "pcmu": lambda a: g711_round_trip(a, PCMU),
        "pcma": lambda a: g711_round_trip(a, PCMA),
    }[channel](audio)
    for piece in excerpts(heard):
        found = detect(piece, 48_000)
        assert found.watermarked and found.as_dict()["prompt_id"] == prompt_id


def test_wrong_key_finds_nothing(prompt: tuple[np.ndarray, str]) -> None:
    assert not detect(prompt[0], 48_000, WatermarkConfig(key="another-server")).watermarked


def test_real_speech_is_not_marked() -> None:
    for path in sorted(SPEECH.glob("*.wav")):
        audio, rate = sf.read(str(path), dtype="float64")
        assert not detect(audio, rate).watermarked, path.name


def test_detect_cli(prompt: tuple[np.ndarray, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    wav = tmp_path / "room.wav"
    sf.write(str(wav), resample_poly(prompt[0], 1, 3), 16_000, subtype="PCM_16")
    assert main(["detect", str(wav)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["watermarked"] is True and out["prompt_id"] == prompt[1] and out["windows_found"]
    assert main(["detect", str(wav), "--key", "other"]) == 0
    assert json.loads(capsys.readouterr().out)["watermarked"] is False
