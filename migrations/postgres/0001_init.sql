-- Keys: public metadata plus the argon2id PHC string of the whole key. Never the plaintext.
-- Times are microseconds since the Unix epoch (UTC).
create table api_key (
    key_id              text primary key,
    workspace_id        text not null,
    name                text not null,
    description         text not null,
    prefix              text not null,
    scopes              text not null,   -- JSON array of strings, sorted
    role                text not null,
    environment         text not null,
    secret_hash         text not null,
    metadata            text not null,   -- JSON object of strings
    create_time         bigint not null,
    expire_time         bigint,
    revoke_time         bigint,
    last_used_time      bigint,
    total_requests      bigint not null default 0,
    rotated_from_key_id text,
    rotated_to_key_id   text,
    created_by          text not null default '',
    revoked_by          text
);

-- ListKeys pages newest first within a workspace.
create index api_key_workspace_create_time on api_key (workspace_id, create_time desc, key_id desc);

-- One row per mutation, written in the same transaction as the mutation.
create table audit_event (
    event_id     bigint generated always as identity primary key,
    workspace_id text not null,
    key_id       text not null,
    action       text not null,
    actor        text not null,
    occur_time   bigint not null,
    detail       text not null default '{}'
);

create index audit_event_key on audit_event (workspace_id, key_id, event_id);

-- Secrets the replicas share, such as the page-token MAC key, generated on first start.
create table service_secret (
    name  text primary key,
    value bytea not null
);
