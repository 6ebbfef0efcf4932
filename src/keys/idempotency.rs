//! Safe retries (AIP-155): a mutation that carries a request id is done once; a retry with the
//! same id and the same parameters gets the first call's result again, and changes nothing.
//!
//! - A request id belongs to its caller: its scope is `[workspace, actor kind, actor id]`, so
//!   another caller's identical id is another request.
//! - The request's parameters, as the workspace is resolved, are hashed into a fingerprint; the
//!   same id with another operation or fingerprint is `IdempotencyKeyReused`.
//! - The mutation's transaction first claims the id (`store::RequestClaim`): a duplicate running
//!   at the same time waits for it and then answers from the claim. A failed mutation leaves no
//!   claim, so its retry runs again.
//! - A key made by such a request gets a secret derived from a server-side key (HMAC-SHA256 over
//!   the claim's random salt, the scope and the request id), so its replay can return the same
//!   secret although no secret is stored. Once the claim is deleted (after the window), nothing
//!   can derive it again.

use std::future::Future;
use std::time::Duration;

use hmac::{Hmac, KeyInit, Mac};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::{
    Expiration, IssuedKey, KeyChanges, KeyManager, KeySpec, ReportUsage, RevokeKey, Revoked,
    RotateKey,
};
use crate::audit::{AuditActor, CallContext};
use crate::error::{Error, Result};
use crate::key::format::SEED_LEN;
use crate::key::{Brand, GeneratedKey, Key, KeyId, KeyName, WorkspaceId};
use crate::store::{DoneRequest, RequestClaim};
use crate::timestamp::{UnixMicros, duration_micros, now_micros};

/// The name of the idempotency key in `service_secret`, when no secret file is configured.
pub const SHARED_SECRET_NAME: &str = "idempotency";
/// The shortest idempotency key accepted from a file: 256 bits.
pub const MIN_SECRET_LEN: usize = 32;
/// Random bytes of a claim's salt; a key check of `KEY_CHECK_LEN` bytes follows them.
const SALT_LEN: usize = 32;
const KEY_CHECK_LEN: usize = 8;
/// A guard against a corrupt (cyclic) rotation chain when a revocation is replayed.
const MAX_REPLAYED_CHAIN: usize = 100_000;

/// A request id, as clients send it (`request_id`, or the `idempotency-key` header): a UUID in
/// any of its usual spellings, kept in the canonical lowercase, hyphenated form.
pub fn parse_request_id(field: &'static str, text: &str) -> Result<String> {
    uuid::Uuid::try_parse(text)
        .map(|id| id.hyphenated().to_string())
        .map_err(|_| {
            Error::invalid(
                field,
                "must be a UUID, such as 123e4567-e89b-12d3-a456-426614174000",
            )
        })
}

/// How long request ids are remembered, and the key replayed secrets are derived under.
#[derive(Clone, PartialEq, Eq)]
pub struct IdempotencyConfig {
    /// A retry within this long of the first call is answered from it; 0 switches safe retries
    /// off (request ids are still validated and recorded in the audit trail).
    pub window: Duration,
    /// The idempotency key, read from `--idempotency-secret-file`; `None` uses a key the
    /// replicas share through the database (`service_secret`).
    pub secret: Option<Vec<u8>>,
    /// How often claims older than the window are deleted.
    pub prune_interval: Duration,
    /// Claims deleted in one statement (the pruning repeats until none is left).
    pub prune_batch: u32,
}

impl Default for IdempotencyConfig {
    fn default() -> Self {
        Self {
            window: Duration::from_secs(24 * 60 * 60),
            secret: None,
            prune_interval: Duration::from_secs(60),
            prune_batch: 1000,
        }
    }
}

impl std::fmt::Debug for IdempotencyConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdempotencyConfig")
            .field("window", &self.window)
            .field("secret", &self.secret.as_ref().map(|_| "<from file>"))
            .field("prune_interval", &self.prune_interval)
            .field("prune_batch", &self.prune_batch)
            .finish()
    }
}

/// The operations that take a request id, by the name their claims carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    IssueKey,
    RotateKey,
    RevokeKey,
    UpdateKey,
    IssueTrialKey,
    ReportUsage,
}

