//! Validated identifiers: tenant id, environment, workflow key, run id, event id, git sha, domain.
//!
//! Every identifier is parsed once at the edge (webhook, queue message, command line) and is
//! valid from then on; serde goes through the same validation, so a persisted or queued value
//! that breaks a rule fails to decode with an error naming the value and the rule.

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};

/// An identifier that broke its rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The value does not follow the rule of its kind.
    #[error("invalid {kind} {value:?}: {rule}")]
    Invalid {
        /// What kind of identifier was being parsed ("tenant id", "git sha", ...).
        kind: &'static str,
        /// The rejected value, as given.
        value: String,
        /// The rule it breaks, in words.
        rule: &'static str,
    },
}

impl Error {
    /// Bad input never gets better by trying again.
    pub fn is_retryable(&self) -> bool {
        false
    }
}

fn invalid(kind: &'static str, value: &str, rule: &'static str) -> Error {
    // Cap what we echo back: the value may be attacker-controlled and arbitrarily long.
    let mut shown: String = value.chars().take(80).collect();
    if shown.len() < value.len() {
        shown.push('…');
    }
    Error::Invalid {
        kind,
        value: shown,
        rule,
    }
}

/// Declares a validated string newtype with serde, `FromStr`, `Display` and a JSON Schema.
macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident, $kind:literal, $rule:literal, $pattern:literal, $check:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// The rule a valid value follows, in words.
            pub const RULE: &'static str = $rule;

            /// Validates `value`.
            pub fn new(value: impl Into<String>) -> Result<Self, Error> {
                let value: String = value.into();
                let check: fn(&str) -> bool = $check;
                if check(&value) {
                    Ok(Self(value))
                } else {
                    Err(invalid($kind, &value, $rule))
                }
            }

            /// The identifier as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl FromStr for $name {
            type Err = Error;
            fn from_str(s: &str) -> Result<Self, Error> {
                Self::new(s)
            }
        }

        impl TryFrom<String> for $name {
            type Error = Error;
            fn try_from(s: String) -> Result<Self, Error> {
                Self::new(s)
            }
        }

        impl From<$name> for String {
            fn from(v: $name) -> String {
                v.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl JsonSchema for $name {
            fn schema_name() -> Cow<'static, str> {
                stringify!($name).into()
            }
            fn json_schema(_: &mut SchemaGenerator) -> Schema {
                json_schema!({
                    "type": "string",
                    "pattern": $pattern,
                    "description": $rule,
                })
            }
        }
    };
}

fn is_lower_alnum(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit()
}

string_id!(
    /// A tenant's identifier. Short, because AWS names built from it have tight limits
    /// (a target group name holds at most 32 characters).
    TenantId,
    "tenant id",
    "3 to 20 characters of lowercase letters, digits and '-', starting with a letter and not ending with '-'",
    "^[a-z][a-z0-9-]{1,18}[a-z0-9]$",
    |s| {
        (3..=20).contains(&s.len())
            && s.starts_with(|c: char| c.is_ascii_lowercase())
            && s.chars().all(|c| is_lower_alnum(c) || c == '-')
            && !s.ends_with('-')
    }
);

string_id!(
    /// The id of an event: a GitLab `Idempotency-Key` or event UUID, a digest, or an id the
    /// system derives. It doubles as the SQS FIFO deduplication id, hence its rule.
    EventId,
    "event id",
    "1 to 128 printable ASCII characters without spaces",
    "^[!-~]{1,128}$",
    |s| (1..=128).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_graphic())
);

string_id!(
    /// A DNS domain owned by a tenant; its environments are served at `<env>.<domain>`.
    Domain,
    "domain",
    "a lowercase DNS name of at least two labels, each 1 to 63 characters of letters, digits and '-' not starting or ending with '-', at most 200 characters in all",
    "^([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\\.)+[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$",
    |s| {
        s.len() <= 200
            && s.split('.').count() >= 2
            && s.split('.').all(|label| {
                (1..=63).contains(&label.len())
                    && label.chars().all(|c| is_lower_alnum(c) || c == '-')
                    && !label.starts_with('-')
                    && !label.ends_with('-')
            })
    }
);

/// A git commit id: 40 (SHA-1) or 64 (SHA-256) hexadecimal digits, kept in lowercase.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct GitSha(String);

impl GitSha {
    /// The rule a valid value follows, in words.
    pub const RULE: &'static str = "40 or 64 hexadecimal digits";

