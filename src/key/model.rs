//! The key as the domain sees it, and the enums that describe it.

use super::format::KeyId;
use super::names::{KeyDescription, KeyName, Metadata, Scopes, WorkspaceId};
use crate::timestamp::UnixMicros;

/// The environment a key belongs to; part of the key's text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Environment {
    Live,
    Test,
    Dev,
    /// Made only by IssueTrialKey.
    Trial,
}

impl Environment {
    /// The word used in the key text and in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Live => "live",
            Self::Test => "test",
            Self::Dev => "dev",
            Self::Trial => "trial",
        }
    }

    pub fn from_key_text(text: &str) -> Option<Self> {
        match text {
            "live" => Some(Self::Live),
            "test" => Some(Self::Test),
            "dev" => Some(Self::Dev),
            "trial" => Some(Self::Trial),
            _ => None,
        }
    }
}

/// What a key's holder may do; ordered from least to most powerful.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// A trial key: verifies, but may not call KeyService at all.
    Trial,
    Viewer,
    Developer,
    AccountAdmin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Trial => "trial",
            Self::Viewer => "viewer",
            Self::Developer => "developer",
            Self::AccountAdmin => "account_admin",
        }
    }

    pub fn from_db(text: &str) -> Option<Self> {
        match text {
            "trial" => Some(Self::Trial),
            "viewer" => Some(Self::Viewer),
            "developer" => Some(Self::Developer),
            "account_admin" => Some(Self::AccountAdmin),
            _ => None,
        }
    }
}

/// A key's lifecycle state, derived from its timestamps at a given moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyState {
    Active,
    Revoked,
    Expired,
}

/// A key's public metadata. It never holds the secret or its hash.
#[derive(Debug, Clone, PartialEq)]
pub struct Key {
    pub key_id: KeyId,
    pub workspace_id: WorkspaceId,
    pub name: KeyName,
    pub description: KeyDescription,
    pub prefix: String,
    pub scopes: Scopes,
    pub role: Role,
    pub environment: Environment,
    pub create_time: UnixMicros,
    pub expire_time: Option<UnixMicros>,
    pub revoke_time: Option<UnixMicros>,
    pub last_used_time: Option<UnixMicros>,
    pub total_requests: i64,
    pub metadata: Metadata,
    pub rotated_from_key_id: Option<KeyId>,
    pub rotated_to_key_id: Option<KeyId>,
    /// Who issued the key (`admin`, `user:<sub>`, `key:<prefix> (<name>)`).
    pub created_by: String,
    /// Who revoked the key, once revoked.
    pub revoked_by: Option<String>,
    /// How many VALID verdicts the key may give in all; 0 means unlimited.
    pub usage_limit: i64,
    /// How many are left, as last read from the database: the rotation chain's budget.
    pub usage_remaining: i64,
    /// The usage budget a limited key draws on: the key id of its rotation chain's first key,
    /// shared by every successor. `None` for unlimited keys.
    pub budget_id: Option<String>,
}

impl Key {
    /// Revocation wins over expiry: a revoked key reports REVOKED even after its expiry.
    pub fn state_at(&self, now: UnixMicros) -> KeyState {
        if self.revoke_time.is_some() {
            KeyState::Revoked
        } else if self.expire_time.is_some_and(|expiry| expiry <= now) {
            KeyState::Expired
        } else {
            KeyState::Active
        }
    }
}

/// A key together with the argon2id PHC string of its whole text: what VerifyKey needs.
#[derive(Clone)]
pub struct StoredKey {
    pub key: Key,
    pub secret_hash: String,
}

impl std::fmt::Debug for StoredKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoredKey")
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}