impl Operation {
    const ALL: [Self; 6] = [
        Self::IssueKey,
        Self::RotateKey,
        Self::RevokeKey,
        Self::UpdateKey,
        Self::IssueTrialKey,
        Self::ReportUsage,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::IssueKey => "IssueKey",
            Self::RotateKey => "RotateKey",
            Self::RevokeKey => "RevokeKey",
            Self::UpdateKey => "UpdateKey",
            Self::IssueTrialKey => "IssueTrialKey",
            Self::ReportUsage => "ReportUsage",
        }
    }

    fn from_db(text: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|operation| operation.as_str() == text)
    }
}

/// A request that carries a request id: whose it is, which id, and what it asks.
#[derive(Debug, Clone)]
pub struct IdempotentRequest {
    /// `[workspace, actor kind, actor id]` as JSON.
    scope: String,
    request_id: String,
    operation: Operation,
    /// Hex SHA-256 of the operation and its parameters.
    fingerprint: String,
}

impl IdempotentRequest {
    /// The request of a call that carried a request id in `context`, by `actor` in
    /// `workspace_id`, asking `parameters` (from one of `issue`, `rotate`, …: a JSON array whose
    /// shape is fixed by the operation). `None` without a request id.
    fn new(
        context: &CallContext,
        workspace_id: &WorkspaceId,
        actor: &AuditActor,
        operation: Operation,
        parameters: Value,
    ) -> Option<Self> {
        if context.request_id.is_empty() {
            return None;
        }
        let scope = json!([workspace_id.as_str(), actor.kind.as_str(), actor.id]).to_string();
        // serde_json writes arrays and strings one way only, and every map here is a BTreeMap
        // (sorted): the same parameters always give the same bytes.
        let canonical = json!([operation.as_str(), workspace_id.as_str(), parameters]).to_string();
        Some(Self {
            scope,
            request_id: context.request_id.clone(),
            operation,
            fingerprint: hex(&Sha256::digest(canonical.as_bytes())),
        })
    }

    /// The claim the mutation writes first in its transaction.
    fn claim(
        &self,
        key_id: &KeyId,
        salt: Vec<u8>,
        now: UnixMicros,
        window: Duration,
    ) -> RequestClaim {
        self.claim_for(key_id.as_str(), salt, now, window)
    }

    /// The claim, naming the key it changes by its text (empty: many keys).
    fn claim_for(
        &self,
        key_id: &str,
        salt: Vec<u8>,
        now: UnixMicros,
        window: Duration,
    ) -> RequestClaim {
        RequestClaim {
            scope: self.scope.clone(),
            request_id: self.request_id.clone(),
            operation: self.operation.as_str(),
            fingerprint: self.fingerprint.clone(),
            key_id: key_id.to_owned(),
            salt,
            create_time: now,
            stale_before: now.saturating_sub(duration_micros(window)),
        }
    }

    /// `done` if it is this request; `IdempotencyKeyReused` if its id was used for another.
    fn same_as(&self, done: DoneRequest) -> Result<DoneRequest> {
        if done.operation == self.operation.as_str() && done.fingerprint == self.fingerprint {
            return Ok(done);
        }
        let used_for = Operation::from_db(&done.operation).map_or("another RPC", Operation::as_str);
        Err(Error::IdempotencyKeyReused(
            self.request_id.clone(),
            used_for,
        ))
    }
}

/// The server side of safe retries: the window, and the key replayed secrets are derived under.
pub struct Idempotency {
    key: Vec<u8>,
    window: Duration,
    /// Identifies `key` in every claim's salt, so that a replay under another key (a replica
    /// given another `--idempotency-secret-file`) fails instead of returning a wrong secret.
    key_check: [u8; KEY_CHECK_LEN],
}

impl std::fmt::Debug for Idempotency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Idempotency")
            .field("window", &self.window)
            .finish_non_exhaustive()
    }
}

impl Idempotency {
    pub fn new(key: Vec<u8>, window: Duration) -> Self {
        let check = mac(&key, &[b"key-authority idempotency key check v1"]);
        let mut key_check = [0; KEY_CHECK_LEN];
        key_check.copy_from_slice(&check[..KEY_CHECK_LEN]);
        Self {
            key,
            window,
            key_check,
        }
    }

