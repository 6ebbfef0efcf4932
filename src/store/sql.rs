//! The SQL both databases run, and the one implementation of `Store` over it.
//!
//! SQLite accepts PostgreSQL's `$N` placeholders, and every statement here sticks to what both
//! understand, so the same text runs on both. `impl_sql_store!` expands the same method bodies
//! for each database's pool type; each store only provides `pool`, `KIND`, `key_changed`, the
//! hook that tells other replicas about a change (PostgreSQL NOTIFY; nothing on SQLite),
//! `order_events` and `event_written` (PostgreSQL: the lock that makes events commit in position
//! order, and their NOTIFY), `events_committed` (SQLite: the in-process doorbell), and
//! `change_feed`, what the other replicas changed.

/// The columns that `KeyRow` reads, in one place for every select: the key (`k`) and the usage
/// budget its rotation chain draws on (`b`). Use with `key_tables!`.
macro_rules! key_columns {
    () => {
        "k.key_id, k.workspace_id, k.name, k.description, k.prefix, k.scopes, k.role, \
         k.environment, k.secret_hash, k.metadata, k.create_time, k.expire_time, k.revoke_time, \
         k.last_used_time, k.total_requests, k.rotated_from_key_id, k.rotated_to_key_id, \
         k.created_by, k.revoked_by, k.usage_limit, \
         coalesce(b.usage_remaining, 0) as usage_remaining, k.budget_id, k.enabled, k.version, \
         k.update_time"
    };
}

macro_rules! key_tables {
    () => {
        " from api_key k left join usage_budget b on b.budget_id = k.budget_id "
    };
}

pub(super) const INSERT_KEY: &str = "insert into api_key (key_id, workspace_id, name, \
     description, prefix, scopes, role, environment, secret_hash, metadata, create_time, \
     expire_time, rotated_from_key_id, created_by, usage_limit, budget_id) \
     values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)";

/// A new rotation chain's usage budget, created with its first key.
pub(super) const INSERT_BUDGET: &str =
    "insert into usage_budget (budget_id, usage_remaining) values ($1, $2)";

pub(super) const INSERT_AUDIT: &str = "insert into audit_event (workspace_id, key_id, action, \
     actor, actor_kind, actor_id, occur_time, changes, outcome, client_ip, trace_id, request_id) \
     values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)";

/// A page of a workspace's events, newest first. `$2`..`$7` are filters (NULL: any);
/// `$8`: the position to continue after.
pub(super) const LIST_AUDIT_EVENTS: &str = "select event_id, workspace_id, key_id, action, \
     actor, actor_kind, actor_id, occur_time, changes, outcome, client_ip, trace_id, request_id \
     from audit_event where workspace_id = $1 \
     and ($2 is null or key_id = $2) \
     and ($3 is null or actor_kind = $3) \
     and ($4 is null or actor_id = $4) \
     and ($5 is null or action = $5) \
     and ($6 is null or occur_time >= $6) \
     and ($7 is null or occur_time < $7) \
     and event_id < $8 \
     order by event_id desc limit $9";

/// Up to `$2` events older than `$1`, oldest first.
pub(super) const DELETE_AUDIT_BEFORE: &str = "delete from audit_event where event_id in \
     (select event_id from audit_event where occur_time < $1 order by occur_time limit $2)";

/// Claims a request id, or takes over a claim older than the window (`$8`). No row is
/// affected while a fresh claim exists; a concurrent, uncommitted one makes this wait for it.
pub(super) const CLAIM_REQUEST: &str = "insert into idempotent_request (scope, request_id, \
     operation, fingerprint, key_id, salt, create_time) values ($1, $2, $3, $4, $5, $6, $7) \
     on conflict (scope, request_id) do update set operation = excluded.operation, \
     fingerprint = excluded.fingerprint, key_id = excluded.key_id, salt = excluded.salt, \
     create_time = excluded.create_time where idempotent_request.create_time < $8";

/// An outbox event; its position comes back.
pub(super) const INSERT_EVENT: &str = "insert into key_event (event_id, workspace_id, event_type, \
     key_id, occur_time, payload) values ($1, $2, $3, $4, $5, $6) returning position";

/// The events after `$1` (of workspace `$2`, or of every workspace when NULL), in order.
pub(super) const LIST_EVENTS: &str = "select position, event_id, event_type, workspace_id, key_id, \
     occur_time, payload from key_event where position > $1 and ($2 is null or workspace_id = $2) \
     order by position limit $3";

/// The newest position: of the newest event kept or, when the pruning deleted every one, of the
/// last it deleted (positions are never reused), so that a watch "from now" does not take the
/// pruned ones for missed.
pub(super) const LATEST_EVENT_POSITION: &str = "select coalesce(max(position), \
     (select through_position from key_event_pruned where id = 1), 0) from key_event";

pub(super) const EVENTS_PRUNED_THROUGH: &str =
    "select through_position from key_event_pruned where id = 1";

