'use strict';
// A thin promise-based client of key-authority. The service definitions are loaded at run time
// from the repository's protos (../../proto, or $KEY_AUTHORITY_PROTO_DIR) by @grpc/proto-loader:
// nothing is generated or checked in. Messages are plain objects with the protos' field names
// (snake_case), enums as their names ('VERIFY_CODE_VALID'), int64 as numbers, and
// google.protobuf.Duration / Timestamp as { seconds, nanos }.
//
// The mutations (issueKey, rotateKey, revokeKey, updateKey, issueTrialKey) take a `request_id`: a
// UUID such as crypto.randomUUID(), unique to the operation. A retry with the same request id and
// the same parameters resolves to the first call's answer (the same secret included) and changes
// nothing; the same request id with other parameters is rejected with FAILED_PRECONDITION,
// reason IDEMPOTENCY_KEY_REUSED.
//
// watchKeyEvents streams key events as a KeyEventWatch: an async iterator (for await ... of) that
// can be cancelled and, with { resume: true }, carries on by itself after a dropped connection
// from the last position it delivered.
//
// createWebhook and the other webhook methods manage the HTTP endpoints a workspace's key events
// are POSTed to; a receiver checks each request with verifyWebhook (./webhooks.js, which needs
// only node:crypto).

const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const protobuf = require('protobufjs');
const {
  verifyWebhook,
  WebhookVerificationError,
  WEBHOOK_SECRET_PREFIX,
  DEFAULT_WEBHOOK_TOLERANCE_SECONDS,
} = require('./webhooks');

const ERROR_DOMAIN = 'keyauthority.v1';
// The Key fields UpdateKey can change.
const UPDATABLE_FIELDS = Object.freeze([
  'name',
  'description',
  'scopes',
  'role',
  'metadata',
  'expire_time',
  'enabled',
]);
const DETAILS_TRAILER = 'grpc-status-details-bin';
// The reason of a WatchKeyEvents that starts before the oldest key event still kept.
const EVENTS_PRUNED = 'EVENTS_PRUNED';
// A resuming watch's first pause before it watches again; it doubles up to the maximum.
const RESUME_FIRST_DELAY_MS = 100;
const RESUME_MAX_DELAY_MS = 5000;
// Messages a watch buffers before it stops reading (and HTTP/2 flow control holds the server).
const WATCH_HIGH_WATER = 16;
const VENDORED_PROTOS = path.join(__dirname, 'protos');

function protoDir() {
  return process.env.KEY_AUTHORITY_PROTO_DIR || path.join(__dirname, '..', '..', 'proto');
}

const LOADER_OPTIONS = {
  keepCase: true,
  longs: Number,
  enums: String,
  defaults: true,
  oneofs: true,
};

let services;
function loadServices() {
  if (!services) {
    const definition = protoLoader.loadSync(
      ['keyauthority/v1/key_service.proto', 'keyauthority/v1/verify_service.proto', 'health.proto'],
      { ...LOADER_OPTIONS, includeDirs: [protoDir(), VENDORED_PROTOS] },
    );
    const loaded = grpc.loadPackageDefinition(definition);
    services = {
      KeyService: loaded.keyauthority.v1.KeyService,
      VerifyService: loaded.keyauthority.v1.VerifyService,
      Health: loaded.grpc.health.v1.Health,
    };
  }
  return services;
}

let rpcTypes;
function loadRpcTypes() {
  if (!rpcTypes) {
    const root = new protobuf.Root();
    root.loadSync(path.join(VENDORED_PROTOS, 'google_rpc.proto'), { keepCase: true });
    rpcTypes = {
      Status: root.lookupType('google.rpc.Status'),
      ErrorInfo: root.lookupType('google.rpc.ErrorInfo'),
      RetryInfo: root.lookupType('google.rpc.RetryInfo'),
      BadRequest: root.lookupType('google.rpc.BadRequest'),
    };
  }
  return rpcTypes;
}

function bearer(token) {
  const metadata = new grpc.Metadata();
  if (token) metadata.set('authorization', `Bearer ${token}`);
  return metadata;
}

