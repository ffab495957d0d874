//! The long help of `wfctl`'s commands: exit codes, environment, and the fields of each
//! command's JSON output, shown after `--help`.

/// The statuses of dead letters, for the help of the `dlq` commands.
macro_rules! dlq_status {
    () => {
        "\
Status of a dead letter, as the store tells it:
  pending      an event (push, provision, signal, rearm) the workflow has not applied:
               redrive applies it
  applied      an event the workflow has applied (its history says at which version):
               redrive discards it, since putting it back would apply it twice
  awaited      a step message or retry timer the active run still waits for: redrive resumes
               the step
  stale        a step message or timer of a run or attempt that has moved on: the engine
               drops it
  no_workflow  for a workflow that does not exist (yet: redrive once the tenant is there)
  undecodable  the body is not a queue envelope this version understands: the workers
               quarantine it again unless they have been upgraded to understand it
  unknown      the workflow's record does not decode
"
    };
}

/// Shown after the help of the commands that print it.
pub const EXIT_CODES: &str = "\
Exit codes:
  0  success
  1  the operation failed (not found, already exists, corrupt record)
  2  usage or configuration error
  3  the backend cannot be reached (database file missing or unreadable; AWS tables
     unreachable, missing or not readable)

Environment:
  ORCHESTRATOR_CONFIG            configuration file (as --config)
  ORCHESTRATOR__SECTION__KEY     overrides a setting, e.g. ORCHESTRATOR__EMBEDDED__PATH
  ORCHESTRATOR__BACKEND=aws      use the DynamoDB tables instead of the SQLite file
  AWS_REGION, AWS_PROFILE, ...   the standard AWS settings, for the AWS backend
  NO_COLOR                       set (non-empty) to never colour the output

Permissions on AWS: `tenant list|show`, `list`, `show` and `history` read only:
dynamodb:DescribeTable, GetItem, BatchGetItem, Query and Scan on the <prefix>-* tables.
`tenant add|rotate-token|signing-secret` also write the tenants table: dynamodb:PutItem,
DeleteItem and ConditionCheckItem (in a transaction) on <prefix>-tenants.
`approve|retry|cancel|redeploy|decommission` read the tables and send to the events queue:
sqs:GetQueueUrl, GetQueueAttributes and SendMessage on the <prefix>-* queues.
`dlq list|show` read the tables and peek at the dead-letter queues (SQS has no peek: they
receive and at once release): sqs:GetQueueUrl, GetQueueAttributes, ReceiveMessage and
ChangeMessageVisibility on the <prefix>-* queues. `dlq redrive|discard` also need
sqs:SendMessage (on the main queues) and DeleteMessage (on the dead-letter queues).

Data goes to stdout, messages and errors to stderr. Colour is used only when stdout is a
terminal. `-o json` prints JSON with stable snake_case field names: instants are RFC 3339
strings in UTC, commits full shas, run ids strings like \"r7\", a field that does not apply is
null. Each command's --help lists its fields.";

/// Shown after the help of the commands that print it.
pub const CONFIG_HELP: &str = "\
Config vars are kept with the tenant, per environment, and versioned: every change makes a new
version. They are written, with what the platform sets (TENANT_ID, TENANT_ENV, APP_HOST,
AWS_REGION, DB_HOST, DB_PORT, DB_NAME, DB_SECRET_ARN, names a var cannot take), to
/etc/tenant/app.env on every instance the environment starts. A change is sent to the
environment's workflow, which rolls the same release out again (after the run in progress, if
one is), as an app push would; an environment not yet deployed gives the app its config at its
first deployment. A NAME is an environment variable
name (letters, digits and '_', not starting with a digit); a value is at most 4096 bytes. A var
set with --secret holds a Secrets Manager secret ARN: the instance reads the secret's value when
it starts, and the environment's role may read exactly the secrets its vars name.

