//! Key management: the operations behind KeyService, in domain types. Each takes the caller and
//! its command, asks `auth::policy` whether the caller may, and does it. Every mutation is one
//! database transaction with its audit record; every read and write is scoped to a workspace.

pub mod commands;
pub mod idempotency;
pub mod page_token;
mod usage_report;

use std::sync::Arc;
use std::time::Duration;

pub use crate::auth::policy::{API_KEY_MAX_ROTATION_GRACE, Actor, RotationRights};
pub use commands::{
    Expiration, GetKey, IssueKey, IssueTrialKey, KeyChanges, KeySpec, ListAuditEvents, ListKeys,
    ReportUsage, RevokeKey, RevokeTrialKey, RotateKey, UpdateKey, WatchKeyEvents,
};
pub use usage_report::UsageReported;

use crate::audit::{
    self, ActorKind, AuditAction, AuditEvent, AuditOutcome, AuditQuery, AuditRecord, CallContext,
};
use crate::auth::RateLimits;
use crate::auth::policy::{self, Action, Caller, Origin};
use crate::error::{Error, Result};
use crate::events::{EventHub, EventSubscription};
use crate::key::format::KEY_ID_LEN;
use crate::key::{
    Brand, Environment, GeneratedKey, HashPool, Key, KeyDescription, KeyId, KeyName, KeyState,
    Metadata, Role, Scopes, StoredKey, WorkspaceId,
};
use crate::store::{ListQuery, Mutation, Store};
use crate::timestamp::{self, UnixMicros, duration_micros, now_micros};
use crate::verify::Invalidator;
use idempotency::{Idempotency, IdempotencyConfig, IdempotentRequest};
use page_token::PageTokenCodec;

pub const DEFAULT_PAGE_SIZE: u32 = 50;
pub const MAX_PAGE_SIZE: u32 = 1000;
pub const DEFAULT_GRACE_PERIOD: Duration = Duration::from_secs(24 * 60 * 60);
/// How often a freshly generated key id may collide before issuing gives up (71 random bits:
/// even one collision is practically impossible).
const KEY_ID_ATTEMPTS: usize = 3;
/// How often UpdateKey without an etag re-reads a key that changed under it before giving up
/// with a conflict (each round is two fast statements).
const UPDATE_ATTEMPTS: usize = 5;

/// What IssueTrialKey makes, and whether it makes anything.
#[derive(Debug, Clone)]
pub struct TrialConfig {
    /// IssueTrialKey and RevokeTrialKey answer at all (`--trial-keys`).
    pub enabled: bool,
    /// The workspace trial keys belong to.
    pub workspace_id: WorkspaceId,
    pub ttl: Duration,
    pub usage_limit: i64,
    /// How long an expired trial key is kept (readable, and verifying as EXPIRED) before the
    /// background sweep deletes it.
    pub retention: Duration,
    /// How often the sweep looks for trial keys to delete.
    pub sweep_interval: Duration,
    /// Trial keys the sweep deletes in one transaction (it repeats until none is left).
    pub sweep_batch: u32,
}

impl Default for TrialConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            workspace_id: WorkspaceId::parse("trial").expect("a valid workspace id"),
            ttl: Duration::from_secs(30 * 60),
            usage_limit: 10,
            retention: Duration::from_secs(24 * 60 * 60),
            sweep_interval: Duration::from_secs(60),
            sweep_batch: 500,
        }
    }
}

/// Bounds on what a request may ask of a key's lifetime.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyLimits {
    /// The furthest an expiry may be from now; `None` allows any expiry a protobuf Timestamp can
    /// carry (up to the end of year 9999).
    pub max_key_lifetime: Option<Duration>,
    /// The longest grace period RotateKey may give the old key.
    pub max_rotation_grace: Duration,
}

impl Default for KeyLimits {
    fn default() -> Self {
        Self {
            // Ten years of 365.25 days, as humantime counts them ("10years" in flags and errors).
            max_key_lifetime: Some(Duration::from_secs(315_576_000)),
            max_rotation_grace: Duration::from_secs(7 * 24 * 60 * 60),
        }
    }
}

/// What RevokeKey did: the key and, when asked for, its successors in rotation order.
#[derive(Debug)]
pub struct Revoked {
    pub key: Key,
    pub successors: Vec<Key>,
}

/// A key and its plaintext, returned once.
pub struct IssuedKey {
    pub key: Key,
    pub plaintext: String,
}

/// One page of ListAuditEvents.
#[derive(Debug)]
pub struct AuditPage {
    pub events: Vec<AuditEvent>,
    pub next_page_token: Option<String>,
}

