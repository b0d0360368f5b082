// turbostream browser client: camera or screen -> JPEG frames over /ws -> stylized frames back.
//
// Flow control: at most `inflight` frames (1 or 2; ?inflight=N) are unanswered at a time; the next frame goes when a
// result arrives. Before each result the server sends {"type": "frame", "seq": n}: frames are numbered 1, 2, ... in
// send order, so n answers frame n, and unanswered frames below n were dropped by the server (a newer one replaced
// them). Page options: ?autostart=1 (camera and stream without a click), ?token=... (servers started with --token),
// ?inflight=1|2, ?quality=0.5..0.95 (JPEG quality of the frames sent).

import { dropIfSilent, modelLine, parsePrompt, rawParam } from "./params.js";

const $ = (id) => document.getElementById(id);
const query = new URLSearchParams(location.search);
const TOKEN = rawParam("token");
const INFLIGHT = Math.min(2, Math.max(1, Number(query.get("inflight")) || 2));
const QUALITY = Math.min(0.95, Math.max(0.5, Number(query.get("quality")) || 0.8));
const DEBOUNCE_MS = 350;
// The server answers every frame or numbers past it, so unanswered frames are still on their way (a slow link) and
// sending more would only queue them behind: only after this long, with every byte sent, are they counted as lost.
const WATCHDOG_MS = 30000;
const BACKOFF_MIN_MS = 500;
const BACKOFF_MAX_MS = 10000;
const STABLE_MS = 10000; // a connection up this long after ready starts the next reconnect's backoff afresh
const MIN_QUALITY = 0.3; // frames over the server's size limit are sent at lower JPEG quality, down to this

// What the page knows; also exposed as window.turbostream for kiosks, tests and the curious.
const state = {
  conn: "connecting",
  ready: null, // the server's ready message
  params: null, // the parameters the server confirmed last (ready's, then each config echo's)
  media: null, // MediaStream being sent
  seq: 0, // frames sent on this connection
  sent: new Map(), // seq -> send time (ms) of frames not answered yet
  encoding: false,
  newFrame: true,
  lastAnswer: 0,
  lastMessage: 0, // when the server last sent anything: it sends stats every stats_interval_s, so silence means a
  // dead connection (a Wi-Fi switch, an expired NAT entry), which the browser may not notice for minutes
  readyAt: 0,
  quality: QUALITY, // the JPEG quality frames are sent at (lowered for a server with a small message limit)
  framesSent: 0,
  framesReceived: 0,
  dropped: 0,
  skipped: 0, // answers the server marked skipped: the input was similar enough to reuse the last output
  rtt: [],
  resultTimes: [],
  errors: [],
};
window.turbostream = state;

let ws = null;
let backoff = BACKOFF_MIN_MS;
let reconnectTimer = null;
let pendingHeader = null;
let drawChain = Promise.resolve();
let promptSent = null; // the prompt last typed, until the server confirms it
// The user's changes outlive a reconnect (a new connection starts from the server's defaults). chosen: the fields the
// user changed, at the values the server confirmed (null: none; the server's defaults for every other field, so a
// server restarted with other defaults or options keeps its own for what the user never touched); unsent: changes
// made while not connected, and those a dropped connection took with it before the server answered them; awaiting:
// the config messages sent on this connection, oldest first, until the server answers each (an echo or bad_config).
let chosen = null;
let unsent = {};
let awaiting = [];
let mediaRequest = 0; // counts camera and screen requests: a stream that arrives after a newer one is not wanted

// ---------------------------------------------------------------- status and errors

function setConn(text, kind = "") {
  state.conn = text;
  const pill = $("conn");
  pill.textContent = text;
  pill.className = "pill " + kind;
  document.body.dataset.state = kind || "connecting";
}

let errorTimer = null;
function showError(message) {
  if (state.errors[state.errors.length - 1] === message && !$("error").hidden) return; // shown already
  state.errors.push(message);
  if (state.errors.length > 50) state.errors.shift();
  $("error-text").textContent = message;
  $("error").hidden = false;
  clearTimeout(errorTimer);
  errorTimer = setTimeout(() => ($("error").hidden = true), 8000);
}
$("error-close").onclick = () => ($("error").hidden = true);

// ---------------------------------------------------------------- connection

