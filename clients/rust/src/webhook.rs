//! Verifying the webhooks key-authority sends, for the receiving side.
//!
//! key-authority POSTs each key event to a webhook's URL as JSON, signed as Standard Webhooks
//! specifies: `webhook-id` is the event's id (the same on every retry, so a receiver can drop
//! duplicates), `webhook-timestamp` the Unix time of the attempt in seconds, and
//! `webhook-signature` one or more space-separated `v1,<base64>` entries, each the HMAC-SHA256 of
//! `{webhook-id}.{webhook-timestamp}.{body}` keyed with the webhook's signing secret (the bytes
//! after `whsec_`, base64-decoded).

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, KeyInit, Mac};
use http::HeaderMap;
use serde::Deserialize;
use sha2::Sha256;
use subtle::ConstantTimeEq as _;

/// The prefix of a signing secret as CreateWebhook returns it.
pub const WEBHOOK_SECRET_PREFIX: &str = "whsec_";
/// How far `webhook-timestamp` may be from now, either way, by default.
pub const DEFAULT_WEBHOOK_TOLERANCE: Duration = Duration::from_secs(5 * 60);

const ID_HEADER: &str = "webhook-id";
const TIMESTAMP_HEADER: &str = "webhook-timestamp";
const SIGNATURE_HEADER: &str = "webhook-signature";

