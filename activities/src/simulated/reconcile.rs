//! One reconciler per step kind, run inside one `BEGIN IMMEDIATE` transaction: describe, then
//! adopt, then create. A reconciler stops at the first thing it has to wait for; with zero
//! latency nothing has to be waited for, and the actions of a step (image: builder, image,
//! builder termination; rollout: new group, deletion of the old ones) follow one another in
//! the same invocation.

use std::time::Duration;

use rusqlite::Connection;
use serde::{Deserialize, Serialize};
use workflows::{
    DatabaseOutput, DeploymentOutput, Domain, GitSha, ImageOutput, NetworkOutput, Release,
    RoutingOutput, RunId, SourceOutput, StepKind, StepOutput, StepTask, WorkflowKey,
};

use super::config::MAX_LISTENER_PRIORITY;
use super::store::{self, NewResource, ResourceKind, Row};
use super::{Error, SimConfig};
use crate::Outcome;

/// Region and account the simulated ids and ARNs name.
const REGION: &str = "eu-west-1";
const ACCOUNT: &str = "000000000000";

/// Everything one invocation works with.
pub(super) struct Cx<'a> {
    pub(super) key: &'a WorkflowKey,
    pub(super) domain: &'a Domain,
    pub(super) task: &'a StepTask,
    pub(super) now_ms: i64,
    pub(super) config: &'a SimConfig,
    /// The environment's config vars (what its instances are given).
    pub(super) env_config: &'a workflows::EnvConfig,
    /// The environment's settings (its group's sizing).
    pub(super) env_settings: &'a workflows::EnvSettings,
    /// A uniform sample in `[0, 1)` deciding whether the scripts of a builder or group created
    /// by this invocation fail (1 when no failures are configured).
    pub(super) sample: f64,
}

