'use strict';
// WatchKeyEvents through the Node client, against the real key-authority (./server.js): stored
// then live events, a reconnection after the last position, every workspace for an admin,
// EVENTS_PRUNED, cancelling, and a resuming watch carried across a server restart.

const { test, before, after } = require('node:test');
const assert = require('node:assert/strict');
const crypto = require('node:crypto');

const grpc = require('@grpc/grpc-js');
const { KeyAuthority, errorDetails, EVENTS_PRUNED } = require('..');
const { startServer, sleep } = require('./server');

// Longer than any event takes to arrive; only stops a broken test from hanging.
const WAIT_MS = 15_000;

let server;
let client;

before(async () => {
  server = await startServer();
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

/** The watch's next item within WAIT_MS: { value, done } as an iterator gives it. */
async function nextItem(watch) {
  let timer;
  const timeout = new Promise((_, reject) => {
    const fail = () => reject(new Error(`nothing from the watch within ${WAIT_MS} ms`));
    timer = setTimeout(fail, WAIT_MS);
  });
  try {
    return await Promise.race([watch.next(), timeout]);
  } finally {
    clearTimeout(timer);
  }
}

async function nextEvent(watch) {
  const { value, done } = await nextItem(watch);
  assert.equal(done, false, 'the watch ended');
  return value;
}

async function refusal(promise) {
  try {
    await promise;
  } catch (error) {
    return errorDetails(error);
  }
  assert.fail('the call was expected to fail');
}

test('stored, then live events; reconnecting after a position', { timeout: 60_000 }, async () => {
  const workspace = newWorkspace();
  const { key } = await client.issueKey({ workspace_id: workspace, name: 'watched' });

  // From 0: the stored key.issued.
  const fromStart = await client.watchKeyEvents({ workspace_id: workspace });
  assert.equal(fromStart.lastPosition, null);
  const issued = await nextEvent(fromStart);
  assert.equal(issued.type, 'key.issued');
  assert.equal(issued.key_id, key.key_id);
  assert.equal(issued.workspace_id, workspace);
  assert.ok(issued.position > 0);
  assert.match(issued.event_id, /^[0-9a-f-]{36}$/);
  assert.ok(issued.event_time);
  assert.equal(issued.actor.kind, 'ACTOR_KIND_ADMIN');
  assert.equal(fromStart.lastPosition, issued.position);

  // From now: only what commits after the watch started, here a rotation with both key ids.
  const fromNow = await client.watchKeyEvents({ workspace_id: workspace, from_now: true });
  const rotation = await client.rotateKey({ workspace_id: workspace, key_id: key.key_id });
  const rotated = await nextEvent(fromNow);
  assert.equal(rotated.type, 'key.rotated');
  assert.equal(rotated.key_id, key.key_id);
  assert.equal(rotated.new_key_id, rotation.key.key_id);
  assert.ok(rotated.old_key_expire_time);
  assert.ok(rotated.position > issued.position);
  // The watch from 0 follows it live, as the same event.
  assert.deepEqual(await nextEvent(fromStart), rotated);
  fromStart.cancel();
  fromNow.cancel();
  assert.deepEqual(await nextItem(fromStart), { value: undefined, done: true });

  // Reconnecting after the last position processed: only what came later.
  await client.revokeKey(workspace, rotation.key.key_id);
  const resumed = await client.watchKeyEvents({
    workspace_id: workspace,
    after_position: rotated.position,
  });
  const revoked = await nextEvent(resumed);
  assert.equal(revoked.type, 'key.revoked');
  assert.equal(revoked.key_id, rotation.key.key_id);
  assert.ok(revoked.position > rotated.position);
  resumed.cancel();
});

test('an admin watches all workspaces, a key its own', { timeout: 60_000 }, async () => {
  const [east, west] = [newWorkspace(), newWorkspace()];
  const eastKey = (await client.issueKey({ workspace_id: east, name: 'east' })).key.key_id;
  const westKey = (await client.issueKey({ workspace_id: west, name: 'west' })).key.key_id;

  // The suite's server has other tests' events too: keep this test's two workspaces. Leaving the
  // loop cancels the watch.
  const seen = {};
  for await (const event of await client.watchKeyEvents({ all_workspaces: true })) {
    if (event.workspace_id === east || event.workspace_id === west) {
      seen[event.workspace_id] = [event.type, event.key_id];
    }
    if (Object.keys(seen).length === 2) break;
  }
  assert.deepEqual(seen, { [east]: ['key.issued', eastKey], [west]: ['key.issued', westKey] });

  // An account admin's API key: its own workspace, never every one.
  const { secret } = await client.issueKey({
    workspace_id: west,
    name: 'west admin',
    role: 'ROLE_ACCOUNT_ADMIN',
  });
  const westAdmin = new KeyAuthority(server.target, { adminToken: secret });
  try {
    const refused = await refusal(westAdmin.watchKeyEvents({ all_workspaces: true }));
    assert.equal(refused.code, grpc.status.PERMISSION_DENIED);
    const own = await westAdmin.watchKeyEvents();
    const event = await nextEvent(own);
    assert.deepEqual([event.workspace_id, event.key_id], [west, westKey]);
    own.cancel();
  } finally {
    westAdmin.close();
  }
});

test('cancel() or an AbortSignal ends the iteration cleanly', { timeout: 60_000 }, async () => {
  const watch = await client.watchKeyEvents(
    { workspace_id: newWorkspace(), from_now: true },
    { resume: true },
  );
  const pending = nextItem(watch);
  await sleep(100);
  watch.cancel();
  assert.deepEqual(await pending, { value: undefined, done: true });
  assert.equal(watch.cancelled, true);

  const controller = new AbortController();
  const aborted = await client.watchKeyEvents(
    { workspace_id: newWorkspace(), from_now: true },
    { signal: controller.signal },
  );
  const waiting = nextItem(aborted);
  controller.abort();
  assert.deepEqual(await waiting, { value: undefined, done: true });
});

test('starting before the oldest kept event: EVENTS_PRUNED', { timeout: 60_000 }, async () => {
  // Events are pruned as soon as the pruning (on the audit pruning's schedule) runs.
  const pruning = await startServer({
    env: { KEY_AUTHORITY_EVENT_RETENTION: '1ms', KEY_AUTHORITY_AUDIT_PRUNE_INTERVAL: '50ms' },
  });
  const admin = new KeyAuthority(pruning.target, { adminToken: pruning.adminToken });
  try {
    await admin.issueKey({ workspace_id: 'acme', name: 'soon pruned' });
    const deadline = Date.now() + WAIT_MS;
    let details;
    for (;;) {
      try {
        (await admin.watchKeyEvents({ workspace_id: 'acme' })).cancel();
      } catch (error) {
        details = errorDetails(error);
        break;
      }
      assert.ok(Date.now() < deadline, 'the events were never pruned');
      await sleep(50);
    }
    assert.equal(details.code, grpc.status.OUT_OF_RANGE);
    assert.equal(details.reason, EVENTS_PRUNED);
    assert.equal(details.domain, 'keyauthority.v1');
    assert.match(details.message, /position/);

    // A resuming watch does not retry it either.
    const resuming = await refusal(
      admin.watchKeyEvents({ workspace_id: 'acme' }, { resume: true }),
    );
    assert.equal(resuming.reason, 'EVENTS_PRUNED');
  } finally {
    admin.close();
    const { code } = await pruning.remove();
    assert.equal(code, 0, pruning.log());
  }
});

test('a resuming watch carries on across a restart', { timeout: 60_000 }, async () => {
  const restarted = await startServer();
  // The watcher's channel lives through the restart; the calls after it use a fresh client.
  const watcher = new KeyAuthority(restarted.target, { adminToken: restarted.adminToken });
  const admin = () => new KeyAuthority(restarted.target, { adminToken: restarted.adminToken });
  try {
    let mutations = admin();
    const before = (await mutations.issueKey({ workspace_id: 'acme', name: 'before' })).key;
    mutations.close();
    const resuming = await watcher.watchKeyEvents({ workspace_id: 'acme' }, { resume: true });
    const plain = await watcher.watchKeyEvents({ workspace_id: 'acme' });
    const first = await nextEvent(resuming);
    assert.deepEqual([first.type, first.key_id], ['key.issued', before.key_id]);
    assert.deepEqual(await nextEvent(plain), first);

    // The server shuts down (ending every watch cleanly) and comes back on the same address and
    // database.
    const { code } = await restarted.stop();
    assert.equal(code, 0, restarted.log());
    // The plain watch ended with its call, without an error.
    assert.deepEqual(await nextItem(plain), { value: undefined, done: true });
    await restarted.start();

    mutations = admin();
    const after = (await mutations.issueKey({ workspace_id: 'acme', name: 'after' })).key;
    // The resuming one watched again after the last position it delivered: the new event, and
    // not the first one again.
    const second = await nextEvent(resuming);
    assert.deepEqual([second.type, second.key_id], ['key.issued', after.key_id]);
    assert.ok(second.position > first.position);
    // And live, on the same watch.
    const rotation = await mutations.rotateKey({ workspace_id: 'acme', key_id: after.key_id });
    const third = await nextEvent(resuming);
    assert.deepEqual([third.type, third.new_key_id], ['key.rotated', rotation.key.key_id]);
    assert.equal(resuming.lastPosition, third.position);
    resuming.cancel();
    mutations.close();
  } finally {
    watcher.close();
    const { code } = await restarted.remove();
    assert.equal(code, 0, restarted.log());
  }
});