JSON output (-o json): an object
  tenant, env
  version   the config's version (0: never set)
  vars      NAME: {\"value\": ...} or {\"secret_arn\": ...}";

/// Shown after the help of the commands that print it.
pub const SLOTS_JSON: &str = "\
A run takes a slot before it invokes a step of a capped kind and gives it back when the step is
done, or, once its run stops driving it (failed, paused, superseded, cancelled), after what the
step held (an image build's builder) is gone. A lease nobody renews lapses at slot_ttl. Waiters
are served in rounds per tenant (each tenant's first waiting run before anyone's second), then
first come first served; `wfctl show` notes a step that waits.

JSON output (-o json): an array of
  kind        the step kind
  status      held or waiting
  position    place in line, 1 served next (waiting only)
  workflow    \"tenant#env\"
  run         the run that holds or waits
  tenant
  since       when it was granted the slot or joined the line
  expires_at  when the lease or place lapses unless renewed";

/// Shown after the help of the commands that print it.
pub const DLQ_LIST_HELP: &str = concat!(
    dlq_status!(),
    "
JSON output (-o json): an array of
  queue          events or steps
  id             the id in the dead-letter queue
  workflow       \"tenant#env\", or null
  message        push, provision, signal, timer, rearm, step or undecodable
  event_id       the event's id, or null
  summary        the message in words
  reason         why it was dead-lettered
  receive_count  how many times it had been received
  sent_at, dead_at
  status         as above
  status_detail  the status in words"
);

/// Shown after the help of the commands that print it.
pub const DLQ_SHOW_HELP: &str = concat!(
    dlq_status!(),
    "
JSON output (-o json): the object of `wfctl dlq list -o json`, and
  envelope       the message as decoded (absent when it does not decode)
  raw            the first 4096 bytes of a body that does not decode, as text (absent
                 otherwise)"
);

/// Shown after the help of the commands that print it.
pub const DLQ_SELECT_HELP: &str = concat!(
    dlq_status!(),
    "
Redrive puts every selected dead letter back on the queue it came from (an event into its
workflow's FIFO group, past the queue's deduplication window), except applied events, which it
discards. Discard deletes the selected dead letters. Each dead letter is listed with what was
done to it; the exit code is 1 when a selected one was gone before it could be moved.

JSON output (-o json): an array of
  queue, id, workflow
  action         redriven or discarded
  status         as above, when it was moved
  detail         the status in words"
);

/// Shown after the help of the commands that print it.
pub const SIGNAL_HELP: &str = "\
The signal travels through the events queue; the workers apply it (they are the only writers of
workflow records). It is first checked against the stored record: a signal the workflow would
refuse now (approve when nothing awaits approval, retry when nothing failed, ...) is not sent,
the reason is printed and the exit code is 1. With --wait the command waits until a worker has
applied it and then until the work it started is done (the workflow is live, failed,
decommissioned, unprovisioned or awaiting approval), and prints the transition and where it came
to rest (exit code 1 if it was refused meanwhile, if its work failed, naming the failed step,
or if it did not get that far within --timeout).

JSON (-o json): {workflow, signal, event_id, status: sent|accepted|ignored, from, to, reason,
settled}; settled is the state the workflow came to rest in (--wait only).";

/// Shown after the help of the commands that print it.
pub const LOGS_JSON: &str = "\
The image step's builder and the rollout's instances upload a report of the scripts they run
(provision/*.sh, install.sh); a failure's name, exit code and last 30 lines are recorded in the
workflow's history, which this prints. The whole reports stay in the artifact bucket under
_logs/<tenant>/<env>/.

JSON output (-o json): an array, oldest first, of
  at        when the report was applied
  run       the run (\"r7\")
  step      image, rollout, ...
  outcome   progress, done, retryable or failed
  text      the note or error, every line";

/// Shown after the help of the commands that print it.
pub const TENANT_JSON: &str = "\
JSON output (-o json): a tenant object (list: an array of them) with
  id, domain, infra_project, app_project,
  branches                    object of branch name -> environment
  production_approval         bool
  signing_secret_set          bool (the secret itself is never shown)
  previous_token_valid_until  instant until which the token before a rotation is accepted, or null
  environments                object of environment -> its settings that are set: min_size,
                              max_size, desired_size, instance_type, scaling ({\"cpu\": 60} or
                              {\"requests_per_target\": 1000}), keep_releases, decommissioned
  created_at, updated_at";

/// Shown after the help of the commands that print it.
pub const TENANT_ADD_JSON: &str = "\
JSON output (-o json): {\"tenant\": <tenant object>, \"webhook_secret\": \"whk_...\"}, where the
tenant object has the fields of `wfctl tenant show -o json`:
  id, domain, infra_project, app_project, branches, production_approval, signing_secret_set,
  previous_token_valid_until, created_at, updated_at";

/// Shown after the help of the commands that print it.
pub const TENANT_ROTATE_JSON: &str = "\
JSON output (-o json): {\"tenant\": <tenant object>, \"webhook_secret\": \"whk_...\",
\"previous_valid_until\": <instant until which the old token is accepted, or null>}, where the
tenant object has the fields of `wfctl tenant show -o json`:
  id, domain, infra_project, app_project, branches, production_approval, signing_secret_set,
  previous_token_valid_until, created_at, updated_at";

/// Shown after the help of the commands that print it.
pub const TENANT_SIGNING_JSON: &str = "\
JSON output (-o json): {\"tenant\": <tenant object>, \"signing_secret\": \"whsec_...\"} with
--generate, or with \"signing_secret\": null with --remove; the tenant object has the fields of
`wfctl tenant show -o json`:
  id, domain, infra_project, app_project, branches, production_approval, signing_secret_set,
  previous_token_valid_until, created_at, updated_at";

/// Shown after the help of the commands that print it.
pub const LIST_JSON: &str = "\
JSON output (-o json): an array of
  key         \"tenant#env\"
  tenant, env
  state       unprovisioned, preparing, awaiting_approval, rolling_out, live, failed,
              decommissioning or decommissioned
  version     the record's version
  updated_at
  corrupt     why the engine stopped the workflow because its record does not decode, or null";

/// Shown after the help of the commands that print it.
pub const SHOW_JSON: &str = "\
JSON output (-o json): an array with one object per environment:
  key, tenant, env, state, version, created_at, updated_at
  corrupt     the decoding error when the record cannot be read (then the fields below are
              null or empty, and wfctl exits with 1), else null
  desired     {infra, app}: the newest commits accepted (null: never pushed)
  run         null, or {id, kind, release: {infra, app}, trigger, started_at, finished_at,
              ended (succeeded, cancelled, abandoned or null while active), needs_approval,
              approved, steps: [{step, status, attempt, first_attempt_at, finished_at,
              next_attempt_at, last_error, note}]}
  resources   {instance_security_group, database_security_group, infra_artifact,
              app_artifact, image_id, image_infra_sha, database_instance_id, database_endpoint,
              database_secret_arn, host, target_group_arn, rule_arn, rule_priority, dns_zone,
              auto_scaling_group, serving_image_id}
  deployed    null, or {release: {infra, app}, run, at}
  releases    the releases kept for rollback, oldest first: [{release, run, at}]
  pending     [{repo, sha, ref, author, message, event_id, received_at}]";

/// Shown after the help of the commands that print it.
pub const HISTORY_JSON: &str = "\
JSON output (-o json): an array, oldest first, of
  version     the record version the entry produced
  at          when it was applied
  event       push, provision, signal, step, timer or rearm
  event_id
  summary     the event in words, as in the table
  verdict     accepted, ignored, refused, stale or duplicate
  reason      why, when not accepted; else null
  from, to    the states before and after
  run         the run current after the event (\"r7\"), or null
  detail      the event in full, as persisted";
