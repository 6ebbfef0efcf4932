'use strict';
// Starts the real key-authority binary (./server.js) on a free 127.0.0.1 port with a temporary
// SQLite database and a random admin token, runs the key lifecycle through the Node client, and
// stops the server with SIGTERM.

const { test, before, after } = require('node:test');
const assert = require('node:assert/strict');
const { execFile } = require('node:child_process');
const crypto = require('node:crypto');
const { promisify } = require('node:util');

const grpc = require('@grpc/grpc-js');
const { KeyAuthority, errorDetails, ERROR_DOMAIN } = require('..');
const { startServer, CLIENT_DIR } = require('./server');

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

async function refusal(promise) {
  try {
    await promise;
  } catch (error) {
    return errorDetails(error);
  }
  assert.fail('the call was expected to fail');
}

test('issue, verify, list, rotate, revoke', { timeout: 30_000 }, async () => {
  const workspace = newWorkspace();
  const issued = await client.issueKey({
    workspace_id: workspace,
    name: 'billing worker',
    scopes: ['payments:read', 'payments:write'],
    ttl: { seconds: 3600 },
    metadata: { team: 'payments' },
  });
  assert.match(issued.secret, /^ka_live_[0-9A-Za-z]{50}$/);
  assert.equal(issued.key.prefix, `ka_live_${issued.key.key_id}`);
  assert.ok(issued.secret.startsWith(issued.key.prefix));
  assert.equal(issued.key.workspace_id, workspace);
  assert.deepEqual(issued.key.scopes, ['payments:read', 'payments:write']);
  assert.deepEqual(issued.key.metadata, { team: 'payments' });
  assert.equal(issued.key.environment, 'ENVIRONMENT_LIVE');
  assert.equal(issued.key.role, 'ROLE_DEVELOPER');
  assert.equal(issued.key.state, 'KEY_STATE_ACTIVE');
  assert.equal(issued.key.created_by, 'admin');
  assert.equal(
    Number(issued.key.expire_time.seconds) - Number(issued.key.create_time.seconds),
    3600,
  );

  const fetched = await client.getKey(workspace, issued.key.key_id);
  assert.equal(fetched.key_id, issued.key.key_id);
  assert.equal(fetched.name, 'billing worker');

  let answer = await client.verifyKey({ key: issued.secret, required_scopes: ['payments:write'] });
  assert.equal(answer.valid, true);
  assert.equal(answer.code, 'VERIFY_CODE_VALID');
  assert.equal(answer.key.key_id, issued.key.key_id);

  // cost 0 is sent (proto3 optional) and checks without consuming.
  const metered = await client.issueKey({
    workspace_id: workspace,
    name: 'metered',
    usage_limit: 1,
  });
  answer = await client.verifyKey({ key: metered.secret, cost: 0 });
  assert.equal(answer.code, 'VERIFY_CODE_VALID');
  assert.equal(answer.key.usage_remaining, 1);
  answer = await client.verifyKey({ key: metered.secret });
  assert.equal(answer.key.usage_remaining, 0);
  answer = await client.verifyKey({ key: metered.secret });
  assert.equal(answer.code, 'VERIFY_CODE_USAGE_EXHAUSTED');

  // A minimum role: the developer key is below account admin, and nothing is consumed.
  answer = await client.verifyKey({ key: issued.secret, minimum_role: 'ROLE_ACCOUNT_ADMIN' });
  assert.equal(answer.code, 'VERIFY_CODE_INSUFFICIENT_ROLE');
  assert.equal(answer.valid, false);
  answer = await client.verifyKey({ key: issued.secret, minimum_role: 'ROLE_DEVELOPER' });
  assert.equal(answer.code, 'VERIFY_CODE_VALID');

  // Newest first, one key per page.
  const first = await client.listKeys({ workspace_id: workspace, page_size: 1 });
  assert.equal(first.total_size, 2);
  assert.deepEqual(
    first.keys.map((key) => key.key_id),
    [metered.key.key_id],
  );
  assert.notEqual(first.next_page_token, '');
  const second = await client.listKeys({
    workspace_id: workspace,
    page_size: 1,
    page_token: first.next_page_token,
  });
  assert.deepEqual(
    second.keys.map((key) => key.key_id),
    [issued.key.key_id],
  );
  assert.equal(second.next_page_token, '');
  const all = [];
  for await (const key of client.iterKeys({ workspace_id: workspace, page_size: 1 })) {
    all.push(key.key_id);
  }
  assert.deepEqual(all, [metered.key.key_id, issued.key.key_id]);

  // Rotation without grace: the old key is EXPIRED at once, the new one VALID.
  const rotated = await client.rotateKey({
    workspace_id: workspace,
    key_id: issued.key.key_id,
    grace_period: { seconds: 0 },
  });
  assert.notEqual(rotated.key.key_id, issued.key.key_id);
  // A rotation renews the secret, not the lifetime.
  assert.deepEqual(rotated.key.expire_time, issued.key.expire_time);
  assert.equal(rotated.key.rotated_from_key_id, issued.key.key_id);
  assert.equal(rotated.previous_key.rotated_to_key_id, rotated.key.key_id);
  assert.deepEqual(rotated.key.scopes, ['payments:read', 'payments:write']);
  answer = await client.verifyKey({ key: issued.secret });
  assert.equal(answer.valid, false);
  assert.equal(answer.code, 'VERIFY_CODE_EXPIRED');
  assert.equal(answer.key.state, 'KEY_STATE_EXPIRED');
  answer = await client.verifyKey({ key: rotated.secret });
  assert.equal(answer.code, 'VERIFY_CODE_VALID');

  const revoked = await client.revokeKey(workspace, rotated.key.key_id);
  assert.equal(revoked.state, 'KEY_STATE_REVOKED');
  assert.equal(revoked.revoked_by, 'admin');
  answer = await client.verifyKey({ key: rotated.secret });
  assert.equal(answer.valid, false);
  assert.equal(answer.code, 'VERIFY_CODE_REVOKED');
  assert.equal(answer.key.key_id, rotated.key.key_id);

  // Only the metered key is still active; include_inactive shows all three.
  const active = await client.listKeys({ workspace_id: workspace });
  assert.deepEqual(
    active.keys.map((key) => key.key_id),
    [metered.key.key_id],
  );
  const everything = await client.listKeys({ workspace_id: workspace, include_inactive: true });
  assert.equal(everything.total_size, 3);
});

