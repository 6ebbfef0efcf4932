//! KeyService requests into commands and results into responses: protobuf ⇄ domain, nothing
//! else. Every field is validated here into its domain type; no decision is taken here.

use super::convert::{
    duration_from_proto, environment_from_proto, key_to_proto, require_key_id, role_from_proto,
};
use crate::error::Error;
use crate::key::{KeyDescription, KeyName, Metadata, Scopes};
use crate::keys::{
    DEFAULT_PAGE_SIZE, Expiration, GetKey, IssueKey, IssueTrialKey, IssuedKey, KeyChanges, KeyPage,
    KeySpec, ListKeys, MAX_PAGE_SIZE, RevokeKey, RevokeTrialKey, Revoked, RotateKey, UpdateKey,
};
use crate::pb;
use crate::pb::issue_key_request::Expiration as PbExpiration;
use crate::pb::rotate_key_request::Expiration as PbRotateExpiration;
use crate::timestamp;

fn expire_time(at: &prost_types::Timestamp) -> Result<Expiration, Error> {
    timestamp::from_proto(at)
        .map(Expiration::At)
        .ok_or_else(|| Error::invalid("expire_time", "is out of range"))
}

impl TryFrom<pb::IssueKeyRequest> for IssueKey {
    type Error = Error;

    fn try_from(request: pb::IssueKeyRequest) -> Result<Self, Error> {
        let expiration = match &request.expiration {
            None => Expiration::Never,
            Some(PbExpiration::ExpireTime(at)) => expire_time(at)?,
            Some(PbExpiration::Ttl(ttl)) => Expiration::After(duration_from_proto("ttl", ttl)?),
        };
        if request.usage_limit < 0 {
            return Err(Error::invalid("usage_limit", "must not be negative"));
        }
        let key = KeySpec {
            usage_limit: request.usage_limit,
            name: KeyName::parse(&request.name).map_err(|reason| Error::invalid("name", reason))?,
            description: KeyDescription::parse(&request.description)
                .map_err(|reason| Error::invalid("description", reason))?,
            scopes: Scopes::parse(&request.scopes)
                .map_err(|reason| Error::invalid("scopes", reason))?,
            environment: environment_from_proto(request.environment)?,
            role: role_from_proto(request.role)?,
            expiration,
            metadata: Metadata::parse(&request.metadata)
                .map_err(|reason| Error::invalid("metadata", reason))?,
        };
        Ok(Self {
            workspace_id: request.workspace_id,
            key,
        })
    }
}

impl TryFrom<pb::GetKeyRequest> for GetKey {
    type Error = Error;

    fn try_from(request: pb::GetKeyRequest) -> Result<Self, Error> {
        let key_id = require_key_id(&request.key_id)?;
        Ok(Self {
            workspace_id: request.workspace_id,
            key_id,
        })
    }
}

/// A listing's page size: 0 means the default, anything above the maximum means the maximum.
pub(super) fn page_size(requested: i32) -> Result<u32, Error> {
    match requested {
        size if size < 0 => Err(Error::invalid("page_size", "must not be negative")),
        0 => Ok(DEFAULT_PAGE_SIZE),
        size => Ok((size as u32).min(MAX_PAGE_SIZE)),
    }
}

impl TryFrom<pb::ListKeysRequest> for ListKeys {
    type Error = Error;

    fn try_from(request: pb::ListKeysRequest) -> Result<Self, Error> {
        Ok(Self {
            workspace_id: request.workspace_id,
            page_size: page_size(request.page_size)?,
            page_token: request.page_token,
            include_inactive: request.include_inactive,
        })
    }
}

impl TryFrom<pb::RevokeKeyRequest> for RevokeKey {
    type Error = Error;

    fn try_from(request: pb::RevokeKeyRequest) -> Result<Self, Error> {
        let key_id = require_key_id(&request.key_id)?;
        Ok(Self {
            workspace_id: request.workspace_id,
            key_id,
            revoke_successors: request.revoke_successors,
        })
    }
}

impl TryFrom<pb::RotateKeyRequest> for RotateKey {
    type Error = Error;

    fn try_from(request: pb::RotateKeyRequest) -> Result<Self, Error> {
        let key_id = require_key_id(&request.key_id)?;
        let grace_period = request
            .grace_period
            .as_ref()
            .map(|grace| duration_from_proto("grace_period", grace))
            .transpose()?;
        let expiration = match &request.expiration {
            None => None,
            Some(PbRotateExpiration::ExpireTime(at)) => Some(expire_time(at)?),
            Some(PbRotateExpiration::Ttl(ttl)) => {
                Some(Expiration::After(duration_from_proto("ttl", ttl)?))
            }
        };
        Ok(Self {
            workspace_id: request.workspace_id,
            key_id,
            grace_period,
            expiration,
        })
    }
}

/// The settings UpdateKey may change, by their field names in `Key` (and in `update_mask`).
const UPDATABLE: [&str; 7] = [
    "name",
    "description",
    "scopes",
    "role",
    "metadata",
    "expire_time",
    "enabled",
];

impl TryFrom<pb::UpdateKeyRequest> for UpdateKey {
    type Error = Error;

