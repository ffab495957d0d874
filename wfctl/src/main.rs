//! `wfctl`, the operators' tool: registers tenants, reads the workflows, records and history
//! the workers write, sends signals, and handles dead letters. See `wfctl --help`.

use std::io::Write as _;
use std::process::ExitCode;
use std::time::Duration;

use clap::{ArgGroup, Args, Parser, Subcommand};
use orchestrator::clock::{Clock, SystemClock};
use orchestrator::config::Backend;
use orchestrator::ports::{Queue, QueueKind, Store};
use wfctl::config::Change;
use wfctl::dlq::{self, Selection};
use wfctl::help::{
    CONFIG_HELP, DLQ_LIST_HELP, DLQ_SELECT_HELP, DLQ_SHOW_HELP, EXIT_CODES, HISTORY_JSON,
    LIST_JSON, LOGS_JSON, SHOW_JSON, SIGNAL_HELP, SLOTS_JSON, TENANT_ADD_JSON, TENANT_JSON,
    TENANT_ROTATE_JSON, TENANT_SIGNING_JSON,
};
use wfctl::output::{Format, Printer, color_enabled};
use wfctl::signal::{Action, SignalRequest};
use wfctl::tenant::{AddRequest, SetRequest, parse_branch, parse_grace};
use wfctl::workflow::{HistoryRequest, ListRequest};
use wfctl::{BackendArgs, EXIT_FAILED, EXIT_OK, Error, open_backend, parse_state};
#[cfg(feature = "aws")]
use wfctl::{connect_aws_queue, connect_aws_store};
use workflows::{ConfigValue, Domain, Environment, Signal, State, StepKind, TenantId};

/// The operators' tool of the tenant-host orchestrator.
#[derive(Debug, Parser)]
#[command(
    name = "wfctl",
    version,
    about = "The operators' tool of the tenant-host orchestrator: tenants, workflows, history, \
             signals, dead letters",
    long_about = "The operators' tool of the tenant-host orchestrator. It registers tenants, \
                  reads the workflow records and history that the workers write, sends operators' \
                  signals through the events queue, and lists, redrives or discards dead \
                  letters, on the same backend as the workers: the embedded SQLite file, or \
                  SQS and DynamoDB with `backend = \"aws\"`.",
    after_help = EXIT_CODES,
    propagate_version = true
)]
struct Cli {
    #[command(flatten)]
    backend: BackendArgs,
    /// Output format: aligned tables for people, or JSON for scripts.
    #[arg(
        short,
        long,
        global = true,
        value_enum,
        default_value_t = Format::Table,
        help_heading = "Global options"
    )]
    output: Format,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Register tenants, show them, and rotate or set their webhook secrets.
    #[command(subcommand)]
    Tenant(TenantCommand),
    /// Set, unset or list an environment's config vars, which its app is given in
    /// /etc/tenant/app.env.
    #[command(subcommand, after_long_help = CONFIG_HELP)]
    Config(ConfigCommand),
    /// List workflows (one per tenant and environment) with their state.
    #[command(after_long_help = LIST_JSON)]
    List(ListArgs),
    /// Show a tenant's workflows: state, run and steps, resources, what is deployed, pending
    /// pushes.
    #[command(after_long_help = SHOW_JSON)]
    Show(ShowArgs),
    /// Show the history of one workflow: one line per applied event, oldest first.
    #[command(after_long_help = HISTORY_JSON)]
    History(HistoryArgs),
    /// Print what was captured of a run's image build and rollout: progress, and each
    /// failure with the failed script's name, exit code and last lines.
    #[command(after_long_help = LOGS_JSON)]
    Logs(LogsArgs),
    /// Let a run that awaits approval before production roll out.
    #[command(after_long_help = SIGNAL_HELP)]
    Approve(SignalArgs),
    /// Resume a failed run at its failed step, with a fresh retry budget.
    #[command(after_long_help = SIGNAL_HELP)]
    Retry(SignalArgs),
    /// Stop the active run; what it created stays, the deployed release keeps serving.
    #[command(after_long_help = SIGNAL_HELP)]
    Cancel(SignalArgs),
    /// Roll out the deployed release again (a new Auto Scaling group from the same image).
    #[command(after_long_help = SIGNAL_HELP)]
    Redeploy(SignalArgs),
    /// Roll out a kept earlier release as a new run (the same blue/green rollout and approval
    /// rules): the one before what serves, or --to rN.
    #[command(after_long_help = SIGNAL_HELP)]
    Rollback(RollbackArgs),
    /// Release everything the environment holds: group, routing, database (after a final
    /// snapshot). Pushes to it are then answered as ignored until it is provisioned again.
    #[command(after_long_help = SIGNAL_HELP)]
    Decommission(SignalArgs),
    /// Provision an environment: one never pushed to (base image, no app), or a decommissioned
    /// one again, from scratch with its branches' newest commits (--from-snapshot: its
    /// database restored from the final snapshot).
    #[command(after_long_help = SIGNAL_HELP)]
    Provision(ProvisionArgs),
    /// Dead letters: list them, show one, put them back once the cause is fixed, or discard
    /// them.
    #[command(subcommand)]
    Dlq(DlqCommand),
    /// Show the account-wide slots of capped step kinds (`[limits]`): which runs hold them,
    /// and which wait, in the order they will be served.
    #[command(after_long_help = SLOTS_JSON)]
    Slots(SlotsArgs),
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Set config vars: NAME=VALUE, and --secret NAME=ARN for a value kept in Secrets Manager.
    #[command(group(ArgGroup::new("vars").required(true).multiple(true).args(["values", "secrets"])))]
    Set(ConfigSetArgs),
    /// Remove config vars (removing one that is not set is no error).
    Unset(ConfigUnsetArgs),
    /// Print an environment's config vars: NAME=VALUE lines, a secret as its ARN.
    List(ConfigListArgs),
}

