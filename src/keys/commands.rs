//! KeyService's commands: what a caller asks, parsed into domain types by the transport, before
//! any decision. Workspaces are as the request names them (possibly empty): the policy settles
//! them against the caller. Trial commands keep their text as sent, because a switched-off trial
//! service answers UNIMPLEMENTED before anything in them is read.

use std::time::Duration;

use crate::key::{Environment, KeyDescription, KeyId, KeyName, Metadata, Role, Scopes};

/// When a new key stops working.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiration {
    Never,
    At(crate::timestamp::UnixMicros),
    After(Duration),
}

/// IssueKey: a key like `key` in the workspace the request names.
#[derive(Debug, Clone)]
pub struct IssueKey {
    pub workspace_id: String,
    pub key: KeySpec,
}

/// What a new key is, apart from its workspace: validated, not yet decided on.
#[derive(Debug, Clone)]
pub struct KeySpec {
    pub name: KeyName,
    pub description: KeyDescription,
    pub scopes: Scopes,
    pub environment: Environment,
    pub role: Role,
    pub expiration: Expiration,
    pub metadata: Metadata,
    /// VALID verdicts the key may give in all; 0 means unlimited.
    pub usage_limit: i64,
}

#[derive(Debug, Clone)]
pub struct GetKey {
    pub workspace_id: String,
    pub key_id: KeyId,
}

#[derive(Debug, Clone)]
pub struct ListKeys {
    pub workspace_id: String,
    pub page_size: u32,
    pub page_token: String,
    pub include_inactive: bool,
}

#[derive(Debug, Clone)]
pub struct RevokeKey {
    pub workspace_id: String,
    pub key_id: KeyId,
    /// Revoke every key the key's rotations led to as well.
    pub revoke_successors: bool,
}

#[derive(Debug, Clone)]
pub struct RotateKey {
    pub workspace_id: String,
    pub key_id: KeyId,
    /// How long the old key keeps working; `None` for the default (24 hours, or less if capped).
    pub grace_period: Option<Duration>,
    /// A new expiry for the successor; `None` keeps the old key's.
    pub expiration: Option<Expiration>,
}

#[derive(Debug, Clone)]
pub struct IssueTrialKey {
    /// Empty for the default name.
    pub name: String,
    /// The end user's address as a front end claims it; empty when not given.
    pub client_ip: String,
}

#[derive(Debug, Clone)]
pub struct RevokeTrialKey {
    /// The trial key's public prefix (or its whole text).
    pub prefix: String,
    pub client_ip: String,
}

/// UpdateKey: new values for the settings its mask named, each `None` when not named.
#[derive(Debug, Clone)]
pub struct UpdateKey {
    pub workspace_id: String,
    pub key_id: KeyId,
    /// The version the caller read (its etag); `None` updates whatever version is current.
    pub expected_version: Option<i64>,
    pub changes: KeyChanges,
}

/// The settings an update names, with their new values.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct KeyChanges {
    pub name: Option<KeyName>,
    pub description: Option<KeyDescription>,
    pub scopes: Option<Scopes>,
    pub role: Option<Role>,
    pub metadata: Option<Metadata>,
    /// `Some(None)` removes the expiry.
    pub expire_time: Option<Option<crate::timestamp::UnixMicros>>,
    pub enabled: Option<bool>,
}

impl KeyChanges {
    pub fn is_empty(&self) -> bool {
        self == &Self::default()
    }
}

/// ListAuditEvents: a page of a workspace's events, with the filters that are set.
#[derive(Debug, Clone)]
pub struct ListAuditEvents {
    pub workspace_id: String,
    pub page_size: u32,
    pub page_token: String,
    pub key_id: Option<KeyId>,
    pub actor_kind: Option<crate::audit::ActorKind>,
    pub actor_id: Option<String>,
    pub action: Option<crate::audit::AuditAction>,
    pub start_time: Option<crate::timestamp::UnixMicros>,
    pub end_time: Option<crate::timestamp::UnixMicros>,
}

/// WatchKeyEvents: a workspace's events (or, for an admin, every workspace's) from a position.
#[derive(Debug, Clone)]
pub struct WatchKeyEvents {
    pub workspace_id: String,
    pub from: crate::events::WatchFrom,
    pub all_workspaces: bool,
}

/// ReportUsage: usage a caller-side verifier counted, one entry per key, in key id order.
#[derive(Debug, Clone)]
pub struct ReportUsage {
    pub workspace_id: String,
    pub usage: Vec<crate::store::UsageDelta>,
}
