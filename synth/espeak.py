"""eSpeak NG, the embedded default engine, driven through ctypes.

The shared library and its voice data come from the ``espeakng-loader`` wheel
(``espeakng_loader.get_library_path()`` / ``get_data_path()``), so nothing has to be installed on the
system. libespeak-ng keeps all of its state in process globals (one voice, one parameter set, one
callback), so :class:`EspeakLibrary` is a per-process singleton and every call into it holds
:data:`ESPEAK_LOCK`. The Piper engine uses the same library (and lock) for phonemization.

Synthesis runs in ``AUDIO_OUTPUT_SYNCHRONOUS`` mode: ``espeak_Synth`` returns only after the whole text is
spoken, and the samples arrive through the synth callback as 16-bit PCM at 22.05 kHz.
"""

from __future__ import annotations

import ctypes
import os
import threading
from pathlib import Path

import numpy as np

from synth.engine import EngineFailure, SynthEngine, SynthResult, UnknownVoice, VoiceOptions

# speak_lib.h constants
AUDIO_OUTPUT_SYNCHRONOUS = 2
ESPEAK_INITIALIZE_DONT_EXIT = 0x8000  # return an error instead of calling exit() when data is missing
POS_CHARACTER = 1
ESPEAK_CHARS_UTF8 = 0x01
ESPEAK_SSML = 0x10
ESPEAK_PHONEMES_IPA = 0x02
ESPEAK_RATE = 1
ESPEAK_PITCH = 3
EE_OK = 0
EE_NOT_FOUND = 2

NORMAL_RATE_WPM = 175  # espeakRATE_NORMAL
MIN_RATE_WPM, MAX_RATE_WPM = 80, 450  # espeakRATE_MINIMUM / espeakRATE_MAXIMUM
NORMAL_PITCH = 50  # eSpeak's pitch parameter runs 0..100
DEFAULT_VOICE = "en-us"

#: Serializes every call into libespeak-ng in this process (it is not thread-safe).
ESPEAK_LOCK = threading.RLock()

_SynthCallback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


class _EspeakVoice(ctypes.Structure):
    """espeak_VOICE from speak_lib.h (``languages`` is a packed list, parsed by hand)."""

    _fields_ = [
        ("name", ctypes.c_char_p),
        ("languages", ctypes.c_void_p),
        ("identifier", ctypes.c_char_p),
        ("gender", ctypes.c_ubyte),
        ("age", ctypes.c_ubyte),
        ("variant", ctypes.c_ubyte),
        ("xx1", ctypes.c_ubyte),
        ("score", ctypes.c_int),
        ("spare", ctypes.c_void_p),
    ]


def _parse_languages(address: int | None) -> list[str]:
    """Decode espeak_VOICE.languages: repeated (priority byte, NUL-terminated name), ended by a 0 byte."""
    names: list[str] = []
    if not address:
        return names
    while ctypes.string_at(address, 1)[0] != 0:
        name = ctypes.string_at(address + 1)
        names.append(name.decode("utf-8", "replace"))
        address += 2 + len(name)
    return names