/// One page of ListKeys.
#[derive(Debug)]
pub struct KeyPage {
    pub keys: Vec<Key>,
    pub next_page_token: Option<String>,
    pub total_size: i64,
}

pub struct KeyManager {
    store: Arc<dyn Store>,
    hashes: HashPool,
    brand: Brand,
    page_tokens: PageTokenCodec,
    invalidator: Invalidator,
    trial: TrialConfig,
    limits: KeyLimits,
    rate_limits: RateLimits,
    idempotency: Idempotency,
    /// WatchKeyEvents' watchers; none in tools and tests that build a manager alone.
    events: Option<EventHub>,
}

impl KeyManager {
    pub fn new(
        store: Arc<dyn Store>,
        hashes: HashPool,
        brand: Brand,
        page_tokens: PageTokenCodec,
        invalidator: Invalidator,
        trial: TrialConfig,
    ) -> Self {
        Self {
            store,
            hashes,
            brand,
            page_tokens,
            invalidator,
            trial,
            limits: KeyLimits::default(),
            // No IssueKey limit and no trial keys, until the server passes the operator's.
            rate_limits: RateLimits::new(0, 0, 0),
            // A key of this process alone, until the server passes the one replicas share.
            idempotency: Idempotency::ephemeral(IdempotencyConfig::default().window),
            events: None,
        }
    }

    /// The same manager serving WatchKeyEvents from `events`.
    pub fn with_events(mut self, events: EventHub) -> Self {
        self.events = Some(events);
        self
    }

    /// The same manager with this window and idempotency key for safe retries.
    pub fn with_idempotency(mut self, idempotency: Idempotency) -> Self {
        self.idempotency = idempotency;
        self
    }

    /// The same manager with these rate limits.
    pub fn with_rate_limits(mut self, rate_limits: RateLimits) -> Self {
        self.rate_limits = rate_limits;
        self
    }

    /// The same manager with other lifetime bounds.
    pub fn with_limits(mut self, limits: KeyLimits) -> Self {
        self.limits = limits;
        self
    }

    pub fn trial_config(&self) -> &TrialConfig {
        &self.trial
    }

    /// Deletes trial keys that expired more than the retention ago, in batches, until none is
    /// left; returns how many were deleted.
    pub async fn sweep_trial_keys(&self) -> Result<u64> {
        let before = now_micros().saturating_sub(duration_micros(self.trial.retention));
        let batch_size = self.trial.sweep_batch.max(1);
        let mut deleted = 0;
        loop {
            let batch = self
                .store
                .delete_ended_trial_keys(before, batch_size)
                .await?;
            deleted += batch;
            if batch < u64::from(batch_size) {
                return Ok(deleted);
            }
        }
    }

    /// IssueTrialKey: a key with environment and role TRIAL, a short TTL and a usage limit,
    /// for an anonymous caller, within the per-address rate limit.
    pub async fn issue_trial(
        &self,
        origin: &Origin,
        context: &CallContext,
        command: IssueTrialKey,
    ) -> Result<IssuedKey> {
        self.ensure_trial_enabled()?;
        let client_ip = origin.end_user_ip(&command.client_ip)?;
        let context = &end_user_context(origin, context, &command.client_ip);
        let name = match command.name.as_str() {
            "" => "trial",
            name => name,
        };
        let name = KeyName::parse(name).map_err(|reason| Error::invalid("name", reason))?;
        let actor = Actor::trial(&context.client_ip);
        let workspace_id = &self.trial.workspace_id;
        // A replay spends no rate limit: it is looked up first.
        let request = self.idempotent_trial(context, actor.audit(), &name);
        let issue = async {
            self.rate_limits.trial.check(&client_ip)?;
            let trial = KeySpec {
                name,
                description: KeyDescription::default(),
                scopes: Scopes::default(),
                environment: Environment::Trial,
                role: Role::Trial,
                expiration: Expiration::After(self.trial.ttl),
                metadata: Metadata::default(),
                usage_limit: self.trial.usage_limit,
            };
            let audit = self.audit(AuditAction::IssueTrial, &actor, now_micros(), context);
            let request = request.as_ref();
            self.create_once(workspace_id.clone(), trial, &actor, audit, request)
                .await
        };
        let replay = async |request: &IdempotentRequest, done| {
            self.replay_issue(workspace_id, request, done).await
        };
        self.once(request.as_ref(), issue, replay).await
    }

