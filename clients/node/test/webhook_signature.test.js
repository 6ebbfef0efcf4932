'use strict';
// verifyWebhook against signatures this test computes itself with node:crypto: valid, tampered,
// wrong secret, stale or future timestamps, several signatures, missing or malformed headers. No
// server is needed.

const { test } = require('node:test');
const assert = require('node:assert/strict');
const crypto = require('node:crypto');

const { verifyWebhook, WebhookVerificationError } = require('..');

const MESSAGE_ID = '5f0c1f0e-8a8e-4d47-9b0e-3d8a2c1b7e10';
const BODY = Buffer.from(
  JSON.stringify({
    type: 'key.issued',
    timestamp: '2026-11-24T03:53:30.123Z',
    data: { event_id: MESSAGE_ID, position: 7, type: 'key.issued', key_id: 'k1' },
  }),
);
const NOW = 1_800_000_000;

function newSecret() {
  const key = crypto.randomBytes(32);
  return { secret: `whsec_${key.toString('base64')}`, key };
}

// One v1 entry, computed here from the scheme, not with the code under test.
function sign(key, messageId, timestamp, body) {
  const signed = Buffer.concat([Buffer.from(`${messageId}.${timestamp}.`), Buffer.from(body)]);
  return `v1,${crypto.createHmac('sha256', key).update(signed).digest('base64')}`;
}

function headers(key, timestamp = Math.floor(Date.now() / 1000), body = BODY) {
  return {
    'webhook-id': MESSAGE_ID,
    'webhook-timestamp': String(timestamp),
    'webhook-signature': sign(key, MESSAGE_ID, timestamp, body),
  };
}

function refused(secret, requestHeaders, body = BODY, options = {}) {
  try {
    verifyWebhook(secret, requestHeaders, body, options);
  } catch (error) {
    assert.ok(error instanceof WebhookVerificationError, `unexpected ${error}`);
    return error.message;
  }
  assert.fail('the request was expected to be refused');
}

const NO_MATCH = 'no webhook-signature entry matches the signing secret';

test('a valid request returns the parsed payload', () => {
  const { secret, key } = newSecret();
  const payload = verifyWebhook(secret, headers(key), BODY);
  assert.deepEqual(payload, JSON.parse(BODY));
  // A string body, a Uint8Array body, header names in any case and a fetch Headers work too.
  assert.deepEqual(verifyWebhook(secret, headers(key), BODY.toString()), payload);
  assert.deepEqual(verifyWebhook(secret, headers(key), new Uint8Array(BODY)), payload);
  const upper = Object.fromEntries(
    Object.entries(headers(key)).map(([name, value]) => [name.toUpperCase(), value]),
  );
  assert.deepEqual(verifyWebhook(secret, upper, BODY), payload);
  assert.deepEqual(verifyWebhook(secret, new Headers(headers(key)), BODY), payload);
});

test('a published Standard Webhooks example verifies', () => {
  // The example secret, message and signature that the Standard Webhooks libraries test with.
  const example = {
    'webhook-id': 'msg_p5jXN8AQM9LWM0D4loKWxJek',
    'webhook-timestamp': '1614265330',
    'webhook-signature': 'v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=',
  };
  const secret = 'whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw';
  const now = 1614265330 * 1000;
  assert.deepEqual(verifyWebhook(secret, example, '{"test": 2432232314}', { now }), {
    test: 2432232314,
  });
  assert.equal(refused(secret, example, '{"test": 2432232315}', { now }), NO_MATCH);
});

test('a tampered body, id or timestamp is refused', () => {
  const { secret, key } = newSecret();
  const signed = headers(key, NOW);
  const tampered = Buffer.from(BODY.toString().replace('"key_id":"k1"', '"key_id":"k2"'));
  assert.notDeepEqual(tampered, BODY);
  const now = NOW * 1000;
  assert.equal(refused(secret, signed, tampered, { now }), NO_MATCH);
  assert.equal(refused(secret, { ...signed, 'webhook-id': 'another' }, BODY, { now }), NO_MATCH);
  const earlier = { ...signed, 'webhook-timestamp': String(NOW - 1) };
  assert.equal(refused(secret, earlier, BODY, { now }), NO_MATCH);
});

