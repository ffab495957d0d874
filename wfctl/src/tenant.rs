//! `wfctl tenant add|list|show|set|rotate-token|signing-secret`: registering tenants, looking at
//! them, and changing their webhook secrets.
//!
//! A new tenant, or a rotation, gets a webhook secret token from the operating system's CSPRNG;
//! only its SHA-256 is stored. A new Standard Webhooks signing secret comes from the same
//! source and is stored as is (an HMAC key must be kept). Every new secret is written to stdout
//! before anything is stored, so no secret is ever in force that nobody received; if storing
//! then fails, the printed secret is void (the error says so) and nothing changed.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;
use workflows::{
    ConfigChange, Domain, EnvSettings, Environment, Event, Persisted, Scaling, Sizing, State,
    Tenant, TenantId, WebhookAuth, WorkflowKey,
};

use crate::output::{Cell, Printer, Style, Table, absolute};
use crate::views::{NewTenantView, RotatedTokenView, SigningSecretView, TenantView};
use crate::{Error, list_some};
use orchestrator::engine::enqueue;
use orchestrator::ports::{Queue, Store};
use orchestrator::tenants;

/// What `tenant add` registers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddRequest {
    /// The new tenant's id.
    pub id: TenantId,
    /// Its domain.
    pub domain: Domain,
    /// GitLab project id of its infrastructure repository.
    pub infra_project: u64,
    /// GitLab project id of its application repository.
    pub app_project: u64,
    /// Branch to environment; empty for [`Tenant::default_branches`].
    pub branches: Vec<(String, Environment)>,
    /// Production runs wait for `approve`.
    pub production_approval: bool,
}

/// Parses `BRANCH=ENV` (for `--branch`).
pub fn parse_branch(s: &str) -> Result<(String, Environment), String> {
    let (branch, env) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not BRANCH=ENV (for example main=production)"))?;
    check_branch(branch)?;
    let env = env.parse::<Environment>().map_err(|e| e.to_string())?;
    Ok((branch.to_owned(), env))
}

/// A branch name as GitLab sends it after `refs/heads/`: not empty, no blanks or control
/// characters, none of git's forbidden characters, and not a full ref.
fn check_branch(branch: &str) -> Result<(), String> {
    let rule = "a branch name without refs/heads/, blanks, control characters or any of ~^:?*[\\";
    let bad = branch.is_empty()
        || branch.len() > 255
        || branch.starts_with("refs/")
        || branch.starts_with('-')
        || branch.ends_with('/')
        || branch.ends_with(".lock")
        || branch.contains("..")
        || branch.contains("//")
        || branch
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || "~^:?*[\\".contains(c));
    if bad {
        Err(format!("invalid branch {branch:?}: {rule}"))
    } else {
        Ok(())
    }
}

impl AddRequest {
    /// The branch map: the given one (a branch given twice must name the same environment), or
    /// the default.
    fn branch_map(&self) -> Result<BTreeMap<String, Environment>, Error> {
        if self.branches.is_empty() {
            return Ok(Tenant::default_branches());
        }
        branch_map(&self.branches)
    }
}

/// `branches` as a map; a branch given twice must name the same environment.
fn branch_map(branches: &[(String, Environment)]) -> Result<BTreeMap<String, Environment>, Error> {
    let mut map = BTreeMap::new();
    for (branch, env) in branches {
        check_branch(branch).map_err(Error::Invalid)?;
        if let Some(other) = map.insert(branch.clone(), *env)
            && other != *env
        {
            return Err(Error::Invalid(format!(
                "branch {branch:?} is mapped to both {other} and {env}"
            )));
        }
    }
    Ok(map)
}

