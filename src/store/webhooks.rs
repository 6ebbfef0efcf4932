//! Webhooks in the database: the webhooks, their delivery queues, and the leases by which one
//! replica at a time sends a webhook's deliveries. The same SQL runs on both databases but for
//! the claim, where PostgreSQL skips the rows another replica is claiming (`FOR UPDATE SKIP
//! LOCKED`) and SQLite, with one writer, needs nothing.

use async_trait::async_trait;

use crate::error::Result;
use crate::events::KeyEvent;
use crate::timestamp::UnixMicros;
use crate::webhooks::model::{
    Attempt, AttemptResult, ClaimedWebhook, Delivery, DeliveryQuery, Lease, Webhook,
};

#[async_trait]
pub trait WebhookStore: Send + Sync {
    /// Inserts a webhook that starts after the newest event written so far, unless its
    /// workspace has `max_per_workspace` already (then `false`).
    async fn insert_webhook(&self, webhook: &Webhook, max_per_workspace: usize) -> Result<bool>;

    /// A workspace's webhooks, oldest first.
    async fn list_webhooks(&self, workspace_id: &str) -> Result<Vec<Webhook>>;

    async fn get_webhook(&self, workspace_id: &str, webhook_id: &str) -> Result<Option<Webhook>>;

    /// Deletes a webhook with its deliveries and attempts; returns it as it was.
    async fn delete_webhook(&self, workspace_id: &str, webhook_id: &str)
    -> Result<Option<Webhook>>;

    /// A page of a webhook's deliveries, newest first, each with its attempts.
    async fn list_deliveries(&self, query: &DeliveryQuery) -> Result<Vec<Delivery>>;

    /// The stored event of this workspace with this id.
    async fn find_event(&self, workspace_id: &str, event_id: &str) -> Result<Option<KeyEvent>>;

    /// The stored event at this position.
    async fn event_at(&self, position: i64) -> Result<Option<KeyEvent>>;

    /// Queues an event for a webhook again, behind what is queued; returns the new delivery.
    /// `None` when `max_pending` redeliveries of the webhook are pending already.
    async fn queue_redelivery(
        &self,
        webhook_id: &str,
        event: &KeyEvent,
        now: UnixMicros,
        max_pending: u32,
    ) -> Result<Option<Delivery>>;

    /// Leases up to `limit` webhooks that have work (a pending delivery due, or events after
    /// their cursor to queue, due or not: their retry periods count from queueing) and no live
    /// lease, until `lease_until`.
    async fn claim_webhooks(
        &self,
        owner: &str,
        now: UnixMicros,
        lease_until: UnixMicros,
        limit: u32,
    ) -> Result<Vec<ClaimedWebhook>>;

    /// Queues `events` (those of the webhook's workspace after `from` it wants) and moves its
    /// cursor from `from` to `through`, renewing the lease. `false` if the lease was lost.
    async fn queue_deliveries(
        &self,
        lease: &Lease,
        from: i64,
        through: i64,
        events: &[KeyEvent],
        now: UnixMicros,
        lease_until: UnixMicros,
    ) -> Result<bool>;

    /// The webhook's oldest pending delivery.
    async fn next_delivery(&self, webhook_id: &str) -> Result<Option<Delivery>>;

    /// Records an attempt of a pending delivery and what it leaves it as, renewing the lease.
    /// `false` if the lease was lost (nothing is recorded then).
    async fn record_attempt(
        &self,
        lease: &Lease,
        delivery: &Delivery,
        attempt: &Attempt,
        result: AttemptResult,
        lease_until: UnixMicros,
    ) -> Result<bool>;

    /// Ends a lease; the webhook's work is not claimed again before `due_time`.
    async fn release_webhook(&self, lease: &Lease, due_time: UnixMicros) -> Result<()>;

    /// Deletes up to `limit` finished (succeeded or failed) deliveries queued before `before`,
    /// with their attempts; returns how many.
    async fn delete_finished_deliveries(&self, before: UnixMicros, limit: u32) -> Result<u64>;
}

