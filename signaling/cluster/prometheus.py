"""One Prometheus exposition out of every worker's: each sample gets a ``worker`` label.

Each worker process serves its own instruments (``GET /metrics``, text format
0.0.4); the front scrapes them all and merges them family by family, so that a
family's ``# HELP``/``# TYPE`` lines appear once with the samples of every
worker under them (the format wants a family's samples together).
"""

from __future__ import annotations


def _with_label(sample: str, worker: str) -> str:
    """``name{a="b"} 1`` -> ``name{worker="w",a="b"} 1``; ``name 1`` -> ``name{worker="w"} 1``."""
    cut = len(sample)
    for i, ch in enumerate(sample):
        if ch == "{" or ch == " ":
            cut = i
            break
    name, rest = sample[:cut], sample[cut:]
    label = f'worker="{worker}"'
    if rest.startswith("{}"):
        return f"{name}{{{label}}}{rest[2:]}"
    if rest.startswith("{"):
        return f"{name}{{{label},{rest[1:]}"
    return f"{name}{{{label}}}{rest}"


def merge_expositions(parts: list[tuple[str, bytes]]) -> bytes:
    """``parts``: (worker label, exposition) pairs; one exposition with every sample labelled."""
    order: list[str] = []
    headers: dict[str, list[str]] = {}
    samples: dict[str, list[str]] = {}
    for worker, body in parts:
        family = ""
        for line in body.decode("utf-8", "replace").splitlines():
            if not line.strip():
                continue
            if line.startswith("#"):
                fields = line.split(" ", 3)
                if len(fields) >= 3 and fields[1] in ("HELP", "TYPE"):
                    family = fields[2]
                    if family not in headers:
                        headers[family] = []
                        samples[family] = []
                        order.append(family)
                    if not any(h.split(" ", 3)[1] == fields[1] for h in headers[family]):
                        headers[family].append(line)
                continue
            if family not in samples:
                headers[family], samples[family] = [], []
                order.append(family)
            samples[family].append(_with_label(line, worker))
    out: list[str] = []
    for family in order:
        out.extend(headers[family])
        out.extend(samples[family])
    return ("\n".join(out) + "\n").encode()