    /// Safe retries with a key of this process alone: for a key manager nobody configured (a
    /// restart forgets it, so replays of earlier requests fail instead of answering).
    pub fn ephemeral(window: Duration) -> Self {
        let mut key = vec![0; MIN_SECRET_LEN];
        getrandom::fill(&mut key).expect("the OS random number generator failed");
        Self::new(key, window)
    }

    /// A new claim's salt: 32 random bytes, then the key check.
    fn salt(&self) -> Vec<u8> {
        let mut salt = vec![0; SALT_LEN + KEY_CHECK_LEN];
        getrandom::fill(&mut salt[..SALT_LEN]).expect("the OS random number generator failed");
        salt[SALT_LEN..].copy_from_slice(&self.key_check);
        salt
    }

    /// The seed of the secret of the key `request` made with `salt`: HMAC-SHA256 under the
    /// idempotency key of the salt, the scope and the request id, each length-prefixed.
    fn seed(&self, salt: &[u8], request: &IdempotentRequest) -> Result<[u8; SEED_LEN]> {
        let Some((random, check)) = salt.split_at_checked(SALT_LEN) else {
            return Err(Error::Internal(
                "a request claim has a short salt".to_owned(),
            ));
        };
        if check != self.key_check {
            return Err(Error::Internal(
                "the idempotency key changed since this request was made (or differs between \
                 replicas): its secret cannot be derived again"
                    .to_owned(),
            ));
        }
        let scope = request.scope.as_bytes();
        let request_id = request.request_id.as_bytes();
        Ok(mac(
            &self.key,
            &[
                b"key-authority secret seed v1",
                &(random.len() as u64).to_be_bytes(),
                random,
                &(scope.len() as u64).to_be_bytes(),
                scope,
                &(request_id.len() as u64).to_be_bytes(),
                request_id,
            ],
        ))
    }

    /// Claims made before this are forgotten: not replayed, and taken over by a new claim.
    fn forgotten_before(&self, now: UnixMicros) -> UnixMicros {
        now.saturating_sub(duration_micros(self.window))
    }
}

/// HMAC-SHA256 of the concatenated `parts` under `key`.
fn mac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut mac =
        <Hmac<Sha256> as KeyInit>::new_from_slice(key).expect("HMAC takes a key of any length");
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes
        .iter()
        .fold(String::with_capacity(2 * bytes.len()), |mut text, byte| {
            let _ = write!(text, "{byte:02x}");
            text
        })
}

/// The parameters of IssueKey (and of IssueTrialKey, whose key the server decides). A `ttl`
/// stays a duration: a retry a minute later asks for the same thing.
fn key_spec(spec: &KeySpec) -> Value {
    json!([
        spec.name.as_str(),
        spec.description.as_str(),
        spec.scopes.as_slice(),
        spec.environment.as_str(),
        spec.role.as_str(),
        expiration(Some(spec.expiration)),
        spec.metadata.as_map(),
        spec.usage_limit,
    ])
}

fn expiration(expiration: Option<Expiration>) -> Value {
    match expiration {
        None => json!([]),
        Some(Expiration::Never) => json!(["never"]),
        Some(Expiration::At(at)) => json!(["at", at]),
        Some(Expiration::After(ttl)) => json!(["after", duration(ttl)]),
    }
}

fn duration(duration: Duration) -> Value {
    json!([duration.as_secs(), duration.subsec_nanos()])
}

/// A setting an update may name: `[]` when not named, `[value]` when named (so that clearing
/// the expiry, `[null]`, differs from leaving it alone).
fn named<T: serde::Serialize>(value: Option<T>) -> Value {
    match value {
        None => json!([]),
        Some(value) => json!([value]),
    }
}

/// The parameters of UpdateKey: the key and the settings the mask named, with their values.
/// The etag is left out: it is a precondition of the first call, not part of what it asks, and
/// that call moves the key past it, so a client that re-read the key before retrying sends a
/// newer one.
fn update_parameters(key_id: &KeyId, changes: &KeyChanges) -> Value {
    json!([
        key_id.as_str(),
        named(changes.name.as_ref().map(KeyName::as_str)),
        named(
            changes
                .description
                .as_ref()
                .map(|description| description.as_str())
        ),
        named(changes.scopes.as_ref().map(|scopes| scopes.as_slice())),
        named(changes.role.map(|role| role.as_str())),
        named(changes.metadata.as_ref().map(|metadata| metadata.as_map())),
        named(changes.expire_time),
        named(changes.enabled),
    ])
}

