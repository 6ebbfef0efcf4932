//! VerifyKey's answer as the server writes it: the wire format of `pb::VerifyKeyResponse`, with
//! the key's view (field 3, a `pb::Key`) as bytes already encoded. A warm key's view is the same
//! for every VALID answer, so it is encoded once per cached key state instead of building and
//! encoding a `pb::Key` (a dozen strings, a map, timestamps) per answer. `build.rs` gives the
//! generated VerifyService server this type; clients decode the generated message.

use bytes::Bytes;
use prost::Message as _;

use super::convert::key_to_proto;
use crate::key::Key;
use crate::pb;
use crate::verify::StateEntry;

/// `pb::VerifyKeyResponse`, field for field and tag for tag.
#[derive(Clone, PartialEq, prost::Message)]
pub struct VerifyKeyReply {
    #[prost(bool, tag = "1")]
    pub valid: bool,
    #[prost(enumeration = "crate::pb::VerifyCode", tag = "2")]
    pub code: i32,
    /// An encoded `pb::Key`.
    #[prost(bytes = "bytes", optional, tag = "3")]
    pub key: Option<Bytes>,
    #[prost(message, optional, tag = "4")]
    pub retry_after: Option<prost_types::Duration>,
}

/// The view of a key answered VALID with no exact count to report: encoded once per entry.
pub fn valid_view(entry: &StateEntry) -> Option<Bytes> {
    entry.valid_view(|key| encode(&key_to_proto(key)))
}

/// The view of a key with its exact `usage_remaining`, or as stored when `None`: encoded now.
pub fn fresh_view(key: &Key, usage_remaining: Option<i64>) -> Bytes {
    let mut view = key_to_proto(key);
    if let Some(remaining) = usage_remaining {
        view.usage_remaining = remaining;
    }
    encode(&view)
}

fn encode(view: &pb::Key) -> Bytes {
    Bytes::from(view.encode_to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_key() -> pb::Key {
        pb::Key {
            key_id: "3kF9aQ2mX7pL".into(),
            workspace_id: "acme".into(),
            name: "ci — pipeline".into(),
            scopes: vec!["keys:read".into(), "billing:*".into()],
            role: pb::Role::Developer as i32,
            environment: pb::Environment::Live as i32,
            state: pb::KeyState::Active as i32,
            create_time: Some(prost_types::Timestamp {
                seconds: 1_700_000_000,
                nanos: 123_000,
            }),
            metadata: [("team".to_owned(), "payments".to_owned())].into(),
            usage_limit: 10,
            usage_remaining: 7,
            ..pb::Key::default()
        }
    }

    /// The reply is byte for byte what the generated message encodes, so every client decodes
    /// it as a `VerifyKeyResponse`.
    #[test]
    fn a_reply_has_the_wire_format_of_verify_key_response() {
        let key = sample_key();
        let cases = [
            pb::VerifyKeyResponse {
                valid: true,
                code: pb::VerifyCode::Valid as i32,
                key: Some(key.clone()),
                retry_after: None,
            },
            pb::VerifyKeyResponse {
                valid: false,
                code: pb::VerifyCode::Locked as i32,
                key: None,
                retry_after: Some(prost_types::Duration {
                    seconds: 899,
                    nanos: 5,
                }),
            },
            pb::VerifyKeyResponse::default(),
        ];
        for response in cases {
            let reply = VerifyKeyReply {
                valid: response.valid,
                code: response.code,
                key: response.key.as_ref().map(encode),
                retry_after: response.retry_after,
            };
            let bytes = reply.encode_to_vec();
            assert_eq!(bytes, response.encode_to_vec());
            assert_eq!(
                pb::VerifyKeyResponse::decode(bytes.as_slice()).unwrap(),
                response
            );
        }
    }
}
