//! The key text format: `<brand>_<env>_<id><secret><check>`.
//!
//! - `id`: 12 base62 characters, random: the public lookup handle (about 71 bits).
//! - `secret`: 32 base62 characters from the OS CSPRNG (about 190 bits).
//! - `check`: 6 base62 characters encoding the CRC32 of everything before it, so typos and
//!   garbage are rejected without any lookup and secret scanners can recognise a real key offline.

use std::fmt;

use super::model::Environment;

const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
pub const KEY_ID_LEN: usize = 12;
const SECRET_LEN: usize = 32;
const CHECK_LEN: usize = 6;
const BODY_LEN: usize = KEY_ID_LEN + SECRET_LEN + CHECK_LEN;
/// Longest brand accepted, so that a key always fits well inside `MAX_PRESENTED_KEY_LEN`.
pub const MAX_BRAND_LEN: usize = 16;
/// Anything longer than this is refused before any parsing work.
pub const MAX_PRESENTED_KEY_LEN: usize = 256;

/// The brand that starts every key of a deployment: 1 to 16 lowercase ASCII letters and digits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Brand(String);

impl Brand {
    pub fn parse(text: &str) -> Result<Self, String> {
        let valid_chars = text
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
        if text.is_empty() || text.len() > MAX_BRAND_LEN || !valid_chars {
            return Err(format!(
                "key prefix must be 1 to {MAX_BRAND_LEN} lowercase letters and digits, got {text:?}"
            ));
        }
        Ok(Self(text.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for Brand {
    fn default() -> Self {
        Self("ka".to_owned())
    }
}

/// A key's public identifier: 12 base62 characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId(String);

impl KeyId {
    pub fn parse(text: &str) -> Option<Self> {
        (text.len() == KEY_ID_LEN && text.bytes().all(is_base62)).then(|| Self(text.to_owned()))
    }

    /// A fresh random id from the OS CSPRNG.
    pub fn generate() -> Self {
        Self(random_base62(KEY_ID_LEN))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The public prefix of a key: `<brand>_<env>_<id>`, safe to show and log.
pub fn public_prefix(brand: &str, environment: Environment, key_id: &KeyId) -> String {
    format!("{brand}_{}_{key_id}", environment.as_str())
}

/// A newly minted key: its id and the whole plaintext, shown to the caller once.
pub struct GeneratedKey {
    pub key_id: KeyId,
    pub prefix: String,
    /// The whole plaintext key. Never logged, stored or put in a span.
    pub plaintext: String,
}

impl fmt::Debug for GeneratedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GeneratedKey")
            .field("key_id", &self.key_id)
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl GeneratedKey {
    pub fn generate(brand: &Brand, environment: Environment) -> Self {
        let key_id = KeyId::generate();
        let prefix = public_prefix(brand.as_str(), environment, &key_id);
        let mut plaintext = String::with_capacity(prefix.len() + SECRET_LEN + CHECK_LEN);
        plaintext.push_str(&prefix);
        plaintext.push_str(&random_base62(SECRET_LEN));
        let check = checksum(plaintext.as_bytes());
        plaintext.push_str(&check);
        Self {
            key_id,
            prefix,
            plaintext,
        }
    }
}

/// A key as a caller presented it, checked for shape and checksum. It borrows the caller's text
/// so that parsing allocates nothing; `Debug` never prints the secret.
#[derive(Clone, Copy)]
pub struct PresentedKey<'a> {
    text: &'a str,
    environment: Environment,
    key_id: &'a str,
}

impl<'a> PresentedKey<'a> {
    /// Parses a presented key. `None` means MALFORMED: wrong length, alphabet, shape or checksum.
    pub fn parse(text: &'a str) -> Option<Self> {
        if text.is_empty() || text.len() > MAX_PRESENTED_KEY_LEN {
            return None;
        }
        let (brand, rest) = text.split_once('_')?;
        let (environment, body) = rest.split_once('_')?;
        if brand.is_empty()
            || brand.len() > MAX_BRAND_LEN
            || !brand
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        {
            return None;
        }
        let environment = Environment::from_key_text(environment)?;
        if body.len() != BODY_LEN || !body.bytes().all(is_base62) {
            return None;
        }
        let (checked, check) = text.split_at(text.len() - CHECK_LEN);
        if !checksum_matches(checked.as_bytes(), check.as_bytes()) {
            return None;
        }
        Some(Self {
            text,
            environment,
            key_id: &body[..KEY_ID_LEN],
        })
    }

    /// The whole key text. Handle with care: this is the secret.
    pub fn expose_secret(&self) -> &'a str {
        self.text
    }

    pub fn key_id(&self) -> &'a str {
        self.key_id
    }

    pub fn environment(&self) -> Environment {
        self.environment
    }
}

impl fmt::Debug for PresentedKey<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PresentedKey")
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

fn is_base62(byte: u8) -> bool {
    byte.is_ascii_alphanumeric()
}

/// `len` characters drawn uniformly from the base62 alphabet with the OS CSPRNG.
pub fn random_base62(len: usize) -> String {
    // Rejection sampling keeps every character uniform: 248 = 4 * 62.
    let mut out = String::with_capacity(len);
    let mut buf = [0u8; 64];
    while out.len() < len {
        getrandom::fill(&mut buf).expect("the OS random number generator failed");
        for byte in buf {
            if byte < 248 && out.len() < len {
                out.push(BASE62[(byte % 62) as usize] as char);
            }
        }
    }
    out
}

/// The CRC32 of `data` as 6 base62 digits (62^6 > 2^32), most significant first.
fn checksum(data: &[u8]) -> String {
    let mut value = crc32fast::hash(data);
    let mut digits = [b'0'; CHECK_LEN];
    for slot in digits.iter_mut().rev() {
        *slot = BASE62[(value % 62) as usize];
        value /= 62;
    }
    digits.iter().map(|&b| b as char).collect()
}

fn checksum_matches(data: &[u8], check: &[u8]) -> bool {
    let mut value = crc32fast::hash(data);
    for &expected in check.iter().rev() {
        if BASE62[(value % 62) as usize] != expected {
            return false;
        }
        value /= 62;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn brand() -> Brand {
        Brand::parse("ka").unwrap()
    }

    #[test]
    fn generated_keys_parse_back() {
        for environment in [
            Environment::Live,
            Environment::Test,
            Environment::Dev,
            Environment::Trial,
        ] {
            let key = GeneratedKey::generate(&brand(), environment);
            let parsed = PresentedKey::parse(&key.plaintext).expect("a fresh key parses");
            assert_eq!(parsed.key_id(), key.key_id.as_str());
            assert_eq!(parsed.environment(), environment);
            assert!(key.plaintext.starts_with(&key.prefix));
        }
    }

    #[test]
    fn key_has_documented_shape() {
        let key = GeneratedKey::generate(&brand(), Environment::Live);
        assert_eq!(key.plaintext.len(), "ka_live_".len() + 50);
        assert_eq!(key.prefix.len(), "ka_live_".len() + 12);
    }

    #[test]
    fn any_single_character_change_is_malformed() {
        let key = GeneratedKey::generate(&brand(), Environment::Test);
        let bytes = key.plaintext.as_bytes();
        for index in "ka_test_".len()..bytes.len() {
            let mut changed = bytes.to_vec();
            changed[index] = if bytes[index] == b'a' { b'b' } else { b'a' };
            let changed = String::from_utf8(changed).unwrap();
            assert!(
                PresentedKey::parse(&changed).is_none(),
                "changing byte {index} was not caught"
            );
        }
    }

    #[test]
    fn garbage_is_malformed() {
        let long = "a".repeat(300);
        for text in [
            "",
            "ka",
            "ka_live_",
            "ka_prod_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
            "KA_live_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
            "ka_live_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA!",
            "ka_live_éAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
            long.as_str(),
        ] {
            assert!(PresentedKey::parse(text).is_none(), "{text:?} parsed");
        }
    }

    #[test]
    fn debug_never_shows_the_secret() {
        let key = GeneratedKey::generate(&brand(), Environment::Live);
        let parsed = PresentedKey::parse(&key.plaintext).unwrap();
        let secret_part = &key.plaintext[key.prefix.len()..];
        assert!(!format!("{parsed:?}").contains(secret_part));
        assert!(!format!("{key:?}").contains(secret_part));
    }

    #[test]
    fn brand_rules() {
        assert!(Brand::parse("acme2").is_ok());
        assert!(Brand::parse("").is_err());
        assert!(Brand::parse("Acme").is_err());
        assert!(Brand::parse("ac_me").is_err());
        assert!(Brand::parse(&"a".repeat(17)).is_err());
    }

    #[test]
    fn documented_regex_shape_matches() {
        // The README publishes: [a-z0-9]{1,16}_(live|test|dev|trial)_[0-9A-Za-z]{50}
        let key = GeneratedKey::generate(&brand(), Environment::Dev);
        let body = key.plaintext.strip_prefix("ka_dev_").unwrap();
        assert_eq!(body.len(), 50);
        assert!(body.bytes().all(|b| b.is_ascii_alphanumeric()));
    }
}
