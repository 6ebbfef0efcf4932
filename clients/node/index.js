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

const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const protobuf = require('protobufjs');

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
 * Decodes the google.rpc details of a failed call from its `grpc-status-details-bin` trailer:
 * { code, codeName, message, reason, domain, metadata, retryDelayMs, fieldViolations }. `reason`
 * is stable, e.g. 'KEY_NOT_FOUND', 'ETAG_MISMATCH' (ABORTED: the key changed since its etag was
 * read) or 'IDEMPOTENCY_KEY_REUSED' (FAILED_PRECONDITION: a request id sent with other
 * parameters).
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

module.exports = { KeyAuthority, errorDetails, ERROR_DOMAIN, UPDATABLE_FIELDS, protoDir };