#[derive(Debug, Args)]
struct ConfigSetArgs {
    /// The tenant.
    tenant: TenantId,
    /// The environment: dev, staging or production.
    #[arg(long)]
    env: Environment,
    /// Vars to set, each NAME=VALUE (the value may be empty and may hold '=').
    #[arg(value_name = "NAME=VALUE", value_parser = wfctl::config::parse_assignment)]
    values: Vec<(String, String)>,
    /// A var whose value is the Secrets Manager secret ARN: the instance reads the secret when
    /// it starts, with the environment's role; the orchestrator never sees the value.
    #[arg(long = "secret", value_name = "NAME=ARN", value_parser = wfctl::config::parse_assignment)]
    secrets: Vec<(String, String)>,
}

#[derive(Debug, Args)]
struct ConfigUnsetArgs {
    /// The tenant.
    tenant: TenantId,
    /// The environment: dev, staging or production.
    #[arg(long)]
    env: Environment,
    /// The vars to remove.
    #[arg(value_name = "NAME", required = true)]
    names: Vec<String>,
}

#[derive(Debug, Args)]
struct ConfigListArgs {
    /// The tenant.
    tenant: TenantId,
    /// The environment: dev, staging or production.
    #[arg(long)]
    env: Environment,
}

#[derive(Debug, Args)]
struct SlotsArgs {
    /// Only these step kinds (image, database, ...); every kind by default.
    #[arg(value_name = "KIND")]
    kinds: Vec<StepKind>,
}

#[derive(Debug, Subcommand)]
enum DlqCommand {
    /// List the dead letters: queue, id, workflow, what they carry, why they were
    /// dead-lettered, and their status.
    #[command(after_long_help = DLQ_LIST_HELP)]
    List(DlqListArgs),
    /// Show one dead letter in full: its fields, status, and the message it carries.
    #[command(after_long_help = DLQ_SHOW_HELP)]
    Show(DlqShowArgs),
    /// Put dead letters back on their queue once the cause is fixed. Events the workflow has
    /// already applied are discarded instead: putting them back would apply them twice.
    #[command(after_long_help = DLQ_SELECT_HELP)]
    Redrive(DlqSelectArgs),
    /// Delete dead letters for good (a message that can never be handled).
    #[command(after_long_help = DLQ_SELECT_HELP)]
    Discard(DlqSelectArgs),
}

