//! API token secrets: generation and hashing. Only the SHA-256 of a secret is
//! stored; the secret itself is shown once, at creation.

use base64::Engine;
use rand::RngCore;
use sha2::{Digest, Sha256};

/// Prefix that makes leaked secrets recognisable by secret scanners.
pub const SECRET_PREFIX: &str = "so_";

/// A fresh secret: 32 bytes from the OS CSPRNG, base64url.
pub fn new_secret() -> String {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    format!(
        "{SECRET_PREFIX}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    )
}

/// The stored form of a secret.
pub fn hash_secret(secret: &str) -> Vec<u8> {
    Sha256::digest(secret.as_bytes()).to_vec()
}

/// The secret of an `Authorization: Bearer <secret>` value, if that is its shape.
pub fn bearer_secret(header: &str) -> Option<&str> {
    let (scheme, rest) = header.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let secret = rest.trim();
    (!secret.is_empty()).then_some(secret)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_distinct_and_long() {
        let a = new_secret();
        let b = new_secret();
        assert_ne!(a, b);
        assert!(a.len() >= SECRET_PREFIX.len() + 43);
        assert_eq!(hash_secret(&a).len(), 32);
        assert_ne!(hash_secret(&a), a.as_bytes());
    }

    #[test]
    fn bearer_parsing() {
        assert_eq!(bearer_secret("Bearer abc"), Some("abc"));
        assert_eq!(bearer_secret("bearer  abc "), Some("abc"));
        assert_eq!(bearer_secret("Basic abc"), None);
        assert_eq!(bearer_secret("Bearer "), None);
        assert_eq!(bearer_secret("Bearer"), None);
    }
}
