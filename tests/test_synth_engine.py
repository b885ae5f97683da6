"""The eSpeak NG engine in-process: options change what is heard, errors are the documented ones."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from synth.engine import (
    EmptyText,
    InvalidOption,
    InvalidRequest,
    SynthError,
    TextTooLong,
    UnknownVoice,
    VoiceOptions,
)
from synth.espeak import EspeakEngine

TEXT = "The quick brown fox jumps over the lazy dog near the river bank."


@pytest.fixture(scope="module")
def engine() -> EspeakEngine:
    return EspeakEngine()


def median_f0(audio: np.ndarray, rate: int) -> float:
    """Median fundamental frequency (Hz) of the loud, clearly periodic 40 ms frames (autocorrelation)."""
    size = int(0.04 * rate)
    level = float(np.sqrt(np.mean(audio**2)))
    lo, hi = int(rate / 400), int(rate / 60)
    estimates = []
    for start in range(0, len(audio) - size, size // 2):
        frame = audio[start : start + size] - audio[start : start + size].mean()
        if np.sqrt(np.mean(frame**2)) < 0.7 * level:
            continue
        corr = np.correlate(frame, frame, "full")[size - 1 :]
        lag = lo + int(np.argmax(corr[lo:hi]))
        if corr[lag] > 0.4 * corr[0]:
            estimates.append(rate / lag)
    assert len(estimates) > 10, "expected voiced speech"
    return float(np.median(estimates))


def test_default_voice_speaks_at_its_native_rate(engine: EspeakEngine) -> None:
    result = engine.synthesize(TEXT)
    assert result.audio.dtype == np.float32 and result.audio.ndim == 1
    assert result.sample_rate == engine.sample_rate == 22050
    assert result.engine == "espeak" and result.voice == "en-us"
    assert 2.0 < result.duration_s < 6.0
    assert 80 < median_f0(result.audio, result.sample_rate) < 180, "a male-range default voice"


def test_pitch_and_female_variant_raise_the_voice(engine: EspeakEngine) -> None:
    base = median_f0(engine.synthesize(TEXT).audio, engine.sample_rate)
    higher = median_f0(engine.synthesize(TEXT, VoiceOptions(pitch=1.5)).audio, engine.sample_rate)
    lower = median_f0(engine.synthesize(TEXT, VoiceOptions(pitch=0.5)).audio, engine.sample_rate)
    female = median_f0(engine.synthesize(TEXT, VoiceOptions(voice="en-us+f3")).audio, engine.sample_rate)
    assert higher > 1.15 * base
    assert lower < 0.9 * base
    assert female > 1.5 * base


def test_faster_rate_is_shorter(engine: EspeakEngine) -> None:
    durations = [engine.synthesize(TEXT, VoiceOptions(rate=r)).duration_s for r in (0.5, 1.0, 2.0)]
    assert durations[0] > 1.5 * durations[1] > 1.5 * 1.5 * durations[2]


def test_other_languages_sound_different(engine: EspeakEngine) -> None:
    english = engine.synthesize("Bonjour", VoiceOptions(voice="en-us"))
    french = engine.synthesize("Bonjour", VoiceOptions(voice="fr"))
    assert french.voice == "fr"
    assert len(english.audio) != len(french.audio) or not np.allclose(english.audio, french.audio)


def test_ssml_break_and_prosody(engine: EspeakEngine) -> None:
    plain = engine.synthesize("<speak>Please hold connecting you.</speak>", VoiceOptions(ssml=True))
    paused = engine.synthesize(
        '<speak>Please hold <break time="800ms"/> connecting you.</speak>', VoiceOptions(ssml=True)
    )
    slow = engine.synthesize(
        '<speak><prosody rate="x-slow">Please hold connecting you.</prosody></speak>', VoiceOptions(ssml=True)
    )
    assert paused.duration_s - plain.duration_s > 0.6
    assert slow.duration_s > 1.3 * plain.duration_s
    # without the ssml flag the markup is plain text, read out rather than obeyed
    literal = engine.synthesize('Please hold <break time="800ms"/> connecting you.')
    assert literal.duration_s > paused.duration_s + 0.5


def test_voices_come_from_the_bundled_data(engine: EspeakEngine) -> None:
    voices = engine.voices()
    assert len(voices) > 100
    assert {"en-us", "en-gb", "de", "fr", "es", "cmn"} <= set(voices)
    assert {"f3", "m3", "klatt", "whisper"} <= set(engine.variants())


@pytest.mark.parametrize(
    ("text", "options", "error"),
    [
        ("", VoiceOptions(), EmptyText),
        (" \n\t ", VoiceOptions(), EmptyText),
        ("<speak> <break time='1s'/> </speak>", VoiceOptions(ssml=True), EmptyText),
        ("a" * 5001, VoiceOptions(), TextTooLong),
        ("hello", VoiceOptions(voice="xx-yy"), UnknownVoice),
        ("hello", VoiceOptions(voice="en-us+nosuchvariant"), UnknownVoice),
        ("hello", VoiceOptions(rate=0.1), InvalidOption),
        ("hello", VoiceOptions(pitch=3.0), InvalidOption),
    ],
)
def test_bad_requests_raise_typed_errors(
    engine: EspeakEngine, text: str, options: VoiceOptions, error: type[SynthError]
) -> None:
    with pytest.raises(error) as caught:
        engine.synthesize(text, options)
    assert isinstance(caught.value, InvalidRequest) and isinstance(caught.value, SynthError)


def test_max_chars_is_configurable() -> None:
    short_limit = EspeakEngine(max_chars=20)
    with pytest.raises(TextTooLong, match="limit is 20"):
        short_limit.synthesize("This sentence is longer than twenty characters.")
    assert short_limit.synthesize("Twenty or fewer.").duration_s > 0.3
    assert EspeakEngine().max_chars == 5000


def test_concurrent_threads_get_their_own_voice_and_rate(engine: EspeakEngine) -> None:
    """The library is process-global; the engine's lock keeps parallel callers from mixing settings."""
    requests = [
        VoiceOptions(voice="en-us+f3"),
        VoiceOptions(rate=2.0),
        VoiceOptions(),
        VoiceOptions(rate=0.5),
    ]
    expected = [engine.synthesize(TEXT, opts) for opts in requests]
    results: dict[int, np.ndarray] = {}

    def worker(index: int) -> None:
        for _ in range(2):
            results[index] = engine.synthesize(TEXT, requests[index]).audio

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for index, reference in enumerate(expected):
        assert abs(len(results[index]) - len(reference.audio)) < 0.02 * len(reference.audio)
    assert median_f0(results[0], engine.sample_rate) > 1.5 * median_f0(results[2], engine.sample_rate)


