"""SDP offer/answer (RFC 3264) for one G.711 audio stream plus RFC 4733 telephone-event.

``parse_sdp`` reads a session description; ``negotiate`` picks the first
audio m-line offering PCMU or PCMA over plain RTP (the offerer's codec order
wins) and raises ``NoCommonCodec`` otherwise, which the bridge answers with
488.  ``build_answer`` answers every m-line of the offer, rejecting the
others with port 0; ``build_offer`` is used when an INVITE came without SDP.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from signaling.sip.g711 import CODECS, G711Codec
from signaling.sip.message import is_number

MAX_SDP_BYTES = 16 * 1024
EVENT_PT_DEFAULT = 101
_STATIC = {0: ("PCMU", 8000), 8: ("PCMA", 8000)}
_PLAIN_RTP = {"RTP/AVP", "RTP/AVPF"}
_DIRECTIONS = {"sendrecv", "sendonly", "recvonly", "inactive"}
_ANSWER_DIRECTION = {"sendrecv": "sendrecv", "sendonly": "recvonly", "recvonly": "sendonly", "inactive": "inactive"}


class SdpError(ValueError):
    """A session description that cannot be read."""


class NoCommonCodec(SdpError):
    """No audio stream with PCMU/PCMA over plain RTP: answered with 488."""


@dataclass
class MediaDescription:
    """One m= section: port, transport, formats and the attributes the bridge reads."""

    kind: str
    port: int
    proto: str
    formats: list[str]
    connection: str | None = None
    rtpmap: dict[int, tuple[str, int]] = field(default_factory=dict)
    direction: str = "sendrecv"
    rtcp_port: int | None = None
    ptime: int | None = None


@dataclass
class SessionDescription:
    """A parsed SDP: session-level connection address, origin version, media sections."""

    connection: str | None
    media: list[MediaDescription]
    origin: str = ""
    direction: str = "sendrecv"


@dataclass(frozen=True)
class AudioParams:
    """What offer/answer settled for the phone's audio stream."""

    codec: G711Codec
    payload_type: int
    event_pt: int | None
    remote_ip: str
    remote_port: int
    remote_rtcp_port: int
    direction: str  # ours: sendrecv | sendonly | recvonly | inactive
    media_index: int

    @property
    def on_hold(self) -> bool:
        return self.direction in ("recvonly", "inactive") or self.remote_ip in ("0.0.0.0", "::")

    @property
    def we_send(self) -> bool:
        return self.direction in ("sendrecv", "sendonly") and not self.on_hold


def _connection_address(value: str) -> str:
    parts = value.split()
    if len(parts) < 3 or parts[0] != "IN" or parts[1] not in ("IP4", "IP6"):
        raise SdpError(f"bad c= line {value[:60]!r}")
    addr = parts[2].split("/")[0]
    try:
        ipaddress.ip_address(addr)
    except ValueError as exc:
        raise SdpError("c= must hold an IP address") from exc
    return addr


def parse_sdp(text: str) -> SessionDescription:
    if len(text) > MAX_SDP_BYTES:
        raise SdpError("SDP too large")
    session = SessionDescription(connection=None, media=[])
    current: MediaDescription | None = None
    lines = [ln.strip() for ln in text.replace("\r\n", "\n").split("\n") if ln.strip()]
    if not lines or lines[0] != "v=0":
        raise SdpError("SDP must start with v=0")
    for line in lines[1:]:
        if len(line) < 2 or line[1] != "=":
            raise SdpError(f"bad SDP line {line[:60]!r}")
        kind, value = line[0], line[2:]
        if kind == "o":
            session.origin = value
        elif kind == "m":
            parts = value.split()
            if len(parts) < 4 or not is_number(parts[1].split("/")[0]):
                raise SdpError(f"bad m= line {value[:60]!r}")
            port = int(parts[1].split("/")[0])
            if port > 65535:
                raise SdpError("bad media port")
            current = MediaDescription(parts[0], port, parts[2], parts[3:], direction=session.direction)
            session.media.append(current)
        elif kind == "c":
            addr = _connection_address(value)
            if current is None:
                session.connection = addr
            else:
                current.connection = addr
        elif kind == "a":
            _attribute(session, current, value)
    if not session.media:
        raise SdpError("no m= line")
    return session