function wsUrl() {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  return `${scheme}//${location.host}/ws` + (TOKEN ? `?token=${encodeURIComponent(TOKEN)}` : "");
}

function connect() {
  clearTimeout(reconnectTimer);
  setConn("connecting…");
  ws = new WebSocket(wsUrl());
  ws.binaryType = "blob";
  ws.onopen = () => setConn("waiting for the engine…");
  ws.onmessage = (event) => {
    state.lastMessage = performance.now();
    return typeof event.data === "string" ? onText(event.data) : onImage(event.data);
  };
  ws.onclose = (event) => closed(event.code, event.reason);
}

setInterval(() => dropIfSilent(ws, state.ready, state.lastMessage, closed), 1000);

// The connection ended (code and reason as the close frame gave them); reconnect unless refused for good.
function closed(code, reason) {
  ws = null;
  state.ready = null;
  state.sent.clear();
  state.encoding = false;
  pendingHeader = null; // its result went with the connection
  // Changes the server never answered: send them again, with those made meanwhile, when the next one is ready.
  unsent = Object.assign({}, ...awaiting.filter((a) => !a.resend).map((a) => a.fields), unsent);
  awaiting = [];
  updateButtons();
  // 1008: wrong token or nothing to do here; reconnecting would only repeat it.
  if (code === 1008) {
    setConn("refused: " + (reason || "policy"), "bad");
    return;
  }
  // A connection that lasted starts the backoff afresh; one closed soon after ready (a frame over the server's
  // size limit, say) backs off further each time instead of looping every half second.
  if (state.readyAt && performance.now() - state.readyAt >= STABLE_MS) backoff = BACKOFF_MIN_MS;
  state.readyAt = 0;
  const why = code === 1013 ? "server full" : code === 1001 ? "server went away" : "disconnected";
  const delay = Math.round(backoff * (0.75 + Math.random() * 0.5));
  setConn(`${why}${reason ? ` (${reason})` : ""}; retrying in ${(delay / 1000).toFixed(1)} s`, "bad");
  reconnectTimer = setTimeout(connect, delay);
  backoff = Math.min(BACKOFF_MAX_MS, backoff * 2);
}

function onText(text) {
  let msg;
  try {
    msg = JSON.parse(text);
  } catch {
    return;
  }
  switch (msg.type) {
    case "ready":
      state.ready = msg;
      state.seq = 0;
      state.sent.clear();
      state.readyAt = performance.now();
      setConn("ready", "ready");
      $("model").textContent = modelLine(msg, " · random weights (noise)");
      // Setting a canvas's size clears it: only when it changes, so a reconnect keeps the last result up.
      for (const id of ["output", "capture"]) {
        if ($(id).width !== msg.width) $(id).width = msg.width;
        if ($(id).height !== msg.height) $(id).height = msg.height;
      }
      $("steps").max = msg.limits.max_steps;
      $("reuse").disabled = msg.limits.feature_reuse === false; // the server was started without --reuse N
      state.params = { ...msg.params };
      resendChoices();
      updateButtons();
      // The frame in flight went with the old connection; a still screen delivers no new one, so send it again.
      state.newFrame = true;
      pump();
      break;
    case "config": {
      const answered = awaiting.shift();
      state.params = { ...msg };
      delete state.params.type;
      if (answered) {
        // Only what this message set: a field the user never touched follows the server's default.
        const set = Object.fromEntries(Object.keys(answered.fields).map((k) => [k, state.params[k]]));
        chosen = { ...chosen, ...set };
      }
      showParams(state.params);
      state.newFrame = true; // a still screen gets restyled too
      pump();
      break;
    }
    case "loras":
      // A LoRA's scale changed on the server (--lora-live): every stream's pictures change from the next frame.
      if (state.ready) {
        state.ready = { ...state.ready, loras: msg.loras };
        $("model").textContent = modelLine(state.ready, " · random weights (noise)");
      }
      state.newFrame = true; // a still screen gets restyled too
      pump();
      break;
    case "frame":
      pendingHeader = msg;
      break;
    case "stats":
      $("server-stats").textContent =
        `server: ${msg.fps.toFixed(1)} frames/s` +
        (msg.latency_ms.p50 != null ? `, ${msg.latency_ms.p50.toFixed(0)} ms p50` : "") +
        `, ${msg.dropped} dropped, ${msg.clients} client${msg.clients === 1 ? "" : "s"}` +
        (state.skipped ? `, ${state.skipped} skipped` : "");
      break;
    case "error":
      showError(`${msg.message} (${msg.code})`);
      if (msg.code === "bad_config") {
        // Refused: the server kept its parameters; the controls show them again. A refused resend after a reconnect
        // (a server restarted with other options: reuse on one without --reuse) drops those choices alone: the server
        // keeps its defaults for them, and the others, sent on their own, still hold.
        const refused = awaiting.shift();
        if (refused?.resend && chosen) {
          for (const field of Object.keys(refused.fields)) delete chosen[field];
          if (!Object.keys(chosen).length) chosen = null;
        }
        promptSent = null;
        if (state.params) showParams(state.params, true);
      }
      // This frame gets no result: stop waiting for it.
      if (msg.seq !== undefined) state.sent.delete(msg.seq);
      pump();
      break;
  }
}

