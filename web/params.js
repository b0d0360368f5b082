// Page options from the URL, read as typed: URLSearchParams reads '+' as a space, and tokens (?token=, ?control=)
// are often base64, full of '+'. Percent escapes are decoded; a '%' that starts no escape (?token=50%off) stays,
// as the server's unquote() leaves it; a missing name gives null.
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
