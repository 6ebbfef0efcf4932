//! The bodies of the fuzz targets, one public function per target (`fuzz_targets/*.rs` only call
//! them). Each must never panic whatever its input; where a target can tell a wrong answer from
//! a right one it asserts that too (round trips, invariants of an accepted value, no INTERNAL
//! for a caller's bad request).
//!
//! Kept in a library so that `cargo test` (stable, uninstrumented) replays the committed seed
//! corpus and every crash input kept in `regressions/` (tests below).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::LazyLock;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, KeyInit, Mac};
use key_authority::auth::{Caller, JwtConfig, JwtVerifier, bearer_token};
use key_authority::error::Error;
use key_authority::key::format::{CHECK_LEN, MAX_PRESENTED_KEY_LEN, checksum, public_prefix};
use key_authority::key::{Brand, KeyDescription, KeyId, KeyName, PresentedKey, Scope, WorkspaceId};
use key_authority::keys::idempotency::parse_request_id;
use key_authority::keys::page_token::PageTokenCodec;
use key_authority::pb;
use key_authority::verify::VerifyRequest;
use key_authority::webhooks::TargetPolicy;
use key_authority::webhooks::target::{MAX_URL_LEN, parse_url};
use prost::Message;
use sha2::Sha256;
use tonic::Code;
use tonic::metadata::{MetadataMap, MetadataValue};

mod grpc_server;

pub use grpc_server::grpc_server;

/// The longest status message a refusal may carry, whatever the input's size (the bound
/// tests/api/hostile_input.rs holds the server to).
const MAX_STATUS_MESSAGE: usize = 512;

/// A refusal of a caller's input: never INTERNAL or UNKNOWN (which read as our bug), and a
/// message that does not grow with the input.
fn check_refusal(error: Error) {
    let status = tonic::Status::from(error);
    assert!(
        !matches!(status.code(), Code::Internal | Code::Unknown | Code::Ok),
        "a bad input answered {:?}: {}",
        status.code(),
        status.message()
    );
    assert!(
        status.message().len() <= MAX_STATUS_MESSAGE,
        "a status message of {} bytes",
        status.message().len()
    );
}

// ---------------------------------------------------------------------------------------------
// presented_key: the key text parser and the names a key carries.

/// Parses `data` as a presented key (and as the other key-shaped names), then the same text
/// with its correct checksum appended, so that the accepting path is reached too.
pub fn presented_key(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    check_presented_key(text);
    check_presented_key(&format!("{text}{}", checksum(text.as_bytes())));
    if let Some(id) = KeyId::parse(text) {
        assert_eq!(id.as_str(), text);
    }
    if let Ok(brand) = Brand::parse(text) {
        assert_eq!(brand.as_str(), text);
    }
    let _ = WorkspaceId::parse(text);
    let _ = KeyName::parse(text);
    let _ = KeyDescription::parse(text);
    let _ = Scope::parse(text);
}

/// What an accepted key must be: short, `<brand>_<env>_<id>…` with a valid brand and id, and a
/// checksum that matches.
fn check_presented_key(text: &str) {
    let Some(key) = PresentedKey::parse(text) else {
        return;
    };
    assert!(text.len() <= MAX_PRESENTED_KEY_LEN);
    assert_eq!(key.expose_secret(), text);
    let key_id = KeyId::parse(key.key_id()).expect("an accepted key's id is a key id");
    let (brand, _) = text.split_once('_').expect("an accepted key has a brand");
    let brand = Brand::parse(brand).expect("an accepted key's brand is a brand");
    assert!(text.starts_with(&public_prefix(brand.as_str(), key.environment(), &key_id)));
    let (checked, check) = text.split_at(text.len() - CHECK_LEN);
    assert_eq!(checksum(checked.as_bytes()), check);
}

// ---------------------------------------------------------------------------------------------
// page_token: ListKeys and ListAuditEvents page tokens.

/// The MAC key of the fuzzed codec (the seeds hold tokens made with it).
pub const PAGE_TOKEN_MAC_KEY: [u8; 32] = [7; 32];
/// The workspace and audit listing the fuzzed tokens are decoded for.
pub const PAGE_TOKEN_WORKSPACE: &str = "w1";
pub const PAGE_TOKEN_LISTING: &str = "w1|key=|actor=|action=0";

