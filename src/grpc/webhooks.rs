//! The webhook RPCs: requests into commands, webhooks and deliveries into protobuf.

use super::commands::page_size;
use crate::error::Error;
use crate::pb;
use crate::timestamp;
use crate::webhooks::model::Attempt;
use crate::webhooks::{
    CreateWebhook, CreatedWebhook, DeleteWebhook, Delivery, DeliveryPage, DeliveryState,
    ListWebhookDeliveries, ListWebhooks, RedeliverWebhookEvent, WebhookView,
};

impl From<pb::CreateWebhookRequest> for CreateWebhook {
    fn from(request: pb::CreateWebhookRequest) -> Self {
        Self {
            workspace_id: request.workspace_id,
            url: request.url,
            event_types: request.event_types,
            description: request.description,
        }
    }
}

impl From<pb::ListWebhooksRequest> for ListWebhooks {
    fn from(request: pb::ListWebhooksRequest) -> Self {
        Self {
            workspace_id: request.workspace_id,
        }
    }
}

impl From<pb::DeleteWebhookRequest> for DeleteWebhook {
    fn from(request: pb::DeleteWebhookRequest) -> Self {
        Self {
            workspace_id: request.workspace_id,
            webhook_id: request.webhook_id,
        }
    }
}

impl TryFrom<pb::ListWebhookDeliveriesRequest> for ListWebhookDeliveries {
    type Error = Error;

    fn try_from(request: pb::ListWebhookDeliveriesRequest) -> Result<Self, Error> {
        let state = match pb::WebhookDeliveryState::try_from(request.state) {
            Ok(pb::WebhookDeliveryState::Unspecified) => None,
            Ok(pb::WebhookDeliveryState::Pending) => Some(DeliveryState::Pending),
            Ok(pb::WebhookDeliveryState::Succeeded) => Some(DeliveryState::Succeeded),
            Ok(pb::WebhookDeliveryState::Failed) => Some(DeliveryState::Failed),
            Err(_) => return Err(Error::invalid("state", "is not a delivery state")),
        };
        Ok(Self {
            workspace_id: request.workspace_id,
            webhook_id: request.webhook_id,
            page_size: page_size(request.page_size)?,
            page_token: request.page_token,
            state,
        })
    }
}

impl From<pb::RedeliverWebhookEventRequest> for RedeliverWebhookEvent {
    fn from(request: pb::RedeliverWebhookEventRequest) -> Self {
        Self {
            workspace_id: request.workspace_id,
            webhook_id: request.webhook_id,
            event_id: request.event_id,
        }
    }
}

impl From<CreatedWebhook> for pb::CreateWebhookResponse {
    fn from(created: CreatedWebhook) -> Self {
        Self {
            webhook: Some(webhook_to_proto(created.view)),
            signing_secret: created.signing_secret,
        }
    }
}

impl From<Vec<WebhookView>> for pb::ListWebhooksResponse {
    fn from(webhooks: Vec<WebhookView>) -> Self {
        Self {
            webhooks: webhooks.into_iter().map(webhook_to_proto).collect(),
        }
    }
}

impl From<WebhookView> for pb::DeleteWebhookResponse {
    fn from(view: WebhookView) -> Self {
        Self {
            webhook: Some(webhook_to_proto(view)),
        }
    }
}

impl From<DeliveryPage> for pb::ListWebhookDeliveriesResponse {
    fn from(page: DeliveryPage) -> Self {
        Self {
            deliveries: page.deliveries.into_iter().map(delivery_to_proto).collect(),
            next_page_token: page.next_page_token.unwrap_or_default(),
        }
    }
}

impl From<Delivery> for pb::RedeliverWebhookEventResponse {
    fn from(delivery: Delivery) -> Self {
        Self {
            delivery: Some(delivery_to_proto(delivery)),
        }
    }
}

fn webhook_to_proto(view: WebhookView) -> pb::Webhook {
    let webhook = view.webhook;
    pb::Webhook {
        webhook_id: webhook.webhook_id,
        workspace_id: webhook.workspace_id,
        url: webhook.url,
        event_types: webhook.event_types,
        description: webhook.description,
        create_time: Some(timestamp::to_proto(webhook.create_time)),
        created_by: webhook.created_by,
        secret_hint: view.secret_hint,
    }
}

fn delivery_to_proto(delivery: Delivery) -> pb::WebhookDelivery {
    let state = match delivery.state {
        DeliveryState::Pending => pb::WebhookDeliveryState::Pending,
        DeliveryState::Succeeded => pb::WebhookDeliveryState::Succeeded,
        DeliveryState::Failed => pb::WebhookDeliveryState::Failed,
    };
    pb::WebhookDelivery {
        delivery_id: delivery.delivery_id.to_string(),
        webhook_id: delivery.webhook_id,
        event_id: delivery.event_id,
        event_type: delivery.event_type,
        position: delivery.position,
        state: state as i32,
        create_time: Some(timestamp::to_proto(delivery.create_time)),
        // Only a pending delivery waits for a next attempt.
        next_attempt_time: delivery
            .next_attempt_time
            .filter(|_| delivery.state == DeliveryState::Pending)
            .map(timestamp::to_proto),
        redelivery: delivery.redelivery,
        attempts: delivery
            .attempts
            .into_iter()
            .map(attempt_to_proto)
            .collect(),
    }
}

fn attempt_to_proto(attempt: Attempt) -> pb::WebhookAttempt {
    let micros = attempt.duration_micros.max(0);
    pb::WebhookAttempt {
        attempt: attempt.attempt,
        attempt_time: Some(timestamp::to_proto(attempt.attempt_time)),
        http_status: attempt.http_status,
        error: attempt.error,
        duration: Some(prost_types::Duration {
            seconds: micros / 1_000_000,
            nanos: i32::try_from((micros % 1_000_000) * 1000).unwrap_or(0),
        }),
    }
}