/// The last position of the oldest events, in position order, that all happened before `$1`:
/// the pruning deletes a prefix. Times do not rise with positions (`key.expired` happens at the
/// key's expiry, found later; replicas' clocks differ), so an old time behind a recent one waits
/// for it: no event younger than the retention is ever deleted.
/// (The first recent event is found walking positions up from the oldest, which stops as soon as
/// the prefix ends.)
pub(super) const LAST_EVENT_BEFORE: &str = "select coalesce(\
     (select position from key_event where occur_time >= $1 order by position limit 1) - 1, \
     (select max(position) from key_event), 0)";

/// Up to `$2` events at or below position `$1`, lowest first.
pub(super) const DELETE_EVENTS_THROUGH: &str = "delete from key_event where position in \
     (select position from key_event where position <= $1 order by position limit $2) \
     returning position";

pub(super) const MARK_EVENTS_PRUNED: &str = "update key_event_pruned set through_position = $1 \
     where id = 1 and through_position < $1";

/// Marks up to `$2` keys that ended (at or before `$1`) and whose end was not announced yet,
/// earliest first, and returns them. A write first: on SQLite the transaction takes the write
/// lock before it reads (a read first would fail if another write committed in between).
pub(super) const MARK_EXPIRIES_ANNOUNCED: &str = "update api_key set expiry_announced = true \
     where key_id in (select key_id from api_key where expiry_announced = false \
         and expire_time is not null and expire_time <= $1 order by expire_time limit $2) \
     and expiry_announced = false \
     returning key_id, workspace_id, expire_time, revoke_time";

pub(super) const SELECT_REQUEST: &str = "select operation, fingerprint, key_id, salt, \
     create_time from idempotent_request where scope = $1 and request_id = $2";

pub(super) const DELETE_REQUESTS_BEFORE: &str = "delete from idempotent_request \
     where (scope, request_id) in (select scope, request_id from idempotent_request \
     where create_time < $1 order by create_time limit $2)";

pub(super) const SELECT_KEY_IN_WORKSPACE: &str = concat!(
    "select ",
    key_columns!(),
    key_tables!(),
    "where k.workspace_id = $1 and k.key_id = $2"
);

pub(super) const SELECT_KEY_BY_ID: &str = concat!(
    "select ",
    key_columns!(),
    key_tables!(),
    "where k.key_id = $1"
);

/// `$2`: include inactive keys; `$3`: now; `($4, $5)`: the position to continue after.
pub(super) const LIST_KEYS: &str = concat!(
    "select ",
    key_columns!(),
    key_tables!(),
    "where k.workspace_id = $1 \
     and ($2 or (k.revoke_time is null and k.enabled \
         and (k.expire_time is null or k.expire_time > $3))) \
     and (k.create_time, k.key_id) < ($4, $5) \
     order by k.create_time desc, k.key_id desc limit $6"
);

pub(super) const COUNT_KEYS: &str = "select count(*) from api_key where workspace_id = $1 \
     and ($2 or (revoke_time is null and enabled \
         and (expire_time is null or expire_time > $3)))";

pub(super) const REVOKE_KEY: &str = "update api_key set revoke_time = $1, revoked_by = $2, \
     version = version + 1, update_time = $1 \
     where workspace_id = $3 and key_id = $4 and revoke_time is null";

/// Writes a key's settings if it is still at version `$10` and not revoked.
pub(super) const UPDATE_KEY: &str = "update api_key set name = $1, description = $2, \
     scopes = $3, role = $4, metadata = $5, expire_time = $6, enabled = $7, update_time = $8, \
     version = version + 1 \
     where workspace_id = $9 and key_id = $11 and version = $10 and revoke_time is null";

/// Claims the rotation: only one of two concurrent rotations can match `rotated_to_key_id is
/// null`, so only one successor is ever inserted.
/// The version check (`$6`) makes the event's old values exact: any change since the key was read
/// fails the rotation, which the caller reports as a conflict to retry.
pub(super) const MARK_ROTATED: &str = "update api_key set rotated_to_key_id = $1, \
     expire_time = case when expire_time is null or expire_time > $2 then $2 else expire_time end, \
     version = version + 1, update_time = $5 \
     where workspace_id = $3 and key_id = $4 and rotated_to_key_id is null \
     and revoke_time is null and enabled and (expire_time is null or expire_time > $5) \
     and version = $6";

/// A guard against a corrupt (cyclic) chain; a key rotated daily for 270 years stays below it.
pub(super) const MAX_ROTATION_CHAIN: usize = 100_000;

pub(super) const ADD_USAGE: &str = "update api_key set total_requests = total_requests + $1, \
     last_used_time = case when last_used_time is null or last_used_time < $2 then $2 \
     else last_used_time end where key_id = $3";

/// A reported usage batch's counts: only for a key of the reporter's workspace (`$4`) without
/// a usage limit.
pub(super) const ADD_REPORTED_USAGE: &str = "update api_key \
     set total_requests = total_requests + $1, \
     last_used_time = case when last_used_time is null or last_used_time < $2 then $2 \
     else last_used_time end where key_id = $3 and workspace_id = $4 and usage_limit = 0";

