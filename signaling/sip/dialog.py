"""One INVITE dialog answered by the bridge: identifiers, sequence numbers, 2xx retransmission.

The dialog is identified by Call-ID, our tag (To) and the caller's tag
(From).  In-dialog requests the bridge sends (BYE) go to the caller's
Contact URI with the Record-Route set as Route headers, over the flow the
INVITE came in on (its source address and transport), which also works for
phones behind NAT.  Until the ACK arrives, our 2xx is retransmitted at T1,
2 T1, ... T2 (RFC 3261 13.3.1.4); without an ACK after 64 T1 the call ends.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from signaling.sip.ivr import Destination
from signaling.sip.message import Headers, NameAddr, SipRequest
from signaling.sip.sdp import SessionDescription
from signaling.sip.transactions import T1, T2, Address, ServerTransaction

ALLOW = "INVITE, ACK, BYE, CANCEL, OPTIONS, INFO"
ACCEPT = "application/sdp, application/dtmf-relay, application/dtmf"
USER_AGENT = "mediaserver-sip/0.1"

DialogKey = tuple[str, str, str]


def new_tag() -> str:
    return secrets.token_hex(6)


def new_branch() -> str:
    return "z9hG4bK" + secrets.token_hex(8)


@dataclass
class Dialog:
    """Owns the signaling state of one call (the media lives in ``call``, a PhoneCall)."""

    call_id: str
    local_tag: str
    remote_tag: str
    local_party: str  # the INVITE's To, without tag: who the caller called
    remote_party: str  # the INVITE's From, with the caller's tag
    remote_target: str  # the caller's Contact URI
    route_set: list[str]
    addr: Address
    transport: str  # UDP | TCP
    remote_cseq: int
    destination: Destination
    local_ip: str
    local_port: int
    invite_tx: ServerTransaction | None = None
    state: str = "early"  # early: 2xx sent, waiting for the ACK | confirmed | ended
    call: Any = None  # PhoneCall once the media is set up
    local_cseq: int = field(default_factory=lambda: secrets.randbelow(10_000) + 1)
    session_id: int = field(default_factory=lambda: secrets.randbelow(1 << 30))
    sdp_version: int = 0
    offer: SessionDescription | None = None  # the remote offer answered last
    expecting_answer: bool = False  # our 2xx carried an offer; the answer comes in the ACK
    awaiting_ack: bool = False
    ok_data: bytes | None = None
    ok_cseq: int = 0
    flow: asyncio.Task[None] | None = None
    _ok_timer: asyncio.TimerHandle | None = None
    _ok_started: float = 0.0

    @property
    def key(self) -> DialogKey:
        return (self.call_id, self.local_tag, self.remote_tag)

    @property
    def contact(self) -> str:
        transport = ";transport=tcp" if self.transport == "TCP" else ""
        return f"<sip:mediaserver@{_host(self.local_ip)}:{self.local_port}{transport}>"

    # -- 2xx retransmission ---------------------------------------------------------
    def start_ok(self, data: bytes, cseq: int, send: Callable[[bytes, Address], None],
                 on_timeout: Callable[[Dialog], None], reliable: bool) -> None:
        self.cancel_ok()
        self.ok_data, self.ok_cseq, self.awaiting_ack = data, cseq, True
        loop = asyncio.get_running_loop()
        self._ok_started = loop.time()
        self._ok_timer = loop.call_later(T1 if not reliable else 64 * T1, self._resend_ok, T1, send, on_timeout,
                                         reliable)

    def _resend_ok(self, interval: float, send: Callable[[bytes, Address], None],
                   on_timeout: Callable[[Dialog], None], reliable: bool) -> None:
        if not self.awaiting_ack or self.ok_data is None:
            return
        loop = asyncio.get_running_loop()
        if reliable or loop.time() - self._ok_started >= 64 * T1:
            self.awaiting_ack = False
            on_timeout(self)
            return
        send(self.ok_data, self.addr)
        interval = min(2 * interval, T2)
        self._ok_timer = loop.call_later(interval, self._resend_ok, interval, send, on_timeout, reliable)

    def acked(self) -> None:
        self.awaiting_ack = False
        self.cancel_ok()

    def cancel_ok(self) -> None:
        if self._ok_timer is not None:
            self._ok_timer.cancel()
            self._ok_timer = None

    # -- requests we send ------------------------------------------------------------------
    def request(self, method: str, via_host: str, via_port: int,
                extra: list[tuple[str, str]] | None = None) -> SipRequest:
        """An in-dialog request (RFC 3261 12.2.1.1) with a fresh branch and the next CSeq."""
        self.local_cseq += 1
        h = Headers()
        h.add("Via", f"SIP/2.0/{self.transport} {_host(via_host)}:{via_port};branch={new_branch()};rport")
        h.add("Max-Forwards", "70")
        local = NameAddr.parse(self.local_party)
        local.params["tag"] = self.local_tag
        h.add("From", str(local))
        h.add("To", self.remote_party)
        h.add("Call-ID", self.call_id)
        h.add("CSeq", f"{self.local_cseq} {method}")
        for route in self.route_set:
            h.add("Route", route)
        h.add("User-Agent", USER_AGENT)
        for name, value in extra or []:
            h.add(name, value)
        return SipRequest(headers=h, method=method, uri=self.remote_target)


def _host(ip: str) -> str:
    return f"[{ip}]" if ":" in ip and not ip.startswith("[") else ip