/// What `tenant set` changes; what is `None` stays as it is.
#[derive(Debug, Clone)]
pub struct SetRequest {
    /// The tenant.
    pub id: TenantId,
    /// A new domain: every environment's host moves to `<env>.<domain>`.
    pub domain: Option<Domain>,
    /// A new branch map, replacing the whole current one.
    pub branches: Option<Vec<(String, Environment)>>,
    /// Whether production runs wait for `approve`.
    pub production_approval: Option<bool>,
    /// The environment the settings below are for.
    pub env: Option<Environment>,
    /// The group's minimum size.
    pub min_size: Option<u32>,
    /// The group's maximum size.
    pub max_size: Option<u32>,
    /// The group's desired size.
    pub desired_size: Option<u32>,
    /// The instances' type.
    pub instance_type: Option<String>,
    /// The target-tracking policy (`Some(None)`: none).
    pub scaling: Option<Option<Scaling>>,
    /// How many releases are kept for rollback.
    pub keep_releases: Option<u32>,
    /// The platform's sizing (`[infrastructure]`), which the environment's settings override.
    pub defaults: Sizing,
    /// Who asks (recorded with the rollouts a change starts).
    pub actor: String,
}

impl SetRequest {
    fn env_fields_given(&self) -> bool {
        self.min_size.is_some()
            || self.max_size.is_some()
            || self.desired_size.is_some()
            || self.instance_type.is_some()
            || self.scaling.is_some()
            || self.keep_releases.is_some()
    }
}

/// Changes tenant `req.id`: domain, branch map, production approval, or one environment's
/// settings (sizing, scaling, releases kept). Everything is checked before anything is
/// written; the tenant is written only if it is still as it was read, and printed. A new
/// domain or new sizing is rolled out like a config change: each affected environment that
/// has a workflow gets a run that routes (the host may be new) and rolls out again. Runs
/// already started keep the approval setting they started with; pushes are mapped by the new
/// branches from the next one on.
pub async fn set<S: Store, Q: Queue>(
    store: &S,
    queue: &Q,
    req: &SetRequest,
    p: &mut Printer<'_>,
) -> Result<(), Error> {
    if req.branches.is_none()
        && req.production_approval.is_none()
        && req.domain.is_none()
        && !req.env_fields_given()
    {
        return Err(Error::Invalid(
            "nothing to change: give --domain, --branch, --production-approval, or --env with --min, --max, --desired, --instance-type, --scaling or --keep-releases".into(),
        ));
    }
    if req.env_fields_given() && req.env.is_none() {
        return Err(Error::Invalid(
            "--min, --max, --desired, --instance-type, --scaling and --keep-releases are per environment: give --env".into(),
        ));
    }
    let branches = req.branches.as_deref().map(branch_map).transpose()?;
    let Some(read) = store.tenant(&req.id).await? else {
        return Err(unknown_tenant(store, &req.id).await);
    };
    let mut tenant = read.clone();
    if let Some(map) = branches {
        tenant.branches = map;
    }
    if let Some(approval) = req.production_approval {
        tenant.production_approval = approval;
    }
    let mut rollouts: Vec<Environment> = Vec::new();
    if let Some(domain) = req.domain.as_ref().filter(|d| **d != read.domain) {
        if let Some(owner) = store.tenant_by_domain(domain).await? {
            return Err(Error::AlreadyExists(format!(
                "domain {domain} already belongs to tenant {}",
                owner.id
            )));
        }
        tenant.domain = domain.clone();
        rollouts.extend(Environment::ALL);
    }
    if let Some(env) = req.env {
        let before = tenant.env_settings(env);
        let settings = env_settings(req, before.clone())?;
        settings
            .sizing(&req.defaults)
            .map_err(|e| Error::Invalid(format!("{env}: {e}; nothing was changed")))?;
        let resized = sizing_fields(&settings) != sizing_fields(&before);
        tenant.set_env_settings(env, settings);
        if resized && !rollouts.contains(&env) {
            rollouts.push(env);
        }
    }
    if tenant != read {
        tenant.updated_at = p.now;
        store.update_tenant(&read, &tenant).await?;
        for env in rollouts {
            let key = WorkflowKey::new(req.id.clone(), env);
            if store.workflow(&key).await?.is_none() {
                continue;
            }
            let event = Event::Configure(ConfigChange {
                event_id: crate::signal::new_event_id("settings", &key, p.now)?,
                version: tenant.config_of(env).version,
                actor: req.actor.clone(),
            });
            enqueue(queue, &key, event, p.now).await?;
            p.note(&format!("{key}: rolling out with the new settings"))?;
        }
    }
    show(store, &req.id, p).await
}

