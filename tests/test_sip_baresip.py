"""A real softphone (baresip, headless) calls the bridge, hears the menu, types a room and talks.

baresip plays a WAV file as its microphone (aufile) and records what it
receives (sndfile); it is driven over its TCP control interface.  A WebRTC
bot in the chosen room must hear the phone's speech, and the phone's
recording must hold the spoken menu and then the bot's speech.
"""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path

import numpy as np
import soundfile as sf
from scipy.signal import resample_poly

from enhancers.audio_io import read_48k
from loadtest.bot import Bot
from tests.audio_checks import content_match, looped
from tests.conftest import ServerFactory, speech
from tests.test_sip_support import (
    BARESIP,
    free_port,
    needs_baresip,
    start_sip_server,
    telephone_band,
    wait_for,
)

pytestmark = needs_baresip
ROOM = "4321"


class Baresip:
    """One headless baresip process: its config directory, control socket and recordings."""

    def __init__(self, workdir: Path, microphone: Path) -> None:
        self.dir = workdir
        self.rec = workdir / "rec"
        self.rec.mkdir(exist_ok=True)
        self.ctrl_port = free_port(kind=socket.SOCK_STREAM)
        sip_port = free_port()
        rtp = free_port()
        (workdir / "accounts").write_text("<sip:phone@127.0.0.1>;regint=0\n")
        (workdir / "config").write_text("\n".join([
            "poll_method epoll",
            f"sip_listen 127.0.0.1:{sip_port}",
            f"audio_source aufile,{microphone}",
            "audio_player nosuch,nosuch",  # no sound card: the sndfile filter records what arrives
            "audio_alert nosuch,nosuch",
            f"rtp_ports {rtp}-{rtp + 40}",
            "module_path /usr/lib/baresip/modules",
            "module g711.so",
            "module aufile.so",
            "module sndfile.so",
            f"snd_path {self.rec}",
            "module_app account.so",
            "module_app menu.so",
            "module_app ctrl_tcp.so",
            f"ctrl_tcp_listen 127.0.0.1:{self.ctrl_port}",
            "",
        ]))
        self._log = (workdir / "baresip.log").open("wb")  # closed in stop()
        self.proc: asyncio.subprocess.Process | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def start(self) -> None:
        assert BARESIP is not None
        self.proc = await asyncio.create_subprocess_exec(BARESIP, "-f", str(self.dir), stdin=asyncio.subprocess.DEVNULL,
                                                         stdout=self._log, stderr=asyncio.subprocess.STDOUT)
        for _ in range(100):
            try:
                _, self._writer = await asyncio.open_connection("127.0.0.1", self.ctrl_port)
                return
            except OSError:
                await asyncio.sleep(0.1)
        raise AssertionError("baresip's control port did not open")

    async def command(self, command: str, params: str = "") -> None:
        """A ctrl_tcp command, netstring-framed JSON."""
        assert self._writer is not None
        body = json.dumps({"command": command, "params": params, "token": command}).encode()
        self._writer.write(str(len(body)).encode() + b":" + body + b",")
        await self._writer.drain()

    async def stop(self) -> None:
        if self.proc is None or self.proc.returncode is not None:
            self._log.close()
            return
        try:
            await self.command("quit")
            await asyncio.wait_for(self.proc.wait(), 3.0)
        except (TimeoutError, OSError, AssertionError):
            self.proc.terminate()
            await self.proc.wait()
        if self._writer is not None:
            self._writer.close()
        self._log.close()

    def received(self) -> np.ndarray:
        """What the phone received, at 48 kHz."""
        files = sorted(self.rec.glob("*-dec.wav"))
        assert files, f"baresip recorded nothing: {(self.dir / 'baresip.log').read_text(errors='replace')[-600:]}"
        return read_48k(files[-1])


async def test_phone_hears_menu_types_room_and_talks_with_webrtc(start_server: ServerFactory, tmp_path: Path) -> None:
    server = await start_sip_server(start_server)
    phone_voice = speech("cmu_arctic_us_axb_a0005.wav")
    bot_voice = speech("cmu_arctic_us_aew_a0001.wav")
    mic = tmp_path / "phone-mic.wav"  # 8 kHz, longer than the call: aufile ends the call at its end
    mic_8k = resample_poly(looped(phone_voice, 12), 1, 6).astype(np.float32)
    sf.write(mic, mic_8k, 8000, subtype="PCM_16")
    mic_48k = read_48k(mic)

    bot = Bot(server.running.url, ROOM, "webrtc", bot_voice)
    await bot.join()
    phone = Baresip(tmp_path, mic)
    await phone.start()
    try:
        await phone.command("dial", f"sip:ivr@127.0.0.1:{server.port}")
        dialogs = server.sip.dialogs
        await wait_for(lambda: any(d.state == "confirmed" and d.call.prompt.playing for d in dialogs.values()),
                       15, "the phone is answered and hears the menu")
        await wait_for(lambda: not any(d.call.prompt.playing for d in dialogs.values()), 15, "the menu was spoken")
        await phone.command("sndcode", f"{ROOM}#")
        room = server.running.server.rooms
        await wait_for(lambda: ROOM in room.rooms and any(p.kind == "sip" for p in room.get(ROOM).participants.values()),
                       10, f"the phone joined room {ROOM}")
        phone_id = next(p.id for p in room.get(ROOM).participants.values() if p.kind == "sip")
        await asyncio.sleep(5.0)
        heard_by_bot = bot.received_from(phone_id)
        await phone.command("hangup")
        await wait_for(lambda: not dialogs, 5, "the call ended")
    finally:
        await phone.stop()
        await bot.leave()

    assert len(heard_by_bot) > 48_000 * 3, "the phone's audio did not reach the WebRTC participant"
    ncc_up = content_match(heard_by_bot[24_000:], looped(mic_48k, 2))
    assert ncc_up > 0.5, f"the room hears something else than the phone (ncc {ncc_up:.2f})"

    recording = phone.received()
    synth = await server.running.server.prompts.service()
    menu = (await synth.synthesize(server.sip.config.menu_text)).audio
    menu_part = recording[: len(menu) + 24_000]
    ncc_menu = content_match(menu_part, telephone_band(np.asarray(menu)))
    assert ncc_menu > 0.6, f"the phone did not hear the spoken menu (ncc {ncc_menu:.2f})"
    room_part = recording[-4 * 48_000:]
    ncc_down = content_match(room_part, looped(telephone_band(bot_voice), 4))
    # thresholds leave room for a loaded test machine: the event loop that runs both the server and
    # the bot stalls now and then, and concealed audio correlates less (typical: 0.85-0.93)
    assert ncc_down > 0.45, f"the phone does not hear the WebRTC participant (ncc {ncc_down:.2f})"
    own = content_match(room_part, looped(mic_48k, 2))
    assert own < 0.4, f"the phone hears its own voice back (ncc {own:.2f})"
