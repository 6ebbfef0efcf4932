//! The key text format: `<brand>_<env>_<id><secret><check>`.
//!
//! - `id`: 12 base62 characters, random: the public lookup handle (about 71 bits).
//! - `secret`: 32 base62 characters from the OS CSPRNG (about 190 bits), or for a request that
//!   may be retried, expanded from a server-side HMAC (`GeneratedKey::derived`, `keys::idempotency`).
//! - `check`: 6 base62 characters encoding the CRC32 of everything before it, so typos and
//!   garbage are rejected without any lookup and secret scanners can recognise a real key offline.

use std::fmt;

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use super::model::Environment;

pub const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
pub const KEY_ID_LEN: usize = 12;
pub const SECRET_LEN: usize = 32;
pub const CHECK_LEN: usize = 6;
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
        Self::assemble(
            brand,
            environment,
            KeyId::generate(),
            &random_base62(SECRET_LEN),
        )
    }

    /// The key with id `key_id` whose secret is expanded from `seed` (32 pseudorandom bytes, an
    /// HMAC output) instead of drawn from the OS: the same inputs always give the same key. A
    /// retried request gets the secret of its first answer this way, without it being stored.
    pub fn derived(
        brand: &Brand,
        environment: Environment,
        key_id: KeyId,
        seed: &[u8; SEED_LEN],
    ) -> Self {
        Self::assemble(
            brand,
            environment,
            key_id,
            &expanded_base62(seed, SECRET_LEN),
        )
    }

    /// `<brand>_<env>_<id><secret><check>`.
    fn assemble(brand: &Brand, environment: Environment, key_id: KeyId, secret: &str) -> Self {
        let prefix = public_prefix(brand.as_str(), environment, &key_id);
        let mut plaintext = String::with_capacity(prefix.len() + SECRET_LEN + CHECK_LEN);
        plaintext.push_str(&prefix);
        plaintext.push_str(secret);
        let check = checksum(plaintext.as_bytes());
        plaintext.push_str(&check);
        Self {
            key_id,
            prefix,
            plaintext,
        }
    }
}

/// The length of the seed `GeneratedKey::derived` expands: an HMAC-SHA256 output.
pub const SEED_LEN: usize = 32;

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
        // The two slices below are safe because of the check above, and only because of it: the
        // text ends with a body of exactly 50 ASCII bytes. (The property tests fail without it.)
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
    let mut out = String::with_capacity(len);
    let mut buf = [0u8; 64];
    while out.len() < len {
        getrandom::fill(&mut buf).expect("the OS random number generator failed");
        push_base62(&mut out, &buf, len);
    }
    out
}

/// `len` base62 characters from the stream HMAC-SHA256(seed, label ‖ 0), HMAC-SHA256(seed,
/// label ‖ 1), … (a counter-mode expansion, as HKDF-Expand does), sampled as `random_base62`
/// samples the OS's bytes. Two secrets in three need part of a second block.
fn expanded_base62(seed: &[u8; SEED_LEN], len: usize) -> String {
    const LABEL: &[u8] = b"key-authority derived secret v1";
    let mut out = String::with_capacity(len);
    let mut counter: u32 = 0;
    while out.len() < len {
        let mut block = <Hmac<Sha256> as KeyInit>::new_from_slice(seed)
            .expect("HMAC takes a key of any length");
        block.update(LABEL);
        block.update(&counter.to_be_bytes());
        push_base62(&mut out, &block.finalize().into_bytes(), len);
        counter += 1;
    }
    out
}

/// Appends base62 characters for `bytes` to `out` until it holds `len`. Rejection sampling keeps
/// every character uniform: bytes from 248 (= 4 * 62) up are skipped.
fn push_base62(out: &mut String, bytes: &[u8], len: usize) {
    for &byte in bytes {
        if out.len() == len {
            return;
        }
        if byte < 248 {
            out.push(BASE62[(byte % 62) as usize] as char);
        }
    }
}