/// What `tenant remove` does.
#[derive(Debug, Clone)]
pub struct RemoveRequest {
    /// The tenant.
    pub id: TenantId,
    /// Decommission what is not, waiting this long for each environment.
    pub decommission: Option<Duration>,
    /// Who asks.
    pub actor: String,
}

/// Removes tenant `req.id` once none of its environments holds anything: each is
/// decommissioned or was never provisioned. Otherwise refused naming them, or with
/// `decommission` they are decommissioned first (each waited for).
pub async fn remove<S: Store, Q: Queue>(
    store: &S,
    queue: &Q,
    req: &RemoveRequest,
    p: &mut Printer<'_>,
) -> Result<(), Error> {
    if store.tenant(&req.id).await?.is_none() {
        return Err(unknown_tenant(store, &req.id).await);
    }
    let filter = orchestrator::ports::WorkflowFilter {
        tenant: Some(req.id.clone()),
        ..Default::default()
    };
    let live: Vec<_> = crate::workflow::all_workflows(store, &filter)
        .await?
        .into_iter()
        .filter(|s| !matches!(s.state, State::Decommissioned | State::Unprovisioned))
        .collect();
    if !live.is_empty() {
        let Some(wait) = req.decommission else {
            return Err(Error::Refused(format!(
                "tenant {} still has environments that are not decommissioned: {}; decommission them first, or give --decommission; nothing was removed",
                req.id,
                list_some(
                    live.iter().map(|s| format!("{} ({})", s.key.env, s.state)),
                    3
                )
            )));
        };
        for summary in &live {
            let signal = crate::signal::SignalRequest {
                tenant: req.id.clone(),
                env: summary.key.env,
                signal: crate::signal::Action::Signal(workflows::Signal::Decommission),
                actor: req.actor.clone(),
                wait: Some(wait),
            };
            crate::signal::send(store, queue, &signal, p.now, p).await?;
        }
    }
    // Read after the decommissions (they mark the environments in the tenant record).
    let Some(read) = store.tenant(&req.id).await? else {
        return Err(unknown_tenant(store, &req.id).await);
    };
    store.remove_tenant(&read).await?;
    if p.is_json() {
        p.json(&serde_json::json!({ "id": req.id, "removed": true }))?;
    } else {
        p.line(&format!(
            "tenant {} removed; its GitLab projects and domain {} are free",
            req.id, read.domain
        ))?;
    }
    Ok(())
}

/// `before` with `req`'s per-environment fields applied; each checked alone (the sizing as a
/// whole is checked by the caller).
fn env_settings(req: &SetRequest, before: EnvSettings) -> Result<EnvSettings, Error> {
    let mut s = before;
    if let Some(n) = req.min_size {
        s.min_size = Some(n);
    }
    if let Some(n) = req.max_size {
        s.max_size = Some(n);
    }
    if let Some(n) = req.desired_size {
        s.desired_size = Some(n);
    }
    if let Some(t) = &req.instance_type {
        if !workflows::env_settings::valid_instance_type(t) {
            return Err(Error::Invalid(format!(
                "--instance-type {t:?} is not an EC2 instance type (family.size, like t3.micro); nothing was changed"
            )));
        }
        s.instance_type = Some(t.clone());
    }
    if let Some(scaling) = req.scaling {
        s.scaling = scaling;
    }
    if let Some(n) = req.keep_releases {
        if !(1..=workflows::env_settings::MAX_KEEP_RELEASES).contains(&n) {
            return Err(Error::Invalid(format!(
                "--keep-releases {n} is not within 1 and {}; nothing was changed",
                workflows::env_settings::MAX_KEEP_RELEASES
            )));
        }
        s.keep_releases = Some(n);
    }
    Ok(s)
}

