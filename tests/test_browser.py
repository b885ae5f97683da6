"""The meeting page in real headless Chromium, with a fake microphone playing a real recording."""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path

import pytest
import soundfile as sf

from loadtest.bot import Bot
from tests.audio_checks import content_match, looped
from tests.conftest import RunningServer, speech

pytestmark = pytest.mark.browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def chromium_args(fake_audio: Path) -> list[str]:
    return [
        "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={fake_audio}",
        "--autoplay-policy=no-user-gesture-required",
    ]


@pytest.fixture
async def browser(tmp_path: Path):  # type: ignore[no-untyped-def]
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (.ci/run installs it)")
    from playwright.async_api import async_playwright

    clip = speech("cmu_arctic_us_aew_a0002.wav")
    wav = tmp_path / "mic.wav"
    sf.write(str(wav), clip, 48_000, subtype="PCM_16")
    async with async_playwright() as pw:
        b = await pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=chromium_args(wav))
        b.fake_clip = clip  # type: ignore[attr-defined]
        try:
            yield b
        finally:
            await b.close()


async def _join(page, url: str, room: str, name: str) -> None:  # type: ignore[no-untyped-def]
    await page.goto(f"{url}/?room={room}&name={name}&browserAec=0")
    await page.click("#join")
    await page.wait_for_function("window.meeting.me !== null && window.meeting.pc !== null", timeout=15_000)
    await page.wait_for_function("window.meeting.pc.connectionState === 'connected'", timeout=15_000)


async def test_browser_tabs_and_bot_hear_each_other(server: RunningServer, browser) -> None:  # type: ignore[no-untyped-def]
    bot_src = speech("cmu_arctic_us_axb_a0004.wav")
    bot = Bot(server.url, "web", "bot", bot_src)
    await bot.join()
    tab1 = await (await browser.new_context()).new_page()
    tab2 = await (await browser.new_context()).new_page()
    try:
        await _join(tab1, server.url, "web", "tab1")
        await _join(tab2, server.url, "web", "tab2")
        # both tabs list everyone
        for tab in (tab1, tab2):
            await tab.wait_for_function("document.querySelectorAll('#participants li').length === 3", timeout=10_000)
            names = await tab.eval_on_selector_all("#participants li", "els => els.map(e => e.textContent)")
            assert any(n.startswith("bot") for n in names)
        tab1_id = await tab1.evaluate("window.meeting.me.id")
        await asyncio.sleep(4.0)
        # the bot hears tab1's fake microphone: the recording we gave Chromium
        got = bot.received_from(tab1_id)
        assert len(got) > 48_000 * 2
        score = content_match(got[48_000:], looped(browser.fake_clip))
        assert score > 0.5, f"the bot does not hear the browser's microphone (ncc {score:.2f})"
        other = content_match(got[48_000:], looped(bot_src))
        # two different voices still correlate by chance: about 0.27-0.32 for these two clips
        assert other < 0.4 and score - other > 0.25, (
            f"the browser's stream carries the wrong content (ncc {other:.2f} vs {score:.2f})")
        # tab1 plays two remote streams and its stats show the bot's audio arriving
        assert await tab1.evaluate("document.querySelectorAll('#audio audio').length") == 2
        energy = await tab1.evaluate(
            """async () => { const r = await window.meeting.pc.getStats(); let e = 0;
               r.forEach(s => { if (s.type === 'inbound-rtp' && s.kind === 'audio') e += s.totalAudioEnergy || 0; });
               return e; }""")
        assert energy > 0.0, "the browser received only silence"
        await tab1.wait_for_function("document.querySelectorAll('#stats tbody tr').length >= 3", timeout=5_000)
        table = await tab1.inner_text("#stats")
        assert "bot" in table and "my microphone" in table
        # mute is signalled to everyone
        await tab1.click("#mute")
        deadline = time.monotonic() + 5
        while not any(e["type"] == "participant-updated" and e["participant"]["muted"] for e in bot.events):
            assert time.monotonic() < deadline, "mute was not signalled"
            await asyncio.sleep(0.1)
        # live stage toggle from the page reaches the server
        await tab1.check("#stages input[value=limiter]")
        await asyncio.sleep(0.5)
        room = server.server.rooms.get("web")
        assert "limiter" in room.participants[tab1_id].effective_stages()
        # leaving removes the tab for the others
        await tab2.click("#leave")
        await tab1.wait_for_function("document.querySelectorAll('#participants li').length === 2", timeout=10_000)
    finally:
        await bot.leave()
        await tab1.context.close()
        await tab2.context.close()


async def test_page_shows_server_error_for_bad_room(server: RunningServer, browser) -> None:  # type: ignore[no-untyped-def]
    page = await (await browser.new_context()).new_page()
    await page.goto(f"{server.url}/")
    await page.evaluate("document.getElementById('room').removeAttribute('pattern')")
    await page.fill("#room", "bad room!")
    await page.click("#join")
    await page.wait_for_function("document.getElementById('error').textContent.includes('bad-room')", timeout=10_000)
    await page.context.close()
