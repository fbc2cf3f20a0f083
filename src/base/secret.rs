//! Secrets that must never reach a log line, an error message or `Debug`
//! output, and whose bytes are wiped from memory when the last copy goes
//! (`secrecy`, which zeroizes on drop).

use std::fmt;
use std::sync::Arc;

use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// An Access secret, a token or a URL with a password. `Debug` and
/// `Display` print `<redacted>`; the only way to the bytes is
/// [`Secret::expose`], which keeps every use easy to grep. Clones share one
/// copy of the bytes, wiped when the last clone is dropped.
#[derive(Clone)]
pub struct Secret(Arc<SecretString>);

impl Secret {
    pub fn new(value: impl AsRef<str>) -> Self {
        Self(Arc::new(SecretString::from(value.as_ref())))
    }

    /// The secret's bytes, for signing or verifying only.
    pub fn expose(&self) -> &str {
        self.0.expose_secret()
    }

    /// Whether `presented` is this secret, in time that depends on neither
    /// value: both are hashed, and the digests compared in constant time.
    pub fn matches(&self, presented: &[u8]) -> bool {
        same_digest(&digest(self.expose().as_bytes()), &digest(presented))
    }

    pub fn len(&self) -> usize {
        self.expose().len()
    }

    pub fn is_empty(&self) -> bool {
        self.expose().is_empty()
    }
}

impl PartialEq for Secret {
    fn eq(&self, other: &Secret) -> bool {
        self.matches(other.expose().as_bytes())
    }
}

impl Eq for Secret {}

/// The SHA-256 of a secret, the form it is compared in.
pub fn digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// Whether two digests are equal, in constant time.
pub fn same_digest(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.ct_eq(b).into()
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// A secret that can be replaced while it is in use (rotation): readers get
/// the current value without locking; `Debug` shows nothing.
#[derive(Clone)]
pub struct SecretCell(Arc<arc_swap::ArcSwap<Secret>>);

impl SecretCell {
    pub fn new(secret: Secret) -> Self {
        Self(Arc::new(arc_swap::ArcSwap::from_pointee(secret)))
    }

    /// The current secret.
    pub fn current(&self) -> arc_swap::Guard<Arc<Secret>> {
        self.0.load()
    }

    /// Replaces the secret; returns `false` when it was already this value.
    pub fn replace(&self, secret: Secret) -> bool {
        if **self.0.load() == secret {
            return false;
        }
        self.0.store(Arc::new(secret));
        true
    }
}

impl fmt::Debug for SecretCell {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cell_swaps_its_secret_and_hides_it() {
        let cell = SecretCell::new(Secret::new("old-value"));
        assert!(!cell.replace(Secret::new("old-value")));
        assert!(cell.replace(Secret::new("new-value")));
        assert_eq!(cell.current().expose(), "new-value");
        assert_eq!(format!("{cell:?}"), "<redacted>");
    }

    #[test]
    fn debug_and_display_never_show_the_value() {
        let s = Secret::new("hunter2-very-secret");
        assert_eq!(format!("{s:?}"), "<redacted>");
        assert_eq!(format!("{s}"), "<redacted>");
        assert_eq!(s.expose(), "hunter2-very-secret");
    }

    #[test]
    fn secrets_match_only_their_own_bytes() {
        let s = Secret::new("token-1");
        assert!(s.matches(b"token-1"));
        for other in [&b"token-2"[..], b"token-", b"token-11", b""] {
            assert!(!s.matches(other));
        }
        assert_eq!(s, Secret::new("token-1"));
        assert_ne!(s, Secret::new("token-2"));
    }
}