macro_rules! webhook_columns {
    () => {
        "webhook_id, workspace_id, url, event_types, description, create_time, created_by, \
         secret_check"
    };
}

macro_rules! delivery_columns {
    () => {
        "delivery_id, webhook_id, position, event_id, event_type, state, redelivery, create_time, \
         first_attempt_time, next_attempt_time, attempt_count"
    };
}

/// The webhook starts after the newest event: of those kept or, when every one was pruned, the
/// last pruned.
pub(super) const INSERT_WEBHOOK: &str = "insert into webhook (webhook_id, workspace_id, url, \
     event_types, description, create_time, created_by, secret_check, cursor_position, due_time) \
     select $1, $2, $3, $4, $5, $6, $7, $8, \
     coalesce((select max(position) from key_event), \
         (select through_position from key_event_pruned where id = 1), 0), $6 \
     where (select count(*) from webhook where workspace_id = $2) < $9";

pub(super) const LIST_WEBHOOKS: &str = concat!(
    "select ",
    webhook_columns!(),
    " from webhook where workspace_id = $1 order by create_time, webhook_id"
);

pub(super) const SELECT_WEBHOOK: &str = concat!(
    "select ",
    webhook_columns!(),
    " from webhook where workspace_id = $1 and webhook_id = $2"
);

pub(super) const DELETE_WEBHOOK: &str = concat!(
    "delete from webhook where workspace_id = $1 and webhook_id = $2 returning ",
    webhook_columns!()
);

pub(super) const LIST_DELIVERIES: &str = concat!(
    "select ",
    delivery_columns!(),
    " from webhook_delivery where webhook_id = $1 and ($2 is null or state = $2) \
     and delivery_id < $3 order by delivery_id desc limit $4"
);

/// The attempts of deliveries `$2` through `$3` of webhook `$1`.
pub(super) const LIST_ATTEMPTS: &str = "select delivery_id, attempt, attempt_time, http_status, \
     error, duration_micros from webhook_attempt \
     where webhook_id = $1 and delivery_id between $2 and $3 order by delivery_id, attempt";

pub(super) const FIND_EVENT: &str = "select position, event_id, event_type, workspace_id, key_id, \
     occur_time, payload from key_event where event_id = $1 and workspace_id = $2";

pub(super) const EVENT_AT: &str = "select position, event_id, event_type, workspace_id, key_id, \
     occur_time, payload from key_event where position = $1";

/// A redelivery, unless the webhook has `$6` pending already.
pub(super) const INSERT_REDELIVERY: &str = concat!(
    "insert into webhook_delivery (webhook_id, position, event_id, event_type, state, \
     redelivery, create_time, attempt_count) select $1, $2, $3, $4, 'pending', true, $5, 0 \
     where (select count(*) from webhook_delivery where webhook_id = $1 and state = 'pending' \
     and redelivery) < $6 returning ",
    delivery_columns!()
);

pub(super) const INSERT_DELIVERY: &str = concat!(
    "insert into webhook_delivery (webhook_id, position, event_id, event_type, state, \
     redelivery, create_time, attempt_count) values ($1, $2, $3, $4, 'pending', $5, $6, 0) \
     returning ",
    delivery_columns!()
);

/// `$5` is the locking clause: the claim's text on each database.
macro_rules! claim_webhooks {
    ($locking:literal) => {
        concat!(
            "update webhook set lease_owner = $1, lease_until = $2 where webhook_id in (\
             select w.webhook_id from webhook w \
             where (w.lease_until is null or w.lease_until < $3) \
             and ((w.due_time <= $3 and exists (select 1 from webhook_delivery d \
                 where d.webhook_id = w.webhook_id and d.state = 'pending')) \
             or exists (select 1 from key_event e where e.workspace_id = w.workspace_id \
                 and e.position > w.cursor_position)) \
             order by w.due_time limit $4",
            $locking,
            ") returning ",
            webhook_columns!(),
            ", cursor_position"
        )
    };
}

