//! What an app instance is told about its environment: the file [`ENV_FILE`], written by the
//! instance's start-up script before the release's `install.sh` runs, sourced for it, and left
//! for the app (mode 0600, owned by [`APP_USER`]).
//!
//! What the orchestrator writes holds no secret's value: the database's host, port and name,
//! the ARN of the Secrets Manager secret with its user name and password, which the
//! environment's instance role may read (see `aws::identity`; the app fetches it with the
//! instance's own credentials, `aws secretsmanager get-secret-value --secret-id
//! "$DB_SECRET_ARN"`), and the environment's config vars (`wfctl config`). A config var that
//! references a secret is resolved on the instance when it starts ([`secret_script`]): the
//! value is appended to the file there, read with the instance's role. The same text is what
//! the simulated cloud records for its instances.

use workflows::{ConfigValue, EnvConfig, Resources, WorkflowKey};

/// Where the file is written on an instance.
pub const ENV_FILE: &str = "/etc/tenant/app.env";

/// The system user the file belongs to (made by the start-up script if the image has none).
pub const APP_USER: &str = "app";

/// The name of the database the database step creates in each environment's MySQL instance.
pub const DATABASE_NAME: &str = "app";

/// The variables of `key`'s instances, in the order they are written: the tenant and
/// environment, the host name the app is served at, the AWS region, the database once the
/// environment has one, then the config vars that hold plain values, by name.
pub fn variables<'c>(
    key: &WorkflowKey,
    resources: &Resources,
    region: Option<&str>,
    config: &'c EnvConfig,
) -> Vec<(&'c str, String)> {
    let mut vars = vec![
        ("TENANT_ID", key.tenant.to_string()),
        ("TENANT_ENV", key.env.to_string()),
    ];
    if let Some(routing) = &resources.routing {
        vars.push(("APP_HOST", routing.host.clone()));
    }
    if let Some(region) = region {
        vars.push(("AWS_REGION", region.to_owned()));
    }
    if let Some(db) = &resources.database {
        // RDS endpoints are `host:port`.
        let (host, port) = db
            .endpoint
            .rsplit_once(':')
            .unwrap_or((db.endpoint.as_str(), "3306"));
        vars.push(("DB_HOST", host.to_owned()));
        vars.push(("DB_PORT", port.to_owned()));
        vars.push(("DB_NAME", DATABASE_NAME.to_owned()));
        vars.push(("DB_SECRET_ARN", db.secret_arn.clone()));
    }
    for (name, value) in &config.vars {
        if let ConfigValue::Value(v) = value {
            vars.push((name.as_str(), v.clone()));
        }
    }
    vars
}

/// The config vars of `config` that reference a secret: (name, secret ARN), by name.
pub fn secret_refs(config: &EnvConfig) -> Vec<(&str, &str)> {
    config
        .vars
        .iter()
        .filter_map(|(name, value)| match value {
            ConfigValue::SecretArn(arn) => Some((name.as_str(), arn.as_str())),
            ConfigValue::Value(_) => None,
        })
        .collect()
}