impl KeyManager {
    /// The request a call is, if it carried a request id and safe retries are on.
    pub(super) fn idempotent_issue(
        &self,
        context: &CallContext,
        workspace_id: &WorkspaceId,
        actor: &AuditActor,
        spec: &KeySpec,
    ) -> Option<IdempotentRequest> {
        self.idempotent(
            context,
            workspace_id,
            actor,
            Operation::IssueKey,
            key_spec(spec),
        )
    }

    /// IssueTrialKey's request: only the name is the caller's to choose.
    pub(super) fn idempotent_trial(
        &self,
        context: &CallContext,
        actor: &AuditActor,
        name: &KeyName,
    ) -> Option<IdempotentRequest> {
        let workspace_id = &self.trial.workspace_id;
        let parameters = json!([name.as_str()]);
        self.idempotent(
            context,
            workspace_id,
            actor,
            Operation::IssueTrialKey,
            parameters,
        )
    }

    pub(super) fn idempotent_rotate(
        &self,
        context: &CallContext,
        workspace_id: &WorkspaceId,
        actor: &AuditActor,
        command: &RotateKey,
    ) -> Option<IdempotentRequest> {
        let parameters = json!([
            command.key_id.as_str(),
            command
                .grace_period
                .map_or(json!([]), |grace| json!([duration(grace)])),
            expiration(command.expiration),
        ]);
        self.idempotent(
            context,
            workspace_id,
            actor,
            Operation::RotateKey,
            parameters,
        )
    }

    pub(super) fn idempotent_revoke(
        &self,
        context: &CallContext,
        workspace_id: &WorkspaceId,
        actor: &AuditActor,
        command: &RevokeKey,
    ) -> Option<IdempotentRequest> {
        let parameters = json!([command.key_id.as_str(), command.revoke_successors]);
        self.idempotent(
            context,
            workspace_id,
            actor,
            Operation::RevokeKey,
            parameters,
        )
    }

    pub(super) fn idempotent_update(
        &self,
        context: &CallContext,
        workspace_id: &WorkspaceId,
        actor: &AuditActor,
        key_id: &KeyId,
        changes: &KeyChanges,
    ) -> Option<IdempotentRequest> {
        let parameters = update_parameters(key_id, changes);
        self.idempotent(
            context,
            workspace_id,
            actor,
            Operation::UpdateKey,
            parameters,
        )
    }

    /// A usage batch: its entries are its parameters, so the same request id with other counts
    /// is a reuse, not a retry.
    pub(super) fn idempotent_report(
        &self,
        context: &CallContext,
        workspace_id: &WorkspaceId,
        actor: &AuditActor,
        command: &ReportUsage,
    ) -> Option<IdempotentRequest> {
        let parameters: Vec<Value> = command
            .usage
            .iter()
            .map(|delta| json!([delta.key_id.as_str(), delta.requests, delta.last_used_time]))
            .collect();
        self.idempotent(
            context,
            workspace_id,
            actor,
            Operation::ReportUsage,
            Value::Array(parameters),
        )
    }

    /// The claim of a usage batch, which changes many keys and names none.
    pub(super) fn batch_claim(
        &self,
        request: Option<&IdempotentRequest>,
        now: UnixMicros,
    ) -> Option<RequestClaim> {
        request.map(|request| request.claim_for("", Vec::new(), now, self.idempotency.window))
    }

    fn idempotent(
        &self,
        context: &CallContext,
        workspace_id: &WorkspaceId,
        actor: &AuditActor,
        operation: Operation,
        parameters: Value,
    ) -> Option<IdempotentRequest> {
        if self.idempotency.window.is_zero() {
            return None;
        }
        IdempotentRequest::new(context, workspace_id, actor, operation, parameters)
    }

