"""SynthService in process isolation: synthesis in a spawned process, 16-bit audio back in a shared
mapping, the same audio and errors as on the worker thread, restarts after the process died or hung."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from synth.cache import PromptCache
from synth.engine import EngineFailure, SynthEngine, SynthResult, TextTooLong, UnknownVoice, VoiceOptions
from synth.espeak import EspeakEngine
from synth.render import to_pcm16
from synth.service import SynthService

SHORT = "Your microphone is muted."
LONG = ("The quick brown fox jumps over the lazy dog near the river bank. " * 80)[:5000]


class ToneEngine(SynthEngine):
    """A deterministic engine (eSpeak's output depends on what it spoke before): a chirp per text at
    22.05 kHz, and which process made it.  Built in the child by its factory: this class."""

    name = "tone"

    def voices(self) -> list[str]:
        return ["a"]

    def default_voice(self) -> str:
        return "a"

    def _synthesize(self, text: str, voice: str, options: VoiceOptions) -> SynthResult:
        t = np.arange(len(text) * 2205) / 22050.0
        audio = (0.3 * np.sin(2 * np.pi * (200.0 + 400.0 * t) * t)).astype(np.float32)
        return SynthResult(audio, 22050, self.name, voice, extra={"pid": os.getpid()})


def _mappings() -> int:
    """The prompt memory files this process has mapped."""
    with open("/proc/self/maps") as f:
        return sum("memfd:synth-prompt" in line for line in f)


def _open_memory_files() -> int:
    """The prompt memory files this process holds a descriptor of."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += "memfd:synth-prompt" in os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            pass
    return count


async def test_the_process_speaks_the_same_audio_as_the_thread(tmp_path: Path) -> None:
    async with SynthService(isolation="process", engine_factory=ToneEngine) as remote:
        result = await remote.synthesize(SHORT)
        again = await remote.synthesize(SHORT, pcm16=True)
        assert remote.process is not None and remote.process.pid not in (None, os.getpid())
        child = remote.process.pid
    assert result.extra["pid"] == child, "synthesized in the synthesis process"
    assert result.audio.dtype == np.float32 and not result.audio.flags.writeable
    assert again.cache_hit and again.audio.dtype == np.int16 and not again.audio.flags.writeable
    async with SynthService(ToneEngine()) as local:
        here = await local.synthesize(SHORT)
    assert here.extra["pid"] == os.getpid() and here.extra["watermark_id"] == result.extra["watermark_id"]
    assert np.array_equal(to_pcm16(here.audio), again.audio), "the same 16-bit samples as the worker thread"
    assert np.max(np.abs(result.audio - here.audio)) <= 1.0 / 32767
    assert result.metadata()["synthetic"] is True and result.sample_rate == 48000 and len(result.audio) % 480 == 0

    # the process writes the disk cache; a thread-isolated service finds its entry there, and back
    async with SynthService(isolation="process", cache=PromptCache(tmp_path)) as remote:
        stored = await remote.synthesize("Press one for sales.", pcm16=True)
    async with SynthService(EspeakEngine(), PromptCache(tmp_path)) as local:
        found = await local.synthesize("Press one for sales.")
    assert not stored.cache_hit and found.cache_hit and found.audio.dtype == np.float32
    assert np.array_equal(to_pcm16(found.audio), stored.audio)
    async with SynthService(isolation="process", cache=PromptCache(tmp_path)) as remote:
        assert (await remote.synthesize("Press one for sales.")).cache_hit


async def test_errors_cross_as_the_same_types() -> None:
    async with SynthService(isolation="process") as service:
        with pytest.raises(TextTooLong) as too_long:
            await service.synthesize("word " * 1100)
        assert too_long.value.max_chars == 5000 and too_long.value.length == 5500
        with pytest.raises(UnknownVoice, match="klingon"):
            await service.synthesize("hello", VoiceOptions(voice="klingon"))
        assert (await service.engine_info()).max_chars == 5000
        assert "en-us" in await service.voices()
        assert (await service.synthesize("Still here.")).duration_s > 0.3


async def test_a_long_prompt_comes_back_as_a_shared_mapping_released_with_its_audio() -> None:
    async with SynthService(isolation="process") as service:
        ticks: list[float] = []

        async def heartbeat() -> None:
            while True:
                ticks.append(time.monotonic())
                await asyncio.sleep(0.005)

        beat = asyncio.create_task(heartbeat())
        before = _mappings()
        result = await service.synthesize(LONG, pcm16=True)
        beat.cancel()
        assert result.duration_s > 120 and result.audio.dtype == np.int16 and not result.audio.flags.writeable
        assert _mappings() == before + 1, "the samples are a view of the process's memory file"
        assert _open_memory_files() == 0, "a held prompt holds no file descriptor"
        view = result.audio[48_000:96_000]
        assert service.cache.bytes_in_memory == 0, "too large for the cache: not kept"
        lag = max(np.diff(ticks)) if len(ticks) > 1 else 0.0
        # the event loop went on while minutes of audio were rendered (generous: the machine may be busy)
        assert len(ticks) > 20 and lag < 0.5, (len(ticks), lag)
        del result
        await asyncio.sleep(0.1)  # the futures' done callbacks that still refer to it run
        assert _mappings() == before + 1 and len(view) == 48_000, "a view keeps the mapping"
        assert float(np.max(np.abs(view.astype(np.float32)))) > 0
        del view
        assert _mappings() == before, "unmapped once nothing refers to the audio"


async def test_the_process_is_started_again_after_it_was_killed_or_hung() -> None:
    async with SynthService(isolation="process", request_timeout_s=60.0) as service:
        assert service.process is not None
        await service.synthesize(SHORT)
        first = service.process.pid
        assert first is not None
        os.kill(first, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while service.process.pid == first and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert (await service.synthesize("After the kill.")).duration_s > 0.3
        second = service.process.pid
        assert second not in (None, first) and service.process.starts == 2

        # killed in the middle of a long synthesis: the request goes to the next process and is answered
        request = asyncio.create_task(service.synthesize(LONG, pcm16=True))
        await asyncio.sleep(0.5)
        os.kill(second, signal.SIGKILL)
        assert (await request).duration_s > 120
        assert service.process.pid not in (None, first, second) and service.process.starts == 3

        # hung (stopped): the request fails after the timeout, the process is replaced
        service.process.request_timeout_s = 2.0
        hung = service.process.pid
        assert hung is not None
        os.kill(hung, signal.SIGSTOP)
        with pytest.raises(EngineFailure, match="did not finish"):
            await service.synthesize("Nobody answers this one.")
        service.process.request_timeout_s = 60.0
        assert (await service.synthesize("A new process answers.")).duration_s > 0.3
        assert service.process.pid not in (None, hung) and service.process.starts == 4


def _synth_children() -> set[int]:
    """This process's children running the synthesis process."""
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent = int(f.read().rsplit(")", 1)[1].split()[1])
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    command = f.read()
            except OSError:
                continue
            if parent == os.getpid() and b"synth.child" in command:
                found.add(int(entry))
    return found


@pytest.mark.parametrize("wait_s", [0.0, 0.3])
async def test_closing_while_the_process_starts_leaves_none_behind(wait_s: float) -> None:
    before = _synth_children()
    service = SynthService(isolation="process")
    starting = asyncio.create_task(service.synthesize(SHORT))
    await asyncio.sleep(wait_s)
    starting.cancel()
    await service.aclose()
    deadline = time.monotonic() + 15
    while _synth_children() - before and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert not _synth_children() - before, "a synthesis process outlived its service"