#[derive(Debug, Args)]
struct DlqListArgs {
    /// Only this queue's dead letters: events or steps.
    #[arg(long, value_name = "QUEUE")]
    queue: Option<QueueKind>,
    /// At most N dead letters per queue, oldest first.
    #[arg(long, value_name = "N", default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..))]
    limit: u64,
}

#[derive(Debug, Args)]
struct DlqShowArgs {
    /// The dead letter's id, as `wfctl dlq list` shows it.
    id: String,
    /// Look only in this queue's dead letters: events or steps.
    #[arg(long, value_name = "QUEUE")]
    queue: Option<QueueKind>,
}

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("which").required(true).args(["all", "ids"])))]
struct DlqSelectArgs {
    /// The dead letters' ids, as `wfctl dlq list` shows them. Nothing is done unless every
    /// one is found.
    #[arg(value_name = "ID")]
    ids: Vec<String>,
    /// Every dead letter there is when the command starts (of --queue, or of both queues).
    #[arg(long, conflicts_with = "ids")]
    all: bool,
    /// Only this queue's dead letters: events or steps.
    #[arg(long, value_name = "QUEUE")]
    queue: Option<QueueKind>,
}

#[derive(Debug, Args)]
struct SignalArgs {
    /// The tenant.
    tenant: TenantId,
    /// The workflow's environment: dev, staging or production.
    #[arg(long)]
    env: Environment,
    /// Wait until a worker has applied the signal and the work it started is done, and print
    /// its effect.
    #[arg(long)]
    wait: bool,
    /// How long --wait waits in all, e.g. 30s or 5m (a decommission takes minutes on AWS).
    #[arg(long, default_value = "60s", value_parser = parse_duration_arg)]
    timeout: Duration,
}

#[derive(Debug, Args)]
struct RollbackArgs {
    #[command(flatten)]
    signal: SignalArgs,
    /// The run whose release to roll out again (\"r4\" or 4; `wfctl show` lists the kept
    /// releases). Default: the release before the one serving.
    #[arg(long, value_name = "RUN", value_parser = parse_run)]
    to: Option<workflows::RunId>,
}

#[derive(Debug, Args)]
struct ProvisionArgs {
    #[command(flatten)]
    signal: SignalArgs,
    /// For a decommissioned environment: restore its database from the final snapshot taken
    /// when it was decommissioned, instead of starting with an empty one.
    #[arg(long)]
    from_snapshot: bool,
}

fn parse_duration_arg(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s)
        .map_err(|e| format!("invalid duration {s:?} ({e}): write it like 30s, 5m or 1h"))
}

#[derive(Debug, Subcommand)]
enum TenantCommand {
    /// Register a tenant and print its webhook secret token, once.
    ///
    /// The token is generated from the operating system's CSPRNG and printed on stdout (alone
    /// on its line in table mode, so `wfctl tenant add ... > secret.txt` keeps it); only its
    /// SHA-256 is stored, so it cannot be shown again. Set it as the secret token of the
    /// webhooks of both GitLab projects.
    #[command(after_long_help = TENANT_ADD_JSON)]
    Add(TenantAddArgs),
    /// List the registered tenants.
    #[command(after_long_help = TENANT_JSON)]
    List,
    /// Show one tenant (never its token hash or secrets).
    #[command(after_long_help = TENANT_JSON)]
    Show {
        /// The tenant's id.
        id: TenantId,
    },
    /// Change a tenant: its domain, branch map (--branch, replacing the whole map), whether
    /// production waits for approval, or one environment's sizing, scaling and releases kept
    /// (--env with --min, --max, --desired, --instance-type, --scaling, --keep-releases); and
    /// show it.
    ///
    /// Everything is checked before anything is written (a minimum over the maximum is refused
    /// naming the field); the tenant is written only if it is still as it was read (a
    /// concurrent change makes this one fail with exit code 3, nothing lost). A new domain or
    /// new sizing rolls out like a config change: every environment concerned that has a
    /// workflow gets a run that routes and rolls out again. Runs already started keep the
    /// approval setting they started with; pushes are mapped by the new branches from the next
    /// one on.
    #[command(after_long_help = TENANT_JSON)]
    Set(TenantSetArgs),
    /// Remove a tenant: refused while any of its environments is not decommissioned (or never
    /// provisioned); with --decommission, decommissions them all, waits, then removes it. Its
    /// projects and domain are free afterwards; workflow records and history stay.
    Remove(TenantRemoveArgs),
    /// Replace a tenant's webhook secret token and print the new one, once; the old one stays
    /// accepted for a grace period.
    ///
    /// The new token is generated from the operating system's CSPRNG and printed on stdout
    /// (alone on its line in table mode); only its SHA-256 is stored. The old token is still
    /// accepted until the end of the grace period (--grace, default 24h), so the GitLab
    /// webhooks can be updated meanwhile; a token from an earlier rotation that was still in
    /// its grace period is no longer accepted. `--grace 0` ends the old token at once.
    #[command(after_long_help = TENANT_ROTATE_JSON)]
    RotateToken(RotateTokenArgs),
    /// Set (--generate) or remove (--remove) a tenant's Standard Webhooks signing secret.
    ///
    /// With a signing secret, the ingress requires every webhook of the tenant to carry a valid
    /// Standard Webhooks signature (webhook-id, webhook-timestamp within 5 minutes,
    /// webhook-signature v1 HMAC-SHA256) in addition to the secret token. --generate creates a
    /// new secret, `whsec_` and the standard base64 of 32 bytes from the operating system's
    /// CSPRNG, replacing any current one at once, and prints it on stdout, once (alone on its
    /// line in table mode). --remove removes it, so webhooks need no longer be signed.
    #[command(after_long_help = TENANT_SIGNING_JSON)]
    SigningSecret(SigningSecretArgs),
}

