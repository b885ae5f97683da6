"""Dialog and transaction behaviour of the SIP endpoint, driven by a scripted UA over real UDP.

What a real phone relies on: retransmitted INVITEs do not make second calls,
CANCEL before the answer ends the attempt with 487, re-INVITE puts a call on
hold and back, SIP INFO DTMF works, INVITEs without SDP get an offer, the
server hangs up with BYE when it shuts down, and requests for dialogs that
do not exist get 481.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import socket

from signaling.sip.message import SipRequest, SipResponse, parse_message
from signaling.sip.rtp import RtpPacket
from tests.conftest import ServerFactory
from tests.test_sip_support import SipServer, start_sip_server, wait_for


def offer(port: int, codecs: str = "0 101", direction: str = "sendrecv") -> str:
    return ("v=0\r\no=ua 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
            f"m=audio {port} RTP/AVP {codecs}\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:101 telephone-event/8000\r\n"
            f"a={direction}\r\n")


class ScriptedUA(asyncio.DatagramProtocol):
    """A minimal UA: builds requests of one call, collects what the bridge sends, and an RTP socket."""

    def __init__(self) -> None:
        self.inbox: asyncio.Queue[SipRequest | SipResponse] = asyncio.Queue()
        self.transport: asyncio.DatagramTransport | None = None
        self.call_id = secrets.token_hex(6)
        self.tag = secrets.token_hex(4)
        self.cseq = 0
        self.remote_tag = ""
        self.rtp_packets: list[RtpPacket] = []
        self.rtp_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.rtp_sock.bind(("127.0.0.1", 0))
        self.rtp_sock.setblocking(False)
        self.server_rtp: tuple[str, int] | None = None

    @property
    def rtp_port(self) -> int:
        return int(self.rtp_sock.getsockname()[1])

    @classmethod
    async def open(cls, sip_port: int) -> ScriptedUA:
        loop = asyncio.get_running_loop()
        _, ua = await loop.create_datagram_endpoint(cls, local_addr=("127.0.0.1", 0),
                                                    remote_addr=("127.0.0.1", sip_port))
        return ua

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.inbox.put_nowait(parse_message(data))

    @property
    def port(self) -> int:
        assert self.transport is not None
        return int(self.transport.get_extra_info("sockname")[1])

    def request(self, method: str, user: str = "room-dialogs", body: str = "", *, cseq: int | None = None,
                branch: str | None = None, extra: str = "", content_type: str = "application/sdp") -> str:
        if cseq is None:
            self.cseq += 1
            cseq = self.cseq
        to_tag = f";tag={self.remote_tag}" if self.remote_tag else ""
        text = (f"{method} sip:{user}@127.0.0.1 SIP/2.0\r\n"
                f"Via: SIP/2.0/UDP 127.0.0.1:{self.port};branch={branch or 'z9hG4bK' + secrets.token_hex(6)}\r\n"
                f"From: \"Scripted\" <sip:ua@127.0.0.1>;tag={self.tag}\r\nTo: <sip:{user}@127.0.0.1>{to_tag}\r\n"
                f"Call-ID: {self.call_id}\r\nCSeq: {cseq} {method}\r\nContact: <sip:ua@127.0.0.1:{self.port}>\r\n"
                f"Max-Forwards: 70\r\n{extra}")
        if body:
            text += f"Content-Type: {content_type}\r\n"
        return text + f"Content-Length: {len(body.encode())}\r\n\r\n{body}"

    def send(self, text: str) -> None:
        assert self.transport is not None
        self.transport.sendto(text.encode())

    async def expect(self, status: int, method: str | None = None, timeout: float = 5.0) -> SipResponse:
        """The next response with ``status`` (provisional ones and others skipped)."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            left = deadline - asyncio.get_running_loop().time()
            msg = await asyncio.wait_for(self.inbox.get(), max(left, 0.01))
            if isinstance(msg, SipResponse) and msg.status == status and (method is None or msg.cseq[1] == method):
                if msg.to.tag:
                    self.remote_tag = msg.to.tag
                if msg.body:
                    m = re.search(r"m=audio (\d+)", msg.body.decode())
                    if m:
                        self.server_rtp = ("127.0.0.1", int(m.group(1)))
                return msg

    async def next_request(self, timeout: float = 5.0) -> SipRequest:
        while True:
            msg = await asyncio.wait_for(self.inbox.get(), timeout)
            if isinstance(msg, SipRequest):
                return msg

    def ack(self, invite_cseq: int, body: str = "") -> None:
        self.send(self.request("ACK", cseq=invite_cseq, body=body))

    def drain_rtp(self) -> int:
        n = 0
        while True:
            try:
                data = self.rtp_sock.recv(2048)
            except BlockingIOError:
                return n
            self.rtp_packets.append(RtpPacket.parse(data))
            n += 1

    def close(self) -> None:
        self.rtp_sock.close()
        if self.transport is not None:
            self.transport.close()


