// Browser meeting page: joins a room over the WebSocket protocol (docs/PROTOCOL.md),
// publishes the microphone, plays every remote stream, shows browser and server stats.
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  ws: null, pc: null, me: null, mic: null, muted: false,
  participants: new Map(),   // id -> participant
  tracks: new Map(),         // mid -> {participant, stream, synthetic}
  serverStats: new Map(),    // stream id -> stats from the server
  lastBytes: new Map(),      // stats id -> [bytes, timestamp]
  statsTimer: null,
};
window.meeting = state;      // for tests and debugging

function setStatus(text, kind) { const s = $("status"); s.textContent = text; s.dataset.state = kind; }
function showError(text) { $("error").textContent = text || ""; }
function send(msg) { if (state.ws && state.ws.readyState === 1) state.ws.send(JSON.stringify(msg)); }

function waitIceGathering(pc) {
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => { if (pc.iceGatheringState === "complete") { pc.removeEventListener("icegatheringstatechange", done); resolve(); } };
    pc.addEventListener("icegatheringstatechange", done);
    setTimeout(resolve, 3000);
  });
}

function renderParticipants(activeId) {
  const ul = $("participants");
  ul.textContent = "";
  for (const p of state.participants.values()) {
    const li = document.createElement("li");
    li.dataset.id = p.id;
    li.textContent = p.name + (state.me && p.id === state.me.id ? " (you)" : "");
    if (p.muted) { const t = document.createElement("span"); t.className = "tag"; t.textContent = "muted"; li.appendChild(t); }
    if (p.kind && p.kind !== "webrtc") { const t = document.createElement("span"); t.className = "tag"; t.textContent = p.kind; li.appendChild(t); }
    if (p.id === activeId) li.classList.add("speaking");
    ul.appendChild(li);
  }
}

function renderStages(stages) {
  for (const box of document.querySelectorAll("#stages input[type=checkbox]")) {
    const kind = box.value;
    const match = (stages || []).find((s) => s.split(":")[0] === kind);
    box.checked = !!match;
    if (kind === "denoise" && match) $("denoise-model").value = match === "denoise:df3" ? "denoise" : match;
  }
}

function selectedStages() {
  const out = [];
  for (const box of document.querySelectorAll("#stages input[type=checkbox]")) {
    if (!box.checked) continue;
    out.push(box.value === "denoise" ? $("denoise-model").value : box.value);
  }
  return out;
}

async function join(ev) {
  ev.preventDefault();
  showError("");
  const room = $("room").value.trim();
  const name = $("name").value.trim() || "guest";
  try {
    const browserAec = $("browser-aec").checked;
    state.mic = await navigator.mediaDevices.getUserMedia({ audio: { echoCancellation: browserAec, noiseSuppression: false, autoGainControl: browserAec } });
  } catch (err) {
    showError("Microphone not available: " + err.message);
    return;
  }
  const proto = location.protocol === "https:" ? "wss" : "ws";
  const ws = new WebSocket(`${proto}://${location.host}/ws`);
  state.ws = ws;
  setStatus("connecting…", "idle");
  ws.onopen = () => {
    const settings = state.mic.getAudioTracks()[0].getSettings();
    const join = { type: "join", version: 1, room, name, echoCancellation: settings.echoCancellation !== false };
    const token = new URLSearchParams(location.search).get("token");
    if (token) join.token = token;
    send(join);
  };
  // Handle messages strictly one after another: an offer must never overtake the answer before it.
  let chain = Promise.resolve();
  ws.onmessage = (e) => {
    const msg = JSON.parse(e.data);
    chain = chain.then(() => onMessage(msg)).catch((err) => showError(String(err)));
  };
  ws.onclose = (e) => {
    const wasIn = !!state.me && !state.leaving;
    state.me = null;
    setStatus("disconnected", "idle");
    teardown();
    // the server (or the room's media worker or node) went away: join the same room again, on whatever
    // answers at this address now, a few times
    if (wasIn && [1001, 1006, 1011, 1012].includes(e.code) && (state.rejoins || 0) < 10) {
      state.rejoins = (state.rejoins || 0) + 1;
      setStatus("reconnecting…", "idle");
      setTimeout(() => join({ preventDefault() {} }), 1000);
    }
  };
  ws.onerror = () => setStatus("connection error", "error");
}

async function onMessage(msg) {
  switch (msg.type) {
    case "joined": {
      state.me = msg.participant;
      state.participants.clear();
      for (const p of msg.room.participants) state.participants.set(p.id, p);
      renderParticipants();
      renderStages(msg.participant.stages);
      await startPeer();
      $("join").disabled = true; $("leave").disabled = false; $("mute").disabled = false; $("stages").disabled = false;
      setStatus(`in room ${msg.room.id}`, "connected");
      state.rejoins = 0; state.leaving = false;
      break;
    }
    case "answer":
      await state.pc.setRemoteDescription({ type: "answer", sdp: msg.sdp });
      break;
    case "offer": {
      for (const [mid, info] of Object.entries(msg.tracks || {})) state.tracks.set(mid, info);
      await state.pc.setRemoteDescription({ type: "offer", sdp: msg.sdp });
      const answer = await state.pc.createAnswer();
      await state.pc.setLocalDescription(answer);
      await waitIceGathering(state.pc);
      send({ type: "answer", sdp: state.pc.localDescription.sdp });
      break;
    }
    case "participant-joined":
    case "participant-updated":
      state.participants.set(msg.participant.id, msg.participant);
      if (state.me && msg.participant.id === state.me.id) renderStages(msg.participant.stages);
      renderParticipants();
      break;
    case "participant-left":
      state.participants.delete(msg.participant.id);
      renderParticipants();
      break;
    case "active-speaker":
      renderParticipants(msg.participant);
      break;
    case "stats":
      for (const s of msg.streams) state.serverStats.set(s.stream, s);
      break;
    case "error":
      showError(`${msg.code}: ${msg.message}`);
      break;
    case "bye":
      showError("server: " + (msg.reason || "bye"));
      break;
  }
}

