// reward-forcing live: receives JPEG frames over one WebSocket and plays them at the video's fps through a
// small jitter buffer. No build step, no dependencies. The server's protocol is documented in serve/app.py.
"use strict";

const $ = (id) => document.getElementById(id);
const canvas = $("screen");
const ctx = canvas.getContext("2d");
const token = new URLSearchParams(location.search).get("token");
const scheme = location.protocol === "https:" ? "wss" : "ws";
const ws = new WebSocket(`${scheme}://${location.host}/ws` + (token ? `?token=${encodeURIComponent(token)}` : ""));
ws.binaryType = "arraybuffer";

// State the page shows (and the browser tests read): window.app.
const app = window.app = {
  fps: 16, framesShown: 0, framesReceived: 0, lastShown: null, applied: [], errors: [], status: {},
  recording: null, paused: false, started: false,
};
const PREBUFFER = 4;  // frames buffered before playback (re)starts after running dry
const buffer = [];    // decoded frames waiting to be shown: {epoch, block, frame, frames, bitmap}
let playing = false;
let decoding = Promise.resolve();  // decode in arrival order

function send(message) { if (ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify(message)); }

function log(text, cls) {
  const li = document.createElement("li");
  li.textContent = text;
  if (cls) li.className = cls;
  $("log").prepend(li);
}

ws.onopen = () => { $("status").textContent = "connected"; };
ws.onclose = () => { $("status").textContent = "disconnected"; };

ws.onmessage = (event) => {
  if (typeof event.data === "string") { onMessage(JSON.parse(event.data)); return; }
  const view = new DataView(event.data);
  const tag = { epoch: view.getUint32(0, true), block: view.getUint32(4, true), frame: view.getUint32(8, true),
                frames: view.getUint32(12, true) };
  const blob = new Blob([event.data.slice(16)], { type: "image/jpeg" });
  app.framesReceived += 1;
  decoding = decoding.then(() => createImageBitmap(blob)).then((bitmap) => { tag.bitmap = bitmap; buffer.push(tag); });
};

function onMessage(msg) {
  switch (msg.type) {
    case "hello": {
      app.fps = msg.fps;
      app.maxUpload = msg.max_upload_bytes;
      canvas.width = msg.width; canvas.height = msg.height;
      $("policy").innerHTML = msg.policies.map((p) => `<option>${p}</option>`).join("");
      $("prompt").maxLength = msg.max_prompt_chars;
      if (msg.start_prompt) $("prompt").value = msg.start_prompt;  // e.g. the toy student's "red fast right"
      send({ type: "start", prompt: $("prompt").value, seed: Number($("seed").value) || 0 });
      app.started = true;
      break;
    }
    case "status": app.status = msg; showStatus(); break;
    case "applied":
      app.applied.push(msg);
      for (const e of msg.events) log(`block ${msg.block} (video ${msg.epoch}): ${describe(e)}`);
      break;
    case "paused": app.paused = msg.paused; $("pause").textContent = msg.paused ? "resume" : "pause"; break;
    case "recording":
      if (msg.on) { $("record").classList.add("on"); $("record").textContent = "stop recording"; break; }
      $("record").classList.remove("on"); $("record").textContent = "record";
      app.recording = msg;
      if (msg.url) {
        const a = $("download");
        a.href = msg.url + (token ? `?token=${encodeURIComponent(token)}` : "");
        a.download = msg.url.split("/").pop();
        a.textContent = `download recording (${msg.frames} frames)`;
        a.hidden = false;
      }
      break;
    case "notice": log(msg.message); break;
    case "busy": case "error":
      app.errors.push(msg.message);
      log(msg.message, "error");
      if (msg.type === "busy") $("status").textContent = msg.message;
      break;
  }
}

function describe(e) {
  if (e.kind === "SetPrompt") return `prompt "${e.text}" (${e.policy}${e.blend_blocks ? `, blend ${e.blend_blocks}` : ""})`;
  if (e.kind === "Reset") return "reset" + (e.text ? ` "${e.text}"` : "") + (e.image ? " from image" : "");
  if (e.kind === "SetSeed") return `seed ${e.seed}`;
  if (e.kind === "SetSinkAlpha") return `sink alpha ${e.alpha}`;
  return e.kind;
}

function showStatus() {
  const s = app.status;
  $("status").textContent = `generation ${s.generation_fps} fps · block ${s.block_ms} ms · queue ${s.queue} · ` +
    `drops ${s.drops} · shown ${app.framesShown} frames` + (s.paused ? " · paused" : "");
}

// The jitter buffer: one frame per tick at the video's fps; a block is acknowledged when it starts playing,
// which lets the server send the next one (it keeps at most a few blocks in flight).
let nextTick = performance.now();
function tick(now) {
  if (now >= nextTick) {
    nextTick = Math.max(nextTick + 1000 / app.fps, now - 1000 / app.fps);
    if (!playing && buffer.length >= PREBUFFER) playing = true;
    if (playing && buffer.length === 0) playing = false;
    if (playing) {
      const f = buffer.shift();
      ctx.drawImage(f.bitmap, 0, 0, canvas.width, canvas.height);
      f.bitmap.close();
      if (f.frame === 0) send({ type: "ack", block: f.block });
      app.framesShown += 1;
      app.lastShown = { epoch: f.epoch, block: f.block, frame: f.frame };
    }
  }
  requestAnimationFrame(tick);
}
requestAnimationFrame(tick);

$("prompt-form").addEventListener("submit", (e) => {
  e.preventDefault();
  send({ type: "prompt", text: $("prompt").value, policy: $("policy").value, blend: Number($("blend").value) || 0 });
});
$("apply-seed").onclick = () => send({ type: "seed", seed: Number($("seed").value) || 0 });
$("pause").onclick = () => send({ type: app.paused ? "resume" : "pause" });
$("reset").onclick = () => send({ type: "reset", prompt: $("prompt").value });
$("record").onclick = () => send({ type: "record", on: !$("record").classList.contains("on") });
$("image").onchange = async () => {
  const file = $("image").files[0];
  if (!file) return;
  if (file.size > app.maxUpload) { log(`the image has ${file.size} bytes; the limit is ${app.maxUpload}`, "error"); return; }
  ws.send(await file.arrayBuffer());
};
