//! Validated values that describe a key. Each parser names the rule it enforces, so that the gRPC
//! layer can answer INVALID_ARGUMENT with the field and the reason.

use std::collections::BTreeMap;

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

/// A workspace identifier: 1 to 128 ASCII letters, digits, `-`, `_` and `.`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct WorkspaceId(String);

impl WorkspaceId {
    pub fn parse(text: &str) -> Result<Self, Invalid> {
        if text.is_empty() {
            return Err("is required".to_owned());
        }
        if text.len() > MAX_WORKSPACE_ID_LEN {
            return Err(format!("must be at most {MAX_WORKSPACE_ID_LEN} characters"));
        }
        let allowed = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.');
        if !text.bytes().all(allowed) {
            return Err("may contain only ASCII letters, digits, '-', '_' and '.'".to_owned());
        }
        Ok(Self(text.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A key's name: 1 to 128 characters, no control characters.
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
        if text.chars().any(char::is_control) {
            return Err("must not contain control characters".to_owned());
        }
        Ok(Self(text.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A key's description: up to 1024 characters.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct KeyDescription(String);

impl KeyDescription {
    pub fn parse(text: &str) -> Result<Self, Invalid> {
        if text.chars().count() > MAX_DESCRIPTION_CHARS {
            return Err(format!(
                "must be at most {MAX_DESCRIPTION_CHARS} characters"
            ));
        }
        Ok(Self(text.to_owned()))
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
        if text.is_empty() || text.len() > MAX_SCOPE_LEN {
            return Err(format!(
                "each scope must be 1 to {MAX_SCOPE_LEN} characters"
            ));
        }
        let allowed = |b: u8| {
            b.is_ascii_alphanumeric() || matches!(b, b':' | b'.' | b'_' | b'-' | b'/' | b'*')
        };
        if !text.bytes().all(allowed) {
            return Err(format!(
                "scope {text:?} may contain only ASCII letters, digits and ':._-/*'"
            ));
        }
        Ok(Self(text.to_owned()))
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

    /// Scopes read back from the database, trusted as written.
    pub fn from_stored(scopes: Vec<String>) -> Self {
        Self(scopes)
    }

    pub fn as_slice(&self) -> &[String] {
        &self.0
    }

    /// True when these scopes grant every one of `required`.
    pub fn grant_all<S: AsRef<str>>(&self, required: &[S]) -> bool {
        if self.0.is_empty() || self.0.iter().any(|scope| scope == FULL_ACCESS_SCOPE) {
            return true;
        }
        required.iter().all(|needed| {
            self.0
                .binary_search_by(|s| s.as_str().cmp(needed.as_ref()))
                .is_ok()
        })
    }
}

/// Free-form labels: at most 32 entries, keys 1 to 64 characters, values up to 512.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Metadata(BTreeMap<String, String>);

impl Metadata {
    pub fn parse<'a>(
        entries: impl IntoIterator<Item = (&'a String, &'a String)>,
    ) -> Result<Self, Invalid> {
        let mut map = BTreeMap::new();
        for (key, value) in entries {
            if key.is_empty() || key.chars().count() > MAX_METADATA_KEY_CHARS {
                return Err(format!(
                    "keys must be 1 to {MAX_METADATA_KEY_CHARS} characters"
                ));
            }
            if value.chars().count() > MAX_METADATA_VALUE_CHARS {
                return Err(format!(
                    "value of {key:?} must be at most {MAX_METADATA_VALUE_CHARS} characters"
                ));
            }
            map.insert(key.clone(), value.clone());
            if map.len() > MAX_METADATA_ENTRIES {
                return Err(format!(
                    "at most {MAX_METADATA_ENTRIES} entries are allowed"
                ));
            }
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