/// Checks a webhook request from key-authority with the default tolerance (5 minutes) and returns
/// its parsed payload: [`WebhookVerifier::new`] then [`WebhookVerifier::verify`].
///
/// `secret` is the webhook's signing secret (`whsec_...`, CreateWebhook's `signing_secret`),
/// `body` the request body exactly as received: verify the raw bytes, never JSON parsed and
/// serialised again. A receiver of many requests makes one [`WebhookVerifier`] and keeps it.
///
/// ```
/// use key_authority_client::verify_webhook;
///
/// fn receive(secret: &str, headers: &http::HeaderMap, body: &[u8]) -> http::StatusCode {
///     match verify_webhook(secret, headers, body) {
///         Ok(payload) => {
///             // Process each payload.data.event_id once: retries and redeliveries repeat it.
///             println!("{} {}", payload.event_type, payload.data.key_id);
///             http::StatusCode::NO_CONTENT
///         }
///         Err(_) => http::StatusCode::BAD_REQUEST,
///     }
/// }
/// ```
pub fn verify_webhook(
    secret: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<WebhookPayload, WebhookError> {
    WebhookVerifier::new(secret)?.verify(headers, body)
}

/// Checks the requests of one webhook: built once from its signing secret, then
/// [`verify`](Self::verify) per request.
///
/// A request is refused when a `webhook-*` header is missing or malformed, when
/// `webhook-timestamp` is further from now than the [tolerance](Self::with_tolerance) (5 minutes
/// by default) either way, when no `v1` entry of `webhook-signature` is the expected signature
/// (compared in constant time; any one match is enough, so the sender may list several), or when
/// the signed body is not the JSON payload.
#[derive(Clone)]
pub struct WebhookVerifier {
    mac: Hmac<Sha256>,
    tolerance: Duration,
}

impl WebhookVerifier {
    /// A verifier for the signing secret `whsec_<base64>` (the bare base64 is accepted too, as
    /// the Standard Webhooks libraries do). Fails with [`WebhookError::InvalidSecret`] otherwise.
    pub fn new(secret: &str) -> Result<Self, WebhookError> {
        let encoded = secret.strip_prefix(WEBHOOK_SECRET_PREFIX).unwrap_or(secret);
        let key = STANDARD
            .decode(encoded)
            .map_err(|_| WebhookError::InvalidSecret)?;
        if key.is_empty() {
            return Err(WebhookError::InvalidSecret);
        }
        let mac = <Hmac<Sha256> as KeyInit>::new_from_slice(&key)
            .expect("HMAC takes a key of any length");
        Ok(Self {
            mac,
            tolerance: DEFAULT_WEBHOOK_TOLERANCE,
        })
    }

    /// How far `webhook-timestamp` may be from now, either way.
    pub fn with_tolerance(mut self, tolerance: Duration) -> Self {
        self.tolerance = tolerance;
        self
    }

    /// Checks the request's signature and timestamp, then parses its body.
    pub fn verify(&self, headers: &HeaderMap, body: &[u8]) -> Result<WebhookPayload, WebhookError> {
        self.verify_at(headers, body, SystemTime::now())
    }

    /// [`verify`](Self::verify) as if the time were `now`.
    pub fn verify_at(
        &self,
        headers: &HeaderMap,
        body: &[u8],
        now: SystemTime,
    ) -> Result<WebhookPayload, WebhookError> {
        self.verify_signature_at(headers, body, now)?;
        serde_json::from_slice(body).map_err(|error| WebhookError::InvalidBody(error.to_string()))
    }

    /// Checks the request's signature and timestamp only, for a receiver that parses the body
    /// itself.
    pub fn verify_signature(&self, headers: &HeaderMap, body: &[u8]) -> Result<(), WebhookError> {
        self.verify_signature_at(headers, body, SystemTime::now())
    }

    /// [`verify_signature`](Self::verify_signature) as if the time were `now`.
    pub fn verify_signature_at(
        &self,
        headers: &HeaderMap,
        body: &[u8],
        now: SystemTime,
    ) -> Result<(), WebhookError> {
        let message_id = header(headers, ID_HEADER)?;
        let timestamp = header(headers, TIMESTAMP_HEADER)?;
        let signatures = header(headers, SIGNATURE_HEADER)?;
        self.check_timestamp(timestamp, now)?;

        let mut mac = self.mac.clone();
        mac.update(message_id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.as_bytes());
        mac.update(b".");
        mac.update(body);
        let expected = mac.finalize().into_bytes();
        let matches = v1_signatures(signatures)
            .any(|candidate| bool::from(candidate.as_slice().ct_eq(expected.as_slice())));
        if matches {
            Ok(())
        } else {
            Err(WebhookError::NoMatchingSignature)
        }
    }

    fn check_timestamp(&self, text: &str, now: SystemTime) -> Result<(), WebhookError> {
        // Unix seconds as ASCII digits only: no sign, fraction or spaces, so that the signed text
        // is the one the sender meant.
        if text.is_empty() || text.len() > 15 || !text.bytes().all(|byte| byte.is_ascii_digit()) {
            return Err(WebhookError::InvalidTimestamp);
        }
        let sent = UNIX_EPOCH
            + Duration::from_secs(text.parse().map_err(|_| WebhookError::InvalidTimestamp)?);
        match now.duration_since(sent) {
            Ok(age) if age > self.tolerance => Err(WebhookError::TimestampTooOld { age }),
            Ok(_) => Ok(()),
            Err(ahead) if ahead.duration() > self.tolerance => Err(WebhookError::TimestampTooNew {
                ahead: ahead.duration(),
            }),
            Err(_) => Ok(()),
        }
    }
}

impl fmt::Debug for WebhookVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the key.
        f.debug_struct("WebhookVerifier")
            .field("tolerance", &self.tolerance)
            .finish_non_exhaustive()
    }
}

fn header<'a>(headers: &'a HeaderMap, name: &'static str) -> Result<&'a str, WebhookError> {
    let value = headers
        .get(name)
        .map(|value| value.to_str().map(str::trim))
        .transpose()
        .map_err(|_| WebhookError::MalformedHeader(name))?;
    match value {
        Some(value) if !value.is_empty() => Ok(value),
        _ => Err(WebhookError::MissingHeader(name)),
    }
}

/// The decoded `v1` signatures of the header; entries of other versions (such as `v1a`) or
/// undecodable ones are skipped.
fn v1_signatures(header: &str) -> impl Iterator<Item = Vec<u8>> + '_ {
    header.split_ascii_whitespace().filter_map(|entry| {
        let signature = entry.strip_prefix("v1,")?;
        STANDARD
            .decode(signature)
            .ok()
            .filter(|bytes| !bytes.is_empty())
    })
}

