"""Hostile datagrams at the server's WebRTC media ports: a call goes on, every bad packet is dropped and counted.

Two real aiortc participants talk through the real server (in-process); random and mutated
RTP/RTCP/STUN/DTLS datagrams, and the 1600-byte 0x80 datagram that used to end a participant's
receive loop (``ValueError("packet is too long")`` from SRTP), are sent at both participants'
server-side media ports: from a stranger's socket (screened at the socket) and from each
client's own ICE socket (a known source: these reach aiortc's DTLS/SRTP/RTP layers).
``bench/media_flood.py`` measures the audio gaps; here the call must survive.
"""

from __future__ import annotations

import asyncio
import random
import re
import socket
import struct
import time
from dataclasses import replace
from typing import Any, Iterator

import aiohttp

from loadtest.bot import Bot
from mediaserver.config import AuthConfig, EnhanceConfig, LimitsConfig, ServerConfig
from mediaserver.session import PeerSession
from mediaserver.transport_guard import PROCESS_DROPS
from tests.audio_checks import content_match, looped
from tests.conftest import RunningServer, ServerFactory, speech
from tests.test_sfu_call import _wait_for

PACKET_TOO_LONG = b"\x80" + bytes(1599)  # the datagram of issue 17


def hostile_datagrams(rng: random.Random, count: int, ssrc: int = 0) -> Iterator[bytes]:
    """``count`` random and mutated datagrams: STUN (0x00-0x03), DTLS (0x14-0x3f), RTP/RTCP (0x80-0xbf), junk.

    Sizes 0 to 2100 bytes; structured ones have plausible headers (STUN magic cookie and
    attributes with wrong lengths, DTLS record headers, RTP with the real SSRC, RTCP packet
    types 200-206), then bytes flipped, cut or appended.
    """
    for i in range(count):
        kind = i % 5
        if kind == 0:  # STUN binding request / response / error with broken attributes
            attrs = b"".join(struct.pack("!HH", rng.choice([0x0006, 0x0008, 0x0020, 0x0024, 0x8028, 0x8029,
                                                             rng.randrange(1 << 16)]), rng.randrange(64))
                             + rng.randbytes(rng.randrange(0, 24)) for _ in range(rng.randrange(0, 6)))
            head = struct.pack("!HHI", rng.choice([0x0001, 0x0101, 0x0111, 0x0002, rng.randrange(0x4000)]),
                               len(attrs) if rng.random() < 0.7 else rng.randrange(1 << 16), 0x2112A442)
            data = head + rng.randbytes(12) + attrs
        elif kind == 1:  # DTLS record: content type 20-25, version, epoch, sequence, length
            body = rng.randbytes(rng.choice([0, 1, 13, 60, 300, 1200, 1499]))
            data = bytes([rng.randrange(0x14, 0x40), 0xFE, rng.choice([0xFD, 0xFF])]) + rng.randbytes(8) \
                + struct.pack("!H", len(body) if rng.random() < 0.5 else rng.randrange(1 << 16)) + body
        elif kind == 2:  # RTP, version 2, the real SSRC or another, Opus payload type
            data = bytes([rng.randrange(0x80, 0xC0), rng.choice([111, 111 | 0x80, rng.randrange(256)])]) \
                + struct.pack("!HII", rng.randrange(1 << 16), rng.randrange(1 << 32),
                              ssrc if rng.random() < 0.7 else rng.randrange(1 << 32)) \
                + rng.randbytes(rng.choice([0, 1, 20, 160, 1000, 1480, 1588, 2000]))
        elif kind == 3:  # RTCP: SR, RR, SDES, BYE, APP, RTPFB, PSFB with lying lengths
            data = bytes([rng.randrange(0x80, 0xC0), rng.randrange(200, 207)]) \
                + struct.pack("!HI", rng.randrange(1 << 16), ssrc) + rng.randbytes(rng.choice([0, 3, 20, 100, 1600]))
        else:  # anything at all, any size
            data = rng.randbytes(rng.choice([0, 1, 2, 7, 19, 20, 64, 500, 1500, 1501, 1600, 2100]))
        if data and rng.random() < 0.3:  # mutate: flip bytes, cut, append
            b = bytearray(data)
            for _ in range(rng.randrange(1, 4)):
                b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
            data = bytes(b[: rng.randrange(len(b) + 1)] if rng.random() < 0.3 else b + rng.randbytes(rng.randrange(40)))
        yield data