// ---------------------------------------------------------------- results

function onImage(blob) {
  const now = performance.now();
  const header = pendingHeader;
  pendingHeader = null;
  if (header) {
    if (header.skipped) state.skipped++;
    const t = state.sent.get(header.seq);
    if (t !== undefined) {
      state.rtt.push(now - t);
      if (state.rtt.length > 30) state.rtt.shift();
    }
    for (const seq of [...state.sent.keys()]) {
      if (seq < header.seq) state.dropped++;
      if (seq <= header.seq) state.sent.delete(seq);
    }
  } else {
    forgetOldest();
  }
  state.framesReceived++;
  state.lastAnswer = now;
  state.resultTimes.push(now);
  // Decode off the main thread, draw in arrival order.
  drawChain = drawChain
    .then(() => createImageBitmap(blob))
    .then((bitmap) => {
      const canvas = $("output");
      canvas.getContext("2d").drawImage(bitmap, 0, 0, canvas.width, canvas.height);
      bitmap.close();
      document.body.dataset.frames = String(state.framesReceived);
      $("snapshot").disabled = false;
    })
    .catch((err) => showError("could not show a result: " + err));
  pump();
}

function forgetOldest() {
  const oldest = Math.min(...state.sent.keys());
  if (Number.isFinite(oldest)) state.sent.delete(oldest);
}

// ---------------------------------------------------------------- sending frames

const video = $("video");
// Send only frames the camera has not delivered before (a still screen share is not resent over and over).
if ("requestVideoFrameCallback" in HTMLVideoElement.prototype) {
  let handle = null;
  const onVideoFrame = () => {
    state.newFrame = true;
    pump();
    handle = video.requestVideoFrameCallback(onVideoFrame);
  };
  // A new source restarts the chain; cancelling first keeps it to one chain.
  video.addEventListener("loadeddata", () => {
    if (handle !== null) video.cancelVideoFrameCallback(handle);
    handle = video.requestVideoFrameCallback(onVideoFrame);
  });
}

function pump() {
  if (!ws || ws.readyState !== WebSocket.OPEN || !state.ready || !state.media || state.encoding) return;
  if (state.sent.size >= INFLIGHT || !video.videoWidth || !state.newFrame) return;
  state.encoding = true;
  state.newFrame = !("requestVideoFrameCallback" in video);
  const canvas = $("capture");
  const { width, height } = canvas;
  // Center-crop the video to the engine's aspect; the server gets exactly the engine's size.
  const vw = video.videoWidth, vh = video.videoHeight;
  const scale = Math.min(vw / width, vh / height);
  const sw = width * scale, sh = height * scale;
  canvas.getContext("2d").drawImage(video, (vw - sw) / 2, (vh - sh) / 2, sw, sh, 0, 0, width, height);
  const socket = ws;
  canvas.toBlob(
    (blob) => {
      state.encoding = false;
      if (!blob || socket !== ws || socket.readyState !== WebSocket.OPEN) return;
      const limit = state.ready && state.ready.limits && state.ready.limits.max_message_bytes;
      if (limit && blob.size > limit) {
        // Sent, it would close the connection (1009) and every frame after it the next one: lower the quality.
        if (state.quality > MIN_QUALITY) {
          state.quality = Math.max(MIN_QUALITY, state.quality - 0.1);
        } else {
          showError(`frames are ${blob.size} bytes even at JPEG quality ${MIN_QUALITY}, over this server's limit ` +
            `of ${limit} (--max-message-bytes)`);
        }
        state.newFrame = true;
        setTimeout(pump, 100);
        return;
      }
      state.seq++;
      state.sent.set(state.seq, performance.now());
      state.framesSent++;
      socket.send(blob);
      pump();
    },
    "image/jpeg",
    state.quality,
  );
}

