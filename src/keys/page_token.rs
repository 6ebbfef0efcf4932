//! Opaque, tamper-evident page tokens for ListKeys and ListAuditEvents.
//!
//! A token names the last key of a page by `(create_time, key_id)` (keyset paging, so inserts
//! while a client pages never shift or repeat what it sees) and carries an HMAC-SHA256 that also
//! binds the workspace and the `include_inactive` flag. A forged, altered or foreign token fails
//! the MAC. The MAC key is shared by every replica through the database.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use crate::error::Error;
use crate::key::{KeyId, WorkspaceId};
use crate::timestamp::UnixMicros;

const VERSION: u8 = 1;
/// The first byte of a ListAuditEvents token, which names an event id.
const AUDIT_VERSION: u8 = 2;
const AUDIT_PAYLOAD_LEN: usize = 1 + 8;
const MAC_LEN: usize = 16;
const KEY_ID_LEN: usize = 12;
const PAYLOAD_LEN: usize = 1 + 8 + KEY_ID_LEN;

#[derive(Clone)]
pub struct PageTokenCodec {
    mac_key: Vec<u8>,
}

impl std::fmt::Debug for PageTokenCodec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PageTokenCodec").finish_non_exhaustive()
    }
}

impl PageTokenCodec {
    pub fn new(mac_key: Vec<u8>) -> Self {
        Self { mac_key }
    }

    pub fn encode(
        &self,
        workspace_id: &WorkspaceId,
        include_inactive: bool,
        create_time: UnixMicros,
        key_id: &KeyId,
    ) -> String {
        let mut token = Vec::with_capacity(PAYLOAD_LEN + MAC_LEN);
        token.push(VERSION);
        token.extend_from_slice(&create_time.to_be_bytes());
        token.extend_from_slice(key_id.as_str().as_bytes());
        let tag = self.tag(&token, workspace_id, include_inactive);
        token.extend_from_slice(&tag[..MAC_LEN]);
        URL_SAFE_NO_PAD.encode(token)
    }

    /// The `(create_time, key_id)` position a token continues after.
    pub fn decode(
        &self,
        token: &str,
        workspace_id: &WorkspaceId,
        include_inactive: bool,
    ) -> Result<(UnixMicros, KeyId), Error> {
        let bytes = URL_SAFE_NO_PAD
            .decode(token)
            .map_err(|_| Error::InvalidPageToken("not a token issued by ListKeys"))?;
        if bytes.len() != PAYLOAD_LEN + MAC_LEN || bytes[0] != VERSION {
            return Err(Error::InvalidPageToken("not a token issued by ListKeys"));
        }
        let (payload, tag) = bytes.split_at(PAYLOAD_LEN);
        let mac = self.mac(payload, workspace_id, include_inactive);
        mac.verify_truncated_left(tag).map_err(|_| {
            Error::InvalidPageToken("not issued for this workspace and include_inactive")
        })?;
        let create_time = i64::from_be_bytes(payload[1..9].try_into().expect("8 bytes"));
        let key_id = std::str::from_utf8(&payload[9..])
            .ok()
            .and_then(KeyId::parse)
            .ok_or(Error::InvalidPageToken("not a token issued by ListKeys"))?;
        Ok((create_time, key_id))
    }

    /// A ListAuditEvents token: the last event id of a page, bound to `listing` (the workspace
    /// and every filter, so that a token cannot widen or move the listing it came from).
    pub fn encode_audit(&self, listing: &str, event_id: i64) -> String {
        let mut token = Vec::with_capacity(AUDIT_PAYLOAD_LEN + MAC_LEN);
        token.push(AUDIT_VERSION);
        token.extend_from_slice(&event_id.to_be_bytes());
        let tag = self.audit_mac(&token, listing).finalize().into_bytes();
        token.extend_from_slice(&tag[..MAC_LEN]);
        URL_SAFE_NO_PAD.encode(token)
    }

