//! Webhooks: a workspace's key events POSTed to URLs its developers chose, signed, in order, at
//! least once. `WebhookManager` serves the five RPCs (every decision about who may is
//! `auth::policy`'s); `dispatch` sends; `target` keeps the server from being pointed at itself
//! or at the network behind it; `signing` derives secrets and signs requests.

pub mod dispatch;
pub mod model;
pub mod signing;
pub mod target;

use std::sync::Arc;
use std::time::Duration;

pub use dispatch::{DispatchStats, Dispatcher};
pub use model::{Delivery, DeliveryState, Webhook};
pub use signing::SigningKeys;
pub use target::TargetPolicy;

use crate::audit::CallContext;
use crate::auth::{Action, Caller};
use crate::error::{Error, Result};
use crate::events::EventType;
use crate::key::KeyDescription;
use crate::keys::MAX_PAGE_SIZE;
use crate::keys::page_token::PageTokenCodec;
use crate::store::Store;
use crate::timestamp::now_micros;
use model::DeliveryQuery;

/// How webhooks are sent.
#[derive(Clone, PartialEq, Eq)]
pub struct WebhookConfig {
    /// Allow loopback and private targets (never link-local, metadata or this server).
    pub allow_private_targets: bool,
    /// One attempt's limit, connecting included.
    pub timeout: Duration,
    /// How long a delivery is retried, from when it was queued.
    pub retry_period: Duration,
    /// The delay after the first failed attempt; doubled after each next one.
    pub backoff_base: Duration,
    /// The longest delay between two attempts.
    pub backoff_max: Duration,
    /// Webhooks this replica sends to at once.
    pub concurrency: usize,
    /// Webhooks a workspace may have.
    pub max_per_workspace: usize,
    /// How often the dispatcher looks for work without being woken (retries other replicas
    /// scheduled, leases that ran out).
    pub poll_interval: Duration,
    /// The key webhook secrets are derived under (`--webhook-secret-file`); `None`: a key
    /// stored in the database.
    pub secret: Option<Vec<u8>>,
}

impl std::fmt::Debug for WebhookConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookConfig")
            .field("allow_private_targets", &self.allow_private_targets)
            .field("timeout", &self.timeout)
            .field("retry_period", &self.retry_period)
            .field("backoff_base", &self.backoff_base)
            .field("backoff_max", &self.backoff_max)
            .field("concurrency", &self.concurrency)
            .field("max_per_workspace", &self.max_per_workspace)
            .field("poll_interval", &self.poll_interval)
            .field("secret", &self.secret.as_ref().map(|_| "<from file>"))
            .finish()
    }
}

impl Default for WebhookConfig {
    fn default() -> Self {
        Self {
            allow_private_targets: false,
            timeout: Duration::from_secs(10),
            retry_period: Duration::from_secs(24 * 60 * 60),
            backoff_base: Duration::from_secs(5),
            backoff_max: Duration::from_secs(60 * 60),
            concurrency: 32,
            max_per_workspace: 16,
            poll_interval: Duration::from_secs(1),
            secret: None,
        }
    }
}

/// Redeliveries a webhook may have pending: the API cannot make its queue grow without bound.
const MAX_PENDING_REDELIVERIES: u32 = 100;

/// The most event types a webhook may name (there are 8; a list longer than that repeats).
const MAX_EVENT_TYPES: usize = 32;

/// CreateWebhook, as the caller asked.
#[derive(Debug, Clone)]
pub struct CreateWebhook {
    pub workspace_id: String,
    pub url: String,
    pub event_types: Vec<String>,
    pub description: String,
}

/// ListWebhooks.
#[derive(Debug, Clone)]
pub struct ListWebhooks {
    pub workspace_id: String,
}

/// DeleteWebhook.
#[derive(Debug, Clone)]
pub struct DeleteWebhook {
    pub workspace_id: String,
    pub webhook_id: String,
}

