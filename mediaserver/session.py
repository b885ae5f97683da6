"""One participant's peer connection and its offer/answer negotiation.

The client offers once, when it joins, with its microphone.  From then on
the server is the only offerer: every change of the participant's
subscriptions (someone joins, leaves, a prompt track appears) marks the
session dirty, and one renegotiation at a time is sent as an ``offer`` that
the client answers.  Sending transceivers are reused: a ``SubscriberTrack``
stays on its transceiver and is re-attached to whichever published stream
that slot carries, so m-lines do not pile up.
"""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Optional

import aiortc.rtcpeerconnection as _aiortc_pc
from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription
from aiortc.rtcrtpparameters import RTCRtpHeaderExtensionParameters
from aiortc.rtcrtpsender import RTCRtpSender

from mediaserver.config import LimitsConfig, MediaConfig
from mediaserver.fanout import SubscriberTrack
from mediaserver.liveness import PeerLiveness
from mediaserver.rtp_send import DirectRtpSender
from mediaserver.stream import PublishedStream
from mediaserver.transport_guard import TransportGuard

log = logging.getLogger(__name__)


class NegotiationError(ValueError):
    """The client's SDP cannot be used (malformed, no Opus, wrong state)."""


@dataclass
class SendSlot:
    """One sending transceiver of the session and the track it carries."""

    transceiver: Any
    track: SubscriberTrack
    stream: Optional[PublishedStream] = None


_EXTMAP_RE = re.compile(r"^a=extmap:(\d+)(?:/\w+)?\s+(\S+)", re.MULTILINE)


def client_extension_ids(remote_sdp: str, supported: list[RTCRtpHeaderExtensionParameters]
                         ) -> list[RTCRtpHeaderExtensionParameters]:
    """Header extension ids for our offers that agree with the client's own numbering.

    aiortc numbers extensions its own way in every offer; browsers refuse a
    renegotiation that renumbers an extension inside the BUNDLE group.  Keep
    the client's id for each URI it uses, and give the others unused ids.
    """
    theirs = {uri: int(i) for i, uri in _EXTMAP_RE.findall(remote_sdp)}
    used = set(theirs.values())
    out = []
    for ext in supported:
        if ext.uri in theirs:
            out.append(RTCRtpHeaderExtensionParameters(id=theirs[ext.uri], uri=ext.uri))
        else:
            free = next(i for i in range(1, 15) if i not in used)
            used.add(free)
            out.append(RTCRtpHeaderExtensionParameters(id=free, uri=ext.uri))
    return out


def _opus_only(kind: str = "audio") -> list[Any]:
    caps = RTCRtpSender.getCapabilities(kind)
    return [c for c in caps.codecs if c.mimeType.lower() == "audio/opus"]