pub(super) const CLAIM_WEBHOOKS_POSTGRES: &str = claim_webhooks!(" for update skip locked");
pub(super) const CLAIM_WEBHOOKS_SQLITE: &str = claim_webhooks!("");

/// Renews a lease that is still this replica's.
pub(super) const RENEW_LEASE: &str =
    "update webhook set lease_until = $3 where webhook_id = $1 and lease_owner = $2";

pub(super) const MOVE_CURSOR: &str = "update webhook set cursor_position = $4, lease_until = $3 \
     where webhook_id = $1 and lease_owner = $2 and cursor_position = $5";

pub(super) const NEXT_DELIVERY: &str = concat!(
    "select ",
    delivery_columns!(),
    " from webhook_delivery where webhook_id = $1 and state = 'pending' \
     order by delivery_id limit 1"
);

pub(super) const INSERT_ATTEMPT: &str = "insert into webhook_attempt (delivery_id, attempt, \
     webhook_id, attempt_time, http_status, error, duration_micros) \
     values ($1, $2, $3, $4, $5, $6, $7)";

pub(super) const UPDATE_DELIVERY: &str = "update webhook_delivery set attempt_count = $2, \
     first_attempt_time = coalesce(first_attempt_time, $3), state = $4, next_attempt_time = $5 \
     where delivery_id = $1 and state = 'pending'";

pub(super) const RELEASE_WEBHOOK: &str = "update webhook set lease_owner = null, \
     lease_until = null, due_time = $3 where webhook_id = $1 and lease_owner = $2";

pub(super) const DELETE_FINISHED_DELIVERIES: &str = "delete from webhook_delivery \
     where delivery_id in (select delivery_id from webhook_delivery \
     where state <> 'pending' and create_time < $1 order by create_time limit $2)";

type WebhookRow = (String, String, String, String, String, i64, String, String);

pub(super) fn webhook_from_row(row: WebhookRow) -> Result<Webhook> {
    let (webhook_id, workspace_id, url, event_types, description, create_time, created_by, check) =
        row;
    let event_types = serde_json::from_str(&event_types).map_err(|error| {
        crate::error::Error::Internal(format!("webhook {webhook_id}: bad event types: {error}"))
    })?;
    Ok(Webhook {
        webhook_id,
        workspace_id,
        url,
        event_types,
        description,
        create_time,
        created_by,
        secret_check: check,
    })
}

pub(super) type DeliveryRow = (
    i64,
    String,
    i64,
    String,
    String,
    String,
    bool,
    i64,
    Option<i64>,
    Option<i64>,
    i32,
);

pub(super) fn delivery_from_row(row: DeliveryRow) -> Result<Delivery> {
    let (
        delivery_id,
        webhook_id,
        position,
        event_id,
        event_type,
        state,
        redelivery,
        create_time,
        first_attempt_time,
        next_attempt_time,
        attempt_count,
    ) = row;
    let state = crate::webhooks::model::DeliveryState::from_db(&state).ok_or_else(|| {
        crate::error::Error::Internal(format!("delivery {delivery_id}: state {state:?}"))
    })?;
    Ok(Delivery {
        delivery_id,
        webhook_id,
        position,
        event_id,
        event_type,
        state,
        redelivery,
        create_time,
        first_attempt_time,
        next_attempt_time,
        attempt_count,
        attempts: Vec::new(),
    })
}

/// A `key_event` row: position, event id, type, workspace, key id, time, payload.
pub(super) type EventRow = (i64, String, String, String, String, i64, String);

pub(super) fn event_from_row(row: EventRow) -> Result<KeyEvent> {
    let (position, event_id, event_type, workspace_id, key_id, time, payload) = row;
    KeyEvent::from_stored(
        position,
        event_id,
        event_type,
        workspace_id,
        key_id,
        time,
        &payload,
    )
    .ok_or_else(|| crate::error::Error::Internal(format!("event {position}: bad payload")))
}

