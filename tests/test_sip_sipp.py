"""The SIP bridge against sipp, a real SIP UA: refusals, a call with RTP, DTMF, an INVITE flood.

Scenarios live in tests/sip_scenarios/.  sipp's exit status says whether
every call of a scenario went as scripted (status codes included).
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import time
from pathlib import Path

import numpy as np
import pytest

from loadtest.bot import Bot
from tests.audio_checks import content_match, longest_silence_ms, looped
from tests.conftest import ServerFactory, noise, speech
from tests.test_sip_support import (
    SipServer,
    free_port,
    needs_sipp,
    run_sipp,
    start_sip_server,
    telephone_band,
    wait_for,
    write_ulaw,
)

pytestmark = needs_sipp
DTMF_PCAP_DIRS = [Path("/usr/share/sip-tester"), Path("/usr/share/sipp"), Path("/usr/local/share/sipp")]


def sip_participants(server: SipServer, room: str) -> list[str]:
    r = server.running.server.rooms.rooms.get(room)
    return [p.id for p in r.participants.values() if p.kind == "sip"] if r is not None else []


async def test_refusals_and_options(start_server: ServerFactory, tmp_path: Path) -> None:
    server = await start_sip_server(start_server)
    for scenario, service, status in (("options.xml", "anyone", 200), ("unknown_user.xml", "nobody", 404),
                                      ("no_codec.xml", "room-x", 488), ("malformed.xml", "room-x", 400)):
        result = await run_sipp(scenario, server.port, service, tmp_path, timeout_s=10)
        assert result.rc == 0, f"{scenario}: sipp failed (rc {result.rc}): {result.errors[-800:]}"
        assert server.sip.stats[f"status_{status}"] >= 1
    for status in (416, 420, 483):  # the malformed scenario's other refusals
        assert server.sip.stats[f"status_{status}"] == 1
    # garbage that is not SIP at all gets no answer, and the endpoint keeps serving
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.3)
        for junk in (b"\x00\xff" * 40, b"INVITE\r\n\r\n", b"SIP/2.0 200\r\n", b"\r\n\r\n"):
            s.sendto(junk, ("127.0.0.1", server.port))
        await asyncio.sleep(0.3)
        try:
            reply = s.recv(4096)
        except TimeoutError:
            reply = b""
    assert reply == b""
    again = await run_sipp("options.xml", server.port, "anyone", tmp_path, timeout_s=10)
    assert again.rc == 0
    assert server.running.server.rooms.participant_count == 0  # none of this created a call


async def test_call_with_rtp_reaches_the_room(start_server: ServerFactory, tmp_path: Path) -> None:
    server = await start_sip_server(start_server)
    voice = speech("cmu_arctic_us_aew_a0002.wav")
    write_ulaw(tmp_path / "caller.ulaw", voice)
    listener = Bot(server.running.url, "sipp", "listener", publish=False)
    await listener.join()
    try:
        call = asyncio.ensure_future(run_sipp("call_rtp.xml", server.port, "room-sipp", tmp_path,
                                              duration_ms=6000, media_port=free_port()))
        await wait_for(lambda: bool(sip_participants(server, "sipp")), 10, "the call joined room sipp")
        phone = sip_participants(server, "sipp")[0]
        await asyncio.sleep(4.5)
        got = listener.received_from(phone)
        assert len(got) > 48_000 * 3, "the phone's audio did not reach the WebRTC participant"
        ncc = content_match(got[24_000:], looped(telephone_band(voice)))
        assert ncc > 0.5, f"the room hears something else than the caller (ncc {ncc:.2f})"  # typical: 0.9
        other = content_match(got[24_000:], looped(telephone_band(speech("cmu_arctic_us_axb_a0006.wav"))))
        assert other < 0.4, f"the check cannot tell speakers apart (ncc {other:.2f})"
        room = server.running.server.rooms.get("sipp")
        stats = {s["participant"]: s for s in (server.running.server.stream_stats(x) for x in room.streams.values())}
        assert stats[phone]["received"] > 150 and stats[phone]["lost"] == 0  # telemetry like any participant
        result = await call
        assert result.rc == 0, result.errors[-800:]
        await wait_for(lambda: not sip_participants(server, "sipp"), 5, "the caller left after BYE")
    finally:
        await listener.leave()


async def test_dtmf_menu_joins_the_chosen_room(start_server: ServerFactory, tmp_path: Path) -> None:
    pcaps = next((d for d in DTMF_PCAP_DIRS if (d / "dtmf_2833_pound.pcap").exists()), None)
    if pcaps is None:
        pytest.skip("sipp's DTMF captures (dtmf_2833_*.pcap) are not installed")
    for name in ("dtmf_2833_4.pcap", "dtmf_2833_2.pcap", "dtmf_2833_pound.pcap"):
        shutil.copy(pcaps / name, tmp_path / name)
    server = await start_sip_server(start_server)
    call = asyncio.ensure_future(run_sipp("ivr_dtmf.xml", server.port, "ivr", tmp_path, duration_ms=2500,
                                          media_port=free_port()))
    await wait_for(lambda: bool(sip_participants(server, "42")), 12, "the caller typed 4 2 # and joined room 42")
    result = await call
    assert result.rc == 0, result.errors[-800:]


async def test_invite_flood_is_refused_and_other_calls_keep_flowing(start_server: ServerFactory,
                                                                    tmp_path: Path) -> None:
    server = await start_sip_server(start_server, max_calls=6, call_rate=2.0, call_burst=4)
    steady = noise("running_tap.wav", seconds=3.0) * 4.0  # continuous: any interruption shows as a gap
    write_ulaw(tmp_path / "caller.ulaw", steady)
    listener = Bot(server.running.url, "steady", "listener", publish=False)
    await listener.join()
    try:
        call = asyncio.ensure_future(run_sipp("call_rtp.xml", server.port, "room-steady", tmp_path,
                                              duration_ms=9000, media_port=free_port()))
        await wait_for(lambda: bool(sip_participants(server, "steady")), 10, "the steady call joined")
        phone = sip_participants(server, "steady")[0]
        await wait_for(lambda: len(listener.received_from(phone)) > 48_000, 10, "the steady call is heard")
        t_flood = time.monotonic()
        flood = await run_sipp("flood.xml", server.port, "room-flood", tmp_path, calls=60, rate=150,
                               timeout_s=20)
        flood_s = time.monotonic() - t_flood
        stats = server.sip.stats
        assert flood.rc == 0, f"a flood call did not end as 200 or 503: {flood.errors[-800:]}"
        assert stats["status_503"] >= 40, f"the flood was not refused: {dict(stats)}"
        assert stats["calls_answered"] <= 1 + 4 + int(2.0 * flood_s) + 2
        around = listener.received_from(phone, since=t_flood)
        assert len(around) > 48_000 * min(flood_s, 1.0) * 0.8, "the steady call stopped during the flood"
        # an outage caused by the flood would last as long as the flood (about a second); shorter gaps are
        # scheduling hiccups of this shared test machine, where one event loop runs the server and the bot
        gap = longest_silence_ms(around[4800:])
        assert gap < 400.0, f"the steady call was interrupted by the flood ({gap:.0f} ms)"
        steady_stats = server.running.server.stream_stats(server.running.server.rooms.get("steady").streams[
            f"{phone}-mic"])
        assert steady_stats["lost"] == 0, "RTP of the steady call was lost during the flood"
        assert sip_participants(server, "steady") == [phone]
        ok = await run_sipp("options.xml", server.port, "anyone", tmp_path, timeout_s=10)
        assert ok.rc == 0, "the endpoint stopped answering after the flood"
        result = await call
        assert result.rc == 0, result.errors[-800:]
        assert np.isfinite(server.running.server.health()["uptime_s"])
    finally:
        await listener.leave()
