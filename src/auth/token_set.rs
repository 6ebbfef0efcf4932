//! A set of secret tokens, checked in constant time. Only SHA-256 digests are kept, so every
//! comparison is of 32 bytes whatever the tokens' lengths.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

#[derive(Clone, Default)]
pub struct TokenSet {
    digests: Vec<[u8; 32]>,
}

impl std::fmt::Debug for TokenSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenSet")
            .field("len", &self.digests.len())
            .finish()
    }
}

impl TokenSet {
    pub fn new<S: AsRef<str>>(tokens: &[S]) -> Self {
        Self {
            digests: tokens
                .iter()
                .map(|token| token.as_ref().trim())
                .filter(|token| !token.is_empty())
                .map(|token| Sha256::digest(token.as_bytes()).into())
                .collect(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.digests.is_empty()
    }

    /// True when `token` is one of the set. Compares against every member, without early exit.
    pub fn contains(&self, token: &str) -> bool {
        let presented: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let mut found = subtle::Choice::from(0);
        for digest in &self.digests {
            found |= digest.ct_eq(&presented);
        }
        found.into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn membership() {
        let set = TokenSet::new(&["alpha", " beta ", ""]);
        assert!(set.contains("alpha"));
        assert!(set.contains("beta"));
        assert!(!set.contains(""));
        assert!(!set.contains("alph"));
        assert!(!set.contains("alphaa"));
        assert!(TokenSet::new::<&str>(&[]).is_empty());
    }
}