    /// Validates `value` and normalises it to lowercase.
    pub fn new(value: impl Into<String>) -> Result<Self, Error> {
        let mut value: String = value.into();
        if (value.len() == 40 || value.len() == 64) && value.bytes().all(|b| b.is_ascii_hexdigit())
        {
            value.make_ascii_lowercase();
            Ok(Self(value))
        } else {
            Err(invalid("git sha", &value, Self::RULE))
        }
    }

    /// The full sha.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The first 8 digits, as people quote commits.
    pub fn short(&self) -> &str {
        &self.0[..8]
    }
}

impl FromStr for GitSha {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        Self::new(s)
    }
}

impl TryFrom<String> for GitSha {
    type Error = Error;
    fn try_from(s: String) -> Result<Self, Error> {
        Self::new(s)
    }
}

impl From<GitSha> for String {
    fn from(v: GitSha) -> String {
        v.0
    }
}

impl fmt::Display for GitSha {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl JsonSchema for GitSha {
    fn schema_name() -> Cow<'static, str> {
        "GitSha".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "pattern": "^([0-9a-f]{40}|[0-9a-f]{64})$",
            "description": "a git commit id in lowercase hexadecimal",
        })
    }
}

/// One of a tenant's environments.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Environment {
    /// Served at `dev.<domain>`.
    Dev,
    /// Served at `staging.<domain>`.
    Staging,
    /// Served at `production.<domain>`; the only one that may require an approval.
    Production,
}

impl Environment {
    /// Every environment, in promotion order.
    pub const ALL: [Environment; 3] = [Self::Dev, Self::Staging, Self::Production];

    /// The rule a valid value follows, in words.
    pub const RULE: &'static str = "one of dev, staging, production";

    /// The lowercase name used in keys, host names and resource names.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Dev => "dev",
            Self::Staging => "staging",
            Self::Production => "production",
        }
    }
}

impl FromStr for Environment {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        Self::ALL
            .into_iter()
            .find(|e| e.as_str() == s)
            .ok_or_else(|| invalid("environment", s, Self::RULE))
    }
}

impl fmt::Display for Environment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The key of one workflow: `tenant#env`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct WorkflowKey {
    /// Whose workflow.
    pub tenant: TenantId,
    /// Which environment of the tenant.
    pub env: Environment,
}

impl WorkflowKey {
    /// The rule a valid value follows, in words.
    pub const RULE: &'static str = "<tenant id>#<environment>, for example acme#production";

    /// The key of `tenant`'s workflow in `env`.
    pub fn new(tenant: TenantId, env: Environment) -> Self {
        Self { tenant, env }
    }
}

impl FromStr for WorkflowKey {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        let (tenant, env) = s
            .split_once('#')
            .ok_or_else(|| invalid("workflow key", s, Self::RULE))?;
        Ok(Self {
            tenant: tenant.parse()?,
            env: env.parse()?,
        })
    }
}

impl TryFrom<String> for WorkflowKey {
    type Error = Error;
    fn try_from(s: String) -> Result<Self, Error> {
        s.parse()
    }
}

impl From<WorkflowKey> for String {
    fn from(v: WorkflowKey) -> String {
        v.to_string()
    }
}

impl fmt::Display for WorkflowKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}#{}", self.tenant, self.env)
    }
}

impl JsonSchema for WorkflowKey {
    fn schema_name() -> Cow<'static, str> {
        "WorkflowKey".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "pattern": "^[a-z][a-z0-9-]{1,18}[a-z0-9]#(dev|staging|production)$",
            "description": WorkflowKey::RULE,
        })
    }
}

/// The number of a run within one workflow, counting from 1; shown as `r7`.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema,
)]
#[serde(try_from = "u32", into = "u32")]
#[schemars(with = "std::num::NonZeroU32")]
pub struct RunId(u32);

impl RunId {
    /// The rule a valid value follows, in words.
    pub const RULE: &'static str = "'r' followed by a run number from 1, for example r7";

    /// The first run of a workflow.
    pub const FIRST: RunId = RunId(1);

    /// Run number `n`; zero is not a run.
    pub fn new(n: u32) -> Result<Self, Error> {
        if n == 0 {
            Err(invalid("run id", "0", Self::RULE))
        } else {
            Ok(Self(n))
        }
    }

    /// The run number.
    pub fn get(self) -> u32 {
        self.0
    }

