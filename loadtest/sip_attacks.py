"""Attacks on the SIP bridge over the wire, for the security tests and a general attack suite.

Like the rest of ``loadtest`` this talks to the server only over the network
and imports nothing from ``mediaserver`` or ``signaling``: SIP text is built
here, digest responses are computed here (RFC 2617 / RFC 8760, an
implementation independent of the server's).  Every function is bounded in
count and time and returns what it saw as plain data:

- ``SipProbe``: one UDP user agent with an RTP socket: INVITE (anonymous or
  with digest credentials, answering the 401 challenge), ACK, BYE, and the
  count of RTP packets the server sent to it (room audio an attacker hears).
- ``invite_flood``: INVITEs from one or several loopback source addresses
  into one room; the responses per status and per request.
- ``tcp_idle_flood``: TCP connections that never send a request.
- ``tcp_options``: whether a new SIP/TCP caller is still answered.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import re
import secrets
import socket
import time
from dataclasses import dataclass, field

_CHALLENGE_RE = re.compile(r'(\w+)="?([^",]*)"?')
_STATUS_RE = re.compile(rb"^SIP/2\.0 (\d{3})")


def sdp_offer(rtp_port: int, ip: str = "127.0.0.1") -> str:
    return (f"v=0\r\no=attack 1 1 IN IP4 {ip}\r\ns=-\r\nc=IN IP4 {ip}\r\nt=0 0\r\n"
            f"m=audio {rtp_port} RTP/AVP 0 101\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:101 telephone-event/8000\r\n"
            "a=sendrecv\r\n")


def digest_authorization(challenge: str, method: str, uri: str, user: str, password: str, nc: int = 1,
                         cnonce: str | None = None) -> str:
    """An ``Authorization`` value answering one ``WWW-Authenticate: Digest ...`` challenge (qop=auth)."""
    params = dict(_CHALLENGE_RE.findall(challenge.partition(" ")[2]))
    algorithm = params.get("algorithm", "MD5").upper()
    h = {"MD5": hashlib.md5, "SHA-256": hashlib.sha256}[algorithm]

    def hx(text: str) -> str:
        return h(text.encode()).hexdigest()

    cnonce = cnonce or secrets.token_hex(8)
    realm, nonce, count = params["realm"], params["nonce"], f"{nc:08x}"
    response = hx(f"{hx(f'{user}:{realm}:{password}')}:{nonce}:{count}:{cnonce}:auth:{hx(f'{method}:{uri}')}")
    return (f'Digest username="{user}", realm="{realm}", nonce="{nonce}", uri="{uri}", response="{response}", '
            f'algorithm={algorithm}, cnonce="{cnonce}", qop=auth, nc={count}')


@dataclass
class Response:
    status: int
    headers: dict[str, list[str]]
    raw: bytes

    def header(self, name: str) -> list[str]:
        return self.headers.get(name.lower(), [])


def parse_response(data: bytes) -> Response | None:
    m = _STATUS_RE.match(data)
    if m is None:
        return None
    headers: dict[str, list[str]] = collections.defaultdict(list)
    for line in data.split(b"\r\n\r\n", 1)[0].decode(errors="replace").split("\r\n")[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()].append(value.strip())
    return Response(int(m.group(1)), dict(headers), data)


class _Inbox(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.queue.put_nowait(data)


@dataclass
class SipProbe:
    """One UDP user agent of the attacker (or of an honest caller) with an RTP socket of its own."""

    server: tuple[str, int]
    source_ip: str = "127.0.0.1"
    call_id: str = field(default_factory=lambda: secrets.token_hex(8))
    tag: str = field(default_factory=lambda: secrets.token_hex(4))
    cseq: int = 0
    remote_tag: str = ""
    transport: asyncio.DatagramTransport | None = None
    inbox: _Inbox | None = None
    rtp: socket.socket | None = None
    last: Response | None = None  # the last final response

    async def open(self) -> SipProbe:
        loop = asyncio.get_running_loop()
        self.transport, self.inbox = await loop.create_datagram_endpoint(_Inbox, local_addr=(self.source_ip, 0))
        self.rtp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.rtp.bind((self.source_ip, 0))
        self.rtp.setblocking(False)
        return self

    @property
    def port(self) -> int:
        assert self.transport is not None
        return int(self.transport.get_extra_info("sockname")[1])

    @property
    def rtp_port(self) -> int:
        assert self.rtp is not None
        return int(self.rtp.getsockname()[1])

    def uri(self, user: str) -> str:
        return f"sip:{user}@{self.server[0]}:{self.server[1]}"

    def request(self, method: str, user: str, *, body: str = "", extra: str = "", cseq: int | None = None) -> bytes:
        if cseq is None:
            self.cseq += 1
            cseq = self.cseq
        to_tag = f";tag={self.remote_tag}" if self.remote_tag and method != "INVITE" else ""
        text = (f"{method} {self.uri(user)} SIP/2.0\r\n"
                f"Via: SIP/2.0/UDP {self.source_ip}:{self.port};branch=z9hG4bK{secrets.token_hex(8)};rport\r\n"
                f"From: <sip:attacker@{self.source_ip}>;tag={self.tag}\r\nTo: <{self.uri(user)}>{to_tag}\r\n"
                f"Call-ID: {self.call_id}\r\nCSeq: {cseq} {method}\r\n"
                f"Contact: <sip:attacker@{self.source_ip}:{self.port}>\r\nMax-Forwards: 70\r\n{extra}")
        if body:
            text += "Content-Type: application/sdp\r\n"
        return (text + f"Content-Length: {len(body)}\r\n\r\n{body}").encode()

    def send(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.sendto(data, self.server)

    async def final(self, timeout: float = 5.0) -> Response | None:
        """The next final response (provisional ones skipped); None on timeout."""
        assert self.inbox is not None
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                data = await asyncio.wait_for(self.inbox.queue.get(), left)
            except TimeoutError:
                return None
            response = parse_response(data)
            if response is not None and response.status >= 200:
                self.last = response
                if response.status < 300:
                    tag = re.search(rb"\r\nTo:[^\r]*;tag=([^;\s\r]+)", response.raw, re.IGNORECASE)
                    self.remote_tag = tag.group(1).decode() if tag else ""
                return response
        return None

    async def invite(self, user: str, credentials: tuple[str, str] | None = None, algorithm: str = "SHA-256",
                     timeout: float = 5.0) -> list[int]:
        """INVITE ``user``; with ``credentials`` answer a 401 challenge once.  The final statuses seen."""
        statuses: list[int] = []
        self.send(self.request("INVITE", user, body=sdp_offer(self.rtp_port, self.source_ip)))
        response = await self.final(timeout)
        if response is None:
            return statuses
        statuses.append(response.status)
        if response.status >= 300:
            self.ack_failure(user)
        if response.status == 401 and credentials is not None:
            challenge = next((c for c in response.header("www-authenticate") if f"algorithm={algorithm}" in c),
                             response.header("www-authenticate")[0])
            auth = digest_authorization(challenge, "INVITE", self.uri(user), *credentials)
            self.send(self.request("INVITE", user, body=sdp_offer(self.rtp_port, self.source_ip),
                                   extra=f"Authorization: {auth}\r\n"))
            response = await self.final(timeout)
            if response is None:
                return statuses
            statuses.append(response.status)
            if response.status >= 300:
                self.ack_failure(user)
        if response.status < 300:
            self.send(self.request("ACK", user, cseq=self.cseq))
        return statuses

    def ack_failure(self, user: str) -> None:
        self.send(self.request("ACK", user, cseq=self.cseq))

    async def press(self, user: str, keys: str) -> list[int]:
        """Key presses as SIP INFO (application/dtmf-relay) inside the call; the statuses."""
        statuses = []
        for key in keys:
            body = f"Signal={key}\r\nDuration=160\r\n"
            text = self.request("INFO", user, body=body).replace(b"application/sdp", b"application/dtmf-relay")
            self.send(text)
            response = await self.final()
            statuses.append(response.status if response is not None else 0)
        return statuses

    async def bye(self, user: str) -> Response | None:
        self.send(self.request("BYE", user))
        return await self.final()

    def rtp_received(self) -> int:
        """RTP packets the server sent to this probe since the last call."""
        assert self.rtp is not None
        n = 0
        while True:
            try:
                self.rtp.recv(2048)
            except BlockingIOError:
                return n
            n += 1

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        if self.rtp is not None:
            self.rtp.close()


@dataclass
class FloodResult:
    sent: int
    statuses: collections.Counter[int]  # the final status of each INVITE
    responses_per_request: collections.Counter[int]  # how many responses each INVITE got
    largest_response: int
    largest_request: int


def ack_for(probe: SipProbe, user: str, response: Response, method: str = "ACK", cseq: int = 1) -> bytes:
    """The ACK (or BYE) of an answered INVITE, built from its 2xx (From, To with tag, Call-ID)."""
    return (f"{method} {probe.uri(user)} SIP/2.0\r\nVia: SIP/2.0/UDP {probe.source_ip}:{probe.port};branch=z9hG4bK"
            f"{secrets.token_hex(8)}\r\nFrom: {response.header('from')[0]}\r\nTo: {response.header('to')[0]}\r\n"
            f"Call-ID: {response.header('call-id')[0]}\r\nCSeq: {cseq} {method}\r\nMax-Forwards: 70\r\n"
            "Content-Length: 0\r\n\r\n").encode()


async def invite_flood(server: tuple[str, int], user: str, count: int, sources: tuple[str, ...] = ("127.0.0.1",),
                       listen_s: float = 2.0, ack: bool = False, hangup: bool = False) -> FloodResult:
    """``count`` INVITEs (with SDP) into ``user``, round-robin from ``sources``, as fast as they go; with
    ``ack`` the answered ones are acknowledged, so they join the room, and with ``hangup`` they get a BYE
    after ``listen_s`` (else the caller hangs them up)."""
    answered: list[tuple[SipProbe, Response]] = []
    probes = [await SipProbe(server, ip).open() for ip in sources]
    sent_by_call: dict[str, int] = {}
    largest_request = 0
    try:
        for k in range(count):
            probe = probes[k % len(probes)]
            probe.call_id, probe.tag, probe.cseq = secrets.token_hex(8), secrets.token_hex(4), 0
            data = probe.request("INVITE", user, body=sdp_offer(probe.rtp_port, probe.source_ip))
            largest_request = max(largest_request, len(data))
            probe.send(data)
            sent_by_call[probe.call_id] = 0
            if k % 10 == 9:
                await asyncio.sleep(0.001)  # a server in this event loop gets to read (loopback drops otherwise)
        deadline = time.monotonic() + listen_s
        statuses: collections.Counter[int] = collections.Counter()
        largest = 0
        while time.monotonic() < deadline:
            for probe in probes:
                assert probe.inbox is not None
                while not probe.inbox.queue.empty():
                    data = probe.inbox.queue.get_nowait()
                    response = parse_response(data)
                    call = re.search(rb"\r\nCall-ID:\s*(\S+)", data, re.IGNORECASE)
                    if response is None or call is None:
                        continue
                    largest = max(largest, len(data))
                    if response.status >= 200:
                        key = call.group(1).decode()
                        if sent_by_call.get(key, 0) == 0:
                            statuses[response.status] += 1  # the first final response of each INVITE
                            if ack and response.status < 300:
                                probe.send(ack_for(probe, user, response))
                                answered.append((probe, response))
                        sent_by_call[key] = sent_by_call.get(key, 0) + 1
            await asyncio.sleep(0.05)
        if hangup:
            for probe, response in answered:
                probe.send(ack_for(probe, user, response, "BYE", 2))
            await asyncio.sleep(0.5)
        return FloodResult(count, statuses, collections.Counter(sent_by_call.values()), largest, largest_request)
    finally:
        for probe in probes:
            probe.close()


async def tcp_idle_flood(server: tuple[str, int], count: int, sources: tuple[str, ...] = ("127.0.0.1",)
                         ) -> list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """``count`` TCP connections that send nothing (the caller closes them)."""
    conns = []
    for k in range(count):
        reader, writer = await asyncio.open_connection(server[0], server[1], local_addr=(sources[k % len(sources)], 0))
        conns.append((reader, writer))
    return conns


async def closed_by_server(reader: asyncio.StreamReader, timeout: float) -> bool:
    """Did the server close this connection within ``timeout``?"""
    try:
        return await asyncio.wait_for(reader.read(1), timeout) == b""
    except TimeoutError:
        return False
    except ConnectionError:
        return True


async def tcp_options(server: tuple[str, int], source_ip: str = "127.0.0.1", timeout: float = 5.0) -> int | None:
    """One OPTIONS over a new TCP connection: its status, None when refused or unanswered."""
    try:
        reader, writer = await asyncio.open_connection(server[0], server[1], local_addr=(source_ip, 0))
    except OSError:
        return None
    try:
        port = writer.get_extra_info("sockname")[1]
        writer.write((f"OPTIONS sip:x@{server[0]} SIP/2.0\r\nVia: SIP/2.0/TCP {source_ip}:{port};branch=z9hG4bK"
                      f"{secrets.token_hex(6)}\r\nFrom: <sip:probe@{source_ip}>;tag=p1\r\nTo: <sip:x@{server[0]}>\r\n"
                      f"Call-ID: {secrets.token_hex(6)}\r\nCSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\n"
                      "Content-Length: 0\r\n\r\n").encode())
        data = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
        response = parse_response(data)
        return response.status if response is not None else None
    except (TimeoutError, ConnectionError, asyncio.IncompleteReadError):
        return None
    finally:
        writer.close()


async def tcp_lockout(server: tuple[str, int], count: int, sources: tuple[str, ...],
                      newcomer: str = "127.0.0.254") -> dict[str, object]:
    """``count`` idle TCP connections, then a new caller's OPTIONS over TCP: is it still answered?"""
    conns = await tcp_idle_flood(server, count, sources)
    try:
        status = await tcp_options(server, newcomer)
        still_open = sum(1 for r, _ in conns if not r.at_eof())
        return {"idle_connections": count, "newcomer_status": status, "idle_still_open": still_open}
    finally:
        for _, writer in conns:
            writer.close()