    /// The event id a ListAuditEvents token continues after.
    pub fn decode_audit(&self, token: &str, listing: &str) -> Result<i64, Error> {
        const FOREIGN: Error = Error::InvalidPageToken("not a token issued for this listing");
        let bytes = URL_SAFE_NO_PAD.decode(token).map_err(|_| FOREIGN)?;
        if bytes.len() != AUDIT_PAYLOAD_LEN + MAC_LEN || bytes[0] != AUDIT_VERSION {
            return Err(FOREIGN);
        }
        let (payload, tag) = bytes.split_at(AUDIT_PAYLOAD_LEN);
        self.audit_mac(payload, listing)
            .verify_truncated_left(tag)
            .map_err(|_| {
                Error::InvalidPageToken("not issued for this workspace and these filters")
            })?;
        Ok(i64::from_be_bytes(
            payload[1..].try_into().expect("8 bytes"),
        ))
    }

    fn audit_mac(&self, payload: &[u8], listing: &str) -> Hmac<Sha256> {
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(&self.mac_key)
            .expect("HMAC accepts keys of any length");
        mac.update(payload);
        mac.update(listing.as_bytes());
        mac
    }

    fn tag(&self, payload: &[u8], workspace_id: &WorkspaceId, include_inactive: bool) -> Vec<u8> {
        self.mac(payload, workspace_id, include_inactive)
            .finalize()
            .into_bytes()
            .to_vec()
    }

    fn mac(
        &self,
        payload: &[u8],
        workspace_id: &WorkspaceId,
        include_inactive: bool,
    ) -> Hmac<Sha256> {
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(&self.mac_key)
            .expect("HMAC accepts keys of any length");
        mac.update(payload);
        // Length-prefix the workspace so no two (workspace, flag) pairs share an encoding.
        mac.update(&(workspace_id.as_str().len() as u64).to_be_bytes());
        mac.update(workspace_id.as_str().as_bytes());
        mac.update(&[u8::from(include_inactive)]);
        mac
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn codec() -> PageTokenCodec {
        PageTokenCodec::new(vec![7; 32])
    }

    fn workspace(name: &str) -> WorkspaceId {
        WorkspaceId::parse(name).unwrap()
    }

    #[test]
    fn round_trip() {
        let key_id = KeyId::generate();
        let token = codec().encode(&workspace("w1"), false, 1_700_000_000_000_000, &key_id);
        let position = codec().decode(&token, &workspace("w1"), false).unwrap();
        assert_eq!(position, (1_700_000_000_000_000, key_id));
    }

    #[test]
    fn foreign_workspace_flag_or_key_is_refused() {
        let key_id = KeyId::generate();
        let token = codec().encode(&workspace("w1"), false, 42, &key_id);
        assert!(codec().decode(&token, &workspace("w2"), false).is_err());
        assert!(codec().decode(&token, &workspace("w1"), true).is_err());
        let other_codec = PageTokenCodec::new(vec![8; 32]);
        assert!(other_codec.decode(&token, &workspace("w1"), false).is_err());
    }

    #[test]
    fn audit_tokens_round_trip_and_bind_their_listing() {
        let token = codec().encode_audit("w1|key=a", 41);
        assert_eq!(codec().decode_audit(&token, "w1|key=a").unwrap(), 41);
        assert!(codec().decode_audit(&token, "w1|key=b").is_err());
        assert!(codec().decode_audit(&token, "w2|key=a").is_err());
        // A ListKeys token is not an audit token, and the other way round.
        let keys_token = codec().encode(&workspace("w1"), false, 42, &KeyId::generate());
        assert!(codec().decode_audit(&keys_token, "w1|key=a").is_err());
        assert!(codec().decode(&token, &workspace("w1"), false).is_err());
    }

    #[test]
    fn altered_or_garbage_tokens_are_refused() {
        let key_id = KeyId::generate();
        let token = codec().encode(&workspace("w1"), false, 42, &key_id);
        let mut bytes = URL_SAFE_NO_PAD.decode(&token).unwrap();
        bytes[3] ^= 1;
        let altered = URL_SAFE_NO_PAD.encode(bytes);
        assert!(codec().decode(&altered, &workspace("w1"), false).is_err());
        for garbage in [
            "",
            "x",
            "!!!!",
            "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        ] {
            assert!(codec().decode(garbage, &workspace("w1"), false).is_err());
        }
    }
}
