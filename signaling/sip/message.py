"""SIP messages: a strict parser and serializer for the subset of RFC 3261 the bridge speaks.

``parse_message`` turns one datagram (or one framed TCP message) into a
``SipRequest`` or ``SipResponse``.  It raises ``SipParseError`` on anything
malformed; when the start line and the headers needed to route a reply
(Via, From, To, Call-ID, CSeq) could be read, the error carries that partial
request so the caller can answer 400 instead of dropping the message.
Header names are matched case-insensitively and compact forms are expanded.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field

MAX_MESSAGE_BYTES = 65_535
MAX_HEADERS = 120
MAGIC_COOKIE = "z9hG4bK"

COMPACT = {"v": "Via", "f": "From", "t": "To", "i": "Call-ID", "m": "Contact", "l": "Content-Length",
           "c": "Content-Type", "k": "Supported", "s": "Subject", "e": "Content-Encoding", "o": "Event"}
_CANONICAL = {n.lower(): n for n in ("Via", "From", "To", "Call-ID", "CSeq", "Contact", "Content-Length",
                                     "Content-Type", "Max-Forwards", "Route", "Record-Route", "Allow",
                                     "Supported", "Require", "User-Agent", "Server", "Accept", "WWW-Authenticate",
                                     "Retry-After", "Warning", "Subject", "Event", "Content-Encoding")}
# Headers whose comma-separated values are separate entries (RFC 3261 7.3.1)
_LIST_HEADERS = {"via", "route", "record-route", "contact", "allow", "supported", "require", "accept"}
_JOINED_HEADERS = {"allow", "supported", "require", "accept"}
REQUIRED = ("Via", "From", "To", "Call-ID", "CSeq")

_TOKEN_RE = re.compile(r"^[A-Za-z0-9\-.!%*_+`'~]+$")
_REQUEST_LINE_RE = re.compile(r"^([A-Za-z0-9\-.!%*_+`'~]+) (\S+) SIP/2\.0$")
_STATUS_LINE_RE = re.compile(r"^SIP/2\.0 ([1-6]\d\d) ?(.*)$")
_URI_RE = re.compile(r"^(sips?):(?:([^@;?]*)@)?(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-.]+)(?::(\d{1,5}))?"
                     r"((?:;[^;?]*)*)(\?.*)?$")


class SipParseError(ValueError):
    """A message the bridge cannot accept; ``partial`` is set when a 400 can still be routed back."""

    def __init__(self, message: str, partial: SipRequest | None = None) -> None:
        super().__init__(message)
        self.partial = partial


def is_number(text: str) -> bool:
    """ASCII digits only: ``str.isdigit`` also accepts "²" and the like, which ``int`` refuses."""
    return text.isascii() and text.isdigit()


def split_list(value: str) -> list[str]:
    """Split a header value on commas outside quotes and angle brackets."""
    out: list[str] = []
    depth = 0
    quoted = False
    start = 0
    for i, ch in enumerate(value):
        if ch == '"' and (i == 0 or value[i - 1] != "\\"):
            quoted = not quoted
        elif not quoted and ch == "<":
            depth += 1
        elif not quoted and ch == ">":
            depth = max(0, depth - 1)
        elif ch == "," and not quoted and depth == 0:
            out.append(value[start:i].strip())
            start = i + 1
    out.append(value[start:].strip())
    return [v for v in out if v]


def parse_params(text: str) -> dict[str, str | None]:
    """``;a=1;b`` -> {"a": "1", "b": None}; names lower-cased."""
    params: dict[str, str | None] = {}
    for part in text.split(";"):
        part = part.strip()
        if not part:
            continue
        name, eq, value = part.partition("=")
        params[name.strip().lower()] = value.strip().strip('"') if eq else None
    return params


def format_params(params: dict[str, str | None]) -> str:
    return "".join(f";{k}" if v is None else f";{k}={v}" for k, v in params.items())


@dataclass
class SipUri:
    """A sip:/sips: URI: user, host, port and URI parameters."""

    scheme: str
    user: str
    host: str
    port: int | None = None
    params: dict[str, str | None] = field(default_factory=dict)
    headers: str = ""

    @classmethod
    def parse(cls, text: str) -> SipUri:
        m = _URI_RE.match(text.strip())
        if m is None:
            raise SipParseError(f"bad SIP URI {text[:80]!r}")
        port = int(m.group(4)) if m.group(4) else None
        if port is not None and not 0 < port < 65536:
            raise SipParseError("bad port in URI")
        user = (m.group(2) or "").split(":", 1)[0]  # drop a password
        return cls(m.group(1).lower(), user, m.group(3), port, parse_params(m.group(5) or ""), m.group(6) or "")

    def __str__(self) -> str:
        user = f"{self.user}@" if self.user else ""
        port = f":{self.port}" if self.port else ""
        return f"{self.scheme}:{user}{self.host}{port}{format_params(self.params)}{self.headers}"


@dataclass
class NameAddr:
    """A From/To/Contact/Route value: display name, URI text and header parameters (tag...)."""

    uri: str
    display: str = ""
    params: dict[str, str | None] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> NameAddr:
        text = text.strip()
        if "<" in text:
            head, _, rest = text.partition("<")
            uri, close, tail = rest.partition(">")
            if not close or not uri.strip():
                raise SipParseError("unterminated <URI>")
            return cls(uri.strip(), head.strip().strip('"'), parse_params(tail))
        uri, _, tail = text.partition(";")  # addr-spec form: parameters belong to the header
        if not uri.strip():
            raise SipParseError("empty address")
        return cls(uri.strip(), "", parse_params(tail))

    @property
    def tag(self) -> str | None:
        return self.params.get("tag")

    def sip_uri(self) -> SipUri:
        return SipUri.parse(self.uri)

    def __str__(self) -> str:
        display = f'"{self.display}" ' if self.display else ""
        return f"{display}<{self.uri}>{format_params(self.params)}"


@dataclass
class Via:
    """One Via entry: transport, sent-by and parameters (branch, rport, received)."""

    transport: str
    host: str
    port: int | None
    params: dict[str, str | None] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> Via:
        m = re.match(r"^SIP\s*/\s*2\.0\s*/\s*([A-Za-z]+)\s+(\[[0-9A-Fa-f:.]+\]|[^\s:;]+)(?:\s*:\s*(\d{1,5}))?(.*)$",
                     text.strip())
        if m is None:
            raise SipParseError(f"bad Via {text[:80]!r}")
        port = int(m.group(3)) if m.group(3) else None
        return cls(m.group(1).upper(), m.group(2), port, parse_params(m.group(4)))

    @property
    def branch(self) -> str:
        return self.params.get("branch") or ""

    @property
    def sent_by(self) -> str:
        return f"{self.host}:{self.port or 5060}"

    def __str__(self) -> str:
        port = f":{self.port}" if self.port else ""
        return f"SIP/2.0/{self.transport} {self.host}{port}{format_params(self.params)}"


class Headers:
    """Ordered SIP headers with case-insensitive names; list headers keep one entry per value."""

    def __init__(self, items: list[tuple[str, str]] | None = None) -> None:
        self._items: list[tuple[str, str]] = []
        for name, value in items or []:
            self.add(name, value)

    @staticmethod
    def canonical(name: str) -> str:
        name = name.strip()
        low = name.lower()
        if low in COMPACT:
            return COMPACT[low]
        return _CANONICAL.get(low, name)

    def add(self, name: str, value: str) -> None:
        name = self.canonical(name)
        if name.lower() in _LIST_HEADERS:
            for v in split_list(value):
                self._items.append((name, v))
        else:
            self._items.append((name, value.strip()))

    def get(self, name: str, default: str | None = None) -> str | None:
        low = self.canonical(name).lower()
        return next((v for n, v in self._items if n.lower() == low), default)

    def get_all(self, name: str) -> list[str]:
        low = self.canonical(name).lower()
        return [v for n, v in self._items if n.lower() == low]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.get(name) is not None

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(self._items)


@dataclass
class _Message:
    headers: Headers
    body: bytes = b""

    @property
    def call_id(self) -> str:
        return self.headers.get("Call-ID") or ""

    @property
    def cseq(self) -> tuple[int, str]:
        return parse_cseq(self.headers.get("CSeq") or "")

    @property
    def vias(self) -> list[Via]:
        return [Via.parse(v) for v in self.headers.get_all("Via")]

    @property
    def from_(self) -> NameAddr:
        return NameAddr.parse(self.headers.get("From") or "")

    @property
    def to(self) -> NameAddr:
        return NameAddr.parse(self.headers.get("To") or "")

    @property
    def content_type(self) -> str:
        return (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()

    def _serialize(self, start_line: str) -> bytes:
        lines = [start_line]
        joined: dict[str, int] = {}  # option lists (Allow, Supported...) go on one line each
        for name, value in self.headers:
            low = name.lower()
            if low == "content-length":
                continue
            if low in _JOINED_HEADERS and low in joined:
                lines[joined[low]] += f", {value}"
                continue
            joined[low] = len(lines)
            lines.append(f"{name}: {value}")
        lines.append(f"Content-Length: {len(self.body)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8") + self.body


@dataclass
class SipRequest(_Message):
    """A SIP request: method, Request-URI, headers, body."""

    method: str = ""
    uri: str = ""

    def serialize(self) -> bytes:
        return self._serialize(f"{self.method} {self.uri} SIP/2.0")


@dataclass
class SipResponse(_Message):
    """A SIP response: status code, reason phrase, headers, body."""

    status: int = 0
    reason: str = ""

    def serialize(self) -> bytes:
        return self._serialize(f"SIP/2.0 {self.status} {self.reason}")


SipMessage = SipRequest | SipResponse


def parse_cseq(value: str) -> tuple[int, str]:
    parts = value.split()
    if len(parts) != 2 or not is_number(parts[0]) or len(parts[0]) > 10 or not _TOKEN_RE.match(parts[1]):
        raise SipParseError(f"bad CSeq {value[:40]!r}")
    number = int(parts[0])
    if number >= 2 ** 31:
        raise SipParseError("CSeq number out of range")
    return number, parts[1].upper()


def _split_head(data: bytes) -> tuple[list[str], bytes]:
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        head, sep, body = data.partition(b"\n\n")  # tolerate bare LF line ends
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SipParseError("message head is not UTF-8") from exc
    raw_lines = text.replace("\r\n", "\n").split("\n")
    lines: list[str] = []
    for line in raw_lines:
        if line[:1] in (" ", "\t") and lines:  # folded continuation line
            lines[-1] += " " + line.strip()
        else:
            lines.append(line)
    return lines, body


def parse_message(data: bytes) -> SipMessage:
    """Parse one SIP message; raises SipParseError (with ``partial`` when a reply is possible)."""
    if len(data) > MAX_MESSAGE_BYTES:
        raise SipParseError("message too large")
    data = data.lstrip(b"\r\n")
    lines, body = _split_head(data)
    if not lines or not lines[0]:
        raise SipParseError("empty message")
    if len(lines) > MAX_HEADERS + 1:
        raise SipParseError("too many headers")
    headers = Headers()
    bad_header: str | None = None
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or not _TOKEN_RE.match(name.strip()):
            bad_header = line[:60]
            continue
        headers.add(name, value)
    start = lines[0].strip()
    msg: SipMessage
    req = _REQUEST_LINE_RE.match(start)
    if req is not None:
        msg = SipRequest(headers=headers, method=req.group(1).upper(), uri=req.group(2))
    else:
        status = _STATUS_LINE_RE.match(start)
        if status is None:
            raise SipParseError(f"bad start line {start[:80]!r}")
        msg = SipResponse(headers=headers, status=int(status.group(1)), reason=status.group(2))
    partial = msg if isinstance(msg, SipRequest) and _routable(msg) else None
    if bad_header is not None:
        raise SipParseError(f"bad header line {bad_header!r}", partial)
    missing = [h for h in REQUIRED if h not in headers]
    if missing:
        raise SipParseError(f"missing {', '.join(missing)}", partial)
    try:
        _number, method = msg.cseq
        msg.vias  # noqa: B018 - validates every Via
        msg.from_, msg.to  # noqa: B018
    except SipParseError as exc:
        raise SipParseError(str(exc), partial) from None
    if isinstance(msg, SipRequest) and method != msg.method:
        raise SipParseError("CSeq method does not match the request", partial)
    length_text = headers.get("Content-Length")
    if length_text is not None:
        if not is_number(length_text) or len(length_text) > 6:
            raise SipParseError("bad Content-Length", partial)
        length = int(length_text)
        if length > len(body):
            raise SipParseError("Content-Length beyond the end of the message", partial)
        body = body[:length]
    msg.body = body
    return msg


def _routable(msg: SipRequest) -> bool:
    """Can a response to this request be built? (a readable top Via; From, To, Call-ID, CSeq present)"""
    try:
        top = msg.headers.get("Via")
        if top is None:
            return False
        Via.parse(top)
    except SipParseError:
        return False
    return all(msg.headers.get(h) for h in ("From", "To", "Call-ID", "CSeq"))


REASONS = {100: "Trying", 180: "Ringing", 200: "OK", 400: "Bad Request", 403: "Forbidden", 404: "Not Found",
           405: "Method Not Allowed", 413: "Request Entity Too Large", 415: "Unsupported Media Type",
           416: "Unsupported URI Scheme", 420: "Bad Extension", 481: "Call/Transaction Does Not Exist",
           482: "Loop Detected", 483: "Too Many Hops", 486: "Busy Here", 487: "Request Terminated",
           488: "Not Acceptable Here", 491: "Request Pending", 500: "Server Internal Error",
           501: "Not Implemented", 503: "Service Unavailable", 513: "Message Too Large"}


def make_response(request: SipRequest, status: int, reason: str | None = None, *,
                  to_tag: str | None = None, extra: list[tuple[str, str]] | None = None,
                  body: bytes = b"", content_type: str | None = None) -> SipResponse:
    """A response to ``request`` (RFC 3261 8.2.6): Via, From, To (+tag), Call-ID and CSeq copied."""
    h = Headers()
    for via in request.headers.get_all("Via"):
        h.add("Via", via)
    to = request.headers.get("To") or ""
    if to_tag and status > 100 and not re.search(r";\s*tag=", to, re.IGNORECASE):
        to = f"{to};tag={to_tag}"
    for name, value in (("From", request.headers.get("From") or ""), ("To", to),
                        ("Call-ID", request.call_id), ("CSeq", request.headers.get("CSeq") or "")):
        h.add(name, value)
    for name, value in extra or []:
        h.add(name, value)
    if content_type is not None:
        h.add("Content-Type", content_type)
    return SipResponse(headers=h, body=body, status=status, reason=reason or REASONS.get(status, "Unknown"))
