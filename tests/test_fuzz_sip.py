"""Fuzzing the SIP bridge's parsers, and a live endpoint fed mutated datagrams.

Property tests (hypothesis, a bounded number of examples): arbitrary bytes
and structurally mutated real requests (INVITE with SDP, REGISTER, OPTIONS,
BYE, ACK, INFO, and a response) either parse into a message or raise the
parser's own ``SipParseError``; a parsed request goes through everything the
endpoint does with it (transaction key, request checks, the SDP offer, the
caller's name, a response that parses back) without any other exception;
mutated SDP offers are answered or refused with ``SdpError``, and every
answer built parses again.  End to end: a running SIP endpoint gets a few
thousand mutated and random datagrams over UDP, keeps answering a valid
OPTIONS, keeps its tables within their caps and its memory bounded.
"""

from __future__ import annotations

import asyncio
import gc
import random
import socket
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from signaling.sip import transactions as tx_module
from signaling.sip.call import caller_name
from signaling.sip.ivr import parse_info_digit
from signaling.sip.message import (
    NameAddr,
    SipParseError,
    SipRequest,
    SipResponse,
    make_response,
    parse_message,
)
from signaling.sip.sdp import SdpError, build_answer, negotiate, parse_sdp
from signaling.sip.transactions import transaction_key
from signaling.sip.validate import check_request, read_offer, warning
from tests.conftest import ServerFactory
from tests.test_sip_dialogs import ScriptedUA, call
from tests.test_sip_support import start_sip_server, wait_for

FUZZ = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])

OFFER = ("v=0\r\no=- 1 2 IN IP4 10.0.0.2\r\ns=-\r\nc=IN IP4 10.0.0.2\r\nt=0 0\r\n"
         "m=audio 4000 RTP/AVP 8 0 96 101\r\na=rtpmap:96 opus/48000/2\r\na=rtpmap:101 telephone-event/8000\r\n"
         "a=fmtp:101 0-15\r\na=rtcp:4001\r\na=ptime:20\r\na=sendrecv\r\nm=video 4002 RTP/AVP 97\r\n"
         "a=rtpmap:97 VP8/90000\r\n")


def _request(method: str, uri: str, cseq: int, extra: list[str], body: str = "") -> tuple[str, list[str], str]:
    headers = ["Via: SIP/2.0/UDP 10.0.0.2:5070;branch=z9hG4bKfuzz1;rport",
               "Max-Forwards: 70",
               'From: "Doe, Jane" <sip:jane@10.0.0.2>;tag=111',
               "To: <sip:room-fuzz@10.0.0.1>",
               "Call-ID: fuzz-123@10.0.0.2",
               f"CSeq: {cseq} {method}",
               *extra]
    return f"{method} {uri} SIP/2.0", headers, body


TEMPLATES: list[tuple[str, list[str], str]] = [
    _request("INVITE", "sip:room-fuzz@10.0.0.1:5060;transport=udp", 20,
             ["Contact: <sip:jane@10.0.0.2:5070>", "Content-Type: application/sdp", "Allow: INVITE, ACK, BYE"],
             OFFER),
    _request("REGISTER", "sip:10.0.0.1", 1, ["Contact: <sip:jane@10.0.0.2:5070>;expires=3600", "Expires: 3600"]),
    _request("OPTIONS", "sip:room-fuzz@10.0.0.1", 2, ["Accept: application/sdp", "Supported: replaces, timer"]),
    _request("BYE", "sip:room-fuzz@10.0.0.1", 21, ["Route: <sip:proxy.example;lr>"]),
    _request("ACK", "sip:room-fuzz@10.0.0.1", 20, []),
    _request("INFO", "sip:room-fuzz@10.0.0.1", 22, ["Content-Type: application/dtmf-relay"],
             "Signal=5\r\nDuration=160\r\n"),
    ("SIP/2.0 200 OK", ["Via: SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bKbye1", "From: <sip:room-fuzz@10.0.0.1>;tag=a",
                        "To: <sip:jane@10.0.0.2>;tag=111", "Call-ID: fuzz-123@10.0.0.2", "CSeq: 1 BYE"], ""),
]

