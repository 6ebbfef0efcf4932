//! Validated values that describe a key. Each parser names the rule it enforces, so that the gRPC
//! layer can answer INVALID_ARGUMENT with the field and the reason.
//!
//! Text rules, decided here once for every field:
//! - Lengths count characters (Unicode scalar values, Rust `char`s), never bytes: "é" and "🔑"
//!   are one character each, as the proto documentation says.
//! - Identifiers (workspace ids, scopes) are ASCII from a small alphabet, so they hold no control
//!   characters, no spaces and nothing that looks like something else.
//! - Single-line text (key names, metadata keys) holds no control character at all
//!   (`char::is_control`: C0 U+0000–U+001F, DEL U+007F, C1 U+0080–U+009F).
//! - Multi-line text (descriptions, metadata values) may hold tab, line feed and carriage return,
//!   the control characters of ordinary text (a browser form submits a textarea's line breaks as
//!   CR LF), and no other.
//!
//! Everything else is accepted as text, format characters included (right-to-left marks,
//! zero-width joiners inside emoji, bidi overrides): right-to-left names need them, and showing
//! text safely is the display's job. NUL in particular never gets past these parsers, so what is
//! stored is the same on SQLite and PostgreSQL (whose `text` cannot hold NUL at all).

use std::collections::BTreeMap;

use crate::error::excerpt;

/// Why a value was refused: the rule it broke, in words a caller can act on.
pub type Invalid = String;

const MAX_WORKSPACE_ID_LEN: usize = 128;
const MAX_NAME_CHARS: usize = 128;
const MAX_DESCRIPTION_CHARS: usize = 1024;
const MAX_SCOPES: usize = 64;
const MAX_SCOPE_LEN: usize = 128;
const MAX_METADATA_ENTRIES: usize = 32;
const MAX_METADATA_KEY_CHARS: usize = 64;
const MAX_METADATA_VALUE_CHARS: usize = 512;

/// The scope that passes every scope check.
pub const FULL_ACCESS_SCOPE: &str = "full_access";

/// Refuses single-line text holding any control character.
fn refuse_control_characters(text: &str) -> Result<(), Invalid> {
    match find_char(text, char::is_control) {
        None => Ok(()),
        Some((position, found)) => Err(format!(
            "must not contain control characters (U+{:04X} at character {position})",
            u32::from(found)
        )),
    }
}

/// Refuses multi-line text holding a control character other than tab, line feed and carriage
/// return.
fn refuse_control_characters_but_line_breaks(text: &str) -> Result<(), Invalid> {
    let forbidden = |c: char| c.is_control() && !matches!(c, '\t' | '\n' | '\r');
    match find_char(text, forbidden) {
        None => Ok(()),
        Some((position, found)) => Err(format!(
            "must not contain control characters other than tab, line feed and carriage return \
             (U+{:04X} at character {position})",
            u32::from(found)
        )),
    }
}

/// The first character matching `predicate`, with its 1-based position in characters.
fn find_char(text: &str, predicate: impl Fn(char) -> bool) -> Option<(usize, char)> {
    text.chars()
        .enumerate()
        .find(|(_, c)| predicate(*c))
        .map(|(index, c)| (index + 1, c))
}

/// A workspace identifier: 1 to 128 ASCII letters, digits, `-`, `_` and `.`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct WorkspaceId(String);