/// A webhook request that must not be trusted: answer it with a 4xx status and do not act on it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum WebhookError {
    /// The signing secret is not `whsec_` followed by base64.
    InvalidSecret,
    /// This `webhook-*` header is absent or empty.
    MissingHeader(&'static str),
    /// This `webhook-*` header is not visible ASCII.
    MalformedHeader(&'static str),
    /// `webhook-timestamp` is not Unix seconds in decimal digits.
    InvalidTimestamp,
    /// `webhook-timestamp` is older than the tolerance: a late retry or a replay.
    TimestampTooOld {
        /// How old it is.
        age: Duration,
    },
    /// `webhook-timestamp` is further ahead than the tolerance.
    TimestampTooNew {
        /// How far ahead it is.
        ahead: Duration,
    },
    /// No `v1` entry of `webhook-signature` matches the body and the secret.
    NoMatchingSignature,
    /// The body is signed but is not the JSON payload (the parser's message).
    InvalidBody(String),
}

impl fmt::Display for WebhookError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::InvalidSecret => {
                f.write_str("the signing secret is not whsec_ followed by base64")
            }
            Self::MissingHeader(name) => write!(f, "the {name} header is missing"),
            Self::MalformedHeader(name) => write!(f, "the {name} header is not visible ASCII"),
            Self::InvalidTimestamp => {
                f.write_str("the webhook-timestamp header is not Unix seconds")
            }
            Self::TimestampTooOld { age } => {
                write!(
                    f,
                    "the webhook-timestamp is {} s old, beyond the tolerance",
                    age.as_secs()
                )
            }
            Self::TimestampTooNew { ahead } => write!(
                f,
                "the webhook-timestamp is {} s ahead, beyond the tolerance",
                ahead.as_secs()
            ),
            Self::NoMatchingSignature => {
                f.write_str("no webhook-signature entry matches the signing secret")
            }
            Self::InvalidBody(why) => write!(f, "the signed body is not a webhook payload: {why}"),
        }
    }
}

impl std::error::Error for WebhookError {}

/// The JSON body of a webhook request: `{"type", "timestamp", "data"}`. Fields added later are
/// ignored.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[non_exhaustive]
pub struct WebhookPayload {
    /// The event's type, such as `key.rotated` (as `data.type`). New types may be added: ignore
    /// the ones you do not know.
    #[serde(rename = "type")]
    pub event_type: String,
    /// When the payload was made, in RFC 3339 (UTC).
    pub timestamp: String,
    /// The key event.
    pub data: WebhookEventData,
}

/// The key event of a [`WebhookPayload`], as [`pb::KeyEvent`](crate::pb::KeyEvent) in JSON.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[non_exhaustive]
pub struct WebhookEventData {
    /// The event's identifier (a UUID), also the `webhook-id` header: the same on every retry
    /// and redelivery, so process each one once.
    pub event_id: String,
    /// The event's position in the workspace's order of events.
    pub position: i64,
    /// What happened, such as `key.issued`.
    #[serde(rename = "type")]
    pub event_type: String,
    /// The workspace of the key.
    pub workspace_id: String,
    /// The key it happened to (for `key.rotated`, the old key).
    pub key_id: String,
    /// When it happened, in RFC 3339 (UTC).
    pub event_time: String,
    /// Who did it.
    pub actor: WebhookActor,
    /// The fields that changed, as in the audit trail.
    #[serde(default)]
    pub changes: Vec<WebhookFieldChange>,
    /// For `key.rotated`: the successor's key id.
    #[serde(default)]
    pub new_key_id: Option<String>,
    /// For `key.rotated`: when the old key stops working, in RFC 3339 (UTC).
    #[serde(default)]
    pub old_key_expire_time: Option<String>,
}