# Values that have broken SIP stacks: empty, numbers out of range or not ASCII, unbalanced quoting and
# brackets, lone separators, header-looking text, a very long token.
NASTY = ["", " ", "0", "-1", "65536", "99999999999999999999", "4294967296 INVITE", "1 INVITE", "²", "٣٣",
         "\x00", "\t", "<", ">", "<>", "<sip:>", '"', '"unterminated', "\\", ";", ";;=;", ";tag", ";tag=",
         ",", ",,,", "sip:", "sips:@", "sip:@:0", "sip:a@[::1", "tel:+123", "SIP/2.0/UDP", "SIP/2.0/UDP [::1",
         "SIP/2.0/UDP host:99999", "z9hG4bK", "application/sdp", "é", "\u202e", "%00", "x" * 3000,
         "a:b:c", "INVITE sip:x@y SIP/2.0"]
HEADER_NAMES = ["Via", "v", "From", "f", "To", "t", "Call-ID", "i", "CSeq", "Contact", "m", "Content-Length", "l",
                "Content-Type", "c", "Max-Forwards", "Require", "Route", "Record-Route", "X-Fuzz", "bad name", ""]
# Characters str.isdigit() accepts that are not ASCII digits (int() refuses some, reads others)
ODD_DIGITS = ["\u00b2", "\u0663", "\u09e7", "\u2460", "\u07c0", "\uff17"]
nasty = st.one_of(st.sampled_from(NASTY), st.text(max_size=40))

Op = tuple[Any, ...]
op = st.one_of(
    st.tuples(st.just("value"), st.integers(0, 20), nasty),  # a header's value replaced
    st.tuples(st.just("drop"), st.integers(0, 20)),  # a header removed
    st.tuples(st.just("dup"), st.integers(0, 20)),  # a header repeated
    st.tuples(st.just("insert"), st.integers(0, 20), st.sampled_from(HEADER_NAMES), nasty),
    st.tuples(st.just("fold"), st.integers(0, 20), nasty),  # a continuation line
    st.tuples(st.just("start"), st.integers(0, 2), nasty),  # method, URI or version replaced
    st.tuples(st.just("length"), st.integers(-3, 10 ** 7)),  # Content-Length that lies
    st.tuples(st.just("sdp"), st.integers(0, 20), nasty),  # a body line's value replaced
    st.tuples(st.just("eol"), st.sampled_from(["\n", "\r", " \r\n", "\r\n\r\n"])),  # other line ends
    st.tuples(st.just("digit"), st.integers(0, 40), st.integers(0, 8), st.sampled_from(ODD_DIGITS)),  # in a line
    st.tuples(st.just("byte"), st.integers(0, 5000), st.integers(0, 255)),  # raw damage, after the rest
    st.tuples(st.just("cut"), st.integers(0, 5000)),
)


def mutate(template: tuple[str, list[str], str], ops: list[Op]) -> bytes:
    """The template with ``ops`` applied: structure first (lines, values), then raw bytes."""
    start, headers, body = template[0].split(" ", 2), list(template[1]), template[2].split("\r\n")
    length: int | None = None
    eol = "\r\n"
    raw: list[Op] = []
    digits: list[Op] = []
    for o in ops:
        kind = o[0]
        if kind in ("byte", "cut"):
            raw.append(o)
        elif kind == "start":
            start[o[1] % len(start)] = o[2]
        elif kind == "length":
            length = o[1]
        elif kind == "eol":
            eol = o[1]
        elif kind == "digit":
            digits.append(o)
        elif kind == "sdp":
            i = o[1] % len(body)
            body[i] = body[i][:2] + o[2]
        elif kind == "insert":
            headers.insert(o[1] % (len(headers) + 1), f"{o[2]}: {o[3]}")
        elif headers:
            i = o[1] % len(headers)
            if kind == "value":
                headers[i] = headers[i].split(":", 1)[0] + ": " + o[2]
            elif kind == "drop":
                del headers[i]
            elif kind == "dup":
                headers.insert(i, headers[i])
            elif kind == "fold":
                headers.insert(i + 1, " " + o[2])
    content = "\r\n".join(body).encode("utf-8", "surrogatepass")
    lines = [" ".join(start), *headers, f"Content-Length: {len(content) if length is None else length}"]
    for _, line, nth, char in digits:  # one ASCII digit of a line (the body's lines count too) swapped
        k = line % (len(lines) + len(body))
        text = lines[k] if k < len(lines) else body[k - len(lines)]
        places = [i for i, ch in enumerate(text) if "0" <= ch <= "9"]
        if places:
            i = places[nth % len(places)]
            text = text[:i] + char + text[i + 1:]
            if k < len(lines):
                lines[k] = text
            else:
                body[k - len(lines)] = text
                content = "\r\n".join(body).encode("utf-8", "surrogatepass")
    data = bytearray((eol.join(lines) + eol + eol).encode("utf-8", "surrogatepass") + content)
    for o in raw:
        if o[0] == "byte" and data:
            data[o[1] % len(data)] = o[2]
        elif o[0] == "cut":
            del data[o[1] % (len(data) + 1):]
    return bytes(data)