class KeyAuthority {
  /**
   * @param {string} target host:port
   * @param {object} [options]
   * @param {string} [options.adminToken] bearer token for KeyService calls: an admin token, a
   *   dashboard JWT or an API key of this service
   * @param {string} [options.verifyToken] bearer token for VerifyKey, if the operator set
   *   KEY_AUTHORITY_VERIFY_TOKENS
   * @param {grpc.ChannelCredentials} [options.credentials] TLS; plaintext when absent
   * @param {number} [options.timeoutMs] deadline of each call (10 s)
   */
  constructor(target, options = {}) {
    const { KeyService, VerifyService, Health } = loadServices();
    const credentials = options.credentials || grpc.credentials.createInsecure();
    this.target = target;
    this.timeoutMs = options.timeoutMs ?? 10_000;
    this.keys = new KeyService(target, credentials);
    // One HTTP/2 connection for every service.
    const shared = { channelOverride: this.keys.getChannel() };
    this.verifier = new VerifyService(target, credentials, shared);
    this.health = new Health(target, credentials, shared);
    this.adminToken = options.adminToken;
    this.verifyToken = options.verifyToken;
  }

  call(client, method, request, token) {
    return new Promise((resolve, reject) => {
      client[method](
        request,
        bearer(token),
        { deadline: Date.now() + this.timeoutMs },
        (error, response) => (error ? reject(error) : resolve(response)),
      );
    });
  }

  /**
   * IssueKey: resolves to { key, secret }; the secret is shown this once only (a retry with the
   * same `request_id` and parameters resolves to that same key and secret again).
   */
  issueKey(request) {
    return this.call(this.keys, 'IssueKey', request, this.adminToken);
  }

  /** GetKey: resolves to the Key. */
  async getKey(workspace_id, key_id) {
    return (await this.call(this.keys, 'GetKey', { workspace_id, key_id }, this.adminToken)).key;
  }

  /** ListKeys: one page, { keys, next_page_token, total_size }. */
  listKeys(request) {
    return this.call(this.keys, 'ListKeys', request, this.adminToken);
  }

  /** Every key of a listing, page after page. */
  async *iterKeys(request) {
    let page_token = '';
    do {
      const page = await this.listKeys({ ...request, page_token });
      yield* page.keys;
      page_token = page.next_page_token;
    } while (page_token);
  }

  /** RevokeKey: resolves to the revoked Key. options: { request_id }. */
  async revokeKey(workspace_id, key_id, { request_id = '' } = {}) {
    const request = { workspace_id, key_id, request_id };
    return (await this.call(this.keys, 'RevokeKey', request, this.adminToken)).key;
  }

  /**
   * ReportUsage: adds usage a caller-side verifier counted, [{ key_id, requests, last_used_time }]
   * (last_used_time a Date or { seconds, nanos }; at most 1000 entries, each key once), to the
   * keys' total_requests and last_used_time. Needs the developer role or above. request_id (a
   * UUID) is required: the same batch sent again counts nothing and resolves with replayed: true.
   * Resolves to { replayed, counted_keys, skipped_key_ids } (keys of another workspace, unknown
   * or usage-limited count nothing).
   */
  reportUsage(workspace_id, usage, { request_id }) {
    const asTimestamp = (at) =>
      at instanceof Date
        ? { seconds: Math.floor(at.getTime() / 1000), nanos: (at.getTime() % 1000) * 1e6 }
        : at;
    const request = {
      workspace_id,
      request_id,
      usage: usage.map(({ key_id, requests, last_used_time }) => ({
        key_id,
        requests,
        last_used_time: asTimestamp(last_used_time),
      })),
    };
    return this.call(this.keys, 'ReportUsage', request, this.adminToken);
  }

  /**
   * RevokeKey with revoke_successors: revokes a key and every successor its rotations produced,
   * in one transaction (for a leaked key that whoever holds it may have rotated). Resolves to
   * { key, successors }. options: { request_id }.
   */
  revokeKeyChain(workspace_id, key_id, { request_id = '' } = {}) {
    const request = { workspace_id, key_id, revoke_successors: true, request_id };
    return this.call(this.keys, 'RevokeKey', request, this.adminToken);
  }

  /**
   * RotateKey: resolves to { key, secret, previous_key }. The successor keeps the old key's
   * expiry unless the request sets `ttl` or `expire_time` (callers that may issue keys only).
   */
  rotateKey(request) {
    return this.call(this.keys, 'RotateKey', request, this.adminToken);
  }

