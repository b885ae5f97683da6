"""Piper, the optional neural engine: a VITS voice exported to ONNX, run with onnxruntime.

A Piper voice is two files the user provides (nothing is downloaded): ``NAME.onnx`` and its config
``NAME.onnx.json`` (sample rate, espeak voice, phoneme-to-id map, inference scales, speakers).

Text becomes audio in three steps, as in the reference implementation:

1. **Phonemes** — the text is cut into clauses at punctuation followed by a space, each clause is turned
   into IPA by ``espeak_TextToPhonemes`` from the same libespeak-ng as the eSpeak engine (under its lock),
   and the clause punctuation is put back (``,`` ``;`` ``:`` add a space; ``.`` ``!`` ``?`` end a
   sentence). Configs with ``phoneme_type: "text"`` use the text's own codepoints instead.
2. **Ids** — each phoneme codepoint (after NFD normalization) is looked up in ``phoneme_id_map``; the
   sequence is ``^`` (BOS), then every phoneme followed by ``_`` (PAD), then ``$`` (EOS).
3. **Audio** — one onnxruntime call per sentence with inputs ``input`` [1, T] int64, ``input_lengths``
   [1] int64, ``scales`` [noise_scale, length_scale, noise_w] float32 and, for multi-speaker voices,
   ``sid`` [1] int64; the output [1, 1, 1, S] float32 is the waveform. Sentences are joined with
   ``sentence_silence_s`` of silence.

Options: ``rate`` divides ``length_scale``; ``voice`` names a speaker of a multi-speaker model (the model
name for single-speaker ones); ``pitch`` other than 1.0 and ``ssml`` are not supported (InvalidOption).
"""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from synth.engine import EngineFailure, InvalidOption, SynthEngine, SynthResult, VoiceOptions
from synth.espeak import ESPEAK_LOCK, EspeakLibrary

PAD, BOS, EOS = "_", "^", "$"
SENTENCE_END = ".!?"
CLAUSE_PUNCTUATION = ".,;:!?"

_CLAUSE_BREAK = re.compile(r"(?<=[.,;:!?])\s+")
_LANGUAGE_FLAG = re.compile(r"\([a-z]{2,3}(?:-[a-z0-9]+)*\)")


