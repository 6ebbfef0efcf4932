//! Protobuf ⇄ domain conversions, in one place. Parsing a request names the offending field.

use std::time::Duration;

use crate::error::{Error, Result};
use crate::key::{Environment, Key, KeyId, KeyState, Role};
use crate::pb;
use crate::timestamp::{self, now_micros};

pub fn key_to_proto(key: &Key) -> pb::Key {
    pb::Key {
        key_id: key.key_id.as_str().to_owned(),
        workspace_id: key.workspace_id.as_str().to_owned(),
        name: key.name.as_str().to_owned(),
        description: key.description.as_str().to_owned(),
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
        rotated_from_key_id: key
            .rotated_from_key_id
            .as_ref()
            .map(|id| id.as_str().to_owned())
            .unwrap_or_default(),
        rotated_to_key_id: key
            .rotated_to_key_id
            .as_ref()
            .map(|id| id.as_str().to_owned())
            .unwrap_or_default(),
        created_by: key.created_by.clone(),
        revoked_by: key.revoked_by.clone().unwrap_or_default(),
        usage_limit: key.usage_limit,
        usage_remaining: key.usage_remaining,
        enabled: key.enabled,
        etag: key.etag(),
        update_time: Some(timestamp::to_proto(
            key.update_time.unwrap_or(key.create_time),
        )),
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
        KeyState::Disabled => pb::KeyState::Disabled,
    }
}

/// Unset means DEVELOPER; an unknown number is refused rather than guessed.
pub fn role_from_proto(value: i32) -> Result<Role> {
    match pb::Role::try_from(value) {
        Ok(pb::Role::Unspecified | pb::Role::Developer) => Ok(Role::Developer),
        Ok(pb::Role::Viewer) => Ok(Role::Viewer),
        Ok(pb::Role::AccountAdmin) => Ok(Role::AccountAdmin),
        // Whether IssueKey may make one is the policy's to say.
        Ok(pb::Role::Trial) => Ok(Role::Trial),
        Err(_) => Err(Error::invalid("role", format!("unknown value {value}"))),
    }
}

/// VerifyKey's `minimum_role`: unset means any role; an unknown number is refused.
pub fn minimum_role_from_proto(value: i32) -> Result<Option<Role>> {
    match pb::Role::try_from(value) {
        Ok(pb::Role::Unspecified) => Ok(None),
        Ok(_) => role_from_proto(value).map(Some),
        Err(_) => Err(Error::invalid(
            "minimum_role",
            format!("unknown value {value}"),
        )),
    }
}

/// Unset means LIVE; an unknown number is refused rather than guessed.
pub fn environment_from_proto(value: i32) -> Result<Environment> {
    match pb::Environment::try_from(value) {
        Ok(pb::Environment::Unspecified | pb::Environment::Live) => Ok(Environment::Live),
        Ok(pb::Environment::Test) => Ok(Environment::Test),
        Ok(pb::Environment::Dev) => Ok(Environment::Dev),
        Ok(pb::Environment::Trial) => Ok(Environment::Trial),
        Err(_) => Err(Error::invalid(
            "environment",
            format!("unknown value {value}"),
        )),
    }
}

/// A key id field. Empty is a bad request; anything else that is not an id this service could
/// have issued (12 base62 characters) is simply not found. Decided here, before any database:
/// PostgreSQL cannot even bind text holding NUL (an INTERNAL error there, NOT_FOUND on SQLite).
pub fn require_key_id(value: &str) -> Result<KeyId> {
    if value.is_empty() {
        return Err(Error::invalid("key_id", "is required"));
    }
    KeyId::parse(value).ok_or(Error::KeyNotFound)
}

/// The longest `google.protobuf.Duration` there is: 10,000 years.
const MAX_DURATION_SECONDS: i64 = 315_576_000_000;

/// A non-negative protobuf Duration within the range protobuf defines.
///
/// Checked by hand rather than with `Duration::try_from`: prost-types reports a negative duration
/// by negating its seconds, which overflows for `i64::MIN` (a panic wherever overflow checks are
/// on, as in every debug build).
pub fn duration_from_proto(field: &'static str, value: &prost_types::Duration) -> Result<Duration> {
    let prost_types::Duration { seconds, nanos } = *value;
    if seconds < 0 || nanos < 0 {
        return Err(Error::invalid(
            field,
            "must not be negative (seconds and nanos both)",
        ));
    }
    if nanos > 999_999_999 {
        return Err(Error::invalid(field, "nanos must be at most 999,999,999"));
    }
    if seconds > MAX_DURATION_SECONDS {
        return Err(Error::invalid(
            field,
            format!("must be at most {MAX_DURATION_SECONDS} seconds (10,000 years)"),
        ));
    }
    Ok(Duration::new(seconds.unsigned_abs(), nanos.unsigned_abs()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn duration(seconds: i64, nanos: i32) -> prost_types::Duration {
        prost_types::Duration { seconds, nanos }
    }

    #[test]
    fn durations_in_range_convert() {
        assert_eq!(
            duration_from_proto("ttl", &duration(90, 500)).unwrap(),
            Duration::new(90, 500)
        );
        assert_eq!(
            duration_from_proto("ttl", &duration(MAX_DURATION_SECONDS, 999_999_999)).unwrap(),
            Duration::new(315_576_000_000, 999_999_999)
        );
        assert_eq!(
            duration_from_proto("ttl", &duration(0, 0)).unwrap(),
            Duration::ZERO
        );
    }

    #[test]
    fn hostile_durations_are_refused_without_a_panic() {
        for (seconds, nanos) in [
            // `Duration::try_from` negates i64::MIN seconds: a panic in debug builds.
            (i64::MIN, 0),
            (i64::MIN, i32::MIN),
            (i64::MAX, i32::MAX),
            (i64::MAX, 999_999_999),
            (MAX_DURATION_SECONDS + 1, 0),
            (-1, 0),
            (0, -1),
            (5, -1),
            (-5, 1),
            (0, 1_000_000_000),
            (0, i32::MAX),
        ] {
            let error = duration_from_proto("ttl", &duration(seconds, nanos)).unwrap_err();
            assert!(
                matches!(error, Error::InvalidArgument { field: "ttl", .. }),
                "{seconds} s {nanos} ns: {error}"
            );
        }
    }

    #[test]
    fn key_ids_empty_is_invalid_and_any_other_non_id_is_not_found() {
        assert!(matches!(
            require_key_id(""),
            Err(Error::InvalidArgument {
                field: "key_id",
                ..
            })
        ));
        for not_an_id in [
            "a\0",
            "AAAAAAAAAAA\0",
            "AAAAAAAAAAAé",
            "AAAAAAAAAAAAA",
            "🔑",
        ] {
            assert!(
                matches!(require_key_id(not_an_id), Err(Error::KeyNotFound)),
                "{not_an_id:?}"
            );
        }
        assert_eq!(
            require_key_id("iZ19fRp6bgz1").unwrap().as_str(),
            "iZ19fRp6bgz1"
        );
    }
}
