//! Key events for other systems (the outbox): what happened to a key, in one order per database.
//! A mutation writes its events in its own transaction, beside its audit event (the store derives
//! them from the audit record: `from_audit`), so there is no change without its event and no event
//! without its change; lockouts and expiries are written shortly after they happen. Watchers
//! (`watch`) read them in position order, then follow new ones as they commit.

pub mod watch;

use serde_json::{Value, json};

pub use watch::{EventHub, EventSubscription, WatchConfig, WatchFrom};

use crate::audit::{ActorKind, AuditAction, AuditActor, AuditOutcome, AuditRecord, FieldChange};
use crate::error::Result;
use crate::store::Store;
use crate::timestamp::{UnixMicros, duration_micros, now_micros};

/// What happened to a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    Issued,
    Rotated,
    Revoked,
    Updated,
    Disabled,
    Enabled,
    Locked,
    Expired,
}

impl EventType {
    pub const ALL: [Self; 8] = [
        Self::Issued,
        Self::Rotated,
        Self::Revoked,
        Self::Updated,
        Self::Disabled,
        Self::Enabled,
        Self::Locked,
        Self::Expired,
    ];

    /// The type with this name (`key.issued`, ...).
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|kind| kind.as_str() == name)
    }

    /// The name in events and webhooks: `key.issued`, ...
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Issued => "key.issued",
            Self::Rotated => "key.rotated",
            Self::Revoked => "key.revoked",
            Self::Updated => "key.updated",
            Self::Disabled => "key.disabled",
            Self::Enabled => "key.enabled",
            Self::Locked => "key.locked",
            Self::Expired => "key.expired",
        }
    }

    /// The event an audited action announces.
    pub fn of_action(action: AuditAction) -> Self {
        match action {
            AuditAction::Issue | AuditAction::IssueTrial => Self::Issued,
            AuditAction::Rotate => Self::Rotated,
            AuditAction::Revoke | AuditAction::RevokeTrial => Self::Revoked,
            AuditAction::Update => Self::Updated,
            AuditAction::Disable => Self::Disabled,
            AuditAction::Enable => Self::Enabled,
            AuditAction::Lockout => Self::Locked,
        }
    }
}

/// An event about to be written.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    pub event_id: String,
    pub event_type: EventType,
    /// JSON: the actor, the changes and the type's own fields.
    pub payload: String,
}

/// The event an audited change announces; none for a call that changed nothing.
pub fn from_audit(record: &AuditRecord) -> Option<NewEvent> {
    if record.outcome == AuditOutcome::Unchanged {
        return None;
    }
    let event_type = EventType::of_action(record.action);
    let mut payload = json!({
        "actor": actor_json(&record.actor),
        "changes": record.changes,
    });
    if event_type == EventType::Rotated {
        // The rotation's audit changes name the successor and the old key's new expiry.
        let new_value = |field: &str| {
            record
                .changes
                .iter()
                .find(|change| change.field == field)
                .map(|change| change.new.clone())
                .unwrap_or(Value::Null)
        };
        payload["new_key_id"] = new_value("rotated_to_key_id");
        payload["old_key_expire_time"] = new_value("expire_time");
    }
    Some(NewEvent {
        event_id: uuid::Uuid::new_v4().to_string(),
        event_type,
        payload: payload.to_string(),
    })
}

/// `key.expired`, found by the background sweep.
pub fn expired() -> NewEvent {
    NewEvent {
        event_id: uuid::Uuid::new_v4().to_string(),
        event_type: EventType::Expired,
        payload: json!({
            "actor": actor_json(&AuditActor::system("expiry")),
            "changes": [],
        })
        .to_string(),
    }
}

fn actor_json(actor: &AuditActor) -> Value {
    json!({ "kind": actor.kind.as_str(), "id": actor.id, "display": actor.display })
}

/// An event as the outbox holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyEvent {
    pub position: i64,
    pub event_id: String,
    /// Kept as text: a newer replica may write types this one does not know.
    pub event_type: String,
    pub workspace_id: String,
    pub key_id: String,
    pub occur_time: UnixMicros,
    pub actor: AuditActor,
    pub changes: Vec<FieldChange>,
    /// `key.rotated`: the successor.
    pub new_key_id: Option<String>,
    /// `key.rotated`: the old key's new expiry, RFC 3339.
    pub old_key_expire_time: Option<String>,
}