impl WorkspaceId {
    pub fn parse(text: &str) -> Result<Self, Invalid> {
        if text.is_empty() {
            return Err("is required".to_owned());
        }
        // The alphabet first: once the text is known to be ASCII, bytes are characters.
        let allowed = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.');
        if !text.bytes().all(allowed) {
            return Err("may contain only ASCII letters, digits, '-', '_' and '.'".to_owned());
        }
        if text.len() > MAX_WORKSPACE_ID_LEN {
            return Err(format!("must be at most {MAX_WORKSPACE_ID_LEN} characters"));
        }
        Ok(Self(text.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A key's name: 1 to 128 characters, not only whitespace, no control characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyName(String);

impl KeyName {
    pub fn parse(text: &str) -> Result<Self, Invalid> {
        if text.trim().is_empty() {
            return Err("is required".to_owned());
        }
        if text.chars().count() > MAX_NAME_CHARS {
            return Err(format!("must be at most {MAX_NAME_CHARS} characters"));
        }
        refuse_control_characters(text)?;
        Ok(Self(text.to_owned()))
    }

    /// A name read back from the database, trusted as written: the text rules have tightened
    /// since the first keys were stored, and an old key must stay readable.
    pub fn from_stored(text: String) -> Self {
        Self(text)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A key's description: up to 1024 characters; tab, line feed and carriage return are the only
/// control characters allowed.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct KeyDescription(String);

impl KeyDescription {
    pub fn parse(text: &str) -> Result<Self, Invalid> {
        if text.chars().count() > MAX_DESCRIPTION_CHARS {
            return Err(format!(
                "must be at most {MAX_DESCRIPTION_CHARS} characters"
            ));
        }
        refuse_control_characters_but_line_breaks(text)?;
        Ok(Self(text.to_owned()))
    }

    /// A description read back from the database, trusted as written (see
    /// `KeyName::from_stored`).
    pub fn from_stored(text: String) -> Self {
        Self(text)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// One scope: 1 to 128 ASCII letters, digits and `:._-/*`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Scope(String);

impl Scope {
    pub fn parse(text: &str) -> Result<Self, Invalid> {
        Self::check(text)?;
        Ok(Self(text.to_owned()))
    }

    /// The same rule as [`Scope::parse`] without allocating, for VerifyKey's hot path.
    pub fn check(text: &str) -> Result<(), Invalid> {
        let allowed = |b: u8| {
            b.is_ascii_alphanumeric() || matches!(b, b':' | b'.' | b'_' | b'-' | b'/' | b'*')
        };
        // The alphabet before the length: once the text is known to be ASCII, bytes are
        // characters. The scope is quoted cut short, so the answer stays small.
        if !text.bytes().all(allowed) {
            return Err(format!(
                "scope {} may contain only ASCII letters, digits and ':._-/*'",
                excerpt(text)
            ));
        }
        if text.is_empty() || text.len() > MAX_SCOPE_LEN {
            return Err(format!(
                "each scope must be 1 to {MAX_SCOPE_LEN} characters"
            ));
        }
        Ok(())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}
/// The scopes a key grants, sorted and without duplicates. Empty means full access.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Scopes(Vec<String>);

impl Scopes {
    pub fn parse<S: AsRef<str>>(items: &[S]) -> Result<Self, Invalid> {
        if items.len() > MAX_SCOPES {
            return Err(format!("at most {MAX_SCOPES} scopes are allowed"));
        }
        let mut scopes = items
            .iter()
            .map(|item| Scope::parse(item.as_ref()).map(|scope| scope.0))
            .collect::<Result<Vec<_>, _>>()?;
        scopes.sort();
        scopes.dedup();
        Ok(Self(scopes))
    }

    /// Checks the scopes a VerifyKey call requires, by the same rules as a key's, without
    /// allocating (the hot path): a required scope no key could hold is the caller's bug.
    pub fn check_required<S: AsRef<str>>(items: &[S]) -> Result<(), Invalid> {
        if items.len() > MAX_SCOPES {
            return Err(format!("at most {MAX_SCOPES} scopes are allowed"));
        }
        items
            .iter()
            .try_for_each(|item| Scope::check(item.as_ref()))
    }

    /// Scopes read back from the database, trusted as written.
    pub fn from_stored(scopes: Vec<String>) -> Self {
        Self(scopes)
    }

    pub fn as_slice(&self) -> &[String] {
        &self.0
    }

    /// True when these scopes grant everything: none, or `full_access`.
    pub fn is_full_access(&self) -> bool {
        self.0.is_empty() || self.0.iter().any(|scope| scope == FULL_ACCESS_SCOPE)
    }

    /// True when these scopes grant nothing that `other` does not: the same, or narrower.
    pub fn within(&self, other: &Scopes) -> bool {
        other.is_full_access() || (!self.is_full_access() && other.grant_all(&self.0))
    }

    /// True when these scopes grant every one of `required`.
    pub fn grant_all<S: AsRef<str>>(&self, required: &[S]) -> bool {
        if self.is_full_access() {
            return true;
        }
        required.iter().all(|needed| {
            self.0
                .binary_search_by(|s| s.as_str().cmp(needed.as_ref()))
                .is_ok()
        })
    }
}

/// Free-form labels: at most 32 entries; keys 1 to 64 characters without control characters;
/// values up to 512 characters, where tab, line feed and carriage return are the only control
/// characters allowed.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Metadata(BTreeMap<String, String>);

impl Metadata {
    pub fn parse<'a>(
        entries: impl IntoIterator<Item = (&'a String, &'a String)>,
    ) -> Result<Self, Invalid> {
        let mut entries: Vec<_> = entries.into_iter().collect();
        if entries.len() > MAX_METADATA_ENTRIES {
            return Err(format!(
                "at most {MAX_METADATA_ENTRIES} entries are allowed"
            ));
        }
        // In key order, so that a request with several bad entries always gets the same answer
        // (a protobuf map arrives in no particular order).
        entries.sort_unstable();
        let mut map = BTreeMap::new();
        for (key, value) in entries {
            if key.is_empty() || key.chars().count() > MAX_METADATA_KEY_CHARS {
                return Err(format!(
                    "keys must be 1 to {MAX_METADATA_KEY_CHARS} characters"
                ));
            }
            refuse_control_characters(key).map_err(|reason| format!("key {reason}"))?;
            // The key is short and free of control characters by now: safe to quote.
            if value.chars().count() > MAX_METADATA_VALUE_CHARS {
                return Err(format!(
                    "value of {key:?} must be at most {MAX_METADATA_VALUE_CHARS} characters"
                ));
            }
            refuse_control_characters_but_line_breaks(value)
                .map_err(|reason| format!("value of {key:?} {reason}"))?;
            map.insert(key.clone(), value.clone());
        }
        Ok(Self(map))
    }

    pub fn from_stored(map: BTreeMap<String, String>) -> Self {
        Self(map)
    }

    pub fn as_map(&self) -> &BTreeMap<String, String> {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workspace_ids() {
        assert!(WorkspaceId::parse("acme-prod.eu_1").is_ok());
        assert_eq!(WorkspaceId::parse("").unwrap_err(), "is required");
        assert!(WorkspaceId::parse("a b").is_err());
        assert!(WorkspaceId::parse(&"w".repeat(129)).is_err());
        assert!(WorkspaceId::parse(&"w".repeat(128)).is_ok());
    }

    #[test]
    fn names() {
        assert!(KeyName::parse("ci deploy key").is_ok());
        assert_eq!(KeyName::parse("").unwrap_err(), "is required");
        assert_eq!(KeyName::parse("   ").unwrap_err(), "is required");
        assert!(KeyName::parse(&"é".repeat(128)).is_ok());
        assert!(KeyName::parse(&"é".repeat(129)).is_err());
        assert!(KeyName::parse("a\nb").is_err());
    }

    #[test]
    fn lengths_count_characters_not_bytes() {
        // One character of each UTF-8 width, at the limit and one past it.
        for wide in ["a", "é", "€", "🔑"] {
            assert!(KeyName::parse(&wide.repeat(128)).is_ok(), "{wide}");
            assert!(KeyName::parse(&wide.repeat(129)).is_err(), "{wide}");
            assert!(KeyDescription::parse(&wide.repeat(1024)).is_ok(), "{wide}");
            assert!(KeyDescription::parse(&wide.repeat(1025)).is_err(), "{wide}");
            let key: BTreeMap<String, String> = [(wide.repeat(64), wide.repeat(512))].into();
            assert!(Metadata::parse(&key).is_ok(), "{wide}");
            let key: BTreeMap<String, String> = [(wide.repeat(65), String::new())].into();
            assert!(Metadata::parse(&key).is_err(), "{wide}");
            let value: BTreeMap<String, String> = [("k".to_owned(), wide.repeat(513))].into();
            assert!(Metadata::parse(&value).is_err(), "{wide}");
        }
    }

    #[test]
    fn identifiers_refuse_non_ascii_for_what_it_is_not_for_its_length() {
        // 64 two-byte characters: 128 bytes, within the length; the alphabet is what is wrong.
        let reason = WorkspaceId::parse(&"é".repeat(64)).unwrap_err();
        assert!(reason.contains("ASCII"), "{reason}");
        let reason = WorkspaceId::parse(&"é".repeat(65)).unwrap_err();
        assert!(reason.contains("ASCII"), "{reason}");
        let reason = Scope::parse(&"é".repeat(65)).unwrap_err();
        assert!(reason.contains("ASCII"), "{reason}");
        assert!(Scope::parse(&"s".repeat(128)).is_ok());
        assert!(Scope::parse(&"s".repeat(129)).is_err());
    }

    #[test]
    fn single_line_text_refuses_every_control_character() {
        for control in [
            '\0', '\u{1}', '\t', '\n', '\r', '\u{1b}', '\u{7f}', '\u{85}', '\u{9f}',
        ] {
            let text = format!("a{control}b");
            assert!(KeyName::parse(&text).is_err(), "{text:?}");
            let key: BTreeMap<String, String> = [(text.clone(), String::new())].into();
            assert!(Metadata::parse(&key).is_err(), "{text:?}");
            assert!(WorkspaceId::parse(&text).is_err(), "{text:?}");
            assert!(Scope::parse(&text).is_err(), "{text:?}");
        }
        let reason = KeyName::parse("ab\0").unwrap_err();
        assert_eq!(
            reason,
            "must not contain control characters (U+0000 at character 3)"
        );
    }

    #[test]
    fn multi_line_text_allows_only_tab_and_line_breaks() {
        for allowed in ["a\tb", "a\nb", "a\r\nb", "a\rb"] {
            assert!(KeyDescription::parse(allowed).is_ok(), "{allowed:?}");
            let value: BTreeMap<String, String> = [("k".to_owned(), allowed.to_owned())].into();
            assert!(Metadata::parse(&value).is_ok(), "{allowed:?}");
        }
        for refused in [
            "a\0b",
            "a\u{1}b",
            "\u{1b}[31m",
            "a\u{7f}",
            "a\u{85}b",
            "\u{c}",
        ] {
            assert!(KeyDescription::parse(refused).is_err(), "{refused:?}");
            let value: BTreeMap<String, String> = [("k".to_owned(), refused.to_owned())].into();
            let reason = Metadata::parse(&value).unwrap_err();
            assert!(reason.starts_with("value of \"k\""), "{reason}");
        }
    }

    #[test]
    fn format_characters_are_text() {
        // Right-to-left marks, a bidi override, emoji with zero-width joiners, a BOM and a
        // noncharacter: none is a control character (`char::is_control`), all are kept.
        for text in [
            "\u{200f}مفتاح\u{200e}",
            "abc\u{202e}def",
            "👨\u{200d}👩\u{200d}👧",
            "\u{feff}x",
            "x\u{ffff}",
        ] {
            assert!(KeyName::parse(text).is_ok(), "{text:?}");
            assert!(KeyDescription::parse(text).is_ok(), "{text:?}");
        }
    }

    #[test]
    fn refusals_quote_at_most_a_short_excerpt() {
        let reason = Scope::parse(&"é".repeat(10_000)).unwrap_err();
        assert!(reason.len() < 200, "{reason}");
    }

    #[test]
    fn metadata_refusals_do_not_depend_on_map_order() {
        let bad: std::collections::HashMap<String, String> = [
            ("b".to_owned(), "\0".to_owned()),
            ("a".to_owned(), "\u{1}".to_owned()),
            ("c".to_owned(), "\u{2}".to_owned()),
        ]
        .into();
        let reason = Metadata::parse(&bad).unwrap_err();
        assert!(reason.starts_with("value of \"a\""), "{reason}");
    }

    #[test]
    fn scopes_sort_dedupe_and_check() {
        let scopes = Scopes::parse(&["write", "read", "read"]).unwrap();
        assert_eq!(scopes.as_slice(), ["read", "write"]);
        assert!(scopes.grant_all(&["read"]));
        assert!(scopes.grant_all(&["read", "write"]));
        assert!(!scopes.grant_all(&["admin"]));
        assert!(scopes.grant_all::<&str>(&[]));
    }

    #[test]
    fn empty_and_full_access_scopes_grant_everything() {
        assert!(Scopes::default().grant_all(&["anything"]));
        let full = Scopes::parse(&["full_access"]).unwrap();
        assert!(full.grant_all(&["anything", "else"]));
    }

    #[test]
    fn bad_scopes() {
        assert!(Scopes::parse(&[""]).is_err());
        assert!(Scopes::parse(&["has space"]).is_err());
        let too_many: Vec<String> = (0..65).map(|i| format!("s{i}")).collect();
        assert!(Scopes::parse(&too_many).is_err());
    }

    #[test]
    fn metadata_limits() {
        let ok: BTreeMap<String, String> = [("team".to_owned(), "payments".to_owned())].into();
        assert!(Metadata::parse(&ok).is_ok());
        let empty_key: BTreeMap<String, String> = [(String::new(), "x".to_owned())].into();
        assert!(Metadata::parse(&empty_key).is_err());
        let long_value: BTreeMap<String, String> = [("k".to_owned(), "v".repeat(513))].into();
        assert!(Metadata::parse(&long_value).is_err());
        let many: BTreeMap<String, String> =
            (0..33).map(|i| (format!("k{i}"), String::new())).collect();
        assert!(Metadata::parse(&many).is_err());
    }
}

/// Property tests: any text in, no panic, and whatever is accepted keeps the documented rule and
/// comes back unchanged.
#[cfg(test)]
mod properties {
    use proptest::prelude::*;

    use super::*;

    fn has_control(text: &str) -> bool {
        text.chars().any(char::is_control)
    }

    fn has_control_but_line_breaks(text: &str) -> bool {
        text.chars()
            .any(|c| c.is_control() && !matches!(c, '\t' | '\n' | '\r'))
    }

    /// Any text, and text near the length limits in characters of every width.
    fn text() -> impl Strategy<Value = String> {
        prop_oneof![
            any::<String>(),
            "[a-z]{0,3}[\\t\\n\\r\\x00\\x1b\\x7f\\u{85}\\u{200f}\\u{202e}]?[a-z]{0,3}",
            "[aé€🔑]{60,70}|[aé€🔑]{120,135}|[aé€🔑]{500,520}|[aé€🔑]{1020,1030}",
            "[a-zA-Z0-9._:/*-]{0,140}",
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn workspace_ids(text in text()) {
            if let Ok(id) = WorkspaceId::parse(&text) {
                prop_assert_eq!(id.as_str(), &text);
                prop_assert!((1..=MAX_WORKSPACE_ID_LEN).contains(&text.chars().count()));
                prop_assert!(text.is_ascii() && !has_control(&text));
            }
        }

        #[test]
        fn names(text in text()) {
            if let Ok(name) = KeyName::parse(&text) {
                prop_assert_eq!(name.as_str(), &text);
                prop_assert!(text.chars().count() <= MAX_NAME_CHARS);
                prop_assert!(!text.trim().is_empty() && !has_control(&text));
            }
        }

        #[test]
        fn descriptions(text in text()) {
            if let Ok(description) = KeyDescription::parse(&text) {
                prop_assert_eq!(description.as_str(), &text);
                prop_assert!(text.chars().count() <= MAX_DESCRIPTION_CHARS);
                prop_assert!(!has_control_but_line_breaks(&text));
            }
        }

        #[test]
        fn scopes(text in text()) {
            let checked = Scope::check(&text);
            let parsed = Scope::parse(&text);
            prop_assert_eq!(checked.is_ok(), parsed.is_ok());
            if let Ok(scope) = parsed {
                prop_assert_eq!(scope.as_str(), &text);
                prop_assert!((1..=MAX_SCOPE_LEN).contains(&text.chars().count()));
                prop_assert!(text.is_ascii() && !has_control(&text));
            }
            // A refusal quotes at most a short excerpt of the scope.
            if let Err(reason) = checked {
                prop_assert!(reason.len() < 300, "{}", reason);
            }
        }

        #[test]
        fn metadata(key in text(), value in text()) {
            let entries: BTreeMap<String, String> = [(key.clone(), value.clone())].into();
            if let Ok(metadata) = Metadata::parse(&entries) {
                prop_assert_eq!(metadata.as_map(), &entries);
                prop_assert!((1..=MAX_METADATA_KEY_CHARS).contains(&key.chars().count()));
                prop_assert!(value.chars().count() <= MAX_METADATA_VALUE_CHARS);
                prop_assert!(!has_control(&key) && !has_control_but_line_breaks(&value));
            }
        }
    }
}
