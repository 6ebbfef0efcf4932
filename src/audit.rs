//! The audit trail: who did what to which key, when, from where. Every mutation writes one
//! event per key it changes, in its own transaction (`store`); a lockout is written behind, off
//! the VerifyKey path (`LockoutAuditor`). Events name fields and their old and new values, never
//! a secret.

mod lockout;

use std::time::Duration;

use serde_json::Value;

pub use lockout::{LockoutAuditor, LockoutEngaged, write_lockouts};

use crate::key::{Key, KeyId};
use crate::timestamp::{self, UnixMicros};

/// How long events are kept, and how they are pruned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuditConfig {
    /// Events older than this are deleted by the background pruning.
    pub retention: Duration,
    /// How often the pruning runs.
    pub prune_interval: Duration,
    /// Events deleted in one statement (the pruning repeats until none is left).
    pub prune_batch: u32,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            retention: Duration::from_secs(400 * 24 * 60 * 60),
            prune_interval: Duration::from_secs(60 * 60),
            prune_batch: 1000,
        }
    }
}

/// Deletes the events older than the retention, in batches, until none is left; returns how
/// many were deleted. Every replica prunes; a batch another replica took finds nothing.
pub async fn prune(
    store: &dyn crate::store::Store,
    config: &AuditConfig,
) -> crate::error::Result<u64> {
    let before =
        timestamp::now_micros().saturating_sub(timestamp::duration_micros(config.retention));
    let batch = config.prune_batch.max(1);
    let mut deleted = 0;
    loop {
        let taken = store.delete_audit_events_before(before, batch).await?;
        deleted += taken;
        if taken < u64::from(batch) {
            return Ok(deleted);
        }
    }
}

/// What an event records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuditAction {
    Issue,
    Rotate,
    Revoke,
    Update,
    Disable,
    Enable,
    IssueTrial,
    RevokeTrial,
    Lockout,
}

impl AuditAction {
    pub const ALL: [Self; 9] = [
        Self::Issue,
        Self::Rotate,
        Self::Revoke,
        Self::Update,
        Self::Disable,
        Self::Enable,
        Self::IssueTrial,
        Self::RevokeTrial,
        Self::Lockout,
    ];

    /// The word in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Issue => "issue",
            Self::Rotate => "rotate",
            Self::Revoke => "revoke",
            Self::Update => "update",
            Self::Disable => "disable",
            Self::Enable => "enable",
            Self::IssueTrial => "issue_trial",
            Self::RevokeTrial => "revoke_trial",
            Self::Lockout => "lockout",
        }
    }

    pub fn from_db(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|action| action.as_str() == text)
    }
}

/// What kind of caller acted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActorKind {
    Admin,
    User,
    ApiKey,
    /// An unauthenticated caller of the trial RPCs.
    Anonymous,
    /// The service itself (a lockout).
    System,
}

impl ActorKind {
    pub const ALL: [Self; 5] = [
        Self::Admin,
        Self::User,
        Self::ApiKey,
        Self::Anonymous,
        Self::System,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Admin => "admin",
            Self::User => "user",
            Self::ApiKey => "api_key",
            Self::Anonymous => "anonymous",
            Self::System => "system",
        }
    }

    /// `None` for rows written before actors had kinds whose text named no known caller.
    pub fn from_db(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|kind| kind.as_str() == text)
    }
}

/// Who acted: a kind, an id within it (what ListAuditEvents filters on), and a readable text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditActor {
    pub kind: ActorKind,
    pub id: String,
    pub display: String,
}

impl AuditActor {
    pub fn admin() -> Self {
        Self {
            kind: ActorKind::Admin,
            id: "admin".to_owned(),
            display: "admin".to_owned(),
        }
    }

    pub fn user(subject: &str) -> Self {
        Self {
            kind: ActorKind::User,
            id: subject.to_owned(),
            display: format!("user:{subject}"),
        }
    }

    /// `API Key: CI/CD Pipeline (ka_live_3kF9aQ2mX7pL)`.
    pub fn api_key(key_id: &str, prefix: &str, name: &str) -> Self {
        Self {
            kind: ActorKind::ApiKey,
            id: key_id.to_owned(),
            display: format!("API Key: {name} ({prefix})"),
        }
    }

    /// An unauthenticated caller, known by the end user's address.
    pub fn anonymous(client_ip: &str) -> Self {
        Self {
            kind: ActorKind::Anonymous,
            id: client_ip.to_owned(),
            display: format!("anonymous ({client_ip})"),
        }
    }

    pub fn system(mechanism: &str) -> Self {
        Self {
            kind: ActorKind::System,
            id: mechanism.to_owned(),
            display: format!("system: {mechanism}"),
        }
    }
}

/// Whether a call changed anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuditOutcome {
    Applied,
    /// The call succeeded with nothing to change (revoking a revoked key).
    Unchanged,
}