    /// RevokeTrialKey: revokes the trial key named by its public prefix (or its whole text),
    /// within the per-address rate limit. Any other key is simply not found: this path can
    /// revoke nothing but trial keys.
    pub async fn revoke_trial(
        &self,
        origin: &Origin,
        context: &CallContext,
        command: RevokeTrialKey,
    ) -> Result<Key> {
        self.ensure_trial_enabled()?;
        let client_ip = origin.end_user_ip(&command.client_ip)?;
        let context = &end_user_context(origin, context, &command.client_ip);
        self.rate_limits.trial_revoke.check(&client_ip)?;
        let key_id = trial_key_id(&command.prefix)?;
        let Some(stored) = self.store.find_key_for_verify(&key_id).await? else {
            return Err(Error::KeyNotFound);
        };
        if stored.key.environment != Environment::Trial {
            return Err(Error::KeyNotFound);
        }
        let actor = Actor::trial(&context.client_ip);
        let audit = self.audit(AuditAction::RevokeTrial, &actor, now_micros(), context);
        Ok(self
            .revoke_in(&stored.key.workspace_id, &key_id, false, &actor, audit)
            .await?
            .key)
    }

    /// Refuses trial-key calls when the operator switched them off.
    pub fn ensure_trial_enabled(&self) -> Result<()> {
        if self.trial.enabled {
            Ok(())
        } else {
            Err(Error::TrialKeysDisabled)
        }
    }

    /// IssueKey: a new key in the caller's workspace (an admin's: the one it names), with a role
    /// no higher than the caller's, within the caller's rate limit.
    pub async fn issue(
        &self,
        caller: &Caller,
        context: &CallContext,
        command: IssueKey,
    ) -> Result<IssuedKey> {
        let workspace_id = caller.workspace_for(&command.workspace_id)?;
        let key = command.key;
        policy::check_issuable(key.role, key.environment)?;
        caller.authorize(Action::Issue { role: key.role })?;
        let actor = caller.actor();
        // A replay spends no rate limit: it is looked up first.
        let request = self.idempotent_issue(context, &workspace_id, actor.audit(), &key);
        let issue = async {
            if let Some(limit_key) = caller.rate_limit_key() {
                self.rate_limits
                    .issue
                    .check(&limit_key)
                    .map_err(Error::RateLimited)?;
            }
            let audit = self.audit(AuditAction::Issue, &actor, now_micros(), context);
            let request = request.as_ref();
            self.create_once(workspace_id.clone(), key, &actor, audit, request)
                .await
        };
        let replay = async |request: &IdempotentRequest, done| {
            self.replay_issue(&workspace_id, request, done).await
        };
        self.once(request.as_ref(), issue, replay).await
    }

    /// Creates a key that was decided on, with its audit event (`audit`, to which the new key's
    /// settings are added). Also for tests and tools that act as the service.
    pub async fn create(
        &self,
        workspace_id: WorkspaceId,
        new: KeySpec,
        actor: &Actor,
        audit: AuditRecord,
    ) -> Result<IssuedKey> {
        self.create_once(workspace_id, new, actor, audit, None)
            .await
    }

    /// `create`, claiming `request`'s id if there is one (its secret is then derived, so that
    /// a replay can give it again).
    #[tracing::instrument(name = "keys.issue", skip_all, fields(workspace_id = %workspace_id.as_str()))]
    async fn create_once(
        &self,
        workspace_id: WorkspaceId,
        new: KeySpec,
        actor: &Actor,
        audit: AuditRecord,
        request: Option<&IdempotentRequest>,
    ) -> Result<IssuedKey> {
        let now = audit.occur_time;
        let expire_time = self.expire_time(new.expiration, now)?;
        let template = Key {
            key_id: KeyId::generate(),
            workspace_id,
            name: new.name,
            description: new.description,
            prefix: String::new(),
            scopes: new.scopes,
            role: new.role,
            environment: new.environment,
            create_time: now,
            expire_time,
            revoke_time: None,
            last_used_time: None,
            total_requests: 0,
            metadata: new.metadata,
            rotated_from_key_id: None,
            rotated_to_key_id: None,
            created_by: actor.as_str().to_owned(),
            revoked_by: None,
            usage_limit: new.usage_limit,
            usage_remaining: new.usage_limit,
            // A limited key starts a chain with its own budget (see `mint`).
            budget_id: None,
            enabled: true,
            version: 1,
            update_time: None,
        };
        let audit = audit.with_changes(audit::issued(&template));
        for _ in 0..KEY_ID_ATTEMPTS {
            let (generated, claim) = self.new_secret(&template, request)?;
            let (stored, plaintext) = self.mint(&template, generated).await?;
            let mutation = Mutation::new(audit.clone(), claim);
            match self.store.insert_key(&stored, &mutation).await {
                Ok(()) => {
                    tracing::info!(key_prefix = %stored.key.prefix, "key issued");
                    return Ok(IssuedKey {
                        key: stored.key,
                        plaintext,
                    });
                }
                Err(Error::Conflict) => continue,
                Err(other) => return Err(other),
            }
        }
        Err(Error::Internal("key id collided repeatedly".to_owned()))
    }