/// Implements `WebhookStore` for a store with a `pool: sqlx::Pool<$db>` field; `$claim` is its
/// claim statement.
macro_rules! impl_sql_webhook_store {
    ($store:ty, $db:ty, $claim:expr) => {
        #[async_trait::async_trait]
        impl $crate::store::WebhookStore for $store {
            async fn insert_webhook(
                &self,
                webhook: &$crate::webhooks::model::Webhook,
                max_per_workspace: usize,
            ) -> $crate::error::Result<bool> {
                use $crate::store::webhooks as sql;
                let inserted = sqlx::query(sql::INSERT_WEBHOOK)
                    .bind(&webhook.webhook_id)
                    .bind(&webhook.workspace_id)
                    .bind(&webhook.url)
                    .bind(serde_json::to_string(&webhook.event_types).unwrap_or_default())
                    .bind(&webhook.description)
                    .bind(webhook.create_time)
                    .bind(&webhook.created_by)
                    .bind(&webhook.secret_check)
                    .bind(i64::try_from(max_per_workspace).unwrap_or(i64::MAX))
                    .execute(&self.pool)
                    .await?;
                Ok(inserted.rows_affected() == 1)
            }

            async fn list_webhooks(
                &self,
                workspace_id: &str,
            ) -> $crate::error::Result<Vec<$crate::webhooks::model::Webhook>> {
                use $crate::store::webhooks as sql;
                let rows = sqlx::query_as(sql::LIST_WEBHOOKS)
                    .bind(workspace_id)
                    .fetch_all(&self.pool)
                    .await?;
                rows.into_iter().map(sql::webhook_from_row).collect()
            }

            async fn get_webhook(
                &self,
                workspace_id: &str,
                webhook_id: &str,
            ) -> $crate::error::Result<Option<$crate::webhooks::model::Webhook>> {
                use $crate::store::webhooks as sql;
                let row = sqlx::query_as(sql::SELECT_WEBHOOK)
                    .bind(workspace_id)
                    .bind(webhook_id)
                    .fetch_optional(&self.pool)
                    .await?;
                row.map(sql::webhook_from_row).transpose()
            }

            async fn delete_webhook(
                &self,
                workspace_id: &str,
                webhook_id: &str,
            ) -> $crate::error::Result<Option<$crate::webhooks::model::Webhook>> {
                use $crate::store::webhooks as sql;
                // The deliveries and their attempts go with it (foreign keys, on delete cascade).
                let row = sqlx::query_as(sql::DELETE_WEBHOOK)
                    .bind(workspace_id)
                    .bind(webhook_id)
                    .fetch_optional(&self.pool)
                    .await?;
                row.map(sql::webhook_from_row).transpose()
            }

            async fn list_deliveries(
                &self,
                query: &$crate::webhooks::model::DeliveryQuery,
            ) -> $crate::error::Result<Vec<$crate::webhooks::model::Delivery>> {
                use $crate::store::webhooks as sql;
                let rows: Vec<sql::DeliveryRow> = sqlx::query_as(sql::LIST_DELIVERIES)
                    .bind(&query.webhook_id)
                    .bind(query.state.map(|state| state.as_str()))
                    .bind(query.before_delivery_id)
                    .bind(i64::from(query.limit))
                    .fetch_all(&self.pool)
                    .await?;
                let mut deliveries = rows
                    .into_iter()
                    .map(sql::delivery_from_row)
                    .collect::<$crate::error::Result<Vec<_>>>()?;
                let (Some(newest), Some(oldest)) = (deliveries.first(), deliveries.last()) else {
                    return Ok(deliveries);
                };
                let attempts: Vec<(i64, i32, i64, i32, String, i64)> =
                    sqlx::query_as(sql::LIST_ATTEMPTS)
                        .bind(&query.webhook_id)
                        .bind(oldest.delivery_id)
                        .bind(newest.delivery_id)
                        .fetch_all(&self.pool)
                        .await?;
                for (delivery_id, attempt, attempt_time, http_status, error, duration) in attempts {
                    if let Some(delivery) = deliveries
                        .iter_mut()
                        .find(|delivery| delivery.delivery_id == delivery_id)
                    {
                        delivery.attempts.push($crate::webhooks::model::Attempt {
                            attempt,
                            attempt_time,
                            http_status,
                            error,
                            duration_micros: duration,
                        });
                    }
                }
                Ok(deliveries)
            }

            async fn find_event(
                &self,
                workspace_id: &str,
                event_id: &str,
            ) -> $crate::error::Result<Option<$crate::events::KeyEvent>> {
                use $crate::store::webhooks as sql;
                let row = sqlx::query_as(sql::FIND_EVENT)
                    .bind(event_id)
                    .bind(workspace_id)
                    .fetch_optional(&self.pool)
                    .await?;
                row.map(sql::event_from_row).transpose()
            }

            async fn event_at(
                &self,
                position: i64,
            ) -> $crate::error::Result<Option<$crate::events::KeyEvent>> {
                use $crate::store::webhooks as sql;
                let row = sqlx::query_as(sql::EVENT_AT)
                    .bind(position)
                    .fetch_optional(&self.pool)
                    .await?;
                row.map(sql::event_from_row).transpose()
            }

            async fn queue_redelivery(
                &self,
                webhook_id: &str,
                event: &$crate::events::KeyEvent,
                now: $crate::timestamp::UnixMicros,
                max_pending: u32,
            ) -> $crate::error::Result<Option<$crate::webhooks::model::Delivery>> {
                use $crate::store::webhooks as sql;
                let row: Option<sql::DeliveryRow> = sqlx::query_as(sql::INSERT_REDELIVERY)
                    .bind(webhook_id)
                    .bind(event.position)
                    .bind(&event.event_id)
                    .bind(&event.event_type)
                    .bind(now)
                    .bind(i64::from(max_pending))
                    .fetch_optional(&self.pool)
                    .await?;
                row.map(sql::delivery_from_row).transpose()
            }

            async fn claim_webhooks(
                &self,
                owner: &str,
                now: $crate::timestamp::UnixMicros,
                lease_until: $crate::timestamp::UnixMicros,
                limit: u32,
            ) -> $crate::error::Result<Vec<$crate::webhooks::model::ClaimedWebhook>> {
                use $crate::store::webhooks as sql;
                let rows: Vec<(
                    String,
                    String,
                    String,
                    String,
                    String,
                    i64,
                    String,
                    String,
                    i64,
                )> = sqlx::query_as($claim)
                    .bind(owner)
                    .bind(lease_until)
                    .bind(now)
                    .bind(i64::from(limit))
                    .fetch_all(&self.pool)
                    .await?;
                rows.into_iter()
                    .map(
                        |(id, workspace, url, types, description, created, by, check, cursor)| {
                            Ok($crate::webhooks::model::ClaimedWebhook {
                                webhook: sql::webhook_from_row((
                                    id,
                                    workspace,
                                    url,
                                    types,
                                    description,
                                    created,
                                    by,
                                    check,
                                ))?,
                                cursor,
                            })
                        },
                    )
                    .collect()
            }

            async fn queue_deliveries(
                &self,
                lease: &$crate::webhooks::model::Lease,
                from: i64,
                through: i64,
                events: &[$crate::events::KeyEvent],
                now: $crate::timestamp::UnixMicros,
                lease_until: $crate::timestamp::UnixMicros,
            ) -> $crate::error::Result<bool> {
                use $crate::store::webhooks as sql;
                let mut tx = self.pool.begin().await?;
                let moved = sqlx::query(sql::MOVE_CURSOR)
                    .bind(&lease.webhook_id)
                    .bind(&lease.owner)
                    .bind(lease_until)
                    .bind(through)
                    .bind(from)
                    .execute(&mut *tx)
                    .await?;
                if moved.rows_affected() != 1 {
                    tx.rollback().await?;
                    return Ok(false);
                }
                for event in events {
                    sqlx::query(sql::INSERT_DELIVERY)
                        .bind(&lease.webhook_id)
                        .bind(event.position)
                        .bind(&event.event_id)
                        .bind(&event.event_type)
                        .bind(false)
                        .bind(now)
                        .execute(&mut *tx)
                        .await?;
                }
                tx.commit().await?;
                Ok(true)
            }

            async fn next_delivery(
                &self,
                webhook_id: &str,
            ) -> $crate::error::Result<Option<$crate::webhooks::model::Delivery>> {
                use $crate::store::webhooks as sql;
                let row = sqlx::query_as(sql::NEXT_DELIVERY)
                    .bind(webhook_id)
                    .fetch_optional(&self.pool)
                    .await?;
                row.map(sql::delivery_from_row).transpose()
            }

            async fn record_attempt(
                &self,
                lease: &$crate::webhooks::model::Lease,
                delivery: &$crate::webhooks::model::Delivery,
                attempt: &$crate::webhooks::model::Attempt,
                result: $crate::webhooks::model::AttemptResult,
                lease_until: $crate::timestamp::UnixMicros,
            ) -> $crate::error::Result<bool> {
                use $crate::store::webhooks as sql;
                use $crate::webhooks::model::{AttemptResult, DeliveryState};
                let mut tx = self.pool.begin().await?;
                let renewed = sqlx::query(sql::RENEW_LEASE)
                    .bind(&lease.webhook_id)
                    .bind(&lease.owner)
                    .bind(lease_until)
                    .execute(&mut *tx)
                    .await?;
                if renewed.rows_affected() != 1 {
                    tx.rollback().await?;
                    return Ok(false);
                }
                sqlx::query(sql::INSERT_ATTEMPT)
                    .bind(delivery.delivery_id)
                    .bind(attempt.attempt)
                    .bind(&lease.webhook_id)
                    .bind(attempt.attempt_time)
                    .bind(attempt.http_status)
                    .bind(&attempt.error)
                    .bind(attempt.duration_micros)
                    .execute(&mut *tx)
                    .await?;
                let (state, next_attempt_time) = match result {
                    AttemptResult::Delivered => (DeliveryState::Succeeded, None),
                    AttemptResult::GaveUp => (DeliveryState::Failed, None),
                    AttemptResult::RetryAt(at) => (DeliveryState::Pending, Some(at)),
                };
                sqlx::query(sql::UPDATE_DELIVERY)
                    .bind(delivery.delivery_id)
                    .bind(attempt.attempt)
                    .bind(attempt.attempt_time)
                    .bind(state.as_str())
                    .bind(next_attempt_time)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                Ok(true)
            }

            async fn release_webhook(
                &self,
                lease: &$crate::webhooks::model::Lease,
                due_time: $crate::timestamp::UnixMicros,
            ) -> $crate::error::Result<()> {
                use $crate::store::webhooks as sql;
                sqlx::query(sql::RELEASE_WEBHOOK)
                    .bind(&lease.webhook_id)
                    .bind(&lease.owner)
                    .bind(due_time)
                    .execute(&self.pool)
                    .await?;
                Ok(())
            }

            async fn delete_finished_deliveries(
                &self,
                before: $crate::timestamp::UnixMicros,
                limit: u32,
            ) -> $crate::error::Result<u64> {
                use $crate::store::webhooks as sql;
                let deleted = sqlx::query(sql::DELETE_FINISHED_DELIVERIES)
                    .bind(before)
                    .bind(i64::from(limit))
                    .execute(&self.pool)
                    .await?;
                Ok(deleted.rows_affected())
            }
        }
    };
}

pub(super) use impl_sql_webhook_store;
