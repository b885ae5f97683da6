"""The phone's media path on real speech: G.711 tables, 8/48 kHz resampling, jitter buffer and PLC, RTP."""

from __future__ import annotations

import struct
import warnings

import numpy as np
import pytest
from scipy.signal import filtfilt, firwin, resample_poly

from signaling.sip.g711 import ALAW_DECODE, ALAW_ENCODE, PCMA, PCMU, ULAW_DECODE, ULAW_ENCODE
from signaling.sip.jitter import G711JitterBuffer
from signaling.sip.resample import Downsampler, Upsampler
from signaling.sip.rtp import RtpPacket
from tests.audio_checks import content_match
from tests.conftest import speech


def speech_8k(name: str = "cmu_arctic_us_axb_a0004.wav") -> np.ndarray:
    x = resample_poly(speech(name), 1, 6).astype(np.float32)
    return x / np.max(np.abs(x)) * 0.5


def snr_db(ref: np.ndarray, test: np.ndarray) -> float:
    return float(10 * np.log10(np.sum(ref ** 2) / (np.sum((ref - test) ** 2) + 1e-20)))


def test_g711_tables_match_reference_codecs() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        audioop = pytest.importorskip("audioop")
    every = np.arange(-32768, 32768, dtype=np.int16)
    codes = bytes(range(256))
    assert np.array_equal(ULAW_DECODE, np.frombuffer(audioop.ulaw2lin(codes, 2), dtype=np.int16))
    assert np.array_equal(ALAW_DECODE, np.frombuffer(audioop.alaw2lin(codes, 2), dtype=np.int16))
    assert ALAW_ENCODE[every.view(np.uint16)].tobytes() == audioop.lin2alaw(every.tobytes(), 2)
    # µ-law: ITU-T G.191 takes the one's complement of negative samples, audioop negates them: the two
    # differ only right at some negative decision levels, by one step
    ours = ULAW_ENCODE[every.view(np.uint16)].astype(int)
    ref = np.frombuffer(audioop.lin2ulaw(every.tobytes(), 2), dtype=np.uint8).astype(int)
    differ = ours != ref
    assert differ.mean() < 0.01 and np.all(every[differ] < 0) and np.all(np.abs(ours - ref)[differ] == 1)
    assert ULAW_ENCODE[0] == 0xFF and ALAW_ENCODE[0] == 0xD5  # silence codes


@pytest.mark.parametrize("codec", [PCMU, PCMA], ids=lambda c: c.name)
def test_g711_round_trip_keeps_speech(codec) -> None:  # type: ignore[no-untyped-def]
    x = speech_8k()
    y = codec.decode(codec.encode(x))
    assert len(codec.encode(x)) == len(x)
    assert snr_db(x, y) > 30.0  # G.711 gives ~38 dB on speech at this level