async def call(server: SipServer, user: str = "room-dialogs") -> ScriptedUA:
    ua = await ScriptedUA.open(server.port)
    ua.send(ua.request("INVITE", user, offer(ua.rtp_port)))
    await ua.expect(200, "INVITE")
    ua.ack(1)
    return ua


async def test_retransmitted_invite_is_one_call_and_bye_ends_it(start_server: ServerFactory) -> None:
    server = await start_sip_server(start_server)
    ua = await ScriptedUA.open(server.port)
    invite = ua.request("INVITE", body=offer(ua.rtp_port), branch="z9hG4bKsame1")
    ua.send(invite)
    ua.send(invite)  # a retransmission before any answer
    first = await ua.expect(200, "INVITE")
    ua.send(invite)  # and one after: the same 200 comes back
    again = await ua.expect(200, "INVITE")
    assert first.to.tag == again.to.tag
    assert len(server.sip.dialogs) == 1
    ua.ack(1)
    await wait_for(lambda: server.running.server.rooms.participant_count == 1, 5, "the caller joined")
    await asyncio.sleep(0.5)
    assert ua.drain_rtp() >= 10, "the bridge sends no RTP to the phone"
    assert all(p.payload_type == 0 for p in ua.rtp_packets)
    ua.send(ua.request("BYE"))
    await ua.expect(200, "BYE")
    await wait_for(lambda: server.running.server.rooms.participant_count == 0, 5, "the caller left")
    ua.send(ua.request("BYE"))  # the dialog is gone now
    await ua.expect(481, "BYE")
    ua.close()


async def test_cancel_before_answer_gives_487(start_server: ServerFactory) -> None:
    server = await start_sip_server(start_server)
    ua = await ScriptedUA.open(server.port)
    ua.send(ua.request("INVITE", body=offer(ua.rtp_port), branch="z9hG4bKcancel1"))
    ua.send(ua.request("CANCEL", cseq=1, branch="z9hG4bKcancel1"))  # same branch and CSeq number as the INVITE
    await ua.expect(200, "CANCEL")
    await ua.expect(487, "INVITE")
    ua.send(ua.request("ACK", cseq=1, branch="z9hG4bKcancel1"))
    await asyncio.sleep(0.3)
    assert not server.sip.dialogs and server.running.server.rooms.participant_count == 0
    ua.send(ua.request("CANCEL", cseq=5, branch="z9hG4bKnothing"))
    await ua.expect(481, "CANCEL")
    ua.close()


async def test_reinvite_hold_and_resume(start_server: ServerFactory) -> None:
    server = await start_sip_server(start_server)
    ua = await call(server)
    await asyncio.sleep(0.4)
    assert ua.drain_rtp() > 5
    ua.send(ua.request("INVITE", body=offer(ua.rtp_port, direction="sendonly")))  # hold
    held = await ua.expect(200, "INVITE")
    assert "a=recvonly" in held.body.decode()
    ua.ack(ua.cseq)
    await asyncio.sleep(0.3)
    ua.drain_rtp()
    await asyncio.sleep(0.5)
    assert ua.drain_rtp() == 0, "the bridge kept sending to a phone that put it on hold"
    ua.send(ua.request("INVITE", body=offer(ua.rtp_port)))  # resume
    resumed = await ua.expect(200, "INVITE")
    assert "a=sendrecv" in resumed.body.decode()
    ua.ack(ua.cseq)
    await asyncio.sleep(0.5)
    assert ua.drain_rtp() > 5
    ua.send(ua.request("INVITE", body=offer(ua.rtp_port, codecs="18")))  # a re-offer without G.711
    await ua.expect(488, "INVITE")
    assert len(server.sip.dialogs) == 1  # the call survives a refused re-offer
    ua.send(ua.request("BYE"))
    await ua.expect(200, "BYE")
    ua.close()


async def test_sip_info_dtmf_and_offerless_invite(start_server: ServerFactory) -> None:
    server = await start_sip_server(start_server, dial_plan=(("7", "seven"),))
    ua = await ScriptedUA.open(server.port)
    ua.send(ua.request("INVITE", "ivr"))  # no SDP: the bridge offers, the answer comes in the ACK
    ok = await ua.expect(200, "INVITE")
    body = ok.body.decode()
    assert "PCMU/8000" in body and "PCMA/8000" in body and "telephone-event" in body
    ua.ack(1, body=offer(ua.rtp_port, codecs="0"))
    await asyncio.sleep(0.5)
    for digit in "7#":
        ua.send(ua.request("INFO", body=f"Signal={digit}\r\nDuration=160\r\n", content_type="application/dtmf-relay"))
        await ua.expect(200, "INFO")
    await wait_for(lambda: "seven" in server.running.server.rooms.rooms, 5, "menu digits 7# joined room seven")
    assert ua.drain_rtp() > 5  # the menu prompt was sent to the answer's address
    ua.send(ua.request("INFO", body="hello", content_type="text/plain"))
    await ua.expect(415, "INFO")
    ua.send(ua.request("OPTIONS"))
    await ua.expect(200, "OPTIONS")
    ua.send(ua.request("BYE"))
    await ua.expect(200, "BYE")
    ua.close()