#[derive(Debug, Args)]
struct RotateTokenArgs {
    /// The tenant's id.
    id: TenantId,
    /// How long the old token stays accepted: a duration like 30m, 2h or 7d; 0 ends it at once.
    #[arg(long, value_name = "DURATION", default_value = "24h", value_parser = parse_grace)]
    grace: Duration,
}

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("action").required(true).args(["generate", "remove"])))]
struct SigningSecretArgs {
    /// The tenant's id.
    id: TenantId,
    /// Generate a new signing secret, replacing any current one, and print it once.
    #[arg(long)]
    generate: bool,
    /// Remove the signing secret: the tenant's webhooks need no longer be signed.
    #[arg(long)]
    remove: bool,
}

#[derive(Debug, Args)]
struct TenantAddArgs {
    /// The tenant's id: 3 to 20 characters of lowercase letters, digits and '-', starting with
    /// a letter.
    id: TenantId,
    /// The tenant's domain; environments are served at <env>.<domain>.
    #[arg(long, value_name = "DOMAIN")]
    domain: Domain,
    /// GitLab project id of the infrastructure repository.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    infra_project: u64,
    /// GitLab project id of the application repository (not the infra one).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    app_project: u64,
    /// Map a branch to an environment (dev, staging, production); repeat for more branches.
    /// Without any: dev=dev, staging=staging, main=production, master=production.
    #[arg(long = "branch", value_name = "BRANCH=ENV", value_parser = parse_branch)]
    branches: Vec<(String, Environment)>,
    /// Production runs wait for `approve` before rolling out.
    #[arg(long)]
    production_approval: bool,
}

