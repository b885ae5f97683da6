"""The SFU as one object: configuration, media clock, enhancement, rooms.

``MediaServer`` is what the signaling layer (WebSocket, HTTP API, SIP bridge)
drives.  It owns the process-wide media clock, the pipeline hub with the
batched enhancement executor, and the room registry.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any, Optional, Sequence

from mediaserver.auth import DEV_GRANT, Grant, TokenVerifier
from mediaserver.clock import MediaClock
from mediaserver.config import ServerConfig, worker_count
from mediaserver.encoder_load import EncoderComplexity
from mediaserver.ingest import InboundRtpSource
from mediaserver.loop_load import JoinGate, LoopLoad
from mediaserver.pipeline import PipelineHub
from mediaserver.prompts import PromptManager  # prompts: TTS prompt tracks
from mediaserver.quality import QualityMonitor, QualityTap  # quality: live SLIs per stream
from mediaserver.rollout import RolloutManager  # rollout: canary / A/B of stage lists
from mediaserver.room import (
    MediaSession,
    Participant,
    Room,
    RoomError,
    RoomRegistry,
    Send,
    cancel_quietly,
    new_id,
)
from mediaserver.session import PeerSession
from mediaserver.stream import ChunkSource, PublishedStream
from mediaserver.telemetry import MediaTelemetry  # telemetry: spans and OTel instruments
from synth import VoiceOptions

log = logging.getLogger(__name__)

VERSION = "0.1.0"


def validate_stages(stages: object) -> list[str]:
    """The one check of a stage spec from any client (WebSocket join and set-stages, HTTP PUTs).

    Anything but a comma-separated string or a list of known spec strings
    (bounded in count and length, one per kind) is ``RoomError("bad-stages")``,
    status 400; linear in the input (``enhancers.registry.check_stage_specs``).
    """
    from enhancers.registry import check_stage_specs

    try:
        return [s.spec for s in check_stage_specs(stages)]
    except ValueError as exc:
        raise RoomError("bad-stages", str(exc)) from None


class MediaServer:
    """Owns the rooms, the media clock and the enhancement executor of the process."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.clock = MediaClock()
        m = config.media
        # the event loop's load (loop_load.py), read once a second: the Opus complexity follows it
        # (encoder_load.py); a newcomer gets server-busy when it would fill the loop's core, or while the
        # media clock skips ticks (loop_load.py JoinGate)
        self.encoder_complexity: EncoderComplexity = EncoderComplexity(
            m.opus_complexity, m.opus_complexity_under_load, light_above=m.opus_light_above,
            full_below=m.opus_full_below)
        self.join_gate: JoinGate = JoinGate(config.limits.join_skipped_ticks, config.limits.join_min_participants,
                                            busy_limit=config.limits.join_busy_limit)
        self.loop_load: LoopLoad = LoopLoad([
            self.encoder_complexity.observe,
            lambda busy: self.join_gate.observe(self.clock.ticks, self.clock.skipped_ticks, busy,
                                                self.loop_load.last_run, self.rooms.participant_count)])
        self.hub = PipelineHub()
        self.rooms = RoomRegistry(list(config.enhance.default_stages), config.limits.max_rooms,
                                  config.limits.max_participants_per_room)
        self.auth = TokenVerifier(config.auth.secret, config.auth.dev_mode)
        self.started_at = time.time()
        self._ticker: Optional[asyncio.Task[None]] = None
        self._offer_timers: dict[str, asyncio.Task[None]] = {}  # join-without-offer deadlines, by participant
        self._closed = False
        self._notices: set[asyncio.Task[None]] = set()  # stage notices on their way to participants
        self.prompts = PromptManager(self)  # prompts: the SynthService and every room's prompt tracks
        self.telemetry = MediaTelemetry(self)  # telemetry: spans, per-stream figures, sampler
        self.quality = QualityMonitor(config.quality)  # quality: DNSMOS and signals, on a thread of its own
        self._quality_taps: dict[PublishedStream, QualityTap] = {}
        self.rollout = RolloutManager(self)  # rollout: which streams run a candidate stage list
        self.links: Any = None  # mediaserver/federation.RoomLinks once rooms may span processes (attach_bus)

    def _shared_cpus(self) -> float:
        """This media process's share of the cores its executor's worker shares with the media processes
        (0: the worker has cores of its own).  A worker pinned to a core of its own is told 1.0
        (signaling/cluster/worker_main.py); unpinned workers that cover every core share them all, and each
        one's admission budgets its share (believing it had them all, N workers admitted N times what fits)."""
        e = self.config.enhance
        if e.shared_cpus >= 0:
            return e.shared_cpus
        if e.executor_url:
            return 0  # a remote executor service runs on its own host
        try:
            cpus = len(os.sched_getaffinity(0))
        except AttributeError:  # not Linux
            cpus = os.cpu_count() or 1
        workers = worker_count(self.config)
        return cpus / workers if cpus <= workers else 0.0

    async def start(self) -> None:
        validate_stages(self.config.enhance.default_stages)
        from enhancers.executor import Executor, ExecutorConfig

        e = self.config.enhance
        executor = Executor(ExecutorConfig(device=e.device, deadline_ms=e.deadline_ms,
                                           max_wait_ms=e.max_wait_ms, torch_threads=e.torch_threads,
                                           isolation="remote" if e.executor_url else e.isolation,
                                           remote_address=e.executor_url, remote_token=e.executor_token.encode(),
                                           remote_name=f"mediaserver-{os.getpid()}", recovery=e.recovery,
                                           admission=e.admission, target_load=e.target_load,
                                           upgrade_load=e.upgrade_load, upgrade_interval_s=e.upgrade_interval_s,
                                           stage_costs={spec: (fixed, per) for spec, fixed, per in e.stage_costs},
                                           shared_cpus=self._shared_cpus(), cpu_target=e.cpu_target,
                                           host_ms_per_stream=e.host_ms_per_stream,
                                           priority_boost=e.worker_priority_boost))
        await executor.start()
        if e.default_stages:
            await executor.preload(list(e.default_stages))  # first chunks already get their stages
            if e.admission:  # and the lighter ones an overload moves streams to, before it happens
                executor.prepare_fallbacks(list(e.default_stages))
        self.hub.executor = executor
        self.quality.unavailable_count = lambda: executor.counters.get("stage_unavailable", 0)  # quality
        self._ticker = asyncio.get_running_loop().create_task(self._room_ticker(), name="room-ticker")
        self.loop_load.start()
        self.prompts.start()  # prompts: load the speech synthesizer in the background
        self.telemetry.start()  # telemetry

    async def close(self) -> None:
        """Tell every participant, close every session and stream, stop the executor (idempotent)."""
        if self._closed:
            return
        self._closed = True
        await cancel_quietly(self._ticker)
        await self.loop_load.close()
        self.rollout.close()  # rollout
        for timer in list(self._offer_timers.values()):
            await cancel_quietly(timer)
        self._offer_timers.clear()
        for notice in list(self._notices):
            await cancel_quietly(notice)
        await self.telemetry.close()  # telemetry: end every span
        await self.prompts.close()  # prompts
        for room in list(self.rooms.rooms.values()):
            for p in list(room.participants.values()):
                try:
                    await p.send({"type": "bye", "reason": "server shutting down"})
                except Exception:
                    pass
                await room.remove_participant(p)
            for s in list(room.streams.values()):
                await room.remove_stream(s)
        await self.clock.close()
        if self.links is not None:
            await self.links.close()
        await asyncio.get_running_loop().run_in_executor(None, self.quality.close)  # quality
        if self.hub.executor is not None:
            await self.hub.executor.close()

    # -- participants -------------------------------------------------------
    async def join(self, room_id: str, name: str, send: Send, *, kind: str = "webrtc",
                   stages: object = None,
                   echo_cancellation: bool = True,
                   session: Optional[MediaSession] = None,
                   grant: Grant = DEV_GRANT) -> Participant:
        """Add a participant; WebRTC ones get a PeerSession, others bring their own session.

        ``grant`` (from a verified join token) decides whether it may publish
        and subscribe; callers check that it names this room.
        """
        if not (grant.allows("publish", room_id) or grant.allows("subscribe", room_id)):
            raise RoomError("forbidden", "the token allows neither publishing nor subscribing here", status=403)
        checked = None if stages is None else validate_stages(stages)  # before the room is created
        if (busy := self.join_gate.refusal(self.rooms.participant_count)) is not None:
            log.warning("join to room %r refused: %s", room_id[:64], busy)
            raise RoomError("server-busy", busy, status=503)
        self.rooms.validate_id(room_id)
        # a join token's identity (``sub``) is unique per room: a second join replaces the first (as in
        # LiveKit).  Development grants and SIP calls carry no identity of their own.
        identity = grant.identity if grant is not DEV_GRANT and kind == "webrtc" else None
        if identity is not None:
            while (old := self._identity_in(room_id, identity)) is not None:
                await self._replace(old)
        room = self.rooms.get_or_create(room_id)
        pid = new_id("p-")
        if session is None:
            session = PeerSession(pid, self.config.media, self.config.limits, send)
        participant = Participant(id=pid, name=name, room=room, session=session, send=send, kind=kind,
                                  echo_cancellation_client=echo_cancellation,
                                  can_publish=grant.allows("publish", room_id),
                                  can_subscribe=grant.allows("subscribe", room_id),
                                  is_admin=grant.allows("admin", room_id), identity=identity)
        participant.stages = checked
        room.add_participant(participant)
        if kind == "webrtc" and self.config.limits.offer_timeout_s > 0:
            self._offer_timers[pid] = asyncio.get_running_loop().create_task(
                self._offer_deadline(participant), name=f"offer-deadline-{pid}")
        self.telemetry.participant_joined(participant)  # telemetry
        log.info("room %s: %s (%s) joined as %s", room.id, name, kind, pid)
        return participant

    def _identity_in(self, room_id: str, identity: str) -> Optional[Participant]:
        room = self.rooms.rooms.get(room_id)
        return room.with_identity(identity) if room is not None else None

    async def _replace(self, old: Participant) -> None:
        """A second join with the same token identity: the old participant is sent ``bye`` and removed."""
        log.info("room %s: identity %r joined again, replacing %s", old.room.id, old.identity, old.id)
        try:
            await old.send({"type": "bye", "code": "replaced",
                            "reason": "replaced: the same identity joined this room again"})
        except Exception:
            pass
        await self.leave(old, reason="replaced", keep_room=True)  # the room (and its stages) stays

    async def _offer_deadline(self, participant: Participant) -> None:
        """Remove a WebRTC participant that joined and never sent its offer."""
        timeout = self.config.limits.offer_timeout_s
        await asyncio.sleep(timeout)
        self._offer_timers.pop(participant.id, None)
        if participant.offered or participant.room.participants.get(participant.id) is not participant:
            return
        log.info("participant %s: no offer within %.0f s of joining, removing", participant.id, timeout)
        try:
            await participant.send({"type": "error", "code": "offer-timeout",
                                    "message": f"no offer within {timeout:.0f} s of joining; join again"})
        except Exception:
            pass
        await self.leave(participant, reason="no offer")

    def publish(self, participant: Participant, source: ChunkSource, *, kind: str = "microphone",
                stream_id: Optional[str] = None, stages: Optional[Sequence[str]] = None) -> PublishedStream:
        """Start a participant's published stream from any chunk source and route it to the room."""
        room = participant.room
        m = self.config.media
        stream_id = stream_id or f"{participant.id}-mic"
        pipeline = self.hub.open(f"{room.id}/{participant.id}", list(stages) if stages is not None
                                 else self.rollout.stages_for(participant, stream_id))  # rollout: maybe an arm's
        tap = self.quality.open(stream_id, room.id)  # quality: pre/post chunks to the scorer thread
        stream = PublishedStream(stream_id, participant.id, kind, source,
                                 pipeline, self.clock, bitrate=m.opus_bitrate,
                                 forward_unprocessed=m.forward_unprocessed, complexity=self.encoder_complexity,
                                 on_chunk=tap.on_chunk if tap is not None else None)
        if tap is not None:
            self._quality_taps[stream] = tap
        stream.muted = participant.muted
        participant.published = stream
        pipeline.on_change = lambda _: self._stages_upgraded(participant, stream)
        self._wire_echo_reference(participant)
        stream.start()
        room.add_stream(stream)
        self.telemetry.stream_started(stream, room.id)  # telemetry
        if pipeline.degraded_reason:
            self._notice(self._send_stages_notice(participant, stream))
        return stream

    # -- admission control: stages the executor could not give (enhancers/executor/admission.py) --------
    def _notice(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._notices.add(task)
        task.add_done_callback(self._notices.discard)

    async def _send_stages_notice(self, participant: Participant, stream: PublishedStream) -> None:
        """Tell the publisher what runs on its stream when that is not what it asked for, or is again."""
        p = stream.pipeline
        reason = p.degraded_reason
        message: dict[str, Any] = {"type": "stages-degraded" if reason else "stages-restored", "stream": stream.id,
                                   "stages": p.stages, "requested_stages": p.requested_stages}
        if reason:
            message["reason"] = reason
        try:
            await participant.send(message)
        except Exception:  # a participant that went away: nothing to tell
            pass

    def _stages_upgraded(self, participant: Participant, stream: PublishedStream) -> None:
        """The executor gave ``stream`` better stages once load dropped: rewire, tell the participant and room."""
        if participant.published is not stream:
            return
        self._wire_echo_reference(participant)
        self.telemetry.stages_changed(stream)  # telemetry
        self._notice(self._send_stages_notice(participant, stream))
        self._notice(participant.room.announce({"type": "participant-updated",
                                                 "participant": participant.describe()}))

    def _wire_echo_reference(self, participant: Participant) -> None:
        """Give the participant's microphone the audio it was sent, when it runs echo cancellation."""
        stream = participant.published
        if stream is None:
            return
        room, pid, sid = participant.room, participant.id, stream.id
        if any(s.split(":")[0] == "aec" for s in stream.pipeline.stages):
            room.mix.use(pid, True)
            stream.set_reference(lambda tick: room.mix.reference(pid, sid, tick))
        else:
            room.mix.use(pid, False)
            stream.set_reference(None)

    async def accept_offer(self, participant: Participant, sdp: str) -> str:
        """Answer the client's one offer, then start its stream and its subscriptions.

        The answer is sent before anything else so that no server offer can
        overtake it on the signaling channel.
        """
        session = participant.session
        if not isinstance(session, PeerSession):
            raise RoomError("bad-request", "this participant has no WebRTC session")
        answer = await session.accept_offer(sdp)
        participant.offered = True
        timer = self._offer_timers.pop(participant.id, None)
        if timer is not None:
            timer.cancel()
        await participant.send({"type": "answer", "sdp": answer})
        room = participant.room
        if session.publish_transceiver is not None and participant.can_publish:
            m = self.config.media
            source = InboundRtpSource(session.publish_transceiver.receiver, min_delay_ms=m.jitter_min_ms,
                                      max_delay_ms=m.jitter_max_ms, start_delay_ms=m.jitter_start_ms)
            self.publish(participant, source)
        session.mark_ready()
        session.watch_liveness(lambda silent_s: self._peer_silent(participant, silent_s))
        room.subscribe_existing(participant)

        @session.pc.on("connectionstatechange")
        async def _on_state() -> None:
            if session.pc.connectionState == "failed" and participant.id in room.participants:
                log.warning("participant %s: connection failed, removing", participant.id)
                await self.leave(participant, reason="connection failed")

        await room.announce({"type": "participant-joined", "participant": participant.describe()},
                             exclude=participant.id)
        return answer

    async def _peer_silent(self, participant: Participant, silent_s: float) -> None:
        """The client vanished with its WebSocket open (no ICE consent, no media): remove it."""
        if participant.room.participants.get(participant.id) is not participant:
            return
        log.warning("participant %s: nothing received for %.1f s (ICE consent, SRTP, SRTCP), removing",
                    participant.id, silent_s)
        try:
            await participant.send({"type": "bye", "reason": f"nothing received for {silent_s:.0f} s"})
        except Exception:
            pass
        await self.leave(participant, reason="timed out")

    async def accept_answer(self, participant: Participant, sdp: str) -> None:
        session = participant.session
        if not isinstance(session, PeerSession):
            raise RoomError("bad-request", "this participant has no WebRTC session")
        await session.accept_answer(sdp)
        self.telemetry.renegotiated(participant)  # telemetry

    async def leave(self, participant: Participant, reason: str = "left", keep_room: bool = False) -> None:
        room = participant.room
        if room.participants.get(participant.id) is not participant:
            return
        timer = self._offer_timers.pop(participant.id, None)
        if timer is not None and timer is not asyncio.current_task():
            timer.cancel()
        await room.remove_participant(participant)
        log.info("room %s: %s left (%s)", room.id, participant.id, reason)
        await room.announce({"type": "participant-left", "participant": participant.describe(),
                              "reason": reason})
        await self.prompts.participant_left(participant)  # prompts: close tracks nobody hears
        self.telemetry.participant_left(participant, reason)  # telemetry
        if not keep_room:
            await self.rooms.drop_if_unused(room)

    async def kick(self, participant: Participant, reason: str = "removed by an administrator") -> None:
        try:
            await participant.send({"type": "bye", "reason": reason})
        except Exception:
            pass
        await self.leave(participant, reason="kicked")

    # -- prompts (mediaserver/prompts.py) -------------------------------------------
    async def play_prompt(self, room: str, text: str, options: Optional[VoiceOptions] = None,
                          to: Optional[str] = None, interrupt: bool = False) -> str:
        """Speak ``text`` into a room (or to participant ``to``) as a synthetic prompt track; the prompt id."""
        requested_ns = time.time_ns()  # telemetry: the prompt's span starts at the request
        prompt = await self.prompts.play(room, text, options, to=to, interrupt=interrupt)
        self.telemetry.prompt_queued(room, prompt, requested_ns)  # telemetry
        return prompt.id

    async def set_muted(self, participant: Participant, muted: bool) -> None:
        participant.muted = bool(muted)
        if participant.published is not None:
            participant.published.muted = participant.muted
        await participant.room.announce({"type": "participant-updated", "participant": participant.describe()})

    async def set_participant_stages(self, participant: Participant, stages: object) -> None:
        """Per-participant stages (``None``: the room's); checked by ``validate_stages``."""
        participant.stages = None if stages is None else validate_stages(stages)
        if participant.published is not None:
            participant.published.pipeline.set_stages(
                self.rollout.stages_for(participant, participant.published.id))  # rollout: maybe an arm's
            self._wire_echo_reference(participant)
            self.telemetry.stages_changed(participant.published)  # telemetry
            if participant.published.pipeline.degraded_reason:
                await self._send_stages_notice(participant, participant.published)
        await participant.room.announce({"type": "participant-updated", "participant": participant.describe()})

    async def set_room_stages(self, room: Room, stages: object) -> None:
        """The room's stages, live for every participant without its own; checked by ``validate_stages``."""
        await self.apply_room_stages(room, validate_stages(stages))
        await room.announce({"type": "room-updated", "room": room.describe()})

    async def apply_room_stages(self, room: Room, stages: list[str]) -> None:
        """Set the room's (checked) stages on this process's participants without their own."""
        room.stages = list(stages)
        for p in room.participants.values():
            if p.stages is None and p.published is not None:
                p.published.pipeline.set_stages(self.rollout.stages_for(p, p.published.id))  # rollout
                self._wire_echo_reference(p)
                self.telemetry.stages_changed(p.published)  # telemetry
                if p.published.pipeline.degraded_reason:
                    self._notice(self._send_stages_notice(p, p.published))

    def restage(self, participant: Participant) -> None:
        """Run on the participant's microphone what should run now (a rollout started or ended), live."""
        stream = participant.published
        if stream is None or stream.closed:
            return
        stages = self.rollout.stages_for(participant, stream.id)
        if stages == stream.pipeline.requested_stages:
            return
        stream.pipeline.set_stages(stages)
        self._wire_echo_reference(participant)
        self.telemetry.stages_changed(stream)  # telemetry
        if stream.pipeline.degraded_reason:
            self._notice(self._send_stages_notice(participant, stream))
        self._notice(participant.room.announce({"type": "participant-updated",
                                                 "participant": participant.describe()}))

    # -- rooms spanning processes (mediaserver/federation.py) -----------------------------
    async def attach_bus(self, bus: Any, relay_host: str = "127.0.0.1") -> Any:
        """Let rooms span this process and others: a relay socket, and ``bus`` for the room messages.
        Returns the ``RoomLinks`` (hand it the bus's messages: ``links.on_message``)."""
        from mediaserver.federation import RoomLinks
        from mediaserver.relay import RelayEndpoint

        endpoint = RelayEndpoint()
        await endpoint.start(relay_host)
        self.links = RoomLinks(self, endpoint, bus)
        self.rooms.links = self.links
        return self.links

    # -- periodic work -----------------------------------------------------------
    def stream_stats(self, stream: PublishedStream) -> dict[str, Any]:
        if getattr(stream, "remote", False):
            return stream.stats()  # type: ignore[attr-defined,no-any-return]  # a RemoteStream
        c = stream.counters
        out: dict[str, Any] = {
            "stream": stream.id, "participant": stream.owner_id, "kind": stream.kind,
            "stages": stream.pipeline.stages, "requested_stages": stream.pipeline.requested_stages,
            "degraded_reason": stream.pipeline.degraded_reason or None, "chunks": c.chunks, "bypassed": c.bypassed,
            "level_dbfs": round(c.level_dbfs, 1), "vad": round(c.vad, 2),
            "processing_ms": round(c.processing_ms, 2), "server_latency_ms": round(c.server_latency_ms, 1),
            "subscribers": stream.fanout.subscriber_count,
        }
        if c.echo_delay_ms >= 0:
            out["echo_delay_ms"] = round(c.echo_delay_ms, 1)
        jb = getattr(stream.source, "stats", None)
        if jb is not None:
            out.update({"received": jb.received, "lost": jb.lost, "late": jb.late,
                        "concealed_chunks": jb.concealed_chunks, "fec_recovered": jb.fec_recovered,
                        "jitter_ms": round(jb.jitter_ms, 2), "jitter_buffer_ms": round(jb.buffer_ms, 1),
                        "jitter_target_ms": round(jb.target_ms, 1),
                        "jitter_timeline_shift_ms": round(jb.timeline_shift_ms, 1)})
        out.update(self.telemetry.stream_extras(stream))  # telemetry: e2e latency, drops
        if stream in self._quality_taps:
            out["quality"] = self.quality.stream_stats(stream.id)  # quality: DNSMOS, SNR, level ...
            out["quality"]["arm"] = self.rollout.arm_of(stream.id)  # rollout: baseline / candidate / None
        return out

    async def _room_ticker(self) -> None:
        n = 0
        while True:
            await asyncio.sleep(0.25)
            n += 1
            if n % 4 == 0:
                self._sweep_quality_taps()
            for room in list(self.rooms.rooms.values()):
                speaker = room.update_active_speaker()
                if speaker is not None:
                    await room.broadcast({"type": "active-speaker", "participant": speaker})
                if n % 4 == 0:
                    stats = [self.stream_stats(s) for s in room.streams.values()]
                    await room.broadcast({"type": "stats", "streams": stats})

    def _sweep_quality_taps(self) -> None:
        for stream, tap in list(self._quality_taps.items()):
            if stream.closed:
                self.quality.close_stream(tap)
                del self._quality_taps[stream]

    def health(self) -> dict[str, Any]:
        return {
            "status": "ok",
            # everything loaded that the server loads once (speech synthesizer, quality model): until then
            # the first prompt or first quality window still pays for a load (and the RSS still grows)
            "ready": {"prompts": self.prompts.ready, "quality": self.quality.ready},
            "version": VERSION,
            "uptime_s": round(time.time() - self.started_at, 1),
            "rooms": len(self.rooms.rooms),
            "participants": self.rooms.participant_count,
            "clock": {"ticks": self.clock.ticks, "skipped_ticks": self.clock.skipped_ticks,
                      "last_lag_ms": round(self.clock.last_lag_ms, 2)},
            "executor": self.hub.stats(),
            "encoder": self.encoder_complexity.stats(),
            "load": {"loop_busy": None if self.loop_load.last_busy is None else round(self.loop_load.last_busy, 3),
                     "loop_run": None if self.loop_load.last_run is None else round(self.loop_load.last_run, 3),
                     **self.join_gate.stats(self.rooms.participant_count)},
            "relay": self.links.stats() if self.links is not None else None,
            "quality": self.quality.stats(),
        }