async def test_server_shutdown_sends_bye(start_server: ServerFactory) -> None:
    server = await start_sip_server(start_server)
    ua = await call(server)
    await wait_for(lambda: server.running.server.rooms.participant_count == 1, 5, "the caller joined")
    closing = asyncio.ensure_future(server.sip.close())
    bye = await ua.next_request()
    assert bye.method == "BYE" and bye.call_id == ua.call_id and bye.to.tag == ua.tag
    ua.send(f"SIP/2.0 200 OK\r\nVia: {bye.headers.get('Via')}\r\nFrom: {bye.headers.get('From')}\r\n"
            f"To: {bye.headers.get('To')}\r\nCall-ID: {bye.call_id}\r\nCSeq: {bye.headers.get('CSeq')}\r\n"
            "Content-Length: 0\r\n\r\n")
    await closing
    assert server.running.server.rooms.participant_count == 0
    ua.close()


async def test_mutated_requests_do_not_hurt_a_live_call(start_server: ServerFactory) -> None:
    """Hundreds of corrupted requests (not of the call's own dialog): answered or dropped; the call carries on."""
    import random

    server = await start_sip_server(start_server)
    ua = await call(server)
    await wait_for(lambda: server.running.server.rooms.participant_count == 1, 5, "the caller joined")
    attacker = await ScriptedUA.open(server.port)
    rng = random.Random(7)
    templates = [attacker.request("INVITE", "room-x", offer(attacker.rtp_port)).encode(),
                 attacker.request("BYE").encode(), attacker.request("OPTIONS").encode(),
                 attacker.request("INFO", body="Signal=5\r\n", content_type="application/dtmf-relay").encode()]
    for _ in range(300):
        data = bytearray(rng.choice(templates))
        for _ in range(rng.randint(1, 6)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        if rng.random() < 0.2:
            data = data[: rng.randrange(len(data))]
        assert attacker.transport is not None
        attacker.transport.sendto(bytes(data))
    await asyncio.sleep(1.0)
    ua.drain_rtp()
    await asyncio.sleep(0.4)
    assert ua.drain_rtp() > 5, "the established call stopped"
    ua.send(ua.request("OPTIONS"))
    await ua.expect(200, "OPTIONS")
    ua.send(ua.request("BYE"))
    await ua.expect(200, "BYE")
    for dialog in list(server.sip.dialogs.values()):  # calls the corrupted INVITEs may have set up
        await server.sip._hangup(dialog, "test over")
    attacker.close()
    ua.close()


async def test_tcp_transport_frames_and_answers(start_server: ServerFactory) -> None:
    from signaling.sip.transport import split_stream

    server = await start_sip_server(start_server)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    local_port = writer.get_extra_info("sockname")[1]

    def request(method: str, cseq: int, body: str = "", to_tag: str = "") -> bytes:
        return (f"{method} sip:room-tcp@127.0.0.1 SIP/2.0\r\n"
                f"Via: SIP/2.0/TCP 127.0.0.1:{local_port};branch=z9hG4bK{secrets.token_hex(5)}\r\n"
                f"From: <sip:tcp@127.0.0.1>;tag=tcp1\r\nTo: <sip:room-tcp@127.0.0.1>{to_tag}\r\n"
                f"Call-ID: tcp-call\r\nCSeq: {cseq} {method}\r\nContact: <sip:tcp@127.0.0.1:{local_port};transport=tcp>\r\n"
                + ("Content-Type: application/sdp\r\n" if body else "")
                + f"Content-Length: {len(body)}\r\n\r\n{body}").encode()

    buffer = b""

    async def responses(n: int) -> list[SipResponse]:
        nonlocal buffer
        out: list[SipResponse] = []
        while len(out) < n:
            buffer += await asyncio.wait_for(reader.read(8192), 5.0)
            messages, buffer = split_stream(buffer)
            out += [m for m in map(parse_message, messages) if isinstance(m, SipResponse)]
        return out

    writer.write(request("OPTIONS", 1) + request("OPTIONS", 2))  # two messages in one segment
    assert [r.status for r in await responses(2)] == [200, 200]
    rtp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rtp.bind(("127.0.0.1", 0))
    writer.write(request("INVITE", 3, offer(rtp.getsockname()[1])))
    ok = next(r for r in await responses(2) if r.status == 200)
    assert "transport=tcp" in (ok.headers.get("Contact") or "")
    tag = f";tag={ok.to.tag}"
    writer.write(request("ACK", 3, to_tag=tag))
    await wait_for(lambda: server.running.server.rooms.participant_count == 1, 5, "the TCP caller joined")
    writer.write(request("BYE", 4, to_tag=tag))
    assert (await responses(1))[0].status == 200
    await wait_for(lambda: server.running.server.rooms.participant_count == 0, 5, "the TCP caller left")
    writer.close()
    rtp.close()
