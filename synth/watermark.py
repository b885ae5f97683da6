"""A keyed, inaudible watermark for synthesized prompts: embed a prompt id, detect it again.

Scheme (spread spectrum, cyclic-shift keying):

* From the key, four pseudo-random noise *templates* are derived, each periodic with ``PERIOD`` samples
  at 16 kHz (1.024 s) and band-limited to 300-3400 Hz (the band G.711 keeps). One is the *sync*
  template, the others carry data: a 36-bit word (24-bit prompt id + 12-bit keyed check) is split into
  three 12-bit symbols, and symbol ``s`` is sent as the data template cyclically shifted by
  ``s * SHIFT_STEP`` samples relative to the sync template. The mark is the sum of the four, repeated
  over the whole prompt, so every excerpt carries the whole payload and its position is irrelevant.
* Embedding shapes the mark under the speech: in a short-time spectrum each mark bin is scaled to the
  smoothed magnitude of the prompt at that time and frequency, ``strength_db`` below it. Silence gets
  no mark; loud formants get more.
* Detection whitens the recording the same way (each bin divided by its smoothed magnitude), folds it
  modulo the period, and cross-correlates with the templates by FFT. The sync peak gives the offset
  and a z-score against the empirical null of all other offsets; each data template's peak gives its
  symbol. A window counts as marked only when the sync z-score passes the threshold *and* the keyed
  12-bit check of the decoded id matches (a random excerpt passes that with probability 1/4096).

Without the key the templates are unknown, so the mark can neither be read nor forged cheaply; it is
not a cryptographic signature and heavy processing (noise, pitch shift, re-synthesis) removes it.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np

#: The key used when none is configured. It is public: marks made with it prove nothing. Production
#: deployments set their own secret key (``WatermarkConfig(key=...)``).
DEV_KEY = "mediaserver-dev-watermark-key"

RATE = 16_000  # the detector's working rate
PERIOD = 16_384  # template period in samples at RATE (1.024 s)
BAND_HZ = (800.0, 3400.0)
SHIFT_STEP = 4  # samples between two symbol values (robust to a one-sample peak jitter)
SYMBOL_BITS = 12
DATA_TEMPLATES = 3
ID_BITS = 24
CHECK_BITS = DATA_TEMPLATES * SYMBOL_BITS - ID_BITS  # 12
WINDOW_S = 3.0  # detection window
HOP_S = 1.5
_NFFT = 256  # short-time spectrum at RATE for shaping/whitening (16 ms)
_HOP = 64


@dataclass(frozen=True)
class WatermarkConfig:
    """Owns the watermark's settings: the secret key, the mark's level and the detection threshold."""

    key: str = DEV_KEY
    enabled: bool = True
    strength_db: float = -11.0  # mark level relative to the speech, per time-frequency bin
    threshold: float = 5.0  # sync z-score a window needs (besides a valid keyed check)

    def key_id(self) -> str:
        """A short public fingerprint of the key (safe to log, used in cache identities)."""
        return hashlib.sha256(b"wm-key-id:" + self.key.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class WindowResult:
    """One analysed window: where it lies, its sync z-score and what it decoded."""

    start_s: float
    end_s: float
    score: float
    prompt_id: int | None  # set only when the window is marked (score and check both pass)


@dataclass(frozen=True)
class Detection:
    """The verdict on one recording: marked or not, which prompt id, and the windows it was found in."""

    watermarked: bool
    prompt_id: int | None
    score: float  # best sync z-score of any window
    windows: list[WindowResult] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        found = [w for w in self.windows if w.prompt_id is not None]
        return {
            "watermarked": self.watermarked,
            "prompt_id": None if self.prompt_id is None else f"{self.prompt_id:06x}",
            "score": round(self.score, 2),
            "windows_analysed": len(self.windows),
            "windows_found": [
                {"start_s": w.start_s, "end_s": w.end_s, "score": round(w.score, 2),
                 "prompt_id": f"{w.prompt_id:06x}"}
                for w in found
            ],
        }


def prompt_id_for(request_key: str) -> int:
    """The 24-bit prompt id of a synthesis request (a hash of its cache key): derivable, not secret."""
    return int.from_bytes(hashlib.sha256(b"prompt-id:" + request_key.encode()).digest()[:3], "big")


def _check(prompt_id: int, key: str) -> int:
    digest = hashlib.sha256(b"wm-check:" + key.encode() + prompt_id.to_bytes(4, "big")).digest()
    return int.from_bytes(digest[:4], "big") & ((1 << CHECK_BITS) - 1)


def encode_symbols(prompt_id: int, key: str) -> list[int]:
    """The data symbols (cyclic shifts in SHIFT_STEP units) that carry ``prompt_id``."""
    if not 0 <= prompt_id < (1 << ID_BITS):
        raise ValueError(f"prompt id must fit in {ID_BITS} bits")
    word = (prompt_id << CHECK_BITS) | _check(prompt_id, key)
    mask = (1 << SYMBOL_BITS) - 1
    return [(word >> (SYMBOL_BITS * i)) & mask for i in range(DATA_TEMPLATES)]


def decode_symbols(symbols: list[int], key: str) -> int | None:
    """The prompt id carried by ``symbols``, or None when its keyed check does not match."""
    word = 0
    for i, symbol in enumerate(symbols):
        word |= (symbol & ((1 << SYMBOL_BITS) - 1)) << (SYMBOL_BITS * i)
    prompt_id = word >> CHECK_BITS
    return prompt_id if _check(prompt_id, key) == word & ((1 << CHECK_BITS) - 1) else None


@functools.lru_cache(maxsize=8)
def templates(key: str) -> np.ndarray:
    """(1 + DATA_TEMPLATES, PERIOD) unit-RMS periodic noise templates in 300-3400 Hz, derived from key."""
    seed = int.from_bytes(hashlib.sha256(b"wm-templates:" + key.encode()).digest()[:8], "big")
    rng = np.random.default_rng(seed)
    freqs = np.fft.rfftfreq(PERIOD, 1.0 / RATE)
    inband = (freqs >= BAND_HZ[0]) & (freqs <= BAND_HZ[1])
    out = np.zeros((1 + DATA_TEMPLATES, PERIOD), dtype=np.float64)
    for row in range(out.shape[0]):
        spectrum = np.exp(2j * np.pi * rng.random(freqs.size)) * inband
        wave = np.fft.irfft(spectrum, PERIOD)
        out[row] = wave / np.sqrt(np.mean(wave**2))
    out.setflags(write=False)
    return out


def _resample(audio: np.ndarray, source: int, target: int) -> np.ndarray:
    if source == target:
        return audio.astype(np.float64)
    from scipy.signal import resample_poly

    ratio = Fraction(target, source)
    return np.asarray(resample_poly(audio.astype(np.float64), ratio.numerator, ratio.denominator))


def _stft_params(rate: int) -> tuple[int, int]:
    """Frame and hop (samples) giving the same 32 ms / 8 ms grid at ``rate``."""
    size = 1 << int(round(np.log2(_NFFT * rate / RATE)))
    return size, size // 4


SMOOTH = 1  # bins of frequency smoothing of the shaping/whitening magnitude


def _smooth_magnitude(spec: np.ndarray, width: int | None = None) -> np.ndarray:
    """|spec| averaged over ``width`` neighbouring bins (axis 0 is frequency)."""
    mag = np.abs(spec)
    w = SMOOTH if width is None else width
    if w <= 1:
        return mag
    from scipy.ndimage import uniform_filter1d

    return np.asarray(uniform_filter1d(mag, w, axis=0, mode="nearest"))


def mark_signal(n_samples: int, prompt_id: int, key: str) -> np.ndarray:
    """The raw (unshaped) mark for ``n_samples`` at RATE: sync + shifted data templates, repeated."""
    bank = templates(key)
    period = bank[0].copy()
    for row, symbol in enumerate(encode_symbols(prompt_id, key), start=1):
        period += np.roll(bank[row], symbol * SHIFT_STEP)
    period /= np.sqrt(1 + DATA_TEMPLATES)
    return np.resize(period, n_samples)


EMBED_BLOCK_FRAMES = 4096  # short-time frames shaped at a time in a long prompt (about 12 s at 22.05 kHz)


def embed(audio: np.ndarray, rate: int, prompt_id: int, config: WatermarkConfig,
          block_frames: int = EMBED_BLOCK_FRAMES) -> np.ndarray:
    """``audio`` (float mono at ``rate``) with the mark of ``prompt_id`` added under it; float32 out.

    The mark is shaped ``block_frames`` short-time frames at a time (:func:`_embed_blocks`; the same
    samples as on whole-prompt spectra, :func:`_embed_whole`, which a 5000-character prompt made
    1.4 GiB of complex128 and seconds of per-frame Python); only a few frames of audio take the whole path.
    """
    if audio.size == 0 or not config.enabled:
        return audio.astype(np.float32)
    host = audio.astype(np.float64)
    n16 = int(np.ceil(host.size * RATE / rate)) + PERIOD // 8
    mark = _resample(mark_signal(n16, prompt_id, config.key), RATE, rate)[: host.size]
    if mark.size < host.size:
        mark = np.pad(mark, (0, host.size - mark.size))
    size, _ = _stft_params(rate)
    if host.size > 4 * size:
        return _embed_blocks(host, mark, rate, config, block_frames)
    return _embed_whole(host, mark, rate, config)


def _embed_whole(host: np.ndarray, mark: np.ndarray, rate: int, config: WatermarkConfig) -> np.ndarray:
    """The shaping on whole-signal spectra (scipy's stft/istft): the reference :func:`_embed_blocks` matches."""
    from scipy.signal import istft, stft

    size, hop = _stft_params(rate)
    _, _, host_spec = stft(host, nperseg=size, noverlap=size - hop, boundary="even")
    _, _, mark_spec = stft(mark, nperseg=size, noverlap=size - hop, boundary="even")
    freqs = np.fft.rfftfreq(size, 1.0 / rate)
    inband = (freqs >= BAND_HZ[0]) & (freqs <= BAND_HZ[1])
    mark_rms = np.sqrt(np.mean(np.abs(mark_spec[inband]) ** 2))
    gain = 10.0 ** (config.strength_db / 20.0) * _smooth_magnitude(host_spec) / max(mark_rms, 1e-12)
    shaped_spec = mark_spec * gain * inband[:, None]
    _, shaped = istft(shaped_spec, nperseg=size, noverlap=size - hop, boundary=True)
    shaped = np.asarray(shaped)[: host.size]
    if shaped.size < host.size:
        shaped = np.pad(shaped, (0, host.size - shaped.size))
    return np.clip(host + shaped, -1.0, 1.0).astype(np.float32)


def _piece_slice(pieces: list[np.ndarray], start: int, stop: int) -> np.ndarray:
    """``np.concatenate(pieces)[start:stop]`` without building the concatenation."""
    out, offset = [], 0
    for piece in pieces:
        lo, hi = max(start - offset, 0), min(stop - offset, piece.size)
        if lo < hi:
            out.append(piece[lo:hi])
        offset += piece.size
    return np.concatenate(out)


def _embed_blocks(host: np.ndarray, mark: np.ndarray, rate: int, config: WatermarkConfig,
                  block_frames: int) -> np.ndarray:
    """:func:`embed`'s shaping a block of frames at a time, on the frame grid scipy's whole-signal
    ``stft(boundary="even")`` / ``istft(boundary=True)`` use: each output block takes every frame that
    overlaps it, so only the summation order differs.  Two passes over the mark: its in-band RMS is
    a property of the whole prompt."""
    from scipy import fft as sp_fft
    from scipy.signal import get_window

    size, hop = _stft_params(rate)
    half, n = size // 2, host.size
    nadd = (-(n + 2 * half - size) % hop) % size  # stft(padded=True)'s zeros after the extension
    frames = (n + 2 * half + nadd - size) // hop + 1

    def extended(x: np.ndarray) -> list[np.ndarray]:  # scipy's even extension, then the padding
        return [x[half:0:-1], x, x[-2:-(half + 2):-1], np.zeros(nadd)]

    host_ext, mark_ext = extended(host), extended(mark)
    window = np.asarray(get_window("hann", size))
    scale = float(window.sum())
    inband = (np.fft.rfftfreq(size, 1.0 / rate) >= BAND_HZ[0]) & (np.fft.rfftfreq(size, 1.0 / rate) <= BAND_HZ[1])

    def spectra(pieces: list[np.ndarray], k0: int, k1: int) -> np.ndarray:
        """Frames k0 .. k1-1 of the extended signal: (bins, frames), scaled as scipy's stft."""
        seg = _piece_slice(pieces, k0 * hop, (k1 - 1) * hop + size)
        framed = np.lib.stride_tricks.sliding_window_view(seg, size)[::hop].T * window[:, None]
        return np.asarray(sp_fft.rfft(framed, axis=0)) / scale

    energy = 0.0
    for k0 in range(0, frames, block_frames):
        energy += float(np.sum(np.abs(spectra(mark_ext, k0, min(k0 + block_frames, frames))[inband]) ** 2))
    mark_rms = np.sqrt(energy / (frames * int(inband.sum())))
    level = 10.0 ** (config.strength_db / 20.0) / max(mark_rms, 1e-12)

    out = np.empty(n, dtype=np.float32)
    ratio = size // hop
    for a in range(0, n, block_frames * hop):
        b = min(a + block_frames * hop, n)
        # every frame that overlaps samples a .. b-1 (extended indices a+half .. b+half-1)
        k0 = max(0, -(-(a + half - size + 1) // hop))
        k1 = min(frames, (b + half - 1) // hop + 1)
        host_spec, mark_spec = spectra(host_ext, k0, k1), spectra(mark_ext, k0, k1)
        shaped_spec = mark_spec * (level * _smooth_magnitude(host_spec)) * inband[:, None]
        subs = np.asarray(sp_fft.irfft(shaped_spec, n=size, axis=0))[:size] * scale * window[:, None]
        count = k1 - k0
        ola = np.zeros((count - 1) * hop + size)
        norm = np.zeros_like(ola)
        for r in range(ratio):  # overlap-add: row r*hop+u of frame j lands on j*hop + r*hop + u
            ola[r * hop: r * hop + count * hop] += subs[r * hop:(r + 1) * hop].T.reshape(-1)
            norm[r * hop: r * hop + count * hop] += np.tile(window[r * hop:(r + 1) * hop] ** 2, count)
        lo = a + half - k0 * hop
        shaped = ola[lo: lo + (b - a)] / np.where(norm[lo: lo + (b - a)] > 1e-10, norm[lo: lo + (b - a)], 1.0)
        out[a:b] = np.clip(host[a:b] + shaped, -1.0, 1.0)
    return out


def whiten(audio: np.ndarray, rate: int) -> np.ndarray:
    """The recording at RATE with every in-band bin divided by its smoothed magnitude (silence stays quiet)."""
    from scipy.signal import istft, stft

    x = _resample(audio, rate, RATE)
    if x.size < _NFFT:
        return np.zeros(x.size)
    _, _, spec = stft(x, nperseg=_NFFT, noverlap=_NFFT - _HOP, boundary="even")
    freqs = np.fft.rfftfreq(_NFFT, 1.0 / RATE)
    inband = (freqs >= BAND_HZ[0]) & (freqs <= BAND_HZ[1])
    mag = _smooth_magnitude(spec)
    floor = 1e-3 * float(np.sqrt(np.mean(mag[inband] ** 2))) + 1e-9
    _, out = istft(spec / (mag + floor) * inband[:, None], nperseg=_NFFT, noverlap=_NFFT - _HOP,
                   boundary=True)
    return np.asarray(out)[: x.size]


def _zscores(folded_spec: np.ndarray, template: np.ndarray) -> np.ndarray:
    """Circular cross-correlation of the folded signal with a template, as robust z-scores per lag."""
    corr = np.fft.irfft(np.conj(folded_spec) * np.fft.rfft(template), PERIOD)
    # corr[lag] = sum_n folded[n] * template[n + lag]: the template shifted by -lag lines up.
    spread = 1.4826 * float(np.median(np.abs(corr - np.median(corr)))) + 1e-12
    return np.asarray((corr - np.median(corr)) / spread)


def analyse(whitened: np.ndarray, key: str, threshold: float) -> tuple[float, int | None]:
    """Sync z-score and decoded prompt id (None unless score >= threshold and the check matches)."""
    if whitened.size < _NFFT:
        return 0.0, None
    folded = np.zeros(PERIOD)
    for start in range(0, whitened.size, PERIOD):
        chunk = whitened[start : start + PERIOD]
        folded[: chunk.size] += chunk
    folded_spec = np.fft.rfft(folded)
    bank = templates(key)
    sync = _zscores(folded_spec, bank[0])
    lag = int(np.argmax(sync))
    score = float(sync[lag])
    if score < threshold:
        return score, None
    symbols = []
    for row in range(1, bank.shape[0]):
        data = _zscores(folded_spec, bank[row])
        # the data template was rolled by s*STEP relative to sync: its peak sits at lag - s*STEP
        shift = (lag - int(np.argmax(data))) % PERIOD
        symbols.append(int(round(shift / SHIFT_STEP)) % (PERIOD // SHIFT_STEP))
    return score, decode_symbols(symbols, key)


def detect(audio: np.ndarray, rate: int, config: WatermarkConfig | None = None) -> Detection:
    """Look for the mark in every 3-s window (1.5-s hop) of ``audio``; shorter audio is one window."""
    cfg = config if config is not None else WatermarkConfig()
    whitened = whiten(np.asarray(audio, dtype=np.float64), rate)
    win, hop = int(WINDOW_S * RATE), int(HOP_S * RATE)
    starts = list(range(0, max(whitened.size - win, 0) + 1, hop))
    if starts and whitened.size - (starts[-1] + win) > hop // 2:
        starts.append(whitened.size - win)
    windows = []
    for start in starts:
        score, prompt_id = analyse(whitened[start : start + win], cfg.key, cfg.threshold)
        end = min(start + win, whitened.size)
        windows.append(WindowResult(round(start / RATE, 3), round(end / RATE, 3), score, prompt_id))
    found = [w.prompt_id for w in windows if w.prompt_id is not None]
    best = max((w.score for w in windows), default=0.0)
    if not found:
        return Detection(False, None, best, windows)
    ids, counts = np.unique(np.array(found), return_counts=True)
    return Detection(True, int(ids[int(np.argmax(counts))]), best, windows)