  /**
   * IssueTrialKey: needs no credentials; client_ip counts only from an admin-token holder. The
   * request may carry a `request_id`, as IssueKey's.
   */
  issueTrialKey(request = {}) {
    return this.call(this.keys, 'IssueTrialKey', request, this.adminToken);
  }

  /**
   * RevokeTrialKey: resolves to the revoked trial Key. client_ip counts for the per-IP limit only
   * from an admin-token holder (a trusted front end).
   */
  async revokeTrialKey(prefix, client_ip = '') {
    const token = client_ip ? this.adminToken : undefined;
    return (await this.call(this.keys, 'RevokeTrialKey', { prefix, client_ip }, token)).key;
  }

  /**
   * UpdateKey: changes a key's settings without minting a new secret, and resolves to the Key as
   * it is afterwards (with its new `etag`). `fields` holds the new values, among UPDATABLE_FIELDS
   * (name, description, scopes, role, metadata, expire_time, enabled). options:
   * - update_mask: the fields to change ('*' = all of them); by default the keys of `fields`, so
   *   { enabled: false } disables the key and { expire_time: null } removes the expiry. Fields
   *   outside the mask are ignored.
   * - etag: apply only if the key is still at this version (Key.etag as read); otherwise the
   *   promise rejects with ABORTED, reason ETAG_MISMATCH: read the key again and redo the change.
   * - request_id: makes the call safe to retry.
   * A disabled key verifies as VERIFY_CODE_DISABLED until it is enabled again; revoked and expired
   * keys cannot be updated.
   */
  async updateKey(
    workspace_id,
    key_id,
    fields = {},
    { update_mask, etag = '', request_id = '' } = {},
  ) {
    const given = Object.keys(fields).filter((name) => fields[name] !== undefined);
    const paths = update_mask ?? given;
    if (paths.length === 0) {
      throw new TypeError('updateKey: nothing to update (give a field or an update_mask)');
    }
    const request = {
      key: { ...fields, workspace_id, key_id, etag },
      update_mask: { paths },
      request_id,
    };
    return (await this.call(this.keys, 'UpdateKey', request, this.adminToken)).key;
  }

  /**
   * ListAuditEvents: one page, { audit_events, next_page_token }, newest first. The request holds
   * workspace_id, page_size, page_token and the filters (combined with AND): key_id, actor_kind
   * ('ACTOR_KIND_ADMIN', ...), actor_id, action ('AUDIT_ACTION_DISABLE', ...), start_time
   * (inclusive) and end_time (exclusive) as { seconds, nanos }.
   */
  listAuditEvents(request) {
    return this.call(this.keys, 'ListAuditEvents', request, this.adminToken);
  }

  /** Every audit event of a listing, page after page. */
  async *iterAuditEvents(request) {
    let page_token = '';
    do {
      const page = await this.listAuditEvents({ ...request, page_token });
      yield* page.audit_events;
      page_token = page.next_page_token;
    } while (page_token);
  }

  /**
   * WatchKeyEvents: a workspace's key events, in position order: the stored ones after
   * `after_position` (0: from the oldest kept), or only new ones with `from_now`, then each new
   * one as it commits. request: { workspace_id, after_position, from_now, all_workspaces }
   * (others than admins may leave workspace_id empty for their own; admins may set
   * all_workspaces, with no workspace_id, to watch every workspace). options:
   * - resume: when the call ends (the server shut down, the connection broke, the service was
   *   briefly unavailable), watch again after the last position delivered, after a pause of
   *   100 ms doubling up to 5 s (with jitter; the service's RetryInfo delay when it sends one),
   *   until cancelled: nothing is missed and nothing seen twice. Errors that watching again
   *   cannot fix are thrown either way: OUT_OF_RANGE with reason EVENTS_PRUNED (the events after
   *   the start were pruned; the message names the oldest position still available), refused
   *   credentials or role, a bad request. With from_now, a call that ends before delivering any
   *   event is followed by another from_now one, skipping what committed in between: pass
   *   after_position to be exact from the start.
   * - signal: an AbortSignal that cancels the watch.
   *
   * Resolves to a KeyEventWatch once the server has started the watch (with from_now, what
   * commits after that is delivered), or rejects with its refusal (PERMISSION_DENIED,
   * EVENTS_PRUNED, ...). Iterate it with `for await (const event of watch)`; events are
   * { event_id, position, type ('key.issued', 'key.rotated', ...: ignore the types you do not
   * know), workspace_id, key_id, event_time, actor, changes, new_key_id, old_key_expire_time }.
   * Without resume the iteration ends when the call does: cleanly when the server shuts down, or
   * by throwing the call's error; watch again with after_position = watch.lastPosition. Stop it
   * with watch.cancel() (the iteration then ends without an error) or by leaving the loop. The
   * watch has no deadline (timeoutMs does not apply).
   */
  async watchKeyEvents(request = {}, { resume = false, signal } = {}) {
    const watch = new KeyEventWatch(
      (message) => this.keys.WatchKeyEvents(message, bearer(this.adminToken)),
      request,
      { resume, signal },
    );
    await watch.started;
    return watch;
  }