def _attribute(session: SessionDescription, media: MediaDescription | None, value: str) -> None:
    name, _, rest = value.partition(":")
    if name in _DIRECTIONS:
        if media is None:
            session.direction = name
        else:
            media.direction = name
    elif media is None:
        return
    elif name == "rtpmap":
        pt_text, _, enc = rest.partition(" ")
        fields = enc.strip().split("/")
        if is_number(pt_text) and len(fields) >= 2 and is_number(fields[1]):
            media.rtpmap[int(pt_text)] = (fields[0].strip(), int(fields[1]))
    elif name == "rtcp":
        port_text = rest.split()[0] if rest.split() else ""
        if is_number(port_text) and 0 < int(port_text) < 65536:
            media.rtcp_port = int(port_text)
    elif name == "ptime" and is_number(rest.strip()):
        media.ptime = int(rest.strip())


def _format_name(media: MediaDescription, fmt: str) -> tuple[str, int] | None:
    if not is_number(fmt):
        return None
    pt = int(fmt)
    if pt in media.rtpmap:
        name, rate = media.rtpmap[pt]
        return name.upper() if name.lower() != "telephone-event" else "telephone-event", rate
    return _STATIC.get(pt)


def negotiate(desc: SessionDescription, allowed: tuple[str, ...] = ("PCMU", "PCMA")) -> AudioParams:
    """Settle the audio stream from a remote offer (or answer); raises NoCommonCodec."""
    for index, media in enumerate(desc.media):
        if media.kind != "audio" or media.port == 0 or media.proto.upper() not in _PLAIN_RTP:
            continue
        chosen: tuple[G711Codec, int] | None = None
        event_pt: int | None = None
        for fmt in media.formats:
            named = _format_name(media, fmt)
            if named is None:
                continue
            name, rate = named
            if chosen is None and name in allowed and name in CODECS and rate == 8000:
                chosen = CODECS[name], int(fmt)
            elif name == "telephone-event" and rate == 8000 and event_pt is None:
                event_pt = int(fmt)
        if chosen is None:
            continue
        addr = media.connection or desc.connection
        if addr is None:
            raise SdpError("no connection address for the audio stream")
        return AudioParams(codec=chosen[0], payload_type=chosen[1], event_pt=event_pt, remote_ip=addr,
                           remote_port=media.port, remote_rtcp_port=media.rtcp_port or media.port + 1,
                           direction=_ANSWER_DIRECTION.get(media.direction, "sendrecv"), media_index=index)
    raise NoCommonCodec("no audio stream offers PCMU or PCMA over RTP/AVP")


def _ip_version(ip: str) -> str:
    return "IP6" if ":" in ip else "IP4"


def _header(local_ip: str, session_id: int, version: int) -> list[str]:
    v = _ip_version(local_ip)
    return ["v=0", f"o=mediaserver {session_id} {version} IN {v} {local_ip}", "s=mediaserver",
            f"c=IN {v} {local_ip}", "t=0 0"]


def _audio_lines(codecs: list[tuple[int, str]], event_pt: int | None, direction: str) -> list[str]:
    lines = [f"a=rtpmap:{pt} {name}/8000" for pt, name in codecs]
    if event_pt is not None:
        lines += [f"a=rtpmap:{event_pt} telephone-event/8000", f"a=fmtp:{event_pt} 0-16"]
    return lines + ["a=ptime:20", f"a={direction}"]


def build_answer(offer: SessionDescription, params: AudioParams, local_ip: str, local_port: int,
                 session_id: int, version: int) -> str:
    """Answer every m-line of ``offer``: the chosen audio stream, the others rejected (port 0)."""
    lines = _header(local_ip, session_id, version)
    for index, media in enumerate(offer.media):
        if index != params.media_index:
            lines.append(f"m={media.kind} 0 {media.proto} {' '.join(media.formats[:1]) or '0'}")
            continue
        fmts = [str(params.payload_type)] + ([str(params.event_pt)] if params.event_pt is not None else [])
        lines.append(f"m=audio {local_port} {media.proto} {' '.join(fmts)}")
        lines += _audio_lines([(params.payload_type, params.codec.name)], params.event_pt, params.direction)
    return "\r\n".join(lines) + "\r\n"


def build_offer(local_ip: str, local_port: int, session_id: int, version: int,
                codecs: tuple[str, ...] = ("PCMU", "PCMA"), direction: str = "sendrecv") -> str:
    """An offer for an INVITE that came without SDP (the answer comes in the ACK)."""
    pts = [(CODECS[c].payload_type, c) for c in codecs]
    fmts = " ".join(str(pt) for pt, _ in pts) + f" {EVENT_PT_DEFAULT}"
    lines = _header(local_ip, session_id, version) + [f"m=audio {local_port} RTP/AVP {fmts}"]
    lines += _audio_lines(pts, EVENT_PT_DEFAULT, direction)
    return "\r\n".join(lines) + "\r\n"