/// What a group is made with (a change rolls out again).
fn sizing_fields(s: &EnvSettings) -> impl PartialEq + use<'_> {
    (
        s.min_size,
        s.max_size,
        s.desired_size,
        s.instance_type.as_deref(),
        s.scaling,
    )
}

/// Registers a tenant, prints its secret once, and stores only the secret's hash.
pub async fn add<S: Store>(store: &S, req: &AddRequest, p: &mut Printer<'_>) -> Result<(), Error> {
    if req.infra_project == req.app_project {
        return Err(Error::Invalid(format!(
            "the infra and app projects must be two different GitLab projects (both are {})",
            req.infra_project
        )));
    }
    if req.infra_project == 0 || req.app_project == 0 {
        return Err(Error::Invalid("GitLab project ids start at 1".into()));
    }
    let branches = req.branch_map()?;
    if store.tenant(&req.id).await?.is_some() {
        return Err(Error::AlreadyExists(format!(
            "tenant {} already exists (its secret cannot be shown again)",
            req.id
        )));
    }
    for project in [req.infra_project, req.app_project] {
        if let Some(owner) = store.tenant_by_project(project).await? {
            return Err(Error::AlreadyExists(format!(
                "GitLab project {project} already belongs to tenant {}",
                owner.id
            )));
        }
    }
    if let Some(owner) = store.tenant_by_domain(&req.domain).await? {
        return Err(Error::AlreadyExists(format!(
            "domain {} already belongs to tenant {}",
            req.domain, owner.id
        )));
    }

    let secret = tenants::try_generate_token().map_err(Error::Random)?;
    let now = p.now;
    let tenant = Tenant {
        schema_version: Tenant::SCHEMA_VERSION,
        id: req.id.clone(),
        domain: req.domain.clone(),
        infra_project: req.infra_project,
        app_project: req.app_project,
        branches,
        production_approval: req.production_approval,
        webhook: WebhookAuth {
            token_sha256: tenants::token_sha256(&secret),
            previous_token_sha256: None,
            previous_valid_until: None,
            signing_secret: None,
        },
        config: std::collections::BTreeMap::new(),
        environments: std::collections::BTreeMap::new(),
        created_at: now,
        updated_at: now,
    };

    // Deliver the secret before storing the tenant: a tenant must never exist with a secret
    // nobody has.
    let view = NewTenantView {
        tenant: TenantView::new(&tenant, now),
        webhook_secret: secret.clone(),
    };
    deliver(p, &view, &secret, "the tenant was not registered")?;

    if let Err(e) = store.put_tenant(&tenant, true).await {
        p.note("The tenant was not registered: the secret printed is void.")?;
        return Err(e.into());
    }
    if !p.is_json() {
        p.note(&format!(
            "Registered tenant {}. Its webhook secret token was written to stdout: set it as \
             the secret token of the webhooks of GitLab projects {} and {}. It will not be shown \
             again: only its hash is stored.",
            tenant.id, tenant.infra_project, tenant.app_project
        ))?;
    }
    Ok(())
}

/// Writes a new secret, before anything is stored: `view` in JSON mode, else the secret alone
/// on its line (so `> secret.txt` keeps it); then flushes. A failure is
/// [`Error::SecretNotDelivered`] with `undone`, what therefore did not happen.
fn deliver<T: Serialize>(
    p: &mut Printer<'_>,
    view: &T,
    secret: &str,
    undone: &'static str,
) -> Result<(), Error> {
    let written = if p.is_json() {
        p.json(view)
    } else {
        p.line(secret)
    };
    written
        .and_then(|()| p.flush())
        .map_err(|e| Error::SecretNotDelivered(e, undone))
}