    /// Runs `mutation` once per request id. A request whose id a committed mutation claimed is
    /// answered by `replay` from that claim before `mutation` spends anything (rate limits,
    /// argon2, policy reads). So is one whose mutation failed because a concurrent duplicate
    /// committed first: its claim made ours fail (`DuplicateRequest`), or its change made one of
    /// our checks fail ("already rotated"). Without a request id, just `mutation`.
    pub(super) async fn once<T>(
        &self,
        request: Option<&IdempotentRequest>,
        mutation: impl Future<Output = Result<T>>,
        replay: impl AsyncFnOnce(&IdempotentRequest, DoneRequest) -> Result<T>,
    ) -> Result<T> {
        let Some(request) = request else {
            return mutation.await;
        };
        if let Some(done) = self.done(request).await? {
            return replay(request, done).await;
        }
        let error = match mutation.await {
            Ok(result) => return Ok(result),
            Err(error) => error,
        };
        match self.done(request).await {
            Ok(Some(done)) => replay(request, done).await,
            // A claim that vanished again (pruned, or past the window) leaves a retry to
            // the client.
            Ok(None) if matches!(error, Error::DuplicateRequest) => Err(Error::Conflict),
            Ok(None) => Err(error),
            Err(reused @ Error::IdempotencyKeyReused(..)) => Err(reused),
            // The lookup failed too: the mutation's own error says more.
            Err(_) => Err(error),
        }
    }

    /// Deletes the claims made before the window, `batch` at a time, until none is left;
    /// returns how many were deleted.
    pub async fn prune_requests(&self, batch: u32) -> Result<u64> {
        let before = self.idempotency.forgotten_before(now_micros());
        let batch = batch.max(1);
        let mut deleted = 0;
        loop {
            let taken = self.store.delete_requests_before(before, batch).await?;
            deleted += taken;
            if taken < u64::from(batch) {
                return Ok(deleted);
            }
        }
    }

    /// The committed request `request` repeats, if any within the window.
    async fn done(&self, request: &IdempotentRequest) -> Result<Option<DoneRequest>> {
        let Some(done) = self
            .store
            .find_request(&request.scope, &request.request_id)
            .await?
        else {
            return Ok(None);
        };
        // Past the window a claim is forgotten, even before the pruning deletes it.
        if done.create_time < self.idempotency.forgotten_before(now_micros()) {
            return Ok(None);
        }
        request.same_as(done).map(Some)
    }

    /// A new key's id and secret, and for a request with a request id the claim that lets a
    /// replay derive the same secret again.
    pub(super) fn new_secret(
        &self,
        template: &Key,
        request: Option<&IdempotentRequest>,
    ) -> Result<(GeneratedKey, Option<RequestClaim>)> {
        let Some(request) = request else {
            return Ok((
                GeneratedKey::generate(&self.brand, template.environment),
                None,
            ));
        };
        let key_id = KeyId::generate();
        let salt = self.idempotency.salt();
        let seed = self.idempotency.seed(&salt, request)?;
        let generated = GeneratedKey::derived(&self.brand, template.environment, key_id, &seed);
        let claim = request.claim(
            &generated.key_id,
            salt,
            template.create_time,
            self.idempotency.window,
        );
        Ok((generated, Some(claim)))
    }

    /// The claim of a request that changes `key_id` and makes no secret.
    pub(super) fn claim(
        &self,
        request: Option<&IdempotentRequest>,
        key_id: &KeyId,
        now: UnixMicros,
    ) -> Option<RequestClaim> {
        request.map(|request| request.claim(key_id, Vec::new(), now, self.idempotency.window))
    }

    /// IssueKey's and IssueTrialKey's replay: the key as it is now, with its secret derived
    /// again.
    pub(super) async fn replay_issue(
        &self,
        workspace_id: &WorkspaceId,
        request: &IdempotentRequest,
        done: DoneRequest,
    ) -> Result<IssuedKey> {
        let key = self.find(workspace_id, &claimed_key_id(&done)?).await?;
        let plaintext = self.derived_plaintext(&key, request, &done)?;
        tracing::info!(key_prefix = %key.prefix, "issue replayed");
        Ok(IssuedKey { key, plaintext })
    }

    /// RotateKey's replay: the successor as it is now with its secret derived again, and the
    /// key it replaced as it is now.
    pub(super) async fn replay_rotation(
        &self,
        workspace_id: &WorkspaceId,
        request: &IdempotentRequest,
        done: DoneRequest,
    ) -> Result<(IssuedKey, Key)> {
        let successor = self.find(workspace_id, &claimed_key_id(&done)?).await?;
        let Some(previous_id) = &successor.rotated_from_key_id else {
            return Err(Error::Internal(
                "a rotation's claim names a key that replaced none".to_owned(),
            ));
        };
        let previous = self.find(workspace_id, previous_id).await?;
        let plaintext = self.derived_plaintext(&successor, request, &done)?;
        tracing::info!(key_prefix = %previous.prefix, successor_prefix = %successor.prefix, "rotation replayed");
        Ok((
            IssuedKey {
                key: successor,
                plaintext,
            },
            previous,
        ))
    }