    /// GetKey: a key of the caller's workspace.
    pub async fn get(&self, caller: &Caller, _: &CallContext, command: GetKey) -> Result<Key> {
        let workspace_id = caller.workspace_for(&command.workspace_id)?;
        caller.authorize(Action::Read)?;
        self.find(&workspace_id, &command.key_id).await
    }

    async fn find(&self, workspace_id: &WorkspaceId, key_id: &KeyId) -> Result<Key> {
        self.store
            .get_key(workspace_id, key_id)
            .await?
            .ok_or(Error::KeyNotFound)
    }

    /// ListKeys: a page of the caller's workspace's keys, newest first.
    #[tracing::instrument(name = "keys.list", skip_all)]
    pub async fn list(
        &self,
        caller: &Caller,
        _: &CallContext,
        request: ListKeys,
    ) -> Result<KeyPage> {
        let workspace_id = caller.workspace_for(&request.workspace_id)?;
        caller.authorize(Action::Read)?;
        let after = if request.page_token.is_empty() {
            None
        } else {
            Some(self.page_tokens.decode(
                &request.page_token,
                &workspace_id,
                request.include_inactive,
            )?)
        };
        let limit = request.page_size.clamp(1, MAX_PAGE_SIZE);
        let query = ListQuery {
            workspace_id: workspace_id.clone(),
            include_inactive: request.include_inactive,
            after,
            // One extra row tells whether another page follows without a second query.
            limit: limit + 1,
            now: now_micros(),
        };
        let (mut keys, total_size) = self.store.list_keys(&query).await?;
        let next_page_token = if keys.len() > limit as usize {
            keys.truncate(limit as usize);
            keys.last().map(|last| {
                self.page_tokens.encode(
                    &workspace_id,
                    request.include_inactive,
                    last.create_time,
                    &last.key_id,
                )
            })
        } else {
            None
        };
        Ok(KeyPage {
            keys,
            next_page_token,
            total_size,
        })
    }

    /// RevokeKey: revokes a key of the caller's workspace (an API key may always revoke itself)
    /// and, when asked by a caller that may revoke other keys, every key its rotations led to.
    pub async fn revoke(
        &self,
        caller: &Caller,
        context: &CallContext,
        command: RevokeKey,
    ) -> Result<Revoked> {
        let workspace_id = caller.workspace_for(&command.workspace_id)?;
        caller.authorize(Action::Revoke {
            key_id: command.key_id.as_str(),
        })?;
        if command.revoke_successors {
            caller.authorize(Action::RevokeWithSuccessors)?;
        }
        let actor = caller.actor();
        let request = self.idempotent_revoke(context, &workspace_id, actor.audit(), &command);
        let revoke = async {
            let now = now_micros();
            let audit = self.audit(AuditAction::Revoke, &actor, now, context);
            let claim = self.claim(request.as_ref(), &command.key_id, now);
            let mutation = Mutation::new(audit, claim);
            let successors = command.revoke_successors;
            self.revoke_with(
                &workspace_id,
                &command.key_id,
                successors,
                &actor,
                &mutation,
            )
            .await
        };
        let replay =
            async |_: &IdempotentRequest, _| self.replay_revocation(&workspace_id, &command).await;
        self.once(request.as_ref(), revoke, replay).await
    }

    /// Revokes a key and, with `successors`, every key its rotations led to, in one
    /// transaction with their audit events (`audit`, to which the store adds what changed).
    pub async fn revoke_in(
        &self,
        workspace_id: &WorkspaceId,
        key_id: &KeyId,
        successors: bool,
        actor: &Actor,
        audit: AuditRecord,
    ) -> Result<Revoked> {
        let mutation = Mutation::new(audit, None);
        self.revoke_with(workspace_id, key_id, successors, actor, &mutation)
            .await
    }

