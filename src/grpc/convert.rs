//! Protobuf ⇄ domain conversions, in one place. Parsing a request names the offending field.

use std::time::Duration;

use crate::error::{Error, Result};
use crate::key::{Environment, Key, KeyState, Role};
use crate::pb;
use crate::timestamp::{self, now_micros};

pub fn key_to_proto(key: &Key) -> pb::Key {
    pb::Key {
        key_id: key.key_id.as_str().to_owned(),
        workspace_id: key.workspace_id.clone(),
        name: key.name.clone(),
        description: key.description.clone(),
        prefix: key.prefix.clone(),
        scopes: key.scopes.as_slice().to_vec(),
        role: role_to_proto(key.role) as i32,
        environment: environment_to_proto(key.environment) as i32,
        state: state_to_proto(key.state_at(now_micros())) as i32,
        create_time: Some(timestamp::to_proto(key.create_time)),
        expire_time: key.expire_time.map(timestamp::to_proto),
        revoke_time: key.revoke_time.map(timestamp::to_proto),
        last_used_time: key.last_used_time.map(timestamp::to_proto),
        total_requests: key.total_requests,
        metadata: key
            .metadata
            .as_map()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        rotated_from_key_id: key.rotated_from_key_id.clone().unwrap_or_default(),
        rotated_to_key_id: key.rotated_to_key_id.clone().unwrap_or_default(),
        created_by: key.created_by.clone(),
        revoked_by: key.revoked_by.clone().unwrap_or_default(),
        usage_limit: key.usage_limit,
        usage_remaining: key.usage_remaining,
    }
}

fn role_to_proto(role: Role) -> pb::Role {
    match role {
        Role::Trial => pb::Role::Trial,
        Role::Viewer => pb::Role::Viewer,
        Role::Developer => pb::Role::Developer,
        Role::AccountAdmin => pb::Role::AccountAdmin,
    }
}

fn environment_to_proto(environment: Environment) -> pb::Environment {
    match environment {
        Environment::Live => pb::Environment::Live,
        Environment::Test => pb::Environment::Test,
        Environment::Dev => pb::Environment::Dev,
        Environment::Trial => pb::Environment::Trial,
    }
}

fn state_to_proto(state: KeyState) -> pb::KeyState {
    match state {
        KeyState::Active => pb::KeyState::Active,
        KeyState::Revoked => pb::KeyState::Revoked,
        KeyState::Expired => pb::KeyState::Expired,
    }
}

/// Unset means DEVELOPER; an unknown number is refused rather than guessed.
pub fn role_from_proto(value: i32) -> Result<Role> {
    match pb::Role::try_from(value) {
        Ok(pb::Role::Unspecified | pb::Role::Developer) => Ok(Role::Developer),
        Ok(pb::Role::Viewer) => Ok(Role::Viewer),
        Ok(pb::Role::AccountAdmin) => Ok(Role::AccountAdmin),
        Ok(pb::Role::Trial) => Err(Error::invalid(
            "role",
            "trial keys are issued by IssueTrialKey only",
        )),
        Err(_) => Err(Error::invalid("role", format!("unknown value {value}"))),
    }
}

/// Unset means LIVE; an unknown number is refused rather than guessed.
pub fn environment_from_proto(value: i32) -> Result<Environment> {
    match pb::Environment::try_from(value) {
        Ok(pb::Environment::Unspecified | pb::Environment::Live) => Ok(Environment::Live),
        Ok(pb::Environment::Test) => Ok(Environment::Test),
        Ok(pb::Environment::Dev) => Ok(Environment::Dev),
        Ok(pb::Environment::Trial) => Err(Error::invalid(
            "environment",
            "trial keys are issued by IssueTrialKey only",
        )),
        Err(_) => Err(Error::invalid(
            "environment",
            format!("unknown value {value}"),
        )),
    }
}

/// A key id field: anything that is not an id this service could have issued is simply not found.
pub fn require_key_id(value: &str) -> Result<&str> {
    if value.is_empty() {
        return Err(Error::invalid("key_id", "is required"));
    }
    Ok(value)
}

/// A non-negative protobuf Duration.
pub fn duration_from_proto(field: &'static str, value: &prost_types::Duration) -> Result<Duration> {
    Duration::try_from(*value).map_err(|_| Error::invalid(field, "must not be negative"))
}
