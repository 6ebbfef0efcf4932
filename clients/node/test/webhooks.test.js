'use strict';
// Webhooks through the Node client against the real server (./server.js, run with
// --webhook-allow-private-targets so that a receiver on 127.0.0.1 is accepted): the signed POST of
// a key event checked with verifyWebhook, ListWebhooks, ListWebhookDeliveries,
// RedeliverWebhookEvent, DeleteWebhook, and the refusals.

const { test, before, after } = require('node:test');
const assert = require('node:assert/strict');
const crypto = require('node:crypto');
const http = require('node:http');

const grpc = require('@grpc/grpc-js');
const { KeyAuthority, errorDetails, verifyWebhook, ERROR_DOMAIN } = require('..');
const { startServer, sleep } = require('./server');

// Longer than any delivery takes; only stops a broken test from hanging.
const WAIT_MS = 15_000;
const SECRET = /^whsec_[A-Za-z0-9+/]{43}=$/;
const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;

let server;
let client;

before(async () => {
  server = await startServer({ args: ['--webhook-allow-private-targets'] });
  client = new KeyAuthority(server.target, { adminToken: server.adminToken });
});

after(async () => {
  if (client) client.close();
  if (server) {
    const { code, signal } = await server.remove();
    assert.equal(signal, null, `key-authority was killed by ${signal}:\n${server.log()}`);
    assert.equal(code, 0, `key-authority exited with ${code} on SIGTERM:\n${server.log()}`);
  }
});

const newWorkspace = () => `ws-${crypto.randomBytes(8).toString('hex')}`;

async function refusal(promise) {
  try {
    await promise;
  } catch (error) {
    return errorDetails(error);
  }
  assert.fail('the call was expected to fail');
}

/**
 * An HTTP server on 127.0.0.1 that answers every POST with 200 and queues what it got:
 * { path, headers, body } (headers as node:http gives them, body a Buffer).
 */
async function startReceiver() {
  const received = [];
  let waiting = null;
  const http_ = http.createServer((request, response) => {
    const chunks = [];
    request.on('data', (chunk) => chunks.push(chunk));
    request.on('end', () => {
      received.push({ path: request.url, headers: request.headers, body: Buffer.concat(chunks) });
      response.writeHead(200, { 'content-length': '0' }).end();
      if (waiting) waiting();
    });
  });
  await new Promise((resolve) => http_.listen(0, '127.0.0.1', resolve));
  const { port } = http_.address();
  return {
    url: `http://127.0.0.1:${port}/hooks/key-authority`,
    /** The next request, in arrival order; rejects after timeoutMs. */
    async next(timeoutMs = WAIT_MS) {
      const deadline = Date.now() + timeoutMs;
      while (received.length === 0) {
        const left = deadline - Date.now();
        if (left <= 0) throw new Error(`no webhook request within ${timeoutMs} ms`);
        await new Promise((resolve) => {
          const timer = setTimeout(resolve, left);
          waiting = () => {
            clearTimeout(timer);
            resolve();
          };
        });
        waiting = null;
      }
      return received.shift();
    },
    close() {
      http_.closeAllConnections();
      return new Promise((resolve) => http_.close(resolve));
    },
  };
}

/**
 * Reads until done(value) holds (the server records a delivery's outcome just after the receiver
 * answered), failing after timeoutMs.
 */
async function waitUntil(read, done, timeoutMs = WAIT_MS) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await read();
    if (done(value)) return value;
    if (Date.now() > deadline) {
      assert.fail(`not reached within ${timeoutMs} ms; last read: ${JSON.stringify(value)}`);
    }
    await sleep(50);
  }
}

async function deliveries(workspace_id, webhook_id) {
  const all = [];
  for await (const delivery of client.iterWebhookDeliveries({ workspace_id, webhook_id })) {
    all.push(delivery);
  }
  return all;
}