#[derive(Debug, Args)]
struct TenantSetArgs {
    /// The tenant's id.
    id: TenantId,
    /// A new domain: every environment is then served at <env>.<domain> (its listener rule
    /// moves to the new host in a rollout of its own).
    #[arg(long)]
    domain: Option<Domain>,
    /// The new branch map, one BRANCH=ENV per flag; it replaces the whole current map.
    #[arg(long = "branch", value_name = "BRANCH=ENV", value_parser = parse_branch)]
    branches: Vec<(String, Environment)>,
    /// Whether production runs wait for `approve` before rolling out.
    #[arg(long, value_name = "true|false")]
    production_approval: Option<bool>,
    /// The environment the settings below are for.
    #[arg(long, value_name = "ENV", help_heading = "Environment settings")]
    env: Option<Environment>,
    /// The Auto Scaling group's minimum size.
    #[arg(long = "min", value_name = "N", help_heading = "Environment settings")]
    min_size: Option<u32>,
    /// The Auto Scaling group's maximum size.
    #[arg(long = "max", value_name = "N", help_heading = "Environment settings")]
    max_size: Option<u32>,
    /// The Auto Scaling group's desired size when it is created.
    #[arg(
        long = "desired",
        value_name = "N",
        help_heading = "Environment settings"
    )]
    desired_size: Option<u32>,
    /// The app instances' EC2 type, e.g. t3.small.
    #[arg(long, value_name = "TYPE", help_heading = "Environment settings")]
    instance_type: Option<String>,
    /// A target-tracking policy: cpu:PERCENT (average CPU) or requests:COUNT (requests per
    /// target per minute), or `none`.
    #[arg(long, value_name = "POLICY", value_parser = parse_scaling, help_heading = "Environment settings")]
    scaling: Option<ScalingArg>,
    /// How many deployed releases keep their images and artifacts for `rollback` (1 to 20;
    /// default 3).
    #[arg(long, value_name = "N", help_heading = "Environment settings")]
    keep_releases: Option<u32>,
}

#[derive(Debug, Args)]
struct TenantRemoveArgs {
    /// The tenant's id.
    id: TenantId,
    /// Decommission every environment that is not, wait for them, then remove the tenant.
    #[arg(long)]
    decommission: bool,
    /// How long --decommission waits for each environment, e.g. 30m.
    #[arg(long, default_value = "30m", value_parser = parse_duration_arg)]
    timeout: Duration,
}

/// `--scaling`: a policy, or `none` (clap reads a bare `Option<Option<_>>` as an optional
/// value, so the inner option is wrapped).
#[derive(Debug, Clone, Copy)]
struct ScalingArg(Option<workflows::Scaling>);

fn parse_scaling(s: &str) -> Result<ScalingArg, String> {
    if s == "none" {
        Ok(ScalingArg(None))
    } else {
        workflows::Scaling::parse(s).map(|p| ScalingArg(Some(p)))
    }
}

#[derive(Debug, Args)]
struct ListArgs {
    /// Only workflows in this state: unprovisioned, preparing, awaiting_approval, rolling_out,
    /// live, failed, decommissioning or decommissioned.
    #[arg(long, value_name = "STATE", value_parser = parse_state)]
    status: Option<State>,
    /// Only workflows of this environment (dev, staging, production).
    #[arg(long, value_name = "ENV")]
    env: Option<Environment>,
    /// Only workflows of this tenant.
    #[arg(long, value_name = "ID")]
    tenant: Option<TenantId>,
    /// Only workflows that are not at rest (not unprovisioned, live or decommissioned) and
    /// have made no progress for longer than this, e.g. 30m: running steps that stopped
    /// moving, and runs waiting for an approval or a retry.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration_arg)]
    stuck: Option<Duration>,
}

#[derive(Debug, Args)]
struct ShowArgs {
    /// The tenant.
    tenant: TenantId,
    /// Only this environment (dev, staging, production); without it, every environment that
    /// has a workflow.
    #[arg(long, value_name = "ENV")]
    env: Option<Environment>,
}

#[derive(Debug, Args)]
struct HistoryArgs {
    /// The tenant.
    tenant: TenantId,
    /// The environment (dev, staging, production).
    #[arg(long, value_name = "ENV")]
    env: Environment,
    /// At most N entries: the newest N, or with --after the first N after that version.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    limit: Option<u64>,
    /// Only entries after this record version (for paging: pass the last version seen).
    #[arg(long, value_name = "VERSION")]
    after: Option<u64>,
    /// Keep printing new entries as workers write them, until interrupted. With -o json,
    /// one JSON object per line (JSON Lines) instead of an array.
    #[arg(long, short)]
    follow: bool,
}

#[derive(Debug, Args)]
struct LogsArgs {
    /// The tenant.
    tenant: TenantId,
    /// The environment (dev, staging, production).
    #[arg(long, value_name = "ENV")]
    env: Environment,
    /// Only this step (image or rollout are the ones whose instances run scripts; any step
    /// kind is accepted). Default: both.
    #[arg(long, value_name = "STEP")]
    step: Option<StepKind>,
    /// The run (\"r7\" or 7). Default: the newest run in which those steps reported.
    #[arg(long, value_name = "RUN", value_parser = parse_run)]
    run: Option<workflows::RunId>,
}