/// The CRC32 of `data` as 6 base62 digits (62^6 > 2^32), most significant first. Public for
/// tools that craft keys of the right shape (the load generator's wrong secrets).
pub fn checksum(data: &[u8]) -> String {
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

    fn seed(byte: u8) -> [u8; SEED_LEN] {
        [byte; SEED_LEN]
    }

    #[test]
    fn derived_keys_are_deterministic() {
        let key_id = KeyId::parse("abcdefghijkl").unwrap();
        let first = GeneratedKey::derived(&brand(), Environment::Live, key_id.clone(), &seed(7));
        let again = GeneratedKey::derived(&brand(), Environment::Live, key_id.clone(), &seed(7));
        assert_eq!(first.plaintext, again.plaintext);
        assert_eq!(first.key_id, key_id);
        assert_eq!(first.prefix, "ka_live_abcdefghijkl");
        // Any other seed gives another secret.
        let other = GeneratedKey::derived(&brand(), Environment::Live, key_id, &seed(8));
        assert_ne!(
            first.plaintext[first.prefix.len()..],
            other.plaintext[other.prefix.len()..]
        );
    }

    #[test]
    fn derived_keys_have_the_documented_shape_and_parse_back() {
        for (index, environment) in [
            Environment::Live,
            Environment::Test,
            Environment::Dev,
            Environment::Trial,
        ]
        .into_iter()
        .enumerate()
        {
            let key_id = KeyId::generate();
            let key =
                GeneratedKey::derived(&brand(), environment, key_id.clone(), &seed(index as u8));
            let body = key
                .plaintext
                .strip_prefix(&format!("ka_{}_", environment.as_str()))
                .unwrap();
            assert_eq!(body.len(), KEY_ID_LEN + SECRET_LEN + CHECK_LEN);
            assert!(body.bytes().all(is_base62));
            // The checksum is valid: the key parses, into its own id and environment.
            let parsed = PresentedKey::parse(&key.plaintext).expect("a derived key parses");
            assert_eq!(parsed.key_id(), key_id.as_str());
            assert_eq!(parsed.environment(), environment);
            assert!(key.plaintext.starts_with(&key.prefix));
        }
    }

    #[test]
    fn a_derived_secret_is_known_for_a_known_seed() {
        // Pins the expansion: a change to it would give every replayed request within the
        // window a secret that does not verify.
        let key = GeneratedKey::derived(
            &brand(),
            Environment::Test,
            KeyId::parse("000000000000").unwrap(),
            &seed(0),
        );
        assert_eq!(key.plaintext, PINNED_DERIVED_KEY);
    }

    /// `a_derived_secret_is_known_for_a_known_seed`'s answer, computed apart from this code
    /// (Python's `hmac`, `zlib.crc32` and the same sampling).
    const PINNED_DERIVED_KEY: &str = "ka_test_0000000000001wIAn63JSsrzjxyz8cAA2scw6cKPn8Hb0mgPYv";

    #[test]
    fn expansion_continues_past_rejected_bytes() {
        // Two seeds in three need a second block (P(no byte of 32 rejected) = (248/256)^32);
        // every secret still has exactly 32 base62 characters.
        for byte in 0..=255u8 {
            let secret = expanded_base62(&seed(byte), SECRET_LEN);
            assert_eq!(secret.len(), SECRET_LEN);
            assert!(secret.bytes().all(is_base62));
        }
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

/// Property tests of the key parser: any text in, no panic, and either refused or parsed into a
/// key that is exactly its parts put back together.
#[cfg(test)]
mod properties {
    use proptest::prelude::*;

    use super::*;

    /// Modest: two cores are shared by every test of the workspace.
    const CASES: u32 = 512;

    const ENVIRONMENTS: [Environment; 4] = [
        Environment::Live,
        Environment::Test,
        Environment::Dev,
        Environment::Trial,
    ];

    /// A well-formed key from the strategy's parts. (GeneratedKey draws its parts from the OS,
    /// which proptest could neither shrink nor replay.)
    fn key_text(brand: &str, environment: Environment, id_and_secret: &str) -> String {
        let mut text = format!("{brand}_{}_{id_and_secret}", environment.as_str());
        let check = checksum(text.as_bytes());
        text.push_str(&check);
        text
    }

    /// If `text` parses, it is its parts put back together: the brand, the environment, the key
    /// id (a valid `KeyId`), the secret and a checksum that matches.
    fn assert_refused_or_round_trips(text: &str) {
        let Some(parsed) = PresentedKey::parse(text) else {
            return;
        };
        assert_eq!(parsed.expose_secret(), text);
        let (brand, _) = text.split_once('_').expect("a parsed key has a brand");
        assert!(Brand::parse(brand).is_ok(), "brand {brand:?}");
        let key_id = KeyId::parse(parsed.key_id()).expect("the key id is a KeyId");
        let prefix = public_prefix(brand, parsed.environment(), &key_id);
        let rest = text
            .strip_prefix(&prefix)
            .expect("the key starts with its public prefix");
        assert_eq!(rest.len(), SECRET_LEN + CHECK_LEN);
        let secret = rest.get(..SECRET_LEN).expect("the secret is ASCII");
        assert!(secret.bytes().all(is_base62));
        let rebuilt = format!("{prefix}{secret}");
        assert_eq!(key_text_from(&rebuilt), text);
    }

    fn key_text_from(checked: &str) -> String {
        format!("{checked}{}", checksum(checked.as_bytes()))
    }

    fn environment() -> impl Strategy<Value = Environment> {
        prop::sample::select(ENVIRONMENTS.to_vec())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(CASES))]

        #[test]
        fn any_text_is_refused_or_round_trips(text in any::<String>()) {
            assert_refused_or_round_trips(&text);
        }

        /// Text shaped almost like a key (a plausible brand and environment, a body of about
        /// the right length with a few stray characters), where a parser's slicing would break.
        #[test]
        fn key_like_text_is_refused_or_round_trips(
            text in "[a-z0-9_]{0,18}_(live|test|dev|trial|prod|)_[0-9A-Za-z_é🔑\u{0}\u{200f}]{0,56}",
        ) {
            assert_refused_or_round_trips(&text);
        }

        /// Any text with its valid checksum appended: only the shape rules stand between it
        /// and a parse, so a missing check (or a slice that trusts one) shows up here. Random
        /// text alone almost never carries a matching CRC.
        #[test]
        fn checksummed_text_is_refused_or_round_trips(
            checked in "[a-z0-9_]{0,18}_(live|test|dev|trial|prod|)_[0-9A-Za-z_é🔑\u{0}]{0,56}",
        ) {
            assert_refused_or_round_trips(&key_text_from(&checked));
        }

        /// The same with every part near its rule: brands of 0 to 20 characters, environments
        /// real and not, bodies of 38 to 50 base62 characters (44 before the checksum is right),
        /// and the answer predicted from the documented shape.
        #[test]
        fn checksummed_near_keys_are_refused_or_round_trip(
            // Mostly lowercase, so that over-long brands of a valid alphabet come up often.
            brand in "[a-z0-9]{0,20}|[a-zA-Z0-9]{1,4}",
            environment in "live|test|dev|trial|prod|Live|",
            // Half of them exactly the right length.
            id_and_secret in "[0-9A-Za-z]{44}|[0-9A-Za-z]{38,50}",
        ) {
            let text = key_text_from(&format!("{brand}_{environment}_{id_and_secret}"));
            let shaped = (1..=MAX_BRAND_LEN).contains(&brand.len())
                && brand.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
                && Environment::from_key_text(&environment).is_some()
                && id_and_secret.len() == KEY_ID_LEN + SECRET_LEN;
            prop_assert_eq!(PresentedKey::parse(&text).is_some(), shaped, "{:?}", text);
            assert_refused_or_round_trips(&text);
        }

        #[test]
        fn any_checksummed_text_is_refused_or_round_trips(checked in any::<String>()) {
            assert_refused_or_round_trips(&key_text_from(&checked));
        }

        #[test]
        fn well_formed_keys_parse_into_their_parts(
            brand in "[a-z0-9]{1,16}",
            environment in environment(),
            id_and_secret in "[0-9A-Za-z]{44}",
        ) {
            let text = key_text(&brand, environment, &id_and_secret);
            let parsed = PresentedKey::parse(&text).expect("a well-formed key parses");
            prop_assert_eq!(parsed.environment(), environment);
            prop_assert_eq!(parsed.key_id(), &id_and_secret[..KEY_ID_LEN]);
            assert_refused_or_round_trips(&text);
        }

        /// Any one character replaced by any other (of any width, control characters included)
        /// is refused: the alphabet, the shape or the CRC32 catches it.
        #[test]
        fn any_one_substitution_is_refused(
            brand in "[a-z0-9]{1,16}",
            environment in environment(),
            id_and_secret in "[0-9A-Za-z]{44}",
            position in any::<prop::sample::Index>(),
            replacement in any::<char>(),
        ) {
            let text = key_text(&brand, environment, &id_and_secret);
            let mut chars: Vec<char> = text.chars().collect();
            let index = position.index(chars.len());
            prop_assume!(chars[index] != replacement);
            chars[index] = replacement;
            let changed: String = chars.into_iter().collect();
            prop_assert!(PresentedKey::parse(&changed).is_none(), "{:?} parsed", changed);
        }

        /// A well-formed key with anything before or after it is refused, never cut to fit.
        #[test]
        fn anything_around_a_key_is_refused(
            brand in "[a-z0-9]{1,16}",
            environment in environment(),
            id_and_secret in "[0-9A-Za-z]{44}",
            before in ".{0,3}",
            after in ".{1,3}",
        ) {
            let text = format!("{before}{}{after}", key_text(&brand, environment, &id_and_secret));
            prop_assert!(PresentedKey::parse(&text).is_none(), "{:?} parsed", text);
        }
    }
}