/// Parses the grace period of `rotate-token --grace`: a duration like `30m`, `2h` or `7d`, or
/// `0`.
pub fn parse_grace(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| {
        format!("invalid duration {s:?} ({e}): write it like 30m, 2h or 7d, or 0 for no grace")
    })
}

/// Gives tenant `id` a new webhook secret token, prints it once and stores only its hash. The
/// token it replaces stays accepted for `grace` (with zero, not at all); an older previous
/// token still in its grace period is no longer accepted (the note says so).
pub async fn rotate_token<S: Store>(
    store: &S,
    id: &TenantId,
    grace: Duration,
    p: &mut Printer<'_>,
) -> Result<(), Error> {
    let Some(read) = store.tenant(id).await? else {
        return Err(unknown_tenant(store, id).await);
    };
    let mut tenant = read.clone();
    let now = p.now;
    let dropped = TenantView::new(&tenant, now).previous_token_valid_until;
    let secret = tenants::try_generate_token().map_err(Error::Random)?;
    tenants::rotate_token(&mut tenant, &secret, now, grace);
    let previous_valid_until = tenant.webhook.previous_valid_until;

    let view = RotatedTokenView {
        tenant: TenantView::new(&tenant, now),
        webhook_secret: secret.clone(),
        previous_valid_until,
    };
    deliver(p, &view, &secret, "the token was not rotated")?;
    if let Err(e) = store.update_tenant(&read, &tenant).await {
        p.note(
            "The token was not rotated: the secret printed is void and the current token stays \
             valid.",
        )?;
        return Err(e.into());
    }
    if !p.is_json() {
        let old = match previous_valid_until {
            Some(until) => format!(
                "The previous token is accepted until {} UTC ({}).",
                absolute(until),
                p.ago(until)
            ),
            None => "The previous token is no longer accepted.".to_owned(),
        };
        p.note(&format!(
            "Rotated the webhook secret token of tenant {}. The new token was written to stdout: \
             set it as the secret token of the webhooks of GitLab projects {} and {}. It will \
             not be shown again: only its hash is stored. {old}",
            tenant.id, tenant.infra_project, tenant.app_project
        ))?;
        if let Some(until) = dropped {
            p.note(&format!(
                "The token before the last rotation, which was to be accepted until {} UTC, no \
                 longer is.",
                absolute(until)
            ))?;
        }
    }
    Ok(())
}

/// Gives tenant `id` a new Standard Webhooks signing secret (replacing any current one) and
/// prints it once. From then on the ingress requires its webhooks to be signed with it.
pub async fn generate_signing_secret<S: Store>(
    store: &S,
    id: &TenantId,
    p: &mut Printer<'_>,
) -> Result<(), Error> {
    let Some(read) = store.tenant(id).await? else {
        return Err(unknown_tenant(store, id).await);
    };
    let mut tenant = read.clone();
    let now = p.now;
    let replaced = tenant.webhook.signing_secret.is_some();
    let secret = tenants::try_generate_signing_secret().map_err(Error::Random)?;
    tenant.webhook.signing_secret = Some(secret.clone());
    tenant.updated_at = now;

    let view = SigningSecretView {
        tenant: TenantView::new(&tenant, now),
        signing_secret: Some(secret.clone()),
    };
    deliver(p, &view, &secret, "the signing secret was not changed")?;
    if let Err(e) = store.update_tenant(&read, &tenant).await {
        p.note(
            "The signing secret was not changed: the secret printed is void and any current one \
             stays in force.",
        )?;
        return Err(e.into());
    }
    if !p.is_json() {
        let before = if replaced {
            " The previous signing secret is no longer accepted."
        } else {
            ""
        };
        p.note(&format!(
            "Set a new Standard Webhooks signing secret for tenant {}; it was written to stdout. \
             From now on its webhooks must carry a valid signature (webhook-id, \
             webhook-timestamp, webhook-signature) as well as the secret token.{before} It will \
             not be shown again.",
            tenant.id
        ))?;
    }
    Ok(())
}

