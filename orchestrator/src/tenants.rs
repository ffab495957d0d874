//! Webhook secret tokens of tenants: generating them, hashing them for storage, and checking a
//! presented token against a tenant record.
//!
//! A tenant's token is shown once, when it is generated (`wfctl tenant add`), and only its
//! SHA-256 is stored (`WebhookAuth::token_sha256`, lowercase hex). The ingress checks the
//! `X-Gitlab-Token` header with [`verify_token`], which compares hashes in constant time and
//! also accepts the previous token during the grace period of a rotation ([`rotate_token`],
//! `wfctl tenant rotate-token`).
//!
//! A tenant may also have a Standard Webhooks signing secret ([`generate_signing_secret`],
//! `wfctl tenant signing-secret`): an HMAC-SHA256 key that must be kept to verify signatures,
//! so it is stored as is.

use std::time::Duration;

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

/// Replaces `tenant`'s webhook token with `new_token` at `now`: the current token becomes the
/// previous one, accepted until `now + grace` (replacing any older previous token, which is no
/// longer accepted); with a zero `grace` no previous token is kept, so the old one ends at once.
/// Sets `updated_at` to `now`.
pub fn rotate_token(tenant: &mut Tenant, new_token: &str, now: Timestamp, grace: Duration) {
    let auth = &mut tenant.webhook;
    let old = std::mem::replace(&mut auth.token_sha256, token_sha256(new_token));
    if grace.is_zero() {
        auth.previous_token_sha256 = None;
        auth.previous_valid_until = None;
    } else {
        auth.previous_token_sha256 = Some(old);
        auth.previous_valid_until = Some(now.saturating_add(grace));
    }
    tenant.updated_at = now;
}

/// The prefix of a Standard Webhooks signing secret.
pub const SIGNING_SECRET_PREFIX: &str = "whsec_";

/// Random bytes in a signing secret: the HMAC-SHA256 key (256 bits).
pub const SIGNING_SECRET_BYTES: usize = 32;

/// A new Standard Webhooks signing secret: [`SIGNING_SECRET_PREFIX`] and 32 bytes from the
/// operating system's CSPRNG in standard base64 with padding (50 characters in all), the
/// format `standardwebhooks::Webhook::new` reads.
///
/// # Errors
///
/// When the operating system's random source fails.
pub fn try_generate_signing_secret() -> Result<String, getrandom::Error> {
    let mut key = [0u8; SIGNING_SECRET_BYTES];
    getrandom::fill(&mut key)?;
    Ok(signing_secret_of_key(&key))
}

/// A new Standard Webhooks signing secret; see [`try_generate_signing_secret`].
///
/// # Panics
///
/// When the operating system's random source fails, which it does not on any supported
/// platform once the system has booted.
pub fn generate_signing_secret() -> String {
    try_generate_signing_secret().expect("the operating system's random source failed")
}

/// The signing secret whose HMAC key is `key`.
fn signing_secret_of_key(key: &[u8]) -> String {
    use base64::Engine as _;
    format!(
        "{SIGNING_SECRET_PREFIX}{}",
        base64::engine::general_purpose::STANDARD.encode(key)
    )
}

fn hash_matches(presented: &[u8], stored_hex: &str) -> bool {
    let mut stored = [0u8; 32];
    if hex::decode_to_slice(stored_hex, &mut stored).is_err() {
        return false;
    }
    // Both are SHA-256 digests: equal lengths, compared in constant time.
    subtle::ConstantTimeEq::ct_eq(presented, &stored[..]).into()
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
    fn a_rotation_keeps_the_old_token_for_its_grace_period_only() {
        let (first, second, third) = (generate_token(), generate_token(), generate_token());
        let t0 = Timestamp::from_unix_millis(1_800_000_000_000);
        let mut t = tenant(token_sha256(&first));
        let hour = Duration::from_secs(3600);
        rotate_token(&mut t, &second, t0, hour);
        let end = t0.saturating_add(hour);
        assert_eq!(t.webhook.token_sha256, token_sha256(&second));
        assert_eq!(t.webhook.previous_token_sha256, Some(token_sha256(&first)));
        assert_eq!(t.webhook.previous_valid_until, Some(end));
        assert_eq!(t.updated_at, t0);
        assert!(verify_token(&t, &first, t0) && verify_token(&t, &second, t0));
        assert!(!verify_token(&t, &first, end) && verify_token(&t, &second, end));

        // A second rotation during the grace period replaces the older previous token.
        let t1 = t0.saturating_add(Duration::from_secs(60));
        rotate_token(&mut t, &third, t1, hour);
        assert!(!verify_token(&t, &first, t1), "only one previous token");
        assert!(verify_token(&t, &second, t1) && verify_token(&t, &third, t1));
        assert_eq!(
            t.webhook.previous_valid_until,
            Some(t1.saturating_add(hour))
        );

        // No grace: the old token ends at once and no previous hash is kept.
        let fourth = generate_token();
        rotate_token(&mut t, &fourth, t1, Duration::ZERO);
        assert!(!verify_token(&t, &third, t1) && verify_token(&t, &fourth, t1));
        assert_eq!(t.webhook.previous_token_sha256, None);
        assert_eq!(t.webhook.previous_valid_until, None);
    }

    fn decode_base64(text: &str) -> Option<Vec<u8>> {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.decode(text).ok()
    }

    #[test]
    fn signing_secrets_are_prefixed_base64_of_32_random_bytes() {
        let a = generate_signing_secret();
        let b = generate_signing_secret();
        assert_ne!(a, b);
        for secret in [&a, &b] {
            assert_eq!(secret.len(), SIGNING_SECRET_PREFIX.len() + 44, "{secret}");
            let encoded = secret
                .strip_prefix(SIGNING_SECRET_PREFIX)
                .expect("prefixed");
            let key = decode_base64(encoded).expect("standard base64");
            assert_eq!(key.len(), SIGNING_SECRET_BYTES);
            // standardwebhooks reads it as the same key: signatures agree.
            let theirs = standardwebhooks::Webhook::new(secret).expect("the crate reads it");
            let ours = standardwebhooks::Webhook::from_bytes(key).expect("key");
            assert_eq!(
                theirs.sign("msg_1", 1_800_000_000, b"{}").expect("sign"),
                ours.sign("msg_1", 1_800_000_000, b"{}").expect("sign")
            );
        }
        assert!(!a.starts_with(TOKEN_PREFIX) && !generate_token().starts_with("whsec_"));
    }
}