test('rotate with a new expiry, then revoke the whole chain', { timeout: 30_000 }, async () => {
  const workspace = newWorkspace();
  const issued = await client.issueKey({ workspace_id: workspace, name: 'chained' });
  const renewed = await client.rotateKey({
    workspace_id: workspace,
    key_id: issued.key.key_id,
    grace_period: { seconds: 0 },
    ttl: { seconds: 7200 },
  });
  assert.equal(
    Number(renewed.key.expire_time.seconds) - Number(renewed.key.create_time.seconds),
    7200,
  );
  const again = await client.rotateKey({
    workspace_id: workspace,
    key_id: renewed.key.key_id,
    grace_period: { seconds: 60 },
  });
  assert.deepEqual(again.key.expire_time, renewed.key.expire_time);

  const chain = await client.revokeKeyChain(workspace, issued.key.key_id);
  assert.equal(chain.key.key_id, issued.key.key_id);
  assert.deepEqual(
    chain.successors.map((key) => [key.key_id, key.state]),
    [
      [renewed.key.key_id, 'KEY_STATE_REVOKED'],
      [again.key.key_id, 'KEY_STATE_REVOKED'],
    ],
  );
  const answer = await client.verifyKey({ key: again.secret });
  assert.equal(answer.code, 'VERIFY_CODE_REVOKED');
});

test('a refusal carries ErrorInfo in grpc-status-details-bin', { timeout: 30_000 }, async () => {
  const details = await refusal(client.issueKey({ workspace_id: newWorkspace(), name: '' }));
  assert.equal(details.code, grpc.status.INVALID_ARGUMENT);
  assert.equal(details.codeName, 'INVALID_ARGUMENT');
  assert.equal(details.reason, 'INVALID_ARGUMENT');
  assert.equal(details.domain, ERROR_DOMAIN);
  assert.equal(details.domain, 'keyauthority.v1');
  assert.deepEqual(details.metadata, { field: 'name' });
  assert.match(details.message, /^invalid name: /);
  assert.deepEqual(
    details.fieldViolations.map((violation) => violation.field),
    ['name'],
  );
  assert.equal(details.retryDelayMs, null);

  const anonymous = new KeyAuthority(server.target);
  const missing = await refusal(anonymous.listKeys({ workspace_id: newWorkspace() }));
  anonymous.close();
  assert.equal(missing.code, grpc.status.UNAUTHENTICATED);
  assert.equal(missing.reason, 'MISSING_AUTH_HEADER');

  const notFound = await refusal(client.getKey(newWorkspace(), 'AAAAAAAAAAAA'));
  assert.equal(notFound.code, grpc.status.NOT_FOUND);
  assert.equal(notFound.reason, 'KEY_NOT_FOUND');
  assert.deepEqual(notFound.metadata, {});
});

