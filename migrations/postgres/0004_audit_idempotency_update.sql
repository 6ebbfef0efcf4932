-- Issue 13: keys that can be disabled and updated, a readable audit trail, safe retries.

-- A disabled key verifies as DISABLED until enabled again. version counts changes to the key's
-- settings (the etag); update_time is when they last changed.
alter table api_key add column enabled boolean not null default true;
alter table api_key add column version bigint not null default 1;
alter table api_key add column update_time bigint;

-- Who did it, as kind + id (filterable) beside the readable actor text; what changed (a JSON array
-- of {"field", "old", "new"}); whether anything changed; where the call came from.
alter table audit_event add column actor_kind text not null default '';
alter table audit_event add column actor_id text not null default '';
alter table audit_event add column changes text not null default '[]';
alter table audit_event add column outcome text not null default 'applied';
alter table audit_event add column client_ip text not null default '';
alter table audit_event add column trace_id text not null default '';
alter table audit_event add column request_id text not null default '';

-- Earlier events: their actor text says who they were.
update audit_event set actor_kind = 'admin', actor_id = 'admin' where actor = 'admin';
update audit_event set actor_kind = 'user', actor_id = substr(actor, 6) where actor like 'user:%';
update audit_event set actor_kind = 'api_key', actor_id = substr(actor, strpos(actor, ' (') - 12, 12)
    where actor like 'key:%' and strpos(actor, ' (') > 12;
update audit_event set actor_kind = 'anonymous' where actor = 'trial';
update audit_event set action = 'issue_trial' where actor = 'trial' and action = 'issue';
update audit_event set action = 'revoke_trial' where actor = 'trial' and action = 'revoke';

-- ListAuditEvents pages newest first within a workspace; retention prunes by time.
create index audit_event_workspace on audit_event (workspace_id, event_id);
create index audit_event_time on audit_event (occur_time);

-- Safe retries: one row per request id of a caller (scope: workspace and caller), inserted first
-- in the mutation's own transaction, so a concurrent duplicate waits for it and then finds it.
-- salt, with the server's idempotency key and the request id, re-derives the secret of a key the
-- request made; the row (and with it any way to re-derive) is deleted after the window.
create table idempotent_request (
    scope       text not null,
    request_id  text not null,
    operation   text not null,
    fingerprint text not null,   -- SHA-256 (hex) of the operation's parameters
    key_id      text not null,   -- the key the request made or changed
    salt        bytea not null,
    create_time bigint not null,
    primary key (scope, request_id)
);

create index idempotent_request_create_time on idempotent_request (create_time);
