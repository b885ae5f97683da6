"""Who may call in: SIP digest authentication (RFC 8760, RFC 2617) and trusted source networks.

In production mode (``SipConfig.require_auth`` None and the server not in
development mode, or ``require_auth`` True) an INVITE that opens a call must
carry digest credentials of a configured user (``SipConfig.users``), unless
it comes from one of ``trusted_networks`` (a trunk, an SBC that
authenticated its callers already).  The challenge offers
``digest_algorithms`` in order (default SHA-256, then MD5), each with
``qop=auth``; only those are accepted.  Nonces are stateless: the time they were
made, a random salt, and an HMAC over both and the caller's IP, under a key
drawn at start; a
nonce older than ``nonce_ttl_s`` gets a fresh challenge with ``stale=true``.
The highest nonce count seen per nonce is kept (a bounded table), so a
captured request cannot be replayed with the same count.  Each check is O(1)
in the number of users and calls: a dict lookup and two hashes.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import ipaddress
import re
import secrets
import time
from dataclasses import dataclass

from mediaserver.config import SipConfig
from signaling.sip.message import SipParseError, SipRequest, SipUri

ALGORITHMS = {"SHA-256": hashlib.sha256, "MD5": hashlib.md5}
MAX_CREDENTIALS_CHARS = 2048
MAX_TRACKED_NONCES = 10_000
_PARAM_RE = re.compile(r'([A-Za-z][A-Za-z0-9_-]*)\s*=\s*("(?:[^"\\]|\\.)*"|[^\s,"]+)')
Challenge = list[tuple[str, str]]


@dataclass(frozen=True)
class SipUser:
    """One digest user and the rooms it may enter (``"*"``: any)."""

    name: str
    password: str
    rooms: tuple[str, ...] = ("*",)

    def may_enter(self, room: str) -> bool:
        return "*" in self.rooms or room in self.rooms


@dataclass(frozen=True)
class AuthResult:
    """The outcome of checking one INVITE: ``ok`` with the user (None: trusted or no auth needed), or a refusal."""

    ok: bool
    user: SipUser | None = None
    status: int = 0
    headers: tuple[tuple[str, str], ...] = ()
    reason: str = ""

    def may_enter(self, room: str) -> bool:
        return self.ok and (self.user is None or self.user.may_enter(room))


ANYONE = AuthResult(ok=True)


def parse_credentials(value: str) -> dict[str, str] | None:
    """``Digest k=v, k="v"`` -> {k: v} (names lower-cased); None when it is not Digest or too long."""
    if len(value) > MAX_CREDENTIALS_CHARS:
        return None
    scheme, _, rest = value.strip().partition(" ")
    if scheme.lower() != "digest":
        return None
    params: dict[str, str] = {}
    for name, raw in _PARAM_RE.findall(rest):
        params.setdefault(name.lower(), raw[1:-1].replace('\\"', '"') if raw.startswith('"') else raw)
    return params


def digest_response(algorithm: str, user: str, realm: str, password: str, method: str, uri: str, nonce: str,
                    nc: str, cnonce: str, qop: str) -> str:
    """The ``response`` value of RFC 2617 3.2.2.1 / RFC 8760 with ``qop=auth``."""
    h = ALGORITHMS[algorithm]

    def hx(text: str) -> str:
        return h(text.encode("utf-8")).hexdigest()

    ha1 = hx(f"{user}:{realm}:{password}")
    ha2 = hx(f"{method}:{uri}")
    return hx(f"{ha1}:{nonce}:{nc}:{cnonce}:{qop}:{ha2}")


def same_resource(digest_uri: str, request_uri: str) -> bool:
    """The digest ``uri`` names the Request-URI (RFC 2617 3.2.2.5): the same URI, or the same host and
    port without the user part, as some UAs (sipp) send.  The rights checked are the Request-URI's."""
    if digest_uri.strip() == request_uri.strip():
        return True
    try:
        ours, theirs = SipUri.parse(request_uri), SipUri.parse(digest_uri)
    except SipParseError:
        return False
    return theirs.user in ("", ours.user) and (theirs.host.lower(), theirs.port) == (ours.host.lower(), ours.port)