/// `data`: a flag byte (bit 0: include_inactive), then the token text. Whatever a token
/// decodes to must encode back to the very same text (no two texts name one position), and any
/// position must round-trip.
pub fn page_token(data: &[u8]) {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let include_inactive = flags & 1 == 1;
    let codec = PageTokenCodec::new(PAGE_TOKEN_MAC_KEY.to_vec());
    let workspace = WorkspaceId::parse(PAGE_TOKEN_WORKSPACE).expect("a workspace id");
    if let Ok(token) = std::str::from_utf8(rest) {
        match codec.decode(token, &workspace, include_inactive) {
            Ok((create_time, key_id)) => assert_eq!(
                codec.encode(&workspace, include_inactive, create_time, &key_id),
                token
            ),
            Err(error) => check_refusal(error),
        }
        match codec.decode_audit(token, PAGE_TOKEN_LISTING) {
            Ok(event_id) => assert_eq!(codec.encode_audit(PAGE_TOKEN_LISTING, event_id), token),
            Err(error) => check_refusal(error),
        }
    }
    // Any position round-trips: the first 8 bytes as the time (or event id), the next 12 as
    // the key id when they are one.
    if let Some(number) = rest.get(..8) {
        let number = i64::from_be_bytes(number.try_into().expect("8 bytes"));
        let audit = codec.encode_audit(PAGE_TOKEN_LISTING, number);
        assert_eq!(
            codec.decode_audit(&audit, PAGE_TOKEN_LISTING).ok(),
            Some(number)
        );
        let key_id = rest
            .get(8..20)
            .and_then(|id| std::str::from_utf8(id).ok())
            .and_then(KeyId::parse)
            .unwrap_or_else(KeyId::generate);
        let token = codec.encode(&workspace, include_inactive, number, &key_id);
        let decoded = codec.decode(&token, &workspace, include_inactive).ok();
        assert_eq!(decoded, Some((number, key_id)));
    }
}

// ---------------------------------------------------------------------------------------------
// jwt: the dashboard JWT front end.

/// The HS256 secret, issuer and audience of the fuzzed verifier (and of `grpc_server`'s).
pub const JWT_SECRET: &str = "fuzz-jwt-secret-0123456789abcdef";
pub const JWT_ISSUER: &str = "fuzz-issuer";
pub const JWT_AUDIENCE: &str = "fuzz-audience";
const JWT_HEADER: &str = r#"{"alg":"HS256","typ":"JWT"}"#;

pub fn jwt_config() -> JwtConfig {
    JwtConfig {
        secret: Some(JWT_SECRET.to_owned()),
        public_key_pem: None,
        issuer: Some(JWT_ISSUER.to_owned()),
        audience: Some(JWT_AUDIENCE.to_owned()),
        leeway: Duration::from_secs(30),
    }
}

/// A token for `header` and `claims` (JSON text, taken as given) signed with `JWT_SECRET`, so
/// that whatever the claims say reaches the code that reads them.
pub fn sign_hs256(header: &str, claims: &str) -> String {
    let signed = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header),
        URL_SAFE_NO_PAD.encode(claims)
    );
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(JWT_SECRET.as_bytes())
        .expect("HMAC takes a key of any length");
    mac.update(signed.as_bytes());
    let signature = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
    format!("{signed}.{signature}")
}

/// The token text a `jwt` input stands for: bit 0 of its first byte clear, the text as is;
/// set, a token signed with the right secret whose header and claims are the text's (a header
/// line, a newline and the claims; or only claims under the usual header).
pub fn jwt_token(mode: u8, text: &str) -> String {
    if mode & 1 == 0 {
        return text.to_owned();
    }
    let (header, claims) = text.split_once('\n').unwrap_or((JWT_HEADER, text));
    sign_hs256(header, claims)
}

static JWT_VERIFIER: LazyLock<JwtVerifier> =
    LazyLock::new(|| JwtVerifier::new(&jwt_config()).expect("the fuzz JWT config is valid"));