    /// `revoke_in` with the mutation's claim, if any.
    #[tracing::instrument(name = "keys.revoke", skip_all, fields(key_id = %key_id, successors))]
    async fn revoke_with(
        &self,
        workspace_id: &WorkspaceId,
        key_id: &KeyId,
        successors: bool,
        actor: &Actor,
        mutation: &Mutation,
    ) -> Result<Revoked> {
        let revocation = self
            .store
            .revoke_key(workspace_id, key_id, successors, actor.as_str(), mutation)
            .await?
            .ok_or(Error::KeyNotFound)?;
        // Read your writes: this replica's next VerifyKey must see every revocation.
        for revoked in &revocation.newly_revoked {
            self.invalidator.key_changed(revoked.as_str()).await;
        }
        tracing::info!(
            key_prefix = %revocation.key.prefix,
            successors_revoked = revocation.newly_revoked.len().saturating_sub(1),
            "key revoked"
        );
        Ok(Revoked {
            key: revocation.key,
            successors: revocation.successors,
        })
    }

    /// UpdateKey: changes the settings the command names, if the caller may (`Action::Update`,
    /// then `policy::check_update` on the key before and after). Optimistic: the write applies
    /// only to the version read, so a concurrent change is either reported (the caller's etag
    /// no longer matches) or read again and decided anew.
    #[tracing::instrument(name = "keys.update", skip_all, fields(key_id = %command.key_id))]
    pub async fn update(
        &self,
        caller: &Caller,
        context: &CallContext,
        command: UpdateKey,
    ) -> Result<Key> {
        let workspace_id = caller.workspace_for(&command.workspace_id)?;
        let key_id = &command.key_id;
        caller.authorize(Action::Update {
            key_id: key_id.as_str(),
        })?;
        let actor = caller.actor();
        let changes = &command.changes;
        let request =
            self.idempotent_update(context, &workspace_id, actor.audit(), key_id, changes);
        let update = self.update_once(caller, context, &command, &workspace_id, request.as_ref());
        let replay =
            async |_: &IdempotentRequest, _| self.replay_update(&workspace_id, key_id).await;
        self.once(request.as_ref(), update, replay).await
    }

    /// `update`'s work, claiming `request`'s id (if any) with the change it writes.
    async fn update_once(
        &self,
        caller: &Caller,
        context: &CallContext,
        command: &UpdateKey,
        workspace_id: &WorkspaceId,
        request: Option<&IdempotentRequest>,
    ) -> Result<Key> {
        let key_id = &command.key_id;
        let actor = caller.actor();
        for _ in 0..UPDATE_ATTEMPTS {
            let before = self.find(workspace_id, key_id).await?;
            let now = now_micros();
            // A final state first: an etag read before a revocation would only send the caller
            // round again to learn that the key is revoked.
            ensure_updatable(&before, now)?;
            if command
                .expected_version
                .is_some_and(|expected| expected != before.version)
            {
                return Err(Error::EtagMismatch);
            }
            let after = self.updated(&before, &command.changes, now)?;
            policy::check_update(caller, &before, &after)?;
            let changes = audit::differences(&before, &after);
            let action = match (before.enabled, after.enabled) {
                (true, false) => AuditAction::Disable,
                (false, true) => AuditAction::Enable,
                _ => AuditAction::Update,
            };
            let audit = self.audit(action, &actor, now, context);
            if changes.is_empty() {
                // Nothing to write, but the call still leaves its one event.
                let unchanged = AuditRecord {
                    outcome: AuditOutcome::Unchanged,
                    ..audit
                };
                let mutation = Mutation::new(unchanged, self.claim(request, key_id, now));
                self.store
                    .insert_audit_event(workspace_id, key_id, &mutation)
                    .await?;
                return Ok(before);
            }
            let claim = self.claim(request, key_id, now);
            let mutation = Mutation::new(audit.with_changes(changes), claim);
            if let Some(updated) = self.store.update_key(&after, &mutation).await? {
                // Read your writes: this replica's next VerifyKey sees the change.
                self.invalidator.key_changed(key_id.as_str()).await;
                tracing::info!(key_prefix = %updated.prefix, action = action.as_str(), "key updated");
                return Ok(updated);
            }
            // The key changed since it was read: read it again (and report a stale etag).
        }
        Err(Error::Conflict)
    }

    /// `before` with the changes applied, each checked as IssueKey checks it.
    fn updated(&self, before: &Key, changes: &KeyChanges, now: UnixMicros) -> Result<Key> {
        let mut after = before.clone();
        if let Some(name) = &changes.name {
            after.name = name.clone();
        }
        if let Some(description) = &changes.description {
            after.description = description.clone();
        }
        if let Some(scopes) = &changes.scopes {
            after.scopes = scopes.clone();
        }
        if let Some(role) = changes.role {
            after.role = role;
        }
        if let Some(metadata) = &changes.metadata {
            after.metadata = metadata.clone();
        }
        if let Some(expire_time) = changes.expire_time {
            after.expire_time = match expire_time {
                // An expiry the key already has stands, even if it is nearer than a new one
                // could be; any other must be one IssueKey would accept.
                Some(at) if Some(at) == before.expire_time => Some(at),
                Some(at) => self.expire_time(Expiration::At(at), now).map_err(|_| {
                    Error::invalid(
                        "key.expire_time",
                        "must be in the future and within the server's maximum key lifetime",
                    )
                })?,
                None => None,
            };
        }
        if let Some(enabled) = changes.enabled {
            after.enabled = enabled;
        }
        Ok(after)
    }