/// A run: `r7`, or `7`.
fn parse_run(s: &str) -> Result<workflows::RunId, String> {
    let prefixed = if s.starts_with('r') {
        s.to_owned()
    } else {
        format!("r{s}")
    };
    prefixed
        .parse::<workflows::RunId>()
        .map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::from(EXIT_FAILED);
        }
    };
    let stdout = std::io::stdout();
    let stderr = std::io::stderr();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let mut err = stderr.lock();
    let now = SystemClock.now();
    let result = {
        let mut printer = Printer::new(cli.output, color_enabled(), now, &mut out, &mut err);
        let result = runtime.block_on(run(&cli, &mut printer));
        result.and_then(|()| printer.flush().map_err(Error::from))
    };
    // Anything still buffered goes out before the error message.
    let result = result.and_then(|()| out.flush().map_err(Error::from));
    match result {
        Ok(()) => ExitCode::from(EXIT_OK),
        Err(e) if e.is_broken_pipe() => ExitCode::from(EXIT_OK),
        Err(e) => {
            let _ = out.flush();
            // The whole chain: a store error's cause is what the backend said.
            let _ = writeln!(err, "error: {}", orchestrator::ports::chain(&e));
            ExitCode::from(e.exit_code())
        }
    }
}

/// The config change `command` asks for, if it is `config set` or `config unset`.
fn config_change_of(command: &Command) -> Option<(TenantId, Environment, Change)> {
    match command {
        Command::Config(ConfigCommand::Set(a)) => {
            let vars = a
                .values
                .iter()
                .map(|(n, v)| (n.clone(), ConfigValue::Value(v.clone())))
                .chain(
                    a.secrets
                        .iter()
                        .map(|(n, arn)| (n.clone(), ConfigValue::SecretArn(arn.clone()))),
                )
                .collect();
            Some((a.tenant.clone(), a.env, Change::Set(vars)))
        }
        Command::Config(ConfigCommand::Unset(a)) => {
            Some((a.tenant.clone(), a.env, Change::Unset(a.names.clone())))
        }
        _ => None,
    }
}

/// Runs `$body` with `$store` and `$queue` bound to the configured backend's store and queue
/// (the embedded file for both, or DynamoDB and SQS): for the commands that send to a queue.
macro_rules! with_queue {
    ($config:expr, |$store:ident, $queue:ident| $body:expr) => {
        match $config.backend {
            Backend::Embedded => {
                let backend = open_backend(&$config, false)?;
                let ($store, $queue) = (&backend, &backend);
                $body
            }
            #[cfg(not(feature = "aws"))]
            Backend::Aws => Err(aws_not_built()),
            #[cfg(feature = "aws")]
            Backend::Aws => {
                let store = connect_aws_store(&$config).await?;
                let queue = connect_aws_queue(&$config).await?;
                let ($store, $queue) = (&store, &queue);
                $body
            }
        }
    };
}