test('IssueTrialKey over the per-IP limit carries RetryInfo', { timeout: 30_000 }, async () => {
  // The admin token makes this client a trusted front end, so client_ip is honoured.
  const client_ip = '203.0.113.9';
  const trials = [];
  for (let n = 0; n < 5; n += 1) {
    const trial = await client.issueTrialKey({ client_ip });
    trials.push(trial);
    assert.equal(trial.key.role, 'ROLE_TRIAL');
    assert.equal(trial.key.environment, 'ENVIRONMENT_TRIAL');
    assert.equal(trial.key.usage_limit, 10);
  }
  const details = await refusal(client.issueTrialKey({ client_ip }));
  assert.equal(details.code, grpc.status.RESOURCE_EXHAUSTED);
  assert.equal(details.reason, 'IP_RATE_LIMITED');
  assert.equal(details.domain, 'keyauthority.v1');
  assert.ok(details.retryDelayMs > 0, `retry delay ${details.retryDelayMs}`);
  assert.ok(details.retryDelayMs <= 60_000, `retry delay ${details.retryDelayMs}`);
  // RevokeTrialKey on behalf of the same end user: a limit of its own, still open.
  const revoked = await client.revokeTrialKey(trials[0].key.prefix, client_ip);
  assert.equal(revoked.state, 'KEY_STATE_REVOKED');
});

test('a request id makes issue, rotate and revoke safe to retry', { timeout: 30_000 }, async () => {
  const workspace = newWorkspace();
  const request_id = crypto.randomUUID();
  const request = { workspace_id: workspace, name: 'idempotent', scopes: ['a:read'], request_id };
  const first = await client.issueKey(request);
  const again = await client.issueKey(request);
  assert.equal(again.key.key_id, first.key.key_id);
  assert.equal(again.secret, first.secret);
  const reused = await refusal(client.issueKey({ ...request, name: 'another name' }));
  assert.equal(reused.code, grpc.status.FAILED_PRECONDITION);
  assert.equal(reused.codeName, 'FAILED_PRECONDITION');
  assert.equal(reused.reason, 'IDEMPOTENCY_KEY_REUSED');
  assert.equal(reused.domain, 'keyauthority.v1');
  assert.equal((await client.listKeys({ workspace_id: workspace })).total_size, 1);

  const rotation = {
    workspace_id: workspace,
    key_id: first.key.key_id,
    grace_period: { seconds: 0 },
    request_id: crypto.randomUUID(),
  };
  const rotated = await client.rotateKey(rotation);
  const rotatedAgain = await client.rotateKey(rotation);
  assert.equal(rotatedAgain.key.key_id, rotated.key.key_id);
  assert.equal(rotatedAgain.secret, rotated.secret);

  const revocation = { request_id: crypto.randomUUID() };
  const revoked = await client.revokeKey(workspace, rotated.key.key_id, revocation);
  assert.equal(revoked.state, 'KEY_STATE_REVOKED');
  assert.deepEqual(await client.revokeKey(workspace, rotated.key.key_id, revocation), revoked);
  const other = await refusal(client.revokeKey(workspace, first.key.key_id, revocation));
  assert.equal(other.reason, 'IDEMPOTENCY_KEY_REUSED');

  // The retries changed nothing: one event per change.
  const trail = await client.listAuditEvents({ workspace_id: workspace, key_id: first.key.key_id });
  assert.deepEqual(
    trail.audit_events.map((event) => event.action),
    ['AUDIT_ACTION_ROTATE', 'AUDIT_ACTION_ISSUE'],
  );
  assert.equal(trail.audit_events[1].request_id, request_id);

  const trial = { client_ip: '203.0.113.77', request_id: crypto.randomUUID() };
  const firstTrial = await client.issueTrialKey(trial);
  const trialAgain = await client.issueTrialKey(trial);
  assert.equal(trialAgain.secret, firstTrial.secret);
});