/// Consumes `$1` uses of budget `$2` (checks for at least one when `$1` is 0) in one atomic
/// statement, so concurrent verifies of any key of the chain on any number of replicas never
/// give more VALID verdicts than the limit.
pub(super) const CONSUME_USAGE: &str = "update usage_budget \
     set usage_remaining = usage_remaining - $1 \
     where budget_id = $2 \
     and usage_remaining >= case when $1 > 0 then $1 else 1 end \
     returning usage_remaining";

/// Up to `$2` trial keys that ended before `$1`, oldest first; trial keys always expire.
pub(super) const DELETE_ENDED_TRIAL_KEYS: &str = "delete from api_key where key_id in \
     (select key_id from api_key where environment = 'trial' and expire_time < $1 \
     order by expire_time limit $2) \
     returning budget_id";

/// A budget no key draws on any more.
pub(super) const DELETE_UNUSED_BUDGET: &str = "delete from usage_budget where budget_id = $1 \
     and not exists (select 1 from api_key where budget_id = $1)";

pub(super) const INSERT_SECRET: &str =
    "insert into service_secret (name, value) values ($1, $2) on conflict (name) do nothing";

pub(super) const SELECT_SECRET: &str = "select value from service_secret where name = $1";

/// Implements `Store` for a type with a `pool: sqlx::Pool<$db>` field, a `KIND: StoreKind`, an
/// `async fn key_changed(tx: &mut sqlx::Transaction<'_, $db>, key_id: &str) -> Result<()>` and
/// a `fn change_feed(&self) -> Changes`.
macro_rules! impl_sql_store {
    ($store:ty, $db:ty) => {
        #[async_trait::async_trait]
        impl $crate::store::Store for $store {
            #[tracing::instrument(name = "store.insert_key", skip_all, fields(key_id = %key.key.key_id))]
            async fn insert_key(
                &self,
                key: &$crate::key::StoredKey,
                mutation: &$crate::store::Mutation,
            ) -> $crate::error::Result<()> {
                let mut tx = begin_mutation(&self.pool).await?;
                claim_request(&mut tx, mutation).await?;
                insert_key_row(&mut tx, key).await?;
                insert_audit(
                    &mut tx,
                    key.key.workspace_id.as_str(),
                    key.key.key_id.as_str(),
                    &mutation.audit,
                )
                .await?;
                tx.commit().await?;
                self.events_committed();
                Ok(())
            }

            #[tracing::instrument(name = "store.get_key", skip_all, fields(key_id = %key_id))]
            async fn get_key(
                &self,
                workspace_id: &$crate::key::WorkspaceId,
                key_id: &$crate::key::KeyId,
            ) -> $crate::error::Result<Option<$crate::key::Key>> {
                let row: Option<KeyRow> = sqlx::query_as($crate::store::sql::SELECT_KEY_IN_WORKSPACE)
                    .bind(workspace_id.as_str())
                    .bind(key_id.as_str())
                    .fetch_optional(&self.pool)
                    .await?;
                row.map(KeyRow::into_key).transpose()
            }

            #[tracing::instrument(name = "store.find_key_for_verify", skip_all, fields(key_id = %key_id))]
            async fn find_key_for_verify(
                &self,
                key_id: &$crate::key::KeyId,
            ) -> $crate::error::Result<Option<$crate::key::StoredKey>> {
                let row: Option<KeyRow> = sqlx::query_as($crate::store::sql::SELECT_KEY_BY_ID)
                    .bind(key_id.as_str())
                    .fetch_optional(&self.pool)
                    .await?;
                row.map(KeyRow::into_stored).transpose()
            }

            #[tracing::instrument(name = "store.list_keys", skip_all, fields(workspace_id = %query.workspace_id.as_str()))]
            async fn list_keys(
                &self,
                query: &$crate::store::ListQuery,
            ) -> $crate::error::Result<(Vec<$crate::key::Key>, i64)> {
                let (after_time, after_id) = match &query.after {
                    Some((time, id)) => (*time, id.as_str()),
                    None => (i64::MAX, ""),
                };
                let rows: Vec<KeyRow> = sqlx::query_as($crate::store::sql::LIST_KEYS)
                    .bind(query.workspace_id.as_str())
                    .bind(query.include_inactive)
                    .bind(query.now)
                    .bind(after_time)
                    .bind(after_id)
                    .bind(i64::from(query.limit))
                    .fetch_all(&self.pool)
                    .await?;
                let (total,): (i64,) = sqlx::query_as($crate::store::sql::COUNT_KEYS)
                    .bind(query.workspace_id.as_str())
                    .bind(query.include_inactive)
                    .bind(query.now)
                    .fetch_one(&self.pool)
                    .await?;
                let keys = rows
                    .into_iter()
                    .map(KeyRow::into_key)
                    .collect::<$crate::error::Result<Vec<_>>>()?;
                Ok((keys, total))
            }

            #[tracing::instrument(name = "store.revoke_key", skip_all, fields(key_id = %key_id))]
            async fn revoke_key(
                &self,
                workspace_id: &$crate::key::WorkspaceId,
                key_id: &$crate::key::KeyId,
                successors: bool,
                revoked_by: &str,
                mutation: &$crate::store::Mutation,
            ) -> $crate::error::Result<Option<$crate::store::Revocation>> {
                let mut tx = begin_mutation(&self.pool).await?;
                claim_request(&mut tx, mutation).await?;
                let mut newly_revoked = Vec::new();
                let Some(key) = revoke_one(
                    &mut tx,
                    workspace_id,
                    key_id,
                    revoked_by,
                    &mutation.audit,
                    &mut newly_revoked,
                )
                .await?
                else {
                    tx.rollback().await?;
                    return Ok(None);
                };
                if newly_revoked.is_empty() {
                    // Revoked already: the call still leaves its one event, saying so.
                    let unchanged = $crate::store::AuditRecord {
                        outcome: $crate::audit::AuditOutcome::Unchanged,
                        ..mutation.audit.clone()
                    };
                    insert_audit(&mut tx, workspace_id.as_str(), key_id.as_str(), &unchanged)
                        .await?;
                }
                let mut chain = Vec::new();
                if successors {
                    let chain_audit = &mutation.audit;
                    // Each key row is locked by its update before its successor is read, so a
                    // rotation racing this walk either commits first (and is followed) or finds
                    // its key revoked and fails.
                    let mut next = key.rotated_to_key_id.clone();
                    while let Some(successor_id) = next {
                        if chain.len() >= $crate::store::sql::MAX_ROTATION_CHAIN {
                            return Err($crate::error::Error::Internal(format!(
                                "rotation chain of key {key_id} is longer than {}",
                                $crate::store::sql::MAX_ROTATION_CHAIN
                            )));
                        }
                        let Some(successor) = revoke_one(
                            &mut tx,
                            workspace_id,
                            &successor_id,
                            revoked_by,
                            chain_audit,
                            &mut newly_revoked,
                        )
                        .await?
                        else {
                            break;
                        };
                        next = successor.rotated_to_key_id.clone();
                        chain.push(successor);
                    }
                }
                tx.commit().await?;
                self.events_committed();
                Ok(Some($crate::store::Revocation {
                    key,
                    successors: chain,
                    newly_revoked,
                }))
            }

            #[tracing::instrument(name = "store.rotate_key", skip_all, fields(key_id = %key_id))]
            async fn rotate_key(
                &self,
                workspace_id: &$crate::key::WorkspaceId,
                key_id: &$crate::key::KeyId,
                version: i64,
                successor: &$crate::key::StoredKey,
                previous_expire_time: $crate::timestamp::UnixMicros,
                mutation: &$crate::store::Mutation,
            ) -> $crate::error::Result<Option<$crate::store::Rotation>> {
                let mut tx = begin_mutation(&self.pool).await?;
                claim_request(&mut tx, mutation).await?;
                let audit = &mutation.audit;
                let claimed = sqlx::query($crate::store::sql::MARK_ROTATED)
                    .bind(successor.key.key_id.as_str())
                    .bind(previous_expire_time)
                    .bind(workspace_id.as_str())
                    .bind(key_id.as_str())
                    .bind(audit.occur_time)
                    .bind(version)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                if claimed != 1 {
                    tx.rollback().await?;
                    return Ok(None);
                }
                insert_audit(&mut tx, workspace_id.as_str(), key_id.as_str(), audit).await?;
                insert_key_row(&mut tx, successor).await?;
                Self::key_changed(&mut tx, key_id.as_str()).await?;
                let previous: KeyRow = sqlx::query_as($crate::store::sql::SELECT_KEY_IN_WORKSPACE)
                    .bind(workspace_id.as_str())
                    .bind(key_id.as_str())
                    .fetch_one(&mut *tx)
                    .await?;
                // Read back: the successor shows the chain's budget as it is now.
                let inserted: KeyRow = sqlx::query_as($crate::store::sql::SELECT_KEY_IN_WORKSPACE)
                    .bind(workspace_id.as_str())
                    .bind(successor.key.key_id.as_str())
                    .fetch_one(&mut *tx)
                    .await?;
                tx.commit().await?;
                self.events_committed();
                Ok(Some($crate::store::Rotation {
                    previous: previous.into_key()?,
                    successor: inserted.into_key()?,
                }))
            }

            #[tracing::instrument(name = "store.update_key", skip_all, fields(key_id = %key.key_id))]
            async fn update_key(
                &self,
                key: &$crate::key::Key,
                mutation: &$crate::store::Mutation,
            ) -> $crate::error::Result<Option<$crate::key::Key>> {
                let mut tx = begin_mutation(&self.pool).await?;
                claim_request(&mut tx, mutation).await?;
                let updated = sqlx::query($crate::store::sql::UPDATE_KEY)
                    .bind(key.name.as_str())
                    .bind(key.description.as_str())
                    .bind($crate::store::row::scopes_json(key))
                    .bind(key.role.as_str())
                    .bind($crate::store::row::metadata_json(key))
                    .bind(key.expire_time)
                    .bind(key.enabled)
                    .bind(mutation.audit.occur_time)
                    .bind(key.workspace_id.as_str())
                    .bind(key.version)
                    .bind(key.key_id.as_str())
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                if updated != 1 {
                    tx.rollback().await?;
                    return Ok(None);
                }
                insert_audit(
                    &mut tx,
                    key.workspace_id.as_str(),
                    key.key_id.as_str(),
                    &mutation.audit,
                )
                .await?;
                Self::key_changed(&mut tx, key.key_id.as_str()).await?;
                let row: KeyRow = sqlx::query_as($crate::store::sql::SELECT_KEY_IN_WORKSPACE)
                    .bind(key.workspace_id.as_str())
                    .bind(key.key_id.as_str())
                    .fetch_one(&mut *tx)
                    .await?;
                tx.commit().await?;
                self.events_committed();
                row.into_key().map(Some)
            }

            #[tracing::instrument(name = "store.find_request", skip_all)]
            async fn find_request(
                &self,
                scope: &str,
                request_id: &str,
            ) -> $crate::error::Result<Option<$crate::store::DoneRequest>> {
                let row: Option<(String, String, String, Vec<u8>, i64)> =
                    sqlx::query_as($crate::store::sql::SELECT_REQUEST)
                        .bind(scope)
                        .bind(request_id)
                        .fetch_optional(&self.pool)
                        .await?;
                Ok(row.map(|(operation, fingerprint, key_id, salt, create_time)| {
                    $crate::store::DoneRequest {
                        operation,
                        fingerprint,
                        key_id,
                        salt,
                        create_time,
                    }
                }))
            }

            #[tracing::instrument(name = "store.delete_requests_before", skip_all)]
            async fn delete_requests_before(
                &self,
                before: $crate::timestamp::UnixMicros,
                limit: u32,
            ) -> $crate::error::Result<u64> {
                delete_batch(&self.pool, $crate::store::sql::DELETE_REQUESTS_BEFORE, before, limit)
                    .await
            }

            #[tracing::instrument(name = "store.insert_audit_event", skip_all, fields(key_id = %key_id))]
            async fn insert_audit_event(
                &self,
                workspace_id: &$crate::key::WorkspaceId,
                key_id: &$crate::key::KeyId,
                mutation: &$crate::store::Mutation,
            ) -> $crate::error::Result<()> {
                let mut tx = begin_mutation(&self.pool).await?;
                claim_request(&mut tx, mutation).await?;
                insert_audit(&mut tx, workspace_id.as_str(), key_id.as_str(), &mutation.audit)
                    .await?;
                tx.commit().await?;
                self.events_committed();
                Ok(())
            }

            #[tracing::instrument(name = "store.list_audit_events", skip_all, fields(workspace_id = %query.workspace_id))]
            async fn list_audit_events(
                &self,
                query: &$crate::audit::AuditQuery,
            ) -> $crate::error::Result<Vec<$crate::audit::AuditEvent>> {
                let rows: Vec<$crate::store::row::AuditRow> =
                    sqlx::query_as($crate::store::sql::LIST_AUDIT_EVENTS)
                        .bind(query.workspace_id.as_str())
                        .bind(query.key_id.as_deref())
                        .bind(query.actor_kind.map($crate::audit::ActorKind::as_str))
                        .bind(query.actor_id.as_deref())
                        .bind(query.action.map($crate::audit::AuditAction::as_str))
                        .bind(query.start_time)
                        .bind(query.end_time)
                        .bind(query.before_event_id.unwrap_or(i64::MAX))
                        .bind(i64::from(query.limit))
                        .fetch_all(&self.pool)
                        .await?;
                rows.into_iter()
                    .map($crate::store::row::AuditRow::into_event)
                    .collect()
            }

            #[tracing::instrument(name = "store.delete_audit_events_before", skip_all)]
            async fn delete_audit_events_before(
                &self,
                before: $crate::timestamp::UnixMicros,
                limit: u32,
            ) -> $crate::error::Result<u64> {
                delete_batch(&self.pool, $crate::store::sql::DELETE_AUDIT_BEFORE, before, limit)
                    .await
            }

            #[tracing::instrument(name = "store.list_key_events", skip_all)]
            async fn list_key_events(
                &self,
                query: &$crate::events::EventQuery,
            ) -> $crate::error::Result<Vec<$crate::events::KeyEvent>> {
                let rows: Vec<$crate::store::webhooks::EventRow> =
                    sqlx::query_as($crate::store::sql::LIST_EVENTS)
                        .bind(query.after)
                        .bind(query.workspace_id.as_deref())
                        .bind(i64::from(query.limit))
                        .fetch_all(&self.pool)
                        .await?;
                rows.into_iter()
                    .map($crate::store::webhooks::event_from_row)
                    .collect()
            }

            async fn latest_event_position(&self) -> $crate::error::Result<i64> {
                let (position,): (i64,) = sqlx::query_as($crate::store::sql::LATEST_EVENT_POSITION)
                    .fetch_one(&self.pool)
                    .await?;
                Ok(position)
            }

            async fn events_pruned_through(&self) -> $crate::error::Result<i64> {
                let (position,): (i64,) = sqlx::query_as($crate::store::sql::EVENTS_PRUNED_THROUGH)
                    .fetch_one(&self.pool)
                    .await?;
                Ok(position)
            }

            #[tracing::instrument(name = "store.delete_key_events_before", skip_all)]
            async fn delete_key_events_before(
                &self,
                before: $crate::timestamp::UnixMicros,
                limit: u32,
            ) -> $crate::error::Result<u64> {
                let mut tx = self.pool.begin().await?;
                let (through,): (i64,) = sqlx::query_as($crate::store::sql::LAST_EVENT_BEFORE)
                    .bind(before)
                    .fetch_one(&mut *tx)
                    .await?;
                let deleted: Vec<(i64,)> = sqlx::query_as($crate::store::sql::DELETE_EVENTS_THROUGH)
                    .bind(through)
                    .bind(i64::from(limit))
                    .fetch_all(&mut *tx)
                    .await?;
                if let Some(last) = deleted.iter().map(|(position,)| *position).max() {
                    sqlx::query($crate::store::sql::MARK_EVENTS_PRUNED)
                        .bind(last)
                        .execute(&mut *tx)
                        .await?;
                }
                tx.commit().await?;
                Ok(deleted.len() as u64)
            }

            #[tracing::instrument(name = "store.announce_expired_keys", skip_all)]
            async fn announce_expired_keys(
                &self,
                now: $crate::timestamp::UnixMicros,
                limit: u32,
            ) -> $crate::error::Result<$crate::store::ExpirySweep> {
                let mut tx = begin_mutation(&self.pool).await?;
                let mut ended: Vec<(String, String, i64, Option<i64>)> =
                    sqlx::query_as($crate::store::sql::MARK_EXPIRIES_ANNOUNCED)
                        .bind(now)
                        .bind(i64::from(limit))
                        .fetch_all(&mut *tx)
                        .await?;
                // Announced in the order the keys ended.
                ended.sort_by(|a, b| (a.2, &a.0).cmp(&(b.2, &b.0)));
                let marked = ended.len() as u64;
                let mut announced = 0;
                for (key_id, workspace_id, expire_time, revoke_time) in ended {
                    // A key revoked before its end never expired: it is marked, not announced.
                    if revoke_time.is_none_or(|revoked| revoked > expire_time) {
                        let event = $crate::events::expired();
                        insert_event(&mut tx, &workspace_id, &key_id, expire_time, &event).await?;
                        announced += 1;
                    }
                }
                tx.commit().await?;
                self.events_committed();
                Ok($crate::store::ExpirySweep { marked, announced })
            }

            #[tracing::instrument(name = "store.record_usage", skip_all, fields(keys = deltas.len()))]
            async fn record_usage(
                &self,
                deltas: &[$crate::store::UsageDelta],
            ) -> Result<(), $crate::store::UsageWriteError> {
                let failed = |written: usize| {
                    move |error: sqlx::Error| $crate::store::UsageWriteError {
                        written,
                        error: error.into(),
                    }
                };
                if !Self::USAGE_IN_ONE_TRANSACTION {
                    for (written, delta) in deltas.iter().enumerate() {
                        sqlx::query($crate::store::sql::ADD_USAGE)
                            .bind(delta.requests)
                            .bind(delta.last_used_time)
                            .bind(delta.key_id.as_str())
                            .execute(&self.pool)
                            .await
                            .map_err(failed(written))?;
                    }
                    return Ok(());
                }
                let mut tx = self.pool.begin().await.map_err(failed(0))?;
                for delta in deltas {
                    sqlx::query($crate::store::sql::ADD_USAGE)
                        .bind(delta.requests)
                        .bind(delta.last_used_time)
                        .bind(delta.key_id.as_str())
                        .execute(&mut *tx)
                        .await
                        .map_err(failed(0))?;
                }
                tx.commit().await.map_err(failed(0))?;
                Ok(())
            }

            #[tracing::instrument(name = "store.report_usage", skip_all, fields(keys = deltas.len()))]
            async fn report_usage(
                &self,
                workspace_id: &$crate::key::WorkspaceId,
                deltas: &[$crate::store::UsageDelta],
                claim: Option<&$crate::store::RequestClaim>,
            ) -> $crate::error::Result<Vec<$crate::key::KeyId>> {
                // One transaction, its row locks taken in key id order (the caller sorts): two
                // batches cannot deadlock, and the periodic flushes hold one row lock at a time.
                let mut tx = self.pool.begin().await?;
                if let Some(claim) = claim {
                    claim_one(&mut tx, claim).await?;
                }
                let mut skipped = Vec::new();
                for delta in deltas {
                    let counted = sqlx::query($crate::store::sql::ADD_REPORTED_USAGE)
                        .bind(delta.requests)
                        .bind(delta.last_used_time)
                        .bind(delta.key_id.as_str())
                        .bind(workspace_id.as_str())
                        .execute(&mut *tx)
                        .await?
                        .rows_affected();
                    if counted == 0 {
                        skipped.push(delta.key_id.clone());
                    }
                }
                tx.commit().await?;
                Ok(skipped)
            }

            #[tracing::instrument(name = "store.consume_usage", skip_all, fields(budget_id = %budget_id))]
            async fn consume_usage(
                &self,
                budget_id: &str,
                cost: i64,
            ) -> $crate::error::Result<Option<i64>> {
                let remaining: Option<(i64,)> = sqlx::query_as($crate::store::sql::CONSUME_USAGE)
                    .bind(cost)
                    .bind(budget_id)
                    .fetch_optional(&self.pool)
                    .await?;
                Ok(remaining.map(|(remaining,)| remaining))
            }

            #[tracing::instrument(name = "store.delete_ended_trial_keys", skip_all)]
            async fn delete_ended_trial_keys(
                &self,
                before: $crate::timestamp::UnixMicros,
                limit: u32,
            ) -> $crate::error::Result<u64> {
                let mut tx = self.pool.begin().await?;
                let budgets: Vec<(Option<String>,)> =
                    sqlx::query_as($crate::store::sql::DELETE_ENDED_TRIAL_KEYS)
                        .bind(before)
                        .bind(i64::from(limit))
                        .fetch_all(&mut *tx)
                        .await?;
                let deleted = budgets.len() as u64;
                let budgets: std::collections::BTreeSet<String> =
                    budgets.into_iter().filter_map(|(budget,)| budget).collect();
                for budget in budgets {
                    sqlx::query($crate::store::sql::DELETE_UNUSED_BUDGET)
                        .bind(budget)
                        .execute(&mut *tx)
                        .await?;
                }
                tx.commit().await?;
                Ok(deleted)
            }

            async fn shared_secret(&self, name: &str) -> $crate::error::Result<Vec<u8>> {
                let mut candidate = vec![0u8; 32];
                getrandom::fill(&mut candidate)
                    .map_err(|error| $crate::error::Error::Internal(error.to_string()))?;
                // Every replica races to insert; the first one wins and all read the same value.
                sqlx::query($crate::store::sql::INSERT_SECRET)
                    .bind(name)
                    .bind(candidate)
                    .execute(&self.pool)
                    .await?;
                let (value,): (Vec<u8>,) = sqlx::query_as($crate::store::sql::SELECT_SECRET)
                    .bind(name)
                    .fetch_one(&self.pool)
                    .await?;
                Ok(value)
            }

            fn webhooks(&self) -> &dyn $crate::store::WebhookStore {
                self
            }

            async fn ping(&self) -> $crate::error::Result<()> {
                sqlx::query("select 1").execute(&self.pool).await?;
                Ok(())
            }

            async fn probe(&self) -> $crate::error::Result<()> {
                self.probe_connection().await
            }

            fn kind(&self) -> $crate::store::StoreKind {
                Self::KIND
            }

            fn changes(&self) -> $crate::store::Changes {
                self.change_feed()
            }

            fn pool_stats(&self) -> $crate::store::PoolStats {
                $crate::store::PoolStats {
                    open: self.pool.size(),
                    idle: u32::try_from(self.pool.num_idle()).unwrap_or(u32::MAX),
                    max: self.pool.options().get_max_connections(),
                }
            }

            async fn close(&self) {
                self.pool.close().await;
            }
        }

        async fn insert_key_row(
            tx: &mut sqlx::Transaction<'_, $db>,
            stored: &$crate::key::StoredKey,
        ) -> $crate::error::Result<()> {
            let key = &stored.key;
            sqlx::query($crate::store::sql::INSERT_KEY)
                .bind(key.key_id.as_str())
                .bind(key.workspace_id.as_str())
                .bind(key.name.as_str())
                .bind(key.description.as_str())
                .bind(key.prefix.as_str())
                .bind($crate::store::row::scopes_json(key))
                .bind(key.role.as_str())
                .bind(key.environment.as_str())
                .bind(stored.secret_hash.as_str())
                .bind($crate::store::row::metadata_json(key))
                .bind(key.create_time)
                .bind(key.expire_time)
                .bind(key.rotated_from_key_id.as_ref().map($crate::key::KeyId::as_str))
                .bind(key.created_by.as_str())
                .bind(key.usage_limit)
                .bind(key.budget_id.as_deref())
                .execute(&mut **tx)
                .await?;
            // The first key of a chain brings the chain's budget; successors share it.
            if key.budget_id.as_deref() == Some(key.key_id.as_str()) {
                sqlx::query($crate::store::sql::INSERT_BUDGET)
                    .bind(key.key_id.as_str())
                    .bind(key.usage_remaining)
                    .execute(&mut **tx)
                    .await?;
            }
            Ok(())
        }

        /// Begins a transaction that may write events; on PostgreSQL it first takes the lock that
        /// makes events commit in position order.
        async fn begin_mutation(
            pool: &sqlx::Pool<$db>,
        ) -> $crate::error::Result<sqlx::Transaction<'static, $db>> {
            let mut tx = pool.begin().await?;
            <$store>::order_events(&mut tx).await?;
            Ok(tx)
        }

        /// Writes one outbox event and rings the doorbell of the watchers (PostgreSQL: NOTIFY,
        /// delivered on commit).
        async fn insert_event(
            tx: &mut sqlx::Transaction<'_, $db>,
            workspace_id: &str,
            key_id: &str,
            occur_time: $crate::timestamp::UnixMicros,
            event: &$crate::events::NewEvent,
        ) -> $crate::error::Result<()> {
            let (position,): (i64,) = sqlx::query_as($crate::store::sql::INSERT_EVENT)
                .bind(event.event_id.as_str())
                .bind(workspace_id)
                .bind(event.event_type.as_str())
                .bind(key_id)
                .bind(occur_time)
                .bind(event.payload.as_str())
                .fetch_one(&mut **tx)
                .await?;
            <$store>::event_written(tx, position).await
        }

        /// Runs one of the bounded `delete ... before $1 limit $2` statements; returns how many
        /// rows it deleted.
        async fn delete_batch(
            pool: &sqlx::Pool<$db>,
            statement: &'static str,
            before: $crate::timestamp::UnixMicros,
            limit: u32,
        ) -> $crate::error::Result<u64> {
            let deleted = sqlx::query(statement)
                .bind(before)
                .bind(i64::from(limit))
                .execute(pool)
                .await?
                .rows_affected();
            Ok(deleted)
        }

        /// Claims the mutation's request id, if it has one: the first statement of its
        /// transaction, so that a concurrent duplicate waits here for this one to end.
        async fn claim_request(
            tx: &mut sqlx::Transaction<'_, $db>,
            mutation: &$crate::store::Mutation,
        ) -> $crate::error::Result<()> {
            let Some(claim) = &mutation.claim else {
                return Ok(());
            };
            claim_one(tx, claim).await
        }

        /// Claims one request id (see `claim_request`).
        async fn claim_one(
            tx: &mut sqlx::Transaction<'_, $db>,
            claim: &$crate::store::RequestClaim,
        ) -> $crate::error::Result<()> {
            let claimed = sqlx::query($crate::store::sql::CLAIM_REQUEST)
                .bind(claim.scope.as_str())
                .bind(claim.request_id.as_str())
                .bind(claim.operation)
                .bind(claim.fingerprint.as_str())
                .bind(claim.key_id.as_str())
                .bind(claim.salt.as_slice())
                .bind(claim.create_time)
                .bind(claim.stale_before)
                .execute(&mut **tx)
                .await?
                .rows_affected();
            if claimed == 1 {
                Ok(())
            } else {
                Err($crate::error::Error::DuplicateRequest)
            }
        }

        /// Revokes one key unless it is revoked already (with its audit record and change
        /// notification), and returns it as it is now; `None` if it does not exist.
        async fn revoke_one(
            tx: &mut sqlx::Transaction<'_, $db>,
            workspace_id: &$crate::key::WorkspaceId,
            key_id: &$crate::key::KeyId,
            revoked_by: &str,
            audit: &$crate::store::AuditRecord,
            newly_revoked: &mut Vec<$crate::key::KeyId>,
        ) -> $crate::error::Result<Option<$crate::key::Key>> {
            let changed = sqlx::query($crate::store::sql::REVOKE_KEY)
                .bind(audit.occur_time)
                .bind(revoked_by)
                .bind(workspace_id.as_str())
                .bind(key_id.as_str())
                .execute(&mut **tx)
                .await?
                .rows_affected();
            if changed == 1 {
                let revoked = $crate::store::AuditRecord {
                    changes: vec![
                        $crate::audit::change(
                            "revoke_time",
                            serde_json::Value::Null,
                            $crate::audit::time_value(Some(audit.occur_time)),
                        ),
                        $crate::audit::change(
                            "revoked_by",
                            serde_json::Value::Null,
                            serde_json::Value::from(revoked_by),
                        ),
                    ],
                    ..audit.clone()
                };
                insert_audit(tx, workspace_id.as_str(), key_id.as_str(), &revoked).await?;
                <$store>::key_changed(tx, key_id.as_str()).await?;
                newly_revoked.push(key_id.clone());
            }
            let row: Option<KeyRow> = sqlx::query_as($crate::store::sql::SELECT_KEY_IN_WORKSPACE)
                .bind(workspace_id.as_str())
                .bind(key_id.as_str())
                .fetch_optional(&mut **tx)
                .await?;
            row.map(KeyRow::into_key).transpose()
        }

        async fn insert_audit(
            tx: &mut sqlx::Transaction<'_, $db>,
            workspace_id: &str,
            key_id: &str,
            audit: &$crate::store::AuditRecord,
        ) -> $crate::error::Result<()> {
            sqlx::query($crate::store::sql::INSERT_AUDIT)
                .bind(workspace_id)
                .bind(key_id)
                .bind(audit.action.as_str())
                .bind(audit.actor.display.as_str())
                .bind(audit.actor.kind.as_str())
                .bind(audit.actor.id.as_str())
                .bind(audit.occur_time)
                .bind(audit.changes_json())
                .bind(audit.outcome.as_str())
                .bind(audit.context.client_ip.as_str())
                .bind(audit.context.trace_id.as_str())
                .bind(audit.context.request_id.as_str())
                .execute(&mut **tx)
                .await?;
            // Beside its audit event, the change's event for other systems.
            match $crate::events::from_audit(audit) {
                Some(event) => insert_event(tx, workspace_id, key_id, audit.occur_time, &event).await,
                None => Ok(()),
            }
        }
    };
}

pub(super) use impl_sql_store;
