"""Use the enhancement engine from any aiortc application, without the SFU.

``enhance_track(track, executor, "denoise")`` wraps an aiortc audio track
(a microphone, a ``MediaPlayer``, a remote track) into one whose frames have
been through the batched executor: all tracks wrapped on the same executor
are processed together, one batch per stage per tick.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import av
import numpy as np
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from mediaserver.audio_format import SAMPLE_RATE, ChunkAssembler, frame_to_mono48k, mono48k_to_frame


class EnhancedAudioTrack(MediaStreamTrack):
    """Owns one executor stream and converts between the source's frames and 10 ms chunks."""

    kind = "audio"

    def __init__(self, source: MediaStreamTrack, executor: Any, stages: Sequence[str] | str,
                 options: Optional[Mapping[str, Mapping[str, Any]]] = None) -> None:
        super().__init__()
        if source.kind != "audio":
            raise ValueError("enhance_track needs an audio track")
        self._source = source
        self._stream = executor.open_stream(stages, options, label=f"track-{source.id}")
        self._assembler = ChunkAssembler()
        self._resampler = av.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)
        self._pts = 0
        self.last_side: dict[str, float] = {}
        self.bypassed = 0

    async def recv(self) -> av.AudioFrame:  # type: ignore[override]
        if self.readyState != "live":
            raise MediaStreamError
        out: list[np.ndarray] = []
        while not out:
            frame = await self._source.recv()
            if not isinstance(frame, av.AudioFrame):
                raise MediaStreamError("enhance_track needs decoded audio frames")
            samples = frame_to_mono48k(frame, self._resampler)
            for chunk in self._assembler.push(samples):
                result = await self._stream.process(chunk)
                out.append(result.audio)
                self.last_side = dict(result.side)
                self.bypassed += int(result.bypassed)
        audio = np.concatenate(out)
        frame_out = mono48k_to_frame(audio, self._pts)
        self._pts += len(audio)
        return frame_out

    def stop(self) -> None:
        self._stream.close()
        super().stop()


def enhance_track(track: MediaStreamTrack, executor: Any, stages: Sequence[str] | str = "denoise",
                  options: Optional[Mapping[str, Mapping[str, Any]]] = None) -> EnhancedAudioTrack:
    """Wrap ``track`` so its audio goes through ``stages`` on the shared ``executor``."""
    return EnhancedAudioTrack(track, executor, stages, options)