test('updateKey with a mask and an etag', { timeout: 30_000 }, async () => {
  const workspace = newWorkspace();
  const issued = await client.issueKey({
    workspace_id: workspace,
    name: 'before',
    description: 'kept',
    scopes: ['a:read'],
  });
  const original = issued.key;
  assert.equal(original.enabled, true);
  assert.notEqual(original.etag, '');

  const updated = await client.updateKey(
    workspace,
    original.key_id,
    { name: 'after', scopes: ['a:read', 'b:write'], description: 'outside the mask' },
    { update_mask: ['name', 'scopes'], etag: original.etag },
  );
  assert.equal(updated.key_id, original.key_id);
  assert.equal(updated.name, 'after');
  assert.deepEqual(updated.scopes, ['a:read', 'b:write']);
  assert.equal(updated.description, 'kept');
  assert.equal(updated.state, 'KEY_STATE_ACTIVE');
  assert.notEqual(updated.etag, original.etag);
  assert.ok(Number(updated.update_time.seconds) >= Number(original.create_time.seconds));
  const fetched = await client.getKey(workspace, original.key_id);
  assert.equal(fetched.name, 'after');
  assert.equal(fetched.etag, updated.etag);
  const answer = await client.verifyKey({ key: issued.secret, required_scopes: ['b:write'] });
  assert.equal(answer.code, 'VERIFY_CODE_VALID');

  // The etag read before that update is stale now.
  const stale = await refusal(
    client.updateKey(workspace, original.key_id, { name: 'lost' }, { etag: original.etag }),
  );
  assert.equal(stale.code, grpc.status.ABORTED);
  assert.equal(stale.codeName, 'ABORTED');
  assert.equal(stale.reason, 'ETAG_MISMATCH');
  assert.equal(stale.domain, 'keyauthority.v1');
  assert.equal((await client.getKey(workspace, original.key_id)).name, 'after');

  // Without a mask, the fields given are the mask.
  const described = await client.updateKey(workspace, original.key_id, { description: 'new' });
  assert.equal(described.description, 'new');
  assert.equal(described.name, 'after');

  const badPath = await refusal(
    client.updateKey(workspace, original.key_id, {}, { update_mask: ['prefix'] }),
  );
  assert.equal(badPath.code, grpc.status.INVALID_ARGUMENT);
});

