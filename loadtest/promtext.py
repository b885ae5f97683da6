"""Read the server's ``GET /metrics`` (Prometheus text exposition) generically, and scrape it over time.

Nothing here knows the server's metric names: whatever families it exports
(hand-written or from OpenTelemetry's Prometheus exporter, with its
``_total``/unit suffixes and ``target_info``) are parsed into samples and
aggregated per name (sum, max and count over label sets), so the report
keeps working when the exporter changes.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)(\s+\S+)?\s*$")
_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*,?')


@dataclass(frozen=True)
class Sample:
    """One exposition line: metric name, its labels and value."""

    name: str
    labels: tuple[tuple[str, str], ...]
    value: float


def _unescape(value: str) -> str:
    return value.replace("\\n", "\n").replace('\\"', '"').replace("\\\\", "\\")


def _value(text: str) -> float | None:
    try:
        return float(text)  # also parses NaN, +Inf, -Inf
    except ValueError:
        return None


def parse(text: str) -> list[Sample]:
    """All samples of a Prometheus text exposition; comments and malformed lines are skipped."""
    out: list[Sample] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if not m:
            continue
        value = _value(m.group(4))
        if value is None:
            continue
        labels = tuple((k, _unescape(v)) for k, v in _LABEL.findall(m.group(3) or ""))
        out.append(Sample(m.group(1), labels, value))
    return out


def aggregate(samples: list[Sample]) -> dict[str, dict[str, float]]:
    """Per metric name: sum, max and count over its label sets (NaN values ignored)."""
    out: dict[str, dict[str, float]] = {}
    for s in samples:
        if math.isnan(s.value):
            continue
        agg = out.setdefault(s.name, {"sum": 0.0, "max": -math.inf, "count": 0})
        agg["sum"] += s.value
        agg["max"] = max(agg["max"], s.value)
        agg["count"] += 1
    return out


def to_json(samples: list[Sample]) -> dict[str, list[dict[str, Any]]]:
    """Samples grouped by name, JSON-friendly (infinities as strings)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for s in samples:
        v: Any = s.value if math.isfinite(s.value) else str(s.value)
        out.setdefault(s.name, []).append({"labels": dict(s.labels), "value": v})
    return out


@dataclass
class MetricsScraper:
    """Polls ``URL/metrics`` every ``interval_s`` and keeps the aggregated series plus the last raw scrape."""

    url: str
    interval_s: float = 2.0
    series: list[dict[str, Any]] = field(default_factory=list)  # [{"t": ..., "metrics": {name: agg}}]
    last: list[Sample] = field(default_factory=list)
    errors: int = 0
    _task: asyncio.Task[None] | None = None
    _session: aiohttp.ClientSession | None = None

    async def scrape_once(self) -> list[Sample]:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        try:
            async with self._session.get(self.url.rstrip("/") + "/metrics",
                                         timeout=aiohttp.ClientTimeout(total=5)) as r:
                text = await r.text()
                if r.status != 200:
                    raise aiohttp.ClientError(f"HTTP {r.status}")
        except (TimeoutError, aiohttp.ClientError):
            self.errors += 1
            return []
        samples = parse(text)
        self.last = samples
        self.series.append({"t": time.monotonic(), "metrics": aggregate(samples)})
        return samples

    async def _run(self) -> None:
        while True:
            await self.scrape_once()
            await asyncio.sleep(self.interval_s)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    def latest(self, name: str, how: str = "sum") -> float | None:
        if not self.series:
            return None
        agg = self.series[-1]["metrics"].get(name)
        return None if agg is None else float(agg[how])

    def find(self, fragment: str) -> list[str]:
        """Names in the last scrape containing ``fragment`` (exporters may add prefixes or suffixes)."""
        names = self.series[-1]["metrics"].keys() if self.series else []
        return sorted(n for n in names if fragment in n)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        if self._session is not None:
            await self._session.close()
            self._session = None

    def window(self, since: float, until: float) -> list[dict[str, Any]]:
        return [s for s in self.series if since <= s["t"] <= until]