/// Removes tenant `id`'s signing secret: its webhooks need no longer be signed. Removing a
/// secret that is not set changes nothing and is no error.
pub async fn remove_signing_secret<S: Store>(
    store: &S,
    id: &TenantId,
    p: &mut Printer<'_>,
) -> Result<(), Error> {
    let Some(read) = store.tenant(id).await? else {
        return Err(unknown_tenant(store, id).await);
    };
    let mut tenant = read.clone();
    let now = p.now;
    let had = tenant.webhook.signing_secret.take().is_some();
    if had {
        tenant.updated_at = now;
        store.update_tenant(&read, &tenant).await?;
    }
    if p.is_json() {
        p.json(&SigningSecretView {
            tenant: TenantView::new(&tenant, now),
            signing_secret: None,
        })?;
    } else if had {
        p.note(&format!(
            "Removed the signing secret of tenant {}: its webhooks need no longer be signed \
             (the secret token is still required).",
            tenant.id
        ))?;
    } else {
        p.note(&format!(
            "Tenant {} has no signing secret; nothing changed.",
            tenant.id
        ))?;
    }
    Ok(())
}

/// The branch map in words: `dev→dev main,master→production staging→staging`.
fn branches_summary(branches: &BTreeMap<String, Environment>) -> String {
    let mut by_env: BTreeMap<Environment, Vec<&str>> = BTreeMap::new();
    for (branch, env) in branches {
        by_env.entry(*env).or_default().push(branch);
    }
    by_env
        .iter()
        .map(|(env, bs)| format!("{}={env}", bs.join(",")))
        .collect::<Vec<_>>()
        .join(" ")
}