async function startPeer() {
  const pc = new RTCPeerConnection({ iceServers: [] });
  state.pc = pc;
  const track = state.mic.getAudioTracks()[0];
  pc.addTransceiver(track, { direction: "sendrecv", streams: [state.mic] });
  pc.ontrack = (ev) => {
    const mid = ev.transceiver.mid;
    const audio = document.createElement("audio");
    audio.autoplay = true;
    audio.dataset.mid = mid;
    audio.srcObject = new MediaStream([ev.track]);
    $("audio").appendChild(audio);
    audio.play().catch(() => {});
  };
  const offer = await pc.createOffer();
  await pc.setLocalDescription(offer);
  await waitIceGathering(pc);
  send({ type: "offer", sdp: pc.localDescription.sdp });
  state.statsTimer = setInterval(updateStats, 1000);
}

function streamLabel(mid, direction) {
  if (direction === "out") return "my microphone";
  const info = state.tracks.get(mid);
  if (!info) return `mid ${mid}`;
  const p = state.participants.get(info.participant);
  return (p ? p.name : info.participant) + (info.synthetic ? " (synthetic)" : "");
}

function qualityText(server) {
  // the server's live quality estimate of the stream (docs/PROTOCOL.md, stats "quality"):
  // DNSMOS OVRL before -> after enhancement, estimated SNR before -> after, the word error rate of
  // the enhanced audio against the input (when the server samples intelligibility) and the rollout arm
  const q = server && server.quality;
  if (!q) return "";
  const parts = [];
  if (q.mos) parts.push(`OVRL ${q.mos.before.ovrl.toFixed(2)} \u2192 ${q.mos.after.ovrl.toFixed(2)}`);
  if (q.signals) parts.push(`SNR ${q.signals.before.snr_db.toFixed(0)} \u2192 ${q.signals.after.snr_db.toFixed(0)} dB`);
  if (q.wer) parts.push(`WER ${(q.wer.wer * 100).toFixed(0)} % of ${q.wer.words} words`);
  if (q.arm) parts.push(`arm ${q.arm}`);
  return parts.join(" / ");
}

async function updateStats() {
  if (!state.pc) return;
  const report = await state.pc.getStats();
  const rows = [];
  report.forEach((s) => {
    if (s.kind !== "audio" || (s.type !== "inbound-rtp" && s.type !== "outbound-rtp")) return;
    const out = s.type === "outbound-rtp";
    const bytes = out ? s.bytesSent : s.bytesReceived;
    const prev = state.lastBytes.get(s.id);
    state.lastBytes.set(s.id, [bytes, s.timestamp]);
    const kbps = prev ? ((bytes - prev[0]) * 8 / (s.timestamp - prev[1])).toFixed(1) : "";
    let server = null;
    if (out && state.me) server = state.serverStats.get(`${state.me.id}-mic`);
    if (!out) { const info = state.tracks.get(s.mid); if (info) server = state.serverStats.get(info.stream); }
    rows.push({
      label: streamLabel(s.mid, out ? "out" : "in"), direction: out ? "sent" : "received",
      packets: out ? s.packetsSent : s.packetsReceived, lost: out ? "" : s.packetsLost,
      jitter: out ? "" : ((s.jitter || 0) * 1000).toFixed(1),
      level: s.audioLevel !== undefined ? s.audioLevel.toFixed(3) : "", kbps,
      quality: qualityText(server),
      server: server ? [server.jitter_ms ?? "", server.lost ?? "", server.concealed_chunks ?? "", server.jitter_buffer_ms ?? "", server.server_latency_ms, server.e2e_latency_ms ?? "", server.vad].join(" / ") : "",
    });
  });
  const tbody = document.querySelector("#stats tbody");
  tbody.textContent = "";
  for (const r of rows) {
    const tr = document.createElement("tr");
    for (const v of [r.label, r.direction, r.packets, r.lost, r.jitter, r.level, r.kbps, r.server, r.quality]) {
      const td = document.createElement("td"); td.textContent = v ?? ""; tr.appendChild(td);
    }
    tbody.appendChild(tr);
  }
}

function teardown() {
  if (state.statsTimer) clearInterval(state.statsTimer);
  state.statsTimer = null;
  if (state.pc) state.pc.close();
  state.pc = null;
  if (state.mic) state.mic.getTracks().forEach((t) => t.stop());
  state.mic = null;
  state.participants.clear(); state.tracks.clear();
  $("audio").textContent = "";
  renderParticipants();
  $("join").disabled = false; $("leave").disabled = true; $("mute").disabled = true; $("stages").disabled = true;
}

$("join-form").addEventListener("submit", join);
$("leave").addEventListener("click", () => { state.leaving = true; send({ type: "leave" }); if (state.ws) state.ws.close(); });
$("mute").addEventListener("click", () => {
  state.muted = !state.muted;
  if (state.mic) state.mic.getAudioTracks().forEach((t) => { t.enabled = !state.muted; });
  $("mute").textContent = state.muted ? "Unmute" : "Mute";
  $("mute").setAttribute("aria-pressed", String(state.muted));
  send({ type: "mute", muted: state.muted });
});
$("stages").addEventListener("change", () => send({ type: "set-stages", stages: selectedStages() }));
const params = new URLSearchParams(location.search);
if (params.get("room")) $("room").value = params.get("room");
if (params.get("name")) $("name").value = params.get("name");
if (params.get("browserAec") === "0") $("browser-aec").checked = false;