def test_a_long_prompt_is_watermarked_a_block_at_a_time_with_the_same_samples() -> None:
    """The mark is shaped on blocks of short-time frames (a 5000-character prompt's whole-prompt spectra
    were 1.4 GiB): the same samples as on whole-prompt spectra, whatever the block size."""
    from synth.watermark import (
        PERIOD,
        RATE,
        WatermarkConfig,
        _embed_whole,
        _resample,
        detect,
        embed,
        mark_signal,
    )

    plain = EspeakEngine()
    plain.watermark = WatermarkConfig(enabled=False)
    native = plain.synthesize(" ".join([TEXT] * 12))
    assert native.duration_s > 30
    config = WatermarkConfig()
    host = native.audio.astype(np.float64)
    n16 = int(np.ceil(host.size * RATE / native.sample_rate)) + PERIOD // 8
    mark = _resample(mark_signal(n16, 0x5A17ED, config.key), RATE, native.sample_rate)[: host.size]
    whole = _embed_whole(host, mark, native.sample_rate, config)
    for block_frames in (333, 4096):
        blocks = embed(native.audio, native.sample_rate, 0x5A17ED, config, block_frames=block_frames)
        assert blocks.dtype == np.float32 and blocks.shape == whole.shape
        assert np.max(np.abs(blocks - whole)) <= 1e-6, block_frames
    assert detect(blocks, native.sample_rate, config).prompt_id == 0x5A17ED