/// Opens the configured backend's store and runs the command on it.
async fn run(cli: &Cli, p: &mut Printer<'_>) -> Result<(), Error> {
    let config = cli.backend.config()?;
    if let Command::Dlq(command) = &cli.command {
        return with_queue!(config, |store, queue| run_dlq(command, store, queue, p)
            .await);
    }
    if let Some((tenant, env, change)) = config_change_of(&cli.command) {
        let actor = actor();
        #[cfg(feature = "aws")]
        if config.activities == orchestrator::config::ActivitiesKind::Aws {
            check_secrets(&tenant, &change).await?;
        }
        return with_queue!(config, |store, queue| wfctl::config::change(
            store, queue, &tenant, env, &change, &actor, p
        )
        .await);
    }
    if let Command::Tenant(TenantCommand::Set(a)) = &cli.command {
        let req = SetRequest {
            id: a.id.clone(),
            domain: a.domain.clone(),
            branches: (!a.branches.is_empty()).then(|| a.branches.clone()),
            production_approval: a.production_approval,
            env: a.env,
            min_size: a.min_size,
            max_size: a.max_size,
            desired_size: a.desired_size,
            instance_type: a.instance_type.clone(),
            scaling: a.scaling.map(|s| s.0),
            keep_releases: a.keep_releases,
            defaults: config.infrastructure.default_sizing(),
            actor: actor(),
        };
        return with_queue!(config, |store, queue| wfctl::tenant::set(
            store, queue, &req, p
        )
        .await);
    }
    if let Command::Tenant(TenantCommand::Remove(a)) = &cli.command {
        let req = wfctl::tenant::RemoveRequest {
            id: a.id.clone(),
            decommission: a.decommission.then_some(a.timeout),
            actor: actor(),
        };
        return with_queue!(config, |store, queue| wfctl::tenant::remove(
            store, queue, &req, p
        )
        .await);
    }
    if let Some((args, signal)) = signal_of(&cli.command) {
        let req = SignalRequest {
            tenant: args.tenant.clone(),
            env: args.env,
            signal,
            actor: actor(),
            wait: args.wait.then_some(args.timeout),
        };
        let now = SystemClock.now();
        return with_queue!(config, |store, queue| wfctl::signal::send(
            store, queue, &req, now, p
        )
        .await);
    }
    match config.backend {
        Backend::Embedded => {
            // Only registering a tenant may create the database file: a reading command must
            // not leave an empty file behind a mistyped path.
            let create = matches!(cli.command, Command::Tenant(TenantCommand::Add(_)));
            let store = open_backend(&config, create)?;
            run_on(cli, &store, p).await
        }
        #[cfg(not(feature = "aws"))]
        Backend::Aws => Err(aws_not_built()),
        #[cfg(feature = "aws")]
        Backend::Aws => {
            let store = connect_aws_store(&config).await?;
            run_on(cli, &store, p).await
        }
    }
}

async fn run_dlq<S: Store, Q: Queue>(
    command: &DlqCommand,
    store: &S,
    queue: &Q,
    p: &mut Printer<'_>,
) -> Result<(), Error> {
    let selection = |a: &DlqSelectArgs| {
        if a.all {
            Selection::All
        } else {
            Selection::Ids(a.ids.clone())
        }
    };
    match command {
        DlqCommand::List(a) => {
            let limit = usize::try_from(a.limit).unwrap_or(usize::MAX);
            dlq::list(store, queue, &dlq::queues(a.queue), limit, p).await
        }
        DlqCommand::Show(a) => dlq::show(store, queue, &dlq::queues(a.queue), &a.id, p).await,
        DlqCommand::Redrive(a) => {
            dlq::redrive(store, queue, &dlq::queues(a.queue), &selection(a), p).await
        }
        DlqCommand::Discard(a) => {
            dlq::discard(store, queue, &dlq::queues(a.queue), &selection(a), p).await
        }
    }
}

fn signal_of(command: &Command) -> Option<(&SignalArgs, Action)> {
    let signal = |s| Action::Signal(s);
    match command {
        Command::Approve(a) => Some((a, signal(Signal::Approve))),
        Command::Retry(a) => Some((a, signal(Signal::Retry))),
        Command::Cancel(a) => Some((a, signal(Signal::Cancel))),
        Command::Redeploy(a) => Some((a, signal(Signal::Redeploy))),
        Command::Rollback(a) => Some((&a.signal, signal(Signal::Rollback { to: a.to }))),
        Command::Decommission(a) => Some((a, signal(Signal::Decommission))),
        Command::Provision(a) => Some((
            &a.signal,
            Action::Provision {
                from_snapshot: a.from_snapshot,
            },
        )),
        _ => None,
    }
}

/// `backend = "aws"` in a build without the `aws` feature.
#[cfg(not(feature = "aws"))]
fn aws_not_built() -> Error {
    Error::Invalid(
        "backend = \"aws\" needs a wfctl built with the `aws` feature (cargo build -p wfctl \
         --features aws)"
            .to_owned(),
    )
}