impl Cx<'_> {
    fn workflow(&self) -> String {
        self.key.to_string()
    }

    /// `<tenant>-<env>`, the stem of every per-environment name.
    fn stem(&self) -> String {
        format!("{}-{}", self.key.tenant, self.key.env)
    }

    /// When something created now with `latency` (simulated time) is ready.
    fn ready_at(&self, latency: Duration) -> i64 {
        let scaled = self.config.scaled(latency);
        self.now_ms
            .saturating_add(i64::try_from(scaled.as_millis()).unwrap_or(i64::MAX))
    }

    fn is_ready(&self, row: &Row) -> bool {
        row.ready_at_ms <= self.now_ms
    }

    /// Look again when `ready_at_ms` comes, but no later than the (scaled) recheck cap and
    /// no sooner than 1 ms.
    fn progress(&self, ready_at_ms: i64, note: String) -> Outcome {
        let left = Duration::from_millis(
            u64::try_from(ready_at_ms.saturating_sub(self.now_ms)).unwrap_or(0),
        );
        let cap = self
            .config
            .scaled(Duration::from_millis(self.config.max_recheck_ms));
        let recheck_after = left.min(cap).max(Duration::from_millis(1));
        tracing::debug!(recheck_after_ms = recheck_after.as_millis(), note = %note, "step progressing");
        Outcome::Progress {
            recheck_after,
            note,
        }
    }

    fn new_resource<'n>(
        &'n self,
        kind: ResourceKind,
        name: &'n str,
        workflow: Option<&'n str>,
        ready_at_ms: i64,
    ) -> NewResource<'n> {
        NewResource {
            kind,
            name,
            workflow,
            now_ms: self.now_ms,
            ready_at_ms,
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct SecurityGroupAttrs {
    role: String,
    ingress: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct ArtifactAttrs {
    sha: GitSha,
    uploaded_by: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct BuilderAttrs {
    infra_sha: GitSha,
    base_image_id: String,
    /// Whether its provisioning scripts fail (drawn at launch).
    #[serde(default)]
    scripts_fail: bool,
}

#[derive(Debug, Serialize, Deserialize)]
struct ImageAttrs {
    infra_sha: GitSha,
}

#[derive(Debug, Serialize, Deserialize)]
struct DatabaseAttrs {
    endpoint: String,
    secret_arn: String,
    engine: String,
    storage_encrypted: bool,
    /// The final snapshot it was restored from, if it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    restored_from: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
struct TargetGroupAttrs {
    port: u16,
}

#[derive(Debug, Serialize, Deserialize)]
struct ListenerRuleAttrs {
    host: String,
    priority: u32,
    target_group_arn: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct GroupAttrs {
    run: RunId,
    image_id: String,
    release: Release,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    target_group_arn: Option<String>,
    /// The environment file its instances are given (`crate::app_env`); empty for groups
    /// of a simulation file from before there was one.
    #[serde(default)]
    env_file: String,
    /// Whether `install.sh` fails on its instances (drawn at creation).
    #[serde(default)]
    install_fails: bool,
    /// Its sizing: min, max and desired instances (absent in files from before sizing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    size: Option<(u32, u32, u32)>,
    /// Its instances' type.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    instance_type: Option<String>,
    /// Its target-tracking policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    scaling: Option<workflows::Scaling>,
}

/// Runs the reconciler of `cx.task.step` once.
pub(super) fn reconcile(conn: &Connection, cx: &Cx<'_>) -> Result<Outcome, Error> {
    let step = cx.task.step;
    // A step whose attempts began before the environment was decommissioned is a late message
    // of a run that ended; one that began later belongs to a run that provisions it again.
    if step != StepKind::Decommission
        && store::decommissioned_at(conn, &cx.workflow())?
            .is_some_and(|at| at >= cx.task.first_attempt_at.as_unix_millis())
    {
        return Err(Error::Decommissioned(cx.workflow()));
    }
    match step {
        StepKind::Network => network(conn, cx),
        StepKind::SourceInfra => source(conn, cx, cx.task.release.infra.as_ref(), "infra"),
        StepKind::SourceApp => source(conn, cx, cx.task.release.app.as_ref(), "app"),
        StepKind::Image => image(conn, cx),
        StepKind::Database => database(conn, cx),
        StepKind::Routing => routing(conn, cx),
        StepKind::Rollout => rollout(conn, cx),
        StepKind::Decommission => decommission(conn, cx),
    }
}

/// Two security groups: the instances' (from the load balancer only) and the database's
/// (3306 from the instances' group only), created together.
fn network(conn: &Connection, cx: &Cx<'_>) -> Result<Outcome, Error> {
    let stem = cx.stem();
    let workflow = cx.workflow();
    let instances = format!("{stem}-instances");
    let database = format!("{stem}-database");
    let ready_at = cx.ready_at(cx.config.latency(StepKind::Network));
    let ensure = |name: &str, role: &str, ingress: String| -> Result<Row, Error> {
        if let Some(row) = store::find(conn, ResourceKind::SecurityGroup, name)? {
            return Ok(row);
        }
        store::create(
            conn,
            cx.new_resource(ResourceKind::SecurityGroup, name, Some(&workflow), ready_at),
            |n| format!("sg-{n:017x}"),
            |_, _| SecurityGroupAttrs {
                role: role.to_owned(),
                ingress,
            },
        )
    };
    let instances = ensure(
        &instances,
        "instances",
        "tcp 80 from the load balancer's group".to_owned(),
    )?;
    let database = ensure(
        &database,
        "database",
        format!("tcp 3306 from {}", instances.id),
    )?;
    let ready_at = instances.ready_at_ms.max(database.ready_at_ms);
    if ready_at > cx.now_ms {
        return Ok(cx.progress(
            ready_at,
            format!(
                "security groups {} and {} pending",
                instances.id, database.id
            ),
        ));
    }
    Ok(Outcome::Done(StepOutput::Network(NetworkOutput {
        instance_security_group: instances.id,
        database_security_group: database.id,
    })))
}

/// The packed source of `sha` under a content-addressed key, uploaded once.
fn source(
    conn: &Connection,
    cx: &Cx<'_>,
    sha: Option<&GitSha>,
    repo: &str,
) -> Result<Outcome, Error> {
    let sha = sha.ok_or_else(|| {
        Error::InvalidParameter(format!("the release has no {repo} commit to fetch"))
    })?;
    let key = format!("src/{sha}.tar.gz");
    let row = match store::find(conn, ResourceKind::Artifact, &key)? {
        Some(row) => row,
        None => store::create(
            conn,
            cx.new_resource(
                ResourceKind::Artifact,
                &key,
                None,
                cx.ready_at(cx.config.latency(cx.task.step)),
            ),
            |_| key.clone(),
            |_, _| ArtifactAttrs {
                sha: sha.clone(),
                uploaded_by: cx.workflow(),
            },
        )?,
    };
    if !cx.is_ready(&row) {
        return Ok(cx.progress(row.ready_at_ms, format!("uploading {key}")));
    }
    Ok(Outcome::Done(StepOutput::Source(SourceOutput {
        sha: sha.clone(),
        artifact_key: key,
    })))
}

/// A builder instance runs the tenant's scripts on the base image (first half of the image
/// latency), the image is created from the stopped builder (second half), then the builder
/// is terminated.
fn image(conn: &Connection, cx: &Cx<'_>) -> Result<Outcome, Error> {
    let sha = cx.task.release.infra.as_ref().ok_or_else(|| {
        Error::InvalidParameter("the release has no infra commit to build an image of".to_owned())
    })?;
    let stem = cx.stem();
    let workflow = cx.workflow();
    let image_name = format!("{stem}-{sha}");
    let builder_name = builder_name(cx.key, sha);
    let latency = cx.config.latency(StepKind::Image);
    let builder_share = latency / 2;
    // Each pass either returns or takes one action that changes what the next pass sees;
    // image, builder and termination take three passes at most.
    for _ in 0..4 {
        if let Some(image) = store::find(conn, ResourceKind::Image, &image_name)? {
            if !cx.is_ready(&image) {
                return Ok(cx.progress(image.ready_at_ms, format!("image {} pending", image.id)));
            }
            store::delete(conn, ResourceKind::Builder, &builder_name)?;
            return Ok(Outcome::Done(StepOutput::Image(ImageOutput {
                infra_sha: sha.clone(),
                image_id: image.id,
            })));
        }
        match store::find(conn, ResourceKind::Builder, &builder_name)? {
            None => {
                // Build once, promote: another environment's image of the commit is copied
                // (a quarter of the image latency) instead of built.
                if let Some(source) = promotable(conn, cx, sha)? {
                    let image = store::create(
                        conn,
                        cx.new_resource(
                            ResourceKind::Image,
                            &image_name,
                            Some(&workflow),
                            cx.ready_at(latency / 4),
                        ),
                        |n| format!("ami-{n:017x}"),
                        |_, _| ImageAttrs {
                            infra_sha: sha.clone(),
                        },
                    )?;
                    if !cx.is_ready(&image) {
                        return Ok(cx.progress(
                            image.ready_at_ms,
                            format!("image {} copying from {}", image.id, source.name),
                        ));
                    }
                    continue;
                }
                if let Some(sibling) = sibling_build(conn, cx, sha)? {
                    // Its image is requested when the builder is done and takes the rest.
                    let done = sibling.ready_at_ms.max(cx.now_ms)
                        + i64::try_from(cx.config.scaled(latency - builder_share).as_millis())
                            .unwrap_or(i64::MAX);
                    return Ok(cx.progress(
                        done,
                        format!("waiting for {}'s build, to copy its image", sibling.name),
                    ));
                }
                let builder = store::create(
                    conn,
                    cx.new_resource(
                        ResourceKind::Builder,
                        &builder_name,
                        Some(&workflow),
                        cx.ready_at(builder_share),
                    ),
                    |n| format!("i-{n:017x}"),
                    |_, _| BuilderAttrs {
                        infra_sha: sha.clone(),
                        base_image_id: cx.config.base_image_id.clone(),
                        scripts_fail: cx.sample < cx.config.script_failure_probability,
                    },
                )?;
                if !cx.is_ready(&builder) {
                    return Ok(cx.progress(
                        builder.ready_at_ms,
                        format!("builder {} running the provisioning scripts", builder.id),
                    ));
                }
            }
            Some(builder) if !cx.is_ready(&builder) => {
                return Ok(cx.progress(
                    builder.ready_at_ms,
                    format!("builder {} running the provisioning scripts", builder.id),
                ));
            }
            Some(stopped) => {
                let attrs: BuilderAttrs = stopped.attrs()?;
                if attrs.scripts_fail {
                    store::delete(conn, ResourceKind::Builder, &builder_name)?;
                    // An outcome, not an error: the deletion must be committed.
                    return Ok(Outcome::Terminal(format!(
                        "{}\n(the builder was terminated)",
                        simulated_failure(
                            "provision/10-base.sh",
                            &format!("builder {}", stopped.id)
                        )
                    )));
                }
                store::create(
                    conn,
                    cx.new_resource(
                        ResourceKind::Image,
                        &image_name,
                        Some(&workflow),
                        cx.ready_at(latency - builder_share),
                    ),
                    |n| format!("ami-{n:017x}"),
                    |_, _| ImageAttrs {
                        infra_sha: sha.clone(),
                    },
                )?;
            }
        }
    }
    Err(Error::Corrupt {
        kind: ResourceKind::Image.to_string(),
        name: image_name,
        reason: "the image reconciler did not settle".to_owned(),
    })
}

/// The failure a script report of the simulated `script` on `what` describes.
fn simulated_failure(script: &str, what: &str) -> String {
    let text = format!(
        "{}\nok fetch\nok unpack\nfailed 1 {script}\n| simulated failure of {script}\n",
        crate::report::HEADER
    );
    crate::report::Report::parse(&text)
        .failure(what)
        .unwrap_or_default()
}

/// An available image of `sha` built for another of the tenant's environments.
fn promotable(conn: &Connection, cx: &Cx<'_>, sha: &GitSha) -> Result<Option<Row>, Error> {
    for env in workflows::Environment::ALL {
        if env == cx.key.env {
            continue;
        }
        let name = format!("{}-{env}-{sha}", cx.key.tenant);
        if let Some(row) = store::find(conn, ResourceKind::Image, &name)?
            && cx.is_ready(&row)
        {
            return Ok(Some(row));
        }
    }
    Ok(None)
}

/// A builder of `sha` of another of the tenant's environments.
fn sibling_build(conn: &Connection, cx: &Cx<'_>, sha: &GitSha) -> Result<Option<Row>, Error> {
    for env in workflows::Environment::ALL {
        if env == cx.key.env {
            continue;
        }
        let key = WorkflowKey::new(cx.key.tenant.clone(), env);
        if let Some(row) = store::find(conn, ResourceKind::Builder, &builder_name(&key, sha))? {
            return Ok(Some(row));
        }
    }
    Ok(None)
}

/// The builder of `key`'s image build of `sha`.
fn builder_name(key: &WorkflowKey, sha: &GitSha) -> String {
    format!("{}-{}-builder-{sha}", key.tenant, key.env)
}

/// Gives up `task`'s image build: its builder goes (an image already requested from it stays,
/// and the next build of the commit adopts it).
pub(super) fn abandon(conn: &Connection, key: &WorkflowKey, task: &StepTask) -> Result<(), Error> {
    if let Some(sha) = &task.release.infra {
        let builder = builder_name(key, sha);
        if store::abandon(conn, ResourceKind::Builder, &builder)? {
            tracing::info!(builder, "abandoned build's builder terminated");
        }
    }
    Ok(())
}

/// The environment's MySQL database: encrypted, its master password managed in a secret.
fn database(conn: &Connection, cx: &Cx<'_>) -> Result<Outcome, Error> {
    let name = cx.stem();
    let workflow = cx.workflow();
    let restored_from = if cx.task.restore_database {
        if !store::is_decommissioned(conn, &workflow)? {
            return Ok(Outcome::Terminal(format!(
                "no available final snapshot {name}-final-* of the environment to restore from: provision without --from-snapshot"
            )));
        }
        Some(format!("{name}-final"))
    } else {
        None
    };
    let row = match store::find(conn, ResourceKind::Database, &name)? {
        Some(row) => row,
        None => store::create(
            conn,
            cx.new_resource(
                ResourceKind::Database,
                &name,
                Some(&workflow),
                cx.ready_at(cx.config.latency(StepKind::Database)),
            ),
            |_| name.clone(),
            |_, n| DatabaseAttrs {
                endpoint: format!("{name}.c{n:012x}.{REGION}.rds.amazonaws.com:3306"),
                secret_arn: format!(
                    "arn:aws:secretsmanager:{REGION}:{ACCOUNT}:secret:rds!db-{n:012x}"
                ),
                engine: "mysql".to_owned(),
                storage_encrypted: true,
                restored_from: restored_from.clone(),
            },
        )?,
    };
    if !cx.is_ready(&row) {
        return Ok(cx.progress(row.ready_at_ms, format!("database {} creating", row.id)));
    }
    let attrs: DatabaseAttrs = row.attrs()?;
    Ok(Outcome::Done(StepOutput::Database(DatabaseOutput {
        instance_id: row.id,
        endpoint: attrs.endpoint,
        secret_arn: attrs.secret_arn,
    })))
}

/// A target group and a listener rule for `<env>.<domain>` with a priority no other rule
/// holds, created together; the rule is found again by its name.
fn routing(conn: &Connection, cx: &Cx<'_>) -> Result<Outcome, Error> {
    let name = cx.stem();
    let workflow = cx.workflow();
    let ready_at = cx.ready_at(cx.config.latency(StepKind::Routing));
    let target_group = match store::find(conn, ResourceKind::TargetGroup, &name)? {
        Some(row) => row,
        None => store::create(
            conn,
            cx.new_resource(ResourceKind::TargetGroup, &name, Some(&workflow), ready_at),
            |n| {
                format!(
                    "arn:aws:elasticloadbalancing:{REGION}:{ACCOUNT}:targetgroup/{name}/{n:016x}"
                )
            },
            |_, _| TargetGroupAttrs { port: 80 },
        )?,
    };
    let rule = match store::find(conn, ResourceKind::ListenerRule, &name)? {
        Some(row) => row,
        None => {
            let priority = match store::priority_of(conn, &name)? {
                Some(p) => p,
                None => store::allocate_priority(
                    conn,
                    &name,
                    cx.config.first_listener_priority,
                    MAX_LISTENER_PRIORITY,
                )?,
            };
            store::create(
                conn,
                cx.new_resource(ResourceKind::ListenerRule, &name, Some(&workflow), ready_at),
                |n| {
                    format!(
                        "arn:aws:elasticloadbalancing:{REGION}:{ACCOUNT}:listener-rule/app/shared/0/0/{n:016x}"
                    )
                },
                |_, _| ListenerRuleAttrs {
                    host: format!("{}.{}", cx.key.env, cx.domain),
                    priority,
                    target_group_arn: target_group.id.clone(),
                },
            )?
        }
    };
    let ready_at = target_group.ready_at_ms.max(rule.ready_at_ms);
    if ready_at > cx.now_ms {
        return Ok(cx.progress(ready_at, format!("listener rule {name} provisioning")));
    }
    let mut attrs: ListenerRuleAttrs = rule.attrs()?;
    // The tenant's domain changed: the rule moves to the new host and keeps its priority.
    let host = format!("{}.{}", cx.key.env, cx.domain);
    if attrs.host != host {
        attrs.host = host;
        store::set_attrs(conn, ResourceKind::ListenerRule, &name, &attrs)?;
    }
    Ok(Outcome::Done(StepOutput::Routing(RoutingOutput {
        host: attrs.host,
        target_group_arn: target_group.id,
        rule_arn: rule.id,
        priority: attrs.priority,
        dns_zone: None,
    })))
}

/// A new Auto Scaling group per run; once its targets are healthy, the older groups of the
/// environment are deleted. A group of a newer run is never touched.
fn rollout(conn: &Connection, cx: &Cx<'_>) -> Result<Outcome, Error> {
    let run = cx.task.run;
    let workflow = cx.workflow();
    let name = format!("{}-{run}", cx.stem());
    let sizing = match cx
        .env_settings
        .sizing(&crate::infrastructure::Infrastructure::default().default_sizing())
    {
        Ok(sizing) => sizing,
        Err(e) => {
            return Err(Error::InvalidParameter(format!(
                "the environment's sizing: {e}"
            )));
        }
    };
    let mut groups = Vec::new();
    for row in store::list_workflow(conn, &workflow, Some(ResourceKind::AutoScalingGroup))? {
        let attrs: GroupAttrs = row.attrs()?;
        if attrs.run > run {
            return Err(Error::Superseded {
                run: run.to_string(),
                newer: row.name,
            });
        }
        groups.push((row, attrs));
    }
    let (group, attrs) = match groups.iter().position(|(row, _)| row.name == name) {
        Some(i) => groups.swap_remove(i),
        None => {
            let image_id = cx
                .task
                .resources
                .image
                .as_ref()
                .map_or_else(|| cx.config.base_image_id.clone(), |i| i.image_id.clone());
            if image_id != cx.config.base_image_id
                && !store::list_workflow(conn, &workflow, Some(ResourceKind::Image))?
                    .iter()
                    .any(|image| image.id == image_id)
            {
                return Err(Error::ImageNotFound(image_id));
            }
            let attrs = GroupAttrs {
                run,
                image_id,
                release: cx.task.release.clone(),
                target_group_arn: cx
                    .task
                    .resources
                    .routing
                    .as_ref()
                    .map(|r| r.target_group_arn.clone()),
                env_file: crate::app_env::render(&crate::app_env::variables(
                    cx.key,
                    &cx.task.resources,
                    None,
                    cx.env_config,
                )),
                install_fails: cx.sample < cx.config.install_failure_probability,
                size: Some((sizing.min, sizing.max, sizing.desired)),
                instance_type: Some(sizing.instance_type.clone()),
                scaling: sizing.scaling,
            };
            let latency = cx.config.latency(StepKind::Rollout);
            // A failing install is reported as soon as the instances have run it.
            let ready = if attrs.install_fails {
                latency / 4
            } else {
                latency
            };
            let row = store::create(
                conn,
                cx.new_resource(
                    ResourceKind::AutoScalingGroup,
                    &name,
                    Some(&workflow),
                    cx.ready_at(ready),
                ),
                |_| name.clone(),
                |_, _| &attrs,
            )?;
            (row, attrs)
        }
    };
    if !cx.is_ready(&group) {
        return Ok(cx.progress(
            group.ready_at_ms,
            format!("group {name} waiting for healthy targets"),
        ));
    }
    if attrs.install_fails {
        store::delete(conn, ResourceKind::AutoScalingGroup, &group.name)?;
        let serving = groups
            .first()
            .map_or("nothing (first rollout)", |(row, _)| row.name.as_str());
        // An outcome, not an error: the deletion must be committed.
        return Ok(Outcome::Terminal(format!(
            "{}\ngroup {name} rolled back (deleted); {serving} keeps serving",
            simulated_failure("install.sh", &format!("an instance of group {name}"))
        )));
    }
    for (older, _) in &groups {
        store::delete(conn, ResourceKind::AutoScalingGroup, &older.name)?;
    }
    prune_images(conn, cx)?;
    Ok(Outcome::Done(StepOutput::Rollout(DeploymentOutput {
        group_name: group.name,
        image_id: attrs.image_id,
        run: attrs.run,
        release: attrs.release,
    })))
}

/// Release retention: deletes the environment's images of infra commits no release in the
/// task's `keep` has (nothing when `keep` is empty, as in tasks of older versions). Source
/// artifacts are shared by every environment here (content-addressed), so they stay.
fn prune_images(conn: &Connection, cx: &Cx<'_>) -> Result<(), Error> {
    if cx.task.keep.is_empty() {
        return Ok(());
    }
    let kept: Vec<&GitSha> = cx
        .task
        .keep
        .iter()
        .filter_map(|r| r.infra.as_ref())
        .collect();
    for image in store::list_workflow(conn, &cx.workflow(), Some(ResourceKind::Image))? {
        let attrs: ImageAttrs = image.attrs()?;
        if !kept.contains(&&attrs.infra_sha) {
            store::delete(conn, ResourceKind::Image, &image.name)?;
            tracing::debug!(image = %image.name, "image past retention deleted");
        }
    }
    Ok(())
}

/// Deletes everything of the environment at once (groups, rule and its priority, target
/// group, database, security groups, images, builders) and remembers that it is gone.
fn decommission(conn: &Connection, cx: &Cx<'_>) -> Result<Outcome, Error> {
    let workflow = cx.workflow();
    let mut rows = store::list_workflow(conn, &workflow, None)?;
    // The order AWS needs: users before what they use.
    rows.sort_by_key(|row| {
        [
            ResourceKind::AutoScalingGroup,
            ResourceKind::ListenerRule,
            ResourceKind::TargetGroup,
            ResourceKind::Database,
            ResourceKind::Builder,
            ResourceKind::Image,
            ResourceKind::SecurityGroup,
        ]
        .iter()
        .position(|k| *k == row.kind)
    });
    for row in rows {
        if row.kind == ResourceKind::ListenerRule {
            store::free_priority(conn, &row.name)?;
        }
        store::delete(conn, row.kind, &row.name)?;
    }
    // A priority held without its rule (never written by this code) is freed too.
    store::free_priority(conn, &cx.stem())?;
    store::mark_decommissioned(conn, &workflow, cx.now_ms)?;
    Ok(Outcome::Done(StepOutput::Decommissioned))
}
