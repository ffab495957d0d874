//! Webhook secret tokens of tenants: generating them, hashing them for storage, and checking a
//! presented token against a tenant record.
//!
//! A tenant's token is shown once, when it is generated (`wfctl tenant add`), and only its
//! SHA-256 is stored (`WebhookAuth::token_sha256`, lowercase hex). The ingress checks the
//! `X-Gitlab-Token` header with [`verify_token`], which compares hashes in constant time and
//! also accepts the previous token during the grace period of a rotation.

use sha2::{Digest, Sha256};
use workflows::{Tenant, Timestamp};

/// The prefix of every generated token, so that a leaked one is recognisable (secret scanners,
/// logs) and cannot be confused with a signing secret (`whsec_…`).
pub const TOKEN_PREFIX: &str = "whk_";

/// Random bytes in a token (256 bits).
pub const TOKEN_BYTES: usize = 32;

/// A new webhook secret token: [`TOKEN_PREFIX`] and 32 bytes from the operating system's
/// CSPRNG in lowercase hex (68 characters in all).
///
/// # Errors
///
/// When the operating system's random source fails.
pub fn try_generate_token() -> Result<String, getrandom::Error> {
    let mut bytes = [0u8; TOKEN_BYTES];
    getrandom::fill(&mut bytes)?;
    Ok(format!("{TOKEN_PREFIX}{}", hex::encode(bytes)))
}

/// A new webhook secret token; see [`try_generate_token`].
///
/// # Panics
///
/// When the operating system's random source fails, which it does not on any supported
/// platform once the system has booted.
pub fn generate_token() -> String {
    try_generate_token().expect("the operating system's random source failed")
}

/// The lowercase hex SHA-256 of `token`: what a tenant record stores instead of the token.
pub fn token_sha256(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// Whether `token` is `tenant`'s webhook token at `now`: its hash equals the current hash, or
/// the previous hash while `now` is before `previous_valid_until` (a previous hash without an
/// end of its grace period is not accepted).
///
/// Hashes are compared in constant time, and both are always compared, so the time taken says
/// nothing about which (if any) matched. A stored hash that is not 64 hex digits matches
/// nothing.
pub fn verify_token(tenant: &Tenant, token: &str, now: Timestamp) -> bool {
    let presented = Sha256::digest(token.as_bytes());
    let auth = &tenant.webhook;
    let current = hash_matches(&presented, &auth.token_sha256);
    let previous = auth
        .previous_token_sha256
        .as_deref()
        .is_some_and(|h| hash_matches(&presented, h));
    let in_grace = auth.previous_valid_until.is_some_and(|until| now < until);
    current | (previous & in_grace)
}

fn hash_matches(presented: &[u8], stored_hex: &str) -> bool {
    let mut stored = [0u8; 32];
    if hex::decode_to_slice(stored_hex, &mut stored).is_err() {
        return false;
    }
    constant_time_eq(presented, &stored)
}

/// Equality of two byte strings in time that depends only on their lengths.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a
        .iter()
        .zip(b)
        .fold(0u8, |acc, (x, y)| acc | std::hint::black_box(x ^ y));
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use workflows::{Domain, TenantId};

    use super::*;

    fn tenant(hash: String) -> Tenant {
        Tenant::new(
            TenantId::new("acme").expect("valid"),
            Domain::new("acme.example").expect("valid"),
            1,
            2,
            hash,
            Timestamp::EPOCH,
        )
    }

    #[test]
    fn tokens_are_prefixed_random_hex() {
        let a = generate_token();
        let b = generate_token();
        assert_ne!(a, b);
        let digits = a.strip_prefix(TOKEN_PREFIX).expect("prefixed");
        assert_eq!(digits.len(), 2 * TOKEN_BYTES);
        assert!(
            digits
                .bytes()
                .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
        );
    }

    #[test]
    fn hashes_are_lowercase_hex_sha256() {
        assert_eq!(
            token_sha256("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(token_sha256(&generate_token()).len(), 64);
    }

    #[test]
    fn the_current_token_verifies_and_others_do_not() {
        let token = generate_token();
        let t = tenant(token_sha256(&token));
        let now = Timestamp::from_unix_millis(1_800_000_000_000);
        assert!(verify_token(&t, &token, now));
        assert!(!verify_token(&t, &generate_token(), now));
        assert!(!verify_token(&t, "", now));
        assert!(!verify_token(&t, &token[..token.len() - 1], now));
        let upper = tenant(token_sha256(&token).to_uppercase());
        assert!(
            verify_token(&upper, &token, now),
            "hex case does not matter"
        );
        assert!(!verify_token(&tenant("not hex".into()), &token, now));
        assert!(!verify_token(&tenant(String::new()), &token, now));
    }

    #[test]
    fn the_previous_token_verifies_only_during_its_grace_period() {
        let old = generate_token();
        let new = generate_token();
        let now = Timestamp::from_unix_millis(1_800_000_000_000);
        let mut t = tenant(token_sha256(&new));
        t.webhook.previous_token_sha256 = Some(token_sha256(&old));
        assert!(
            !verify_token(&t, &old, now),
            "no end of grace: not accepted"
        );
        t.webhook.previous_valid_until = Some(now.saturating_add(Duration::from_secs(60)));
        assert!(verify_token(&t, &old, now));
        assert!(verify_token(&t, &new, now));
        let later = now.saturating_add(Duration::from_secs(60));
        assert!(!verify_token(&t, &old, later), "the grace period has ended");
        assert!(verify_token(&t, &new, later));
    }

    #[test]
    fn constant_time_eq_compares_whole_strings() {
        assert!(constant_time_eq(b"", b""));
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
