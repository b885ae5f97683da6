"""Noticing a WebRTC client that vanished while its WebSocket stays open.

A laptop lid closing, a network switch or a crashed tab can cut a client's
media path without closing its signaling socket (a proxy keeps the
WebSocket alive, or the socket only dies minutes later).  aioice's own ICE
consent freshness (RFC 7675) gives up only after about 30 s, and aiortc then
reports the connection ``closed`` rather than ``failed``.  ``PeerLiveness``
watches what the server receives from the client and reports it silent
after ``timeout_s`` without any of:

- an authenticated STUN binding request (ICE connectivity and consent
  checks: every live client sends one at least every ~5 s, even when it
  neither sends nor receives audio),
- an SRTP packet or SRTCP report that decrypted (media, receiver reports).

Only authenticated traffic counts: junk sent to the media port by anyone
else cannot keep a vanished participant alive.  The hooks replace a few
methods on the aiortc/aioice objects of one peer connection (the same kind
of hook as ``mediaserver/ingest.py``); on an aiortc without them the
watchdog stays off and says so.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiortc import RTCPeerConnection

log = logging.getLogger(__name__)

_ICE_HOOK = "check_incoming"  # aioice Connection: a binding request that passed authentication
_DTLS_HOOKS = ("_handle_rtp_data", "_handle_rtcp_data")  # aiortc RTCDtlsTransport: after SRTP unprotect


class PeerLiveness:
    """Owns the silence timer of one peer connection: ``on_silent(seconds)`` runs once when it expires."""

    def __init__(self, pc: RTCPeerConnection, timeout_s: float,
                 on_silent: Callable[[float], Awaitable[None]]) -> None:
        self.pc = pc
        self.timeout_s = timeout_s
        self.on_silent = on_silent
        self.loop = asyncio.get_running_loop()
        self.last_heard = self.loop.time()  # the clock starts when the offer is answered
        self.packets = 0
        self._hooked: set[tuple[int, str]] = set()
        self._hooks: list[tuple[Any, str, Callable[..., Any], Callable[..., Any]]] = []  # obj, name, original, hook
        self._task: asyncio.Task[None] | None = None

    def attach(self) -> bool:
        """Hook the transports the connection has now (call again after renegotiation); False: unsupported."""
        ok = True
        for dtls in self._dtls_transports():
            ok &= self._hook(dtls, _DTLS_HOOKS)
            ice = getattr(getattr(dtls, "transport", None), "_connection", None)
            ok &= ice is not None and self._hook(ice, (_ICE_HOOK,))
        return ok

    def start(self) -> None:
        if not self.attach():
            log.warning("this aiortc/aioice has no hooks for the peer liveness watchdog: vanished clients "
                        "are only noticed by ICE consent freshness (~30 s)")
            return
        self._task = self.loop.create_task(self._watch(), name="peer-liveness")

    def stop(self) -> None:
        """Stop the timer and take the hooks off again.

        The hooks hold this watchdog, hence ``on_silent`` and everything it refers to (the
        participant, its room, its streams): an aiortc object of the closed connection that
        outlives it (a task aiortc left running) must not keep all that alive.
        """
        if self._task is not None:
            self._task.cancel()
            self._task = None
        for obj, name, original, hook in reversed(self._hooks):
            if obj.__dict__.get(name) is hook:
                if getattr(type(obj), name, None) is getattr(original, "__func__", None):
                    del obj.__dict__[name]  # the class's method again
                else:
                    setattr(obj, name, original)  # someone else's hook underneath
        self._hooks.clear()
        self._hooked.clear()

    @property
    def silent_s(self) -> float:
        return self.loop.time() - self.last_heard

    # -- internals -------------------------------------------------------------------
    def _dtls_transports(self) -> list[Any]:
        seen: dict[int, Any] = {}
        for t in self.pc.getTransceivers():
            for end in (t.receiver, t.sender):
                transport = getattr(end, "transport", None)
                if transport is not None:
                    seen.setdefault(id(transport), transport)
        return list(seen.values())

    def _hook(self, obj: Any, names: tuple[str, ...]) -> bool:
        for name in names:
            key = id(obj), name
            if key in self._hooked:
                continue
            original = getattr(obj, name, None)
            if original is None:
                return False
            hook = self._stamped(original)
            setattr(obj, name, hook)
            self._hooked.add(key)
            self._hooks.append((obj, name, original, hook))
        return True

    def _stamped(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def heard(*args: Any, **kwargs: Any) -> Any:
            self.last_heard = self.loop.time()
            self.packets += 1
            return original(*args, **kwargs)

        return heard

    async def _watch(self) -> None:
        interval = min(1.0, self.timeout_s / 4)
        while True:
            await asyncio.sleep(interval)
            silent = self.silent_s
            if silent >= self.timeout_s:
                self._task = None
                await self.on_silent(silent)
                return
