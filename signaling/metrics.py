"""Prometheus text exposition of the server's live figures (``GET /metrics``)."""

from __future__ import annotations

from typing import Any, Iterable

from mediaserver.server import MediaServer


def _esc(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _line(name: str, value: float, labels: dict[str, str] | None = None) -> str:
    if labels:
        lab = ",".join(f'{k}="{_esc(v)}"' for k, v in labels.items())
        return f"{name}{{{lab}}} {value}"
    return f"{name} {value}"


def _family(name: str, kind: str, help_text: str, samples: Iterable[str]) -> list[str]:
    return [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", *samples]


def render_metrics(server: MediaServer) -> bytes:
    out: list[str] = []
    rooms = server.rooms.rooms
    out += _family("mediaserver_rooms", "gauge", "Rooms open.", [_line("mediaserver_rooms", len(rooms))])
    out += _family("mediaserver_participants", "gauge", "Participants per room.",
                   [_line("mediaserver_participants", len(r.participants), {"room": r.id}) for r in rooms.values()])
    out += _family("mediaserver_event_loop_lag_ms", "gauge", "Media clock lag behind schedule.",
                   [_line("mediaserver_event_loop_lag_ms", server.clock.last_lag_ms)])
    stream_metrics: dict[str, tuple[str, str, list[str]]] = {
        "chunks": ("counter", "10 ms chunks forwarded.", []),
        "bypassed": ("counter", "Chunks that passed enhancement unprocessed (deadline or error).", []),
        "received": ("counter", "RTP packets received.", []),
        "lost": ("counter", "RTP packets lost (RFC 3550 cumulative).", []),
        "late": ("counter", "RTP packets that arrived after their playout time.", []),
        "concealed_chunks": ("counter", "10 ms chunks concealed by PLC or FEC.", []),
        "jitter_ms": ("gauge", "RFC 3550 interarrival jitter in ms.", []),
        "jitter_buffer_ms": ("gauge", "Audio waiting in the jitter buffer, ms.", []),
        "processing_ms": ("gauge", "Pipeline time of the last chunk, ms.", []),
        "server_latency_ms": ("gauge", "RTP arrival to encoded packet, ms.", []),
        "level_dbfs": ("gauge", "Smoothed output level, dBFS.", []),
        "vad": ("gauge", "Speech probability of the last chunk.", []),
    }
    for room in rooms.values():
        for stream in room.streams.values():
            stats: dict[str, Any] = server.stream_stats(stream)
            labels = {"room": room.id, "stream": stream.id, "participant": stream.owner_id}
            for key, (_, _, samples) in stream_metrics.items():
                if key in stats:
                    samples.append(_line(f"mediaserver_stream_{key}", float(stats[key]), labels))
    for key, (kind, help_text, samples) in stream_metrics.items():
        out += _family(f"mediaserver_stream_{key}", kind, help_text, samples)
    ex = server.hub.stats()
    for key in ("chunks", "batches", "bypass_deadline", "bypass_error"):
        value = ex.get("counters", {}).get(key) if isinstance(ex.get("counters"), dict) else ex.get(key)
        if isinstance(value, (int, float)):
            out += _family(f"mediaserver_executor_{key}", "counter", f"Executor {key}.",
                           [_line(f"mediaserver_executor_{key}", float(value))])
    return ("\n".join(out) + "\n").encode()