  /**
   * CreateWebhook: the workspace's key events of the types listed that commit from now on are
   * POSTed to the URL as signed JSON, one at a time in event order, retried with backoff for up to
   * a day; check each request with verifyWebhook. request: { workspace_id, url, event_types
   * (such as ['key.rotated']; empty means every type, including types added later), description }.
   * Resolves to { webhook, signing_secret }: the secret ('whsec_...') is returned only this once,
   * so store it now; webhook.secret_hint later tells which secret a webhook has. A URL pointing at
   * this server, or at a link-local, metadata, loopback or private address (unless the server
   * allows private targets), rejects with INVALID_ARGUMENT, reason WEBHOOK_TARGET_FORBIDDEN. Needs
   * the developer role or above.
   */
  createWebhook(request) {
    return this.call(this.keys, 'CreateWebhook', request, this.adminToken);
  }

  /**
   * ListWebhooks: resolves to the workspace's webhooks, oldest first (at most 16), without their
   * secrets. Others than admins may leave workspace_id empty for their own.
   */
  async listWebhooks(workspace_id = '') {
    const request = { workspace_id };
    return (await this.call(this.keys, 'ListWebhooks', request, this.adminToken)).webhooks;
  }

  /**
   * DeleteWebhook: deletes a webhook and its delivery history, and resolves to the Webhook as it
   * was. Nothing more is sent to it (an attempt already under way finishes). An unknown webhook
   * rejects with NOT_FOUND.
   */
  async deleteWebhook(workspace_id, webhook_id) {
    const request = { workspace_id, webhook_id };
    return (await this.call(this.keys, 'DeleteWebhook', request, this.adminToken)).webhook;
  }

  /**
   * ListWebhookDeliveries: one page, { deliveries, next_page_token }, newest first, each delivery
   * with its attempts ({ attempt, attempt_time, http_status, error, duration }). The request holds
   * workspace_id, webhook_id, page_size, page_token and state ('WEBHOOK_DELIVERY_STATE_FAILED',
   * ...; unset for every state). A page token is bound to the webhook and to the state.
   */
  listWebhookDeliveries(request) {
    return this.call(this.keys, 'ListWebhookDeliveries', request, this.adminToken);
  }

  /** Every delivery of a webhook (in `state`, if set), page after page. */
  async *iterWebhookDeliveries(request) {
    let page_token = '';
    do {
      const page = await this.listWebhookDeliveries({ ...request, page_token });
      yield* page.deliveries;
      page_token = page.next_page_token;
    } while (page_token);
  }

  /**
   * RedeliverWebhookEvent: sends a stored event to a webhook again (after the deliveries already
   * queued for it), with the same webhook-id header, and resolves to the new, pending
   * WebhookDelivery. For a delivery that FAILED, or a receiver that lost what it received. An
   * event no longer stored (past the event retention) rejects with NOT_FOUND.
   */
  async redeliverWebhookEvent(workspace_id, webhook_id, event_id) {
    const request = { workspace_id, webhook_id, event_id };
    return (await this.call(this.keys, 'RedeliverWebhookEvent', request, this.adminToken)).delivery;
  }