// Frames the server dropped silently (none should be: it always answers or numbers past them) or lost to a
// hiccup must not stall the stream.
setInterval(() => {
  if (state.sent.size && ws && ws.bufferedAmount === 0 &&
      performance.now() - Math.max(state.lastAnswer, ...state.sent.values()) > WATCHDOG_MS) {
    state.sent.clear();
    pump();
  }
}, 1000);

async function startMedia(kind) {
  stopMedia();
  const request = mediaRequest;
  const md = navigator.mediaDevices;
  if (!md || !(kind === "screen" ? md.getDisplayMedia : md.getUserMedia)) {
    showError("this browser gives no camera or screen here: use https, or http://localhost / 127.0.0.1");
    return;
  }
  try {
    const media =
      kind === "screen"
        ? await md.getDisplayMedia({ video: { frameRate: 30 }, audio: false })
        : await md.getUserMedia({
            video: { width: { ideal: 1280 }, height: { ideal: 720 }, facingMode: "user" },
            audio: false,
          });
    // Asked again (a double click, Camera while the screen picker is open) or stopped while asking: the newer
    // request wins, and this stream must not stay live unseen.
    if (request !== mediaRequest) {
      media.getTracks().forEach((t) => t.stop());
      return;
    }
    state.media = media;
    video.srcObject = media;
    // A track that ends (the browser's "stop sharing", a camera unplugged) ends its own stream, not a newer one.
    media.getVideoTracks().forEach((track) => (track.onended = () => state.media === media && stopMedia()));
    await video.play().catch(() => {});
    if (request !== mediaRequest) return; // replaced or stopped meanwhile: stopMedia took care of this stream
    $("in-empty").hidden = true;
    state.newFrame = true;
    updateButtons();
    pump();
  } catch (err) {
    if (request !== mediaRequest) return; // a request given up on; the newer one reports for itself
    const name = err && err.name;
    const why =
      name === "NotAllowedError" ? "permission denied" :
      name === "NotFoundError" ? (kind === "screen" ? "nothing to share" : "no camera found") :
      name === "NotReadableError" ? "the camera is in use by another program" : String(err);
    const message = `${kind === "screen" ? "screen sharing" : "camera"}: ${why}`;
    showError(message);
    // Kept in the input pane (the banner goes after a few seconds), with what to do about it.
    $("in-empty").textContent = message + (name === "NotAllowedError"
      ? ": allow it in the browser's site settings, then try again" : "");
  }
}

function stopMedia() {
  mediaRequest++; // a camera or screen still being asked for is not wanted any more
  if (state.media) state.media.getTracks().forEach((t) => t.stop());
  state.media = null;
  video.srcObject = null;
  $("in-empty").textContent = "Start the camera or share a screen.";
  $("in-empty").hidden = false;
  updateButtons();
}

function updateButtons() {
  $("stop").disabled = !state.media;
}

// ---------------------------------------------------------------- parameters

