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

# Bounds of a stage list from the network (check_stage_specs): items, characters per item.
MAX_STAGES = 16
MAX_SPEC_CHARS = 32

# spec -> "module:Class"
STAGES: dict[str, str] = {
    "vad": "enhancers.vad:WebRtcVadStage",
    "vad:webrtc": "enhancers.vad:WebRtcVadStage",
    "vad:silero": "enhancers.vad:SileroVadStage",
    "limiter": "enhancers.limiter:LimiterStage",
    "aec": "enhancers.aec.stage:EchoCancellerStage",
    "aec:webrtc": "enhancers.aec.webrtc:WebRtcEchoCancellerStage",
    "dereverb": "enhancers.dereverb.stage:DereverbStage",
    "denoise": "enhancers.denoise.df3:DeepFilterNet3Stage",
    "denoise:df3": "enhancers.denoise.df3:DeepFilterNet3Stage",
    "denoise:nsnet2": "enhancers.denoise.nsnet2:NSNet2Stage",
    "denoise:gtcrn": "enhancers.denoise.gtcrn:GTCRNStage",
    "denoise:rnnoise": "enhancers.denoise.rnnoise:RNNoiseStage",
}

# The ladder an overloaded executor walks down for a stream it cannot give what it asked for
# (enhancers/executor/admission.py): lighter variants of a spec, best first ...
LIGHTER: dict[str, tuple[str, ...]] = {  # each priced by the measured load model: the first that fits wins
    "denoise": ("denoise:nsnet2", "denoise:gtcrn", "denoise:rnnoise"),
    "denoise:df3": ("denoise:nsnet2", "denoise:gtcrn", "denoise:rnnoise"),
    "denoise:gtcrn": ("denoise:nsnet2", "denoise:rnnoise"),
    "denoise:nsnet2": ("denoise:gtcrn", "denoise:rnnoise"),
    "denoise:rnnoise": ("denoise:nsnet2",),
    "vad:silero": ("vad:webrtc",),
    "aec": ("aec:webrtc",),
}
# ... and the steps, in order, each applied to what the previous left: dereverb goes first (it adds
# least, +0.09 DNSMOS OVRL), then lighter voice activity and denoisers, then WebRTC's AEC3 for the
# batched echo canceller (it leaks more echo, AECMOS echo 3.6 against 4.1 on the far-end recording,
# at a twentieth of the cost of a small batch), then denoise, then aec; when even that does not fit
# the stream runs no stages at all (its audio is forwarded as it came).
DEGRADE_STEPS: tuple[tuple[str, str], ...] = (
    ("drop", "dereverb"), ("lighter", "vad"), ("lighter", "denoise"), ("lighter", "aec"), ("drop", "denoise"),
    ("drop", "aec"),
)


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
    return check_stage_specs(text)


def check_stage_specs(value: object) -> list[StageSpec]:
    """The one check of a stage spec from the network: a comma-separated string or a list of strings.

    Linear in the input and bounded before any per-item work: at most
    ``MAX_STAGES`` items of at most ``MAX_SPEC_CHARS`` characters, every one a
    known spec, one stage per kind.  Raises ``ValueError`` with a message
    meant for the client; returns the specs in canonical order.
    """
    if isinstance(value, str):
        if len(value) > MAX_STAGES * (MAX_SPEC_CHARS + 2):
            raise ValueError(f"a stage list is at most {MAX_STAGES} stages")
        items: list[object] = list(value.split(","))
    elif isinstance(value, (list, tuple)):
        if len(value) > MAX_STAGES:
            raise ValueError(f"a stage list is at most {MAX_STAGES} stages, got {len(value)}")
        items = list(value)
    else:
        raise ValueError("stages are a comma-separated string or a list of strings")
    specs: list[StageSpec] = []
    kinds: set[str] = set()
    for item in items:
        if not isinstance(item, str):
            raise ValueError(f"stage list items must be strings, got {type(item).__name__}")
        if len(item) > MAX_SPEC_CHARS:
            raise ValueError(f"a stage spec is at most {MAX_SPEC_CHARS} characters")
        if not item.strip():
            continue
        spec = parse_spec(item)
        if spec.kind in kinds:
            raise ValueError(f"stage kind listed twice: {spec.kind}")
        kinds.add(spec.kind)
        specs.append(spec)
    if len(specs) > MAX_STAGES:
        raise ValueError(f"a stage list is at most {MAX_STAGES} stages")
    return sorted(specs, key=lambda s: CHAIN_ORDER.index(s.kind))


def load_stage_class(spec: str) -> type[Stage]:
    target = STAGES[spec]
    module_name, cls_name = target.split(":")
    module = importlib.import_module(module_name)
    cls: type[Stage] = getattr(module, cls_name)
    return cls


def create_stage(spec: str, device: str = "cpu", **kwargs: Any) -> Stage:
    return load_stage_class(spec)(device=device, **kwargs)