class EspeakLibrary:
    """The process-wide libespeak-ng handle: owns the loaded library, its callback and current voice."""

    _instance: EspeakLibrary | None = None

    def __init__(self, library_path: str, data_path: str) -> None:
        try:
            lib = ctypes.CDLL(library_path)
        except OSError as exc:
            raise EngineFailure(f"cannot load libespeak-ng from {library_path}: {exc}") from exc
        self._declare(lib)
        self._lib = lib
        self.data_path = Path(data_path)
        rate = lib.espeak_Initialize(
            AUDIO_OUTPUT_SYNCHRONOUS, 0, os.fsencode(data_path), ESPEAK_INITIALIZE_DONT_EXIT
        )
        if rate <= 0:
            raise EngineFailure(f"espeak_Initialize failed ({rate}) with data at {data_path}")
        self.sample_rate = int(rate)
        self._chunks: list[np.ndarray] = []
        self._callback = _SynthCallback(self._collect)  # keep a reference: the C side holds a raw pointer
        lib.espeak_SetSynthCallback(self._callback)
        self._current_voice: str | None = None

    @staticmethod
    def _declare(lib: ctypes.CDLL) -> None:
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_SetSynthCallback.argtypes = [_SynthCallback]
        lib.espeak_SetSynthCallback.restype = None
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetVoiceByName.restype = ctypes.c_int
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_SetParameter.restype = ctypes.c_int
        lib.espeak_Synth.argtypes = [
            ctypes.c_char_p,
            ctypes.c_size_t,
            ctypes.c_uint,
            ctypes.c_int,
            ctypes.c_uint,
            ctypes.c_uint,
            ctypes.c_void_p,
            ctypes.c_void_p,
        ]
        lib.espeak_Synth.restype = ctypes.c_int
        lib.espeak_ListVoices.argtypes = [ctypes.c_void_p]
        lib.espeak_ListVoices.restype = ctypes.POINTER(ctypes.POINTER(_EspeakVoice))
        lib.espeak_TextToPhonemes.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_int, ctypes.c_int]
        lib.espeak_TextToPhonemes.restype = ctypes.c_char_p

    @classmethod
    def get(cls) -> EspeakLibrary:
        """The singleton, loaded on first use from the espeakng-loader wheel."""
        with ESPEAK_LOCK:
            if cls._instance is None:
                try:
                    import espeakng_loader
                except ImportError as exc:
                    raise EngineFailure("the espeakng-loader package is not installed") from exc
                cls._instance = cls(espeakng_loader.get_library_path(), espeakng_loader.get_data_path())
            return cls._instance

    def _collect(self, wav: ctypes.Array[ctypes.c_short] | None, count: int, _events: int | None) -> int:
        if wav and count > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(count,)).copy())
        return 0  # 0 = continue synthesis

    def list_voices(self) -> list[tuple[str, str, list[str]]]:
        """(name, identifier, language codes) for every voice in the data directory."""
        with ESPEAK_LOCK:
            table = self._lib.espeak_ListVoices(None)
            voices: list[tuple[str, str, list[str]]] = []
            i = 0
            while table[i]:
                v = table[i].contents
                name = (v.name or b"").decode("utf-8", "replace")
                ident = (v.identifier or b"").decode("utf-8", "replace")
                voices.append((name, ident, _parse_languages(v.languages)))
                i += 1
            return voices

    def variants(self) -> list[str]:
        """Voice variants (``en-us+f3``, ``+whisper``, ...): the files of espeak-ng-data/voices/!v."""
        folder = self.data_path / "voices" / "!v"
        return sorted(p.name for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []

    def set_voice(self, voice: str) -> None:
        """Select a voice by language code or file name (``en-us``, ``de``, ``en-us+f3``); cached."""
        with ESPEAK_LOCK:
            if voice == self._current_voice:
                return
            status = self._lib.espeak_SetVoiceByName(voice.encode("utf-8"))
            if status == EE_NOT_FOUND:
                raise UnknownVoice(voice, "espeak")
            if status != EE_OK:
                raise EngineFailure(f"espeak_SetVoiceByName({voice!r}) failed with status {status}")
            self._current_voice = voice

    def set_prosody(self, rate_wpm: int, pitch: int) -> None:
        with ESPEAK_LOCK:
            for param, value in ((ESPEAK_RATE, rate_wpm), (ESPEAK_PITCH, pitch)):
                status = self._lib.espeak_SetParameter(param, value, 0)
                if status != EE_OK:
                    raise EngineFailure(f"espeak_SetParameter({param}, {value}) failed with status {status}")

    def synth(self, text: str, ssml: bool) -> np.ndarray:
        """Speak ``text`` with the current voice and parameters: float32 mono PCM at ``sample_rate``."""
        data = text.encode("utf-8")
        flags = ESPEAK_CHARS_UTF8 | (ESPEAK_SSML if ssml else 0)
        with ESPEAK_LOCK:
            self._chunks = []
            status = self._lib.espeak_Synth(data, len(data) + 1, 0, POS_CHARACTER, 0, flags, None, None)
            chunks, self._chunks = self._chunks, []
            if ssml:  # <voice>/xml:lang may have switched voices: select ours again next time
                self._current_voice = None
        if status != EE_OK:
            raise EngineFailure(f"espeak_Synth failed with status {status}")
        if not chunks:
            return np.zeros(0, dtype=np.float32)
        return np.concatenate(chunks).astype(np.float32) / 32768.0

    def text_to_phonemes(self, text: str) -> list[str]:
        """IPA phonemes of ``text`` in the current voice, one string per clause eSpeak finds."""
        buffer = ctypes.create_string_buffer(text.encode("utf-8"))
        pointer = ctypes.c_void_p(ctypes.addressof(buffer))
        clauses: list[str] = []
        with ESPEAK_LOCK:
            while pointer.value:
                result = self._lib.espeak_TextToPhonemes(
                    ctypes.byref(pointer), ESPEAK_CHARS_UTF8, ESPEAK_PHONEMES_IPA
                )
                if result:
                    clauses.append(result.decode("utf-8", "replace"))
        return clauses


class EspeakEngine(SynthEngine):
    """The default engine: formant synthesis with eSpeak NG (over 100 languages, SSML, 22.05 kHz)."""

    name = "espeak"

    def __init__(self, max_chars: int = 5000, library: EspeakLibrary | None = None) -> None:
        super().__init__(max_chars=max_chars)
        self._library = library if library is not None else EspeakLibrary.get()
        self._voices: list[str] | None = None

    @property
    def sample_rate(self) -> int:
        return self._library.sample_rate

    def voices(self) -> list[str]:
        """Language codes of the bundled voices (``en-us``, ``en-gb``, ``de``, ...); add ``+VARIANT``."""
        if self._voices is None:
            codes = {code.lower() for _, _, langs in self._library.list_voices() for code in langs}
            self._voices = sorted(codes)
        return list(self._voices)

    def variants(self) -> list[str]:
        return self._library.variants()

    def default_voice(self) -> str:
        return DEFAULT_VOICE

    def is_known_voice(self, voice: str) -> bool:
        language, _, variant = voice.partition("+")
        if language.lower() not in self.voices():
            return False
        return not variant or variant in self.variants()

    def _synthesize(self, text: str, voice: str, options: VoiceOptions) -> SynthResult:
        rate_wpm = round(min(max(NORMAL_RATE_WPM * options.rate, MIN_RATE_WPM), MAX_RATE_WPM))
        pitch = round(min(max(NORMAL_PITCH * options.pitch, 0), 100))
        with ESPEAK_LOCK:
            self._library.set_voice(voice)
            self._library.set_prosody(rate_wpm, pitch)
            audio = self._library.synth(text, ssml=options.ssml)
        return SynthResult(
            audio=audio,
            sample_rate=self.sample_rate,
            engine=self.name,
            voice=voice,
            extra={"rate_wpm": rate_wpm},
        )
