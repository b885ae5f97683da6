"""The load-test bots measure what listeners get: real speech through a real server, over the wire."""

from __future__ import annotations

import asyncio
import importlib
import json
import math
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
from aiortc.codecs.opus import OpusDecoder

from loadtest.lightmedia import decode_opus, encode_opus, opus_lookahead_ms
from loadtest.marker import MarkerTemplate, ReceivedSegment, SendTimeline, measure_segment
from loadtest.promtext import aggregate, parse
from loadtest.session import LoadSession, SessionConfig, run_load
from loadtest.sources import SourceConfig, SourceLibrary
from loadtest.workers import LocalHost
from mediaserver.config import AuthConfig, EnhanceConfig, ServerConfig
from tests.conftest import EVAL, ServerFactory

DENOISERS = ("denoise:rnnoise", "denoise")


def _library(snr_db: float | None = 5.0) -> SourceLibrary:
    if not (EVAL / "speech").is_dir() or not (EVAL / "noise").is_dir():
        pytest.skip(f"missing evaluation recordings in {EVAL}")
    return SourceLibrary(SourceConfig(str(EVAL / "speech"), str(EVAL / "noise"), snr_db, seconds=12.0))


def _denoiser() -> str:
    from enhancers.registry import STAGES

    problems = []
    for spec in DENOISERS:
        module = STAGES[spec].split(":")[0]
        try:
            importlib.import_module(module)
            return spec
        except Exception as exc:  # noqa: BLE001 - a stage being written elsewhere may not import yet
            problems.append(f"{spec}: {exc}")
    pytest.skip("no denoise stage imports: " + "; ".join(problems))


def test_prometheus_text_is_parsed_whatever_the_exporter() -> None:
    text = """# HELP mediaserver_rooms Rooms open.
# TYPE mediaserver_rooms gauge
mediaserver_rooms 2
mediaserver_participants{room="a"} 3
mediaserver_participants{room="b",note="say \\"hi\\""} 4
mediaserver_latency_e2e_seconds_bucket{kind="microphone",le="+Inf"} 17.0 1700000000000
mediaserver_clock_lag_seconds NaN
target_info{service_name="mediaserver"} 1
garbage line
"""
    samples = parse(text)
    agg = aggregate(samples)
    assert agg["mediaserver_rooms"]["sum"] == 2
    assert agg["mediaserver_participants"] == {"sum": 7.0, "max": 4.0, "count": 2}
    assert dict(samples[2].labels)["note"] == 'say "hi"'
    assert agg["mediaserver_latency_e2e_seconds_bucket"]["sum"] == 17.0
    assert "mediaserver_clock_lag_seconds" not in agg  # NaN carries no figure
    assert math.isnan(next(s.value for s in samples if s.name == "mediaserver_clock_lag_seconds"))


def test_marker_recovers_a_known_delay_from_real_speech_through_opus() -> None:
    lib = _library(snr_db=5.0)
    signal = lib.signal(3)
    decoder = OpusDecoder()
    decoded = [block for p in encode_opus(signal.mix) for block in decode_opus(decoder, p)]
    n = len(decoded)
    t0, delay = 100.0, 0.1234
    send = SendTimeline(times=t0 + np.arange(n) * 0.02, pts=np.arange(n, dtype=np.int64) * 960)
    arrivals = t0 + delay + np.arange(n) * 0.02 + np.random.default_rng(0).uniform(0, 0.004, n)
    seg = ReceivedSegment(audio=np.concatenate(decoded), starts=np.arange(n) * 960, deliver=arrivals, wire=arrivals)
    found = measure_segment(seg, [MarkerTemplate(signal.speech), MarkerTemplate(signal.mix)], send)
    expected = (delay * 1000.0 + opus_lookahead_ms())
    assert len(found) >= n * 0.02 / 0.5 * 0.5, "too few windows matched in real speech"
    # each window also measures its first packet's arrival jitter (0-4 ms, 2 on average)
    errors = [s.wire_ms - expected for s in found]
    assert abs(float(np.median(errors)) - 2.0) < 1.5, f"median error {np.median(errors):.2f} ms"
    assert all(-0.5 < e < 4.5 for e in errors), errors
    assert min(s.ncc for s in found) >= 0.5


def _server_kept_up(report: dict, publisher_stages: str) -> tuple[bool, str]:
    """Did the server run the stages of those publishers in real time? Its own counters, over the wire."""
    samples = [x for v in report["window"]["server_stats"].values() for x in v if x.get("stages")]
    if len(samples) < 2:
        return False, "no stats from the server"
    first, last = samples[0], samples[-1]
    chunks = max(1, last["chunks"] - first["chunks"])
    bypassed = (last["bypassed"] - first["bypassed"]) / chunks
    backlog = (last.get("dropped_backlog", 0) - first.get("dropped_backlog", 0)) / chunks
    measured = report["summary"]["by_stages"][publisher_stages]["drop_rate"]
    why = (f"server bypassed {bypassed:.0%} and dropped {backlog:.0%} of the denoised chunks, "
           f"subscribers missed {measured:.0%} of its frames")
    return bypassed < 0.2 and backlog < 0.05 and measured < 0.05, why