/// One field a key event changed, with its values as JSON (`null` for unset or, for a new key,
/// the old value).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[non_exhaustive]
pub struct WebhookFieldChange {
    /// The field's name in Key, such as `scopes` or `expire_time`.
    pub field: String,
    /// The value before the change.
    #[serde(default)]
    pub old: serde_json::Value,
    /// The value after the change.
    #[serde(default)]
    pub new: serde_json::Value,
}

/// Who caused a key event.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[non_exhaustive]
pub struct WebhookActor {
    /// The kind of actor: `admin`, `user`, `api_key`, `anonymous` or `system`.
    pub kind: String,
    /// The actor's identifier.
    #[serde(default)]
    pub id: String,
    /// A name for people, as in the audit trail.
    #[serde(default)]
    pub display: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    const MESSAGE_ID: &str = "5f0c1f0e-8a8e-4d47-9b0e-3d8a2c1b7e10";
    const NOW: u64 = 1_800_000_000;
    const BODY: &[u8] = br#"{"type":"key.issued","timestamp":"2026-11-24T03:53:30.123Z","data":{"event_id":"5f0c1f0e-8a8e-4d47-9b0e-3d8a2c1b7e10","position":7,"type":"key.issued","workspace_id":"acme","key_id":"k1","event_time":"2026-11-24T03:53:30.100Z","actor":{"kind":"admin","id":"admin","display":"admin"},"changes":[{"field":"scopes","old":null,"new":["a:read"]}],"later_field":true}}"#;

    fn at(seconds: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(seconds)
    }

    /// A secret of its own for each test: `whsec_` and the base64 of 32 bytes.
    fn new_secret(seed: u8) -> (String, Vec<u8>) {
        let key: Vec<u8> = (0..32u8)
            .map(|i| i.wrapping_mul(31).wrapping_add(seed))
            .collect();
        (format!("whsec_{}", STANDARD.encode(&key)), key)
    }

    /// One `v1,` entry, computed here from the scheme with the primitives, not the verifier.
    fn sign(key: &[u8], message_id: &str, timestamp: &str, body: &[u8]) -> String {
        let mut signed = format!("{message_id}.{timestamp}.").into_bytes();
        signed.extend_from_slice(body);
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(key).unwrap();
        mac.update(&signed);
        format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
    }

    fn headers(id: &str, timestamp: &str, signature: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (name, value) in [
            (ID_HEADER, id),
            (TIMESTAMP_HEADER, timestamp),
            (SIGNATURE_HEADER, signature),
        ] {
            headers.insert(name, HeaderValue::from_str(value).unwrap());
        }
        headers
    }

    fn signed(key: &[u8], timestamp: u64, body: &[u8]) -> HeaderMap {
        let timestamp = timestamp.to_string();
        headers(
            MESSAGE_ID,
            &timestamp,
            &sign(key, MESSAGE_ID, &timestamp, body),
        )
    }

    #[test]
    fn a_valid_request_gives_the_parsed_payload() {
        let (secret, key) = new_secret(1);
        let verifier = WebhookVerifier::new(&secret).unwrap();
        let payload = verifier
            .verify_at(&signed(&key, NOW, BODY), BODY, at(NOW))
            .unwrap();
        assert_eq!(payload.event_type, "key.issued");
        assert_eq!(payload.timestamp, "2026-11-24T03:53:30.123Z");
        assert_eq!(payload.data.event_id, MESSAGE_ID);
        assert_eq!(payload.data.position, 7);
        assert_eq!(payload.data.key_id, "k1");
        assert_eq!(payload.data.actor.display, "admin");
        assert_eq!(payload.data.changes.len(), 1);
        assert_eq!(payload.data.changes[0].field, "scopes");
        assert_eq!(payload.data.changes[0].old, serde_json::Value::Null);
        assert_eq!(payload.data.changes[0].new, serde_json::json!(["a:read"]));
        assert_eq!(payload.data.new_key_id, None);
        // Against the real clock, through the one-call helper.
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        assert_eq!(
            verify_webhook(&secret, &signed(&key, now, BODY), BODY).unwrap(),
            payload
        );
    }