/// ListWebhookDeliveries.
#[derive(Debug, Clone)]
pub struct ListWebhookDeliveries {
    pub workspace_id: String,
    pub webhook_id: String,
    pub page_size: u32,
    pub page_token: String,
    pub state: Option<DeliveryState>,
}

/// RedeliverWebhookEvent.
#[derive(Debug, Clone)]
pub struct RedeliverWebhookEvent {
    pub workspace_id: String,
    pub webhook_id: String,
    pub event_id: String,
}

/// A webhook as shown: never its secret, only the secret's first characters.
#[derive(Debug, Clone)]
pub struct WebhookView {
    pub webhook: Webhook,
    pub secret_hint: String,
}

/// A new webhook and its secret, shown this once.
#[derive(Debug)]
pub struct CreatedWebhook {
    pub view: WebhookView,
    pub signing_secret: String,
}

/// A page of deliveries.
#[derive(Debug)]
pub struct DeliveryPage {
    pub deliveries: Vec<Delivery>,
    pub next_page_token: Option<String>,
}

pub struct WebhookManager {
    store: Arc<dyn Store>,
    policy: Arc<TargetPolicy>,
    keys: SigningKeys,
    config: WebhookConfig,
    page_tokens: PageTokenCodec,
    dispatcher: Arc<Dispatcher>,
}

impl WebhookManager {
    pub fn new(
        store: Arc<dyn Store>,
        policy: Arc<TargetPolicy>,
        keys: SigningKeys,
        config: WebhookConfig,
        page_tokens: PageTokenCodec,
        dispatcher: Arc<Dispatcher>,
    ) -> Self {
        Self {
            store,
            policy,
            keys,
            config,
            page_tokens,
            dispatcher,
        }
    }

    /// CreateWebhook: checks the URL's form and target, stores the webhook (starting after the
    /// newest event) and shows its secret once.
    #[tracing::instrument(name = "webhooks.create", skip_all)]
    pub async fn create(
        &self,
        caller: &Caller,
        _: &CallContext,
        command: CreateWebhook,
    ) -> Result<CreatedWebhook> {
        let workspace_id = caller.workspace_for(&command.workspace_id)?;
        caller.authorize(Action::ManageWebhooks)?;
        let event_types = event_types(command.event_types)?;
        let description = KeyDescription::parse(&command.description)
            .map_err(|reason| Error::invalid("description", reason))?;
        let url = self.policy.check_url(&command.url).await?;
        let webhook_id = uuid::Uuid::new_v4().to_string();
        let webhook = Webhook {
            secret_check: self.keys.check_value(&webhook_id),
            webhook_id,
            workspace_id: workspace_id.as_str().to_owned(),
            url: url.to_string(),
            event_types,
            description: description.as_str().to_owned(),
            create_time: now_micros(),
            created_by: caller.actor().audit().display.clone(),
        };
        if !self
            .store
            .webhooks()
            .insert_webhook(&webhook, self.config.max_per_workspace)
            .await?
        {
            return Err(Error::TooManyWebhooks(self.config.max_per_workspace));
        }
        tracing::info!(
            webhook_id = %webhook.webhook_id,
            workspace_id = %webhook.workspace_id,
            created_by = %webhook.created_by,
            "webhook created"
        );
        let secret = self.keys.secret_for(&webhook.webhook_id);
        Ok(CreatedWebhook {
            signing_secret: secret.reveal(),
            view: WebhookView {
                secret_hint: secret.hint(),
                webhook,
            },
        })
    }

    /// ListWebhooks: the workspace's webhooks, oldest first.
    pub async fn list(
        &self,
        caller: &Caller,
        _: &CallContext,
        command: ListWebhooks,
    ) -> Result<Vec<WebhookView>> {
        let workspace_id = caller.workspace_for(&command.workspace_id)?;
        caller.authorize(Action::ManageWebhooks)?;
        let webhooks = self
            .store
            .webhooks()
            .list_webhooks(workspace_id.as_str())
            .await?;
        Ok(webhooks
            .into_iter()
            .map(|webhook| self.view(webhook))
            .collect())
    }

