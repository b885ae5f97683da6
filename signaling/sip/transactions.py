"""SIP transactions (RFC 3261 section 17) for an unreliable transport, the part a UAS needs.

Server transactions remember the last response to each request, so a
retransmitted request is answered again without reaching the call logic;
a non-2xx final response to an INVITE is retransmitted (timer G, doubling
up to T2) until its ACK arrives or timer H fires.  Client transactions (the
BYEs the bridge sends) are retransmitted on timer E until a final response
or timer F.  Over a reliable transport nothing is retransmitted.  2xx
responses to INVITE are retransmitted by the dialog (``server.py``), as the
RFC assigns that job to the transaction user.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

from signaling.sip.message import MAGIC_COOKIE, SipMessage, SipRequest, SipResponse

T1 = 0.5
T2 = 4.0
T4 = 5.0
MAX_SERVER_TRANSACTIONS = 20_000  # bounded memory under a request flood: the oldest are forgotten

Address = tuple[str, int]
SendFn = Callable[[bytes, Address], None]
TxKey = tuple[str, ...]


def transaction_key(msg: SipMessage, method: str) -> TxKey:
    """RFC 3261 17.2.3: branch + sent-by + method, or the RFC 2543 fallback without the magic cookie."""
    via = msg.vias[0]
    if via.branch.startswith(MAGIC_COOKIE):
        return ("3261", via.branch, via.sent_by.lower(), method)
    number, _ = msg.cseq
    return ("2543", msg.call_id, str(number), msg.from_.tag or "", str(via), method)


@dataclass
class ServerTransaction:
    """One received request and the last response sent for it."""

    key: TxKey
    method: str
    addr: Address
    request: SipRequest
    response: bytes | None = None
    status: int = 0
    acked: bool = False
    timer: asyncio.TimerHandle | None = None
    expiry: asyncio.TimerHandle | None = None

    @property
    def final(self) -> bool:
        return self.status >= 200


@dataclass
class ClientTransaction:
    """One request the bridge sent, retransmitted until it is answered."""

    key: TxKey
    data: bytes
    addr: Address
    future: asyncio.Future[SipResponse | None]
    interval: float = T1
    timer: asyncio.TimerHandle | None = None
    deadline: asyncio.TimerHandle | None = None
    responses: list[int] = field(default_factory=list)


class TransactionLayer:
    """Owns the server and client transactions of one SIP endpoint and their timers."""

    def __init__(self, send: SendFn, reliable: Callable[[Address], bool] = lambda addr: False) -> None:
        self._send = send
        self._reliable = reliable
        self.server: dict[TxKey, ServerTransaction] = {}
        self.client: dict[TxKey, ClientTransaction] = {}
        self.retransmissions = 0

    # -- server side --------------------------------------------------------------
    def lookup(self, request: SipRequest) -> ServerTransaction | None:
        method = "INVITE" if request.method == "ACK" else request.method
        return self.server.get(transaction_key(request, method))

    def create(self, request: SipRequest, addr: Address) -> ServerTransaction:
        key = transaction_key(request, request.method)
        tx = ServerTransaction(key, request.method, addr, request)
        if len(self.server) >= MAX_SERVER_TRANSACTIONS:
            self._forget(next(iter(self.server.values())))
        self.server[key] = tx
        tx.expiry = asyncio.get_running_loop().call_later(64 * T1 + 32.0, self._forget, tx)  # safety net
        return tx

    def retransmitted(self, tx: ServerTransaction) -> None:
        """The same request came again: answer with what was sent (nothing yet: stay quiet)."""
        if tx.response is not None:
            self._send(tx.response, tx.addr)
            self.retransmissions += 1

    def respond(self, tx: ServerTransaction, response: SipResponse) -> None:
        if tx.final:
            return  # one final response per transaction
        data = response.serialize()
        tx.response, tx.status = data, response.status
        self._send(data, tx.addr)
        if not tx.final:
            return
        loop = asyncio.get_running_loop()
        reliable = self._reliable(tx.addr)
        if tx.method == "INVITE" and tx.status >= 300 and not reliable:
            tx.timer = loop.call_later(T1, self._timer_g, tx, T1)
        self._reset_expiry(tx, 0.0 if reliable and tx.method != "INVITE" else 64 * T1)

    def _timer_g(self, tx: ServerTransaction, interval: float) -> None:
        if tx.acked or tx.response is None or tx.key not in self.server:
            return
        self._send(tx.response, tx.addr)
        self.retransmissions += 1
        interval = min(2 * interval, T2)
        tx.timer = asyncio.get_running_loop().call_later(interval, self._timer_g, tx, interval)

    def absorb_ack(self, ack: SipRequest) -> bool:
        """An ACK for a non-2xx final response ends that INVITE transaction (timer I)."""
        tx = self.server.get(transaction_key(ack, "INVITE"))
        if tx is None or tx.status < 300:
            return False
        tx.acked = True
        if tx.timer is not None:
            tx.timer.cancel()
        self._reset_expiry(tx, T4)
        return True

    def _reset_expiry(self, tx: ServerTransaction, after: float) -> None:
        if tx.expiry is not None:
            tx.expiry.cancel()
        tx.expiry = asyncio.get_running_loop().call_later(after, self._forget, tx)

    def _forget(self, tx: ServerTransaction) -> None:
        for handle in (tx.timer, tx.expiry):
            if handle is not None:
                handle.cancel()
        if self.server.get(tx.key) is tx:
            del self.server[tx.key]

    # -- client side -----------------------------------------------------------------
    def send_request(self, request: SipRequest, addr: Address) -> asyncio.Future[SipResponse | None]:
        """Send a non-INVITE request; the future gets its final response, or None on timeout."""
        loop = asyncio.get_running_loop()
        key = transaction_key(request, request.method)
        tx = ClientTransaction(key, request.serialize(), addr, loop.create_future(), interval=T1)
        self.client[key] = tx
        self._send(tx.data, addr)
        if not self._reliable(addr):
            tx.timer = loop.call_later(T1, self._timer_e, tx)
        tx.deadline = loop.call_later(64 * T1, self._finish, tx, None)
        return tx.future

    def _timer_e(self, tx: ClientTransaction) -> None:
        if tx.future.done():
            return
        self._send(tx.data, tx.addr)
        self.retransmissions += 1
        tx.interval = T2 if tx.responses else min(2 * tx.interval, T2)
        tx.timer = asyncio.get_running_loop().call_later(tx.interval, self._timer_e, tx)

    def on_response(self, response: SipResponse) -> bool:
        """Match a response to a client transaction; False when it belongs to none."""
        try:
            key = transaction_key(response, response.cseq[1])
        except (ValueError, IndexError):
            return False
        tx = self.client.get(key)
        if tx is None:
            return False
        tx.responses.append(response.status)
        if response.status >= 200:
            self._finish(tx, response)
        return True

    def _finish(self, tx: ClientTransaction, response: SipResponse | None) -> None:
        for handle in (tx.timer, tx.deadline):
            if handle is not None:
                handle.cancel()
        self.client.pop(tx.key, None)
        if not tx.future.done():
            tx.future.set_result(response)

    def close(self) -> None:
        for tx in list(self.server.values()):
            self._forget(tx)
        for ctx in list(self.client.values()):
            self._finish(ctx, None)
