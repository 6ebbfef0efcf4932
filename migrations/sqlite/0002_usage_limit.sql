-- Usage-limited keys (trial keys, metered keys): 0 means unlimited. usage_remaining is decremented
-- atomically by VerifyKey, so the count is exact across replicas.
alter table api_key add column usage_limit bigint not null default 0;
alter table api_key add column usage_remaining bigint not null default 0;