/// Refuses a `--secret` the platform could not grant the environment: one that does not exist,
/// cannot be described, or is not tagged as the tenant's (checked with this process's AWS
/// credentials, before anything is written).
#[cfg(feature = "aws")]
async fn check_secrets(tenant: &TenantId, change: &Change) -> Result<(), Error> {
    let Change::Set(vars) = change else {
        return Ok(());
    };
    let arns: Vec<(&String, &str)> = vars
        .iter()
        .filter_map(|(name, v)| match v {
            ConfigValue::SecretArn(arn) => Some((name, arn.as_str())),
            ConfigValue::Value(_) => None,
        })
        .collect();
    if arns.is_empty() {
        return Ok(());
    }
    let sdk = orchestrator::aws::load_sdk_config().await;
    for (name, arn) in arns {
        activities::aws::identity::check_secret(&sdk, tenant, arn)
            .await
            .map_err(|e| Error::Invalid(format!("--secret {name}: {e}; nothing was changed")))?;
    }
    Ok(())
}

/// Who sends a signal, for the history: `$USER@wfctl`, or `wfctl`.
fn actor() -> String {
    match std::env::var("USER") {
        Ok(user) if !user.is_empty() => format!("{user}@wfctl"),
        _ => "wfctl".to_owned(),
    }
}

async fn run_on<S: Store>(cli: &Cli, store: &S, p: &mut Printer<'_>) -> Result<(), Error> {
    match &cli.command {
        Command::Tenant(TenantCommand::Add(a)) => {
            let req = AddRequest {
                id: a.id.clone(),
                domain: a.domain.clone(),
                infra_project: a.infra_project,
                app_project: a.app_project,
                branches: a.branches.clone(),
                production_approval: a.production_approval,
            };
            wfctl::tenant::add(store, &req, p).await
        }
        Command::Tenant(TenantCommand::List) => wfctl::tenant::list(store, p).await,
        Command::Tenant(TenantCommand::Show { id }) => wfctl::tenant::show(store, id, p).await,
        Command::Tenant(TenantCommand::RotateToken(a)) => {
            wfctl::tenant::rotate_token(store, &a.id, a.grace, p).await
        }
        Command::Tenant(TenantCommand::SigningSecret(a)) => {
            if a.generate {
                wfctl::tenant::generate_signing_secret(store, &a.id, p).await
            } else {
                wfctl::tenant::remove_signing_secret(store, &a.id, p).await
            }
        }
        Command::Config(ConfigCommand::List(a)) => {
            wfctl::config::list(store, &a.tenant, a.env, p).await
        }
        Command::List(a) => {
            let req = ListRequest {
                state: a.status,
                env: a.env,
                tenant: a.tenant.clone(),
                stuck: a.stuck.map(|d| (d, SystemClock.now())),
            };
            wfctl::workflow::list(store, &req, p).await
        }
        Command::Show(a) => wfctl::workflow::show(store, &a.tenant, a.env, p).await,
        Command::Slots(a) => wfctl::slots::slots(store, &a.kinds, p).await,
        Command::Logs(a) => {
            let req = wfctl::logs::LogsRequest {
                tenant: a.tenant.clone(),
                env: a.env,
                step: a.step,
                run: a.run,
            };
            wfctl::logs::logs(store, &req, p).await
        }
        Command::History(a) => {
            let to_usize = |n: u64| usize::try_from(n).unwrap_or(usize::MAX);
            let req = HistoryRequest {
                tenant: a.tenant.clone(),
                env: a.env,
                limit: a.limit.map(to_usize),
                after: a.after,
                follow: a.follow,
            };
            wfctl::workflow::history(store, &req, p).await
        }
        // `run` sends signals, changes config and runs `dlq` before it gets here: they need
        // the queues too.
        Command::Config(ConfigCommand::Set(_) | ConfigCommand::Unset(_))
        | Command::Tenant(TenantCommand::Set(_) | TenantCommand::Remove(_))
        | Command::Approve(_)
        | Command::Retry(_)
        | Command::Cancel(_)
        | Command::Redeploy(_)
        | Command::Rollback(_)
        | Command::Decommission(_)
        | Command::Provision(_)
        | Command::Dlq(_) => Err(Error::Invalid(
            "this command needs the queues as well as the store".to_owned(),
        )),
    }
}
