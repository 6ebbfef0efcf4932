//! ListAuditEvents: its request into a command, and audit events into protobuf.

use super::commands::page_size;
use crate::audit::{ActorKind, AuditAction, AuditActor, AuditEvent, AuditOutcome, FieldChange};
use crate::error::Error;
use crate::key::KeyId;
use crate::keys::{AuditPage, ListAuditEvents};
use crate::pb;
use crate::timestamp;

/// The longest actor id a filter may name (longer ones match nothing anyway).
const MAX_ACTOR_ID_LEN: usize = 256;

impl TryFrom<pb::ListAuditEventsRequest> for ListAuditEvents {
    type Error = Error;

    fn try_from(request: pb::ListAuditEventsRequest) -> Result<Self, Error> {
        let key_id = match request.key_id.as_str() {
            "" => None,
            text => Some(KeyId::parse(text).ok_or_else(|| {
                Error::invalid("key_id", "must be a key id (12 base62 characters)")
            })?),
        };
        let actor_id = match request.actor_id.as_str() {
            "" => None,
            id if id.len() > MAX_ACTOR_ID_LEN => {
                return Err(Error::invalid(
                    "actor_id",
                    format!("must be at most {MAX_ACTOR_ID_LEN} bytes"),
                ));
            }
            id => Some(id.to_owned()),
        };
        let time = |field: &'static str, value: &Option<prost_types::Timestamp>| {
            value
                .as_ref()
                .map(|at| {
                    timestamp::from_proto(at)
                        .ok_or_else(|| Error::invalid(field, "is out of range"))
                })
                .transpose()
        };
        let start_time = time("start_time", &request.start_time)?;
        let end_time = time("end_time", &request.end_time)?;
        if let (Some(start), Some(end)) = (start_time, end_time)
            && start >= end
        {
            return Err(Error::invalid("end_time", "must be after start_time"));
        }
        Ok(Self {
            workspace_id: request.workspace_id,
            page_size: page_size(request.page_size)?,
            page_token: request.page_token,
            key_id,
            actor_kind: actor_kind_from_proto(request.actor_kind)?,
            actor_id,
            action: action_from_proto(request.action)?,
            start_time,
            end_time,
        })
    }
}

impl From<AuditPage> for pb::ListAuditEventsResponse {
    fn from(page: AuditPage) -> Self {
        Self {
            audit_events: page.events.iter().map(event_to_proto).collect(),
            next_page_token: page.next_page_token.unwrap_or_default(),
        }
    }
}

pub fn event_to_proto(event: &AuditEvent) -> pb::AuditEvent {
    let record = &event.record;
    pb::AuditEvent {
        event_id: event.event_id.to_string(),
        event_time: Some(timestamp::to_proto(record.occur_time)),
        workspace_id: event.workspace_id.clone(),
        actor: Some(actor_to_proto(&record.actor)),
        action: action_to_proto(record.action) as i32,
        key_id: event.key_id.clone(),
        changes: record.changes.iter().map(change_to_proto).collect(),
        outcome: match record.outcome {
            AuditOutcome::Applied => pb::AuditOutcome::Applied,
            AuditOutcome::Unchanged => pb::AuditOutcome::Unchanged,
        } as i32,
        client_ip: record.context.client_ip.clone(),
        trace_id: record.context.trace_id.clone(),
        request_id: record.context.request_id.clone(),
    }
}

pub fn actor_to_proto(actor: &AuditActor) -> pb::AuditActor {
    pb::AuditActor {
        kind: actor_kind_to_proto(actor.kind) as i32,
        id: actor.id.clone(),
        display: actor.display.clone(),
    }
}

/// A change with its values as JSON text.
pub fn change_to_proto(change: &FieldChange) -> pb::FieldChange {
    pb::FieldChange {
        field: change.field.clone(),
        old_value: change.old.to_string(),
        new_value: change.new.to_string(),
    }
}

/// Each action with its protobuf value, in one table both directions read.
const ACTIONS: [(AuditAction, pb::AuditAction); 9] = [
    (AuditAction::Issue, pb::AuditAction::Issue),
    (AuditAction::Rotate, pb::AuditAction::Rotate),
    (AuditAction::Revoke, pb::AuditAction::Revoke),
    (AuditAction::Update, pb::AuditAction::Update),
    (AuditAction::Disable, pb::AuditAction::Disable),
    (AuditAction::Enable, pb::AuditAction::Enable),
    (AuditAction::IssueTrial, pb::AuditAction::IssueTrial),
    (AuditAction::RevokeTrial, pb::AuditAction::RevokeTrial),
    (AuditAction::Lockout, pb::AuditAction::Lockout),
];

const ACTOR_KINDS: [(ActorKind, pb::ActorKind); 5] = [
    (ActorKind::Admin, pb::ActorKind::Admin),
    (ActorKind::User, pb::ActorKind::User),
    (ActorKind::ApiKey, pb::ActorKind::ApiKey),
    (ActorKind::Anonymous, pb::ActorKind::Anonymous),
    (ActorKind::System, pb::ActorKind::System),
];

fn action_to_proto(action: AuditAction) -> pb::AuditAction {
    ACTIONS
        .into_iter()
        .find_map(|(domain, proto)| (domain == action).then_some(proto))
        .unwrap_or(pb::AuditAction::Unspecified)
}

fn actor_kind_to_proto(kind: ActorKind) -> pb::ActorKind {
    ACTOR_KINDS
        .into_iter()
        .find_map(|(domain, proto)| (domain == kind).then_some(proto))
        .unwrap_or(pb::ActorKind::Unspecified)
}

/// Unset means any action; an unknown number is refused rather than matching nothing.
fn action_from_proto(value: i32) -> Result<Option<AuditAction>, Error> {
    if value == pb::AuditAction::Unspecified as i32 {
        return Ok(None);
    }
    ACTIONS
        .into_iter()
        .find_map(|(domain, proto)| (proto as i32 == value).then_some(domain))
        .map(Some)
        .ok_or_else(|| Error::invalid("action", "is not a known AuditAction"))
}

fn actor_kind_from_proto(value: i32) -> Result<Option<ActorKind>, Error> {
    if value == pb::ActorKind::Unspecified as i32 {
        return Ok(None);
    }
    ACTOR_KINDS
        .into_iter()
        .find_map(|(domain, proto)| (proto as i32 == value).then_some(domain))
        .map(Some)
        .ok_or_else(|| Error::invalid("actor_kind", "is not a known ActorKind"))
}
