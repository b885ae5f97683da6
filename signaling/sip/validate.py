"""What a request must satisfy before the bridge acts on it (RFC 3261 8.2), as refusals.

``check_request`` applies the request-wide rules (hop count, URI scheme,
required extensions); ``read_offer`` reads the SDP offer of an INVITE or
re-INVITE.  Both return the status and headers to refuse with instead of
raising, so the endpoint answers every problem the same way.
"""

from __future__ import annotations

from signaling.sip.message import SipParseError, SipRequest, SipUri, is_number
from signaling.sip.sdp import AudioParams, NoCommonCodec, SdpError, SessionDescription, negotiate, parse_sdp

Refusal = tuple[int, list[tuple[str, str]]]


def warning(text: str, code: int = 399) -> tuple[str, str]:
    """A Warning header (RFC 3261 20.43) with ``text`` made safe for a quoted string."""
    return "Warning", f'{code} mediaserver "{text.replace(chr(34), chr(39))[:120]}"'


def check_request(req: SipRequest) -> Refusal | None:
    """Hop count (483), URI scheme (416), a well-formed URI (400), extensions in Require (420)."""
    hops = req.headers.get("Max-Forwards")
    if hops is not None and (not is_number(hops.strip()) or int(hops) == 0):
        return (483 if hops.strip() == "0" else 400), []
    if not req.uri.lower().startswith(("sip:", "sips:")):
        return 416, []
    try:
        SipUri.parse(req.uri)
    except SipParseError:
        return 400, [warning("bad Request-URI")]
    required = [r for r in req.headers.get_all("Require") if r]
    if required and req.method != "CANCEL":
        return 420, [("Unsupported", ", ".join(required))]
    return None


def read_offer(req: SipRequest) -> tuple[SessionDescription | None, AudioParams | None, Refusal | None]:
    """The offer in a request body and what it settles; (None, None, None) when there is no body."""
    if not req.body:
        return None, None, None
    if req.content_type != "application/sdp":
        return None, None, (415, [("Accept", "application/sdp")])
    try:
        offer = parse_sdp(req.body.decode("utf-8"))
        return offer, negotiate(offer), None
    except NoCommonCodec:
        return None, None, (488, [warning("PCMU or PCMA over RTP/AVP only", 305)])
    except (SdpError, UnicodeDecodeError) as exc:
        return None, None, (400, [warning(f"bad SDP: {exc}")])