    /// RevokeKey's replay: the key and, if the request asked for them, its successors, as they
    /// are now.
    pub(super) async fn replay_revocation(
        &self,
        workspace_id: &WorkspaceId,
        command: &RevokeKey,
    ) -> Result<Revoked> {
        let key = self.find(workspace_id, &command.key_id).await?;
        let mut successors = Vec::new();
        let mut next = key
            .rotated_to_key_id
            .clone()
            .filter(|_| command.revoke_successors);
        while let Some(successor_id) = next {
            if successors.len() >= MAX_REPLAYED_CHAIN {
                return Err(Error::Internal(format!(
                    "rotation chain of key {} is longer than {MAX_REPLAYED_CHAIN}",
                    command.key_id
                )));
            }
            let Some(successor) = self.store.get_key(workspace_id, &successor_id).await? else {
                break;
            };
            next = successor.rotated_to_key_id.clone();
            successors.push(successor);
        }
        tracing::info!(key_prefix = %key.prefix, "revocation replayed");
        Ok(Revoked { key, successors })
    }

    /// UpdateKey's replay: the key as it is now.
    pub(super) async fn replay_update(
        &self,
        workspace_id: &WorkspaceId,
        key_id: &KeyId,
    ) -> Result<Key> {
        let key = self.find(workspace_id, key_id).await?;
        tracing::info!(key_prefix = %key.prefix, "update replayed");
        Ok(key)
    }

    /// The plaintext of `key`, made by `request` under `done`'s claim, derived again. The key's
    /// own brand is used: the operator may have changed `--key-prefix` since.
    fn derived_plaintext(
        &self,
        key: &Key,
        request: &IdempotentRequest,
        done: &DoneRequest,
    ) -> Result<String> {
        let seed = self.idempotency.seed(&done.salt, request)?;
        let brand = key
            .prefix
            .split_once('_')
            .and_then(|(brand, _)| Brand::parse(brand).ok())
            .ok_or_else(|| Error::Internal(format!("key {} has no brand", key.key_id)))?;
        let derived = GeneratedKey::derived(&brand, key.environment, key.key_id.clone(), &seed);
        if derived.prefix != key.prefix {
            return Err(Error::Internal(format!(
                "the derived key does not match key {}",
                key.key_id
            )));
        }
        Ok(derived.plaintext)
    }
}