class PeerSession:
    """Owns one RTCPeerConnection: the published microphone and the subscription slots."""

    def __init__(self, participant_id: str, media: MediaConfig, limits: LimitsConfig,
                 send: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
        self.participant_id = participant_id
        self._media = media
        self._limits = limits
        self._send = send
        servers = [RTCIceServer(urls=u) for u in media.ice_servers]
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=servers))
        self.publish_transceiver: Any = None
        self._slots: list[SendSlot] = []
        self._ready = False
        self._negotiating = False
        self._dirty = False
        self._lock = asyncio.Lock()
        self._timeout: Optional[asyncio.TimerHandle] = None
        self._audio_extensions: Optional[list[RTCRtpHeaderExtensionParameters]] = None
        self._pending_subscriptions: list[PublishedStream] = []  # until the first answer is sent
        self.renegotiations = 0
        self.closed = False
        self.liveness: Optional[PeerLiveness] = None
        # bad datagrams at the media ports are dropped and counted, never fatal (transport_guard.py);
        # attached once the negotiation created the transports and gathered their sockets
        self.guard = TransportGuard(participant_id, limits)

    def watch_liveness(self, on_silent: Callable[[float], Awaitable[None]]) -> None:
        """Call ``on_silent(seconds)`` once the client sent nothing for ``limits.peer_timeout_s``."""
        timeout = self._limits.peer_timeout_s
        if timeout > 0 and not self.closed and self.liveness is None:
            self.liveness = PeerLiveness(self.pc, timeout, on_silent)
            self.liveness.start()

    # -- the client's one offer ---------------------------------------------
    async def accept_offer(self, sdp: str) -> str:
        if self._ready or self.pc.remoteDescription is not None:
            raise NegotiationError("the client offers once, at join; later changes are server offers")
        if len(sdp) > self._limits.max_sdp_bytes:
            raise NegotiationError(f"SDP larger than {self._limits.max_sdp_bytes} bytes")
        async with self._lock:
            try:
                await self.pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
            except Exception as exc:
                raise NegotiationError(f"malformed or unsupported offer: {exc}") from exc
            audio = [t for t in self.pc.getTransceivers() if t.kind == "audio"]
            self._audio_extensions = client_extension_ids(
                sdp, _aiortc_pc.HEADER_EXTENSIONS["audio"])
            if not audio:
                raise NegotiationError("the offer has no audio m-line")
            opus = _opus_only()
            for t in self.pc.getTransceivers():
                if t.kind != "audio":
                    t.direction = "inactive"
                    continue
                t.setCodecPreferences(opus)
            # _offerDirection is from our side: the client sends when we may receive
            publish = [t for t in audio if t._offerDirection in ("sendrecv", "recvonly")]
            self.publish_transceiver = publish[0] if publish else None
            for t in audio:
                t.direction = "recvonly" if t is self.publish_transceiver else "inactive"
            try:
                answer = await self.pc.createAnswer()
                await self.pc.setLocalDescription(answer)
                self.guard.attach(self.pc)
            except Exception as exc:
                raise NegotiationError(f"cannot answer this offer (no common audio codec?): {exc}") from exc
            if "opus" not in self.pc.localDescription.sdp.lower() and self.publish_transceiver is not None:
                raise NegotiationError("the offer does not support Opus")
            return str(self.pc.localDescription.sdp)

    def mark_ready(self) -> None:
        self._ready = True
        pending, self._pending_subscriptions = self._pending_subscriptions, []
        for stream in pending:
            if not stream.closed:
                self.subscribe(stream)
        if self._dirty:
            self.request_renegotiation()

    # -- subscriptions -----------------------------------------------------
    def subscribe(self, stream: PublishedStream) -> None:
        if not self._ready:
            # the client's offer is still being answered: adding a transceiver now would race
            # setRemoteDescription/createAnswer; subscribe once the answer is out
            if stream not in self._pending_subscriptions:
                self._pending_subscriptions.append(stream)
            return
        if any(s.stream is stream for s in self._slots):
            return
        slot = next((s for s in self._slots if s.stream is None), None)
        if slot is None:
            track = SubscriberTrack(max_queue=self._media.subscriber_queue_packets)
            transceiver = self.pc.addTransceiver(track, direction="sendonly")
            transceiver.setCodecPreferences(_opus_only())
            if self._media.direct_rtp_send:
                DirectRtpSender.install(transceiver.sender, track)
            slot = SendSlot(transceiver=transceiver, track=track)
            self._slots.append(slot)
        else:
            slot.transceiver.direction = "sendonly"
        slot.stream = stream
        slot.track.attach(stream.fanout)
        self.request_renegotiation()

    def unsubscribe(self, stream: PublishedStream) -> None:
        if stream in self._pending_subscriptions:
            self._pending_subscriptions.remove(stream)
        for slot in self._slots:
            if slot.stream is stream:
                slot.track.detach()
                slot.stream = None
                slot.transceiver.direction = "inactive"
                self.request_renegotiation()

    @property
    def subscriber_tracks(self) -> list[SubscriberTrack]:
        return [s.track for s in self._slots if s.stream is not None]

    def track_map(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for slot in self._slots:
            mid = slot.transceiver.mid
            if mid is not None and slot.stream is not None:
                s = slot.stream
                out[str(mid)] = {"stream": s.id, "participant": s.owner_id, "kind": s.kind,
                                 "synthetic": s.synthetic}
        return out

    # -- server offers -------------------------------------------------------
    def request_renegotiation(self) -> None:
        self._dirty = True
        if self._ready and not self._negotiating and not self.closed:
            asyncio.get_running_loop().create_task(self._offer())

    async def _offer(self) -> None:
        async with self._lock:
            if self._negotiating or not self._dirty or self.closed or self.pc.connectionState == "closed":
                return
            self._negotiating = True
            self._dirty = False
            try:
                offer = await self._create_offer()
                await self.pc.setLocalDescription(offer)
                self.guard.attach(self.pc)  # transports this offer added
            except Exception:
                log.exception("participant %s: creating an offer failed", self.participant_id)
                self._negotiating = False
                return
            if self.closed:  # closed while the offer was made (close() does not wait for the lock): no offer,
                self._negotiating = False  # and no answer timer left behind holding the session
                return
            self.renegotiations += 1
            loop = asyncio.get_running_loop()
            self._timeout = loop.call_later(self._limits.negotiation_timeout_s, self._answer_timed_out)
            await self._send({"type": "offer", "sdp": self.pc.localDescription.sdp, "tracks": self.track_map()})

    async def _create_offer(self) -> RTCSessionDescription:
        """``pc.createOffer`` with the client's header extension numbering.

        aiortc's createOffer reads the module-level extension table and never
        suspends, so swapping the table around the call affects this offer only.
        """
        saved = _aiortc_pc.HEADER_EXTENSIONS
        if self._audio_extensions is not None:
            _aiortc_pc.HEADER_EXTENSIONS = {**saved, "audio": self._audio_extensions}
        try:
            return await self.pc.createOffer()
        finally:
            _aiortc_pc.HEADER_EXTENSIONS = saved

    def _answer_timed_out(self) -> None:
        if self.closed:
            return
        log.warning("participant %s did not answer the server offer in time", self.participant_id)
        self._negotiating = False

    async def accept_answer(self, sdp: str) -> None:
        if not self._negotiating:
            raise NegotiationError("no server offer is waiting for an answer")
        if len(sdp) > self._limits.max_sdp_bytes:
            raise NegotiationError(f"SDP larger than {self._limits.max_sdp_bytes} bytes")
        async with self._lock:
            if self._timeout is not None:
                self._timeout.cancel()
            try:
                await self.pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="answer"))
            except Exception as exc:
                self._negotiating = False
                self._dirty = True
                raise NegotiationError(f"malformed answer: {exc}") from exc
            self._negotiating = False
            if self.liveness is not None:
                self.liveness.attach()  # transports added by this negotiation
        if self._dirty:
            self.request_renegotiation()

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._timeout is not None:
            self._timeout.cancel()
        if self.liveness is not None:
            self.liveness.stop()
        for slot in self._slots:
            slot.track.stop()
        await self.pc.close()
        await _stop_late_starters(self.pc)


async def _stop_late_starters(pc: RTCPeerConnection) -> None:
    """Stop the receivers and senders that aiortc started after ``pc.close()`` had stopped them.

    aiortc's connect task (spawned by ``setRemoteDescription``) can still be waiting for the
    DTLS handshake when the connection is closed: ``close()`` then stops a receiver that has
    not started (a no-op), and the connect task starts it right after.  Its RTCP task then
    runs forever and holds the transport and, through it, the whole session (the participant,
    its room, its streams): a leak per participant that leaves while connecting.  Nothing may
    start any more once closed, and whatever started in between is stopped again (``stop``
    is idempotent in aiortc).
    """
    for transceiver in pc.getTransceivers():
        for end, start in ((transceiver.receiver, "receive"), (transceiver.sender, "send")):
            setattr(end, start, _refuse_start)
    for transceiver in pc.getTransceivers():
        try:
            await transceiver.receiver.stop()
            await transceiver.sender.stop()
        except Exception:  # a closing connection must not take the leave down
            log.debug("stopping a late-started transceiver failed", exc_info=True)


async def _refuse_start(*args: Any, **kwargs: Any) -> None:
    """Stands in for ``receive`` / ``send`` of a closed connection's receivers and senders."""
