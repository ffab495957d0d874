//! Standard Webhooks signatures, verified as the body streams in.
//!
//! A signature is `v1,` and the base64 HMAC-SHA256, keyed with the tenant's secret (`whsec_`
//! and base64), of `<webhook-id>.<webhook-timestamp>.<body>`; `webhook-signature` may list
//! several, separated by spaces, and one must match. The `standardwebhooks` crate verifies a
//! body it is given whole; this does the same over chunks, so a signed body need not be held
//! in memory (the tests check both agree). The timestamp is checked first, against the
//! ingress's clock and in overflow-free arithmetic, before anything of the body is read.

use axum::http::HeaderMap;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, KeyInit as _, Mac as _};
use sha2::Sha256;
use workflows::Timestamp;

use super::header;

/// How far `webhook-timestamp` may be from now, either way (the specification's five minutes).
pub(super) const TOLERANCE_SECS: i64 = 5 * 60;

/// The prefix of a Standard Webhooks secret.
const SECRET_PREFIX: &str = "whsec_";

/// A signature check in progress: the MAC of what was read so far.
pub(super) struct Signature {
    mac: Hmac<Sha256>,
    /// The `v1` signatures the request names, decoded.
    candidates: Vec<Vec<u8>>,
}

impl Signature {
    /// Starts checking a request signed with `secret`, from its headers: they must name an id,
    /// a timestamp within [`TOLERANCE_SECS`] of `now` and at least one `v1` signature.
    pub(super) fn start(secret: &str, headers: &HeaderMap, now: Timestamp) -> Result<Self, String> {
        let ts = fresh_timestamp(headers, now)?;
        let id = header(headers, "webhook-id").ok_or("missing header webhook-id")?;
        let listed =
            header(headers, "webhook-signature").ok_or("missing header webhook-signature")?;
        let candidates: Vec<Vec<u8>> = listed
            .split(' ')
            .filter_map(|s| s.split_once(','))
            .filter(|(version, _)| *version == "v1")
            .filter_map(|(_, sig)| STANDARD.decode(sig).ok())
            .collect();
        if candidates.is_empty() {
            return Err("webhook-signature holds no v1 signature".to_owned());
        }
        let key = STANDARD
            .decode(secret.strip_prefix(SECRET_PREFIX).unwrap_or(secret))
            .map_err(|_| "the tenant's signing secret is not base64".to_owned())?;
        let mut mac = Hmac::<Sha256>::new_from_slice(&key)
            .map_err(|_| "the tenant's signing secret cannot key HMAC-SHA256".to_owned())?;
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(ts.as_bytes());
        mac.update(b".");
        Ok(Self { mac, candidates })
    }

    /// Reads the next chunk of the body.
    pub(super) fn update(&mut self, chunk: &[u8]) {
        self.mac.update(chunk);
    }

    /// Whether one of the listed signatures is the body's (compared in constant time).
    pub(super) fn verify(self) -> Result<(), String> {
        let Self { mac, candidates } = self;
        if candidates
            .iter()
            .any(|sig| mac.clone().verify_slice(sig).is_ok())
        {
            Ok(())
        } else {
            Err("signature invalid".to_owned())
        }
    }
}

/// The `webhook-timestamp` header, checked against `now` in checked arithmetic (a timestamp
/// near `i64::MIN` must not overflow the subtraction).
fn fresh_timestamp(headers: &HeaderMap, now: Timestamp) -> Result<&str, String> {
    let Some(text) = header(headers, "webhook-timestamp") else {
        return Err("missing header webhook-timestamp".to_owned());
    };
    let ts: i64 = text
        .parse()
        .map_err(|_| "webhook-timestamp is not a number of seconds".to_owned())?;
    let now = now.as_unix_millis() / 1000;
    match now.checked_sub(ts).and_then(i64::checked_abs) {
        Some(skew) if skew <= TOLERANCE_SECS => Ok(text),
        _ => Err(format!(
            "webhook-timestamp {ts} is more than {TOLERANCE_SECS} s from now"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    const NOW_SECS: i64 = 1_800_000_000;

    fn now() -> Timestamp {
        Timestamp::from_unix_millis(NOW_SECS * 1000)
    }

    fn headers(id: &str, ts: &str, signature: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (name, value) in [
            ("webhook-id", id),
            ("webhook-timestamp", ts),
            ("webhook-signature", signature),
        ] {
            h.insert(name, HeaderValue::from_str(value).expect("header"));
        }
        h
    }

    fn check(secret: &str, h: &HeaderMap, body: &[u8], chunk: usize) -> Result<(), String> {
        let mut s = Signature::start(secret, h, now())?;
        for piece in body.chunks(chunk.max(1)) {
            s.update(piece);
        }
        s.verify()
    }

    #[test]
    fn what_the_standard_webhooks_crate_signs_verifies_in_any_chunks() {
        let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        let body = br#"{"object_kind":"push","after":"da15"}"#;
        let signed = standardwebhooks::Webhook::new(secret)
            .expect("secret")
            .sign("msg_1", NOW_SECS, body)
            .expect("signs");
        let h = headers("msg_1", &NOW_SECS.to_string(), &format!("v0,xyz {signed}"));
        for chunk in [1, 3, 7, body.len()] {
            assert_eq!(check(secret, &h, body, chunk), Ok(()), "chunks of {chunk}");
        }
        // The crate agrees with itself on what verifies (with its own clock, so a fresh
        // timestamp here).
        let mut tampered = body.to_vec();
        tampered[5] ^= 1;
        assert!(check(secret, &h, &tampered, 4).is_err());
        let other = headers("msg_2", &NOW_SECS.to_string(), &signed);
        assert!(check(secret, &other, body, 4).is_err(), "the id is signed");
        let wrong_key = "whsec_QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo=";
        assert!(check(wrong_key, &h, body, 4).is_err());
    }

    #[test]
    fn headers_are_checked_before_the_body() {
        let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        let ts = NOW_SECS.to_string();
        for (h, says) in [
            (headers("m", &ts, "v2,abc"), "no v1 signature"),
            (headers("m", &ts, "v1,!!!"), "no v1 signature"),
            (HeaderMap::new(), "missing header webhook-timestamp"),
        ] {
            let e = Signature::start(secret, &h, now()).err().expect("refused");
            assert!(e.contains(says), "{e}");
        }
        let mut h = headers("m", &ts, "v1,abc");
        h.remove("webhook-id");
        assert!(Signature::start(secret, &h, now()).is_err());
    }

    #[test]
    fn timestamps_far_from_now_are_refused_without_overflow() {
        let h = |ts: &str| headers("m", ts, "v1,abc");
        for good in ["1800000000", "1800000300", "1799999700"] {
            assert!(fresh_timestamp(&h(good), now()).is_ok(), "{good}");
        }
        for bad in [
            "1800000301",
            "1799999699",
            &i64::MIN.to_string(),
            &i64::MAX.to_string(),
            "-1",
            "12x",
            "99999999999999999999999",
        ] {
            assert!(fresh_timestamp(&h(bad), now()).is_err(), "{bad}");
        }
    }
}