def server_media_ports(rs: RunningServer, room: str, participant_id: str) -> list[tuple[str, int]]:
    """Local IPv4 addresses of every ICE socket the server opened for one participant."""
    pc = _session(rs, room, participant_id).pc
    out = set()
    for t in pc.getTransceivers():
        for end in (t.receiver, t.sender):
            for protocol in end.transport.transport._connection._protocols:
                host, port = protocol.transport.get_extra_info("sockname")[:2]
                if ":" not in host:
                    out.add((host, port))
    return sorted(out)


def _session(rs: RunningServer, room: str, participant_id: Any) -> PeerSession:
    session = rs.server.rooms.rooms[room].participants[participant_id].session
    assert isinstance(session, PeerSession)
    return session


def client_socket(bot: Bot) -> tuple[Any, tuple[str, int]]:
    """The bot's nominated ICE socket and the server address it talks to (a known source for the server)."""
    for t in bot.pc.getTransceivers():
        for pair in t.receiver.transport.transport._connection._nominated.values():
            return pair.protocol.transport, pair.remote_addr
    raise AssertionError("the bot has no nominated ICE pair")


def publisher_ssrc(bot: Bot) -> int:
    return next(int(t.sender._ssrc) for t in bot.pc.getTransceivers() if t.sender.track is not None)


async def _blast(send: Any, datagrams: Iterator[bytes], per_burst: int = 40, pause_s: float = 0.004) -> int:
    """Send in bursts with a pause between (about 10 k datagrams/s on an idle machine); the count sent."""
    n = 0
    for data in datagrams:
        send(data)
        n += 1
        if n % per_burst == 0:
            await asyncio.sleep(pause_s)
    return n


async def _call(rs: RunningServer, room: str) -> tuple[Bot, Bot, Any, Any]:
    a_src, b_src = speech("cmu_arctic_us_aew_a0001.wav"), speech("cmu_arctic_us_axb_a0004.wav")
    a, b = Bot(rs.url, room, "alice", a_src), Bot(rs.url, room, "bob", b_src)
    await a.join()
    await b.join()
    await _wait_for(lambda: a.id is not None and b.id is not None and len(a.recordings) == 1
                    and len(b.recordings) == 1, 15)
    await _wait_for(lambda: len(a.received_from(b.id)) > 24_000 and len(b.received_from(a.id)) > 24_000, 15)  # type: ignore[arg-type]
    return a, b, a_src, b_src


async def _assert_call_goes_on(rs: RunningServer, room: str, a: Bot, b: Bot, a_src: Any, b_src: Any) -> None:
    await asyncio.sleep(1.0)
    t0 = time.monotonic()
    await asyncio.sleep(3.0)
    for listener, talker, src in ((a, b, b_src), (b, a, a_src)):
        heard = listener.received_from(talker.id, since=t0)  # type: ignore[arg-type]
        assert len(heard) > 48_000 * 2.0, f"{listener.name} stopped hearing {talker.name} ({len(heard)} samples)"
        ncc = content_match(heard, looped(src))
        assert ncc > 0.5, f"{listener.name} hears something else than {talker.name} (ncc {ncc:.2f})"
    assert set(rs.server.rooms.rooms[room].participants) == {a.id, b.id}, "someone was evicted"
    for bot in (a, b):
        assert not bot.events_of("participant-left") and not bot.events_of("bye"), bot.events
        assert bot.pc.connectionState == "connected"


