-- Issue 14: key events for other systems (the outbox). Each mutation writes its events in its own
-- transaction, beside its audit event. On PostgreSQL every transaction that writes events first
-- takes one advisory lock, so positions commit in the order they were assigned: a reader that has
-- seen position N has seen every event below N that will ever exist.
create table key_event (
    position     bigint generated always as identity primary key,
    event_id     text not null unique,  -- a UUID
    workspace_id text not null,
    event_type   text not null,         -- key.issued, key.rotated, ...
    key_id       text not null,
    occur_time   bigint not null,
    payload      text not null          -- JSON: actor, changes, and type-specific fields
);

create index key_event_workspace on key_event (workspace_id, position);
create index key_event_time on key_event (occur_time);

-- What the pruning deleted: a watcher starting at or below this position has missed events.
create table key_event_pruned (
    id               integer primary key check (id = 1),
    through_position bigint not null
);
insert into key_event_pruned (id, through_position) values (1, 0);

-- key.expired is announced once per key, by a background sweep.
alter table api_key add column expiry_announced boolean not null default false;
create index api_key_expiry_unannounced on api_key (expire_time)
    where expiry_announced = false and expire_time is not null;
-- Keys that ended before events existed are not announced now.
update api_key set expiry_announced = true
    where expire_time is not null and expire_time <= (extract(epoch from now()) * 1000000)::bigint;
