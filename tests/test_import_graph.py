"""The project's import graph: no cycles, and the dependency direction of the layers holds.

Every ``import`` and ``from ... import`` in mediaserver/, enhancers/, synth/ and
signaling/ counts, wherever it is in a file (inside functions and under
``TYPE_CHECKING`` too): a cycle there is a design knot even when it does not
break at import time.  Direction: signaling -> mediaserver -> (enhancers,
synth); enhancers and synth never import aiortc, mediaserver or signaling.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("mediaserver", "enhancers", "synth", "signaling")
# Cycles that predate this check, in modules outside the executor (mostly TYPE_CHECKING imports of the
# server or a sibling); each is to go.  This list only shrinks: a cycle not listed fails (a module joining
# a listed one too), and so does a listed one that is gone, so that its entry gets removed.
KNOWN_CYCLES: set[frozenset[str]] = {
    frozenset({"mediaserver.fanout", "mediaserver.rtp_send"}),
    frozenset({"mediaserver.prompts", "mediaserver.quality_telemetry", "mediaserver.server", "mediaserver.telemetry",
               "mediaserver.telemetry_instruments"}),
    frozenset({"signaling.app", "signaling.prompts_api", "signaling.websocket"}),
}
FORBIDDEN = {"enhancers": ("aiortc", "mediaserver", "signaling"), "synth": ("aiortc", "mediaserver", "signaling")}


def module_files() -> dict[str, Path]:
    mods = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            mods[".".join(parts)] = path
    return mods


def imported_names(module: str, path: Path) -> Iterator[tuple[str, ...]]:
    """What ``path`` imports: ``(name,)`` per ``import name``; ``(base, base.x, ...)`` per ``from base import x``."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from ((alias.name,) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            yield (base, *(f"{base}.{alias.name}" for alias in node.names))


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports (an import of ``a.b.c`` where only ``a.b`` is a module: ``a.b``)."""
    mods = module_files()

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for module, path in mods.items():
        targets = set()
        for base, *names in imported_names(module, path):
            # ``from pkg import sub`` is an edge to pkg.sub (not to pkg's __init__); ``from mod import name``
            # and ``import a.b`` to the module itself
            subs = [n for n in names if n in mods]
            if len(subs) < len(names) or not names:
                found = resolve(base)
                if found is not None:
                    targets.add(found)
            targets.update(subs)
        targets.discard(module)
        graph[module] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[frozenset[str]] = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(frozenset(component))
    return found


def test_no_import_cycles() -> None:
    found = set(cycles(import_graph()))
    new = [sorted(c) for c in found - KNOWN_CYCLES]
    assert not new, f"import cycles: {new}"
    gone = [sorted(c) for c in KNOWN_CYCLES - found]
    assert not gone, f"these known cycles are gone: remove them from KNOWN_CYCLES: {gone}"


def test_enhancers_and_synth_have_no_cycles_even_under_type_checking() -> None:
    graph = import_graph()
    ours = {m for m in graph if m.split(".")[0] in ("enhancers", "synth")}
    assert not [sorted(c) for c in cycles(graph) if c & ours]
    # the stage base never reaches into the executor (which imports the stages)
    assert not {m for m in graph["enhancers.stage"] | graph["enhancers.registry"] if m.startswith("enhancers.executor")}


def test_enhancers_and_synth_never_import_the_media_layers() -> None:
    bad = []
    for module, path in module_files().items():
        forbidden = FORBIDDEN.get(module.split(".")[0], ())
        for base, *_ in imported_names(module, path):
            if base.split(".")[0] in forbidden:
                bad.append(f"{module} imports {base}")
    assert not bad, bad


def test_the_cycle_finder_finds_cycles() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [frozenset({"a", "b", "c"})]