class SipAuthenticator:
    """Owns the users, the trusted networks, the nonce key and the nonce counts of one SIP endpoint."""

    def __init__(self, config: SipConfig, dev_mode: bool) -> None:
        self.required = (not dev_mode) if config.require_auth is None else config.require_auth
        self.realm = config.realm
        self.algorithms = tuple(a.upper() for a in config.digest_algorithms)
        if not self.algorithms or any(a not in ALGORITHMS for a in self.algorithms):
            raise ValueError(f"SIP digest algorithms are SHA-256 and MD5, not {config.digest_algorithms}")
        self.nonce_ttl_s = config.nonce_ttl_s
        self.users = {name: SipUser(name, password, tuple(rooms)) for name, password, rooms in config.users}
        self.trusted = tuple(ipaddress.ip_network(n, strict=False) for n in config.trusted_networks)
        self._key = secrets.token_bytes(32)
        self._counts: collections.OrderedDict[str, int] = collections.OrderedDict()

    def is_trusted(self, ip: str) -> bool:
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return any(address in net for net in self.trusted)

    # -- nonces ----------------------------------------------------------------------
    def _sign(self, stamp: str, ip: str) -> str:
        return hmac.new(self._key, f"{stamp}:{ip}".encode(), hashlib.sha256).hexdigest()[:32]

    def make_nonce(self, ip: str, now: float | None = None) -> str:
        stamp = f"{int(now if now is not None else time.time()):x}.{secrets.token_hex(6)}"  # unique per challenge
        return f"{stamp}.{self._sign(stamp, ip)}"

    def _nonce_state(self, nonce: str, ip: str) -> str:
        """"ok", "stale" (ours but too old) or "bad" (not ours, or for another address)."""
        stamp, dot, mac = nonce.rpartition(".")
        if not dot or len(stamp) > 40 or not hmac.compare_digest(mac.encode(), self._sign(stamp, ip).encode()):
            return "bad"
        try:
            age = time.time() - int(stamp.partition(".")[0], 16)
        except ValueError:
            return "bad"
        return "ok" if -5.0 <= age <= self.nonce_ttl_s else "stale"

    def challenge(self, ip: str, stale: bool = False) -> Challenge:
        nonce = self.make_nonce(ip)
        tail = ", stale=true" if stale else ""
        return [("WWW-Authenticate", f'Digest realm="{self.realm}", nonce="{nonce}", algorithm={alg}, '
                                     f'qop="auth"{tail}') for alg in self.algorithms]

    def _count_ok(self, nonce: str, nc: str) -> bool:
        """Nonce counts must grow: the same (nonce, nc) twice is a replay."""
        try:
            count = int(nc, 16)
        except ValueError:
            return False
        last = self._counts.get(nonce, 0)
        if count <= last:
            return False
        self._counts[nonce] = count
        self._counts.move_to_end(nonce)
        while len(self._counts) > MAX_TRACKED_NONCES:
            self._counts.popitem(last=False)
        return True

    # -- the check -----------------------------------------------------------------------
    def check(self, req: SipRequest, ip: str) -> AuthResult:
        """May this INVITE open a call?  401 with a challenge, 403 for wrong credentials, or ok."""
        if not self.required or self.is_trusted(ip):
            return ANYONE
        creds = next((c for c in map(parse_credentials, req.headers.get_all("Authorization")[:4])
                      if c is not None), None)
        if creds is None:
            return AuthResult(False, status=401, headers=tuple(self.challenge(ip)), reason="no credentials")
        state = self._nonce_state(creds.get("nonce", ""), ip)
        if state != "ok":
            return AuthResult(False, status=401, headers=tuple(self.challenge(ip, stale=state == "stale")),
                              reason=f"{state} nonce")
        algorithm = creds.get("algorithm", "MD5").upper()
        if algorithm not in self.algorithms or creds.get("qop", "").lower() != "auth" or creds.get("realm") != self.realm:
            return AuthResult(False, status=401, headers=tuple(self.challenge(ip)),
                              reason="algorithm, qop or realm not offered")
        user = self.users.get(creds.get("username", ""))
        nc, cnonce, uri = creds.get("nc", ""), creds.get("cnonce", ""), creds.get("uri", "")
        if user is None or not cnonce or not nc or not same_resource(uri, req.uri):
            return AuthResult(False, status=403, reason="unknown user or bad digest parameters")
        expected = digest_response(algorithm, user.name, self.realm, user.password, req.method, uri,
                                   creds["nonce"], nc, cnonce, "auth")
        if not hmac.compare_digest(expected.encode(), creds.get("response", "").lower().encode()):
            return AuthResult(False, status=403, reason="wrong password")
        if not self._count_ok(creds["nonce"], nc):
            return AuthResult(False, status=403, reason="replayed nonce count")
        return AuthResult(True, user=user)