test('disable, enable, and the audit trail', { timeout: 30_000 }, async () => {
  const workspace = newWorkspace();
  const issued = await client.issueKey({ workspace_id: workspace, name: 'switch' });
  const key_id = issued.key.key_id;
  await client.updateKey(workspace, key_id, { name: 'switched' }, { update_mask: ['name'] });

  const request_id = crypto.randomUUID();
  const disabled = await client.updateKey(
    workspace,
    key_id,
    { enabled: false },
    { update_mask: ['enabled'], request_id },
  );
  assert.equal(disabled.enabled, false);
  assert.equal(disabled.state, 'KEY_STATE_DISABLED');
  let answer = await client.verifyKey({ key: issued.secret });
  assert.equal(answer.valid, false);
  assert.equal(answer.code, 'VERIFY_CODE_DISABLED');
  assert.equal(answer.key.key_id, key_id);
  assert.equal((await client.getKey(workspace, key_id)).state, 'KEY_STATE_DISABLED');
  assert.deepEqual((await client.listKeys({ workspace_id: workspace })).keys, []);
  const inactive = await client.listKeys({ workspace_id: workspace, include_inactive: true });
  assert.deepEqual(
    inactive.keys.map((key) => key.key_id),
    [key_id],
  );

  const enabled = await client.updateKey(workspace, key_id, { enabled: true });
  assert.equal(enabled.enabled, true);
  assert.equal(enabled.state, 'KEY_STATE_ACTIVE');
  answer = await client.verifyKey({ key: issued.secret });
  assert.equal(answer.code, 'VERIFY_CODE_VALID');

  // Newest first, one event per change, by the admin token.
  const page = await client.listAuditEvents({ workspace_id: workspace, key_id });
  const events = page.audit_events;
  assert.equal(page.next_page_token, '');
  assert.deepEqual(
    events.map((event) => event.action),
    ['AUDIT_ACTION_ENABLE', 'AUDIT_ACTION_DISABLE', 'AUDIT_ACTION_UPDATE', 'AUDIT_ACTION_ISSUE'],
  );
  for (const event of events) {
    assert.equal(event.key_id, key_id);
    assert.equal(event.workspace_id, workspace);
    assert.deepEqual(event.actor, { kind: 'ACTOR_KIND_ADMIN', id: 'admin', display: 'admin' });
    assert.equal(event.outcome, 'AUDIT_OUTCOME_APPLIED');
  }
  const [, disable, update] = events;
  assert.equal(disable.request_id, request_id);
  const disableChange = disable.changes.find((change) => change.field === 'enabled');
  assert.equal(JSON.parse(disableChange.old_value), true);
  assert.equal(JSON.parse(disableChange.new_value), false);
  const nameChange = update.changes.find((change) => change.field === 'name');
  assert.equal(JSON.parse(nameChange.old_value), 'switch');
  assert.equal(JSON.parse(nameChange.new_value), 'switched');

  const onlyDisable = await client.listAuditEvents({
    workspace_id: workspace,
    key_id,
    action: 'AUDIT_ACTION_DISABLE',
    actor_kind: 'ACTOR_KIND_ADMIN',
  });
  assert.deepEqual(
    onlyDisable.audit_events.map((event) => event.event_id),
    [disable.event_id],
  );

  // One event per page, following next_page_token.
  const paged = [];
  let page_token = '';
  do {
    const onePage = await client.listAuditEvents({
      workspace_id: workspace,
      key_id,
      page_size: 1,
      page_token,
    });
    assert.equal(onePage.audit_events.length, 1);
    paged.push(onePage.audit_events[0].event_id);
    page_token = onePage.next_page_token;
  } while (page_token);
  assert.deepEqual(
    paged,
    events.map((event) => event.event_id),
  );
  const iterated = [];
  for await (const event of client.iterAuditEvents({ workspace_id: workspace, page_size: 3 })) {
    iterated.push(event.event_id);
  }
  assert.deepEqual(iterated, paged);
});

test('example.js runs the lifecycle', { timeout: 30_000 }, async () => {
  const { stdout } = await promisify(execFile)(process.execPath, ['example.js'], {
    cwd: CLIENT_DIR,
    env: {
      ...process.env,
      KEY_AUTHORITY_TARGET: server.target,
      KEY_AUTHORITY_ADMIN_TOKEN: server.adminToken,
    },
    timeout: 20_000,
  });
  const lines = stdout.trim().split('\n');
  assert.match(lines[0], /^issued ka_live_[0-9A-Za-z]{12}$/);
  assert.match(lines[2], /^listed \d+ of \d+$/);
  assert.deepEqual(
    [lines[1], ...lines.slice(3)],
    [
      'verify: VERIFY_CODE_VALID',
      'old key after rotate: VERIFY_CODE_EXPIRED',
      'new key after revoke: VERIFY_CODE_REVOKED',
      "refused: INVALID_ARGUMENT { field: 'name' }",
    ],
  );
});

test('reportUsage counts a batch once', { timeout: 30_000 }, async () => {
  const workspace = newWorkspace();
  const issued = await client.issueKey({ workspace_id: workspace, name: 'reported' });
  const key_id = issued.key.key_id;
  const used = new Date(Math.floor(Date.now() / 1000) * 1000 - 60_000);
  const request_id = crypto.randomUUID();

  const first = await client.reportUsage(workspace, [{ key_id, requests: 7, last_used_time: used }], {
    request_id,
  });
  assert.deepEqual(first, { replayed: false, counted_keys: 1, skipped_key_ids: [] });
  const retry = await client.reportUsage(workspace, [{ key_id, requests: 7, last_used_time: used }], {
    request_id,
  });
  assert.deepEqual(retry, { replayed: true, counted_keys: 0, skipped_key_ids: [] });
  const reused = await refusal(
    client.reportUsage(workspace, [{ key_id, requests: 8, last_used_time: used }], { request_id }),
  );
  assert.equal(reused.code, grpc.status.FAILED_PRECONDITION);
  assert.equal(reused.reason, 'IDEMPOTENCY_KEY_REUSED');

  const key = await client.getKey(workspace, key_id);
  assert.equal(key.total_requests, 7);
  assert.equal(Number(key.last_used_time.seconds), used.getTime() / 1000);
});