    #[test]
    fn a_published_standard_webhooks_example_verifies() {
        // The example secret, message and signature that the Standard Webhooks libraries test
        // with.
        let verifier = WebhookVerifier::new("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let headers = headers(
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            "1614265330",
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
        );
        let body = br#"{"test": 2432232314}"#;
        assert_eq!(
            verifier.verify_signature_at(&headers, body, at(1614265330)),
            Ok(())
        );
        assert_eq!(
            verifier.verify_signature_at(&headers, br#"{"test": 2432232315}"#, at(1614265330)),
            Err(WebhookError::NoMatchingSignature)
        );
        // Signed, but not our payload.
        assert!(matches!(
            verifier.verify_at(&headers, body, at(1614265330)),
            Err(WebhookError::InvalidBody(_))
        ));
    }

    #[test]
    fn a_tampered_body_id_or_timestamp_is_refused() {
        let (secret, key) = new_secret(2);
        let verifier = WebhookVerifier::new(&secret).unwrap();
        let good = signed(&key, NOW, BODY);
        let tampered = String::from_utf8(BODY.to_vec())
            .unwrap()
            .replace(r#""key_id":"k1""#, r#""key_id":"k2""#);
        assert_ne!(tampered.as_bytes(), BODY);
        assert_eq!(
            verifier.verify_at(&good, tampered.as_bytes(), at(NOW)),
            Err(WebhookError::NoMatchingSignature)
        );
        let mut other_id = good.clone();
        other_id.insert(ID_HEADER, HeaderValue::from_static("another"));
        assert_eq!(
            verifier.verify_at(&other_id, BODY, at(NOW)),
            Err(WebhookError::NoMatchingSignature)
        );
        let mut earlier = good;
        earlier.insert(TIMESTAMP_HEADER, HeaderValue::from(NOW - 1));
        assert_eq!(
            verifier.verify_at(&earlier, BODY, at(NOW)),
            Err(WebhookError::NoMatchingSignature)
        );
    }

    #[test]
    fn another_secret_is_refused() {
        let (_, key) = new_secret(3);
        let (other, _) = new_secret(4);
        let verifier = WebhookVerifier::new(&other).unwrap();
        assert_eq!(
            verifier.verify_at(&signed(&key, NOW, BODY), BODY, at(NOW)),
            Err(WebhookError::NoMatchingSignature)
        );
    }

    #[test]
    fn timestamps_beyond_the_tolerance_are_refused_either_way() {
        let (secret, key) = new_secret(5);
        let verifier = WebhookVerifier::new(&secret).unwrap();
        for edge in [NOW - 300, NOW + 300] {
            assert!(
                verifier
                    .verify_at(&signed(&key, edge, BODY), BODY, at(NOW))
                    .is_ok()
            );
        }
        assert_eq!(
            verifier.verify_at(&signed(&key, NOW - 301, BODY), BODY, at(NOW)),
            Err(WebhookError::TimestampTooOld {
                age: Duration::from_secs(301)
            })
        );
        assert_eq!(
            verifier.verify_at(&signed(&key, NOW + 301, BODY), BODY, at(NOW)),
            Err(WebhookError::TimestampTooNew {
                ahead: Duration::from_secs(301)
            })
        );
        assert_eq!(
            WebhookError::TimestampTooOld {
                age: Duration::from_secs(301)
            }
            .to_string(),
            "the webhook-timestamp is 301 s old, beyond the tolerance"
        );
        let strict = verifier.with_tolerance(Duration::from_secs(30));
        assert!(
            strict
                .verify_at(&signed(&key, NOW - 30, BODY), BODY, at(NOW))
                .is_ok()
        );
        assert!(matches!(
            strict.verify_at(&signed(&key, NOW - 31, BODY), BODY, at(NOW)),
            Err(WebhookError::TimestampTooOld { .. })
        ));
    }

    #[test]
    fn any_one_of_several_signatures_is_enough_and_only_v1_counts() {
        let (secret, key) = new_secret(6);
        let (_, other_key) = new_secret(7);
        let verifier = WebhookVerifier::new(&secret).unwrap();
        let timestamp = NOW.to_string();
        let right = sign(&key, MESSAGE_ID, &timestamp, BODY);
        let wrong = sign(&other_key, MESSAGE_ID, &timestamp, BODY);
        for entries in [
            format!("{wrong} {right}"),
            format!("{right} {wrong}"),
            format!("v1,!!! {wrong}  {right}"),
        ] {
            let request = headers(MESSAGE_ID, &timestamp, &entries);
            assert_eq!(
                verifier.verify_signature_at(&request, BODY, at(NOW)),
                Ok(())
            );
        }
        let bare = right.strip_prefix("v1,").unwrap();
        for entries in [
            wrong.clone(),
            format!("v1a,{bare}"),
            bare.to_owned(),
            format!("{wrong} {wrong}"),
            "v1,".to_owned(),
        ] {
            let request = headers(MESSAGE_ID, &timestamp, &entries);
            assert_eq!(
                verifier.verify_signature_at(&request, BODY, at(NOW)),
                Err(WebhookError::NoMatchingSignature),
                "{entries}"
            );
        }
    }

    #[test]
    fn a_missing_header_is_refused() {
        let (secret, key) = new_secret(8);
        let verifier = WebhookVerifier::new(&secret).unwrap();
        for name in [ID_HEADER, TIMESTAMP_HEADER, SIGNATURE_HEADER] {
            let mut request = signed(&key, NOW, BODY);
            request.remove(name);
            assert_eq!(
                verifier.verify_at(&request, BODY, at(NOW)),
                Err(WebhookError::MissingHeader(name))
            );
            request.insert(name, HeaderValue::from_static(" "));
            assert_eq!(
                verifier.verify_at(&request, BODY, at(NOW)),
                Err(WebhookError::MissingHeader(name))
            );
        }
        assert_eq!(
            WebhookError::MissingHeader(ID_HEADER).to_string(),
            "the webhook-id header is missing"
        );
    }

    #[test]
    fn a_timestamp_that_is_not_unix_seconds_is_refused() {
        let (secret, key) = new_secret(9);
        let verifier = WebhookVerifier::new(&secret).unwrap();
        for timestamp in [
            "1.8e9",
            "-1",
            "+1800000000",
            "1800000000.5",
            "soon",
            "9999999999999999",
        ] {
            let request = headers(
                MESSAGE_ID,
                timestamp,
                &sign(&key, MESSAGE_ID, timestamp, BODY),
            );
            assert_eq!(
                verifier.verify_at(&request, BODY, at(NOW)),
                Err(WebhookError::InvalidTimestamp),
                "{timestamp}"
            );
        }
    }

    #[test]
    fn a_signed_body_that_is_not_the_payload_is_refused() {
        let (secret, key) = new_secret(10);
        let verifier = WebhookVerifier::new(&secret).unwrap();
        for body in [&b"not json"[..], b"[1, 2]", br#"{"type":"key.issued"}"#] {
            assert!(matches!(
                verifier.verify_at(&signed(&key, NOW, body), body, at(NOW)),
                Err(WebhookError::InvalidBody(_))
            ));
            assert_eq!(
                verifier.verify_signature_at(&signed(&key, NOW, body), body, at(NOW)),
                Ok(())
            );
        }
    }

    #[test]
    fn a_malformed_secret_is_refused_and_the_bare_base64_accepted() {
        for bad in ["whsec_***", "whsec_", ""] {
            assert_eq!(
                WebhookVerifier::new(bad).unwrap_err(),
                WebhookError::InvalidSecret
            );
        }
        let (_, key) = new_secret(11);
        let bare = WebhookVerifier::new(&STANDARD.encode(&key)).unwrap();
        assert!(
            bare.verify_at(&signed(&key, NOW, BODY), BODY, at(NOW))
                .is_ok()
        );
        // Debug never shows the key.
        assert!(!format!("{bare:?}").contains(&STANDARD.encode(&key)));
    }
}
