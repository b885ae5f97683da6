"""Whether a new INVITE may become a call, decided before any costly work, in O(1).

``Admission.check`` runs in this order, each step cheaper than what it
protects: the INVITE rate of the source IP (a bounded table of token
buckets), the request-wide checks (``validate.check_request``), the dial plan (404), authentication (401/403,
``signaling/sip/auth.py``), the rooms the user may enter (403), then the
global limits (``max_calls``, the call rate: 503) and the room's limits
(``max_calls_per_room`` phone calls, ``max_participants_per_room`` in all:
486).  Every room a call later joins goes through ``may_join``: the rooms
the caller may enter, joins into one room paced ``room_join_interval_s``
apart, and the room caps again for menu callers.  It parses no SDP and synthesizes no prompt, and a refusal is sent
statelessly (RFC 3261 8.2.7): one response per request, no transaction, no
retransmission timer, so a flood of spoofed INVITEs is not amplified.
Refusals are logged at most once per ``LOG_EVERY_S`` per kind, with counts.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass

from mediaserver.config import SipConfig
from mediaserver.server import MediaServer
from signaling.sip.auth import AuthResult, SipAuthenticator
from signaling.sip.dialog import Dialog, DialogKey
from signaling.sip.ivr import Destination, DialPlan
from signaling.sip.message import SipParseError, SipRequest, SipUri
from signaling.sip.transport import TokenBucket
from signaling.sip.validate import check_request

log = logging.getLogger(__name__)

MAX_TRACKED_SOURCES = 4096  # per-source buckets; the least recently seen are forgotten beyond
LOG_EVERY_S = 10.0
RETRY = ("Retry-After", "5")


class LogThrottle:
    """Logs one line per kind at most every ``every_s``, saying how many were suppressed meanwhile."""

    def __init__(self, logger: logging.Logger, every_s: float = LOG_EVERY_S) -> None:
        self._log = logger
        self._every = every_s
        self._last: dict[str, float] = {}
        self._suppressed: collections.Counter[str] = collections.Counter()

    def warning(self, kind: str, message: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last.get(kind, -1e9) < self._every:
            self._suppressed[kind] += 1
            return
        self._last[kind] = now
        more = self._suppressed.pop(kind, 0)
        self._log.warning(message + (f" (and {more} more in the last {self._every:.0f} s)" if more else ""), *args)


class SourceBuckets:
    """Owns one token bucket per source IP, at most ``MAX_TRACKED_SOURCES`` of them (LRU)."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, burst
        self._buckets: collections.OrderedDict[str, TokenBucket] = collections.OrderedDict()

    def take(self, ip: str) -> bool:
        bucket = self._buckets.get(ip)
        if bucket is None:
            bucket = self._buckets[ip] = TokenBucket(self.rate, self.burst)
            if len(self._buckets) > MAX_TRACKED_SOURCES:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(ip)
        return bucket.take()

    def __len__(self) -> int:
        return len(self._buckets)


@dataclass(frozen=True)
class Decision:
    """Admitted (``status`` 0) with where the call goes and who called, or the refusal to send."""

    status: int = 0
    headers: tuple[tuple[str, str], ...] = ()
    destination: Destination | None = None
    auth: AuthResult | None = None
    why: str = ""


class Admission:
    """Owns the limits on new calls: per-source INVITE rate, authentication, global and per-room caps."""

    def __init__(self, server: MediaServer, config: SipConfig, plan: DialPlan,
                 dialogs: Mapping[DialogKey, Dialog]) -> None:
        self.server = server
        self.config = config
        self.plan = plan
        self.auth = SipAuthenticator(config, server.config.auth.dev_mode)
        self.sources = SourceBuckets(config.invite_rate_per_source, config.invite_burst_per_source)
        self.calls = TokenBucket(config.call_rate, config.call_burst)
        self._dialogs = dialogs  # the endpoint's live calls, read only
        self.rights: dict[DialogKey, AuthResult] = {}  # who each live call authenticated as
        self._next_join: dict[str, float] = {}  # room -> when its next phone may join (pacing)
        self.throttle = LogThrottle(log)

    def check(self, req: SipRequest, ip: str) -> Decision:
        if not self.sources.take(ip):
            self.throttle.warning("source-rate", "sip: INVITE rate of %s over %.0f/s: 503", ip,
                                  self.config.invite_rate_per_source)
            return Decision(503, (RETRY,), why="source rate")
        refusal = check_request(req)
        if refusal is not None:
            return Decision(refusal[0], tuple(refusal[1]), why="bad request")
        try:
            destination = self.plan.resolve(SipUri.parse(req.uri).user)
        except SipParseError:
            return Decision(400, why="bad Request-URI")  # check_request words it the same way later
        if destination is None:
            return Decision(404, why="unknown user")
        auth = self.auth.check(req, ip)
        if not auth.ok:
            log.debug("sip: INVITE from %s: %d (%s)", ip, auth.status, auth.reason)
            if auth.status == 403:
                self.throttle.warning("auth-failed", "sip: INVITE from %s refused: %s", ip, auth.reason)
            return Decision(auth.status, auth.headers, why=auth.reason)
        room = destination.room
        if room is not None and not auth.may_enter(room):
            self.throttle.warning("room-forbidden", "sip: %s may not enter room %s", ip, room)
            return Decision(403, why="room not allowed")
        if len(self._dialogs) >= self.config.max_calls or not self.calls.take():
            self.throttle.warning("busy", "sip: at the call limits (%d calls): 503", len(self._dialogs))
            return Decision(503, (RETRY,), why="busy")
        if room is not None and not self.room_has_space(room):
            self.throttle.warning("room-full", "sip: room %s has no space for another phone: 486", room)
            return Decision(486, why="room full")
        return Decision(destination=destination, auth=auth)

    async def may_join(self, dialog: Dialog, room_id: str) -> bool:
        """The gate of every room a call joins (dialled or picked in the menu): rights, pacing, room caps."""
        rights = self.rights.get(dialog.key)
        if rights is None or not rights.may_enter(room_id):
            log.info("sip: call %s may not enter room %s", dialog.call_id, room_id)
            return False
        now = time.monotonic()
        slot = max(now, self._next_join.get(room_id, 0.0))
        self._next_join[room_id] = slot + self.config.room_join_interval_s
        if slot > now:
            await asyncio.sleep(slot - now)  # the caller hears silence meanwhile
        if dialog.destination.room != room_id and not self.room_has_space(room_id):
            return False  # a menu caller: counted once it joins; a dialled call was counted at admission
        return True

    def housekeep(self, now: float) -> None:
        for room_id in [r for r, t in self._next_join.items() if t < now]:
            del self._next_join[room_id]

    def room_has_space(self, room_id: str) -> bool:
        """Below ``max_calls_per_room`` phone calls and ``max_participants_per_room`` participants,
        counting the calls still being set up towards it."""
        phones = self.phone_calls_in(room_id)
        if phones >= self.config.max_calls_per_room:
            return False
        room = self.server.rooms.rooms.get(room_id)
        present = len(room.participants) if room is not None else 0
        joined_phones = sum(1 for p in room.participants.values() if p.kind == "sip") if room is not None else 0
        pending = max(0, phones - joined_phones)
        return present + pending < self.server.config.limits.max_participants_per_room

    def phone_calls_in(self, room_id: str) -> int:
        """Calls in ``room_id`` or being set up towards it."""
        n = 0
        for d in self._dialogs.values():
            participant = d.call.participant if d.call is not None else None
            if (participant.room.id if participant is not None else d.destination.room) == room_id:
                n += 1
        return n
