//! What an app instance is told about its environment: the file [`ENV_FILE`], written by the
//! instance's start-up script before the release's `install.sh` runs, sourced for it, and left
//! for the app (mode 0600, owned by [`APP_USER`]).
//!
//! It holds where things are, never a secret's value: the database's host, port and name, and
//! the ARN of the Secrets Manager secret with its user name and password, which the
//! environment's instance role may read (see `aws::identity`); the app fetches it with the
//! instance's own credentials (`aws secretsmanager get-secret-value --secret-id
//! "$DB_SECRET_ARN"`). The same text is what the simulated cloud records for its instances.

use workflows::{Resources, WorkflowKey};

/// Where the file is written on an instance.
pub const ENV_FILE: &str = "/etc/tenant/app.env";

/// The system user the file belongs to (made by the start-up script if the image has none).
pub const APP_USER: &str = "app";

/// The name of the database the database step creates in each environment's MySQL instance.
pub const DATABASE_NAME: &str = "app";

/// The variables of `key`'s instances, in the order they are written: the tenant and
/// environment, the host name the app is served at, the AWS region, and the database once the
/// environment has one.
pub fn variables(
    key: &WorkflowKey,
    resources: &Resources,
    region: Option<&str>,
) -> Vec<(&'static str, String)> {
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
    vars
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

    fn key() -> WorkflowKey {
        WorkflowKey::new(TenantId::new("acme").expect("id"), Environment::Staging)
    }

    #[test]
    fn before_a_database_only_the_environment_is_named() {
        let vars = variables(&key(), &Resources::default(), None);
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
            }),
            ..Resources::default()
        };
        let text = render(&variables(&key(), &resources, Some("eu-west-1")));
        for line in [
            "TENANT_ID='acme'",
            "APP_HOST='staging.acme.example'",
            "AWS_REGION='eu-west-1'",
            "DB_HOST='acme-staging.c1.eu-west-1.rds.amazonaws.com'",
            "DB_PORT='3306'",
            "DB_NAME='app'",
            "DB_SECRET_ARN='arn:aws:secretsmanager:eu-west-1:1:secret:rds!db-1'",
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
}