impl KeyEvent {
    /// An event from its stored columns; `None` if the payload is not one this service wrote.
    pub fn from_stored(
        position: i64,
        event_id: String,
        event_type: String,
        workspace_id: String,
        key_id: String,
        occur_time: UnixMicros,
        payload: &str,
    ) -> Option<Self> {
        let payload: Value = serde_json::from_str(payload).ok()?;
        let actor = &payload["actor"];
        let text = |value: &Value| value.as_str().map(str::to_owned);
        Some(Self {
            position,
            event_id,
            event_type,
            workspace_id,
            key_id,
            occur_time,
            actor: AuditActor {
                kind: ActorKind::from_db(actor["kind"].as_str()?)?,
                id: text(&actor["id"])?,
                display: text(&actor["display"])?,
            },
            changes: serde_json::from_value(payload["changes"].clone()).ok()?,
            new_key_id: text(&payload["new_key_id"]),
            old_key_expire_time: text(&payload["old_key_expire_time"]),
        })
    }
}

/// Events deleted in one statement by the pruning.
const BATCH: u32 = 1000;

/// Expiries announced in one transaction. Small: on PostgreSQL the transaction holds the lock
/// that every event-writing mutation of every replica waits for.
const EXPIRY_BATCH: u32 = 100;

/// Deletes the events older than the retention, oldest first, in batches, until none is left;
/// returns how many were deleted.
pub async fn prune(store: &dyn Store, config: &WatchConfig) -> Result<u64> {
    let before = now_micros().saturating_sub(duration_micros(config.retention));
    let mut deleted = 0;
    loop {
        let taken = store.delete_key_events_before(before, BATCH).await?;
        deleted += taken;
        if taken < u64::from(BATCH) {
            return Ok(deleted);
        }
    }
}

/// Announces every key whose expiry passed and was not announced yet, in batches, until none is
/// left; returns how many `key.expired` events were written.
pub async fn announce_expired(store: &dyn Store) -> Result<u64> {
    let mut announced = 0;
    loop {
        let sweep = store
            .announce_expired_keys(now_micros(), EXPIRY_BATCH)
            .await?;
        announced += sweep.announced;
        if sweep.marked < u64::from(EXPIRY_BATCH) {
            return Ok(announced);
        }
    }
}

/// Which events a watcher reads next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventQuery {
    /// `None`: every workspace's.
    pub workspace_id: Option<String>,
    /// Events strictly after this position.
    pub after: i64,
    pub limit: u32,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{CallContext, change};

    #[test]
    fn a_rotation_names_the_successor_and_the_old_keys_end() {
        let record = AuditRecord::new(
            AuditAction::Rotate,
            AuditActor::admin(),
            7,
            CallContext::default(),
        )
        .with_changes(vec![
            change(
                "rotated_to_key_id",
                Value::Null,
                Value::from("NEWNEWNEWNEW"),
            ),
            change(
                "expire_time",
                Value::Null,
                Value::from("2026-11-25T00:00:00Z"),
            ),
        ]);
        let event = from_audit(&record).expect("an event");
        assert_eq!(event.event_type, EventType::Rotated);
        let stored = KeyEvent::from_stored(
            1,
            event.event_id.clone(),
            event.event_type.as_str().to_owned(),
            "acme".to_owned(),
            "OLDOLDOLDOLD".to_owned(),
            7,
            &event.payload,
        )
        .expect("the payload reads back");
        assert_eq!(stored.new_key_id.as_deref(), Some("NEWNEWNEWNEW"));
        assert_eq!(
            stored.old_key_expire_time.as_deref(),
            Some("2026-11-25T00:00:00Z")
        );
        assert_eq!(stored.actor, AuditActor::admin());
        assert_eq!(stored.changes, record.changes);
    }

    #[test]
    fn a_call_that_changed_nothing_announces_nothing() {
        let record = AuditRecord {
            outcome: AuditOutcome::Unchanged,
            ..AuditRecord::new(
                AuditAction::Revoke,
                AuditActor::admin(),
                7,
                CallContext::default(),
            )
        };
        assert_eq!(from_audit(&record), None);
    }

    #[test]
    fn every_action_has_its_event_type() {
        let types: Vec<&str> = AuditAction::ALL
            .into_iter()
            .map(|action| EventType::of_action(action).as_str())
            .collect();
        assert_eq!(
            types,
            [
                "key.issued",
                "key.rotated",
                "key.revoked",
                "key.updated",
                "key.disabled",
                "key.enabled",
                "key.issued",
                "key.revoked",
                "key.locked"
            ]
        );
    }
}
