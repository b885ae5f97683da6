"""A lighter media path for bots in large numbers: pre-encoded sending, inline receiving.

aiortc's default audio path costs a participant two thread hand-offs per
packet (the Opus encode runs in the default executor, decoding in one
thread per receiver) plus a pure-Python audio-level computation; with tens
of bots per process the GIL hand-offs alone starve the event loop, and a
starved load generator measures its own delays instead of the server's.

- ``EncodedPcmTrack`` encodes the bot's whole (looped) signal once with
  libopus at construction and, paced in real time, hands aiortc's sender
  ready Opus packets (aiortc only packetizes them, as the server does).
- ``InlineDecoder`` takes the place of a receiver's jitter buffer: every RTP
  packet's Opus payload is kept in the bot's ``Recording`` with its arrival
  time, and decoded later, off the event loop, when the recording is
  analysed (``Recording.decode_pending``, libopus through ctypes:
  ``OpusMonoDecoder``); aiortc's decoder thread stays idle.  With
  ``decode=False`` it only counts: the packets' RTP headers (tapped before
  it) give loss, gaps and jitter, and no audio is kept.  Missing packets
  leave holes in the pts timeline (no concealment), which the analysis
  counts as gaps.

``loadtest.wire`` goes further and takes the media off aiortc's per-packet
path altogether once it has connected.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import fractions
import glob
import hashlib
import logging
import os
import time
import types
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import av
import numpy as np
from aiortc.codecs.opus import OpusDecoder
from aiortc.jitterbuffer import JitterFrame
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

if TYPE_CHECKING:
    from loadtest.bot import Recording

RATE = 48_000
FRAME = 960
TIME_BASE = fractions.Fraction(1, RATE)
TS_MOD = 1 << 32
_OPUS_APPLICATION_VOIP = 2048
_OPUS_SET_BITRATE = 4002


@dataclass
class OpusPacket:
    """One pre-encoded 20 ms Opus packet; duck-types what aiortc's sender reads from an ``av.Packet``."""

    data: bytes
    pts: int
    time_base: fractions.Fraction = TIME_BASE

    def __bytes__(self) -> bytes:
        return self.data


def frame_mono(frame: Any) -> np.ndarray:
    """A decoded s16 ``av.AudioFrame`` (mono or stereo) as mono float32 in [-1, 1]."""
    pcm = frame.to_ndarray().astype(np.float32) / 32768.0
    channels = len(frame.layout.channels)
    return (pcm.reshape(-1, channels).mean(axis=1) if channels > 1 else pcm.reshape(-1)).astype(np.float32)


def decode_opus(decoder: OpusDecoder, payload: bytes) -> list[np.ndarray]:
    """One Opus packet through ``decoder``: its mono float32 frames."""
    frames: list[Any] = list(decoder.decode(JitterFrame(data=payload, timestamp=0)))
    return [frame_mono(f) for f in frames]


def encode_opus(samples: np.ndarray, bitrate: int = 32_000) -> list[bytes]:
    """``samples`` (48 kHz mono float32) as 20 ms mono Opus packets (libopus, VoIP mode), one per frame.

    Packet ``k`` starts at sample ``k * 960``; like any libopus stream its
    content lags the packet timing by the encoder's look-ahead (312 samples).
    libopus is called directly (ctypes: the GIL is released while it
    encodes, so bots joining do not stall the event loop); PyAV's encoder
    when that library cannot be loaded.
    """
    n = len(samples) // FRAME * FRAME
    try:
        lib = _load_libopus()
    except OSError:
        return _encode_opus_pyav(samples[:n], bitrate)
    err = ctypes.c_int(0)
    enc = lib.opus_encoder_create(RATE, 1, _OPUS_APPLICATION_VOIP, ctypes.byref(err))
    if err.value != 0 or not enc:
        raise OSError(f"opus_encoder_create failed: {err.value}")
    try:
        lib.opus_encoder_ctl(ctypes.c_void_p(enc), ctypes.c_int(_OPUS_SET_BITRATE), ctypes.c_int(bitrate))
        pcm = np.ascontiguousarray(np.clip(samples[:n], -1, 1), dtype=np.float32)
        out = ctypes.create_string_buffer(4000)
        packets: list[bytes] = []
        base = pcm.ctypes.data
        for k in range(0, n, FRAME):
            size = lib.opus_encode_float(enc, base + 4 * k, FRAME, out, len(out))
            if size < 0:
                raise OSError(f"opus_encode_float failed: {size}")
            packets.append(out.raw[:size])
        return packets
    finally:
        lib.opus_encoder_destroy(enc)