    fn try_from(request: pb::UpdateKeyRequest) -> Result<Self, Error> {
        let key = request
            .key
            .ok_or_else(|| Error::invalid("key", "is required"))?;
        let key_id = require_key_id(&key.key_id)?;
        let expected_version =
            match key.etag.as_str() {
                "" => None,
                etag => Some(etag.parse::<i64>().map_err(|_| {
                    Error::invalid("key.etag", "is not an etag this service returned")
                })?),
            };
        let paths = update_paths(request.update_mask, &key)?;
        let mut changes = KeyChanges::default();
        for path in paths {
            match path {
                "name" => {
                    changes.name = Some(
                        KeyName::parse(&key.name)
                            .map_err(|reason| Error::invalid("key.name", reason))?,
                    );
                }
                "description" => {
                    changes.description = Some(
                        KeyDescription::parse(&key.description)
                            .map_err(|reason| Error::invalid("key.description", reason))?,
                    );
                }
                "scopes" => {
                    changes.scopes = Some(
                        Scopes::parse(&key.scopes)
                            .map_err(|reason| Error::invalid("key.scopes", reason))?,
                    );
                }
                "role" => {
                    if key.role == pb::Role::Unspecified as i32 {
                        return Err(Error::invalid(
                            "key.role",
                            "must be set when update_mask names it",
                        ));
                    }
                    changes.role = Some(role_from_proto(key.role)?);
                }
                "metadata" => {
                    changes.metadata = Some(
                        Metadata::parse(&key.metadata)
                            .map_err(|reason| Error::invalid("key.metadata", reason))?,
                    );
                }
                "expire_time" => {
                    changes.expire_time =
                        Some(match &key.expire_time {
                            None => None,
                            Some(at) => Some(timestamp::from_proto(at).ok_or_else(|| {
                                Error::invalid("key.expire_time", "is out of range")
                            })?),
                        });
                }
                _ => changes.enabled = Some(key.enabled),
            }
        }
        Ok(Self {
            workspace_id: key.workspace_id,
            key_id,
            expected_version,
            changes,
        })
    }
}

/// The settings an update names: the mask's paths (`*` for all), or without a mask every
/// setting `key` gives a value other than its default (AIP-134).
fn update_paths(
    mask: Option<prost_types::FieldMask>,
    key: &pb::Key,
) -> Result<Vec<&'static str>, Error> {
    let paths = mask.map(|mask| mask.paths).unwrap_or_default();
    if paths.is_empty() {
        let given = [
            !key.name.is_empty(),
            !key.description.is_empty(),
            !key.scopes.is_empty(),
            key.role != pb::Role::Unspecified as i32,
            !key.metadata.is_empty(),
            key.expire_time.is_some(),
            key.enabled,
        ];
        let implied: Vec<_> = UPDATABLE
            .into_iter()
            .zip(given)
            .filter_map(|(path, given)| given.then_some(path))
            .collect();
        if implied.is_empty() {
            return Err(Error::invalid(
                "update_mask",
                "names no field, and the key sets none to update",
            ));
        }
        return Ok(implied);
    }
    if paths.iter().any(|path| path == "*") {
        if paths.len() > 1 {
            return Err(Error::invalid(
                "update_mask",
                "\"*\" must be the only path when given",
            ));
        }
        return Ok(UPDATABLE.to_vec());
    }
    let mut named = Vec::with_capacity(paths.len());
    for path in &paths {
        let known = UPDATABLE
            .into_iter()
            .find(|field| field == path)
            .ok_or_else(|| {
                Error::invalid(
                    "update_mask",
                    format!(
                        "{} is not a field UpdateKey changes (one of {})",
                        crate::error::excerpt(path),
                        UPDATABLE.join(", ")
                    ),
                )
            })?;
        if !named.contains(&known) {
            named.push(known);
        }
    }
    Ok(named)
}

impl From<pb::IssueTrialKeyRequest> for IssueTrialKey {
    fn from(request: pb::IssueTrialKeyRequest) -> Self {
        Self {
            name: request.name,
            client_ip: request.client_ip,
        }
    }
}

impl From<pb::RevokeTrialKeyRequest> for RevokeTrialKey {
    fn from(request: pb::RevokeTrialKeyRequest) -> Self {
        Self {
            prefix: request.prefix,
            client_ip: request.client_ip,
        }
    }
}

impl From<IssuedKey> for pb::IssueKeyResponse {
    fn from(issued: IssuedKey) -> Self {
        Self {
            key: Some(key_to_proto(&issued.key)),
            secret: issued.plaintext,
        }
    }
}

impl From<IssuedKey> for pb::IssueTrialKeyResponse {
    fn from(issued: IssuedKey) -> Self {
        Self {
            key: Some(key_to_proto(&issued.key)),
            secret: issued.plaintext,
        }
    }
}

impl From<crate::key::Key> for pb::GetKeyResponse {
    fn from(key: crate::key::Key) -> Self {
        Self {
            key: Some(key_to_proto(&key)),
        }
    }
}

impl From<crate::key::Key> for pb::RevokeTrialKeyResponse {
    fn from(key: crate::key::Key) -> Self {
        Self {
            key: Some(key_to_proto(&key)),
        }
    }
}

impl From<KeyPage> for pb::ListKeysResponse {
    fn from(page: KeyPage) -> Self {
        Self {
            keys: page.keys.iter().map(key_to_proto).collect(),
            next_page_token: page.next_page_token.unwrap_or_default(),
            total_size: page.total_size,
        }
    }
}

impl From<Revoked> for pb::RevokeKeyResponse {
    fn from(revoked: Revoked) -> Self {
        Self {
            key: Some(key_to_proto(&revoked.key)),
            successors: revoked.successors.iter().map(key_to_proto).collect(),
        }
    }
}

impl From<crate::key::Key> for pb::UpdateKeyResponse {
    fn from(key: crate::key::Key) -> Self {
        Self {
            key: Some(key_to_proto(&key)),
        }
    }
}

impl From<(IssuedKey, crate::key::Key)> for pb::RotateKeyResponse {
    fn from((issued, previous): (IssuedKey, crate::key::Key)) -> Self {
        Self {
            key: Some(key_to_proto(&issued.key)),
            secret: issued.plaintext,
            previous_key: Some(key_to_proto(&previous)),
        }
    }
}
