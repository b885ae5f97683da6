"""The SIP endpoint of the bridge: a UAS on UDP (and TCP) that answers phones into rooms.

``SipEndpoint`` receives SIP messages, keeps them out of the call logic when
they are retransmissions (``TransactionLayer``), and handles INVITE (new
calls and re-INVITEs), ACK, BYE, CANCEL, OPTIONS and INFO (DTMF).  Hostile
input never reaches further than it must: unparseable datagrams are dropped,
malformed requests get 400, unknown users 404, offers without PCMU/PCMA 488,
INVITEs beyond the per-source rate, ``max_calls`` or the call rate 503, and
each handler failure is confined to its own request.  A new INVITE passes
``Admission`` (rate, dial plan, digest authentication in production mode,
room rights and caps) before it costs anything; refusals are stateless.  An
admitted call is answered at once; after its ACK the caller hears the menu
or goes straight to the room of the dial plan.  Nothing of a room reaches a
caller before it was admitted: there is no early media.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import Any

from mediaserver.config import SipConfig
from mediaserver.server import MediaServer
from signaling.sip.admission import Admission, Decision, SourceBuckets
from signaling.sip.call import PhoneCall, aec_available, caller_name
from signaling.sip.dialog import ACCEPT, ALLOW, USER_AGENT, Dialog, DialogKey, new_tag
from signaling.sip.g711 import PCMU
from signaling.sip.ivr import Destination, DialPlan, MenuPrompts, run_menu
from signaling.sip.message import (
    NameAddr,
    SipParseError,
    SipRequest,
    SipResponse,
    make_response,
    parse_message,
)
from signaling.sip.rtp import PortAllocator, RtpSession
from signaling.sip.sdp import (
    AudioParams,
    SdpError,
    build_answer,
    build_offer,
    negotiate,
    parse_sdp,
)
from signaling.sip.transactions import Address, ServerTransaction, TransactionLayer, transaction_key
from signaling.sip.transport import SipTransport, local_address_towards
from signaling.sip.validate import check_request, read_offer, warning

log = logging.getLogger(__name__)

HOUSEKEEPING_S = 1.0
_NO_DIALOG_METHODS = {"BYE", "INFO", "UPDATE", "PRACK"}
_REFUSED_METHODS = {"REGISTER", "SUBSCRIBE", "NOTIFY", "PUBLISH", "MESSAGE", "REFER"}
_KNOWN_METHODS = {"INVITE", "ACK", "BYE", "CANCEL", "OPTIONS"} | _NO_DIALOG_METHODS | _REFUSED_METHODS


class SipEndpoint:
    """Owns the SIP sockets, the transactions, the dialogs (calls) and the limits on new calls."""

    def __init__(self, server: MediaServer, host: str, port: int, config: SipConfig | None = None) -> None:
        self.server = server
        self.config: SipConfig = config or server.config.sip
        self.host = host
        self.port = port
        c = self.config
        self.transport = SipTransport(self._on_message, max_tcp=c.max_tcp_connections,
                                      max_tcp_per_source=c.max_tcp_per_source, first_request_s=c.tcp_first_request_s,
                                      idle_s=c.tcp_idle_s, busy=self._carries_call)
        self.tx = TransactionLayer(self.transport.send, self.transport.is_reliable)
        self.dialogs: dict[DialogKey, Dialog] = {}
        self.plan = DialPlan(self.config)
        self.prompts = MenuPrompts(server)
        self.ports = PortAllocator(self.config.rtp_port_min, self.config.rtp_port_max)
        self.admission = Admission(server, self.config, self.plan, self.dialogs)
        self.message_buckets = SourceBuckets(self.config.messages_per_source, self.config.message_burst_per_source)
        self.stats: collections.Counter[str] = collections.Counter()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._housekeeping: asyncio.Task[None] | None = None
        self._closed = False

    @classmethod
    async def start(cls, server: MediaServer) -> SipEndpoint:
        """Bind ``config.sip_port`` (0: any free port) on the server's host and start serving."""
        cfg = server.config
        endpoint = cls(server, cfg.host, int(cfg.sip_port or 0))
        endpoint.port = await endpoint.transport.open(cfg.host, endpoint.port)
        endpoint._housekeeping = asyncio.get_running_loop().create_task(endpoint._housekeep(), name="sip-housekeeping")
        endpoint._spawn(endpoint._warm_prompts())
        endpoint._spawn(asyncio.to_thread(aec_available))  # import the aec stage off the event loop, once
        log.info("sip: listening on %s:%d (udp, tcp)", cfg.host, endpoint.port)
        auth = endpoint.admission.auth
        if not auth.required:
            log.warning("sip: callers are not authenticated (development mode or require_auth=False)")
        elif not auth.users and not auth.trusted:
            log.warning("sip: authentication is required but no SIP users or trusted networks are configured "
                        "(MEDIASERVER_SIP_USERS, MEDIASERVER_SIP_TRUSTED): every call will be refused")
        return endpoint

    async def close(self) -> None:
        """Hang up every call (BYE), then close the sockets (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self._housekeeping is not None:
            self._housekeeping.cancel()
        byes = [self._hangup(d, "server shutting down") for d in list(self.dialogs.values())]
        if byes:
            try:
                await asyncio.wait_for(asyncio.gather(*byes, return_exceptions=True), 3.0)
            except TimeoutError:
                log.warning("sip: some calls did not end in time")
        for task in list(self._tasks):
            task.cancel()
        self.tx.close()
        self.transport.close()

    def describe(self) -> dict[str, Any]:
        """Counters and the live calls, for health and metrics pages."""
        calls = [{"call_id": d.call_id, "state": d.state, "room": d.call.participant.room.id
                  if d.call is not None and d.call.participant is not None else None,
                  "codec": d.call.params.codec.name if d.call is not None else None,
                  "rtp_received": d.call.rtp.received_packets if d.call is not None else 0,
                  "rtp_sent": d.call.rtp.sent_packets if d.call is not None else 0,
                  "rtt_ms": d.call.rtp.rtt_ms if d.call is not None else None}
                 for d in self.dialogs.values()]
        return {"port": self.port, "calls": calls, "stats": dict(self.stats)}

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _warm_prompts(self) -> None:
        for text in (self.config.menu_text, self.config.invalid_text, self.config.goodbye_text):
            await self.prompts.audio(text)

    # -- receiving -----------------------------------------------------------------
    def _on_message(self, data: bytes, addr: Address) -> None:
        self.stats["messages"] += 1
        if not self.message_buckets.take(addr[0]) and not self.admission.auth.is_trusted(addr[0]):
            self.stats["dropped_rate"] += 1  # a flood from one address: not even parsed
            self.admission.throttle.warning("message-rate", "sip: messages from %s over %.0f/s: dropped", addr[0],
                                            self.config.messages_per_source)
            return
        if not data.strip():
            return  # CRLF keep-alive
        try:
            msg = parse_message(data)
        except SipParseError as exc:
            self.stats["malformed"] += 1
            log.debug("sip: malformed message from %s: %s", addr, exc)
            if exc.partial is not None and exc.partial.method != "ACK":
                self.transport.send(make_response(exc.partial, 400, extra=[warning(str(exc))]).serialize(), addr)
                self.stats["status_400"] += 1
            return
        if isinstance(msg, SipResponse):
            self.tx.on_response(msg)
            return
        try:
            self._on_request(msg, addr)
        except Exception:
            log.exception("sip: %s from %s failed", msg.method, addr)

    def _on_request(self, req: SipRequest, addr: Address) -> None:
        known = req.method in _KNOWN_METHODS  # the counter's keys stay bounded whatever peers send
        self.stats[f"request_{req.method.lower()}" if known else "request_other"] += 1
        tx = self.tx.lookup(req)
        if req.method == "ACK":
            if not self.tx.absorb_ack(req):
                self._on_ack(req, addr)
            return
        if tx is not None:
            self.tx.retransmitted(tx)
            return
        decision: Decision | None = None
        if req.method == "INVITE" and not req.to.tag:
            decision = self.admission.check(req, addr[0])
            if decision.status:
                self._refuse_stateless(req, addr, decision)
                return
        tx = self.tx.create(req, addr)
        try:
            self._handle(req, tx, decision)
        except Exception:
            log.exception("sip: handling %s failed", req.method)
            self._respond(tx, 500)

    def _respond(self, tx: ServerTransaction, status: int, *, to_tag: str | None = None,
                 extra: list[tuple[str, str]] | None = None, body: bytes = b"",
                 content_type: str | None = None) -> SipResponse:
        headers = [("Server", USER_AGENT)] + list(extra or [])
        response = make_response(tx.request, status, to_tag=to_tag or (new_tag() if status > 100 else None),
                                 extra=headers, body=body, content_type=content_type)
        self.tx.respond(tx, response)
        self.stats[f"status_{status}"] += 1
        return response

    def _refuse_stateless(self, req: SipRequest, addr: Address, decision: Decision) -> None:
        """One response, no transaction, no retransmission (RFC 3261 8.2.7): O(1) for a refused INVITE."""
        extra = [("Server", USER_AGENT), *decision.headers]
        self.transport.send(make_response(req, decision.status, to_tag=new_tag(), extra=extra).serialize(), addr)
        self.stats[f"status_{decision.status}"] += 1
        self.stats["calls_refused_busy" if decision.status in (486, 503) else "calls_refused"] += 1

    def _carries_call(self, addr: Address) -> bool:
        return any(d.addr == addr for d in self.dialogs.values())

    def _handle(self, req: SipRequest, tx: ServerTransaction, decision: Decision | None = None) -> None:
        refusal = check_request(req)
        if refusal is not None:
            self._respond(tx, refusal[0], extra=refusal[1])
            return
        if req.method == "CANCEL":
            self._on_cancel(req, tx)
            return
        to_tag = req.to.tag
        if to_tag:
            dialog = self.dialogs.get((req.call_id, to_tag, req.from_.tag or ""))
            if dialog is None or dialog.state == "ended":
                self._respond(tx, 481)
            else:
                self._in_dialog(dialog, req, tx)
        elif req.method == "INVITE" and decision is not None:
            self._on_invite(req, tx, decision)
        elif req.method == "OPTIONS":
            self._respond(tx, 200, extra=[("Allow", ALLOW), ("Accept", ACCEPT)])
        elif req.method in _NO_DIALOG_METHODS:
            self._respond(tx, 481)
        elif req.method in _REFUSED_METHODS:
            self._respond(tx, 405, extra=[("Allow", ALLOW)])
        else:
            self._respond(tx, 501, extra=[("Allow", ALLOW)])

    # -- new calls ---------------------------------------------------------------------
    def _on_invite(self, req: SipRequest, tx: ServerTransaction, decision: Decision) -> None:
        """An INVITE that ``Admission`` let through: read the offer, answer."""
        destination, rights = decision.destination, decision.auth
        assert destination is not None and rights is not None
        contact = req.headers.get("Contact")
        if contact is None or not req.from_.tag:
            self._respond(tx, 400, extra=[warning("INVITE needs a Contact and a From tag")])
            return
        self._respond(tx, 100)
        offer, params, refusal = read_offer(req)
        if refusal is not None:
            self._respond(tx, refusal[0], extra=refusal[1])
            return
        try:
            target = NameAddr.parse(contact).sip_uri()
        except SipParseError:
            self._respond(tx, 400, extra=[warning("bad Contact")])
            return
        to = req.to
        to.params.pop("tag", None)
        local_ip = local_address_towards(tx.addr[0], self.host, self.config.public_address)
        dialog = Dialog(call_id=req.call_id, local_tag=new_tag(), remote_tag=req.from_.tag or "",
                        local_party=str(to), remote_party=req.headers.get("From") or "", remote_target=str(target),
                        route_set=req.headers.get_all("Record-Route"), addr=tx.addr,
                        transport="TCP" if self.transport.is_reliable(tx.addr) else "UDP",
                        remote_cseq=req.cseq[0], destination=destination, local_ip=local_ip,
                        local_port=self.port, invite_tx=tx, offer=offer)
        self.dialogs[dialog.key] = dialog
        self.admission.rights[dialog.key] = rights
        self._spawn(self._answer(dialog, req, tx, params))

    async def _answer(self, dialog: Dialog, req: SipRequest, tx: ServerTransaction,
                      params: AudioParams | None) -> None:
        try:
            rtp = await RtpSession.open(self.ports, self.host, tx.addr[0], lambda pkt, t: None)
        except OSError:
            log.warning("sip: no RTP port free for call %s", dialog.call_id)
            self._forget_dialog(dialog)
            self._respond(tx, 503, to_tag=dialog.local_tag, extra=[("Retry-After", "5")])
            return
        if tx.final or dialog.state == "ended":  # cancelled while the sockets were opening
            rtp.close()
            return
        offerless = params is None
        if params is None:  # the caller's answer comes in the ACK; until then nothing is sent
            params = AudioParams(PCMU, 0, None, "0.0.0.0", 9, 9, "sendrecv", 0)
        name = caller_name(req, self.server.config.limits.max_name_length)
        dialog.call = PhoneCall(self.server, rtp, params, name,
                                on_removed=lambda reason: self._hangup_later(dialog, reason),
                                gate=lambda room_id: self.admission.may_join(dialog, room_id))
        dialog.expecting_answer = offerless
        self._send_ok(dialog, tx)
        self.stats["calls_answered"] += 1
        log.info("sip: answered %s from %s (%s)", dialog.call_id, tx.addr,
                 "menu" if dialog.destination.menu else f"room {dialog.destination.room}")

    def _send_ok(self, dialog: Dialog, tx: ServerTransaction) -> None:
        """200 OK to an INVITE or re-INVITE: an answer to the offer, or our offer; retransmitted until ACK."""
        dialog.sdp_version += 1
        ip, port = dialog.local_ip, dialog.call.rtp.local_port
        if dialog.expecting_answer or dialog.offer is None:
            sdp = build_offer(ip, port, dialog.session_id, dialog.sdp_version)
        else:
            sdp = build_answer(dialog.offer, dialog.call.params, ip, port, dialog.session_id, dialog.sdp_version)
        ok = self._respond(tx, 200, to_tag=dialog.local_tag, body=sdp.encode(), content_type="application/sdp",
                           extra=[("Contact", dialog.contact), ("Allow", ALLOW), ("Accept", ACCEPT)])
        dialog.start_ok(ok.serialize(), tx.request.cseq[0], self.transport.send, self._no_ack,
                        self.transport.is_reliable(dialog.addr))

    def _no_ack(self, dialog: Dialog) -> None:
        log.warning("sip: no ACK for call %s", dialog.call_id)
        self._hangup_later(dialog, "no ACK")

    def _hangup_later(self, dialog: Dialog, reason: str) -> None:
        self._spawn(self._hangup(dialog, reason))

    def _on_ack(self, req: SipRequest, addr: Address) -> None:
        dialog = self.dialogs.get((req.call_id, req.to.tag or "", req.from_.tag or ""))
        if dialog is None or not dialog.awaiting_ack or req.cseq[0] != dialog.ok_cseq:
            return  # a stray ACK gets no response
        dialog.acked()
        if dialog.expecting_answer:
            dialog.expecting_answer = False
            try:
                answer = parse_sdp(req.body.decode("utf-8"))
                dialog.call.update_media(negotiate(answer))
            except (SdpError, UnicodeDecodeError) as exc:
                log.info("sip: unusable answer in ACK for %s: %s", dialog.call_id, exc)
                self._spawn(self._hangup(dialog, "no usable SDP answer"))
                return
        if dialog.state == "early":
            dialog.state = "confirmed"
            dialog.flow = self._spawn(self._run_flow(dialog))

    async def _run_flow(self, dialog: Dialog) -> None:
        call: PhoneCall = dialog.call
        try:
            if dialog.destination.room is not None:
                joined = await call.join_room(dialog.destination.room)
                if not joined:
                    await call.play(await self.prompts.audio(self.config.invalid_text))
            else:
                joined = await run_menu(call, self.prompts, self.plan, self.config)
            if not joined:
                await self._hangup(dialog, "no room")
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("sip: call flow of %s failed", dialog.call_id)
            await self._hangup(dialog, "internal error")

    # -- in-dialog requests -----------------------------------------------------------------
    def _in_dialog(self, dialog: Dialog, req: SipRequest, tx: ServerTransaction) -> None:
        number = req.cseq[0]
        if number <= dialog.remote_cseq:
            self._respond(tx, 500, to_tag=dialog.local_tag, extra=[warning("CSeq out of order")])
            return
        dialog.remote_cseq = number
        dialog.addr = tx.addr
        tag = dialog.local_tag
        if req.method == "BYE":
            self._respond(tx, 200, to_tag=tag)
            self._spawn(self._terminate(dialog, "caller hung up"))
        elif req.method == "INVITE":
            self._on_reinvite(dialog, req, tx)
        elif req.method == "INFO":
            if dialog.call is not None and dialog.call.dtmf.feed_info(req.content_type, req.body):
                self._respond(tx, 200, to_tag=tag)
            else:
                self._respond(tx, 200 if not req.body else 415, to_tag=tag, extra=[("Accept", ACCEPT)])
        elif req.method == "OPTIONS":
            self._respond(tx, 200, to_tag=tag, extra=[("Allow", ALLOW), ("Accept", ACCEPT)])
        else:
            self._respond(tx, 501, to_tag=tag, extra=[("Allow", ALLOW)])

    def _on_reinvite(self, dialog: Dialog, req: SipRequest, tx: ServerTransaction) -> None:
        if dialog.awaiting_ack or dialog.call is None:
            self._respond(tx, 500, to_tag=dialog.local_tag, extra=[("Retry-After", "1")])
            return
        offer, params, refusal = read_offer(req)
        if refusal is not None:
            self._respond(tx, refusal[0], to_tag=dialog.local_tag, extra=refusal[1])
            return
        if offer is not None and params is not None:
            dialog.offer = offer
            dialog.call.update_media(params)
            log.info("sip: %s re-INVITE: %s %s:%d", dialog.call_id, params.direction, params.remote_ip,
                     params.remote_port)
        else:
            dialog.expecting_answer = True
        self._send_ok(dialog, tx)

    def _on_cancel(self, req: SipRequest, tx: ServerTransaction) -> None:
        invite_tx = self.tx.server.get(transaction_key(req, "INVITE"))
        if invite_tx is None:
            self._respond(tx, 481)
            return
        dialog = next((d for d in self.dialogs.values() if d.invite_tx is invite_tx), None)
        self._respond(tx, 200, to_tag=dialog.local_tag if dialog else None)
        if not invite_tx.final:
            self._respond(invite_tx, 487, to_tag=dialog.local_tag if dialog else None)
            if dialog is not None:
                self._spawn(self._terminate(dialog, "cancelled"))

    # -- ending calls ------------------------------------------------------------------
    async def _terminate(self, dialog: Dialog, reason: str) -> None:
        """End the call without telling the caller (they hung up, or cancelled)."""
        if dialog.state == "ended":
            return
        dialog.state = "ended"
        dialog.cancel_ok()
        self._forget_dialog(dialog)
        if dialog.flow is not None and dialog.flow is not asyncio.current_task():
            dialog.flow.cancel()
        if dialog.call is not None:
            await dialog.call.end(reason)
        log.info("sip: call %s ended (%s)", dialog.call_id, reason)

    def _forget_dialog(self, dialog: Dialog) -> None:
        self.dialogs.pop(dialog.key, None)
        self.admission.rights.pop(dialog.key, None)

    async def _hangup(self, dialog: Dialog, reason: str) -> None:
        """End the call and send BYE (or, before the ACK, still BYE: RFC 3261 15)."""
        if dialog.state == "ended":
            return
        bye = dialog.request("BYE", dialog.local_ip, self.port, extra=[("Reason", f'SIP;cause=200;text="{reason}"')])
        future = self.tx.send_request(bye, dialog.addr)
        self.stats["byes_sent"] += 1
        await self._terminate(dialog, reason)
        try:
            await asyncio.wait_for(asyncio.shield(future), 2.0)
        except TimeoutError:
            pass  # the transaction keeps retransmitting on its own timer

    async def _housekeep(self) -> None:
        while True:
            await asyncio.sleep(HOUSEKEEPING_S)
            now = time.monotonic()
            self.admission.housekeep(now)
            for dialog in list(self.dialogs.values()):
                call = dialog.call
                if dialog.state == "confirmed" and call is not None and not call.params.on_hold \
                        and now - call.rtp.last_received > self.config.media_timeout_s:
                    self._spawn(self._hangup(dialog, "media timeout"))


__all__ = ["Destination", "SipEndpoint"]