def random_ops(rng: random.Random) -> list[Op]:
    """The same kinds of mutation as ``op``, drawn from a seeded generator (for the live endpoint)."""
    def value() -> str:
        return rng.choice(NASTY) if rng.random() < 0.8 else "".join(chr(rng.randrange(32, 0x3000))
                                                                      for _ in range(rng.randrange(12)))
    makers = [lambda: ("value", rng.randrange(20), value()), lambda: ("drop", rng.randrange(20)),
              lambda: ("dup", rng.randrange(20)), lambda: ("insert", rng.randrange(20), rng.choice(HEADER_NAMES),
                                                          value()),
              lambda: ("fold", rng.randrange(20), value()), lambda: ("start", rng.randrange(3), value()),
              lambda: ("length", rng.randrange(-3, 5000)), lambda: ("sdp", rng.randrange(20), value()),
              lambda: ("digit", rng.randrange(40), rng.randrange(8), rng.choice(ODD_DIGITS)),
              lambda: ("byte", rng.randrange(5000), rng.randrange(256)), lambda: ("cut", rng.randrange(5000))]
    return [rng.choice(makers)() for _ in range(rng.randint(1, 4))]


def handle_like_the_endpoint(data: bytes) -> SipRequest | SipResponse | None:
    """Parse ``data`` and do with it what ``SipEndpoint`` does; only SipParseError may come out of parsing."""
    try:
        msg = parse_message(data)
    except SipParseError as exc:
        if exc.partial is not None:  # the endpoint answers 400 (copying the broken headers) when it can
            make_response(exc.partial, 400, extra=[warning(str(exc))]).serialize()
        return None
    if isinstance(msg, SipResponse):
        transaction_key(msg, msg.cseq[1])
        return msg
    transaction_key(msg, "INVITE" if msg.method == "ACK" else msg.method)
    msg.to.tag, msg.from_.tag  # noqa: B018 - dialog lookup
    refusal = check_request(msg)
    if msg.method == "INFO":  # in a call: a key press
        parse_info_digit(msg.content_type, msg.body)
    if refusal is None and msg.method == "INVITE":
        read_offer(msg)
        caller_name(msg, 64)
        try:
            NameAddr.parse(msg.headers.get("Contact") or "").sip_uri()
        except SipParseError:
            pass
    reply = make_response(msg, 200, to_tag="fuzz", extra=[("Server", "fuzz")])
    again = parse_message(reply.serialize())  # what we answer must parse at the other end
    assert isinstance(again, SipResponse) and again.status == 200
    return msg


@FUZZ
@given(st.one_of(st.binary(max_size=2000),
                 st.builds(lambda head, tail: head + tail,
                           st.sampled_from([b"INVITE sip:a@b SIP/2.0\r\n", b"SIP/2.0 200 OK\r\n", b"\r\n\r\n",
                                            b"OPTIONS sip:x SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\n"]),
                           st.binary(max_size=600))))
def test_arbitrary_bytes_parse_or_raise_the_parse_error(data: bytes) -> None:
    handle_like_the_endpoint(data)


@FUZZ
@given(st.sampled_from(range(len(TEMPLATES))), st.lists(op, min_size=1, max_size=5))
# found by this test: str.isdigit() accepts "²" and "①", int() does not (CSeq, Content-Length, INFO, Max-Forwards)
@example(0, [("digit", 6, 0, "\u00b2")])
@example(0, [("digit", 10, 0, "\u00b2")])
@example(5, [("digit", 9, 0, "\u00b2")])
@example(2, [("digit", 2, 0, "\u2460")])
def test_mutated_requests_parse_or_raise_the_parse_error(which: int, ops: list[Op]) -> None:
    handle_like_the_endpoint(mutate(TEMPLATES[which], ops))


def test_unmutated_templates_parse() -> None:
    for template in TEMPLATES:
        msg = handle_like_the_endpoint(mutate(template, []))
        assert msg is not None, template[0]
    invite = parse_message(mutate(TEMPLATES[0], []))
    assert isinstance(invite, SipRequest) and read_offer(invite)[2] is None  # the offer is a usable one


@FUZZ
@given(st.lists(st.tuples(st.integers(0, 30), nasty), max_size=4),
       st.lists(st.tuples(st.integers(0, 30), st.integers(0, 8), st.sampled_from(ODD_DIGITS)), max_size=2),
       st.integers(0, len(OFFER)))