    /// WatchKeyEvents: the caller's workspace's key events (an admin's: the one it names, or
    /// every workspace's), from a position on, then live.
    pub async fn watch_events(
        &self,
        caller: &Caller,
        command: WatchKeyEvents,
    ) -> Result<EventSubscription> {
        let events = self
            .events
            .as_ref()
            .ok_or_else(|| Error::Internal("no event hub".to_owned()))?;
        let workspace_id = if command.all_workspaces {
            caller.authorize(Action::ReadAllWorkspaces)?;
            if !command.workspace_id.is_empty() {
                return Err(Error::invalid(
                    "workspace_id",
                    "must be empty with all_workspaces",
                ));
            }
            None
        } else {
            let workspace_id = caller.workspace_for(&command.workspace_id)?;
            caller.authorize(Action::Read)?;
            Some(workspace_id.as_str().to_owned())
        };
        // A watch outlives the call that opened it: an API key's ends when the key does.
        let credential = match caller {
            Caller::ApiKey { key_id, .. } => Some(key_id.clone()),
            Caller::Admin | Caller::User { .. } => None,
        };
        events
            .subscribe(workspace_id, command.from, credential)
            .await
    }

    /// ListAuditEvents: a page of the caller's workspace's audit events, newest first.
    #[tracing::instrument(name = "keys.list_audit_events", skip_all)]
    pub async fn list_audit_events(
        &self,
        caller: &Caller,
        _: &CallContext,
        request: ListAuditEvents,
    ) -> Result<AuditPage> {
        let workspace_id = caller.workspace_for(&request.workspace_id)?;
        caller.authorize(Action::ReadAudit)?;
        // What a page token is bound to: the workspace and every filter, unambiguously.
        let listing = serde_json::json!([
            workspace_id.as_str(),
            request.key_id.as_ref().map(KeyId::as_str),
            request.actor_kind.map(ActorKind::as_str),
            request.actor_id,
            request.action.map(AuditAction::as_str),
            request.start_time,
            request.end_time,
        ])
        .to_string();
        let before_event_id = match request.page_token.as_str() {
            "" => None,
            token => Some(self.page_tokens.decode_audit(token, &listing)?),
        };
        let limit = request.page_size.clamp(1, MAX_PAGE_SIZE);
        let query = AuditQuery {
            workspace_id: workspace_id.as_str().to_owned(),
            key_id: request.key_id.map(|id| id.as_str().to_owned()),
            actor_kind: request.actor_kind,
            actor_id: request.actor_id,
            action: request.action,
            start_time: request.start_time,
            end_time: request.end_time,
            before_event_id,
            // One extra row tells whether another page follows.
            limit: limit + 1,
        };
        let mut events = self.store.list_audit_events(&query).await?;
        let next_page_token = if events.len() > limit as usize {
            events.truncate(limit as usize);
            events
                .last()
                .map(|last| self.page_tokens.encode_audit(&listing, last.event_id))
        } else {
            None
        };
        Ok(AuditPage {
            events,
            next_page_token,
        })
    }

    /// RotateKey: replaces a key with a successor that has a new secret and, unless a caller
    /// who may issue keys says otherwise, everything else of the old key: its expiry and its
    /// usage budget.
    #[tracing::instrument(name = "keys.rotate", skip_all, fields(key_id = %command.key_id))]
    pub async fn rotate(
        &self,
        caller: &Caller,
        context: &CallContext,
        command: RotateKey,
    ) -> Result<(IssuedKey, Key)> {
        let workspace_id = &caller.workspace_for(&command.workspace_id)?;
        caller.authorize(Action::Rotate {
            key_id: command.key_id.as_str(),
        })?;
        let actor = &caller.actor();
        let request = self.idempotent_rotate(context, workspace_id, actor.audit(), &command);
        let rotate = self.rotate_once(caller, context, workspace_id, &command, request.as_ref());
        let replay = async |request: &IdempotentRequest, done| {
            self.replay_rotation(workspace_id, request, done).await
        };
        self.once(request.as_ref(), rotate, replay).await
    }

