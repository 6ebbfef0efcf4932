//! Where a gateway request carries its key: the configured header (`x-api-key` by default), else
//! `Authorization: Bearer <key>`, a bare key in `Authorization`, or HTTP Basic with the key as the
//! user name and no password (the form curl's `-u key:` sends). The key header comes first: it
//! is there for nothing but the key, while an API may use `Authorization` for its users' own
//! tokens beside it.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;

/// A presented key, borrowed from a header or decoded from Basic credentials.
#[derive(Debug, PartialEq, Eq)]
pub enum PresentedText<'a> {
    Borrowed(&'a str),
    Decoded(String),
}

impl PresentedText<'_> {
    pub fn as_str(&self) -> &str {
        match self {
            Self::Borrowed(text) => text,
            Self::Decoded(text) => text,
        }
    }
}

/// The key a request presents, if any. `authorization` and `api_key` are the raw header values
/// (None when absent). A header that is present but holds no usable key counts as absent only
/// when it is empty or uses another auth scheme with a password; anything else is presented as
/// it is and refused by the verifier, so a mangled key is "invalid", not "missing".
pub fn presented_key<'a>(
    authorization: Option<&'a [u8]>,
    api_key: Option<&'a [u8]>,
) -> Option<PresentedText<'a>> {
    api_key
        .and_then(bare)
        .or_else(|| authorization.and_then(from_authorization))
}

fn from_authorization(value: &[u8]) -> Option<PresentedText<'_>> {
    let value = text(value)?;
    let Some((scheme, credentials)) = value.split_once(' ') else {
        // A scheme with nothing after it presents nothing; otherwise this is the bare key.
        let scheme_only = ["bearer", "basic"]
            .iter()
            .any(|scheme| value.eq_ignore_ascii_case(scheme));
        return (!scheme_only).then_some(PresentedText::Borrowed(value));
    };
    let credentials = credentials.trim_start();
    if scheme.eq_ignore_ascii_case("bearer") {
        return (!credentials.is_empty()).then_some(PresentedText::Borrowed(credentials));
    }
    if scheme.eq_ignore_ascii_case("basic") {
        let decoded = STANDARD.decode(credentials).ok()?;
        let decoded = String::from_utf8(decoded).ok()?;
        let (user, password) = decoded.split_once(':')?;
        return (!user.is_empty() && password.is_empty())
            .then(|| PresentedText::Decoded(user.to_owned()));
    }
    // Another scheme (Digest, a signature scheme): not ours; look for the key header instead.
    None
}

fn bare(value: &[u8]) -> Option<PresentedText<'_>> {
    text(value).map(PresentedText::Borrowed)
}

/// A header value as text, trimmed; None when empty. Bytes that are not UTF-8 are kept as a
/// replacement character so the verifier refuses them as malformed.
fn text(value: &[u8]) -> Option<&str> {
    // Not UTF-8: no key of ours; a sentinel the verifier refuses as malformed.
    let text = std::str::from_utf8(value).unwrap_or("\u{fffd}");
    let text = text.trim();
    (!text.is_empty()).then_some(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(authorization: Option<&str>, api_key: Option<&str>) -> Option<String> {
        presented_key(authorization.map(str::as_bytes), api_key.map(str::as_bytes))
            .map(|presented| presented.as_str().to_owned())
    }

    #[test]
    fn every_place_a_key_can_be() {
        let k = "ka_live_3kF9aQ2mX7pL_secret";
        assert_eq!(key(Some(&format!("Bearer {k}")), None).as_deref(), Some(k));
        assert_eq!(
            key(Some(&format!("bearer   {k} ")), None).as_deref(),
            Some(k)
        );
        assert_eq!(key(Some(k), None).as_deref(), Some(k));
        assert_eq!(key(None, Some(k)).as_deref(), Some(k));
        let basic = format!("Basic {}", STANDARD.encode(format!("{k}:")));
        assert_eq!(key(Some(&basic), None).as_deref(), Some(k));
        // The key header wins: Authorization may hold the API's own user token beside it.
        assert_eq!(
            key(Some("Bearer eyJhbGciOiJIUzI1NiJ9.e30.x"), Some(k)).as_deref(),
            Some(k)
        );
        assert_eq!(key(Some(k), Some("  ")).as_deref(), Some(k));
    }

    #[test]
    fn absent_or_foreign_credentials_are_missing() {
        assert_eq!(key(None, None), None);
        assert_eq!(key(Some(""), Some("  ")), None);
        assert_eq!(key(Some("Bearer "), None), None);
        let with_password = format!("Basic {}", STANDARD.encode("user:password"));
        assert_eq!(key(Some(&with_password), None), None);
        assert_eq!(key(Some("Basic !!!"), None), None);
        assert_eq!(key(Some("Digest username=x"), None), None);
        // Another scheme, but a key header: the key header's key.
        assert_eq!(
            key(Some("Digest username=x"), Some("k")).as_deref(),
            Some("k")
        );
    }

    #[test]
    fn bytes_that_are_not_text_are_presented_to_be_refused() {
        let presented = presented_key(Some(&[0xff, 0xfe]), None).unwrap();
        assert_eq!(presented.as_str(), "\u{fffd}");
    }
}
