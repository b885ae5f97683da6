"""The prompt cache: an in-memory LRU in front of an optional on-disk store of ``.npz`` files.

Spoken prompts repeat ("You are muted", "Press 1 for sales"), so the service synthesizes each distinct
request once. The key is a SHA-256 over the text, the engine identity, the voice and every option; the
value is the finished audio (what the service hands out, already at 48 kHz: float32, or int16 from a
synthesis process) with its sample rate and metadata; disk entries keep the dtype they were stored
with. Disk entries are written atomically (temporary file + rename), so several server processes may
share one cache directory; unreadable entries are treated as misses and removed.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np

from synth.engine import SynthResult, VoiceOptions

DEFAULT_MEMORY_ITEMS = 256
# What the memory LRU may hold in audio bytes: about 2.9 min of 48 kHz float32.  One 5000-character
# prompt is a few minutes of audio (tens of MiB), so a count alone bounds nothing.
DEFAULT_MEMORY_BYTES = 32 * 1024 * 1024


def default_cache_dir() -> Path:
    """``$SYNTH_CACHE_DIR``, else ``$XDG_CACHE_HOME/mediaserver/synth``, else ``~/.cache/mediaserver/synth``."""
    explicit = os.environ.get("SYNTH_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mediaserver" / "synth"


def cache_key(text: str, engine_identity: str, voice: str, options: VoiceOptions, sample_rate: int) -> str:
    """Hex SHA-256 identifying one request; any change to what would be heard changes the key."""
    payload = {
        "text": text,
        "engine": engine_identity,
        "voice": voice,
        "rate": options.rate,
        "pitch": options.pitch,
        "ssml": options.ssml,
        "sample_rate": sample_rate,
    }
    blob = json.dumps(payload, sort_keys=True, ensure_ascii=False).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()


class PromptCache:
    """Owns the memory LRU (bounded by item count and by audio bytes) and the on-disk directory
    (None = memory only).  The least recently used entries go first; an entry larger than the whole
    byte budget is handed out but not kept.

    Thread-safe: the service reads it on the event loop and writes it from its worker thread.
    """

    def __init__(self, directory: str | Path | None = None, memory_items: int = DEFAULT_MEMORY_ITEMS,
                 memory_bytes: int = DEFAULT_MEMORY_BYTES) -> None:
        if memory_items < 0:
            raise ValueError("memory_items must be >= 0")
        if memory_bytes < 0:
            raise ValueError("memory_bytes must be >= 0")
        self.directory = Path(directory) if directory is not None else None
        self.memory_items = memory_items
        self.memory_bytes = memory_bytes
        self.not_kept = 0  # results handed out but too large to keep in memory
        self._memory: OrderedDict[str, SynthResult] = OrderedDict()
        self._bytes = 0
        self.evictions = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def _path(self, key: str) -> Path:
        assert self.directory is not None
        return self.directory / key[:2] / f"{key}.npz"

    def get_memory(self, key: str) -> SynthResult | None:
        """The entry if it is in memory (cheap enough for the event loop), else None. Counts no miss."""
        with self._lock:
            found = self._memory.get(key)
            if found is not None:
                self._memory.move_to_end(key)
                self.hits += 1
            return found

    def get(self, key: str) -> SynthResult | None:
        """Memory first, then disk (promoted to memory); None on a miss."""
        found = self.get_memory(key)
        if found is not None:
            return found
        loaded = self._load(key) if self.directory is not None else None
        with self._lock:
            if loaded is None:
                self.misses += 1
                return None
            self.hits += 1
        self._remember(key, loaded)
        return loaded

    def remember(self, key: str, result: SynthResult) -> None:
        """Store a result in memory only (its producer wrote the disk entry, if any)."""
        self._remember(key, result)

    def count(self, hit: bool) -> None:
        """Count a lookup its producer answered (a disk hit or a miss seen by another process)."""
        with self._lock:
            if hit:
                self.hits += 1
            else:
                self.misses += 1

    def put(self, key: str, result: SynthResult) -> None:
        """Store a result in memory and, when a directory is set, on disk."""
        self._remember(key, result)
        if self.directory is not None:
            self._store(key, result)

    def _remember(self, key: str, result: SynthResult) -> None:
        result.audio.flags.writeable = False  # shared by every hit: nobody may change it in place
        size = int(result.audio.nbytes)
        if self.memory_items == 0 or size > self.memory_bytes // 4:
            self.not_kept += 1  # one entry of more than a quarter of the budget would evict most others
            return
        with self._lock:
            old = self._memory.pop(key, None)
            if old is not None:
                self._bytes -= int(old.audio.nbytes)
            self._memory[key] = result
            self._bytes += size
            while len(self._memory) > self.memory_items or self._bytes > self.memory_bytes:
                _, evicted = self._memory.popitem(last=False)
                self._bytes -= int(evicted.audio.nbytes)
                self.evictions += 1

    def _store(self, key: str, result: SynthResult) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = json.dumps({"engine": result.engine, "voice": result.voice, "extra": result.extra})
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as handle:
                audio = result.audio if result.audio.dtype == np.int16 else result.audio.astype(np.float32)
                np.savez(handle, audio=audio, sample_rate=result.sample_rate, meta=meta)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _load(self, key: str) -> SynthResult | None:
        path = self._path(key)
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                meta = json.loads(str(data["meta"]))
                audio = np.array(data["audio"])
                if audio.dtype != np.int16:
                    audio = audio.astype(np.float32, copy=False)
                return SynthResult(
                    audio=audio,
                    sample_rate=int(data["sample_rate"]),
                    engine=str(meta["engine"]),
                    voice=str(meta["voice"]),
                    extra=dict(meta.get("extra", {})),
                )
        except (OSError, ValueError, KeyError, json.JSONDecodeError):
            path.unlink(missing_ok=True)  # a torn or foreign file: drop it and synthesize again
            return None

    def clear_memory(self) -> None:
        with self._lock:
            self._memory.clear()
            self._bytes = 0

    @property
    def bytes_in_memory(self) -> int:
        """Audio bytes the memory LRU holds now (at most ``memory_bytes``)."""
        with self._lock:
            return self._bytes

    def __len__(self) -> int:
        with self._lock:
            return len(self._memory)
