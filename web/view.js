// turbostream viewer: shows the server's broadcast (turbostream serve --source ...) from /view/ws.
// ?control=<token> (the server's --control-token) shows a prompt box that changes the broadcast for everyone;
// ?token=<token> is passed on to /view/ws (servers started with --token). Both are read as typed ('+' stays '+').
// ?kiosk=1: only the frame, filling the window on black; no bar, badges, errors or controls; the last frame stays
// while it reconnects, quietly and for ever (OBS Browser Source, TouchDesigner Web Render TOP, projectors).

import { dropIfSilent, modelLine, parsePrompt, rawParam } from "./params.js";

const $ = (id) => document.getElementById(id);
const query = new URLSearchParams(location.search);
const control = rawParam("control");
const token = rawParam("token");
const kiosk = ["1", "true", "yes", ""].includes((query.get("kiosk") ?? "no").toLowerCase());
if (kiosk) document.documentElement.classList.add("kiosk");
// lastMessage: when the server last sent anything (it sends stats every stats_interval_s, so a long silence means a
// dead connection, which a page that never sends may not notice for many minutes).
const state = { conn: "connecting", ready: null, framesReceived: 0, framesDrawn: 0, framesSkipped: 0, times: [], errors: [],
  kiosk, lastMessage: 0 };
window.turbostream = state;
let backoff = 500;
let ws = null;
let waitingBlob = null; // the newest frame not drawn yet
let drawing = false;

function setConn(text, kind = "") {
  state.conn = text;
  $("conn").textContent = text;
  $("conn").className = "pill " + kind;
  document.body.dataset.state = kind || "connecting";
}

function showError(message) {
  state.errors.push(message);
  if (state.errors.length > 50) state.errors.shift(); // a kiosk runs for days
  if (kiosk) return;
  $("error-text").textContent = message;
  $("error").hidden = false;
}

function connect() {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const params = [["token", token], ["control", control]].filter(([, v]) => v);
  const search = params.map(([k, v]) => `${k}=${encodeURIComponent(v)}`).join("&");
  ws = new WebSocket(`${scheme}//${location.host}/view/ws` + (search ? `?${search}` : ""));
  ws.binaryType = "blob";
  setConn("connecting…");
  ws.onmessage = (event) => {
    state.lastMessage = performance.now();
    if (typeof event.data !== "string") return show(event.data);
    const msg = JSON.parse(event.data);
    if (msg.type === "ready") {
      state.ready = msg;
      backoff = 500;
      $("error").hidden = true;
      setConn("live", "ready");
      // Setting a canvas's size clears it: only when it changes, so a reconnect keeps the last frame up.
      if ($("output").width !== msg.width) $("output").width = msg.width;
      if ($("output").height !== msg.height) $("output").height = msg.height;
      $("model").textContent = modelLine(msg, " · random weights: noise, not a stylization");
      $("control").hidden = !msg.control || kiosk;
      loraControls(msg.control && msg.lora_live ? msg.loras : []);
      // A prompt being typed when the connection comes back stays as typed.
      if (document.activeElement !== $("prompt")) $("prompt").value = promptText(msg.params.prompt);
    } else if (msg.type === "config") {
      if (document.activeElement !== $("prompt")) $("prompt").value = promptText(msg.prompt);
    } else if (msg.type === "loras" && state.ready) {
      state.ready = { ...state.ready, loras: msg.loras }; // a LoRA's scale changed on the server (--lora-live)
      $("model").textContent = modelLine(state.ready, " · random weights: noise, not a stylization");
      showLoraScales(msg.loras);
    } else if (msg.type === "source") {
      // The broadcast's source: starting, live, reconnecting (a camera or URL that dropped out) or ended.
      state.source = msg.state;
      if (msg.state === "live") {
        $("error").hidden = true;
        setConn("live", "ready");
      } else {
        setConn(msg.state === "ended" ? "source ended" : `source ${msg.state}…`, msg.state === "ended" ? "bad" : "");
      }
    } else if (msg.type === "error") {
      showError(`${msg.message} (${msg.code})`);
    }
  };
  ws.onclose = (event) => closed(event.code, event.reason);
}

