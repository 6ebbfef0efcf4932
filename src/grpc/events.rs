//! WatchKeyEvents: its request into a command, and the watch into a stream of responses.

use std::pin::Pin;

use tokio_stream::{Stream, StreamExt as _};
use tonic::Status;

use super::audit::actor_to_proto;
use crate::error::Error;
use crate::events::{EventSubscription, KeyEvent, WatchFrom};
use crate::keys::WatchKeyEvents;
use crate::pb;
use crate::timestamp;

/// The response header of WatchKeyEvents that names the position the watch starts after.
pub const STARTS_AFTER_HEADER: &str = "key-authority-starts-after";

/// The stream WatchKeyEvents answers with.
pub type WatchStream =
    Pin<Box<dyn Stream<Item = Result<pb::WatchKeyEventsResponse, Status>> + Send>>;

impl TryFrom<pb::WatchKeyEventsRequest> for WatchKeyEvents {
    type Error = Error;

    fn try_from(request: pb::WatchKeyEventsRequest) -> Result<Self, Error> {
        if request.after_position < 0 {
            return Err(Error::invalid("after_position", "must not be negative"));
        }
        let from = if request.from_now {
            WatchFrom::Now
        } else {
            WatchFrom::After(request.after_position)
        };
        Ok(Self {
            workspace_id: request.workspace_id,
            from,
            all_workspaces: request.all_workspaces,
        })
    }
}

/// The watch's events as responses; an error ends the stream with its status.
pub fn stream(subscription: EventSubscription) -> WatchStream {
    Box::pin(subscription.into_stream().map(|event| {
        event
            .map(|event| pb::WatchKeyEventsResponse {
                event: Some(event_to_proto(&event)),
            })
            .map_err(Status::from)
    }))
}

pub fn event_to_proto(event: &KeyEvent) -> pb::KeyEvent {
    pb::KeyEvent {
        event_id: event.event_id.clone(),
        position: event.position,
        r#type: event.event_type.clone(),
        workspace_id: event.workspace_id.clone(),
        key_id: event.key_id.clone(),
        event_time: Some(timestamp::to_proto(event.occur_time)),
        actor: Some(actor_to_proto(&event.actor)),
        changes: event
            .changes
            .iter()
            .map(super::audit::change_to_proto)
            .collect(),
        new_key_id: event.new_key_id.clone().unwrap_or_default(),
        old_key_expire_time: event
            .old_key_expire_time
            .as_deref()
            .and_then(|time| time.parse().ok()),
    }
}