    /// The run after this one.
    pub fn next(self) -> RunId {
        RunId(self.0.saturating_add(1))
    }
}

impl TryFrom<u32> for RunId {
    type Error = Error;
    fn try_from(n: u32) -> Result<Self, Error> {
        Self::new(n)
    }
}

impl From<RunId> for u32 {
    fn from(v: RunId) -> u32 {
        v.0
    }
}

impl FromStr for RunId {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        s.strip_prefix('r')
            .and_then(|n| n.parse::<u32>().ok())
            .filter(|n| *n > 0)
            .map(RunId)
            .ok_or_else(|| invalid("run id", s, Self::RULE))
    }
}

impl fmt::Display for RunId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "r{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenant_ids_follow_their_rule() {
        for ok in ["acme", "a1b", "acme-shop", "abcdefghijklmnopqrst"] {
            assert!(TenantId::new(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "ab",
            "Acme",
            "1acme",
            "acme-",
            "ac_me",
            "abcdefghijklmnopqrstu",
            "ac#me",
        ] {
            let err = TenantId::new(bad).expect_err(bad);
            let text = err.to_string();
            assert!(text.contains("tenant id"), "{text}");
            assert!(text.contains(&format!("{bad:?}")), "{text}");
            assert!(text.contains("lowercase letters"), "{text}");
        }
    }

    #[test]
    fn environments_parse_and_name_the_rule() {
        assert_eq!(
            "production".parse::<Environment>(),
            Ok(Environment::Production)
        );
        let err = "prod".parse::<Environment>().expect_err("prod");
        assert_eq!(
            err.to_string(),
            "invalid environment \"prod\": one of dev, staging, production"
        );
    }

    #[test]
    fn workflow_keys_round_trip_and_reject_each_part() {
        let key: WorkflowKey = "acme#staging".parse().expect("valid");
        assert_eq!(key.to_string(), "acme#staging");
        assert!("acme".parse::<WorkflowKey>().is_err());
        assert!("acme#qa".parse::<WorkflowKey>().is_err());
        assert!("A#dev".parse::<WorkflowKey>().is_err());
        let json = serde_json::to_string(&key).expect("encode");
        assert_eq!(json, "\"acme#staging\"");
        let back: WorkflowKey = serde_json::from_str(&json).expect("decode");
        assert_eq!(back, key);
        let err = serde_json::from_str::<WorkflowKey>("\"acme#qa\"").expect_err("bad env");
        assert!(
            err.to_string().contains("invalid environment \"qa\""),
            "{err}"
        );
    }

    #[test]
    fn run_ids_count_from_one() {
        assert_eq!("r7".parse::<RunId>().map(RunId::get), Ok(7));
        assert!("r0".parse::<RunId>().is_err());
        assert!("7".parse::<RunId>().is_err());
        assert!(RunId::new(0).is_err());
        assert!(serde_json::from_str::<RunId>("0").is_err());
        assert_eq!(RunId::FIRST.next().to_string(), "r2");
    }

    #[test]
    fn shas_are_hex_and_lowercased() {
        let sha = GitSha::new("DA1560886D4F094C3E6C9EF40349F7D38B5D27D7").expect("valid");
        assert_eq!(sha.as_str(), "da1560886d4f094c3e6c9ef40349f7d38b5d27d7");
        assert_eq!(sha.short(), "da156088");
        assert!(GitSha::new("da15608").is_err());
        assert!(GitSha::new("z".repeat(40)).is_err());
        assert!(GitSha::new("a".repeat(64)).is_ok());
    }

    #[test]
    fn event_ids_fit_fifo_deduplication_ids() {
        assert!(EventId::new("0b5bd3f4-1a5c-4b3c-9a56-36d3e9b5b0f2").is_ok());
        assert!(EventId::new("").is_err());
        assert!(EventId::new("has space").is_err());
        assert!(EventId::new("x".repeat(129)).is_err());
        let long = EventId::new("é".repeat(200)).expect_err("non-ascii");
        assert!(
            long.to_string().contains('…'),
            "long values are cut: {long}"
        );
    }

    #[test]
    fn domains_are_dns_names() {
        assert!(Domain::new("shop.example.com").is_ok());
        for bad in ["example", "-a.com", "a..com", "Shop.com", "a_b.com"] {
            assert!(Domain::new(bad).is_err(), "{bad}");
        }
    }
}