    /// `rotate`'s work, claiming `request`'s id (if any) with the rotation it writes.
    async fn rotate_once(
        &self,
        caller: &Caller,
        context: &CallContext,
        workspace_id: &WorkspaceId,
        command: &RotateKey,
        request: Option<&IdempotentRequest>,
    ) -> Result<(IssuedKey, Key)> {
        let key_id = &command.key_id;
        let rights = caller.rotation_rights();
        let actor = &caller.actor();
        let now = now_micros();
        let grace_period = self.grace_period(command.grace_period, rights)?;
        let new_expire_time = match command.expiration {
            None => None,
            Some(expiration) => {
                rights.permit_expiry()?;
                Some(self.expire_time(expiration, now)?)
            }
        };
        let previous = self.find(workspace_id, key_id).await?;
        ensure_rotatable(&previous, now)?;
        rights.permit_role(previous.role)?;
        let template = Key {
            key_id: KeyId::generate(),
            create_time: now,
            // The successor ends when the old key was meant to end, unless told otherwise.
            expire_time: new_expire_time.unwrap_or(previous.expire_time),
            revoke_time: None,
            last_used_time: None,
            total_requests: 0,
            rotated_from_key_id: Some(previous.key_id.clone()),
            rotated_to_key_id: None,
            created_by: actor.as_str().to_owned(),
            revoked_by: None,
            ..previous.clone()
        };
        let (generated, claim) = self.new_secret(&template, request)?;
        let (successor, plaintext) = self.mint(&template, generated).await?;
        // Within the Timestamp range, however long an operator lets grace periods be.
        let previous_expire_time = now
            .saturating_add(duration_micros(grace_period))
            .min(timestamp::MAX_PROTO_MICROS);
        let capped_expire_time = previous.expire_time.map_or(previous_expire_time, |expiry| {
            expiry.min(previous_expire_time)
        });
        let audit = self
            .audit(AuditAction::Rotate, actor, now, context)
            .with_changes(vec![
                audit::change(
                    "rotated_to_key_id",
                    serde_json::Value::Null,
                    audit::key_id_value(Some(&successor.key.key_id)),
                ),
                audit::change(
                    "expire_time",
                    audit::time_value(previous.expire_time),
                    audit::time_value(Some(capped_expire_time)),
                ),
            ]);
        let rotation = self
            .store
            .rotate_key(
                workspace_id,
                key_id,
                previous.version,
                &successor,
                previous_expire_time,
                &Mutation::new(audit, claim),
            )
            .await?;
        let Some(rotation) = rotation else {
            // Someone else changed the key between our read and our write: say what happened.
            let current = self.find(workspace_id, key_id).await?;
            ensure_rotatable(&current, now_micros())?;
            return Err(Error::Conflict);
        };
        self.invalidator.key_changed(key_id.as_str()).await;
        tracing::info!(
            key_prefix = %rotation.previous.prefix,
            successor_prefix = %rotation.successor.prefix,
            "key rotated"
        );
        Ok((
            IssuedKey {
                key: rotation.successor,
                plaintext,
            },
            rotation.previous,
        ))
    }

    /// The grace period a rotation asked for, within the server's cap and the caller's.
    fn grace_period(&self, asked: Option<Duration>, rights: RotationRights) -> Result<Duration> {
        let server_cap = self.limits.max_rotation_grace;
        let cap = rights
            .grace_cap
            .map_or(server_cap, |caller_cap| caller_cap.min(server_cap));
        let Some(asked) = asked else {
            return Ok(DEFAULT_GRACE_PERIOD.min(cap));
        };
        if asked <= cap {
            return Ok(asked);
        }
        let whose = if cap < server_cap {
            "for an API key"
        } else {
            "on this server (--max-rotation-grace)"
        };
        Err(Error::invalid(
            "grace_period",
            format!(
                "must be at most {} {whose}",
                humantime::format_duration(cap)
            ),
        ))
    }

    /// The expiry an expiration asks for, if it is in the future and within the limits.
    fn expire_time(&self, expiration: Expiration, now: UnixMicros) -> Result<Option<UnixMicros>> {
        let (field, at) = match expiration {
            Expiration::Never => return Ok(None),
            Expiration::At(at) if at <= now => {
                return Err(Error::invalid("expire_time", "must be in the future"));
            }
            Expiration::At(at) => ("expire_time", at),
            Expiration::After(ttl) if ttl.is_zero() => {
                return Err(Error::invalid("ttl", "must be positive"));
            }
            Expiration::After(ttl) => ("ttl", now.saturating_add(duration_micros(ttl))),
        };
        if let Some(max) = self.limits.max_key_lifetime
            && at.saturating_sub(now) > duration_micros(max)
        {
            return Err(Error::invalid(
                field,
                format!(
                    "must be at most {} from now (--max-key-lifetime)",
                    humantime::format_duration(max)
                ),
            ));
        }
        // Beyond this, JSON renderings of the key (grpcurl, buf curl, protobuf's JSON mapping)
        // fail for every client that lists the workspace.
        if at > timestamp::MAX_PROTO_MICROS {
            return Err(Error::invalid(
                field,
                "must be before year 10000 (the range of a protobuf Timestamp)",
            ));
        }
        Ok(Some(at))
    }