fn yes_no(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

/// Lists every tenant.
pub async fn list<S: Store>(store: &S, p: &mut Printer<'_>) -> Result<(), Error> {
    let tenants = store.tenants().await?;
    if p.is_json() {
        let views: Vec<TenantView> = tenants.iter().map(|t| TenantView::new(t, p.now)).collect();
        p.json(&views)?;
        return Ok(());
    }
    if tenants.is_empty() {
        p.note("no tenants are registered (wfctl tenant add registers one)")?;
        return Ok(());
    }
    let mut table = Table::new([
        "ID",
        "DOMAIN",
        "INFRA PROJECT",
        "APP PROJECT",
        "BRANCHES",
        "APPROVAL",
        "CREATED",
    ]);
    for t in &tenants {
        table.row([
            Cell::from(t.id.as_str()),
            Cell::from(t.domain.as_str()),
            Cell::from(t.infra_project.to_string()),
            Cell::from(t.app_project.to_string()),
            Cell::from(branches_summary(&t.branches)),
            Cell::from(if t.production_approval {
                "production"
            } else {
                "-"
            }),
            Cell::from(p.ago(t.created_at)),
        ]);
    }
    p.table(&table)?;
    Ok(())
}

/// The error for a tenant that does not exist, listing those that do.
pub async fn unknown_tenant<S: Store>(store: &S, id: &TenantId) -> Error {
    match store.tenants().await {
        Ok(all) if all.is_empty() => Error::NotFound(format!(
            "no tenant {:?}; no tenants are registered",
            id.as_str()
        )),
        Ok(all) => Error::NotFound(format!(
            "no tenant {:?}; tenants: {}",
            id.as_str(),
            list_some(all.iter().map(|t| &t.id), 20)
        )),
        Err(_) => Error::NotFound(format!("no tenant {:?}", id.as_str())),
    }
}

/// Shows one tenant (never its token hash or signing secret).
pub async fn show<S: Store>(store: &S, id: &TenantId, p: &mut Printer<'_>) -> Result<(), Error> {
    let Some(t) = store.tenant(id).await? else {
        return Err(unknown_tenant(store, id).await);
    };
    let view = TenantView::new(&t, p.now);
    if p.is_json() {
        p.json(&view)?;
        return Ok(());
    }
    let mut block = Table::headless();
    block.row(["tenant", t.id.as_str()]);
    block.row(["domain", t.domain.as_str()]);
    block.row(["infra project", &t.infra_project.to_string()]);
    block.row(["app project", &t.app_project.to_string()]);
    block.row([
        "production approval",
        if t.production_approval {
            "required"
        } else {
            "not required"
        },
    ]);
    block.row(["webhook token", "set (only its hash is stored)"]);
    if let Some(until) = view.previous_token_valid_until {
        block.row([
            "previous token".to_owned(),
            format!("accepted until {} UTC ({})", absolute(until), p.ago(until)),
        ]);
    }
    block.row(["signing secret", yes_no(view.signing_secret_set)]);
    block.row([
        "created".to_owned(),
        format!("{} UTC ({})", absolute(t.created_at), p.ago(t.created_at)),
    ]);
    block.row([
        "updated".to_owned(),
        format!("{} UTC ({})", absolute(t.updated_at), p.ago(t.updated_at)),
    ]);
    p.table(&block)?;
    p.line("")?;
    let mut branches = Table::new(["BRANCH", "ENVIRONMENT"]).indent(2);
    for (branch, env) in &t.branches {
        branches.row([
            Cell::from(branch.as_str()),
            Cell::styled(env.as_str(), Style::Plain),
        ]);
    }
    p.line("branches")?;
    p.table(&branches)?;
    if !t.environments.is_empty() {
        p.line("")?;
        p.line("environment settings (unset: the platform's default)")?;
        let mut envs = Table::new([
            "ENV", "MIN", "MAX", "DESIRED", "TYPE", "SCALING", "KEEP", "STATE",
        ])
        .indent(2);
        let or_dash = |v: Option<String>| v.unwrap_or_else(|| "-".to_owned());
        for (env, s) in &t.environments {
            envs.row([
                Cell::from(env.as_str()),
                Cell::from(or_dash(s.min_size.map(|n| n.to_string()))),
                Cell::from(or_dash(s.max_size.map(|n| n.to_string()))),
                Cell::from(or_dash(s.desired_size.map(|n| n.to_string()))),
                Cell::from(or_dash(s.instance_type.clone())),
                Cell::from(or_dash(s.scaling.map(|x| x.to_string()))),
                Cell::from(or_dash(s.keep_releases.map(|n| n.to_string()))),
                if s.decommissioned {
                    Cell::styled("decommissioned", Style::Dim)
                } else {
                    Cell::from("-")
                },
            ]);
        }
        p.table(&envs)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn branches_parse_as_branch_equals_env() {
        assert_eq!(
            parse_branch("main=production"),
            Ok(("main".to_owned(), Environment::Production))
        );
        assert_eq!(
            parse_branch("release/2.x=staging"),
            Ok(("release/2.x".to_owned(), Environment::Staging))
        );
        for bad in ["main", "=dev", "refs/heads/main=dev", "a b=dev", "x..y=dev"] {
            assert!(parse_branch(bad).is_err(), "{bad}");
        }
        let e = parse_branch("main=prod").expect_err("bad env");
        assert!(e.contains("dev, staging, production"), "{e}");
    }

    #[test]
    fn branch_maps_default_and_reject_contradictions() {
        let mut req = AddRequest {
            id: TenantId::new("acme").expect("valid"),
            domain: Domain::new("acme.example").expect("valid"),
            infra_project: 1,
            app_project: 2,
            branches: Vec::new(),
            production_approval: false,
        };
        assert_eq!(
            req.branch_map().expect("default"),
            Tenant::default_branches()
        );
        req.branches = vec![
            ("main".into(), Environment::Production),
            ("main".into(), Environment::Dev),
        ];
        assert!(req.branch_map().is_err());
        req.branches = vec![
            ("main".into(), Environment::Production),
            ("trunk".into(), Environment::Production),
        ];
        let map = req.branch_map().expect("two branches to one env");
        assert_eq!(branches_summary(&map), "main,trunk=production");
    }
}
