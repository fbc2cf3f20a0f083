//! Identifiers the gateway makes up: request ids and nonces.

use rand::Rng;

/// A 32-character lower-case hex id, shaped like the provider's `requestId`.
pub fn request_id() -> String {
    String::from_utf8(request_id_bytes().to_vec()).expect("hex is ASCII")
}

/// [`request_id`] on the stack, for the request path.
pub fn request_id_bytes() -> [u8; 32] {
    let n: u128 = rand::rng().random();
    let mut out = [0u8; 32];
    hex::encode_to_slice(n.to_be_bytes(), &mut out).expect("16 bytes encode to 32");
    out
}

/// 32 letters and digits for `nonce-str`, drawn from the given (cryptographically
/// secure, in production `rand::rng()`) generator.
///
/// Random bytes are drawn in blocks and mapped onto the 62 characters by
/// rejection (bytes >= 248 = 4 x 62 are skipped), so every character is
/// equally likely; one block almost always suffices, where drawing a `u32`
/// per character cost four times as much.
pub fn nonce(rng: &mut impl Rng) -> [u8; 32] {
    const CHARS: &[u8; 62] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut out = [0u8; 32];
    let mut filled = 0;
    let mut block = [0u8; 40];
    while filled < out.len() {
        rng.fill_bytes(&mut block);
        for b in block.iter().filter(|b| **b < 248) {
            if filled == out.len() {
                break;
            }
            out[filled] = CHARS[usize::from(*b) % 62];
            filled += 1;
        }
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
    fn nonce_characters_are_spread_evenly() {
        let mut rng = rand::rng();
        let mut counts = std::collections::HashMap::<u8, u32>::new();
        for _ in 0..2000 {
            for c in nonce(&mut rng) {
                *counts.entry(c).or_default() += 1;
            }
        }
        // 64 000 draws over 62 characters: about 1032 each.
        assert_eq!(counts.len(), 62, "every character appears");
        assert!(
            counts.values().all(|n| (800..1300).contains(n)),
            "{counts:?}"
        );
    }

    #[test]
    fn request_id_bytes_are_lower_case_hex() {
        let id = request_id_bytes();
        assert!(
            id.iter()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b))
        );
        assert_ne!(id, request_id_bytes());
    }

    #[test]
    fn request_ids_are_32_hex() {
        let id = request_id();
        assert_eq!(id.len(), 32);
        assert!(id.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_ne!(id, request_id());
    }
}