function showParams(p, force = false) {
  // A blend of two prompts shows as prompt, "blend with" and mix; any other blend as its JSON in the prompt box. A
  // prompt that is no two-prompt blend leaves "blend with" as it is, at mix 0: the slider dragged through 0 and back
  // blends with it again.
  let [a, b, mix] = [p.prompt, $("prompt-b").value, 0];
  if (Array.isArray(p.prompt)) {
    const total = p.prompt.reduce((sum, [, w]) => sum + w, 0);
    if (p.prompt.length === 1) a = p.prompt[0][0];
    else if (p.prompt.length === 2) [a, b, mix] = [p.prompt[0][0], p.prompt[1][0], p.prompt[1][1] / total];
    else a = JSON.stringify(p.prompt);
  }
  // A prompt typed but not confirmed yet stays as typed (an echo of an older change may arrive first).
  if (promptSent === null || JSON.stringify(promptSent) === JSON.stringify(p.prompt)) {
    promptSent = null;
    if (document.activeElement !== $("prompt")) $("prompt").value = a;
    if (document.activeElement !== $("prompt-b")) $("prompt-b").value = b;
    $("mix").value = mix;
    $("mix-value").textContent = Number(mix).toFixed(2);
  }
  const sim = String(p.similarity ?? 0);
  if (![...$("similarity").options].some((o) => o.value === sim)) $("similarity").add(new Option(sim, sim));
  setField("similarity", sim, force);
  setField("transition", p.transition_s ?? 0, force);
  setField("feedback", p.feedback ?? 0, force);
  showValue("feedback", p.feedback ?? 0, force);
  const reuse = String(p.reuse ?? 0);
  if (![...$("reuse").options].some((o) => o.value === reuse)) $("reuse").add(new Option(`every ${reuse}`, reuse));
  setField("reuse", reuse, force);
  // The server refuses steps x strength under 1 (no UNet evaluation would run): neither control offers it. The
  // minimums go first: a slider clamps its value to its minimum, and the old one may be above the new value.
  $("strength").min = strengthMin(p.steps);
  $("steps").min = stepsMin(p.strength);
  setField("strength", p.strength, force);
  showValue("strength", p.strength, force);
  setField("steps", p.steps, force);
  setField("seed", p.seed, force);
}

// The least strength on the slider's 0.05 grid with int(steps * strength) >= 1, as the server computes it.
function strengthMin(steps) {
  let min = Math.ceil(20 / steps) / 20;
  while (Math.floor(steps * min) < 1 && min < 1) min = Math.round(min * 20 + 1) / 20;
  return String(Math.min(1, min));
}

// The fewest steps with int(steps * strength) >= 1.
function stepsMin(strength) {
  let min = Math.max(1, Math.ceil(1 / strength));
  while (Math.floor(min * strength) < 1) min++;
  return String(min);
}

// A control the user is in (typing a number, dragging a slider) keeps what they put there: the echo of another
// change arriving meanwhile would otherwise overwrite it, and their change would then send the old value. A refused
// change (bad_config) puts the server's values back everywhere (force).
function setField(id, value, force = false) {
  if (force || document.activeElement !== $(id)) $(id).value = value;
}

// A slider's label shows the value in force, not the slider's: a slider snaps to its step (0.34 shows as 0.35),
// and a server started with another value than the grid has (--strength 0.34) runs at that value.
function showValue(id, value, force = false) {
  const shown = force || document.activeElement !== $(id) ? value : $(id).value;
  $(`${id}-value`).textContent = Number(shown).toFixed(2);
}

// The choices a reconnect sends again, each group in a message of its own. Steps and strength go together: the server
// refuses steps x strength under 1, and either alone may not fit the new server's default for the other.
const RESEND_GROUPS = [["prompt"], ["seed"], ["steps", "strength"], ["similarity"], ["transition_s"], ["feedback"],
  ["reuse"]];

// A connection starts from the server's defaults: what the user chose before a reconnect goes again, one group of
// fields a message (a server restarted with other options that refuses one keeps the others), then what they changed
// since, in a message of its own (a refused change then leaves the earlier choices in place).
function resendChoices() {
  const changes = unsent;
  unsent = {};
  showParams({ ...state.params, ...chosen, ...changes });
  if (chosen) {
    const rest = { ...chosen };
    for (const group of RESEND_GROUPS) {
      const fields = Object.fromEntries(group.filter((k) => k in rest).map((k) => [k, rest[k]]));
      group.forEach((k) => delete rest[k]);
      if (Object.keys(fields).length) sendConfig(fields, true);
    }
    if (Object.keys(rest).length) sendConfig(rest, true);
  }
  if (Object.keys(changes).length) sendConfig(changes);
}

// A change made while not connected (or before the engine is ready) goes with the config sent on ready.
function sendConfig(fields, resend = false) {
  if (ws && ws.readyState === WebSocket.OPEN && state.ready) {
    ws.send(JSON.stringify({ type: "config", ...fields }));
    awaiting.push({ fields, resend });
  } else {
    Object.assign(unsent, fields);
  }
}