async def test_short_run_is_plausible_and_denoising_helps(start_server: ServerFactory) -> None:
    """Three bots in one room, real speech in real noise; the middle one asks for the denoiser.

    Publishers say different things over different noises, so the denoiser is
    judged by each publisher's DNSMOS gain: received minus what it sent over
    the same span.
    """
    _library()
    spec = _denoiser()
    # The stage is loaded at start, so the first chunks are already denoised.  A deadline of 120 ms (not 40)
    # lets a busy shared machine still denoise rather than pass chunks through, and stays under the
    # 160 ms of chunks a stream may have in flight before the server drops them.
    enhance = replace(EnhanceConfig(), default_stages=(spec,), device="cpu", deadline_ms=120.0)
    server = await start_server(ServerConfig(host="127.0.0.1", port=0, auth=AuthConfig(dev_mode=True),
                                             enhance=enhance))
    config = SessionConfig(url=server.url, sources=SourceConfig(str(EVAL / "speech"), str(EVAL / "noise"), 5.0),
                           stages="none;default", processes=1, warmup_s=3.0, progress=False, sequential_joins=True)
    report = await run_load(config, bots=3, rooms=1, duration_s=9.0)
    s = report["summary"]
    window = report["window"]
    print(json.dumps({k: s[k] for k in ("latency_ms", "server_e2e_latency_ms", "drop_rate", "jitter_ms", "by_stages")}))
    assert s["bots_failed"] == 0, [j["error"] for j in report["joins"]]
    # every pair of the room is accounted for: measured, or reported as never arrived
    assert s["streams"] + s["streams_missing"] == 6, window["streams_missing"]
    assert s["streams_missing"] == 0 or window["streams_missing"]
    for stream in window["streams"]:  # the loss figures add up
        assert stream["frames_received"] + stream["dropped"] >= stream["frames_expected"]
        assert 0.0 <= stream["drop_rate"] <= 1.0
    healthy = [x for x in window["streams"] if x["drop_rate"] < 0.2]  # a busy machine makes the server skip ticks
    assert len(healthy) >= 4, [(x["publisher"], x["drop_rate"]) for x in window["streams"]]
    for stream in healthy:  # what a subscriber heard is its publisher's speech, recognisably
        assert stream["latency_windows"] >= 3, stream
        assert stream["marker_ncc_median"] >= 0.5, stream
        assert 15.0 < stream["latency_ms"]["p50"] < 600.0, stream["latency_ms"]
        assert stream["jitter_ms"] < 40.0
    groups = s["by_stages"]
    off, on = groups["none"], groups["room default"]
    # latency from the audio against the server's own figure (which counts the denoiser's look-ahead)
    assert off["marker_vs_server"] is not None and abs(off["marker_vs_server"]) <= 20.0, s["marker_vs_server"]
    kept_up, why = _server_kept_up(report, "room default")
    if not kept_up:
        pytest.skip(f"all other checks passed, but this machine is too busy to judge the denoiser: {why}")
    assert on["dnsmos"]["n"] >= 1 and off["dnsmos"]["n"] == 2, groups
    assert on["dnsmos_gain"]["bak"] > off["dnsmos_gain"]["bak"] + 0.3, (groups, why)
    assert on["dnsmos_gain"]["ovrl"] > off["dnsmos_gain"]["ovrl"], (groups, why)
    assert on["marker_vs_server"] is not None and abs(on["marker_vs_server"]) <= 20.0, s["marker_vs_server"]


async def test_counted_only_streams_still_report_every_frame(start_server: ServerFactory) -> None:
    """Bots that decode none of what they receive (big-room load) still account for every stream's frames."""
    _library()
    server = await start_server(ServerConfig(host="127.0.0.1", port=0, auth=AuthConfig(dev_mode=True)))
    config = SessionConfig(url=server.url, sources=SourceConfig(str(EVAL / "speech"), None, None),
                           stages="none", processes=0, warmup_s=2.0, progress=False, decode_share=0.0,
                           dnsmos_per_publisher=0, score_sent=False)
    report = await run_load(config, bots=3, rooms=1, duration_s=4.0)
    window = report["window"]
    assert report["summary"]["bots_failed"] == 0, [j["error"] for j in report["joins"]]
    assert len(window["streams"]) == 6, window["streams_missing"]
    for stream in window["streams"]:
        assert stream["frames_received"] >= 0.5 * stream["frames_expected"] > 0, stream
        assert stream["latency_windows"] == 0  # nothing decoded: no marker latency, by design


