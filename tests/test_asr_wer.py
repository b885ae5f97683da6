"""Intelligibility check: WER arithmetic, Whisper tiny.en on real speech, enhancement vs input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from enhancers.audio_io import read_48k
from enhancers.eval import asr
from enhancers.eval.wer import TRANSCRIPTS

DATA = Path(__file__).resolve().parents[2] / "shared" / "eval"
needs_data = pytest.mark.skipif(not (DATA / "speech").is_dir(), reason="shared/eval not present")


def test_wer_unit_cases() -> None:
    assert asr.word_error_rate("the cat sat", "the cat sat") == 0.0
    assert asr.word_error_rate("The cat, sat!", "the cat sat") == 0.0  # case and punctuation
    assert asr.word_error_rate("the cat", "the cat sat") == pytest.approx(1 / 3)  # deletion
    assert asr.word_error_rate("the black cat sat", "the cat sat") == pytest.approx(1 / 3)  # insertion
    assert asr.word_error_rate("the dog sat", "the cat sat") == pytest.approx(1 / 3)  # substitution
    assert asr.word_error_rate("", "the cat sat") == 1.0
    assert asr.word_error_rate("a b c d e f", "x") == 6.0  # insertions may exceed 1
    assert asr.word_error_rate("", "") == 0.0
    assert asr.word_error_rate("words", "") == 1.0
    assert asr.normalize("For the 20th time, Tom's well-known") == ["for", "the", "20th", "time", "tom's", "well",
                                                                     "known"]
    assert asr.edit_distance(["a", "b", "c"], ["c", "b", "a"]) == 2


def test_intelligibility_sli_is_off_by_default() -> None:
    cfg = asr.IntelligibilityConfig()
    assert cfg.enabled is False
    x = np.zeros(48_000, dtype=np.float32)
    assert asr.intelligibility_wer(x, x, config=cfg) is None
    with pytest.raises(AttributeError):
        cfg.enabled = True  # type: ignore[misc]  # frozen


@needs_data
def test_asr_on_clean_recordings_matches_the_published_sentences() -> None:
    names = ["cmu_arctic_a0010", "cmu_arctic_us_aew_a0001", "vctk_p286_011_48k"]
    errors = words = 0
    for name in names:
        text = asr.transcribe(read_48k(DATA / "speech" / f"{name}.wav"))
        ref = TRANSCRIPTS[name]
        errors += asr.edit_distance(asr.normalize(text), asr.normalize(ref))
        words += len(asr.normalize(ref))
    assert words > 30
    assert errors / words <= 0.2, f"pooled WER {errors / words:.2f}"


@needs_data
def test_denoised_babble_speech_is_not_less_intelligible_than_the_input() -> None:
    from enhancers.denoise.streaming import run_streams
    from enhancers.registry import create_stage

    noisy = read_48k(DATA / "noisy" / "pesq_speech_babble_0dB.wav")
    clean = read_48k(DATA / "noisy" / "pesq_speech_clean.wav")
    n = min(len(noisy), len(clean))
    reference = asr.transcribe(clean[:n])
    assert len(asr.normalize(reference)) >= 5
    (enhanced,) = run_streams(create_stage("denoise:rnnoise"), [noisy[:n]])
    wer_noisy = asr.word_error_rate(asr.transcribe(noisy[:n]), reference)
    wer_enhanced = asr.word_error_rate(asr.transcribe(enhanced), reference)
    assert wer_enhanced <= wer_noisy + 0.15, (wer_enhanced, wer_noisy)
    # the sampled SLI on the same pair: after against before
    sli = asr.intelligibility_wer(noisy[:n], enhanced, config=asr.IntelligibilityConfig(enabled=True))
    assert sli is None or sli["wer"] >= 0.0


@needs_data
def test_model_loads_with_the_network_unreachable(tmp_path: Path) -> None:
    """Nothing is fetched: with every proxy pointing at a closed port and an empty HF cache, it still works."""
    env = dict(os.environ, HTTPS_PROXY="http://127.0.0.1:9", HTTP_PROXY="http://127.0.0.1:9",
               HF_HOME=str(tmp_path / "hf"), NO_PROXY="")
    env.pop("HF_HUB_OFFLINE", None)
    code = (
        "import json, sys; from enhancers.audio_io import read_48k; from enhancers.eval import asr;"
        f"print(json.dumps(asr.transcribe(read_48k({str(DATA / 'speech' / 'xmas_44k.wav')!r}))))"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-2000:]
    words = asr.normalize(json.loads(out.stdout.strip().splitlines()[-1]))
    assert {"merry", "christmas"} <= set(words)
    assert not (tmp_path / "hf").exists() or not any((tmp_path / "hf").rglob("*.bin"))
