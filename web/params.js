// Page options from the URL, read as typed: URLSearchParams reads '+' as a space, and tokens (?token=, ?control=)
// are often base64, full of '+'. Percent escapes are decoded; a missing name gives null.
export function rawParam(name) {
  for (const part of location.search.slice(1).split("&")) {
    const [key, ...value] = part.split("=");
    if (decodeURIComponent(key) === name) return decodeURIComponent(value.join("="));
  }
  return null;
}