/// Bash that appends each secret-referencing var to `file` with the secret's current value,
/// read with the instance's credentials; quoted as [`render`] quotes. Any failure (a secret
/// the role may not read, one that is gone) fails the script, as the instance's start must.
pub fn secret_script(refs: &[(&str, &str)], file: &str) -> String {
    if refs.is_empty() {
        return String::new();
    }
    // `esc` is `'\''`: each `'` of a value closes the quotes, adds a quoted `'` and reopens.
    let mut script = String::from(r#"sq="'"; esc="'\\''""#);
    script.push('\n');
    for (name, arn) in refs {
        script.push_str(&format!(
            r#"value="$(aws secretsmanager get-secret-value --secret-id {arn} --query SecretString --output text)""#,
            arn = quote(arn)
        ));
        script.push('\n');
        script.push_str(&format!(
            r#"printf "%s='%s'\n" {name} "${{value//$sq/$esc}}" >> {file}"#
        ));
        script.push('\n');
    }
    script
}

/// The file's text: a comment, then one `NAME='value'` line per variable, each value quoted for
/// a POSIX shell (`set -a; . /etc/tenant/app.env` exports them) and for systemd's
/// `EnvironmentFile=`.
pub fn render(vars: &[(&str, String)]) -> String {
    let mut text =
        String::from("# Written by the tenant-host orchestrator at instance start; do not edit.\n");
    for (name, value) in vars {
        text.push_str(name);
        text.push('=');
        text.push_str(&quote(value));
        text.push('\n');
    }
    text
}

/// `value` in single quotes, each `'` in it written as `'\''`.
fn quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use workflows::{DatabaseOutput, Environment, RoutingOutput, TenantId};

    /// Runs `script` in bash and returns its standard output.
    fn bash(script: &str) -> String {
        let out = std::process::Command::new("bash")
            .arg("-c")
            .arg(script)
            .output()
            .expect("bash runs");
        assert!(
            out.status.success(),
            "{script}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn key() -> WorkflowKey {
        WorkflowKey::new(TenantId::new("acme").expect("id"), Environment::Staging)
    }

    #[test]
    fn before_a_database_only_the_environment_is_named() {
        let none = EnvConfig::default();
        let vars = variables(&key(), &Resources::default(), None, &none);
        assert_eq!(
            vars,
            [
                ("TENANT_ID", "acme".to_owned()),
                ("TENANT_ENV", "staging".to_owned())
            ]
        );
    }

    #[test]
    fn the_database_is_named_by_host_port_name_and_secret_arn() {
        let resources = Resources {
            database: Some(DatabaseOutput {
                instance_id: "acme-staging".into(),
                endpoint: "acme-staging.c1.eu-west-1.rds.amazonaws.com:3306".into(),
                secret_arn: "arn:aws:secretsmanager:eu-west-1:1:secret:rds!db-1".into(),
            }),
            routing: Some(RoutingOutput {
                host: "staging.acme.example".into(),
                target_group_arn: "tg".into(),
                rule_arn: "rule".into(),
                priority: 3,
                dns_zone: None,
            }),
            ..Resources::default()
        };
        let config = EnvConfig {
            version: 4,
            vars: [
                ("LOG_LEVEL".to_owned(), ConfigValue::Value("debug".into())),
                (
                    "STRIPE_KEY".to_owned(),
                    ConfigValue::SecretArn("arn:aws:secretsmanager:eu-west-1:1:secret:s".into()),
                ),
            ]
            .into_iter()
            .collect(),
        };
        let text = render(&variables(&key(), &resources, Some("eu-west-1"), &config));
        assert!(
            !text.contains("STRIPE_KEY"),
            "a secret reference is resolved on the instance"
        );
        for line in [
            "TENANT_ID='acme'",
            "APP_HOST='staging.acme.example'",
            "AWS_REGION='eu-west-1'",
            "DB_HOST='acme-staging.c1.eu-west-1.rds.amazonaws.com'",
            "DB_PORT='3306'",
            "DB_NAME='app'",
            "DB_SECRET_ARN='arn:aws:secretsmanager:eu-west-1:1:secret:rds!db-1'",
            "LOG_LEVEL='debug'",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
        }
    }

    #[test]
    fn values_are_quoted_so_a_shell_reads_them_back_unchanged() {
        let tricky = "it's $HOME `id` \"q\" \\ ; & |\nnext";
        let text = render(&[("X", tricky.to_owned())]);
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("{text}\nprintf '%s' \"$X\""))
            .output()
            .expect("sh runs");
        assert_eq!(String::from_utf8_lossy(&out.stdout), tricky);
    }

    #[test]
    fn a_secret_reference_is_resolved_on_the_instance_and_read_back_unchanged() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("app.env");
        let file = file.to_str().expect("path");
        let arn = "arn:aws:secretsmanager:eu-west-1:123456789012:secret:it's-AbC";
        let script = secret_script(&[("STRIPE_KEY", arn)], file);
        // A stand-in for the AWS CLI that answers with a value that needs quoting, after
        // checking it was asked for the right secret.
        let fake_aws = format!(
            "aws() {{ [ \"$4\" = {} ] || exit 9; printf '%s' \"it's \\$HOME \\`id\\` x\"; }}\n",
            quote(arn)
        );
        bash(&format!("set -euo pipefail\n{fake_aws}{script}"));
        let value = bash(&format!("set -a; . {file}; printf '%s' \"$STRIPE_KEY\""));
        assert_eq!(value, "it's $HOME `id` x");
    }
}