def test_resampling_round_trip_and_chunk_borders() -> None:
    x = speech_8k()
    up, down = Upsampler(), Downsampler()
    wide = np.concatenate([up.process(x[i:i + 80]) for i in range(0, len(x) - 79, 80)])
    assert len(wide) == 6 * (len(x) // 80 * 80)
    back = np.concatenate([down.process(wide[i:i + 480]) for i in range(0, len(wide), 480)])
    # chunked processing is exactly the one-shot conversion: no clicks at 10 ms borders
    assert np.allclose(wide, Upsampler().process(x[: len(x) // 80 * 80]), atol=1e-6)
    delay = int(np.argmax(np.correlate(back[:8000], x[:4000], mode="valid")))
    assert delay <= 60
    n = len(x) - delay - 100
    band = firwin(101, 3200, fs=8000)  # the telephone band: the resamplers may roll off above 3.3 kHz
    ref, got = filtfilt(band, 1.0, x[:n]), filtfilt(band, 1.0, back[delay:delay + n])
    assert snr_db(ref, got) > 25.0
    # going up to 48 kHz keeps the content: it matches the reference resampler's output
    assert content_match(wide, resample_poly(x, 6, 1)) > 0.95


def simulate_network(frames: list[np.ndarray], lost: set[int], jitter_ms: float, seed: int
                     ) -> tuple[np.ndarray, G711JitterBuffer]:
    """Send 20 ms packets through a jittery, lossy network into the buffer; pull 10 ms per tick."""
    rng = np.random.default_rng(seed)
    now = [0.0]
    jb = G711JitterBuffer(PCMU, clock=lambda: now[0])
    arrivals = sorted((i * 0.02 + rng.uniform(0, jitter_ms / 1000.0), i) for i in range(len(frames)) if i not in lost)
    out, k = [], 0
    for tick in range(2 * len(frames) + 40):
        now[0] = tick * 0.01
        while k < len(arrivals) and arrivals[k][0] <= now[0]:
            i = arrivals[k][1]
            jb.push(i & 0xFFFF, (1000 + i * 160) & 0xFFFFFFFF, PCMU.encode(frames[i]), arrivals[k][0], ssrc=7)
            k += 1
        out.append(jb.pull()[0])
    return np.concatenate(out), jb


def test_jitter_buffer_reorders_and_conceals_on_real_speech() -> None:
    x = speech_8k("cmu_arctic_us_aew_a0002.wav")
    frames = [x[i:i + 160] for i in range(0, len(x) - 159, 160)]
    rng = np.random.default_rng(3)
    lost = set(rng.choice(len(frames), len(frames) // 30, replace=False).tolist())  # ~3 % loss
    y, jb = simulate_network(frames, lost, jitter_ms=45.0, seed=3)
    st = jb.stats
    assert st.lost == len(lost) or st.lost >= len(lost) - 1
    assert st.concealed_chunks >= len(lost) and st.jitter_ms > 2.0
    ncc = content_match(resample_poly(y, 6, 1), resample_poly(x, 6, 1))
    assert ncc > 0.85, f"speech through the jitter buffer lost its content (ncc {ncc:.2f})"


def test_concealment_is_closer_to_the_speech_than_silence() -> None:
    x = speech_8k()
    frames = [x[i:i + 160] for i in range(0, len(x) - 159, 160)]
    energy = np.array([np.mean(f * f) for f in frames])
    voiced = np.nonzero(energy > np.percentile(energy, 60))[0]
    lost = set(np.random.default_rng(1).choice(voiced[5:-5], 15, replace=False).tolist())
    y, _ = simulate_network(frames, lost, jitter_ms=0.0, seed=0)
    delay = int(np.argmax(np.correlate(y[:12000], x[:4000], mode="valid")))
    y = y[delay:delay + len(x)]
    err_plc = sum(float(np.sum((y[i * 160:(i + 1) * 160] - frames[i]) ** 2)) for i in lost)
    err_silence = sum(float(np.sum(frames[i] ** 2)) for i in lost)
    assert err_plc < 0.9 * err_silence, f"concealment no better than silence ({err_plc / err_silence:.2f})"
    received = [i for i in range(5, len(frames) - 5) if i not in lost and i - 1 not in lost]
    intact = np.concatenate([y[i * 160:(i + 1) * 160] for i in received])
    assert snr_db(np.concatenate([frames[i] for i in received]), intact) > 30.0  # the rest is untouched


def test_jitter_buffer_goes_silent_after_a_pause_and_restarts() -> None:
    x = speech_8k()
    frames = [x[i:i + 160] for i in range(0, 100 * 160, 160)]
    lost = set(range(40, 70))  # 600 ms without packets (hold, silence suppression)
    y, jb = simulate_network(frames, lost, jitter_ms=5.0, seed=2)
    ticks = y.reshape(-1, 80)
    rms = np.sqrt(np.mean(ticks ** 2, axis=1))
    assert np.sum(rms[90:130] < 1e-6) >= 25, "the pause was not silent"
    assert np.mean(rms[150:190]) > 0.01, "audio did not resume after the pause"
    assert jb.stats.underruns >= 1


def test_rtp_packets_parse_with_csrc_extension_and_padding() -> None:
    pkt = RtpPacket(0, 65535, 0xFFFFFFF0, 0x1234, b"\xff" * 160, marker=True)
    assert RtpPacket.parse(pkt.serialize()) == pkt
    header = struct.pack("!BBHII", 0x80 | 0x20 | 0x10 | 1, 8, 7, 160, 99) + struct.pack("!I", 5)
    extension = struct.pack("!HH", 0xBEDE, 1) + b"\x10\x00\x00\x00"
    data = header + extension + b"\xd5" * 160 + b"\x00\x00\x03"
    parsed = RtpPacket.parse(data)
    assert parsed.payload == b"\xd5" * 160 and parsed.payload_type == 8 and parsed.seq == 7
    too_much_padding = bytes([0xA0]) + bytes(11) + b"\x00\x00\x09"
    for bad in (b"", b"\x80\x00", bytes([0x40]) + bytes(20), too_much_padding):
        with pytest.raises(ValueError):
            RtpPacket.parse(bad)