fn claimed_key_id(done: &DoneRequest) -> Result<KeyId> {
    KeyId::parse(&done.key_id)
        .ok_or_else(|| Error::Internal("a request claim names no valid key id".to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn context(request_id: &str) -> CallContext {
        CallContext {
            request_id: request_id.to_owned(),
            ..CallContext::default()
        }
    }

    const ID: &str = "123e4567-e89b-12d3-a456-426614174000";

    fn acme() -> WorkspaceId {
        WorkspaceId::parse("acme").unwrap()
    }

    fn request(actor: &AuditActor, parameters: Value) -> IdempotentRequest {
        IdempotentRequest::new(
            &context(ID),
            &acme(),
            actor,
            Operation::RevokeKey,
            parameters,
        )
        .unwrap()
    }

    #[test]
    fn request_ids_parse_into_one_canonical_form() {
        assert_eq!(
            parse_request_id("request_id", "123E4567E89B12D3A456426614174000").unwrap(),
            ID
        );
        assert!(parse_request_id("request_id", "not-a-uuid").is_err());
    }

    #[test]
    fn no_request_id_is_no_idempotent_request() {
        let actor = AuditActor::admin();
        let made = IdempotentRequest::new(
            &context(""),
            &acme(),
            &actor,
            Operation::IssueKey,
            json!([]),
        );
        assert!(made.is_none());
    }

    #[test]
    fn scope_is_the_workspace_and_the_caller() {
        let admin = request(&AuditActor::admin(), json!(["k"]));
        assert_eq!(admin.scope, r#"["acme","admin","admin"]"#);
        let user = request(&AuditActor::user("alice"), json!(["k"]));
        assert_eq!(user.scope, r#"["acme","user","alice"]"#);
        // The parameters are the same: only the scope tells the two callers apart.
        assert_eq!(admin.fingerprint, user.fingerprint);
    }

    #[test]
    fn fingerprint_covers_operation_workspace_and_parameters() {
        let actor = AuditActor::admin();
        let base = request(&actor, json!(["k", false]));
        assert_eq!(base.fingerprint.len(), 64);
        assert_eq!(
            base.fingerprint,
            request(&actor, json!(["k", false])).fingerprint
        );
        assert_ne!(
            base.fingerprint,
            request(&actor, json!(["k", true])).fingerprint
        );
        let other_operation = IdempotentRequest::new(
            &context(ID),
            &acme(),
            &actor,
            Operation::UpdateKey,
            json!(["k", false]),
        )
        .unwrap();
        assert_ne!(base.fingerprint, other_operation.fingerprint);
        let other_workspace = IdempotentRequest::new(
            &context(ID),
            &WorkspaceId::parse("globex").unwrap(),
            &actor,
            Operation::RevokeKey,
            json!(["k", false]),
        )
        .unwrap();
        assert_ne!(base.fingerprint, other_workspace.fingerprint);
    }

    #[test]
    fn an_update_that_clears_the_expiry_differs_from_one_that_leaves_it() {
        let key_id = KeyId::parse("abcdefghijkl").unwrap();
        let leave = update_parameters(&key_id, &KeyChanges::default());
        let clear = update_parameters(
            &key_id,
            &KeyChanges {
                expire_time: Some(None),
                ..KeyChanges::default()
            },
        );
        assert_ne!(leave, clear);
    }

    #[test]
    fn reuse_for_another_request_is_refused() {
        let request = request(&AuditActor::admin(), json!(["k", false]));
        let done = DoneRequest {
            operation: "RevokeKey".to_owned(),
            fingerprint: request.fingerprint.clone(),
            key_id: "abcdefghijkl".to_owned(),
            salt: Vec::new(),
            create_time: 0,
        };
        assert!(request.same_as(done.clone()).is_ok());
        let other = DoneRequest {
            fingerprint: "0".repeat(64),
            ..done.clone()
        };
        assert!(matches!(
            request.same_as(other),
            Err(Error::IdempotencyKeyReused(id, "RevokeKey")) if id == ID
        ));
        let issue = DoneRequest {
            operation: "IssueKey".to_owned(),
            ..done
        };
        assert!(matches!(
            request.same_as(issue),
            Err(Error::IdempotencyKeyReused(_, "IssueKey"))
        ));
    }

    #[test]
    fn seeds_are_deterministic_per_salt_and_request() {
        let idempotency = Idempotency::new(vec![1; 32], Duration::from_secs(60));
        let request = request(&AuditActor::admin(), json!([]));
        let salt = idempotency.salt();
        assert_eq!(salt.len(), SALT_LEN + KEY_CHECK_LEN);
        let seed = idempotency.seed(&salt, &request).unwrap();
        assert_eq!(seed, idempotency.seed(&salt, &request).unwrap());
        assert_ne!(
            seed,
            idempotency.seed(&idempotency.salt(), &request).unwrap()
        );
        let other_caller = self::request(&AuditActor::user("alice"), json!([]));
        assert_ne!(seed, idempotency.seed(&salt, &other_caller).unwrap());
    }

    #[test]
    fn another_idempotency_key_cannot_replay() {
        let first = Idempotency::new(vec![1; 32], Duration::from_secs(60));
        let second = Idempotency::new(vec![2; 32], Duration::from_secs(60));
        let request = request(&AuditActor::admin(), json!([]));
        let salt = first.salt();
        assert!(matches!(
            second.seed(&salt, &request),
            Err(Error::Internal(_))
        ));
        assert!(first.seed(&salt[..SALT_LEN], &request).is_err());
    }

    #[test]
    fn the_config_never_shows_the_secret() {
        let config = IdempotencyConfig {
            secret: Some(b"very secret idempotency key bytes".to_vec()),
            ..IdempotencyConfig::default()
        };
        assert!(!format!("{config:?}").contains("very secret"));
    }
}
