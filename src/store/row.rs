//! The `api_key` row as both databases return it, and its conversion to the domain type.

use std::collections::BTreeMap;

use crate::audit::{
    ActorKind, AuditAction, AuditActor, AuditEvent, AuditOutcome, AuditRecord, CallContext,
    FieldChange,
};
use crate::error::{Error, Result};
use crate::key::{
    Environment, Key, KeyDescription, KeyId, KeyName, Metadata, Role, Scopes, StoredKey,
    WorkspaceId,
};

#[derive(sqlx::FromRow)]
pub(super) struct KeyRow {
    key_id: String,
    workspace_id: String,
    name: String,
    description: String,
    prefix: String,
    scopes: String,
    role: String,
    environment: String,
    secret_hash: String,
    metadata: String,
    create_time: i64,
    expire_time: Option<i64>,
    revoke_time: Option<i64>,
    last_used_time: Option<i64>,
    total_requests: i64,
    rotated_from_key_id: Option<String>,
    rotated_to_key_id: Option<String>,
    created_by: String,
    revoked_by: Option<String>,
    usage_limit: i64,
    usage_remaining: i64,
    budget_id: Option<String>,
    enabled: bool,
    version: i64,
    update_time: Option<i64>,
}

impl KeyRow {
    pub(super) fn into_stored(self) -> Result<StoredKey> {
        let corrupt = |what: &str| Error::Internal(format!("key {}: bad {what}", self.key_id));
        // Parsed here once, so that nothing downstream re-checks what the database holds.
        let key_id = KeyId::parse(&self.key_id).ok_or_else(|| corrupt("key_id"))?;
        let workspace_id =
            WorkspaceId::parse(&self.workspace_id).map_err(|_| corrupt("workspace_id"))?;
        let rotated_from_key_id = optional_key_id(self.rotated_from_key_id.as_deref())
            .map_err(|()| corrupt("rotated_from_key_id"))?;
        let rotated_to_key_id = optional_key_id(self.rotated_to_key_id.as_deref())
            .map_err(|()| corrupt("rotated_to_key_id"))?;
        let role = Role::from_db(&self.role).ok_or_else(|| corrupt("role"))?;
        let environment =
            Environment::from_key_text(&self.environment).ok_or_else(|| corrupt("environment"))?;
        let scopes: Vec<String> =
            serde_json::from_str(&self.scopes).map_err(|_| corrupt("scopes"))?;
        let metadata: BTreeMap<String, String> =
            serde_json::from_str(&self.metadata).map_err(|_| corrupt("metadata"))?;
        Ok(StoredKey {
            key: Key {
                key_id,
                workspace_id,
                name: KeyName::from_stored(self.name),
                description: KeyDescription::from_stored(self.description),
                prefix: self.prefix,
                scopes: Scopes::from_stored(scopes),
                role,
                environment,
                create_time: self.create_time,
                expire_time: self.expire_time,
                revoke_time: self.revoke_time,
                last_used_time: self.last_used_time,
                total_requests: self.total_requests,
                metadata: Metadata::from_stored(metadata),
                rotated_from_key_id,
                rotated_to_key_id,
                created_by: self.created_by,
                revoked_by: self.revoked_by,
                usage_limit: self.usage_limit,
                usage_remaining: self.usage_remaining,
                budget_id: self.budget_id,
                enabled: self.enabled,
                version: self.version,
                update_time: self.update_time,
            },
            secret_hash: self.secret_hash,
        })
    }

    pub(super) fn into_key(self) -> Result<Key> {
        self.into_stored().map(|stored| stored.key)
    }
}

/// The `audit_event` row as both databases return it.
#[derive(sqlx::FromRow)]
pub(super) struct AuditRow {
    event_id: i64,
    workspace_id: String,
    key_id: String,
    action: String,
    actor: String,
    actor_kind: String,
    actor_id: String,
    occur_time: i64,
    changes: String,
    outcome: String,
    client_ip: String,
    trace_id: String,
    request_id: String,
}

