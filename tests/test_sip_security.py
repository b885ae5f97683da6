"""Who may call in, and what floods cost: the SIP bridge in production mode against real UAs.

Production mode (no ``--dev``): an INVITE without digest credentials gets 401
and no SDP answer, so no room audio reaches it; the right credentials join
the room and audio flows both ways; a wrong password, a room the user may not
enter and a replayed Authorization get 403; a trusted source network skips
authentication.  Floods: INVITEs into one room are capped per source and per
room and refused statelessly (one response each, no SDP parsed); idle TCP
connections cannot lock new callers out.  sipp is the real UA where one is
needed; ``loadtest.sip_attacks`` holds the attacks.  All traffic is on
loopback (127.0.0.x source addresses), bounded in count and time.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import replace
from pathlib import Path

import pytest

from loadtest.bot import Bot
from loadtest.sip_attacks import (
    SipProbe,
    closed_by_server,
    digest_authorization,
    invite_flood,
    sdp_offer,
    tcp_idle_flood,
    tcp_options,
)
from mediaserver.auth import create_token
from mediaserver.config import AuthConfig, LimitsConfig, SipConfig, load_config
from signaling.app import SIP_KEY
from signaling.sip import server as sip_server_module
from signaling.sip.auth import AuthResult, SipAuthenticator
from signaling.sip.message import SipRequest, parse_message
from tests.conftest import ServerFactory, speech
from tests.test_sip_support import (
    SipServer,
    free_port,
    needs_sipp,
    run_sipp,
    sip_config,
    wait_for,
    write_ulaw,
)

SECRET = "sip-security-test-secret-of-32-bytes!"
USERS = (("alice", "wonderland", ("secure",)), ("bob", "builder", ("other",)))


async def production(start_server: ServerFactory, max_participants: int = 50, **sip: object) -> SipServer:
    """A server in production mode (join tokens, SIP digest auth) with the bridge on a free port."""
    sip.setdefault("users", USERS)
    sip.setdefault("dial_plan", (("5000", "secure"),))
    cfg = replace(sip_config(**sip), auth=AuthConfig(dev_mode=False, secret=SECRET),
                  limits=replace(LimitsConfig(), max_participants_per_room=max_participants))
    running = await start_server(cfg)
    return SipServer(running, running.runner.app[SIP_KEY])


def bot(server: SipServer, room: str, name: str, publish: bool = True) -> Bot:
    token = create_token(SECRET, room=room, identity=f"{name}-{secrets.token_hex(3)}", ttl_s=600)
    return Bot(server.running.url, room, name, speech("cmu_arctic_us_aew_a0001.wav") if publish else None,
               publish=publish, token=token)


def phones_in(server: SipServer, room: str) -> list[str]:
    r = server.running.server.rooms.rooms.get(room)
    return [p.id for p in r.participants.values() if p.kind == "sip"] if r is not None else []


def test_config_and_dev_mode() -> None:
    cfg = load_config({"MEDIASERVER_AUTH_SECRET": "x", "MEDIASERVER_SIP_USERS": "alice:pw:a|b,bob:p:w:*",
                       "MEDIASERVER_SIP_TRUSTED": "10.0.0.0/8,127.0.0.1"})
    assert cfg.sip.users == (("alice", "pw", ("a", "b")), ("bob", "p:w", ("*",)))
    assert "pw" not in repr(cfg.sip)  # passwords stay out of logged configuration
    with pytest.raises(ValueError):
        load_config({"MEDIASERVER_AUTH_SECRET": "x", "MEDIASERVER_SIP_TRUSTED": "not-a-network"})
    with pytest.raises(ValueError):
        load_config({"MEDIASERVER_AUTH_SECRET": "x", "MEDIASERVER_SIP_USERS": "nopassword"})
    assert not SipAuthenticator(SipConfig(), dev_mode=True).required  # dev mode keeps anonymous calls
    assert SipAuthenticator(SipConfig(), dev_mode=False).required
    trusted = SipAuthenticator(SipConfig(trusted_networks=("10.1.0.0/16",)), dev_mode=False)
    assert trusted.is_trusted("10.1.2.3") and not trusted.is_trusted("10.2.0.1") and not trusted.is_trusted("x")
    # nonces: too old -> a fresh challenge with stale=true; from another address -> a fresh challenge
    auth = SipAuthenticator(SipConfig(users=USERS), dev_mode=False)
    uri = "sip:room-secure@127.0.0.1:5060"

    def invite(nonce: str, ip: str = "192.0.2.1") -> AuthResult:
        challenge = f'Digest realm="mediaserver", nonce="{nonce}", algorithm=SHA-256, qop="auth"'
        creds = digest_authorization(challenge, "INVITE", uri, "alice", "wonderland")
        req = parse_message((f"INVITE {uri} SIP/2.0\r\nVia: SIP/2.0/UDP {ip}:5060;branch=z9hG4bKa\r\n"
                             f"From: <sip:a@{ip}>;tag=1\r\nTo: <{uri}>\r\nCall-ID: c\r\nCSeq: 1 INVITE\r\n"
                             f"Authorization: {creds}\r\nContent-Length: 0\r\n\r\n").encode())
        assert isinstance(req, SipRequest)
        return auth.check(req, ip)

    assert invite(auth.make_nonce("192.0.2.1")).ok
    old = invite(auth.make_nonce("192.0.2.1", now=time.time() - 1000))
    assert old.status == 401 and "stale=true" in old.headers[0][1]
    elsewhere = invite(auth.make_nonce("192.0.2.99"))
    assert elsewhere.status == 401 and "stale" not in elsewhere.headers[0][1]


@needs_sipp
async def test_anonymous_callers_are_challenged_and_hear_nothing(start_server: ServerFactory,
                                                                 tmp_path: Path) -> None:
    server = await production(start_server)
    speaker = bot(server, "secure", "speaker")
    await speaker.join()
    probe = await SipProbe(("127.0.0.1", server.port)).open()
    try:
        for user in ("room-secure", "5000", "ivr"):  # direct, dial-plan mapped, the menu: all need credentials
            assert await probe.invite(user) == [401], user
            challenges = probe.last.header("www-authenticate") if probe.last else []
            assert [c.split("algorithm=")[1].split(",")[0] for c in challenges] == ["SHA-256", "MD5"]
            assert all('qop="auth"' in c and 'realm="mediaserver"' in c for c in challenges)
        bogus = 'Digest username="alice", realm="mediaserver", nonce="1.2", uri="x", response="0", qop=auth'
        probe.send(probe.request("INVITE", "room-secure", extra=f"Authorization: {bogus}\r\n"))
        assert (await probe.final()) is not None and probe.last is not None and probe.last.status == 401
        anonymous = await run_sipp("anonymous.xml", server.port, "room-secure", tmp_path, timeout_s=10)
        assert anonymous.rc == 0, f"sipp: {anonymous.errors[-800:]}"
        await asyncio.sleep(1.5)
        assert probe.rtp_received() == 0, "an anonymous caller received RTP"
        assert not server.sip.dialogs and phones_in(server, "secure") == []
        assert len(server.running.server.rooms.get("secure").participants) == 1
        assert server.sip.stats["status_200"] == 0
    finally:
        probe.close()
        await speaker.leave()


@needs_sipp
async def test_digest_caller_joins_and_audio_flows(start_server: ServerFactory, tmp_path: Path) -> None:
    server = await production(start_server, digest_algorithms=("MD5", "SHA-256"))  # sipp reads the first only
    listener = bot(server, "secure", "listener", publish=False)
    speaker = bot(server, "secure", "speaker")
    await listener.join()
    await speaker.join()
    write_ulaw(tmp_path / "caller.ulaw", speech("cmu_arctic_us_axb_a0006.wav"))
    try:
        call = asyncio.ensure_future(run_sipp("auth_call.xml", server.port, "room-secure", tmp_path,
                                              duration_ms=5000, media_port=free_port()))  # sipp: MD5
        await wait_for(lambda: bool(phones_in(server, "secure")), 15, "the authenticated sipp call joined")
        phone = phones_in(server, "secure")[0]
        await wait_for(lambda: len(listener.received_from(phone)) > 48_000, 10, "the room hears the phone")
        result = await call
        assert result.rc == 0, f"sipp: {result.errors[-800:]}"
        await wait_for(lambda: not phones_in(server, "secure"), 5, "the sipp caller left")

        probe = await SipProbe(("127.0.0.1", server.port)).open()  # SHA-256, and the phone hears the room
        try:
            assert await probe.invite("5000", ("alice", "wonderland"), "SHA-256") == [401, 200]
            await wait_for(lambda: bool(phones_in(server, "secure")), 10, "the SHA-256 caller joined")
            await asyncio.sleep(2.0)
            assert probe.rtp_received() > 20, "the authenticated caller hears nothing"
            assert (await probe.bye("5000")) is not None
        finally:
            probe.close()
    finally:
        await speaker.leave()
        await listener.leave()


@needs_sipp
async def test_wrong_credentials_rooms_and_replays_are_refused(start_server: ServerFactory, tmp_path: Path) -> None:
    server = await production(start_server, trusted_networks=("127.0.0.2/32",), digest_algorithms=("MD5", "SHA-256"))
    wrong = await run_sipp("auth_wrong.xml", server.port, "room-secure", tmp_path, timeout_s=10)
    assert wrong.rc == 0, f"sipp: a wrong password was not refused with 403: {wrong.errors[-800:]}"
    probe = await SipProbe(("127.0.0.1", server.port)).open()
    trunk = await SipProbe(("127.0.0.1", server.port), source_ip="127.0.0.2").open()
    try:
        assert await probe.invite("room-secure", ("bob", "builder")) == [401, 403]  # bob: room "other" only
        assert await probe.invite("room-secure", ("mallory", "x"), "MD5") == [401, 403]
        # a captured Authorization replayed in a new call: the nonce count did not grow
        probe.call_id, probe.cseq = secrets.token_hex(6), 0
        assert await probe.invite("room-secure") == [401]
        challenge = next(c for c in probe.last.header("www-authenticate") if "MD5" in c)  # type: ignore[union-attr]
        auth = f"Authorization: {digest_authorization(challenge, 'INVITE', probe.uri('room-secure'), 'alice', 'wonderland')}\r\n"
        offer = sdp_offer(probe.rtp_port)
        probe.send(probe.request("INVITE", "room-secure", body=offer, extra=auth))
        first = await probe.final()
        assert first is not None and first.status == 200, "MD5 credentials were refused"
        probe.send(probe.request("ACK", "room-secure", cseq=probe.cseq))
        await probe.bye("room-secure")
        probe.call_id, probe.remote_tag = secrets.token_hex(6), ""
        probe.send(probe.request("INVITE", "room-secure", body=offer, extra=auth))
        replay = await probe.final()
        assert replay is not None and replay.status == 403, "a replayed Authorization was accepted"
        # a trusted trunk address needs no credentials
        assert await trunk.invite("room-secure") == [200]
        await wait_for(lambda: len(phones_in(server, "secure")) == 1, 10, "the trunk call joined")
        assert (await trunk.bye("room-secure")) is not None
        assert server.sip.stats["status_403"] >= 4
    finally:
        probe.close()
        trunk.close()


async def test_menu_callers_enter_only_their_rooms(start_server: ServerFactory) -> None:
    """An authenticated caller of the menu who types a room it may not enter hears "not available"."""
    server = await production(start_server, dial_plan=(("7", "other"), ("8", "secure")), digits_name_rooms=False,
                              menu_attempts=5)
    probe = await SipProbe(("127.0.0.1", server.port)).open()
    try:
        assert await probe.invite("ivr", ("alice", "wonderland")) == [401, 200]
        await wait_for(lambda: any(d.state == "confirmed" for d in server.sip.dialogs.values()), 10, "menu")
        assert await probe.press("ivr", "7#") == [200, 200]  # room "other": bob's, not alice's
        await asyncio.sleep(3.0)
        assert phones_in(server, "other") == [] and len(server.sip.dialogs) == 1
        for _ in range(3):  # digits typed while "not available" plays are dropped with it: type again
            await probe.press("ivr", "8#")
            try:
                await wait_for(lambda: bool(phones_in(server, "secure")), 5, "alice joined her room")
                break
            except AssertionError:
                continue
        assert len(phones_in(server, "secure")) == 1 and phones_in(server, "other") == []
        await probe.bye("ivr")
    finally:
        probe.close()


async def test_invite_flood_into_one_room_is_capped_and_cheap(start_server: ServerFactory,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    sources = tuple(f"127.0.0.{n}" for n in range(10, 18))
    server = await production(start_server, trusted_networks=("127.0.0.0/8",), max_calls_per_room=3,
                              invite_rate_per_source=5.0, invite_burst_per_source=10, call_rate=100.0,
                              call_burst=100)
    offers: list[str] = []
    real_read_offer = sip_server_module.read_offer

    def counting_read_offer(req: SipRequest) -> object:
        offers.append(req.call_id)
        return real_read_offer(req)

    monkeypatch.setattr(sip_server_module, "read_offer", counting_read_offer)
    listener = bot(server, "flood", "listener", publish=False)
    speaker = bot(server, "flood", "speaker")
    await listener.join()
    await speaker.join()
    try:
        await wait_for(lambda: len(listener.received_from(speaker.id or "")) > 24_000, 10,
                       "the WebRTC call is heard")
        flood = await invite_flood(("127.0.0.1", server.port), "room-flood", 200, sources, listen_s=2.0, ack=True)
        assert flood.statuses[200] == 3, flood.statuses  # max_calls_per_room
        assert flood.statuses[503] >= 50, flood.statuses  # the per-source rate (10 each, plus what refilled)
        assert flood.statuses[486] >= 1, flood.statuses  # the room cap
        answered = sum(n for k, n in flood.responses_per_request.items() if k >= 1)
        assert answered == server.sip.stats["request_invite"], "an INVITE that arrived got no answer"
        assert answered >= 150, f"only {answered} of 200 INVITEs reached the server"
        repeated = sum(n for k, n in flood.responses_per_request.items() if k > 1)
        assert repeated <= 3, "refusals were retransmitted (only the unacknowledged 200s may be)"
        assert flood.largest_response <= flood.largest_request + 512
        assert len(offers) == 3, f"SDP was parsed for {len(offers)} INVITEs, 3 were admitted"
        await wait_for(lambda: len(phones_in(server, "flood")) == 3, 10, "the 3 admitted calls joined")
        t_after = asyncio.get_running_loop().time()
        await asyncio.sleep(1.5)
        after = listener.received_from(speaker.id or "", since=t_after)
        assert len(after) > 24_000, "the WebRTC call stopped after the flood"
    finally:
        for dialog in list(server.sip.dialogs.values()):
            await server.sip._hangup(dialog, "test over")
        await speaker.leave()
        await listener.leave()


async def test_phone_calls_count_against_the_room_size(start_server: ServerFactory) -> None:
    server = await production(start_server, max_participants=2, trusted_networks=("127.0.0.0/8",))
    member = bot(server, "small", "member")
    await member.join()
    first = await SipProbe(("127.0.0.1", server.port), source_ip="127.0.0.20").open()
    second = await SipProbe(("127.0.0.1", server.port), source_ip="127.0.0.21").open()
    try:
        assert await first.invite("room-small") == [200]
        assert await second.invite("room-small") == [486]  # one WebRTC participant + one phone: full
        await wait_for(lambda: len(phones_in(server, "small")) == 1, 10, "the first phone joined")
        await first.bye("room-small")
    finally:
        first.close()
        second.close()
        await member.leave()


async def test_idle_tcp_connections_do_not_lock_out_callers(start_server: ServerFactory) -> None:
    server = await production(start_server, trusted_networks=("127.0.0.0/8",), max_tcp_connections=12,
                              max_tcp_per_source=4, tcp_first_request_s=1.5)
    target = ("127.0.0.1", server.port)
    transport = server.sip.transport
    # a call over TCP first: its connection must outlive every idle one
    reader, writer = await asyncio.open_connection(*target, local_addr=("127.0.0.30", 0))
    local = writer.get_extra_info("sockname")[1]
    rtp_port = free_port()
    conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    def request(method: str, cseq: int, body: str = "", to_tag: str = "") -> bytes:
        return (f"{method} sip:room-tcp@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/TCP 127.0.0.30:{local};branch=z9hG4bK"
                f"{secrets.token_hex(5)}\r\nFrom: <sip:tcp@127.0.0.30>;tag=t1\r\nTo: <sip:room-tcp@127.0.0.1>{to_tag}\r\n"
                f"Call-ID: tcp-sec\r\nCSeq: {cseq} {method}\r\nContact: <sip:tcp@127.0.0.30:{local};transport=tcp>\r\n"
                + ("Content-Type: application/sdp\r\n" if body else "") + f"Content-Length: {len(body)}\r\n\r\n{body}"
                ).encode()

    async def final() -> bytes:
        while True:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5.0)
            length = int(head.split(b"Content-Length:")[1].split(b"\r\n")[0]) if b"Content-Length:" in head else 0
            body = await reader.readexactly(length) if length else b""
            if not head.startswith(b"SIP/2.0 1"):
                return head + body

    try:
        writer.write(request("INVITE", 1, sdp_offer(rtp_port, "127.0.0.30")))
        ok = await final()
        assert ok.startswith(b"SIP/2.0 200"), ok[:80]
        to_tag = ";tag=" + ok.split(b"To:")[1].split(b";tag=")[1].split(b"\r\n")[0].decode()
        writer.write(request("ACK", 1, to_tag=to_tag))
        await wait_for(lambda: len(phones_in(server, "tcp")) == 1, 10, "the TCP caller joined")

        conns = await tcp_idle_flood(target, 4, ("127.0.0.31",))
        extra = (await tcp_idle_flood(target, 1, ("127.0.0.31",)))[0]
        conns.append(extra)
        assert await closed_by_server(extra[0], 3.0), "a fifth connection from one address was kept"
        assert await tcp_options(target, "127.0.0.31") is None  # that address is at its cap
        conns += await tcp_idle_flood(target, 8, ("127.0.0.32", "127.0.0.33"))
        await wait_for(lambda: transport.tcp_connections() == 12, 5, "the global cap is reached")
        assert await tcp_options(target, "127.0.0.34") == 200, "a new caller was locked out at the cap"
        assert transport.tcp_evicted >= 1
        assert await closed_by_server(conns[0][0], 3.0), "the oldest idle connection was not the one closed"
        # connections that never complete a request are closed after tcp_first_request_s, even trickling
        writer2 = conns[-1][1]
        for _ in range(3):
            writer2.write(b"O")
            await asyncio.sleep(0.6)
        assert all([await closed_by_server(r, 3.0) for r, _ in conns[1:]]), "idle connections stayed open"
        assert transport.tcp_connections("127.0.0.30") == 1, "the connection with a call was closed"
        writer.write(request("BYE", 2, to_tag=to_tag))
        assert (await final()).startswith(b"SIP/2.0 200")
        await wait_for(lambda: not phones_in(server, "tcp"), 5, "the TCP caller left")
    finally:
        writer.close()
        for _, w in conns:
            w.close()


async def test_message_flood_from_one_address_is_dropped_before_parsing(start_server: ServerFactory) -> None:
    server = await production(start_server, messages_per_source=20.0, message_burst_per_source=20,
                              trusted_networks=("127.0.0.42/32",))
    flooder = await SipProbe(("127.0.0.1", server.port), source_ip="127.0.0.40").open()
    other = await SipProbe(("127.0.0.1", server.port), source_ip="127.0.0.41").open()
    trunk = await SipProbe(("127.0.0.1", server.port), source_ip="127.0.0.42").open()
    try:
        for k in range(200):
            flooder.send(flooder.request("OPTIONS", "x"))
            if k % 10 == 9:
                await asyncio.sleep(0.002)  # the server shares this loop: let it read (no kernel drops)
        for k in range(60):
            trunk.send(trunk.request("OPTIONS", "x"))
            if k % 10 == 9:
                await asyncio.sleep(0.002)
        await asyncio.sleep(1.0)
        assert flooder.inbox is not None and trunk.inbox is not None
        answered, trunk_answered = flooder.inbox.queue.qsize(), trunk.inbox.queue.qsize()
        assert 20 <= answered <= 60, f"{answered} of 200 OPTIONS from one address were answered"
        assert trunk_answered == 60, "a trusted address was rate-limited"
        assert server.sip.stats["dropped_rate"] >= 140
        other.send(other.request("OPTIONS", "x"))
        reply = await other.final()
        assert reply is not None and reply.status == 200, "another address was not answered"
    finally:
        for probe in (flooder, other, trunk):
            probe.close()