  /**
   * VerifyKey: resolves to { valid, code, key, retry_after }. A refused key (code
   * 'VERIFY_CODE_REVOKED', 'VERIFY_CODE_DISABLED', ...) is an answer, not an error; a rejected
   * promise means the request was bad or the service could not decide.
   */
  verifyKey(request) {
    return this.call(this.verifier, 'VerifyKey', request, this.verifyToken);
  }

  /** grpc.health.v1 Check: resolves to 'SERVING', 'NOT_SERVING', ... */
  async healthStatus(service = '') {
    return (await this.call(this.health, 'Check', { service })).status;
  }

  close() {
    this.verifier.close();
    this.health.close();
    this.keys.close();
  }
}

/**
 * True when watching again can succeed after this error: the service said it might
 * (UNAVAILABLE, ABORTED, DEADLINE_EXCEEDED, or a RetryInfo), or the connection broke under the
 * call (INTERNAL or UNKNOWN without key-authority's ErrorInfo). Never for EVENTS_PRUNED, refused
 * credentials or a bad request.
 */
function isResumable(error) {
  const details = errorDetails(error);
  const retryable = [grpc.status.UNAVAILABLE, grpc.status.ABORTED, grpc.status.DEADLINE_EXCEEDED];
  if (retryable.includes(details.code) || details.retryDelayMs !== null) return true;
  const transport = [grpc.status.INTERNAL, grpc.status.UNKNOWN];
  return transport.includes(details.code) && !details.reason;
}

// One WatchKeyEvents call's messages, collected from the moment it starts (so no event is lost
// before it is read), with backpressure: past WATCH_HIGH_WATER buffered messages it pauses.
class CallReader {
  constructor(call) {
    this.call = call;
    this.queue = [];
    this.ended = false;
    this.error = null;
    this.waiting = null;
    call.on('data', (message) => {
      this.queue.push(message);
      if (this.queue.length >= WATCH_HIGH_WATER) call.pause();
      this.wake();
    });
    call.on('end', () => {
      this.ended = true;
      this.wake();
    });
    call.on('error', (error) => {
      this.error = error;
      this.wake();
    });
  }

  wake() {
    const waiting = this.waiting;
    this.waiting = null;
    if (waiting) waiting();
  }

  /** The next message; null when the call ended cleanly; throws the call's error. */
  async read() {
    for (;;) {
      if (this.queue.length > 0) {
        const message = this.queue.shift();
        if (this.queue.length === 0) this.call.resume();
        return message;
      }
      if (this.error) throw this.error;
      if (this.ended) return null;
      await new Promise((resolve) => (this.waiting = resolve));
    }
  }
}

/**
 * The key events of KeyAuthority#watchKeyEvents: an async iterator of events in position order.
 * `lastPosition` is the position of the last event delivered (null before the first): store it
 * with whatever processing the event caused, and watch again after it. cancel() stops the watch
 * from anywhere; the iteration then ends without an error.
 */
class KeyEventWatch {
  constructor(openCall, request, { resume = false, signal } = {}) {
    this.resume = resume;
    this.lastPosition = null;
    this._openCall = openCall;
    this._request = {
      workspace_id: request.workspace_id ?? '',
      after_position: request.after_position ?? 0,
      from_now: request.from_now ?? false,
      all_workspaces: request.all_workspaces ?? false,
    };
    this._cancelled = false;
    this._reader = null;
    this._wakeSleep = null;
    // The first call starts now; `started` settles when the server started the watch (response
    // headers) or ended the call (rejecting with a refusal that resuming would not fix).
    const first = this._start();
    this.started = new Promise((resolve, reject) => {
      first.call.once('metadata', () => resolve());
      first.call.once('status', () => resolve());
      first.call.once('error', (error) =>
        this.resume && isResumable(error) ? resolve() : reject(error),
      );
    });
    this._events = this._run(first);
    if (signal) {
      if (signal.aborted) this.cancel();
      else signal.addEventListener('abort', () => this.cancel(), { once: true });
    }
  }

  get cancelled() {
    return this._cancelled;
  }

  /** Stops the watch: the call in progress is cancelled and the iteration ends. */
  cancel() {
    this._cancelled = true;
    if (this._reader) this._reader.call.cancel();
    if (this._wakeSleep) this._wakeSleep();
  }

  [Symbol.asyncIterator]() {
    return this;
  }

  next() {
    return this._events.next();
  }

