'use strict';
// Verifies the webhooks key-authority sends, for the receiving side. Only node:crypto is needed,
// so a receiver can require this file without loading gRPC.
//
// key-authority POSTs each key event to a webhook's URL as JSON, signed as Standard Webhooks
// specifies: `webhook-id` is the event's id (the same on every retry, so a receiver can drop
// duplicates), `webhook-timestamp` the Unix time of the attempt in seconds, and
// `webhook-signature` one or more space-separated `v1,<base64>` entries, each the HMAC-SHA256 of
// `${webhook-id}.${webhook-timestamp}.${body}` keyed with the webhook's signing secret (the bytes
// after `whsec_`, base64-decoded).

const crypto = require('node:crypto');

// The prefix of a signing secret as CreateWebhook returns it.
const WEBHOOK_SECRET_PREFIX = 'whsec_';
// How far webhook-timestamp may be from now, either way, by default (5 minutes).
const DEFAULT_WEBHOOK_TOLERANCE_SECONDS = 300;
const HEADER_NAMES = ['webhook-id', 'webhook-timestamp', 'webhook-signature'];
const BASE64 = /^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$/;

/**
 * A webhook request that must not be trusted: a header missing or malformed, a timestamp outside
 * the tolerance, no signature matching the secret, or a body that is not JSON. The message says
 * which; answer such a request with a 4xx status and do not act on it.
 */
class WebhookVerificationError extends Error {
  constructor(message) {
    super(message);
    this.name = 'WebhookVerificationError';
  }
}

function decodeBase64(text) {
  return BASE64.test(text) ? Buffer.from(text, 'base64') : null;
}

function signingKey(secret) {
  if (typeof secret !== 'string') throw new TypeError('the signing secret must be a string');
  const encoded = secret.startsWith(WEBHOOK_SECRET_PREFIX)
    ? secret.slice(WEBHOOK_SECRET_PREFIX.length)
    : secret;
  const key = decodeBase64(encoded);
  if (key === null) throw new TypeError('the signing secret is not whsec_ followed by base64');
  if (key.length === 0) throw new TypeError('the signing secret is empty');
  return key;
}

// One header's value from a plain object (node:http's request.headers: lowercase names, a
// string or an array of strings) or a fetch Headers (anything with get()).
function header(headers, name) {
  let value;
  if (headers && typeof headers.get === 'function') {
    value = headers.get(name);
  } else {
    const found = Object.keys(headers || {}).find((key) => key.toLowerCase() === name);
    value = found === undefined ? undefined : headers[found];
  }
  if (Array.isArray(value)) value = value.join(' ');
  if (value === undefined || value === null || String(value).trim() === '') {
    throw new WebhookVerificationError(`the ${name} header is missing`);
  }
  return String(value).trim();
}

function checkTimestamp(text, toleranceSeconds, nowSeconds) {
  // Unix seconds as ASCII digits only: no sign, fraction, exponent or spaces, so that the signed
  // text is the one the sender meant.
  if (!/^[0-9]{1,15}$/.test(text)) {
    throw new WebhookVerificationError('the webhook-timestamp header is not Unix seconds');
  }
  const offset = Number(text) - nowSeconds;
  const beyond = `beyond the ${toleranceSeconds} s tolerance`;
  if (offset < -toleranceSeconds) {
    const message = `the webhook-timestamp is ${Math.round(-offset)} s old, ${beyond}`;
    throw new WebhookVerificationError(message);
  }
  if (offset > toleranceSeconds) {
    const message = `the webhook-timestamp is ${Math.round(offset)} s ahead, ${beyond}`;
    throw new WebhookVerificationError(message);
  }
}

// The decoded v1 signatures of the header; entries of other versions (such as v1a) or
// undecodable ones are skipped.
function v1Signatures(text) {
  const decoded = [];
  for (const entry of text.split(/\s+/)) {
    const comma = entry.indexOf(',');
    if (comma < 0 || entry.slice(0, comma) !== 'v1') continue;
    const signature = decodeBase64(entry.slice(comma + 1));
    if (signature !== null && signature.length > 0) decoded.push(signature);
  }
  return decoded;
}

/**
 * Checks a webhook request from key-authority and returns its parsed JSON payload.
 *
 * - secret: the webhook's signing secret ('whsec_...', CreateWebhook's signing_secret).
 * - headers: the request's headers: node:http's `request.headers`, a fetch `Headers`, or a
 *   plain object with names in any case.
 * - body: the request body exactly as received (a Buffer, Uint8Array or string): verify the raw
 *   bytes, never JSON parsed and serialised again (with Express, use express.raw()).
 * - options.toleranceSeconds: how far webhook-timestamp may be from now, either way (300).
 * - options.now: the current time as a Date or in milliseconds (Date.now() by default).
 *
 * Throws a WebhookVerificationError when a webhook-* header is missing or malformed, when the
 * timestamp is outside the tolerance, when no v1 entry of webhook-signature is the expected
 * signature (compared in constant time; any one match is enough, so the sender may list several),
 * or when the signed body is not a JSON object; a TypeError for a secret that is not whsec_ and
 * base64.
 *
 * The payload is { type: 'key.rotated', timestamp: '<RFC 3339>', data: {...} }, where data is
 * the key event (event_id, position, type, workspace_id, key_id, event_time, actor, changes, and
 * for a rotation new_key_id and old_key_expire_time). data.event_id equals webhook-id: process
 * each event id once, as retries and redeliveries send it again.
 */
function verifyWebhook(secret, headers, body, options = {}) {
  const { toleranceSeconds = DEFAULT_WEBHOOK_TOLERANCE_SECONDS, now = Date.now() } = options;
  const key = signingKey(secret);
  const [messageId, timestamp, signatures] = HEADER_NAMES.map((name) => header(headers, name));
  const nowMs = now instanceof Date ? now.getTime() : Number(now);
  checkTimestamp(timestamp, toleranceSeconds, nowMs / 1000);

  let raw;
  if (typeof body === 'string') raw = Buffer.from(body, 'utf8');
  else if (body instanceof Uint8Array) raw = Buffer.from(body.buffer, body.byteOffset, body.length);
  else throw new TypeError('the body must be the raw request body: a Buffer, Uint8Array or string');

  const expected = crypto
    .createHmac('sha256', key)
    .update(`${messageId}.${timestamp}.`)
    .update(raw)
    .digest();
  // timingSafeEqual needs equal lengths; a signature's length says nothing about the secret.
  const matches = v1Signatures(signatures).some(
    (candidate) =>
      candidate.length === expected.length && crypto.timingSafeEqual(candidate, expected),
  );
  if (!matches) {
    throw new WebhookVerificationError('no webhook-signature entry matches the signing secret');
  }

  let payload;
  try {
    payload = JSON.parse(raw.toString('utf8'));
  } catch (error) {
    throw new WebhookVerificationError(`the signed body is not JSON: ${error.message}`);
  }
  if (payload === null || typeof payload !== 'object' || Array.isArray(payload)) {
    throw new WebhookVerificationError('the signed body is not a JSON object');
  }
  return payload;
}

module.exports = {
  verifyWebhook,
  WebhookVerificationError,
  WEBHOOK_SECRET_PREFIX,
  DEFAULT_WEBHOOK_TOLERANCE_SECONDS,
};
