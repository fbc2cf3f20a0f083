//! Identifiers the gateway makes up: request ids and nonces.

use rand::Rng;
use rand::distr::Alphanumeric;

/// A 32-character lower-case hex id, shaped like the provider's `requestId`.
pub fn request_id() -> String {
    let n: u128 = rand::rng().random();
    format!("{n:032x}")
}

/// 32 letters and digits for `nonce-str`, drawn from the given (cryptographically
/// secure, in production `rand::rng()`) generator.
pub fn nonce(rng: &mut impl Rng) -> [u8; 32] {
    let mut out = [0u8; 32];
    for (slot, byte) in out.iter_mut().zip(rng.sample_iter(Alphanumeric)) {
        *slot = byte;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nonces_are_32_alphanumerics_and_differ() {
        let mut rng = rand::rng();
        let a = nonce(&mut rng);
        let b = nonce(&mut rng);
        assert!(a.iter().all(u8::is_ascii_alphanumeric));
        assert_ne!(a, b);
    }

    #[test]
    fn request_ids_are_32_hex() {
        let id = request_id();
        assert_eq!(id.len(), 32);
        assert!(id.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_ne!(id, request_id());
    }
}