def main(argv: list[str] | None = None) -> int:
    """``python -m loadtest.sip_attacks invite-flood|tcp-lockout --port P ...``: one attack, JSON on stdout."""
    import argparse
    import json

    parser = argparse.ArgumentParser(description="SIP attacks on a bridge on loopback (bounded)")
    parser.add_argument("attack", choices=("invite-flood", "tcp-lockout"))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True, help="the SIP port")
    parser.add_argument("--user", default="room-call", help="request-URI user of the INVITEs")
    parser.add_argument("--count", type=int, default=400)
    parser.add_argument("--sources", default="127.0.0.1", help="comma-separated loopback source addresses")
    parser.add_argument("--ack", action="store_true", help="acknowledge answered INVITEs (the calls join)")
    parser.add_argument("--hangup", action="store_true", help="BYE to the answered calls at the end")
    parser.add_argument("--listen", type=float, default=2.0, help="seconds to collect responses")
    args = parser.parse_args(argv)
    if not args.host.startswith("127.") and args.host not in ("localhost", "::1"):
        parser.error("loopback targets only")
    count = max(1, min(args.count, 5000))
    sources = tuple(s.strip() for s in args.sources.split(",") if s.strip())
    target = (args.host, args.port)
    if args.attack == "invite-flood":
        flood = asyncio.run(invite_flood(target, args.user, count, sources, min(args.listen, 30.0), args.ack,
                                         args.hangup))
        out: dict[str, object] = {"sent": flood.sent, "statuses": dict(flood.statuses),
                                  "responses_per_request": dict(flood.responses_per_request),
                                  "largest_response": flood.largest_response, "largest_request": flood.largest_request}
    else:
        out = asyncio.run(tcp_lockout(target, count, sources))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