async def test_fuzzed_datagrams_at_both_media_ports_change_nothing(start_server: ServerFactory) -> None:
    # a raised datagram limit and rate let the fuzz reach aiortc's DTLS/SRTP/RTP layers from the
    # clients' own sockets (with the defaults most of it stops at the socket, see the next test)
    limits = replace(LimitsConfig(), media_max_datagram_bytes=4096, media_packets_per_second=1e6,
                     media_packet_burst=1_000_000)
    rs = await start_server(ServerConfig(host="127.0.0.1", port=0, auth=AuthConfig(dev_mode=True),
                                         enhance=replace(EnhanceConfig(), default_stages=(), device="cpu"),
                                         limits=limits))
    a, b, a_src, b_src = await _call(rs, "fuzz")
    before = dict(PROCESS_DROPS)
    stranger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sent = 0
    try:
        rng = random.Random(17)
        for bot in (a, b):
            guard = _session(rs, "fuzz", bot.id).guard
            ports = server_media_ports(rs, "fuzz", bot.id)  # type: ignore[arg-type]
            assert ports
            own, server_addr = client_socket(bot)
            ssrc = publisher_ssrc(bot)
            own.sendto(PACKET_TOO_LONG, server_addr)
            stranger.sendto(PACKET_TOO_LONG, server_addr)
            sent += 2
            sent += await _blast(lambda d: own.sendto(d, server_addr), hostile_datagrams(rng, 3000, ssrc))
            for port in ports:
                sent += await _blast(lambda d, p=port: stranger.sendto(d, p), hostile_datagrams(rng, 2500 // len(ports), ssrc))
            await asyncio.sleep(0.5)
            assert guard.dropped["rtp-error"] >= 1, guard.dropped  # the 1600-byte datagram reached SRTP, was dropped
            assert guard.dropped["unknown-source"] > 1000, guard.dropped
        assert sent >= 10_000
        await _assert_call_goes_on(rs, "fuzz", a, b, a_src, b_src)
        assert PROCESS_DROPS["rtp-error"] > before["rtp-error"] and PROCESS_DROPS["empty"] > before["empty"]
        async with aiohttp.ClientSession() as http:
            text = await (await http.get(f"{rs.url}/metrics")).text()
            stats = (await (await http.get(f"{rs.url}/api/rooms/fuzz")).json())["stats"]
        found = re.search(r'^mediaserver_media_packets_dropped_total\{[^}]*reason="unknown-source"[^}]*\} (\d+)', text, re.M)
        assert found and int(found.group(1)) > 0, [line for line in text.splitlines() if "dropped" in line]
        assert all(s["media_dropped"].get("unknown-source", 0) > 0 for s in stats), stats
    finally:
        stranger.close()
        await a.leave()
        await b.leave()


async def test_the_issue_datagram_and_a_flood_with_default_limits(server: RunningServer) -> None:
    a, b, a_src, b_src = await _call(server, "flood")
    own, server_addr = client_socket(b)
    # the nominated pair may be IPv6 (this machine has both): the stranger speaks the same family
    stranger = socket.socket(socket.AF_INET6 if ":" in server_addr[0] else socket.AF_INET, socket.SOCK_DGRAM)
    try:
        guard = _session(server, "flood", b.id).guard
        for _ in range(3):
            own.sendto(PACKET_TOO_LONG, server_addr)
            stranger.sendto(PACKET_TOO_LONG, server_addr)
        junk = (bytes([0x80, 111]) + random.Random(i).randbytes(158) for i in range(6000))
        await _blast(lambda d: stranger.sendto(d, server_addr), junk, per_burst=100, pause_s=0.005)
        await asyncio.sleep(0.3)
        assert guard.dropped["oversize"] >= 6 and guard.dropped["unknown-source"] >= 5000, guard.dropped
        assert guard.dropped["rtp-error"] == 0  # nothing of it got as far as SRTP
        await _assert_call_goes_on(server, "flood", a, b, a_src, b_src)
    finally:
        stranger.close()
        await a.leave()
        await b.leave()
