//! Secrets that must never reach a log line, an error message or `Debug` output.

use std::fmt;
use std::sync::Arc;

/// An Access secret or token. `Debug` and `Display` print `<redacted>`; the only
/// way to the bytes is [`Secret::expose`], which keeps every use easy to grep.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Arc<str>);

impl Secret {
    pub fn new(value: impl Into<Arc<str>>) -> Self {
        Self(value.into())
    }

    /// The secret's bytes, for signing or verifying only.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
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
}
