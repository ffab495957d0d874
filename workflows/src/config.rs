//! An environment's config vars: what its app is given besides what the platform sets, kept
//! with the tenant record and versioned (every change makes a new version).
//!
//! A var holds a value, or the ARN of a Secrets Manager secret: the orchestrator never holds a
//! secret's value. An instance resolves the reference when it starts, with its own role, which
//! may read the referenced secrets of its environment and no others.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The longest value of a config var, in bytes.
pub const MAX_VALUE_BYTES: usize = 4096;

/// The longest name of a config var.
pub const MAX_NAME_BYTES: usize = 128;

/// Names the platform sets in the environment file; a config var cannot take them.
pub const RESERVED: [&str; 8] = [
    "TENANT_ID",
    "TENANT_ENV",
    "APP_HOST",
    "AWS_REGION",
    "DB_HOST",
    "DB_PORT",
    "DB_NAME",
    "DB_SECRET_ARN",
];

/// What a config var holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum ConfigValue {
    /// A plain value.
    Value(String),
    /// The ARN of a Secrets Manager secret whose value the instance reads at start.
    SecretArn(String),
}

/// One environment's config vars.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EnvConfig {
    /// Incremented by every change; 0 for an environment never configured.
    pub version: u64,
    /// The vars by name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub vars: BTreeMap<String, ConfigValue>,
}

impl EnvConfig {
    /// The ARNs of the secrets the vars reference, sorted, each once.
    pub fn secret_arns(&self) -> Vec<&str> {
        let mut arns: Vec<&str> = self
            .vars
            .values()
            .filter_map(|v| match v {
                ConfigValue::SecretArn(arn) => Some(arn.as_str()),
                ConfigValue::Value(_) => None,
            })
            .collect();
        arns.sort_unstable();
        arns.dedup();
        arns
    }
}

/// Why a config var is refused: one line naming what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("config var {name:?}: {reason}")]
pub struct Invalid {
    /// The var's name as given.
    pub name: String,
    /// What is wrong.
    pub reason: String,
}

fn invalid(name: &str, reason: impl Into<String>) -> Invalid {
    Invalid {
        name: name.to_owned(),
        reason: reason.into(),
    }
}

/// Checks a var's name: an environment variable name (letters, digits and `_`, not starting
/// with a digit), at most [`MAX_NAME_BYTES`], not one of [`RESERVED`].
pub fn check_name(name: &str) -> Result<(), Invalid> {
    let shaped = name
        .bytes()
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if !shaped {
        return Err(invalid(
            name,
            "not an environment variable name (letters, digits and '_', not starting with a digit)",
        ));
    }
    if name.len() > MAX_NAME_BYTES {
        return Err(invalid(
            name,
            format!("longer than {MAX_NAME_BYTES} characters"),
        ));
    }
    if RESERVED.contains(&name) {
        return Err(invalid(name, "set by the platform in every environment"));
    }
    Ok(())
}

/// Checks `name` and what it is to hold.
pub fn check(name: &str, value: &ConfigValue) -> Result<(), Invalid> {
    check_name(name)?;
    match value {
        ConfigValue::Value(v) if v.len() > MAX_VALUE_BYTES => Err(invalid(
            name,
            format!("value of {} bytes, more than {MAX_VALUE_BYTES}", v.len()),
        )),
        ConfigValue::Value(v) if v.contains('\0') => Err(invalid(name, "value holds a NUL byte")),
        ConfigValue::Value(_) => Ok(()),
        ConfigValue::SecretArn(arn) => check_secret_arn(arn).map_err(|r| invalid(name, r)),
    }
}

/// `arn:<partition>:secretsmanager:<region>:<12-digit account>:secret:<name>`.
fn check_secret_arn(arn: &str) -> Result<(), String> {
    let parts: Vec<&str> = arn.splitn(7, ':').collect();
    let ok = parts.len() == 7
        && parts[0] == "arn"
        && parts[1].starts_with("aws")
        && parts[2] == "secretsmanager"
        && !parts[3].is_empty()
        && parts[4].len() == 12
        && parts[4].bytes().all(|b| b.is_ascii_digit())
        && parts[5] == "secret"
        && !parts[6].is_empty()
        && arn.len() <= 2048
        && arn.bytes().all(|b| b.is_ascii_graphic());
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{arn:?} is not a Secrets Manager secret ARN (arn:aws:secretsmanager:<region>:<account>:secret:<name>)"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_environment_variable_names_and_not_the_platforms() {
        for good in ["A", "_X", "DATABASE_POOL_SIZE", "log_level2"] {
            assert_eq!(check_name(good), Ok(()), "{good}");
        }
        for (bad, says) in [
            ("", "not an environment variable name"),
            ("2FAST", "not an environment variable name"),
            ("WITH-DASH", "not an environment variable name"),
            ("A B", "not an environment variable name"),
            ("DB_HOST", "set by the platform"),
        ] {
            let e = check_name(bad).expect_err(bad);
            assert!(e.to_string().contains(says), "{e}");
        }
        assert!(check_name(&"X".repeat(129)).is_err());
    }

    #[test]
    fn values_are_bounded_and_secret_references_are_secret_arns() {
        let big = ConfigValue::Value("v".repeat(MAX_VALUE_BYTES + 1));
        let e = check("BIG", &big).expect_err("too big");
        assert_eq!(e.name, "BIG");
        assert!(e.reason.contains("4096"), "{e}");
        assert!(check("OK", &ConfigValue::Value("v".repeat(MAX_VALUE_BYTES))).is_ok());
        let arn = "arn:aws:secretsmanager:eu-west-1:123456789012:secret:acme/stripe-AbCdEf";
        assert!(check("STRIPE_KEY", &ConfigValue::SecretArn(arn.into())).is_ok());
        for bad in [
            "arn:aws:s3:::bucket",
            "arn:aws:secretsmanager:eu-west-1:1234:secret:x",
            "stripe-key",
        ] {
            let e = check("K", &ConfigValue::SecretArn(bad.into())).expect_err(bad);
            assert!(e.reason.contains("not a Secrets Manager secret ARN"), "{e}");
        }
    }

    #[test]
    fn referenced_secrets_are_listed_once() {
        let arn = "arn:aws:secretsmanager:eu-west-1:123456789012:secret:s";
        let config = EnvConfig {
            version: 2,
            vars: [
                ("A".to_owned(), ConfigValue::SecretArn(arn.into())),
                ("B".to_owned(), ConfigValue::SecretArn(arn.into())),
                ("C".to_owned(), ConfigValue::Value("plain".into())),
            ]
            .into_iter()
            .collect(),
        };
        assert_eq!(config.secret_arns(), [arn]);
    }
}