    /// DeleteWebhook: the webhook and its deliveries go; nothing more is sent to it.
    #[tracing::instrument(name = "webhooks.delete", skip_all)]
    pub async fn delete(
        &self,
        caller: &Caller,
        _: &CallContext,
        command: DeleteWebhook,
    ) -> Result<WebhookView> {
        let workspace_id = caller.workspace_for(&command.workspace_id)?;
        caller.authorize(Action::ManageWebhooks)?;
        let webhook_id = parse_webhook_id(&command.webhook_id)?;
        let webhook = self
            .store
            .webhooks()
            .delete_webhook(workspace_id.as_str(), &webhook_id)
            .await?
            .ok_or(Error::WebhookNotFound)?;
        tracing::info!(
            webhook_id = %webhook.webhook_id,
            workspace_id = %webhook.workspace_id,
            deleted_by = %caller.actor().audit().display,
            "webhook deleted"
        );
        Ok(self.view(webhook))
    }

    /// ListWebhookDeliveries: a page of the webhook's deliveries, newest first, with attempts.
    pub async fn list_deliveries(
        &self,
        caller: &Caller,
        _: &CallContext,
        command: ListWebhookDeliveries,
    ) -> Result<DeliveryPage> {
        let workspace_id = caller.workspace_for(&command.workspace_id)?;
        caller.authorize(Action::ManageWebhooks)?;
        let webhook = self
            .find(workspace_id.as_str(), &command.webhook_id)
            .await?;
        // What a page token is bound to: the webhook and the filter.
        let listing = serde_json::json!([
            "webhook_deliveries",
            webhook.webhook_id,
            command.state.map(DeliveryState::as_str),
        ])
        .to_string();
        let before_delivery_id = match command.page_token.as_str() {
            "" => i64::MAX,
            token => self.page_tokens.decode_audit(token, &listing)?,
        };
        let limit = command.page_size.clamp(1, MAX_PAGE_SIZE);
        let mut deliveries = self
            .store
            .webhooks()
            .list_deliveries(&DeliveryQuery {
                webhook_id: webhook.webhook_id,
                state: command.state,
                before_delivery_id,
                // One more tells whether another page follows.
                limit: limit + 1,
            })
            .await?;
        let next_page_token = if deliveries.len() > limit as usize {
            deliveries.truncate(limit as usize);
            deliveries
                .last()
                .map(|last| self.page_tokens.encode_audit(&listing, last.delivery_id))
        } else {
            None
        };
        Ok(DeliveryPage {
            deliveries,
            next_page_token,
        })
    }

    /// RedeliverWebhookEvent: queues a stored event of the workspace for the webhook again.
    #[tracing::instrument(name = "webhooks.redeliver", skip_all)]
    pub async fn redeliver(
        &self,
        caller: &Caller,
        _: &CallContext,
        command: RedeliverWebhookEvent,
    ) -> Result<Delivery> {
        let workspace_id = caller.workspace_for(&command.workspace_id)?;
        caller.authorize(Action::ManageWebhooks)?;
        if command.event_id.is_empty() {
            return Err(Error::invalid("event_id", "is required"));
        }
        let webhook = self
            .find(workspace_id.as_str(), &command.webhook_id)
            .await?;
        // Event ids are UUIDs: other text names no event.
        let event_id = uuid::Uuid::try_parse(&command.event_id)
            .map_err(|_| Error::EventNotFound)?
            .hyphenated()
            .to_string();
        let event = self
            .store
            .webhooks()
            .find_event(workspace_id.as_str(), &event_id)
            .await?
            .ok_or(Error::EventNotFound)?;
        let delivery = self
            .store
            .webhooks()
            .queue_redelivery(
                &webhook.webhook_id,
                &event,
                now_micros(),
                MAX_PENDING_REDELIVERIES,
            )
            .await?
            .ok_or(Error::RedeliveriesPending(MAX_PENDING_REDELIVERIES))?;
        self.dispatcher.wake();
        Ok(delivery)
    }