  /** Called when a for-await loop is left early: cancels the watch. */
  return(value) {
    this.cancel();
    return this._events.return(value);
  }

  _start() {
    this._reader = new CallReader(this._openCall({ ...this._request }));
    return this._reader;
  }

  _sleep(ms) {
    return new Promise((resolve) => {
      const timer = setTimeout(resolve, ms);
      this._wakeSleep = () => {
        clearTimeout(timer);
        resolve();
      };
    }).finally(() => (this._wakeSleep = null));
  }

  async *_run(first) {
    let delay = RESUME_FIRST_DELAY_MS;
    let reader = first;
    try {
      while (!this._cancelled) {
        if (!reader) reader = this._start();
        let wait = null;
        try {
          for (;;) {
            const answer = await reader.read();
            if (answer === null) break;
            if (!answer.event) continue;
            this._request.after_position = answer.event.position;
            this._request.from_now = false;
            this.lastPosition = answer.event.position;
            delay = RESUME_FIRST_DELAY_MS;
            yield answer.event;
          }
          // The call ended cleanly: the server is shutting down.
          if (!this.resume) return;
        } catch (error) {
          if (this._cancelled) return;
          if (!this.resume || !isResumable(error)) throw error;
          wait = errorDetails(error).retryDelayMs;
        } finally {
          reader.call.cancel();
          reader = null;
          this._reader = null;
        }
        if (wait === null) wait = delay / 2 + (Math.random() * delay) / 2;
        delay = Math.min(delay * 2, RESUME_MAX_DELAY_MS);
        if (this._cancelled) return;
        await this._sleep(wait);
      }
    } finally {
      this._cancelled = true;
    }
  }
}

/**
 * Decodes the google.rpc details of a failed call from its `grpc-status-details-bin` trailer:
 * { code, codeName, message, reason, domain, metadata, retryDelayMs, fieldViolations }. `reason`
 * is stable, e.g. 'KEY_NOT_FOUND', 'ETAG_MISMATCH' (ABORTED: the key changed since its etag was
 * read), 'IDEMPOTENCY_KEY_REUSED' (FAILED_PRECONDITION: a request id sent with other
 * parameters) or EVENTS_PRUNED (OUT_OF_RANGE: a watch starts, or fell, behind the oldest key
 * event still kept; the message names that position: resynchronise, then watch from it or from
 * now).
 */
function errorDetails(error) {
  const details = {
    code: error.code,
    codeName: Object.keys(grpc.status).find((name) => grpc.status[name] === error.code),
    message: error.details,
    reason: '',
    domain: '',
    metadata: {},
    retryDelayMs: null,
    fieldViolations: [],
  };
  const [raw] = error.metadata ? error.metadata.get(DETAILS_TRAILER) : [];
  if (!raw) return details;
  const types = loadRpcTypes();
  const status = types.Status.decode(raw);
  details.message = status.message;
  const plain = { longs: Number, defaults: true };
  for (const any of status.details) {
    const typeName = any.type_url.slice(any.type_url.lastIndexOf('/') + 1);
    if (typeName === 'google.rpc.ErrorInfo') {
      const info = types.ErrorInfo.toObject(types.ErrorInfo.decode(any.value), plain);
      details.reason = info.reason;
      details.domain = info.domain;
      details.metadata = info.metadata;
    } else if (typeName === 'google.rpc.RetryInfo') {
      const retry = types.RetryInfo.toObject(types.RetryInfo.decode(any.value), plain);
      const delay = retry.retry_delay || { seconds: 0, nanos: 0 };
      details.retryDelayMs = delay.seconds * 1000 + delay.nanos / 1e6;
    } else if (typeName === 'google.rpc.BadRequest') {
      const bad = types.BadRequest.toObject(types.BadRequest.decode(any.value), plain);
      details.fieldViolations = bad.field_violations;
    }
  }
  return details;
}

module.exports = {
  KeyAuthority,
  KeyEventWatch,
  errorDetails,
  isResumable,
  ERROR_DOMAIN,
  EVENTS_PRUNED,
  UPDATABLE_FIELDS,
  protoDir,
  verifyWebhook,
  WebhookVerificationError,
  WEBHOOK_SECRET_PREFIX,
  DEFAULT_WEBHOOK_TOLERANCE_SECONDS,
};