    /// `template` with the id and secret of `generated`, and the secret's argon2id hash.
    async fn mint(&self, template: &Key, generated: GeneratedKey) -> Result<(StoredKey, String)> {
        let secret_hash = self.hashes.hash(generated.plaintext.clone()).await?;
        // A limited key without a budget starts a chain: the budget is named after its first key.
        let budget_id = template
            .budget_id
            .clone()
            .or_else(|| (template.usage_limit > 0).then(|| generated.key_id.as_str().to_owned()));
        let key = Key {
            key_id: generated.key_id,
            prefix: generated.prefix,
            budget_id,
            ..template.clone()
        };
        Ok((StoredKey { key, secret_hash }, generated.plaintext))
    }

    /// The audit event of a change by `actor` in the call described by `context`.
    fn audit(
        &self,
        action: AuditAction,
        actor: &Actor,
        now: UnixMicros,
        context: &CallContext,
    ) -> AuditRecord {
        AuditRecord::new(action, actor.audit().clone(), now, context.clone())
    }
}

/// A trial call's context, with the end user's address (as a trusted front end claims it) in
/// place of the connection's.
fn end_user_context(origin: &Origin, context: &CallContext, claimed: &str) -> CallContext {
    CallContext {
        client_ip: origin.end_user_text(claimed, &context.client_ip).to_owned(),
        ..context.clone()
    }
}

/// The key id inside a trial key's prefix: `<brand>_trial_<12-character id>`, at least 16
/// characters, possibly followed by the rest of the key.
fn trial_key_id(prefix: &str) -> Result<KeyId> {
    const MIN_PREFIX_LEN: usize = 16;
    if prefix.len() < MIN_PREFIX_LEN {
        return Err(Error::invalid(
            "prefix",
            format!("must be at least {MIN_PREFIX_LEN} characters"),
        ));
    }
    let id = prefix
        .split_once("_trial_")
        .map(|(_, rest)| rest)
        // `get`, not slicing: the 12th byte may fall inside a multi-byte character.
        .and_then(|rest| rest.get(..KEY_ID_LEN))
        .and_then(KeyId::parse)
        .ok_or_else(|| {
            Error::invalid(
                "prefix",
                "must be a trial key prefix <brand>_trial_<key id> with the whole 12-character key id",
            )
        })?;
    Ok(id)
}

/// Revoked and expired keys are final: UpdateKey changes neither (a disabled key may be).
fn ensure_updatable(key: &Key, now: UnixMicros) -> Result<()> {
    match key.state_at(now) {
        KeyState::Revoked => Err(Error::KeyRevoked(key.key_id.to_string())),
        KeyState::Expired => Err(Error::KeyExpired(key.key_id.to_string())),
        KeyState::Disabled | KeyState::Active => Ok(()),
    }
}

fn ensure_rotatable(key: &Key, now: UnixMicros) -> Result<()> {
    match key.state_at(now) {
        KeyState::Revoked => return Err(Error::KeyRevoked(key.key_id.to_string())),
        KeyState::Expired => return Err(Error::KeyExpired(key.key_id.to_string())),
        // A successor would verify: disabling a key must not be undone by rotating it.
        KeyState::Disabled => return Err(Error::KeyDisabled(key.key_id.to_string())),
        KeyState::Active => {}
    }
    if let Some(successor) = &key.rotated_to_key_id {
        return Err(Error::KeyAlreadyRotated {
            key_id: key.key_id.to_string(),
            successor: successor.to_string(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trial_key_id_refuses_a_multibyte_character_across_the_id_boundary() {
        // 11 ASCII characters then "é" (2 bytes): byte 12 falls inside the character.
        let error = trial_key_id("ka_trial_abcdefghijké").unwrap_err();
        assert!(matches!(
            error,
            Error::InvalidArgument {
                field: "prefix",
                ..
            }
        ));
        assert!(trial_key_id("ka_trial_ééééééééééééé").is_err());
        assert_eq!(
            trial_key_id("ka_trial_abcdefghijkl").unwrap().as_str(),
            "abcdefghijkl"
        );
    }
}
