"""SIP parsing and serializing, SDP offer/answer, DTMF, dial plan and transaction timers, in isolation."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mediaserver.config import SipConfig
from signaling.sip import transactions as tx_module
from signaling.sip.ivr import DialPlan, DtmfReceiver, parse_info_digit
from signaling.sip.message import SipParseError, SipRequest, SipResponse, make_response, parse_message
from signaling.sip.sdp import NoCommonCodec, SdpError, build_answer, negotiate, parse_sdp
from signaling.sip.transactions import TransactionLayer
from signaling.sip.transport import split_stream

INVITE = (
    "INVITE sip:room-blue@10.0.0.1:5060;transport=udp SIP/2.0\r\n"
    "v: SIP/2.0/UDP 10.0.0.2:5070;branch=z9hG4bKabc;rport, SIP/2.0/UDP 10.0.0.9;branch=z9hG4bKprev\r\n"
    "Max-Forwards: 70\r\n"
    "f: \"Doe, Jane\" <sip:jane@10.0.0.2>;tag=111\r\n"
    "t: <sip:room-blue@10.0.0.1>\r\n"
    "i: abc-123@10.0.0.2\r\n"
    "CSeq: 20 INVITE\r\n"
    "m: <sip:jane@10.0.0.2:5070>\r\n"
    "Subject: a long\r\n  folded subject\r\n"
    "User-Agent: baresip v1.0.0\r\n"
    "c: application/sdp\r\n"
    "l: {length}\r\n\r\n{body}"
)
OFFER = ("v=0\r\no=- 1 2 IN IP4 10.0.0.2\r\ns=-\r\nc=IN IP4 10.0.0.2\r\nt=0 0\r\n"
         "m=audio 4000 RTP/AVP 8 0 96 101\r\na=rtpmap:96 opus/48000/2\r\na=rtpmap:101 telephone-event/8000\r\n"
         "a=fmtp:101 0-15\r\na=sendrecv\r\nm=video 4002 RTP/AVP 97\r\na=rtpmap:97 VP8/90000\r\n")


def invite(body: str = OFFER) -> bytes:
    return INVITE.format(length=len(body.encode()), body=body).encode()


def test_parse_a_real_invite() -> None:
    msg = parse_message(invite())
    assert isinstance(msg, SipRequest)
    assert msg.method == "INVITE" and msg.uri.startswith("sip:room-blue@")
    assert [v.branch for v in msg.vias] == ["z9hG4bKabc", "z9hG4bKprev"]
    assert msg.from_.display == "Doe, Jane" and msg.from_.tag == "111" and msg.to.tag is None
    assert msg.call_id == "abc-123@10.0.0.2" and msg.cseq == (20, "INVITE")
    assert msg.headers.get("Subject") == "a long folded subject"
    assert msg.content_type == "application/sdp" and msg.body.decode() == OFFER
    again = parse_message(msg.serialize())  # serialize -> parse keeps everything
    assert isinstance(again, SipRequest)
    assert list(again.headers) == list(msg.headers) and again.body == msg.body


def test_response_copies_what_routes_it_back() -> None:
    req = parse_message(invite())
    assert isinstance(req, SipRequest)
    resp = make_response(req, 486, to_tag="xyz", extra=[("Allow", "INVITE"), ("Allow", "BYE")])
    parsed = parse_message(resp.serialize())
    assert isinstance(parsed, SipResponse) and parsed.status == 486 and parsed.reason == "Busy Here"
    assert [v.branch for v in parsed.vias] == ["z9hG4bKabc", "z9hG4bKprev"]
    assert parsed.to.tag == "xyz" and parsed.from_.tag == "111" and parsed.cseq == (20, "INVITE")
    assert b"Allow: INVITE, BYE\r\n" in resp.serialize()
    assert make_response(req, 100, to_tag="xyz").to.tag is None  # 100 Trying carries no tag


@pytest.mark.parametrize("raw,answerable", [
    (b"", False),
    (b"hello world\r\n\r\n", False),
    (b"INVITE sip:a@b SIP/3.0\r\n\r\n", False),
    (invite().replace(b"CSeq: 20 INVITE", b"CSeq: twenty INVITE"), True),
    (invite().replace(b"CSeq: 20 INVITE", b"CSeq: 20 BYE"), True),
    (invite().replace(b"i: abc-123@10.0.0.2\r\n", b""), False),  # no Call-ID: no way to answer
    (invite().replace(b"l: %d" % len(OFFER), b"l: %d" % (len(OFFER) + 9)), True),  # beyond the datagram
    (invite().replace(b"Max-Forwards: 70", b"Max Forwards 70"), True),
    (invite().replace(b"t: <sip:room-blue@10.0.0.1>", b"t: <sip:room-blue@10.0.0.1"), True),
    (b"\xff\xfe" * 30 + b"\r\n\r\n", False),
])
def test_malformed_messages(raw: bytes, answerable: bool) -> None:
    with pytest.raises(SipParseError) as err:
        parse_message(raw)
    assert (err.value.partial is not None) == answerable


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600), st.integers(min_value=0, max_value=400), st.integers(min_value=0, max_value=255))
def test_parser_never_fails_another_way(noise: bytes, position: int, byte: int) -> None:
    """Random bytes, and a real INVITE with one byte changed or cut short: SipParseError or a message."""
    mutated = bytearray(invite())
    mutated[position % len(mutated)] = byte
    for data in (noise, bytes(mutated), bytes(mutated[:position])):
        try:
            msg = parse_message(data)
        except SipParseError:
            continue
        msg.serialize()


def test_tcp_framing_by_content_length() -> None:
    one, two = invite(), invite().replace(b"20 INVITE", b"21 INVITE")
    messages, rest = split_stream(b"\r\n" + one + two[:50])
    assert messages == [one] and rest == two[:50]
    messages, rest = split_stream(rest + two[50:])
    assert messages == [two] and rest == b""
    with pytest.raises(ValueError):
        split_stream(b"X" * 70_000)


def test_negotiation_follows_the_offer() -> None:
    offer = parse_sdp(OFFER)
    params = negotiate(offer)
    assert params.codec.name == "PCMA" and params.payload_type == 8 and params.event_pt == 101
    assert (params.remote_ip, params.remote_port, params.remote_rtcp_port) == ("10.0.0.2", 4000, 4001)
    answer = parse_sdp(build_answer(offer, params, "10.0.0.1", 20000, 7, 1))
    assert [(m.kind, m.port) for m in answer.media] == [("audio", 20000), ("video", 0)]  # video refused
    assert answer.media[0].formats == ["8", "101"] and answer.media[0].direction == "sendrecv"
    hold = negotiate(parse_sdp(OFFER.replace("a=sendrecv", "a=sendonly")))
    assert hold.direction == "recvonly" and hold.on_hold and not hold.we_send
    dynamic = negotiate(parse_sdp(OFFER.replace("RTP/AVP 8 0 96 101", "RTP/AVP 96 110")
                                  .replace("opus/48000/2", "PCMU/8000")))
    assert dynamic.codec.name == "PCMU" and dynamic.payload_type == 96 and dynamic.event_pt is None


@pytest.mark.parametrize("change", [
    ("RTP/AVP 8 0 96 101", "RTP/AVP 18 96"),  # G.729 and Opus only
    ("RTP/AVP 8 0 96 101", "RTP/SAVP 8 0"),  # SRTP only
    ("m=audio 4000", "m=audio 0"),  # the audio stream is refused by the offerer itself
])
def test_no_common_codec(change: tuple[str, str]) -> None:
    with pytest.raises(NoCommonCodec):
        negotiate(parse_sdp(OFFER.replace(*change)))


@pytest.mark.parametrize("text", ["", "v=1\r\n", "v=0\r\nm=audio x RTP/AVP 0\r\n", "v=0\r\nc=IN IP4 not-an-ip\r\n",
                                  "v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\n"])
def test_bad_sdp(text: str) -> None:
    with pytest.raises(SdpError):
        negotiate(parse_sdp(text))


def test_dtmf_from_rfc4733_and_info() -> None:
    rx = DtmfReceiver()
    for ts, event in ((800, 5), (1600, 11)):
        for duration, end in ((160, False), (320, False), (480, True), (480, True), (480, True)):
            rx.feed_rtp(ts, bytes([event, 0x80 if end else 0, duration >> 8, duration & 0xFF]))
    rx.feed_rtp(2400, b"\x01")  # truncated: ignored
    assert [rx.digits.get_nowait() for _ in range(rx.digits.qsize())] == ["5", "#"]
    assert parse_info_digit("application/dtmf-relay", b"Signal=*\r\nDuration=250\r\n") == "*"
    assert parse_info_digit("application/dtmf-relay", b"Signal=11\r\n") == "#"
    assert parse_info_digit("application/dtmf", b"7") == "7"
    assert parse_info_digit("application/dtmf-relay", b"Signal=X\r\n") is None
    assert parse_info_digit("text/plain", b"5") is None


def test_dial_plan() -> None:
    plan = DialPlan(SipConfig(dial_plan=(("5000", "standup"), ("9", "lobby"))))
    assert plan.resolve("room-design").room == "design"  # type: ignore[union-attr]
    assert plan.resolve("5000").room == "standup"  # type: ignore[union-attr]
    assert plan.resolve("ivr").menu and plan.resolve("").menu  # type: ignore[union-attr]
    assert plan.resolve("alice") is None and plan.resolve("room-") is None and plan.resolve("room-bad/id") is None
    assert plan.room_for_digits("9") == "lobby" and plan.room_for_digits("1234") == "1234"
    assert DialPlan(SipConfig(digits_name_rooms=False)).room_for_digits("1234") is None


async def test_transaction_retransmits_error_until_ack(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tx_module, "T1", 0.02)
    monkeypatch.setattr(tx_module, "T2", 0.08)
    sent: list[bytes] = []
    layer = TransactionLayer(lambda data, addr: sent.append(data))
    req = parse_message(invite())
    assert isinstance(req, SipRequest)
    tx = layer.create(req, ("10.0.0.2", 5070))
    layer.respond(tx, make_response(req, 100))
    layer.respond(tx, make_response(req, 486, to_tag="t"))
    await asyncio.sleep(0.2)
    assert sent.count(sent[-1]) >= 3  # timer G: the 486 again and again
    assert layer.lookup(req) is tx  # a retransmitted INVITE finds its transaction
    ack = parse_message(invite(body="").replace(b"INVITE sip", b"ACK sip").replace(b"20 INVITE", b"20 ACK"))
    assert isinstance(ack, SipRequest) and layer.absorb_ack(ack)
    count = len(sent)
    await asyncio.sleep(0.2)
    assert len(sent) == count  # the ACK stopped the retransmissions
    layer.close()


async def test_client_transaction_retransmits_until_answered(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tx_module, "T1", 0.02)
    sent: list[bytes] = []
    layer = TransactionLayer(lambda data, addr: sent.append(data))
    bye = parse_message(invite(body="").replace(b"INVITE sip", b"BYE sip").replace(b"20 INVITE", b"21 BYE"))
    assert isinstance(bye, SipRequest)
    future = layer.send_request(bye, ("10.0.0.2", 5070))
    await asyncio.sleep(0.1)
    assert len(sent) >= 3 and not future.done()
    assert layer.on_response(make_response(bye, 200))
    assert (await future).status == 200  # type: ignore[union-attr]
    layer.close()


def test_sip_settings_from_the_environment() -> None:
    from mediaserver.config import load_config

    cfg = load_config({"MEDIASERVER_DEV": "1", "MEDIASERVER_SIP_PORT": "5062",
                       "MEDIASERVER_SIP_DIAL_PLAN": "5000=standup, 9=lobby", "MEDIASERVER_SIP_RTP_PORTS": "30000-30100",
                       "MEDIASERVER_SIP_MAX_CALLS": "12"})
    assert cfg.sip_port == 5062 and cfg.sip.max_calls == 12
    assert cfg.sip.dial_plan == (("5000", "standup"), ("9", "lobby"))
    assert (cfg.sip.rtp_port_min, cfg.sip.rtp_port_max) == (30000, 30100)
    with pytest.raises(ValueError):
        load_config({"MEDIASERVER_DEV": "1", "MEDIASERVER_SIP_DIAL_PLAN": "standup"})
