//! Webhook signatures, as the Standard Webhooks convention has them: each request carries
//! `webhook-id` (the event id, the same on every retry), `webhook-timestamp` (Unix seconds) and
//! `webhook-signature`, `v1,` and the base64 of HMAC-SHA256 over `{id}.{timestamp}.{body}` keyed
//! with the secret's 32 bytes. The secret is shown once as `whsec_` and their base64.
//!
//! No secret is stored: a webhook's secret is derived from the server's webhook key and the
//! webhook's id (HMAC-SHA256), so the database alone holds nothing to sign with when the key
//! comes from `--webhook-secret-file`. A short check value of the key is stored with each webhook
//! so that a replica holding another key refuses to sign instead of sending signatures nobody can
//! verify.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

/// The name of the webhook key in `service_secret`, when no secret file is configured.
pub const SHARED_SECRET_NAME: &str = "webhook_signing";
/// The prefix of a signing secret as shown (Standard Webhooks).
pub const SECRET_PREFIX: &str = "whsec_";
/// Characters of a secret shown by ListWebhooks: the prefix and 4 of its base64 (24 bits).
const HINT_LEN: usize = SECRET_PREFIX.len() + 4;

/// The server's key that webhook secrets are derived under.
#[derive(Clone)]
pub struct SigningKeys {
    master: Vec<u8>,
}

impl std::fmt::Debug for SigningKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SigningKeys(..)")
    }
}

/// One webhook's signing secret.
pub struct WebhookSecret([u8; 32]);

impl SigningKeys {
    pub fn new(master: Vec<u8>) -> Self {
        Self { master }
    }

    /// The secret of the webhook with this id.
    pub fn secret_for(&self, webhook_id: &str) -> WebhookSecret {
        WebhookSecret(self.mac(b"secret", webhook_id))
    }

    /// The check value stored with a webhook: tells whether this key is the one its secret was
    /// derived under, and nothing about the secret.
    pub fn check_value(&self, webhook_id: &str) -> String {
        let mac = self.mac(b"check", webhook_id);
        mac[..8].iter().map(|byte| format!("{byte:02x}")).collect()
    }

    fn mac(&self, purpose: &[u8], webhook_id: &str) -> [u8; 32] {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.master).expect("HMAC takes any key");
        mac.update(b"key-authority webhook ");
        mac.update(purpose);
        mac.update(&[0]);
        mac.update(webhook_id.as_bytes());
        mac.finalize().into_bytes().into()
    }
}

impl WebhookSecret {
    /// `whsec_` and the base64 of the secret: what CreateWebhook shows once.
    pub fn reveal(&self) -> String {
        format!("{SECRET_PREFIX}{}", STANDARD.encode(self.0))
    }

    /// The first characters of `reveal`, to tell secrets apart.
    pub fn hint(&self) -> String {
        self.reveal()[..HINT_LEN].to_owned()
    }

    /// The `webhook-signature` header of a request.
    pub fn sign(&self, message_id: &str, timestamp: i64, body: &[u8]) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes any key");
        mac.update(message_id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_per_webhook_and_per_key() {
        let keys = SigningKeys::new(vec![7; 32]);
        let other = SigningKeys::new(vec![8; 32]);
        assert_ne!(keys.secret_for("a").reveal(), keys.secret_for("b").reveal());
        assert_ne!(
            keys.secret_for("a").reveal(),
            other.secret_for("a").reveal()
        );
        assert_eq!(keys.secret_for("a").reveal(), keys.secret_for("a").reveal());
        assert_ne!(keys.check_value("a"), other.check_value("a"));
        assert_eq!(keys.check_value("a").len(), 16);
    }

    #[test]
    fn a_secret_shows_in_the_standard_webhooks_form() {
        let secret = SigningKeys::new(vec![1; 32]).secret_for("hook");
        let shown = secret.reveal();
        assert!(shown.starts_with("whsec_"));
        assert_eq!(STANDARD.decode(&shown[6..]).unwrap(), secret.0);
        assert_eq!(secret.hint(), shown[..10]);
    }

    /// The Standard Webhooks specification's own example: this secret, id, timestamp and body
    /// give this signature.
    #[test]
    fn signs_as_the_standard_webhooks_example() {
        let key = STANDARD
            .decode("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
            .expect("base64");
        let mut bytes = [0u8; 32];
        bytes[..key.len()].copy_from_slice(&key);
        // The example's key is 24 bytes; HMAC pads it with zeros to the block size, so the
        // zero-padded 32 bytes sign alike.
        let secret = WebhookSecret(bytes);
        let signature = secret.sign(
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            br#"{"test": 2432232314}"#,
        );
        assert_eq!(signature, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }
}