test('a key event is posted signed, listed, redelivered, and the webhook deleted', {
  timeout: 60_000,
}, async () => {
  const receiver = await startReceiver();
  try {
    const workspace = newWorkspace();
    // Arrange: a webhook for key.issued only.
    const created = await client.createWebhook({
      workspace_id: workspace,
      url: receiver.url,
      event_types: ['key.issued'],
      description: 'billing sync',
    });
    const secret = created.signing_secret;
    const webhook = created.webhook;
    assert.match(secret, SECRET);
    assert.equal(Buffer.from(secret.slice('whsec_'.length), 'base64').length, 32);
    assert.match(webhook.webhook_id, UUID);
    assert.equal(webhook.workspace_id, workspace);
    assert.equal(webhook.url, receiver.url);
    assert.deepEqual(webhook.event_types, ['key.issued']);
    assert.equal(webhook.description, 'billing sync');
    assert.equal(webhook.created_by, 'admin');
    assert.ok(Number(webhook.create_time.seconds) > 0);
    // The hint: whsec_ and the first 4 characters of the base64.
    assert.equal(webhook.secret_hint, secret.slice(0, 10));

    // Act: an event it wants.
    const issued = await client.issueKey({ workspace_id: workspace, name: 'webhook subject' });
    const keyId = issued.key.key_id;

    // Assert: one signed POST of it.
    const first = await receiver.next();
    assert.equal(first.path, '/hooks/key-authority');
    assert.match(first.headers['content-type'], /^application\/json/);
    const payload = verifyWebhook(secret, first.headers, first.body);
    const eventId = first.headers['webhook-id'];
    assert.match(eventId, UUID);
    assert.equal(payload.type, 'key.issued');
    assert.match(payload.timestamp, /Z$/);
    assert.equal(payload.data.type, 'key.issued');
    assert.equal(payload.data.event_id, eventId);
    assert.equal(payload.data.key_id, keyId);
    assert.equal(payload.data.workspace_id, workspace);
    assert.ok(payload.data.position > 0);
    assert.equal(payload.data.actor.display, 'admin');

    // ListWebhooks shows it, without its secret.
    const listed = await client.listWebhooks(workspace);
    assert.deepEqual(listed, [webhook]);
    assert.ok(!JSON.stringify(listed).includes(secret));

    // One delivery, SUCCEEDED after one attempt answered 200.
    const [delivery] = await waitUntil(
      () => deliveries(workspace, webhook.webhook_id),
      (found) => found.length === 1 && found[0].state === 'WEBHOOK_DELIVERY_STATE_SUCCEEDED',
    );
    assert.equal(delivery.webhook_id, webhook.webhook_id);
    assert.equal(delivery.event_id, eventId);
    assert.equal(delivery.event_type, 'key.issued');
    assert.equal(delivery.position, payload.data.position);
    assert.equal(delivery.redelivery, false);
    assert.equal(delivery.attempts.length, 1);
    const [attempt] = delivery.attempts;
    assert.deepEqual([attempt.attempt, attempt.http_status, attempt.error], [1, 200, '']);

    // Redelivery: a new pending delivery, then a second POST with the same webhook-id.
    const again = await client.redeliverWebhookEvent(workspace, webhook.webhook_id, eventId);
    assert.equal(again.event_id, eventId);
    assert.equal(again.webhook_id, webhook.webhook_id);
    assert.equal(again.redelivery, true);
    assert.notEqual(again.delivery_id, delivery.delivery_id);
    const second = await receiver.next();
    assert.equal(second.headers['webhook-id'], eventId);
    assert.deepEqual(verifyWebhook(secret, second.headers, second.body).data, payload.data);
    const listing = { workspace_id: workspace, webhook_id: webhook.webhook_id };
    const both = await waitUntil(
      async () => (await client.listWebhookDeliveries(listing)).deliveries,
      (found) =>
        found.length === 2 &&
        found.every((each) => each.state === 'WEBHOOK_DELIVERY_STATE_SUCCEEDED'),
    );
    assert.deepEqual(
      both.map((each) => [each.delivery_id, each.redelivery, each.attempts[0].http_status]),
      [
        [again.delivery_id, true, 200],
        [delivery.delivery_id, false, 200],
      ],
    );

    // An event of a type it does not want is not sent: the next POST is the next key.issued
    // (deliveries go out in event order, so a key.revoked would have come first).
    await client.revokeKey(workspace, keyId);
    const later = await client.issueKey({ workspace_id: workspace, name: 'second subject' });
    const third = await receiver.next();
    assert.equal(verifyWebhook(secret, third.headers, third.body).data.key_id, later.key.key_id);

    // Delete: the webhook as it was, then nothing listed, and it is gone for every call.
    assert.deepEqual(await client.deleteWebhook(workspace, webhook.webhook_id), webhook);
    assert.deepEqual(await client.listWebhooks(workspace), []);
    for (const call of [
      () => client.deleteWebhook(workspace, webhook.webhook_id),
      () => client.listWebhookDeliveries(listing),
      () => client.redeliverWebhookEvent(workspace, webhook.webhook_id, eventId),
    ]) {
      const details = await refusal(call());
      assert.deepEqual([details.code, details.reason], [grpc.status.NOT_FOUND, 'WEBHOOK_NOT_FOUND']);
    }
  } finally {
    await receiver.close();
  }
});

test('a metadata address is refused', { timeout: 30_000 }, async () => {
  const workspace = newWorkspace();
  for (const url of ['http://169.254.169.254/', 'http://169.254.169.254/latest/meta-data/']) {
    const details = await refusal(
      client.createWebhook({ workspace_id: workspace, url, event_types: ['key.issued'] }),
    );
    assert.equal(details.code, grpc.status.INVALID_ARGUMENT);
    assert.deepEqual([details.reason, details.domain], ['WEBHOOK_TARGET_FORBIDDEN', ERROR_DOMAIN]);
  }
  assert.deepEqual(await client.listWebhooks(workspace), []);
});

test('webhooks need credentials', { timeout: 30_000 }, async () => {
  const anonymous = new KeyAuthority(server.target);
  try {
    const details = await refusal(anonymous.listWebhooks(newWorkspace()));
    assert.equal(details.code, grpc.status.UNAUTHENTICATED);
  } finally {
    anonymous.close();
  }
});