impl AuditOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Applied => "applied",
            Self::Unchanged => "unchanged",
        }
    }

    pub fn from_db(text: &str) -> Option<Self> {
        match text {
            "applied" => Some(Self::Applied),
            "unchanged" => Some(Self::Unchanged),
            _ => None,
        }
    }
}

/// One field a change touched, with its old and new values as JSON (`null` for unset).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FieldChange {
    pub field: String,
    pub old: Value,
    pub new: Value,
}

/// Where a call came from and what it carried, as recorded with its event.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CallContext {
    /// The connection's peer, or for trial calls the end user's address; empty if unknown.
    pub client_ip: String,
    /// The W3C trace id (32 hex digits); empty if none.
    pub trace_id: String,
    /// The request id the call carried; empty if none.
    pub request_id: String,
}

/// An event about to be written, in the same transaction as its change. The store fills in
/// `changes` and `outcome` where only it knows them (a revocation of a revoked key).
#[derive(Debug, Clone)]
pub struct AuditRecord {
    pub action: AuditAction,
    pub actor: AuditActor,
    pub occur_time: UnixMicros,
    pub changes: Vec<FieldChange>,
    pub outcome: AuditOutcome,
    pub context: CallContext,
}

impl AuditRecord {
    pub fn new(
        action: AuditAction,
        actor: AuditActor,
        occur_time: UnixMicros,
        context: CallContext,
    ) -> Self {
        Self {
            action,
            actor,
            occur_time,
            changes: Vec::new(),
            outcome: AuditOutcome::Applied,
            context,
        }
    }

    /// The same event with these changes.
    pub fn with_changes(mut self, changes: Vec<FieldChange>) -> Self {
        self.changes = changes;
        self
    }

    pub fn changes_json(&self) -> String {
        serde_json::to_string(&self.changes).expect("JSON values always serialize")
    }
}

/// An event as the trail holds it.
#[derive(Debug, Clone)]
pub struct AuditEvent {
    pub event_id: i64,
    pub workspace_id: String,
    pub key_id: String,
    pub record: AuditRecord,
}

/// Which events ListAuditEvents wants: one workspace's, newest first, after a position.
#[derive(Debug, Clone, Default)]
pub struct AuditQuery {
    pub workspace_id: String,
    pub key_id: Option<String>,
    pub actor_kind: Option<ActorKind>,
    pub actor_id: Option<String>,
    pub action: Option<AuditAction>,
    /// At or after.
    pub start_time: Option<UnixMicros>,
    /// Before.
    pub end_time: Option<UnixMicros>,
    /// Events with a smaller id than this; `None` starts at the newest.
    pub before_event_id: Option<i64>,
    pub limit: u32,
}

/// The settings of a key as an event records them, field by field.
fn key_fields(key: &Key) -> [(&'static str, Value); 9] {
    [
        ("name", Value::from(key.name.as_str())),
        ("description", Value::from(key.description.as_str())),
        ("scopes", Value::from(key.scopes.as_slice().to_vec())),
        ("role", Value::from(key.role.as_str())),
        ("environment", Value::from(key.environment.as_str())),
        (
            "metadata",
            serde_json::to_value(key.metadata.as_map()).expect("strings serialize"),
        ),
        ("expire_time", time_value(key.expire_time)),
        ("usage_limit", Value::from(key.usage_limit)),
        ("enabled", Value::from(key.enabled)),
    ]
}

/// A time as an event shows it: RFC 3339, or `null`.
pub fn time_value(time: Option<UnixMicros>) -> Value {
    time.map_or(Value::Null, |time| Value::from(timestamp::rfc3339(time)))
}

/// A new key's settings, each from `null`.
pub fn issued(key: &Key) -> Vec<FieldChange> {
    key_fields(key)
        .into_iter()
        .map(|(field, new)| FieldChange {
            field: field.to_owned(),
            old: Value::Null,
            new,
        })
        .collect()
}

/// The settings that differ between two versions of a key.
pub fn differences(before: &Key, after: &Key) -> Vec<FieldChange> {
    key_fields(before)
        .into_iter()
        .zip(key_fields(after))
        .filter(|((_, old), (_, new))| old != new)
        .map(|((field, old), (_, new))| FieldChange {
            field: field.to_owned(),
            old,
            new,
        })
        .collect()
}

/// One change of a field outside the settings (`revoke_time`, `rotated_to_key_id`).
pub fn change(field: &str, old: Value, new: Value) -> FieldChange {
    FieldChange {
        field: field.to_owned(),
        old,
        new,
    }
}

/// A key id as an event shows it.
pub fn key_id_value(key_id: Option<&KeyId>) -> Value {
    key_id.map_or(Value::Null, |id| Value::from(id.as_str()))
}
