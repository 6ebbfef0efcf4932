-- Issue 14: webhooks. Each webhook follows its workspace's outbox (key_event) from a cursor: the
-- replica holding its lease queues the wanted events as deliveries and sends them one at a time,
-- oldest first. A lease that runs out (its replica died) lets another replica take over; the
-- delivery it was sending is still pending, so it is sent again (at least once).
create table webhook (
    webhook_id      text primary key,   -- a UUID
    workspace_id    text not null,
    url             text not null,
    event_types     text not null,      -- JSON array of type names; [] means every type
    description     text not null,
    create_time     bigint not null,
    created_by      text not null,
    secret_check    text not null,      -- tells a replica with another signing key (not the secret)
    cursor_position bigint not null,    -- events up to here are queued (or not wanted)
    due_time        bigint not null,    -- its next delivery is not tried before this
    lease_owner     text,               -- the replica sending its deliveries now
    lease_until     bigint
);

create index webhook_workspace on webhook (workspace_id, create_time);
create index webhook_due on webhook (due_time);

create table webhook_delivery (
    delivery_id        integer primary key autoincrement,
    webhook_id         text not null references webhook (webhook_id) on delete cascade,
    position           bigint not null,  -- the event's (key_event.position)
    event_id           text not null,
    event_type         text not null,
    state              text not null,    -- pending, succeeded, failed
    redelivery         boolean not null,
    create_time        bigint not null,
    first_attempt_time bigint,           -- the retry period counts from here
    next_attempt_time  bigint,
    attempt_count      integer not null default 0
);

create index webhook_delivery_queue on webhook_delivery (webhook_id, state, delivery_id);
create index webhook_delivery_finished on webhook_delivery (create_time) where state <> 'pending';

create table webhook_attempt (
    delivery_id     bigint not null references webhook_delivery (delivery_id) on delete cascade,
    attempt         integer not null,
    webhook_id      text not null,
    attempt_time    bigint not null,
    http_status     integer not null,    -- 0: no answer
    error           text not null,
    duration_micros bigint not null,
    primary key (delivery_id, attempt)
);

create index webhook_attempt_webhook on webhook_attempt (webhook_id, delivery_id);
