"""Names of the stages users can ask for, and where each one lives.

A stage spec is ``name`` or ``name:variant`` (e.g. ``denoise:rnnoise``).
Entries are imported lazily so a missing optional model never breaks the
others.  Canonical processing order is the order of ``CHAIN_ORDER``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from enhancers.stage import Stage

# Order in which stages run on one stream, whatever order the user lists them.
CHAIN_ORDER = ("aec", "dereverb", "denoise", "vad", "limiter")

# spec -> "module:Class"
STAGES: dict[str, str] = {
    "vad": "enhancers.vad:WebRtcVadStage",
    "vad:webrtc": "enhancers.vad:WebRtcVadStage",
    "vad:silero": "enhancers.vad:SileroVadStage",
    "limiter": "enhancers.limiter:LimiterStage",
    "aec": "enhancers.aec.stage:EchoCancellerStage",
    "dereverb": "enhancers.dereverb.stage:DereverbStage",
    "denoise": "enhancers.denoise.df3:DeepFilterNet3Stage",
    "denoise:df3": "enhancers.denoise.df3:DeepFilterNet3Stage",
    "denoise:nsnet2": "enhancers.denoise.nsnet2:NSNet2Stage",
    "denoise:rnnoise": "enhancers.denoise.rnnoise:RNNoiseStage",
}


@dataclass(frozen=True)
class StageSpec:
    """A parsed stage spec: ``kind`` (e.g. ``denoise``) and the full ``spec`` key."""

    kind: str
    spec: str


def parse_spec(text: str) -> StageSpec:
    text = text.strip().lower()
    if text not in STAGES:
        known = ", ".join(sorted(STAGES))
        raise ValueError(f"unknown stage {text!r}; known stages: {known}")
    return StageSpec(kind=text.split(":", 1)[0], spec=text)


def parse_stage_list(text: str) -> list[StageSpec]:
    """Parse ``"aec,denoise:rnnoise"``; at most one stage per kind, canonical order."""
    specs = [parse_spec(p) for p in text.split(",") if p.strip()]
    kinds = [s.kind for s in specs]
    dup = {k for k in kinds if kinds.count(k) > 1}
    if dup:
        raise ValueError(f"stage kind listed twice: {', '.join(sorted(dup))}")
    return sorted(specs, key=lambda s: CHAIN_ORDER.index(s.kind))


def load_stage_class(spec: str) -> type[Stage]:
    target = STAGES[spec]
    module_name, cls_name = target.split(":")
    module = importlib.import_module(module_name)
    cls: type[Stage] = getattr(module, cls_name)
    return cls


def create_stage(spec: str, device: str = "cpu", **kwargs: Any) -> Stage:
    return load_stage_class(spec)(device=device, **kwargs)