def _encode_opus_pyav(samples: np.ndarray, bitrate: int) -> list[bytes]:
    codec = av.CodecContext.create("libopus", "w")
    codec.sample_rate = RATE
    codec.layout = "mono"
    codec.format = "s16"
    codec.bit_rate = bitrate
    codec.time_base = TIME_BASE
    codec.options = {"application": "voip", "frame_duration": "20"}
    n = len(samples) // FRAME * FRAME
    pcm = (np.clip(samples[:n], -1, 1) * 32767).astype(np.int16)
    packets: list[bytes] = []
    for k in range(0, n, FRAME):
        frame = av.AudioFrame.from_ndarray(pcm[k:k + FRAME].reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = RATE
        frame.pts = k
        frame.time_base = TIME_BASE
        packets += [bytes(p) for p in codec.encode(frame)]
    packets += [bytes(p) for p in codec.encode(None)]
    return packets[: n // FRAME]


def cache_dir() -> Path:
    """Where encoded signals are kept between runs (``$LOADTEST_CACHE``, else ``~/.cache/loadtest``)."""
    return Path(os.environ.get("LOADTEST_CACHE") or Path.home() / ".cache" / "loadtest")


def opus_cache_path(samples: np.ndarray, bitrate: int = 32_000) -> Path:
    """Where ``encode_opus_cached`` keeps the packets of ``samples``."""
    digest = hashlib.sha1(np.ascontiguousarray(samples, dtype=np.float32).tobytes()).hexdigest()
    return cache_dir() / f"opus-{bitrate}-{digest}.bin"


def encode_opus_cached(samples: np.ndarray, bitrate: int = 32_000) -> list[bytes]:
    """``encode_opus``, kept on disk by the samples' hash: every process and run of a load test
    re-encodes the same bot signals (about 0.4 s of CPU for 40 s), a capacity bench once per server."""
    path = opus_cache_path(samples, bitrate)
    try:
        blob = path.read_bytes()
        sizes = np.frombuffer(blob, dtype="<u2", count=int.from_bytes(blob[:4], "little"), offset=4)
        packets, at = [], 4 + 2 * len(sizes)
        for size in sizes.tolist():
            packets.append(blob[at:at + size])
            at += size
        if at == len(blob):
            return packets
    except (OSError, ValueError):
        pass
    packets = encode_opus(samples, bitrate)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(len(packets).to_bytes(4, "little") + np.asarray([len(p) for p in packets], dtype="<u2").tobytes()
                        + b"".join(packets))
        tmp.replace(path)
    except OSError as exc:  # a read-only home: encode every time
        logging.getLogger(__name__).debug("opus cache not written: %s", exc)
    return packets


_lookahead_ms: float | None = None


def opus_lookahead_ms() -> float:
    """Measured content delay of a libopus encode/decode (its look-ahead: 312 samples, 6.5 ms)."""
    global _lookahead_ms
    if _lookahead_ms is None:
        x = np.zeros(RATE // 5, dtype=np.float32)
        burst = np.random.default_rng(5).standard_normal(480).astype(np.float32)
        x[RATE // 20:RATE // 20 + 480] = np.hanning(480).astype(np.float32) * burst * 0.3
        decoder = OpusDecoder()
        out = [block for p in encode_opus(x) for block in decode_opus(decoder, p)]
        y = np.concatenate(out)[: len(x)]
        corr = np.correlate(y, x[RATE // 20 - 480:RATE // 20 + 960], mode="valid")
        _lookahead_ms = (int(np.argmax(corr)) - (RATE // 20 - 480)) / RATE * 1000.0
    return _lookahead_ms


class EncodedPcmTrack(MediaStreamTrack):
    """Publishes a pre-encoded, looping signal in real time (same logs as ``PcmTrack``)."""

    kind = "audio"

    def __init__(self, samples: np.ndarray, packets: list[bytes] | None = None) -> None:
        super().__init__()
        self.packets = packets or encode_opus(samples) or encode_opus(np.zeros(FRAME, dtype=np.float32))
        self._index = 0
        self._pts = 0
        self._start: float | None = None
        self.send_log: list[tuple[float, int]] = []
        self.wire_log: list[tuple[float, int]] = []

    async def recv(self) -> OpusPacket:  # type: ignore[override]
        if self.readyState != "live":
            raise MediaStreamError
        if self._start is None:
            self._start = time.monotonic()
        delay = self._start + self._pts / RATE - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        packet = OpusPacket(self.packets[self._index % len(self.packets)], self._pts)
        self.send_log.append((time.monotonic(), self._pts))
        self._index += 1
        self._pts += FRAME
        return packet


_libopus: ctypes.CDLL | None = None


def _load_libopus() -> ctypes.CDLL:
    """libopus: the copy PyAV ships (always there with aiortc), else the system's."""
    global _libopus
    if _libopus is not None:
        return _libopus
    candidates = sorted(glob.glob(os.path.join(os.path.dirname(os.path.dirname(av.__file__)), "av.libs",
                                               "libopus*.so*")))
    found = ctypes.util.find_library("opus")
    candidates += [found] if found else []
    for path in candidates:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        lib.opus_decoder_create.restype = ctypes.c_void_p
        lib.opus_decoder_create.argtypes = [ctypes.c_int32, ctypes.c_int, ctypes.POINTER(ctypes.c_int)]
        lib.opus_decode_float.restype = ctypes.c_int
        lib.opus_decode_float.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int32, ctypes.c_void_p,
                                          ctypes.c_int, ctypes.c_int]
        lib.opus_decoder_destroy.argtypes = [ctypes.c_void_p]
        lib.opus_encoder_create.restype = ctypes.c_void_p
        lib.opus_encoder_create.argtypes = [ctypes.c_int32, ctypes.c_int, ctypes.c_int, ctypes.POINTER(ctypes.c_int)]
        lib.opus_encode_float.restype = ctypes.c_int32
        lib.opus_encode_float.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_char_p,
                                          ctypes.c_int32]
        lib.opus_encoder_ctl.restype = ctypes.c_int
        lib.opus_encoder_destroy.argtypes = [ctypes.c_void_p]
        _libopus = lib
        return lib
    raise OSError("libopus not found (looked in PyAV's bundled libraries and the system)")


class OpusMonoDecoder:
    """One Opus stream decoded to 48 kHz mono float32 by libopus directly (a third of aiortc's decoder cost).

    A mono decoder of a mono stream gives what aiortc's stereo decoder gives
    on each channel; ctypes releases the GIL during the call.
    """

    MAX_SAMPLES = 5760  # 120 ms, the longest Opus packet

    def __init__(self) -> None:
        self._lib = _load_libopus()
        err = ctypes.c_int(0)
        self._dec = self._lib.opus_decoder_create(RATE, 1, ctypes.byref(err))
        if err.value != 0 or not self._dec:
            raise OSError(f"opus_decoder_create failed: {err.value}")
        self._pcm = np.zeros(self.MAX_SAMPLES, dtype=np.float32)

    def decode(self, payload: bytes) -> np.ndarray:
        """One packet's samples (empty for a packet libopus rejects)."""
        n = self._lib.opus_decode_float(self._dec, payload, len(payload), self._pcm.ctypes.data,
                                        self.MAX_SAMPLES, 0)
        return self._pcm[:n].copy() if n > 0 else np.zeros(0, dtype=np.float32)

    def __del__(self) -> None:
        dec, self._dec = getattr(self, "_dec", None), None
        if dec:
            self._lib.opus_decoder_destroy(dec)


_R = "_RTCRtpReceiver__"  # aiortc's name-mangled private attributes of RTCRtpReceiver
_RECEIVER_ATTRS = ("started", "codecs", "rtx_ssrc", "transport", "rtcp_task", "decoder_thread")


def receive_without_decoder_thread(receiver: Any) -> bool:
    """Let ``receiver`` start without aiortc's decoder thread (one per received stream, idle once an
    ``InlineDecoder`` replaces its jitter buffer: hundreds of threads to start, and to join one by one
    on the event loop when the bots leave).  False, and nothing changed, on an aiortc without the
    attributes this relies on.
    """
    if not all(hasattr(receiver, _R + name) for name in _RECEIVER_ATTRS):
        return False

    async def receive(self: Any, parameters: Any) -> None:  # aiortc's RTCRtpReceiver.receive, less the thread
        if getattr(self, _R + "started"):
            return
        codecs, rtx_ssrc = getattr(self, _R + "codecs"), getattr(self, _R + "rtx_ssrc")
        for codec in parameters.codecs:
            codecs[codec.payloadType] = codec
        for encoding in parameters.encodings:
            if encoding.rtx:
                rtx_ssrc[encoding.rtx.ssrc] = encoding.ssrc
        getattr(self, _R + "transport")._register_rtp_receiver(self, parameters)
        setattr(self, _R + "rtcp_task", asyncio.ensure_future(self._run_rtcp()))
        setattr(self, _R + "started", True)

    receiver.receive = types.MethodType(receive, receiver)
    return True


class InlineDecoder:
    """Stands in for an aiortc receiver's jitter buffer: keeps each packet's payload for decoding later.

    The payloads go to ``Recording.add_encoded`` (decoded off the event loop
    by ``Recording.decode_pending``); with ``decode=False`` nothing is kept.
    """

    def __init__(self, recording: Recording, decode: bool = True) -> None:
        self.recording = recording
        self.decode = decode
        self.capacity = 16

    def add(self, packet: Any) -> tuple[bool, None]:
        rec = self.recording
        if rec.ts_origin is None:
            rec.ts_origin = int(packet.timestamp)
        data = getattr(packet, "_data", b"")
        if data and self.decode:
            rec.add_encoded(time.monotonic(), int(packet.timestamp), data)
        return False, None

    def remove(self, count: int) -> None:  # aiortc API compatibility
        pass

    def smart_remove(self, count: int) -> bool:
        return False
