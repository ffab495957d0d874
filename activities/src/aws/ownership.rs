//! Which resources are the environment's own.
//!
//! Names are predictable (`<tenant>-<env>`, `<env>.<domain>`), so a resource found by name
//! may belong to someone else: another tenant's rule for a host, a group somebody created by
//! hand, a leftover of another installation. A reconciler adopts a resource only when its tags
//! say it was created by the orchestrator (`managed-by`) for this tenant and environment; one
//! found by name that is not is a terminal error naming it and its owner, and is never
//! changed. Decommissioning leaves such resources alone.

use super::names::{TAG_ENV, TAG_MANAGED_BY, TAG_TENANT};
use super::{Error, MANAGED_BY, Names};

/// Whether `tags` (key, value) mark a resource of `names`' environment.
pub(super) fn is_ours<'t>(
    names: &Names,
    tags: impl IntoIterator<Item = (Option<&'t str>, Option<&'t str>)>,
) -> bool {
    let owner = Owner::of(tags);
    owner.managed_by.as_deref() == Some(MANAGED_BY)
        && owner.tenant.as_deref() == Some(names.key().tenant.as_str())
        && owner.env.as_deref() == Some(names.key().env.as_str())
}

/// `Ok` if `tags` mark `what` (`"listener rule arn:…"`) as `names`' environment's, else the
/// terminal error that names it and whom its tags say it belongs to.
pub(super) fn check<'t>(
    names: &Names,
    what: &str,
    tags: impl IntoIterator<Item = (Option<&'t str>, Option<&'t str>)> + Clone,
) -> Result<(), Error> {
    if is_ours(names, tags.clone()) {
        return Ok(());
    }
    let owner = Owner::of(tags);
    let whose = match (&owner.managed_by, &owner.tenant, &owner.env) {
        (Some(m), Some(t), Some(e)) if m == MANAGED_BY => {
            format!("it belongs to tenant {t}, environment {e}")
        }
        (Some(m), ..) if m == MANAGED_BY => {
            "its tenant and env tags are missing or altered".to_owned()
        }
        _ => "it was not created by the orchestrator".to_owned(),
    };
    Err(Error::Terminal(format!(
        "{what} exists but is not {}'s: {whose}; it is left as it is (remove or rename it, or give this tenant another id or domain)",
        names.key()
    )))
}

/// The owner a resource's tags name.
#[derive(Debug, Default)]
struct Owner {
    managed_by: Option<String>,
    tenant: Option<String>,
    env: Option<String>,
}

impl Owner {
    fn of<'t>(tags: impl IntoIterator<Item = (Option<&'t str>, Option<&'t str>)>) -> Self {
        let mut owner = Owner::default();
        for (key, value) in tags {
            let slot = match key {
                Some(TAG_MANAGED_BY) => &mut owner.managed_by,
                Some(TAG_TENANT) => &mut owner.tenant,
                Some(TAG_ENV) => &mut owner.env,
                _ => continue,
            };
            *slot = value.map(str::to_owned);
        }
        owner
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use workflows::{Environment, TenantId, WorkflowKey};

    fn names() -> Names {
        Names::new(&WorkflowKey::new(
            TenantId::new("acme").expect("id"),
            Environment::Dev,
        ))
    }

    fn tags<'a>(pairs: &'a [(&'a str, &'a str)]) -> Vec<(Option<&'a str>, Option<&'a str>)> {
        pairs.iter().map(|(k, v)| (Some(*k), Some(*v))).collect()
    }

    #[test]
    fn only_the_environments_own_tags_make_a_resource_ours() {
        let n = names();
        let ours = [
            ("managed-by", MANAGED_BY),
            ("tenant", "acme"),
            ("env", "dev"),
            ("run", "3"),
        ];
        assert!(is_ours(&n, tags(&ours)));
        assert!(check(&n, "rule r", tags(&ours)).is_ok());
        let cases: [(&[(&str, &str)], &str); 5] = [
            (
                &[
                    ("managed-by", MANAGED_BY),
                    ("tenant", "globex"),
                    ("env", "dev"),
                ],
                "belongs to tenant globex, environment dev",
            ),
            (
                &[
                    ("managed-by", MANAGED_BY),
                    ("tenant", "acme"),
                    ("env", "production"),
                ],
                "belongs to tenant acme, environment production",
            ),
            (
                &[("managed-by", MANAGED_BY), ("tenant", "acme")],
                "missing or altered",
            ),
            (
                &[("tenant", "acme"), ("env", "dev")],
                "not created by the orchestrator",
            ),
            (&[], "not created by the orchestrator"),
        ];
        for (pairs, why) in cases {
            assert!(!is_ours(&n, tags(pairs)), "{pairs:?}");
            let e = check(&n, "target group acme-dev", tags(pairs)).expect_err("foreign");
            assert!(!e.is_retryable());
            let text = e.to_string();
            assert!(
                text.contains("target group acme-dev") && text.contains(why),
                "{pairs:?}: {text}"
            );
        }
    }
}
