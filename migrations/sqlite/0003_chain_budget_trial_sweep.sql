-- A usage-limited key and every successor RotateKey makes of it draw on one budget: a rotation
-- chain has one counter, so no sequence of rotations can yield more VALID verdicts than the
-- original usage_limit. budget_id is the key id of the chain's first key.
create table usage_budget (
    budget_id       text primary key,
    usage_remaining bigint not null
);

alter table api_key add column budget_id text;

-- Keys issued before this migration keep the counter they had, one budget each.
insert into usage_budget (budget_id, usage_remaining)
    select key_id, usage_remaining from api_key where usage_limit > 0;
update api_key set budget_id = key_id where usage_limit > 0;
-- api_key.usage_remaining is no longer read or written: usage_budget holds the count.

-- The background sweep deletes trial keys some time after they ended.
create index api_key_trial_end on api_key (expire_time) where environment = 'trial';

-- Finds the keys that still draw on a budget before the sweep deletes that budget.
create index api_key_budget on api_key (budget_id) where budget_id is not null;
