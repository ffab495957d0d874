//! `wfctl config set|unset|list TENANT --env E`: an environment's config vars, kept with the
//! tenant record and versioned. A change is written only if the tenant is still as it was read
//! (a concurrent change makes this one fail with a retryable conflict, exit code 3); then, if
//! the environment has a workflow, a `Configure` event goes through the events queue, and the
//! workflow rolls the release out again with the new vars as an app push would (after the run
//! in progress, if one is).

use serde::Serialize;
use workflows::config::{self, ConfigValue, EnvConfig};
use workflows::{ConfigChange, Environment, Event, TenantId, WorkflowKey};

use orchestrator::engine::enqueue;
use orchestrator::ports::{Queue, Store};

use crate::error::Error;
use crate::output::Printer;
use crate::signal::new_event_id;
use crate::tenant::unknown_tenant;

/// What `config list` prints in JSON, and `set`/`unset` after a change.
#[derive(Debug, Serialize)]
pub struct ConfigView<'a> {
    /// The tenant.
    pub tenant: &'a TenantId,
    /// The environment.
    pub env: Environment,
    /// The config's version: incremented by every change, 0 for none ever.
    pub version: u64,
    /// The vars by name: `{"value": ...}` or `{"secret_arn": ...}`.
    pub vars: &'a std::collections::BTreeMap<String, ConfigValue>,
}

/// A change to an environment's vars.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Set these vars (replacing their values).
    Set(Vec<(String, ConfigValue)>),
    /// Remove these vars; removing one that is not set is no error.
    Unset(Vec<String>),
}

/// Parses `NAME=VALUE` (a plain value; the value may hold `=`).
pub fn parse_assignment(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((name, value)) => Ok((name.to_owned(), value.to_owned())),
        None => Err(format!("{text:?} is not NAME=VALUE")),
    }
}

/// Applies `change` to tenant `id`'s config of `env`, has the environment's workflow roll it
/// out (a `Configure` event from `actor`), and prints the result.
#[allow(clippy::too_many_arguments)]
pub async fn change<S: Store, Q: Queue>(
    store: &S,
    queue: &Q,
    id: &TenantId,
    env: Environment,
    change: &Change,
    actor: &str,
    p: &mut Printer<'_>,
) -> Result<(), Error> {
    // Every var is checked before anything is written: a bad one changes nothing.
    if let Change::Set(vars) = change {
        for (name, value) in vars {
            config::check(name, value).map_err(|e| Error::Invalid(e.to_string()))?;
        }
    }
    let Some(read) = store.tenant(id).await? else {
        return Err(unknown_tenant(store, id).await);
    };
    let mut tenant = read.clone();
    let mut config = tenant.config_of(env);
    let before = config.vars.clone();
    match change {
        Change::Set(vars) => {
            for (name, value) in vars {
                config.vars.insert(name.clone(), value.clone());
            }
        }
        Change::Unset(names) => {
            for name in names {
                config.vars.remove(name);
            }
        }
    }
    let changed = config.vars != before;
    if changed {
        config.version += 1;
        tenant.updated_at = p.now;
        // Kept when emptied: the version goes on counting.
        tenant.config.insert(env, config.clone());
        store.update_tenant(&read, &tenant).await?;
    }
    let key = WorkflowKey::new(id.clone(), env);
    let rolled = changed && store.workflow(&key).await?.is_some();
    if rolled {
        let event = Event::Configure(ConfigChange {
            event_id: new_event_id("config", &key, p.now)?,
            version: config.version,
            actor: actor.to_owned(),
        });
        enqueue(queue, &key, event, p.now).await?;
    }
    print(p, id, env, &config)?;
    if !p.is_json() {
        p.note(&match (changed, rolled) {
            (true, true) => format!(
                "Config of {key} is now version {}; the workflow rolls it out (`wfctl show {id} \
                 --env {env}`). Instances started before keep the old values until replaced.",
                config.version
            ),
            (true, false) => format!(
                "Config of {key} is now version {}; the environment's first deployment gives \
                 it to the app.",
                config.version
            ),
            (false, _) => format!("Config of {key} unchanged (version {}).", config.version),
        })?;
    }
    Ok(())
}

/// Prints tenant `id`'s config vars of `env`.
pub async fn list<S: Store>(
    store: &S,
    id: &TenantId,
    env: Environment,
    p: &mut Printer<'_>,
) -> Result<(), Error> {
    let Some(tenant) = store.tenant(id).await? else {
        return Err(unknown_tenant(store, id).await);
    };
    print(p, id, env, &tenant.config_of(env))
}

/// The vars as `NAME=VALUE` lines (a secret as `NAME=<secret ARN>` marked so), or JSON.
fn print(
    p: &mut Printer<'_>,
    id: &TenantId,
    env: Environment,
    config: &EnvConfig,
) -> Result<(), Error> {
    if p.is_json() {
        p.json(&ConfigView {
            tenant: id,
            env,
            version: config.version,
            vars: &config.vars,
        })?;
        return Ok(());
    }
    for (name, value) in &config.vars {
        match value {
            ConfigValue::Value(v) => p.line(&format!("{name}={v}"))?,
            ConfigValue::SecretArn(arn) => p.line(&format!("{name} from secret {arn}"))?,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assignments_split_at_the_first_equals_sign() {
        assert_eq!(
            parse_assignment("URL=postgres://a?b=c"),
            Ok(("URL".to_owned(), "postgres://a?b=c".to_owned()))
        );
        assert_eq!(
            parse_assignment("EMPTY="),
            Ok(("EMPTY".to_owned(), String::new()))
        );
        assert!(parse_assignment("NOPE").is_err());
    }
}
