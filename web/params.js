// What both pages read as typed: their options from the URL, and a prompt box's text (parsePrompt, below).
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
