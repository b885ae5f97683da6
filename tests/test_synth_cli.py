"""`synth say` / `synth voices` through the installed console script: WAVs that contain speech."""

from __future__ import annotations

import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import webrtcvad
from scipy.signal import resample_poly

SYNTH = Path(sys.executable).parent / "synth"

SHORT = "Welcome."
LONG = "Welcome to the weekly planning meeting. Your microphone is muted; press star six to unmute."


def run_synth(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(SYNTH), *args], check=False, capture_output=True, text=True, timeout=60)


def say(tmp_path: Path, name: str, text: str, *options: str) -> tuple[np.ndarray, int]:
    out = tmp_path / f"{name}.wav"
    done = run_synth("say", text, str(out), *options)
    assert done.returncode == 0, done.stderr
    audio, rate = sf.read(str(out), dtype="float32")
    assert audio.ndim == 1, "prompts are mono"
    return audio, int(rate)


def speech_band_fraction(audio: np.ndarray, rate: int) -> float:
    """Share of the signal energy between 100 Hz and 4 kHz, where speech lives."""
    spectrum = np.abs(np.fft.rfft(audio)) ** 2
    freqs = np.fft.rfftfreq(len(audio), 1.0 / rate)
    band = (freqs >= 100) & (freqs <= 4000)
    return float(spectrum[band].sum() / spectrum.sum())


def voiced_fraction(audio: np.ndarray, rate: int) -> float:
    """Share of 30 ms frames that WebRTC's voice activity detector calls speech."""
    ratio = Fraction(16000, rate)
    x16 = resample_poly(audio, ratio.numerator, ratio.denominator)
    pcm = (np.clip(x16, -1, 1) * 32767).astype(np.int16)
    vad = webrtcvad.Vad(2)
    frame = 480
    flags = [vad.is_speech(pcm[i : i + frame].tobytes(), 16000) for i in range(0, len(pcm) - frame, frame)]
    return float(np.mean(flags))


def test_say_writes_speech_that_grows_with_the_text(tmp_path: Path) -> None:
    short, rate = say(tmp_path, "short", SHORT)
    long, rate_long = say(tmp_path, "long", LONG)
    assert rate == rate_long == 22050
    assert 0.3 < len(short) / rate < 2.0
    assert len(long) > 5 * len(short), "a sentence ten times longer must take several times as long"
    rms = float(np.sqrt(np.mean(long**2)))
    assert rms > 0.02, "not silent"
    assert np.max(np.abs(long)) < 1.0, "not clipped"
    assert speech_band_fraction(long, rate) > 0.85
    assert voiced_fraction(long, rate) > 0.6, "a voice activity detector hears speech"


def test_rate_voice_and_sample_rate_options(tmp_path: Path) -> None:
    normal, rate = say(tmp_path, "normal", LONG)
    fast, _ = say(tmp_path, "fast", LONG, "--rate", "2.0")
    assert len(fast) < 0.7 * len(normal)
    german, _ = say(tmp_path, "german", "Guten Morgen, willkommen im Meeting.", "--voice", "de")
    assert voiced_fraction(german, rate) > 0.5
    hd, hd_rate = say(tmp_path, "hd", SHORT, "--sample-rate", "48000")
    assert hd_rate == 48000
    assert abs(len(hd) / hd_rate - len(say(tmp_path, "sd", SHORT)[0]) / rate) < 0.05


def test_ssml_break_adds_a_pause(tmp_path: Path) -> None:
    plain, rate = say(tmp_path, "plain", "<speak>Please hold. Connecting you now.</speak>", "--ssml")
    paused, _ = say(
        tmp_path, "paused", '<speak>Please hold. <break time="1500ms"/> Connecting you now.</speak>', "--ssml"
    )
    assert len(paused) - len(plain) > 1.0 * rate
    assert voiced_fraction(paused, rate) > 0.3


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["   "], "empty"),
        (["hello there", "--max-chars", "5"], "limit is 5"),
        (["x" * 5001], "limit is 5000"),
        (["hello", "--voice", "xx-nowhere"], "unknown voice"),
        (["hello", "--voice", "en-us+nosuchvariant"], "unknown voice"),
        (["hello", "--rate", "10"], "rate"),
        (["hello", "--engine", "piper"], "--model"),
    ],
)
def test_bad_requests_exit_2_with_a_clear_message(tmp_path: Path, args: list[str], message: str) -> None:
    out = tmp_path / "never.wav"
    done = run_synth("say", args[0], str(out), *args[1:])
    assert done.returncode == 2
    assert message in done.stderr
    assert not out.exists()


def test_voices_lists_languages_and_variants() -> None:
    done = run_synth("voices")
    assert done.returncode == 0
    names = done.stdout.split()
    assert {"en-us", "en-gb", "de", "fr", "es"} <= set(names)
    variants = run_synth("voices", "--variants")
    assert variants.returncode == 0 and "f3" in variants.stdout.split()