async def test_fast_path_measures_known_losses_and_latency(start_server: ServerFactory) -> None:
    """Bots on the fast media path (loadtest.wire) against a real server: what they lose is counted.

    Three bots in a room, every stream decoded.  Mid-window one publisher's
    sender skips 25 packets (500 ms lost on its way to the server) and another
    stops sending for the last 2 s; the third is untouched.  Their subscribers
    must report exactly that as missing frames and gaps, and the marker
    latency must agree with the server's own figure.
    """
    _library()
    server = await start_server(ServerConfig(host="127.0.0.1", port=0, auth=AuthConfig(dev_mode=True)))
    config = SessionConfig(url=server.url, sources=SourceConfig(str(EVAL / "speech"), None, None), stages="none",
                           processes=0, warmup_s=3.0, progress=False, dnsmos_per_publisher=0, score_sent=False)
    assert config.fast and config.light
    session = LoadSession(config)
    await session.start()
    try:
        await session.prepare(3)
        joins = await session.add_bots([session.room_name(0)] * 3)
        assert all(j["ok"] for j in joins), joins
        await session.hold(config.warmup_s, "warm-up")
        host = session.hosts[0]
        assert isinstance(host, LocalHost)
        bots = {bot.id: bot for _, bot in host.host.bots}
        gap_pub, stop_pub, clean_pub = sorted(bots)
        assert all(b.wire_sender is not None for b in bots.values()), "the fast path did not take the senders"
        window = asyncio.get_running_loop().create_task(session.measure(7.0, halt=True))
        await asyncio.sleep(2.0)
        bots[gap_pub].wire_sender.skip(25)  # type: ignore[union-attr]
        await asyncio.sleep(3.0)
        bots[stop_pub].wire_sender.stopped = True  # type: ignore[union-attr]
        report = await window
    finally:
        await session.close()
    s = report["summary"]
    media = s["loadgen_media"]
    assert media["received"] > 0 and media["fallback"] <= 5 and media["skipped"] == 25, media
    assert s["streams"] == 6, report["streams_missing"]
    by_pub: dict[str, list[dict]] = {}
    for stream in report["streams"]:
        by_pub.setdefault(stream["publisher"], []).append(stream)
    print(json.dumps({pub: [(x["dropped"], x["gaps"], x["longest_gap_ms"], x["latency_ms"]["p50"]) for x in xs]
                      for pub, xs in by_pub.items()}))
    for stream in by_pub[clean_pub]:
        assert stream["dropped"] <= 3 and stream["gaps"] == 0, stream
    for stream in by_pub[gap_pub]:  # one hole of 25 frames
        assert 22 <= stream["dropped"] <= 30, stream
        assert stream["gaps"] >= 1 and 440.0 <= stream["longest_gap_ms"] <= 580.0, stream
    for stream in by_pub[stop_pub]:  # the last 2 s of the window missing
        assert 85 <= stream["dropped"] <= 115, stream
    for stream in report["streams"]:
        assert stream["latency_windows"] >= 3, stream
        assert 10.0 < stream["latency_ms"]["p50"] < 400.0, stream["latency_ms"]
    assert s["marker_vs_server"] is not None and abs(s["marker_vs_server"]["difference_ms"]) <= 20.0, \
        s["marker_vs_server"]


async def test_bots_join_through_the_servers_they_are_given() -> None:
    """Several servers (a cluster's nodes): bots take ``join_urls`` in turn, or the URL ``add_bots`` names
    for each; a bot on the session's own URL keeps ``url=None`` (its host's)."""

    class Recorder:
        def __init__(self) -> None:
            self.specs: list[Any] = []

        async def call(self, command: str, **kwargs: Any) -> Any:
            assert command == "add"
            self.specs += kwargs["specs"]
            return [{"name": s.name, "index": s.index, "room": s.room, "id": s.name, "ok": True}
                    for s in kwargs["specs"]]

    a, b = "http://127.0.0.1:9001", "http://127.0.0.1:9002"
    session = LoadSession(SessionConfig(url=a, join_urls=[a, b], progress=False))
    host = Recorder()
    session.hosts = [host]  # type: ignore[list-item]
    await session.add_bots(["r"] * 4)
    await session.add_bots(["r"] * 2, urls=[b, a])
    assert [s.url for s in host.specs] == [None, b, None, b, b, None]
    assert all(s.local_addr == "127.0.0.2" for s in host.specs)
    with pytest.raises(ValueError):
        await session.add_bots(["r"] * 2, urls=[a])