def test_mutated_offers_are_answered_or_refused(changes: list[tuple[int, str]],
                                                 digits: list[tuple[int, int, str]], cut: int) -> None:
    lines = OFFER.split("\r\n")
    for i, value in changes:
        j = i % len(lines)
        lines[j] = lines[j][:2] + value
    for i, nth, char in digits:
        j = i % len(lines)
        places = [k for k, ch in enumerate(lines[j]) if "0" <= ch <= "9"]
        if places:
            k = places[nth % len(places)]
            lines[j] = lines[j][:k] + char + lines[j][k + 1:]
    for text in ("\r\n".join(lines), OFFER[:cut]):
        try:
            desc = parse_sdp(text)
            params = negotiate(desc)
        except SdpError:
            continue
        answer = parse_sdp(build_answer(desc, params, "10.0.0.1", 20000, 7, 1))
        assert negotiate(answer).codec == params.codec  # our answer is one a phone can read


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


async def test_live_endpoint_survives_mutated_datagrams(start_server: ServerFactory,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A few thousand mutated and random datagrams: a valid OPTIONS is still answered, the transaction
    table stays within its cap, calls within ``max_calls``, counters within their fixed keys, memory bounded."""
    cap = 300
    monkeypatch.setattr(tx_module, "MAX_SERVER_TRANSACTIONS", cap)
    server = await start_sip_server(start_server, max_calls=3)
    sip = server.sip
    attacker = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    attacker.bind(("127.0.0.1", 0))
    attacker.setblocking(False)
    rng = random.Random(11)
    target = ("127.0.0.1", server.port)
    sent = 0

    async def flood(n: int) -> None:
        nonlocal sent
        for k in range(n):
            if rng.random() < 0.15:
                data = rng.randbytes(rng.randrange(1, 1500))
            else:
                template = TEMPLATES[rng.randrange(len(TEMPLATES))]
                data = mutate(template, random_ops(rng))
                # fresh branch and Call-ID most of the time: every one a new transaction
                data = data.replace(b"z9hG4bKfuzz1", b"z9hG4bK%06d" % sent).replace(b"fuzz-123", b"fz%06d" % sent)
            try:
                attacker.sendto(data[:65_000], target)
            except OSError:  # too large for a datagram, or the buffer is full: the next one
                pass
            sent += 1
            if k % 25 == 24:
                await asyncio.sleep(0.005)  # the endpoint shares this event loop
                try:
                    while attacker.recv(70_000):
                        pass  # the endpoint's answers: read and ignore
                except BlockingIOError:
                    pass
        await asyncio.sleep(0.2)

    ua = await ScriptedUA.open(server.port)
    try:
        await flood(1000)  # warm-up: code paths, caches and the table reach their steady size
        gc.collect()
        before = rss_bytes()
        await flood(2500)
        gc.collect()
        grown = rss_bytes() - before
        await wait_for(lambda: sip.stats["messages"] >= sent * 0.5, 10, "the endpoint read the datagrams")
        assert sip.stats["malformed"] > 0 and sip.stats["status_400"] > 0  # the fuzz reached the parser
        ua.send(ua.request("OPTIONS"))
        reply = await ua.expect(200, "OPTIONS")
        assert "INVITE" in (reply.headers.get("Allow") or "")
        assert len(sip.tx.server) <= cap, len(sip.tx.server)
        assert len(sip.dialogs) <= 3
        assert len(sip.stats) < 40, sorted(sip.stats)  # peers cannot add counter keys
        assert grown < 40 * 2 ** 20, f"RSS grew {grown / 2 ** 20:.1f} MiB over 2500 datagrams"
        print(f"sip fuzz: {sent} datagrams, {sip.stats['malformed']} malformed, {len(sip.tx.server)} transactions, "
              f"{len(sip.dialogs)} calls, RSS {grown / 2 ** 20:+.1f} MiB after the warm-up")
        for dialog in list(sip.dialogs.values()):  # the calls mutated INVITEs set up make room
            await sip._hangup(dialog, "test over")
        phone = await call(server, "room-fuzz")  # and a real call still gets through
        await wait_for(lambda: server.running.server.rooms.participant_count == 1, 10, "the caller joined")
        phone.send(phone.request("BYE"))
        await phone.expect(200, "BYE")
        phone.close()
    finally:
        for dialog in list(sip.dialogs.values()):
            await sip._hangup(dialog, "test over")
        attacker.close()
        ua.close()
