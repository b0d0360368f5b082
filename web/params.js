// What both pages share: their options from the URL and a prompt box's text read as typed (parsePrompt, below), and
// how they tell a dead connection (dropIfSilent).
// URL options are read as typed: URLSearchParams reads '+' as a space, and tokens (?token=, ?control=) are often
// base64, full of '+'. Percent escapes are decoded; a '%' that starts no escape (?token=50%off) stays, as the
// server's unquote() leaves it; a missing name gives null.
function decode(text) {
  // Run by run of escapes: decodeURIComponent throws URIError on the whole text for one bad escape.
  return text.replace(/(%[0-9a-fA-F]{2})+/g, (run) => {
    try {
      return decodeURIComponent(run);
    } catch {
      return run; // not UTF-8
    }
  });
}

// The header's model line: model, size, the LoRAs merged into it (--lora: name and scale), and randomNote when the
// weights are random.
export function modelLine(ready, randomNote) {
  const loras = (ready.loras || []).map((l) => ` · LoRA ${l.name} ${l.scale}`).join("");
  return `${ready.model} · ${ready.width}×${ready.height}${loras}` + (ready.random_weights ? randomNote : "");
}

// A connection the server has gone silent on is dead (a Wi-Fi switch, an expired NAT entry), though the browser may
// not notice for minutes: the server sends stats every stats_interval_s (ready says how often), so after ten of them
// (10 s at least: a result frame on a slow link takes seconds to arrive) without any message, dropIfSilent drops the
// socket without waiting for a close handshake that cannot complete, and reports it to closed(code, reason).
export function dropIfSilent(ws, ready, lastMessage, closed) {
  const limit = Math.max(10000, 10000 * ((ready && ready.stats_interval_s) || 1));
  if (!ws || !ready || performance.now() - lastMessage <= limit) return;
  ws.onclose = ws.onmessage = null;
  ws.close();
  closed(1006, `no message from the server for ${Math.round(limit / 1000)} s`);
}

export function rawParam(name) {
  for (const part of location.search.slice(1).split("&")) {
    const [key, ...value] = part.split("=");
    if (decode(key) === name) return decode(value.join("="));
  }
  return null;
}

// A prompt box's text as the prompt to send: a blend ([[text, weight], ...]) when it starts with "[" and parses as
// JSON, the text itself otherwise (the server then takes it as written).
export function parsePrompt(text) {
  if (text.trim().startsWith("[")) {
    try {
      return JSON.parse(text);
    } catch {
      return text;
    }
  }
  return text;
}
