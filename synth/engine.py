"""The text-to-speech engine interface: options, results, errors and the engine base class.

Every engine turns text into float32 mono PCM at its own native sample rate; the
:class:`~synth.service.SynthService` resamples to the server's 48 kHz format.

Options are engine-neutral:

* ``rate`` is a *relative speaking-rate factor*: 1.0 is the engine's normal speed, 2.0 speaks twice as
  fast (half the duration), 0.5 half as fast. Allowed range: ``RATE_RANGE`` (0.5 .. 2.5). eSpeak NG maps
  it to words per minute (175 wpm x rate); Piper divides its ``length_scale`` by it.
* ``pitch`` is a *relative base-pitch factor*: 1.0 is the voice's normal pitch. Allowed range:
  ``PITCH_RANGE`` (0.0 .. 2.0). eSpeak NG maps it to its 0..100 pitch parameter (50 x pitch).
* ``ssml`` marks the text as SSML markup (``<speak>``, ``<break time="500ms"/>``, ``<prosody>``, ...).
* ``voice`` is an engine voice name (see ``engine.voices()``); ``None`` picks the engine default.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from synth.watermark import WatermarkConfig, embed, prompt_id_for

DEFAULT_MAX_CHARS = 5000
RATE_RANGE = (0.5, 2.5)
PITCH_RANGE = (0.0, 2.0)

_TAG = re.compile(r"<[^>]*>")


class SynthError(Exception):
    """Base class of every error raised by the synth package."""


class InvalidRequest(SynthError):
    """The request itself is wrong (the caller can fix it); the CLI exits with code 2."""


class EmptyText(InvalidRequest):
    """The text has nothing to speak (blank, or SSML without any text)."""


class TextTooLong(InvalidRequest):
    """The text is longer than the engine's configured ``max_chars``."""

    def __init__(self, length: int, max_chars: int) -> None:
        super().__init__(f"text is {length} characters long; the limit is {max_chars}")
        self.length = length
        self.max_chars = max_chars


class UnknownVoice(InvalidRequest):
    """The requested voice is not one the engine has."""

    def __init__(self, voice: str, engine: str) -> None:
        super().__init__(f"unknown voice {voice!r} for engine {engine!r} (list them with `synth voices`)")
        self.voice = voice
        self.engine = engine


class InvalidOption(InvalidRequest):
    """An option is out of range or not supported by the engine (e.g. SSML on Piper)."""


class EngineFailure(SynthError):
    """The engine itself failed (library missing, model not loadable, native error code)."""


@dataclass(frozen=True)
class VoiceOptions:
    """How to speak: voice name, relative rate and pitch factors, and whether the text is SSML."""

    voice: str | None = None
    rate: float = 1.0
    pitch: float = 1.0
    ssml: bool = False

    def validate(self) -> None:
        """Raise :class:`InvalidOption` when rate or pitch is outside the documented ranges."""
        lo, hi = RATE_RANGE
        if not lo <= self.rate <= hi:
            raise InvalidOption(f"rate {self.rate} is outside [{lo}, {hi}] (1.0 = normal speed)")
        lo, hi = PITCH_RANGE
        if not lo <= self.pitch <= hi:
            raise InvalidOption(f"pitch {self.pitch} is outside [{lo}, {hi}] (1.0 = normal pitch)")


@dataclass
class SynthResult:
    """One synthesized utterance: float32 mono PCM, its sample rate, and where it came from."""

    audio: np.ndarray
    sample_rate: int
    engine: str
    voice: str
    cache_hit: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def duration_s(self) -> float:
        return float(len(self.audio)) / float(self.sample_rate)

    def metadata(self) -> dict[str, Any]:
        """Metadata for the server/telemetry; ``synthetic`` marks audio as machine-generated speech."""
        return {
            "engine": self.engine,
            "voice": self.voice,
            "sample_rate": self.sample_rate,
            "duration_s": round(self.duration_s, 4),
            "cache_hit": self.cache_hit,
            "synthetic": True,
            **self.extra,
        }


def spoken_text(text: str, ssml: bool) -> str:
    """The part of ``text`` that would be spoken: the text itself, or SSML with its tags removed."""
    return _TAG.sub(" ", text).strip() if ssml else text.strip()


class SynthEngine(ABC):
    """A text-to-speech engine: owns its native resources (library handle, model session).

    Subclasses implement :meth:`voices`, :meth:`default_voice` and :meth:`_synthesize`; the public
    :meth:`synthesize` validates the request first, so every engine raises the same errors.
    """

    #: short engine id used in cache keys and metadata ("espeak", "piper")
    name: str = "engine"

    def __init__(self, max_chars: int = DEFAULT_MAX_CHARS, watermark: WatermarkConfig | None = None) -> None:
        if max_chars <= 0:
            raise ValueError("max_chars must be positive")
        self.max_chars = max_chars
        #: provenance mark added to every result (synth.watermark); the default key is the public dev key
        self.watermark = watermark if watermark is not None else WatermarkConfig()

    @abstractmethod
    def voices(self) -> list[str]:
        """Names accepted as ``VoiceOptions.voice``."""

    @abstractmethod
    def default_voice(self) -> str:
        """The voice used when ``VoiceOptions.voice`` is None."""

    @abstractmethod
    def _synthesize(self, text: str, voice: str, options: VoiceOptions) -> SynthResult:
        """Synthesize already-validated text with a resolved voice name."""

    def is_known_voice(self, voice: str) -> bool:
        return voice in self.voices()

    def identity(self) -> str:
        """A string that changes whenever the same request could sound different (used in cache keys)."""
        return self.name

    def resolve_voice(self, options: VoiceOptions) -> str:
        voice = options.voice if options.voice is not None else self.default_voice()
        if not self.is_known_voice(voice):
            raise UnknownVoice(voice, self.name)
        return voice

    def validate(self, text: str, options: VoiceOptions) -> str:
        """Check text and options; return the resolved voice name or raise an :class:`InvalidRequest`."""
        if len(text) > self.max_chars:
            raise TextTooLong(len(text), self.max_chars)
        if not spoken_text(text, options.ssml):
            raise EmptyText(
                "nothing to speak: the text is empty"
                + (" (after removing SSML tags)" if options.ssml else "")
            )
        options.validate()
        return self.resolve_voice(options)

    def synthesize(self, text: str, options: VoiceOptions | None = None) -> SynthResult:
        """Speak ``text``: float32 mono PCM at the engine's native rate."""
        opts = options if options is not None else VoiceOptions()
        voice = self.validate(text, opts)
        result = self._synthesize(text, voice, opts)
        if self.watermark.enabled:
            prompt_id = prompt_id_for(f"{self.identity()}|{voice}|{opts}|{text}")
            result.audio = embed(result.audio, result.sample_rate, prompt_id, self.watermark)
            result.extra = {**result.extra, "watermark_id": f"{prompt_id:06x}",
                            "watermark_key_id": self.watermark.key_id()}
        return result