test('another secret is refused', () => {
  const { key } = newSecret();
  const { secret: other } = newSecret();
  assert.equal(refused(other, headers(key)), NO_MATCH);
});

test('timestamps beyond the tolerance are refused either way', () => {
  const { secret, key } = newSecret();
  const now = NOW * 1000;
  assert.ok(verifyWebhook(secret, headers(key, NOW - 300), BODY, { now }));
  assert.ok(verifyWebhook(secret, headers(key, NOW + 300), BODY, { now: new Date(now) }));
  assert.equal(
    refused(secret, headers(key, NOW - 301), BODY, { now }),
    'the webhook-timestamp is 301 s old, beyond the 300 s tolerance',
  );
  assert.equal(
    refused(secret, headers(key, NOW + 301), BODY, { now }),
    'the webhook-timestamp is 301 s ahead, beyond the 300 s tolerance',
  );
  // Signed an hour ago, as a replay would be, against the real clock.
  const hourAgo = Math.floor(Date.now() / 1000) - 3600;
  assert.match(refused(secret, headers(key, hourAgo)), / s old, /);
  // Another tolerance.
  assert.ok(verifyWebhook(secret, headers(key, NOW - 20), BODY, { now, toleranceSeconds: 30 }));
  refused(secret, headers(key, NOW - 40), BODY, { now, toleranceSeconds: 30 });
});

test('any one of several signatures is enough; only v1 entries count', () => {
  const { secret, key } = newSecret();
  const { key: otherKey } = newSecret();
  const now = NOW * 1000;
  const right = sign(key, MESSAGE_ID, NOW, BODY);
  const wrong = sign(otherKey, MESSAGE_ID, NOW, BODY);
  for (const entries of [`${wrong} ${right}`, `${right} ${wrong}`, `v1,!!! ${wrong}  ${right}`]) {
    const request = { ...headers(key, NOW), 'webhook-signature': entries };
    assert.equal(verifyWebhook(secret, request, BODY, { now }).type, 'key.issued');
  }
  const bare = right.slice('v1,'.length);
  for (const entries of [wrong, `v1a,${bare}`, bare, `${wrong} ${wrong}`, 'v1,']) {
    const request = { ...headers(key, NOW), 'webhook-signature': entries };
    assert.equal(refused(secret, request, BODY, { now }), NO_MATCH, entries);
  }
});

test('a missing header is refused', () => {
  const { secret, key } = newSecret();
  for (const name of ['webhook-id', 'webhook-timestamp', 'webhook-signature']) {
    const request = headers(key);
    delete request[name];
    assert.equal(refused(secret, request), `the ${name} header is missing`);
    assert.equal(refused(secret, { ...request, [name]: ' ' }), `the ${name} header is missing`);
  }
});

test('a timestamp that is not Unix seconds is refused', () => {
  const { secret, key } = newSecret();
  for (const timestamp of ['1.8e9', '-1', '+1800000000', '1800000000.5', 'soon']) {
    const request = {
      ...headers(key),
      'webhook-timestamp': timestamp,
      'webhook-signature': sign(key, MESSAGE_ID, timestamp, BODY),
    };
    assert.equal(refused(secret, request), 'the webhook-timestamp header is not Unix seconds');
  }
});

test('a signed body that is not a JSON object is refused', () => {
  const { secret, key } = newSecret();
  for (const body of ['not json', '[1, 2]', 'null']) {
    const message = refused(secret, headers(key, undefined, body), body);
    assert.match(message, /^the signed body is not /);
  }
});

test('a malformed secret is a TypeError', () => {
  const { key } = newSecret();
  for (const secret of ['whsec_***', 'whsec_', '', undefined]) {
    assert.throws(() => verifyWebhook(secret, headers(key), BODY), TypeError);
  }
  // The bare base64, without its prefix, is accepted (as the reference libraries do).
  assert.equal(verifyWebhook(key.toString('base64'), headers(key), BODY).type, 'key.issued');
});
