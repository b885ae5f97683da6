"""Text-to-speech for spoken prompts in rooms and phone menus.

Engines (:class:`SynthEngine`): :class:`~synth.espeak.EspeakEngine` (embedded default, eSpeak NG from
the espeakng-loader wheel) and :class:`~synth.piper.PiperEngine` (a user-provided Piper ONNX voice).
The server uses :class:`~synth.service.SynthService`, which caches prompts and returns 48 kHz audio; the
media server runs it with ``isolation="process"``: synthesis in a process of its own
(:mod:`synth.process`), the audio handed back as 16-bit samples in a shared mapping.
"""

from synth.cache import PromptCache, cache_key, default_cache_dir
from synth.engine import (
    DEFAULT_MAX_CHARS,
    EmptyText,
    EngineFailure,
    InvalidOption,
    InvalidRequest,
    SynthEngine,
    SynthError,
    SynthResult,
    TextTooLong,
    UnknownVoice,
    VoiceOptions,
)
from synth.service import OUTPUT_RATE, SynthService

__all__ = [
    "DEFAULT_MAX_CHARS",
    "OUTPUT_RATE",
    "EmptyText",
    "EngineFailure",
    "InvalidOption",
    "InvalidRequest",
    "PromptCache",
    "SynthEngine",
    "SynthError",
    "SynthResult",
    "SynthService",
    "TextTooLong",
    "UnknownVoice",
    "VoiceOptions",
    "cache_key",
    "default_cache_dir",
]
