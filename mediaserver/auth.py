"""Signed join tokens: who may join which room and do what.

A token is a JWT signed with HMAC-SHA256 carrying ``room`` (a room id or
``"*"``), ``sub`` (identity), optional ``name``, ``perms`` (a subset of
``publish``, ``subscribe``, ``admin``) and ``exp``.  ``TokenVerifier`` checks
them; in development mode (explicit, off by default) every request is
granted everything.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Optional

import jwt

PERMISSIONS = ("publish", "subscribe", "admin")
ALGORITHM = "HS256"


class AuthError(Exception):
    """A refused token; ``code`` is the protocol error code, ``status`` the HTTP status."""

    def __init__(self, code: str, message: str, status: int = 401) -> None:
        super().__init__(message)
        self.code = code
        self.status = status


@dataclass(frozen=True)
class Grant:
    """What a verified token allows."""

    identity: str
    room: str
    permissions: frozenset[str]
    name: Optional[str] = None

    def allows(self, permission: str, room_id: str) -> bool:
        return permission in self.permissions and self.room in ("*", room_id)


DEV_GRANT = Grant(identity="dev", room="*", permissions=frozenset(PERMISSIONS))


def create_token(secret: str, *, room: str, identity: str, permissions: tuple[str, ...] = ("publish", "subscribe"),
                 ttl_s: int = 3600, name: Optional[str] = None, now: Optional[float] = None) -> str:
    bad = [p for p in permissions if p not in PERMISSIONS]
    if bad:
        raise ValueError(f"unknown permissions: {', '.join(bad)}")
    if not secret:
        raise ValueError("a signing secret is required")
    issued = int(now if now is not None else time.time())
    claims: dict[str, Any] = {"room": room, "sub": identity, "perms": list(permissions),
                              "iat": issued, "exp": issued + int(ttl_s)}
    if name:
        claims["name"] = name
    return jwt.encode(claims, secret, algorithm=ALGORITHM)


class TokenVerifier:
    """Checks join and admin tokens against the server's secret (or grants all in dev mode)."""

    def __init__(self, secret: Optional[str], dev_mode: bool) -> None:
        if not dev_mode and not secret:
            raise ValueError("without development mode a token secret is required")
        self._secret = secret
        self.dev_mode = dev_mode

    def verify(self, token: Optional[str]) -> Grant:
        if self.dev_mode and not token:
            return DEV_GRANT
        if not token or not isinstance(token, str):
            raise AuthError("auth-required", "a join token is required")
        if len(token) > 4096:
            raise AuthError("bad-token", "token too long")
        assert self._secret is not None or self.dev_mode
        try:
            claims = jwt.decode(token, self._secret or "", algorithms=[ALGORITHM],
                                options={"require": ["exp", "sub", "room"]})
        except jwt.ExpiredSignatureError:
            raise AuthError("token-expired", "the token has expired") from None
        except jwt.InvalidSignatureError:
            raise AuthError("bad-token", "the token signature is not valid") from None
        except jwt.PyJWTError as exc:
            raise AuthError("bad-token", f"the token is not valid: {exc}") from None
        perms = claims.get("perms", [])
        if not isinstance(perms, list) or not all(isinstance(p, str) for p in perms):
            raise AuthError("bad-token", "the token's permissions are malformed")
        room, sub = claims.get("room"), claims.get("sub")
        if not isinstance(room, str) or not isinstance(sub, str):
            raise AuthError("bad-token", "the token's room and subject must be strings")
        name = claims.get("name") if isinstance(claims.get("name"), str) else None
        return Grant(identity=sub, room=room, permissions=frozenset(p for p in perms if p in PERMISSIONS),
                     name=name)

    def require(self, token: Optional[str], permission: str, room_id: str) -> Grant:
        grant = self.verify(token)
        if grant.room not in ("*", room_id):
            raise AuthError("wrong-room", f"the token is for room {grant.room!r}", status=403)
        if permission not in grant.permissions:
            raise AuthError("forbidden", f"the token lacks the {permission!r} permission", status=403)
        return grant
