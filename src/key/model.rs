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
    /// Turned off by UpdateKey; may be turned on again, unlike the two final states.
    Disabled,
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
    /// False while the key is disabled.
    pub enabled: bool,
    /// Counts changes to the key's settings; the etag clients send back to UpdateKey.
    pub version: i64,
    /// When the key's settings last changed; `None` until they first do.
    pub update_time: Option<UnixMicros>,
}

impl Key {
    /// The final states win: a revoked key reports REVOKED even after its expiry, and a disabled
    /// key that expired or was revoked reports that.
    pub fn state_at(&self, now: UnixMicros) -> KeyState {
        if self.revoke_time.is_some() {
            KeyState::Revoked
        } else if self.expire_time.is_some_and(|expiry| expiry <= now) {
            KeyState::Expired
        } else if !self.enabled {
            KeyState::Disabled
        } else {
            KeyState::Active
        }
    }

    /// The opaque etag of this version of the key.
    pub fn etag(&self) -> String {
        self.version.to_string()
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