    async fn find(&self, workspace_id: &str, webhook_id: &str) -> Result<Webhook> {
        let webhook_id = parse_webhook_id(webhook_id)?;
        self.store
            .webhooks()
            .get_webhook(workspace_id, &webhook_id)
            .await?
            .ok_or(Error::WebhookNotFound)
    }

    fn view(&self, webhook: Webhook) -> WebhookView {
        WebhookView {
            secret_hint: self.keys.secret_for(&webhook.webhook_id).hint(),
            webhook,
        }
    }
}

/// Deletes finished deliveries (and their attempts) queued longer ago than `retention`, in
/// batches; returns how many.
pub async fn prune_deliveries(store: &dyn Store, retention: Duration) -> Result<u64> {
    const BATCH: u32 = 1000;
    let before = now_micros().saturating_sub(crate::timestamp::duration_micros(retention));
    let mut deleted = 0;
    loop {
        let taken = store
            .webhooks()
            .delete_finished_deliveries(before, BATCH)
            .await?;
        deleted += taken;
        if taken < u64::from(BATCH) {
            return Ok(deleted);
        }
    }
}

/// A webhook id as requests name it: required; text that is no UUID names no webhook.
fn parse_webhook_id(text: &str) -> Result<String> {
    if text.is_empty() {
        return Err(Error::invalid("webhook_id", "is required"));
    }
    uuid::Uuid::try_parse(text)
        .map(|id| id.hyphenated().to_string())
        .map_err(|_| Error::WebhookNotFound)
}

/// The event types a webhook names: known ones, each once. Empty means every type.
fn event_types(names: Vec<String>) -> Result<Vec<String>> {
    if names.len() > MAX_EVENT_TYPES {
        return Err(Error::invalid(
            "event_types",
            format!("must name at most {MAX_EVENT_TYPES} types"),
        ));
    }
    let mut types: Vec<String> = Vec::with_capacity(names.len());
    for name in names {
        if EventType::from_name(&name).is_none() {
            let known: Vec<&str> = EventType::ALL.iter().map(|kind| kind.as_str()).collect();
            return Err(Error::invalid(
                "event_types",
                format!(
                    "{} is not an event type; the types are {}",
                    crate::error::excerpt(&name),
                    known.join(", ")
                ),
            ));
        }
        if types.contains(&name) {
            return Err(Error::invalid(
                "event_types",
                format!("{name} is named twice"),
            ));
        }
        types.push(name);
    }
    Ok(types)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_types_are_known_and_named_once() {
        assert_eq!(event_types(vec![]).unwrap(), Vec::<String>::new());
        assert_eq!(
            event_types(vec!["key.rotated".into(), "key.expired".into()]).unwrap(),
            ["key.rotated", "key.expired"]
        );
        assert!(event_types(vec!["key.exploded".into()]).is_err());
        assert!(event_types(vec!["key.issued".into(), "key.issued".into()]).is_err());
        assert!(event_types(vec!["KEY.ISSUED".into()]).is_err());
    }

    #[test]
    fn webhook_ids_are_uuids() {
        assert!(matches!(
            parse_webhook_id(""),
            Err(Error::InvalidArgument {
                field: "webhook_id",
                ..
            })
        ));
        assert!(matches!(
            parse_webhook_id("nope"),
            Err(Error::WebhookNotFound)
        ));
        assert_eq!(
            parse_webhook_id("123E4567-E89B-12D3-A456-426614174000").unwrap(),
            "123e4567-e89b-12d3-a456-426614174000"
        );
    }
}
