"""The Piper engine: loading, eSpeak phonemization, id mapping and the onnxruntime call.

No Piper voice ships with any installed package, so the plumbing is checked against a tiny ONNX model
built here with Piper's exact input/output signature (a lookup-table "vocoder" whose output length
follows the phoneme count and ``length_scale``). A real voice is exercised when ``SYNTH_PIPER_MODEL``
points at one (``NAME.onnx`` with ``NAME.onnx.json`` beside it); otherwise that test is skipped.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from synth.engine import InvalidOption, UnknownVoice, VoiceOptions
from synth.piper import BOS, EOS, PAD, PiperEngine, phoneme_ids, split_clauses
from synth.watermark import WatermarkConfig

RATE = 16000
FRAME = 64  # samples per phoneme id per unit of length_scale/2
IPA = "ɐɑɒæɓβɔɕçðʤəɘɚɛɜɝɟɡɣɦħɥɨɪʝɭɬɫʟɱɯɰŋɳɲøɵɸθœɹɾɻʁʂʃʈʧʉʊʋʌʍχʎʏʒʔˈˌːʰʲʷ̩̃ᵻ"
SYMBOLS = [PAD, BOS, EOS, " ", *"!'(),-.:;?", *"abcdefghijklmnopqrstuvwxyz", *IPA]


def build_toy_voice(folder: Path, speakers: list[str] | None = None) -> Path:
    """Write toy.onnx + toy.onnx.json with Piper's inputs (input, input_lengths, scales[, sid])."""
    table = np.stack(
        [0.3 * np.sin(2 * np.pi * (150 + 10 * i) * np.arange(FRAME) / RATE) for i in range(len(SYMBOLS))]
    ).astype(np.float32)
    nodes = [
        helper.make_node("Gather", ["table", "input"], ["frames"], axis=0),
        helper.make_node("Gather", ["scales", "one_index"], ["length_scale"], axis=0),
        helper.make_node("Mul", ["length_scale", "two"], ["double"]),
        helper.make_node("Ceil", ["double"], ["ceiled"]),
        helper.make_node("Cast", ["ceiled"], ["repeat"], to=TensorProto.INT64),
        helper.make_node("Concat", ["ones", "repeat"], ["repeats"], axis=0),
        helper.make_node("Tile", ["frames", "repeats"], ["tiled"]),
        helper.make_node("Reshape", ["tiled", "out_shape"], ["wave"]),
    ]
    inputs = [
        helper.make_tensor_value_info("input", TensorProto.INT64, [1, "T"]),
        helper.make_tensor_value_info("input_lengths", TensorProto.INT64, [1]),
        helper.make_tensor_value_info("scales", TensorProto.FLOAT, [3]),
    ]
    if speakers:  # each speaker id shifts the waveform by 0.1, so the test can see which was used
        inputs.append(helper.make_tensor_value_info("sid", TensorProto.INT64, [1]))
        nodes += [
            helper.make_node("Cast", ["sid"], ["sid_f"], to=TensorProto.FLOAT),
            helper.make_node("Mul", ["sid_f", "tenth"], ["offset"]),
            helper.make_node("Add", ["wave", "offset"], ["output"]),
        ]
    else:
        nodes.append(helper.make_node("Identity", ["wave"], ["output"]))
    initializers = [
        numpy_helper.from_array(table, "table"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "one_index"),
        numpy_helper.from_array(np.array(2.0, dtype=np.float32), "two"),
        numpy_helper.from_array(np.array(0.1, dtype=np.float32), "tenth"),
        numpy_helper.from_array(np.array([1, 1], dtype=np.int64), "ones"),
        numpy_helper.from_array(np.array([1, 1, 1, -1], dtype=np.int64), "out_shape"),
    ]
    outputs = [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 1, 1, "S"])]
    graph = helper.make_graph(nodes, "toy_piper", inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path = folder / "toy.onnx"
    onnx.save(model, str(path))
    config = {
        "audio": {"sample_rate": RATE},
        "espeak": {"voice": "en-us"},
        "phoneme_type": "espeak",
        "inference": {"noise_scale": 0.667, "length_scale": 1.0, "noise_w": 0.8},
        "num_speakers": len(speakers) if speakers else 1,
        "speaker_id_map": {name: i for i, name in enumerate(speakers or [])},
        "phoneme_id_map": {symbol: [i] for i, symbol in enumerate(SYMBOLS)},
    }
    Path(f"{path}.json").write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def toy_voice(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_toy_voice(tmp_path_factory.mktemp("piper"))


def test_clauses_keep_their_punctuation() -> None:
    assert split_clauses("Hello there, it costs 3.50 today. Bye!") == [
        ("Hello there", ","),
        ("it costs 3.50 today", "."),
        ("Bye", "!"),
    ]


def test_phonemes_are_ipa_sentences_from_espeak(toy_voice: Path) -> None:
    engine = PiperEngine(toy_voice)
    sentences = engine.phonemize("Hello world, how are you? Fine.")
    assert len(sentences) == 2
    first = "".join(sentences[0])
    assert first.startswith("həlˈoʊ wˈɜːld, ") and first.endswith("?")
    assert "".join(sentences[1]) == "fˈaɪn."
    ids = phoneme_ids(sentences[0], engine.config.phoneme_id_map)
    assert ids[0] == SYMBOLS.index(BOS) and ids[-1] == SYMBOLS.index(EOS)
    assert ids[2:-1:2] == [SYMBOLS.index(PAD)] * len(sentences[0]), "PAD after every phoneme"
    assert len(ids) == 2 * len(sentences[0]) + 2, "every phoneme is in the voice's id map"


def test_toy_voice_output_follows_phonemes_and_rate(toy_voice: Path) -> None:
    engine = PiperEngine(toy_voice, sentence_silence_s=0.1)
    assert engine.voices() == ["toy"] and engine.sample_rate == RATE
    text = "Hello world. How are you?"
    result = engine.synthesize(text)
    counts = [len(phoneme_ids(s, engine.config.phoneme_id_map)) for s in engine.phonemize(text)]
    silence = int(0.1 * RATE)
    assert result.sample_rate == RATE and result.audio.dtype == np.float32
    assert len(result.audio) == sum(counts) * FRAME * 2 + silence * (len(counts) - 1)
    fast = engine.synthesize(text, VoiceOptions(rate=2.0))
    assert len(fast.audio) == sum(counts) * FRAME + silence * (len(counts) - 1), "length_scale halved"
    with pytest.raises(InvalidOption):
        engine.synthesize("<speak>Hi</speak>", VoiceOptions(ssml=True))
    with pytest.raises(InvalidOption):
        engine.synthesize("Hi", VoiceOptions(pitch=1.2))
    with pytest.raises(UnknownVoice):
        engine.synthesize("Hi", VoiceOptions(voice="someone"))


def test_multi_speaker_voice_feeds_the_speaker_id(tmp_path: Path) -> None:
    engine = PiperEngine(build_toy_voice(tmp_path, speakers=["alice", "bob"]))
    engine.watermark = WatermarkConfig(enabled=False)  # compares raw samples; the mark differs per prompt
    assert engine.voices() == ["alice", "bob"] and engine.default_voice() == "alice"
    alice = engine.synthesize("Good morning.", VoiceOptions(voice="alice"))
    bob = engine.synthesize("Good morning.", VoiceOptions(voice="bob"))
    assert bob.voice == "bob" and len(alice.audio) == len(bob.audio)
    assert np.allclose(bob.audio - alice.audio, 0.1, atol=1e-5)


@pytest.mark.skipif(
    not os.environ.get("SYNTH_PIPER_MODEL") or not Path(os.environ["SYNTH_PIPER_MODEL"]).is_file(),
    reason="no Piper voice: set SYNTH_PIPER_MODEL=/path/to/voice.onnx (with voice.onnx.json beside it)",
)
def test_real_piper_voice_speaks() -> None:
    engine = PiperEngine(os.environ["SYNTH_PIPER_MODEL"])
    short = engine.synthesize("Welcome.")
    long = engine.synthesize("Welcome to the weekly planning meeting. Your microphone is muted.")
    assert long.duration_s > 3 * short.duration_s
    assert float(np.sqrt(np.mean(long.audio**2))) > 0.01
    fast = engine.synthesize("Your microphone is muted.", VoiceOptions(rate=1.5))
    normal = engine.synthesize("Your microphone is muted.")
    assert fast.duration_s < normal.duration_s