@dataclass(frozen=True)
class PiperVoiceConfig:
    """The parts of a Piper ``.onnx.json`` config the engine uses."""

    sample_rate: int
    espeak_voice: str
    phoneme_type: str
    phoneme_id_map: dict[str, list[int]]
    speaker_id_map: dict[str, int]
    num_speakers: int
    noise_scale: float
    length_scale: float
    noise_w: float

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> PiperVoiceConfig:
        inference = config.get("inference", {})
        try:
            return cls(
                sample_rate=int(config["audio"]["sample_rate"]),
                espeak_voice=str(config.get("espeak", {}).get("voice", "en-us")),
                phoneme_type=str(config.get("phoneme_type", "espeak")),
                phoneme_id_map={str(k): [int(i) for i in v] for k, v in config["phoneme_id_map"].items()},
                speaker_id_map={str(k): int(v) for k, v in config.get("speaker_id_map", {}).items()},
                num_speakers=int(config.get("num_speakers", 1)),
                noise_scale=float(inference.get("noise_scale", 0.667)),
                length_scale=float(inference.get("length_scale", 1.0)),
                noise_w=float(inference.get("noise_w", 0.8)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise EngineFailure(f"not a Piper voice config: {exc!r}") from exc


def split_clauses(text: str) -> list[tuple[str, str]]:
    """Cut text at punctuation followed by whitespace: [(clause text, its punctuation or "")]."""
    clauses: list[tuple[str, str]] = []
    for piece in _CLAUSE_BREAK.split(text.strip()):
        body = piece.rstrip(CLAUSE_PUNCTUATION)
        trailing = piece[len(body) :]
        if body.strip() or trailing:
            clauses.append((body.strip(), trailing[-1:] if trailing else ""))
    return clauses


def phonemize_espeak(text: str, espeak_voice: str, library: EspeakLibrary) -> list[list[str]]:
    """IPA phonemes of ``text`` grouped by sentence, each phoneme one (NFD) codepoint."""
    sentences: list[list[str]] = []
    current = ""
    with ESPEAK_LOCK:
        library.set_voice(espeak_voice)
        for body, punctuation in split_clauses(text):
            ipa = " ".join(library.text_to_phonemes(body)) if body else ""
            current += _LANGUAGE_FLAG.sub("", ipa).strip() + punctuation
            if punctuation and punctuation in SENTENCE_END:
                sentences.append(list(unicodedata.normalize("NFD", current)))
                current = ""
            else:
                current += " "
    if current.strip():
        sentences.append(list(unicodedata.normalize("NFD", current.rstrip())))
    return sentences


def phonemize_codepoints(text: str) -> list[list[str]]:
    """For ``phoneme_type: "text"`` voices: the text's own codepoints, one sentence per clause group."""
    return [list(unicodedata.normalize("NFD", text.strip()))]


def phoneme_ids(phonemes: list[str], id_map: dict[str, list[int]]) -> list[int]:
    """BOS, each known phoneme followed by PAD, EOS; phonemes missing from the map are skipped."""
    ids = list(id_map[BOS])
    for phoneme in phonemes:
        if phoneme in id_map:
            ids.extend(id_map[phoneme])
            ids.extend(id_map[PAD])
    ids.extend(id_map[EOS])
    return ids


class PiperEngine(SynthEngine):
    """A Piper voice model: owns the onnxruntime session and the parsed voice config."""

    name = "piper"

    def __init__(
        self,
        model_path: str | Path,
        config_path: str | Path | None = None,
        max_chars: int = 5000,
        providers: list[str] | None = None,
        sentence_silence_s: float = 0.2,
    ) -> None:
        super().__init__(max_chars=max_chars)
        self.model_path = Path(model_path)
        cfg_path = Path(config_path) if config_path is not None else Path(f"{self.model_path}.json")
        if not self.model_path.is_file():
            raise EngineFailure(f"Piper model not found: {self.model_path}")
        if not cfg_path.is_file():
            raise EngineFailure(f"Piper voice config not found: {cfg_path} (expected next to the model)")
        try:
            self.config = PiperVoiceConfig.from_dict(json.loads(cfg_path.read_text(encoding="utf-8")))
        except json.JSONDecodeError as exc:
            raise EngineFailure(f"cannot parse {cfg_path}: {exc}") from exc
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        try:
            self._session = ort.InferenceSession(
                str(self.model_path), sess_options=options, providers=providers or ["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own exception types
            raise EngineFailure(f"cannot load Piper model {self.model_path}: {exc}") from exc
        self._input_names = {i.name for i in self._session.get_inputs()}
        missing = {"input", "input_lengths", "scales"} - self._input_names
        if missing:
            raise EngineFailure(f"{self.model_path} lacks Piper inputs {sorted(missing)}")
        self.sentence_silence_s = sentence_silence_s
        self._library = EspeakLibrary.get() if self.config.phoneme_type == "espeak" else None
        stat = self.model_path.stat()
        self._identity = f"piper:{self.model_path.name}:{stat.st_size}:{stat.st_mtime_ns}"

    @property
    def sample_rate(self) -> int:
        return self.config.sample_rate

    def identity(self) -> str:
        return self._identity

    def voices(self) -> list[str]:
        """Speaker names of a multi-speaker model, else the model's own name."""
        if self.config.speaker_id_map:
            return sorted(self.config.speaker_id_map, key=lambda s: self.config.speaker_id_map[s])
        return [self.model_path.name.removesuffix(".onnx")]

    def default_voice(self) -> str:
        return self.voices()[0]

    def phonemize(self, text: str) -> list[list[str]]:
        if self.config.phoneme_type == "text":
            return phonemize_codepoints(text)
        if self._library is None:
            raise EngineFailure(f"unsupported phoneme_type {self.config.phoneme_type!r}")
        return phonemize_espeak(text, self.config.espeak_voice, self._library)

    def _run(self, ids: list[int], length_scale: float, speaker: int | None) -> np.ndarray:
        feeds: dict[str, np.ndarray] = {
            "input": np.asarray([ids], dtype=np.int64),
            "input_lengths": np.asarray([len(ids)], dtype=np.int64),
            "scales": np.asarray(
                [self.config.noise_scale, length_scale, self.config.noise_w], dtype=np.float32
            ),
        }
        if speaker is not None and "sid" in self._input_names:
            feeds["sid"] = np.asarray([speaker], dtype=np.int64)
        output = self._session.run(None, feeds)[0]
        return np.asarray(output, dtype=np.float32).reshape(-1)

    def _synthesize(self, text: str, voice: str, options: VoiceOptions) -> SynthResult:
        if options.ssml:
            raise InvalidOption("the Piper engine does not support SSML")
        if options.pitch != 1.0:
            raise InvalidOption("the Piper engine does not support pitch changes")
        speaker = self.config.speaker_id_map.get(voice) if self.config.num_speakers > 1 else None
        length_scale = self.config.length_scale / options.rate
        silence = np.zeros(round(self.sentence_silence_s * self.sample_rate), dtype=np.float32)
        pieces: list[np.ndarray] = []
        for sentence in self.phonemize(text):
            ids = phoneme_ids(sentence, self.config.phoneme_id_map)
            if pieces:
                pieces.append(silence)
            pieces.append(self._run(ids, length_scale, speaker))
        audio = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.float32)
        return SynthResult(
            audio=np.clip(audio, -1.0, 1.0), sample_rate=self.sample_rate, engine=self.name, voice=voice
        )