impl AuditRow {
    pub(super) fn into_event(self) -> Result<AuditEvent> {
        let corrupt =
            |what: &str| Error::Internal(format!("audit event {}: bad {what}", self.event_id));
        let action = AuditAction::from_db(&self.action).ok_or_else(|| corrupt("action"))?;
        let outcome = AuditOutcome::from_db(&self.outcome).ok_or_else(|| corrupt("outcome"))?;
        // Events written before actors had kinds and whose text named no known caller.
        let kind = ActorKind::from_db(&self.actor_kind).unwrap_or(ActorKind::System);
        let changes: Vec<FieldChange> =
            serde_json::from_str(&self.changes).map_err(|_| corrupt("changes"))?;
        Ok(AuditEvent {
            event_id: self.event_id,
            workspace_id: self.workspace_id,
            key_id: self.key_id,
            record: AuditRecord {
                action,
                actor: AuditActor {
                    kind,
                    id: self.actor_id,
                    display: self.actor,
                },
                occur_time: self.occur_time,
                changes,
                outcome,
                context: CallContext {
                    client_ip: self.client_ip,
                    trace_id: self.trace_id,
                    request_id: self.request_id,
                },
            },
        })
    }
}

/// A nullable key id column: `Err` when it holds something that is not a key id.
fn optional_key_id(text: Option<&str>) -> std::result::Result<Option<KeyId>, ()> {
    text.map(|text| KeyId::parse(text).ok_or(())).transpose()
}

pub(super) fn scopes_json(key: &Key) -> String {
    serde_json::to_string(key.scopes.as_slice()).expect("strings always serialize")
}

pub(super) fn metadata_json(key: &Key) -> String {
    serde_json::to_string(key.metadata.as_map()).expect("strings always serialize")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row() -> KeyRow {
        KeyRow {
            key_id: "iZ19fRp6bgz1".to_owned(),
            workspace_id: "acme".to_owned(),
            name: "n".to_owned(),
            description: String::new(),
            prefix: "ka_live_iZ19fRp6bgz1".to_owned(),
            scopes: "[]".to_owned(),
            role: "developer".to_owned(),
            environment: "live".to_owned(),
            secret_hash: String::new(),
            metadata: "{}".to_owned(),
            create_time: 0,
            expire_time: None,
            revoke_time: None,
            last_used_time: None,
            total_requests: 0,
            rotated_from_key_id: None,
            rotated_to_key_id: Some("Abcdefghijk2".to_owned()),
            created_by: "admin".to_owned(),
            revoked_by: None,
            usage_limit: 0,
            usage_remaining: 0,
            budget_id: None,
            enabled: true,
            version: 1,
            update_time: None,
        }
    }

    fn internal_error(row: KeyRow) -> String {
        match row.into_key() {
            Err(Error::Internal(message)) => message,
            other => panic!("expected an internal error, got {other:?}"),
        }
    }

    #[test]
    fn ids_are_parsed_once_here() {
        let key = row().into_key().unwrap();
        assert_eq!(key.workspace_id.as_str(), "acme");
        assert_eq!(key.rotated_from_key_id, None);
        assert_eq!(
            key.rotated_to_key_id.as_ref().map(KeyId::as_str),
            Some("Abcdefghijk2")
        );
    }

    #[test]
    fn a_stored_id_that_does_not_parse_is_internal_and_names_its_column() {
        let bad_workspace = KeyRow {
            workspace_id: "not a workspace".to_owned(),
            ..row()
        };
        assert_eq!(
            internal_error(bad_workspace),
            "key iZ19fRp6bgz1: bad workspace_id"
        );
        let bad_successor = KeyRow {
            rotated_to_key_id: Some("short".to_owned()),
            ..row()
        };
        assert_eq!(
            internal_error(bad_successor),
            "key iZ19fRp6bgz1: bad rotated_to_key_id"
        );
        let bad_predecessor = KeyRow {
            rotated_from_key_id: Some(String::new()),
            ..row()
        };
        assert_eq!(
            internal_error(bad_predecessor),
            "key iZ19fRp6bgz1: bad rotated_from_key_id"
        );
    }
}