function debounce(fn, ms) {
  let timer = null;
  return (...args) => {
    clearTimeout(timer);
    timer = setTimeout(() => fn(...args), ms);
  };
}

// The prompt as the server takes it: the text, a [[text, weight], ...] blend typed as JSON, or the text blended with
// "blend with" by the mix slider.
function promptValue() {
  const a = $("prompt").value, b = $("prompt-b").value.trim(), mix = Number($("mix").value);
  if (a.trim().startsWith("[")) return parsePrompt(a);
  return b && mix > 0 ? [[a, 1 - mix], [b, mix]] : a;
}
// Debounced sends take the value at input time: a config echo arriving meanwhile redraws the controls.
const sendPrompt = debounce((prompt) => sendConfig({ prompt }), DEBOUNCE_MS);
const onPromptInput = () => sendPrompt((promptSent = promptValue()));
$("prompt-b").addEventListener("input", onPromptInput);
$("mix").addEventListener("input", () => {
  $("mix-value").textContent = Number($("mix").value).toFixed(2);
  onPromptInput();
});
$("similarity").addEventListener("change", () => sendConfig({ similarity: Number($("similarity").value) }));
// The number fields: (field id, parameter, whole numbers only). One emptied (or holding what is no number: its value
// is then "") sends nothing, and shows the value in force again; Number("") would be 0, a value the user never typed.
for (const [id, field, whole] of [["transition", "transition_s", false], ["steps", "steps", true],
  ["seed", "seed", true]]) {
  $(id).addEventListener("change", () => {
    const text = $(id).value.trim();
    if (text !== "" && Number.isFinite(Number(text))) {
      sendConfig({ [field]: whole ? Math.round(Number(text)) : Number(text) });
      return;
    }
    const known = { ...state.params, ...unsent };
    if (field in known) setField(id, known[field], true);
  });
}
$("reuse").addEventListener("change", () => sendConfig({ reuse: Number($("reuse").value) }));
const sendFeedback = debounce((feedback) => sendConfig({ feedback }), 150);
$("feedback").addEventListener("input", () => {
  $("feedback-value").textContent = Number($("feedback").value).toFixed(2);
  sendFeedback(Number($("feedback").value));
});
const sendStrength = debounce(() => sendConfig({ strength: Number($("strength").value) }), 150);
$("prompt").addEventListener("input", onPromptInput);
$("strength").addEventListener("input", () => {
  $("strength-value").textContent = Number($("strength").value).toFixed(2);
  sendStrength();
});
$("dice").onclick = () => sendConfig({ seed: Math.floor(Math.random() * 2 ** 31) });

// ---------------------------------------------------------------- buttons

$("camera").onclick = () => startMedia("camera");
$("screen").onclick = () => startMedia("screen");
$("stop").onclick = stopMedia;
$("layout").onclick = () => {
  const stage = $("stage");
  const outputOnly = stage.classList.toggle("output-only");
  stage.classList.toggle("side-by-side", !outputOnly);
  $("layout").textContent = outputOnly ? "Side by side" : "Output only";
  $("layout").setAttribute("aria-pressed", String(outputOnly));
};
$("snapshot").onclick = () => {
  $("output").toBlob((blob) => {
    if (!blob) return;
    const a = document.createElement("a");
    a.href = URL.createObjectURL(blob);
    a.download = `turbostream-${new Date().toISOString().replace(/[:.]/g, "-")}.png`;
    a.click();
    setTimeout(() => URL.revokeObjectURL(a.href), 1000);
  }, "image/png");
};
if (!navigator.mediaDevices || !navigator.mediaDevices.getDisplayMedia) $("screen").disabled = true;

// ---------------------------------------------------------------- live numbers

setInterval(() => {
  const now = performance.now();
  state.resultTimes = state.resultTimes.filter((t) => now - t < 2000);
  const fps = state.resultTimes.length / 2;
  $("fps").textContent = fps.toFixed(1);
  const sorted = [...state.rtt].sort((a, b) => a - b);
  $("rtt").textContent = sorted.length ? sorted[Math.floor(sorted.length / 2)].toFixed(0) : "–";
}, 500);

connect();
if (query.get("autostart") === "1") startMedia("camera");