function closed(code, reason) {
  ws = null;
  state.ready = null;
  // Refused (no source, ...): the page says so and stops; a kiosk keeps trying, slowly (the server may restart).
  if (code === 1008 && !kiosk) return setConn("refused: " + (reason || "policy"), "bad");
  if (code === 1008) backoff = 10000;
  setConn(`reconnecting${reason ? ` (${reason})` : ""}…`, "bad");
  setTimeout(connect, backoff * (0.75 + Math.random() * 0.5));
  backoff = Math.min(10000, backoff * 2);
}

setInterval(() => dropIfSilent(ws, state.ready, state.lastMessage, closed), 1000);

// A blend of prompts ([[text, weight], ...]) shows as its JSON, and text starting with "[" goes as JSON (as on the
// client page): the box round-trips a blend instead of flattening it to "a,0.7,b,0.3".
function promptText(prompt) {
  return typeof prompt === "string" ? prompt : JSON.stringify(prompt);
}


// Latest wins: one frame waits to be drawn at most, and a newer one replaces it. A screen that draws more slowly than
// the broadcast arrives (a weak kiosk machine) skips frames instead of queueing them: no growing backlog in memory,
// no picture falling further and further behind.
function show(blob) {
  state.framesReceived++;
  state.times.push(performance.now());
  if (waitingBlob !== null) state.framesSkipped++;
  waitingBlob = blob;
  if (!drawing) drawNewest();
}

async function drawNewest() {
  drawing = true;
  while (waitingBlob !== null) {
    const blob = waitingBlob;
    waitingBlob = null;
    try {
      const bitmap = await createImageBitmap(blob);
      $("output").getContext("2d").drawImage(bitmap, 0, 0, $("output").width, $("output").height);
      bitmap.close();
      state.framesDrawn++;
      document.body.dataset.frames = String(state.framesReceived);
    } catch {
      // a frame that does not decode: the next one will
    }
  }
  drawing = false;
}

// --lora-live, with the control token: a slider per LoRA. It changes the model, so every stream on the server; a drag
// sends its newest value at most every LORA_SEND_MS (the server applies the last one before its next frame anyway).
const LORA_SEND_MS = 50;
const loraPending = new Map(); // LoRA number -> scale not sent yet
let loraTimer = null;

function loraControls(loras) {
  const box = $("lora-controls");
  box.replaceChildren(
    ...loras.map((lora, i) => {
      const label = document.createElement("label");
      const slider = Object.assign(document.createElement("input"), {
        type: "range", min: "-1", max: "2", step: "0.05", value: String(lora.scale), id: `lora-${i + 1}`,
      });
      const shown = Object.assign(document.createElement("output"), { id: `lora-${i + 1}-scale` });
      shown.textContent = String(lora.scale);
      slider.oninput = () => {
        shown.textContent = slider.value;
        loraPending.set(i + 1, Number(slider.value));
        if (loraTimer === null) loraTimer = setTimeout(sendLoraScales, LORA_SEND_MS);
      };
      label.append(`LoRA ${lora.name} `, slider, shown);
      return label;
    }),
  );
  box.hidden = loras.length === 0;
}

function sendLoraScales() {
  loraTimer = null;
  if (!ws || ws.readyState !== WebSocket.OPEN) return;
  for (const [lora, scale] of loraPending) ws.send(JSON.stringify({ type: "lora", lora, scale }));
  loraPending.clear();
}

function showLoraScales(loras) {
  loras.forEach((lora, i) => {
    const slider = $(`lora-${i + 1}`);
    if (!slider || document.activeElement === slider) return; // the one being dragged shows its own value
    slider.value = String(lora.scale);
    $(`lora-${i + 1}-scale`).textContent = String(lora.scale);
  });
}

$("control").onsubmit = (event) => {
  event.preventDefault();
  if (ws && ws.readyState === WebSocket.OPEN) {
    ws.send(JSON.stringify({ type: "config", prompt: parsePrompt($("prompt").value) }));
  }
};
document.querySelector(".viewer-stage").ondblclick = () =>
  document.fullscreenElement ? document.exitFullscreen() : document.documentElement.requestFullscreen();

setInterval(() => {
  const now = performance.now();
  state.times = state.times.filter((t) => now - t < 2000);
  $("fps").textContent = (state.times.length / 2).toFixed(1);
}, 500);

connect();
