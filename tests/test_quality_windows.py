"""Which audio a quality window may hold: only blocks whose every chunk ran one settled stage set.

The tap labels 1 s blocks on the event loop; a block with a bypassed chunk (fail-open), a stage
switch inside it (chunks submitted before the switch come back after it), the settling time after a
switch, or an executor stage that was not available is unclean, and the window being captured starts
again at the next clean block (``discarded_windows``).  Driven chunk by chunk through the real tap and
monitor (no scorer: windows are only captured here, the live test scores them).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mediaserver.config import QualityConfig
from mediaserver.pipeline import PipelineResult
from mediaserver.quality import BLOCK_CHUNKS, CHUNK, QualityMonitor, QualityTap, _Block


class _Pipeline:
    def __init__(self) -> None:
        self.stages: list[str] = []


class _Stream:
    def __init__(self) -> None:
        self.pipeline = _Pipeline()


def _feed(tap: QualityTap, stream: _Stream, chunks: int, *, bypass_at: int = -1, switch_at: int = -1,
          to: list[str] | None = None) -> None:
    rng = np.random.default_rng(0)
    for i in range(chunks):
        if i == switch_at:
            stream.pipeline.stages = list(to or [])
        x = (0.1 * rng.standard_normal(CHUNK)).astype(np.float32)
        y = x if not stream.pipeline.stages else x * 0.5
        tap.on_chunk(stream, x, PipelineResult(audio=y, bypassed=(i == bypass_at)))


def _monitor(**kw: Any) -> tuple[QualityMonitor, list[_Block]]:
    monitor = QualityMonitor(QualityConfig(period_s=4, window_s=4, first_window_s=0, settle_s=1.0, cpu_share=1.0,
                                           **kw))
    blocks: list[_Block] = []
    monitor.submit = blocks.append  # type: ignore[method-assign]
    return monitor, blocks


def test_blocks_with_bypassed_chunks_or_a_switch_are_unclean() -> None:
    monitor, blocks = _monitor()
    stream = _Stream()
    tap = QualityTap(monitor, "s", "r")
    _feed(tap, stream, 2 * BLOCK_CHUNKS, bypass_at=BLOCK_CHUNKS + 7)
    assert [b.unclean for b in blocks] == [0, 1]  # a bypassed chunk in the second block
    blocks.clear()
    # a switch to denoise in the middle of a block: that block holds two stage sets and is labelled with
    # the new one; the next second is still settling; the one after that is clean
    _feed(tap, stream, 3 * BLOCK_CHUNKS, switch_at=50, to=["denoise"])
    assert [b.stages for b in blocks] == ["denoise"] * 3
    assert [bool(b.unclean) for b in blocks] == [True, True, False], [b.unclean for b in blocks]
    assert blocks[0].after is not None and blocks[2].after is not None


def test_a_window_holds_only_clean_blocks_of_one_stage_set() -> None:
    monitor, blocks = _monitor()
    stream = _Stream()
    tap = QualityTap(monitor, "s", "r")
    _feed(tap, stream, 2 * BLOCK_CHUNKS)  # two clean blocks: a window of 4 is being captured
    _feed(tap, stream, 3 * BLOCK_CHUNKS, switch_at=30, to=["denoise"])  # unclean, settling, clean
    _feed(tap, stream, 3 * BLOCK_CHUNKS)  # clean
    for b in blocks:
        monitor._on_block(b)
    assert monitor.discarded_windows == 1
    assert monitor.unclean_blocks["stages_changed"] == 1 and monitor.unclean_blocks["settling"] == 2
    (window,) = monitor._pending
    assert [b.stages for b in window.blocks] == ["denoise"] * 4 and not any(b.unclean for b in window.blocks)
    assert window.blocks[0] is blocks[4]  # the first block after the switch that had settled


def test_an_unavailable_stage_makes_the_block_unclean() -> None:
    monitor, blocks = _monitor()
    count = [0]
    monitor.unavailable_count = lambda: count[0]
    stream = _Stream()
    stream.pipeline.stages = ["denoise"]
    tap = QualityTap(monitor, "s", "r")
    _feed(tap, stream, BLOCK_CHUNKS)
    count[0] += 3  # the executor passed rows through a stage it was still loading
    _feed(tap, stream, 2 * BLOCK_CHUNKS)
    assert [b.unclean for b in blocks] == [0, 8, 0]
