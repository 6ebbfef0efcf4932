//! KeyService requests into commands and results into responses: protobuf ⇄ domain, nothing
//! else. Every field is validated here into its domain type; no decision is taken here.

use super::convert::{
    duration_from_proto, environment_from_proto, key_to_proto, require_key_id, role_from_proto,
};
use crate::error::Error;
use crate::key::{KeyDescription, KeyName, Metadata, Scopes};
use crate::keys::{
    DEFAULT_PAGE_SIZE, Expiration, GetKey, IssueKey, IssueTrialKey, IssuedKey, KeyPage, KeySpec,
    ListKeys, MAX_PAGE_SIZE, RevokeKey, RevokeTrialKey, Revoked, RotateKey,
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

impl TryFrom<pb::ListKeysRequest> for ListKeys {
    type Error = Error;

    fn try_from(request: pb::ListKeysRequest) -> Result<Self, Error> {
        let page_size = match request.page_size {
            size if size < 0 => return Err(Error::invalid("page_size", "must not be negative")),
            0 => DEFAULT_PAGE_SIZE,
            size => (size as u32).min(MAX_PAGE_SIZE),
        };
        Ok(Self {
            workspace_id: request.workspace_id,
            page_size,
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

impl From<(IssuedKey, crate::key::Key)> for pb::RotateKeyResponse {
    fn from((issued, previous): (IssuedKey, crate::key::Key)) -> Self {
        Self {
            key: Some(key_to_proto(&issued.key)),
            secret: issued.plaintext,
            previous_key: Some(key_to_proto(&previous)),
        }
    }
}