pub fn jwt(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    let token = jwt_token(mode, text);
    // The header a caller sends it in: what `bearer_token` finds is the token, trimmed.
    if let Ok(value) = MetadataValue::try_from(format!("Bearer {token}")) {
        let mut metadata = MetadataMap::new();
        metadata.insert("authorization", value);
        let found = bearer_token(&metadata);
        assert!(found.is_none_or(|found| found == token.trim()));
    }
    match JWT_VERIFIER.caller(&token) {
        Ok(Caller::User {
            subject,
            workspace_id,
            role,
        }) => {
            assert!(!subject.is_empty());
            assert!(!subject.chars().any(char::is_control));
            assert!(WorkspaceId::parse(workspace_id.as_str()).is_ok());
            let _ = role;
        }
        Ok(other) => panic!("a JWT named a caller other than a user: {other:?}"),
        Err(error) => {
            let status = tonic::Status::from(error);
            assert_eq!(status.code(), Code::Unauthenticated, "{}", status.message());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// requests: every request message decoded from arbitrary bytes and converted into its command.

/// Every request message of KeyService and VerifyService, in the order of `requests`'s (and
/// `grpc_server`'s) selector byte.
pub const REQUESTS: [&str; 16] = [
    "IssueKey",
    "GetKey",
    "ListKeys",
    "RevokeKey",
    "RotateKey",
    "IssueTrialKey",
    "RevokeTrialKey",
    "UpdateKey",
    "ListAuditEvents",
    "WatchKeyEvents",
    "CreateWebhook",
    "ListWebhooks",
    "DeleteWebhook",
    "ListWebhookDeliveries",
    "RedeliverWebhookEvent",
    "VerifyKey",
];

/// Decodes `bytes` as `M`; a decoded message must encode and decode back to itself.
fn decode<M: Message + Default + PartialEq + std::fmt::Debug>(bytes: &[u8]) -> Option<M> {
    let message = M::decode(bytes).ok()?;
    let again = M::decode(message.encode_to_vec().as_slice()).expect("re-encoded message decodes");
    assert_eq!(again, message);
    Some(message)
}

/// The request's conversion into its command, as the handler makes it; a refusal must be a
/// caller's error.
fn convert<M, C>(message: M)
where
    C: TryFrom<M>,
    Error: From<C::Error>,
{
    if let Err(error) = C::try_from(message) {
        check_refusal(Error::from(error));
    }
}

fn request_id(text: &str) {
    if text.is_empty() {
        return;
    }
    match parse_request_id("request_id", text) {
        Ok(id) => assert_eq!(parse_request_id("request_id", &id).ok(), Some(id)),
        Err(error) => check_refusal(error),
    }
}

/// `data`: a selector byte (`REQUESTS`), then the message's protobuf encoding.
pub fn requests(data: &[u8]) {
    use key_authority::keys;
    use key_authority::webhooks;

    let Some((&selector, bytes)) = data.split_first() else {
        return;
    };
    match selector as usize % REQUESTS.len() {
        0 => {
            let Some(m) = decode::<pb::IssueKeyRequest>(bytes) else {
                return;
            };
            request_id(&m.request_id);
            convert::<_, keys::IssueKey>(m);
        }
        1 => {
            let Some(m) = decode::<pb::GetKeyRequest>(bytes) else {
                return;
            };
            convert::<_, keys::GetKey>(m);
        }
        2 => {
            let Some(m) = decode::<pb::ListKeysRequest>(bytes) else {
                return;
            };
            convert::<_, keys::ListKeys>(m);
        }
        3 => {
            let Some(m) = decode::<pb::RevokeKeyRequest>(bytes) else {
                return;
            };
            request_id(&m.request_id);
            convert::<_, keys::RevokeKey>(m);
        }
        4 => {
            let Some(m) = decode::<pb::RotateKeyRequest>(bytes) else {
                return;
            };
            request_id(&m.request_id);
            convert::<_, keys::RotateKey>(m);
        }
        5 => {
            let Some(m) = decode::<pb::IssueTrialKeyRequest>(bytes) else {
                return;
            };
            request_id(&m.request_id);
            convert::<_, keys::IssueTrialKey>(m);
        }
        6 => {
            let Some(m) = decode::<pb::RevokeTrialKeyRequest>(bytes) else {
                return;
            };
            convert::<_, keys::RevokeTrialKey>(m);
        }
        7 => {
            let Some(m) = decode::<pb::UpdateKeyRequest>(bytes) else {
                return;
            };
            request_id(&m.request_id);
            convert::<_, keys::UpdateKey>(m);
        }
        8 => {
            let Some(m) = decode::<pb::ListAuditEventsRequest>(bytes) else {
                return;
            };
            convert::<_, keys::ListAuditEvents>(m);
        }
        9 => {
            let Some(m) = decode::<pb::WatchKeyEventsRequest>(bytes) else {
                return;
            };
            convert::<_, keys::WatchKeyEvents>(m);
        }
        10 => {
            let Some(m) = decode::<pb::CreateWebhookRequest>(bytes) else {
                return;
            };
            check_url(&m.url);
            convert::<_, webhooks::CreateWebhook>(m);
        }
        11 => {
            let Some(m) = decode::<pb::ListWebhooksRequest>(bytes) else {
                return;
            };
            convert::<_, webhooks::ListWebhooks>(m);
        }
        12 => {
            let Some(m) = decode::<pb::DeleteWebhookRequest>(bytes) else {
                return;
            };
            convert::<_, webhooks::DeleteWebhook>(m);
        }
        13 => {
            let Some(m) = decode::<pb::ListWebhookDeliveriesRequest>(bytes) else {
                return;
            };
            convert::<_, webhooks::ListWebhookDeliveries>(m);
        }
        14 => {
            let Some(m) = decode::<pb::RedeliverWebhookEventRequest>(bytes) else {
                return;
            };
            convert::<_, webhooks::RedeliverWebhookEvent>(m);
        }
        _ => {
            let Some(m) = decode::<pb::VerifyKeyRequest>(bytes) else {
                return;
            };
            check_presented_key(&m.key);
            match VerifyRequest::checked(&m.key, &m.required_scopes, &m.client_ip, m.cost) {
                Ok(question) => assert!(question.cost >= 0),
                Err(error) => check_refusal(error),
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// webhook_target: webhook URLs and the rules on where a webhook may point.

/// Checks a webhook URL as CreateWebhook does before it resolves anything, and what an accepted
/// URL must be. The dispatcher parses the stored normal form again and checks that host: it
/// must be the very URL that was checked.
fn check_url(text: &str) {
    let url = match parse_url(text) {
        Ok(url) => url,
        Err(error) => return check_refusal(error),
    };
    assert!(text.len() <= MAX_URL_LEN);
    assert!(matches!(url.scheme(), "http" | "https"));
    assert!(url.host().is_some());
    assert!(url.username().is_empty() && url.password().is_none());
    assert!(url.fragment().is_none());
    let stored = url::Url::parse(url.as_str()).expect("a checked URL's normal form parses");
    assert_eq!(stored, url, "the normal form parses to another URL");
}

/// The first bytes of a `webhook_target` input that name an address.
const ADDRESS_BYTES: usize = 1 + 16 + 2;

/// `data`: a flag byte (bit 0: IPv6, bit 1: private targets allowed, bit 2: the server
/// listens on every address), 16 address bytes (IPv4 uses the first 4), a port, then URL text.
pub fn webhook_target(data: &[u8]) {
    if data.len() < ADDRESS_BYTES {
        if let Ok(text) = std::str::from_utf8(data) {
            check_url(text);
        }
        return;
    }
    let (head, rest) = data.split_at(ADDRESS_BYTES);
    let flags = head[0];
    let octets: [u8; 16] = head[1..17].try_into().expect("16 bytes");
    let port = u16::from_be_bytes([head[17], head[18]]);
    let ip = if flags & 1 == 1 {
        IpAddr::V6(Ipv6Addr::from(octets))
    } else {
        IpAddr::V4(Ipv4Addr::new(octets[0], octets[1], octets[2], octets[3]))
    };
    let own: IpAddr = if flags & 4 == 4 {
        Ipv6Addr::UNSPECIFIED.into()
    } else {
        Ipv4Addr::LOCALHOST.into()
    };
    let strict = TargetPolicy {
        allow_private: false,
        own_addresses: vec![SocketAddr::new(own, 50051), SocketAddr::new(own, 9090)],
    };
    let lenient = TargetPolicy {
        allow_private: true,
        ..strict.clone()
    };
    let policy = if flags & 2 == 2 { &lenient } else { &strict };
    let address = SocketAddr::new(ip, port);
    let verdict = policy.judge(address);
    // Allowing private targets allows those and nothing else.
    let strict_verdict = strict.judge(address);
    let lenient_verdict = lenient.judge(address);
    assert!(lenient_verdict.is_none() || lenient_verdict == strict_verdict);
    // An IPv4 address written as IPv6 is judged as itself.
    if let IpAddr::V4(v4) = ip {
        let mapped = SocketAddr::new(v4.to_ipv6_mapped().into(), port);
        assert_eq!(policy.judge(mapped), verdict);
    }
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    check_url(text);
    if let Ok(url) = parse_url(text) {
        let port = url.port_or_known_default().unwrap_or(0);
        let literal = match url.host() {
            Some(url::Host::Ipv4(ip)) => Some(IpAddr::from(ip)),
            Some(url::Host::Ipv6(ip)) => Some(IpAddr::from(ip)),
            _ => None,
        };
        let expected = literal.and_then(|ip| policy.judge(SocketAddr::new(ip, port)));
        assert_eq!(policy.check_literal(&url).err(), expected);
    }
}

// ---------------------------------------------------------------------------------------------
// Seeds and regression replay.

pub mod seeds;

#[cfg(test)]
mod tests;
