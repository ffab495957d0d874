//! The GitLab webhook ingress (ARCHITECTURE.md, "The ingress"): `POST /hooks/gitlab`.
//!
//! A push to a mapped branch becomes one small typed event on the events queue (FIFO group =
//! workflow key, deduplication id = workflow key and event id, see
//! `engine::message`), and the answer, `202`, comes only after the queue has it durably.
//! Nothing else is done in the request.
//!
//! | request | answer |
//! |---|---|
//! | push to a mapped branch | `202` `{"status":"accepted","event_id":…,"workflow":"acme#production"}` |
//! | unmapped branch, tag push, branch deletion, other `X-Gitlab-Event` kinds, a push to a decommissioned environment | `202` `{"status":"ignored","reason":…}`, nothing queued |
//! | missing or wrong `X-Gitlab-Token`, a bad Standard Webhooks signature, or a project no tenant registered | `401`, the same answer whatever the project (so project ids cannot be enumerated) |
//! | more failed authentications from the source address than `auth_failure_rate` allows | `429` with `Retry-After`, before anything is read |
//! | more accepted pushes of the tenant than `push_rate` allows | `429` with `Retry-After`, nothing queued |
//! | malformed JSON or missing fields | `400` naming what is wrong |
//! | body over `max_body_bytes` (`tenant_max_body_bytes` at `/hooks/gitlab/{tenant}`) | `413`, before it is read when its `Content-Length` says so |
//! | queue unavailable | `503` (nothing was accepted; GitLab shows it and can resend) |
//!
//! The event id is `gitlab:` and the `Idempotency-Key` header when present (GitLab 17.4+,
//! stable across its retries and manual resends: a retried delivery is queued once within the
//! queue's deduplication window and applied once by the workflow's dedup after it), else
//! `gitlab:` and `X-Gitlab-Event-UUID` (stable across GitLab's automatic retries of one event),
//! else `push:` and a digest of project, ref, `before` and `after` (the same push sent twice
//! is one event, so a resend without headers is deduplicated too). A header value too long for
//! the prefix is replaced by its digest. The prefix keeps what a caller chooses apart from the
//! ids the system makes (`rearm:`, `signal:`, …), and the queue's deduplication id includes the
//! workflow key, so one tenant's key never suppresses another tenant's push.
//!
//! Tokens are compared as SHA-256 hashes in constant time; no token, signature or secret is
//! ever logged.

pub mod gitlab;
pub mod limits;
pub mod scan;
mod server;
mod signature;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use workflows::{Event, EventId, GitSha, Push, Tenant, TenantId, Timestamp, WorkflowKey};

use crate::clock::SharedClock;
use crate::engine::enqueue;
use crate::ports::{Queue, Store};
use gitlab::{NO_COMMIT, Payload};
use limits::Buckets;
pub use limits::Rate;
use scan::Scanner;
use signature::Signature;
use tracing::Instrument as _;

/// How the ingress runs.
#[derive(Debug, Clone)]
pub struct IngressConfig {
    /// Largest body accepted at `/hooks/gitlab`, where the body is read to find the tenant;
    /// larger ones get `413`.
    pub max_body_bytes: usize,
    /// Largest body accepted at `/hooks/gitlab/{tenant}`, read only once the headers
    /// authenticated the tenant (GitLab's pushes can be several MB: every commit lists its
    /// files).
    pub tenant_max_body_bytes: usize,
    /// How long a tenant looked up by project or by id is trusted before it is read again.
    pub tenant_ttl: Duration,
    /// Accepted pushes per tenant: more are answered `429` with `Retry-After`, so that one
    /// tenant's flood cannot use up the queue's send throughput for everyone.
    pub push_rate: Rate,
    /// Failed authentications per source address: more are answered `429` before anything
    /// (the body, the tenant registry) is read.
    pub auth_failure_rate: Rate,
    /// The header holding the client's address when the ingress is behind a proxy or load
    /// balancer (`X-Forwarded-For`: its last address, the one the proxy added); none: the
    /// connection's peer address.
    pub client_address_header: Option<String>,
    /// How long a client may take to send a request's headers (or to start its next request
    /// on a kept-alive connection); then the connection is closed.
    pub header_timeout: Duration,
    /// How long a client may take to send a request's body; then `408`.
    pub body_timeout: Duration,
    /// How long a request may take in all; then `503` (GitLab sends it again).
    pub request_timeout: Duration,
    /// Connections open at once; more wait in the listen backlog.
    pub max_connections: usize,
}

impl Default for IngressConfig {
    fn default() -> Self {
        Self {
            max_body_bytes: 1024 * 1024,
            tenant_max_body_bytes: 25 * 1024 * 1024,
            tenant_ttl: Duration::from_secs(5),
            push_rate: Rate {
                per_second: 10.0,
                burst: 200,
            },
            auth_failure_rate: Rate {
                per_second: 1.0,
                burst: 30,
            },
            client_address_header: None,
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            request_timeout: Duration::from_secs(60),
            max_connections: 4096,
        }
    }
}

/// Refusals of one kind: log lines written, and refusals not logged (in all, and since the
/// last line).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RefusalCount {
    /// Lines logged.
    pub logged: u64,
    /// Refusals not logged, because the kind was logged too often.
    pub skipped: u64,
    /// Of those, the ones since the last line (its next line reports them).
    pending: u64,
}

/// Keys remembered by each rate limit (about 100 bytes each).
const MAX_LIMITED_KEYS: usize = 100_000;

/// Refusal log lines per second (and burst) for each kind of refusal: a flood of bad requests
/// leaves a trace without filling the logs.
const REFUSAL_LOG_RATE: Rate = Rate {
    per_second: 5.0,
    burst: 20,
};

/// Tenants as last read, by how they were looked up, with when: shared by the requests that
/// use them (no tenant is copied per request), absent ones cached too.
type TenantCache = Mutex<HashMap<Lookup, (Option<Arc<Tenant>>, Timestamp)>>;

/// The ingress's shared state.
pub struct Ingress<S, Q> {
    store: Arc<S>,
    queue: Arc<Q>,
    clock: SharedClock,
    config: IngressConfig,
    tenants: TenantCache,
    pushes: Buckets<TenantId>,
    auth_failures: Buckets<IpAddr>,
    refusal_logs: Buckets<&'static str>,
    /// Per kind of refusal: refusals not logged since the last line of the kind, and lines
    /// logged and refusals not logged in all.
    refusals: Mutex<HashMap<&'static str, RefusalCount>>,
}

impl<S, Q> std::fmt::Debug for Ingress<S, Q> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ingress")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// How a delivery names its tenant: by GitLab project (`/hooks/gitlab`) or by id
/// (`/hooks/gitlab/{tenant}`). The key of the ingress's tenant cache.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Lookup {
    Project(u64),
    Id(TenantId),
}

/// An answer of the ingress: a status and a small JSON body.
#[derive(Debug)]
struct Answer {
    status: StatusCode,
    body: serde_json::Value,
    /// Seconds for `Retry-After` (a `429`).
    retry_after: Option<u64>,
}

/// The one answer to every request that is not authenticated, whatever the project.
const UNAUTHENTICATED: &str = "unauthenticated: X-Gitlab-Token (and the signature, if the tenant requires one) must be those of the project's tenant";

impl Answer {
    fn error(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            body: json!({ "error": message.into() }),
            retry_after: None,
        }
    }

    fn ignored(reason: impl Into<String>) -> Self {
        Self {
            status: StatusCode::ACCEPTED,
            body: json!({ "status": "ignored", "reason": reason.into() }),
            retry_after: None,
        }
    }

    fn too_many(message: impl Into<String>, wait: Duration) -> Self {
        Self {
            retry_after: Some(limits::retry_after_secs(wait)),
            ..Self::error(StatusCode::TOO_MANY_REQUESTS, message)
        }
    }
}

impl IntoResponse for Answer {
    fn into_response(self) -> Response {
        let mut response = (self.status, axum::Json(self.body)).into_response();
        if let Some(secs) = self.retry_after {
            response
                .headers_mut()
                .insert(axum::http::header::RETRY_AFTER, secs.into());
        }
        response
    }
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

impl<S: Store, Q: Queue> Ingress<S, Q> {
    /// An ingress queueing to `queue` and finding tenants in `store`.
    pub fn new(store: Arc<S>, queue: Arc<Q>, clock: SharedClock, config: IngressConfig) -> Self {
        Self {
            store,
            queue,
            clock,
            tenants: Mutex::new(HashMap::new()),
            pushes: Buckets::new(config.push_rate, MAX_LIMITED_KEYS),
            auth_failures: Buckets::new(config.auth_failure_rate, MAX_LIMITED_KEYS),
            refusal_logs: Buckets::new(REFUSAL_LOG_RATE, 64),
            refusals: Mutex::new(HashMap::new()),
            config,
        }
    }

    /// Refusals so far, per kind (`unauthenticated`, `malformed`, `push-rate`,
    /// `auth-failure-rate`, `foreign-project`): every refusal is either logged or counted as
    /// skipped.
    pub fn refusals(&self) -> std::collections::BTreeMap<&'static str, RefusalCount> {
        let refusals = self.refusals.lock().unwrap_or_else(|p| p.into_inner());
        refusals.iter().map(|(k, v)| (*k, *v)).collect()
    }

    /// The client's address: from [`IngressConfig::client_address_header`] when set (its last
    /// address), else the connection's peer.
    fn client_address(&self, headers: &HeaderMap, peer: Option<SocketAddr>) -> Option<IpAddr> {
        match &self.config.client_address_header {
            Some(name) => header(headers, name)
                .and_then(|v| v.rsplit(',').next())
                .and_then(|a| a.trim().parse().ok()),
            None => peer.map(|p| p.ip()),
        }
    }

    /// Logs a refusal of kind `kind` once, unless this kind was logged too often lately; the
    /// next line of the kind says how many were not logged.
    fn log_refusal(&self, kind: &'static str, fields: std::fmt::Arguments<'_>) {
        let now = self.clock.now();
        let mut refusals = self.refusals.lock().unwrap_or_else(|p| p.into_inner());
        let count = refusals.entry(kind).or_default();
        if self.refusal_logs.take(&kind, now).is_ok() {
            let skipped = std::mem::take(&mut count.pending);
            count.logged += 1;
            warn!(refusal = kind, skipped, "webhook refused: {fields}");
        } else {
            count.pending += 1;
            count.skipped += 1;
        }
    }

    /// The answer to a request that is not authenticated (`why`, logged, never answered):
    /// counts against the source's failed authentications.
    fn unauthenticated(&self, source: Option<IpAddr>, why: std::fmt::Arguments<'_>) -> Answer {
        if let Some(s) = source {
            let _ = self.auth_failures.take(&s, self.clock.now());
        }
        let shown = source.map_or_else(|| "unknown".to_owned(), |s| s.to_string());
        self.log_refusal("unauthenticated", format_args!("{why} (from {shown})"));
        Answer::error(StatusCode::UNAUTHORIZED, UNAUTHENTICATED)
    }

    /// Serves [`Self::router`] on `listener` until `shutdown`, within the configured
    /// connection limits (see [`server`]).
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> std::io::Result<()> {
        let limits = server::ConnectionLimits {
            header_timeout: self.config.header_timeout,
            max_connections: self.config.max_connections,
        };
        server::serve(listener, self.router(), limits, shutdown).await
    }

    /// The HTTP routes: `POST /hooks/gitlab` and `GET /healthz`.
    pub fn router(self: Arc<Self>) -> Router {
        // The body is read by `receive`, under the ingress's own limit and deadline.
        Router::new()
            .route("/hooks/gitlab", post(receive::<S, Q>))
            .route("/hooks/gitlab/{tenant}", post(receive_for::<S, Q>))
            .route("/healthz", get(|| async { "ok" }))
            .with_state(self)
    }

    /// The tenant `lookup` names, cached for `tenant_ttl`.
    async fn tenant(&self, lookup: Lookup) -> Result<Option<Arc<Tenant>>, crate::ports::Error> {
        let now = self.clock.now();
        if let Ok(cache) = self.tenants.lock()
            && let Some((t, at)) = cache.get(&lookup)
            && now.since(*at) < self.config.tenant_ttl
        {
            return Ok(t.clone());
        }
        let tenant = match &lookup {
            Lookup::Project(project) => self.store.tenant_by_project(*project).await?,
            Lookup::Id(id) => self.store.tenant(id).await?,
        }
        .map(Arc::new);
        if let Ok(mut cache) = self.tenants.lock() {
            if cache.len() > 100_000 {
                cache.clear();
            }
            cache.insert(lookup, (tenant.clone(), now));
        }
        Ok(tenant)
    }

    /// Answers one webhook delivery from `peer` as `POST /hooks/gitlab` would: the status
    /// and the JSON body. (The HTTP layer adds only the body limit.)
    pub async fn answer(
        &self,
        peer: Option<SocketAddr>,
        headers: &HeaderMap,
        body: &[u8],
    ) -> (StatusCode, serde_json::Value) {
        let a = self.handle(peer, headers, body).await;
        (a.status, a.body)
    }

    /// Handles one webhook delivery.
    async fn handle(&self, peer: Option<SocketAddr>, headers: &HeaderMap, body: &[u8]) -> Answer {
        let source = self.client_address(headers, peer);
        if let Err(answer) = self.source_allowed(source) {
            return answer;
        }
        let Some(token) = header(headers, "x-gitlab-token") else {
            return self.unauthenticated(source, format_args!("no X-Gitlab-Token"));
        };
        let payload = match Payload::parse(body) {
            Ok(p) => p,
            Err(e) => {
                self.log_refusal("malformed", format_args!("{e}"));
                return Answer::error(StatusCode::BAD_REQUEST, e);
            }
        };
        let Some(project) = payload.project_id() else {
            self.log_refusal("malformed", format_args!("no project id"));
            return Answer::error(
                StatusCode::BAD_REQUEST,
                "missing field `project_id` (or `project.id`)",
            );
        };
        let tenant = match self.tenant(Lookup::Project(project)).await {
            Ok(Some(t)) => t,
            Ok(None) => {
                return self.unauthenticated(
                    source,
                    format_args!("GitLab project {project} belongs to no tenant"),
                );
            }
            Err(e) => {
                warn!(project, error = %crate::ports::chain(&e), "tenant lookup failed");
                return Answer::error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "tenant registry unavailable",
                );
            }
        };
        let now = self.clock.now();
        if !crate::tenants::verify_token(&tenant, token, now) {
            return self.unauthenticated(
                source,
                format_args!(
                    "wrong X-Gitlab-Token for project {project} of tenant {}",
                    tenant.id
                ),
            );
        }
        let signed = match &tenant.webhook.signing_secret {
            None => Ok(()),
            Some(secret) => Signature::start(secret, headers, now).and_then(|mut s| {
                s.update(body);
                s.verify()
            }),
        };
        self.authenticated(source, &tenant, project, headers, &payload, signed, now)
            .await
    }

    /// The rest of a delivery whose token is `tenant`'s (and whose project is one of its
    /// projects): the outcome of its signature check, if the tenant signs, then what it is.
    #[allow(clippy::too_many_arguments)]
    async fn authenticated(
        &self,
        source: Option<IpAddr>,
        tenant: &Tenant,
        project: u64,
        headers: &HeaderMap,
        payload: &Payload,
        signed: Result<(), String>,
        now: Timestamp,
    ) -> Answer {
        if let Err(e) = signed {
            return self.unauthenticated(
                source,
                format_args!(
                    "Standard Webhooks signature of project {project} of tenant {}: {e}",
                    tenant.id
                ),
            );
        }
        let kind = header(headers, "x-gitlab-event").unwrap_or_default();
        let object_kind = payload.object_kind.as_deref().unwrap_or_default();
        if kind == "Tag Push Hook" || object_kind == "tag_push" {
            return Answer::ignored("tag pushes are not deployed");
        }
        if kind != "Push Hook" || (object_kind != "push" && !object_kind.is_empty()) {
            let what = if kind.is_empty() { "(none)" } else { kind };
            return Answer::ignored(format!(
                "X-Gitlab-Event {what} is not handled: only Push Hook deploys"
            ));
        }
        self.push(tenant, project, headers, payload, now).await
    }

    /// Checks a delivery to `/hooks/gitlab/{tenant}` from its headers alone: the source's
    /// failed authentications, then the token against tenant `id`'s. Only then is the body
    /// read, so an unauthenticated sender never gets a body buffered.
    async fn authenticate_headers(
        &self,
        id: &str,
        source: Option<IpAddr>,
        headers: &HeaderMap,
    ) -> Result<Arc<Tenant>, Answer> {
        self.source_allowed(source)?;
        let Some(token) = header(headers, "x-gitlab-token") else {
            return Err(self.unauthenticated(source, format_args!("no X-Gitlab-Token")));
        };
        let Ok(id) = TenantId::new(id) else {
            return Err(self.unauthenticated(source, format_args!("no tenant {id:?}")));
        };
        let tenant = match self.tenant(Lookup::Id(id.clone())).await {
            Ok(Some(t)) => t,
            Ok(None) => {
                return Err(self.unauthenticated(source, format_args!("no tenant {id}")));
            }
            Err(e) => {
                warn!(tenant.id = %id, error = %crate::ports::chain(&e), "tenant lookup failed");
                return Err(Answer::error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "tenant registry unavailable",
                ));
            }
        };
        if !crate::tenants::verify_token(&tenant, token, self.clock.now()) {
            return Err(
                self.unauthenticated(source, format_args!("wrong X-Gitlab-Token for tenant {id}"))
            );
        }
        Ok(tenant)
    }

    /// Handles a delivery to `/hooks/gitlab/{tenant}` whose headers authenticated `tenant`,
    /// once its body was scanned (and its signature checked, if the tenant signs).
    async fn handle_for(
        &self,
        tenant: &Tenant,
        source: Option<IpAddr>,
        headers: &HeaderMap,
        payload: &Payload,
        signed: Result<(), String>,
    ) -> Answer {
        let Some(project) = payload.project_id() else {
            return Answer::error(
                StatusCode::BAD_REQUEST,
                "missing field `project_id` (or `project.id`)",
            );
        };
        if tenant.repo_for_project(project).is_none() {
            self.log_refusal(
                "foreign-project",
                format_args!("tenant {} sent GitLab project {project}", tenant.id),
            );
            return Answer::error(
                StatusCode::FORBIDDEN,
                format!(
                    "GitLab project {project} is not one of tenant {}'s projects",
                    tenant.id
                ),
            );
        }
        let now = self.clock.now();
        self.authenticated(source, tenant, project, headers, payload, signed, now)
            .await
    }

    /// `Err(429)` when `source` has used up its failed authentications.
    fn source_allowed(&self, source: Option<IpAddr>) -> Result<(), Answer> {
        if let Some(s) = source
            && let Err(wait) = self.auth_failures.check(&s, self.clock.now())
        {
            self.log_refusal(
                "auth-failure-rate",
                format_args!("too many failed authentications from {s}"),
            );
            return Err(Answer::too_many(
                "too many failed authentications from this address; retry later",
                wait,
            ));
        }
        Ok(())
    }

    async fn push(
        &self,
        tenant: &Tenant,
        project: u64,
        headers: &HeaderMap,
        payload: &Payload,
        now: Timestamp,
    ) -> Answer {
        let (Some(git_ref), Some(after)) = (&payload.git_ref, &payload.after) else {
            let missing = if payload.git_ref.is_none() {
                "ref"
            } else {
                "after"
            };
            return Answer::error(
                StatusCode::BAD_REQUEST,
                format!("missing field `{missing}`"),
            );
        };
        if after == NO_COMMIT {
            return Answer::ignored(format!("branch deletion of {git_ref}: nothing to deploy"));
        }
        let Some(branch) = git_ref.strip_prefix("refs/heads/") else {
            return Answer::ignored(format!("{git_ref} is not a branch"));
        };
        let Some(env) = tenant.environment_for_ref(git_ref) else {
            let mapped: Vec<&str> = tenant.branches.keys().map(String::as_str).collect();
            return Answer::ignored(format!(
                "branch {branch} is not mapped to an environment (mapped: {})",
                mapped.join(", ")
            ));
        };
        if tenant
            .environments
            .get(&env)
            .is_some_and(|s| s.decommissioned)
        {
            return Answer::ignored(format!(
                "environment {env} of {} is decommissioned: `wfctl provision {} --env {env}` provisions it again",
                tenant.id, tenant.id
            ));
        }
        let Some(repo) = tenant.repo_for_project(project) else {
            return Answer::error(
                StatusCode::NOT_FOUND,
                format!("GitLab project {project} belongs to no tenant"),
            );
        };
        let sha = match GitSha::new(after.as_str()) {
            Ok(s) => s,
            Err(e) => return Answer::error(StatusCode::BAD_REQUEST, format!("field `after`: {e}")),
        };
        let before = match payload.before.as_deref().map(GitSha::new).transpose() {
            Ok(b) => b,
            Err(e) => {
                return Answer::error(StatusCode::BAD_REQUEST, format!("field `before`: {e}"));
            }
        };
        let before_text = before.as_ref().map_or("", GitSha::as_str);
        let event_id = match event_id(headers, project, git_ref, before_text, after) {
            Ok(id) => id,
            Err(e) => return Answer::error(StatusCode::BAD_REQUEST, e),
        };
        if let Err(wait) = self.pushes.take(&tenant.id, now) {
            self.log_refusal(
                "push-rate",
                format_args!("tenant {} pushes faster than push_rate", tenant.id),
            );
            return Answer::too_many(
                format!(
                    "tenant {} pushes faster than the ingress accepts; retry later",
                    tenant.id
                ),
                wait,
            );
        }
        let key = WorkflowKey::new(tenant.id.clone(), env);
        let event = Event::Push(Push {
            event_id: event_id.clone(),
            repo,
            sha,
            before,
            git_ref: git_ref.clone(),
            author: payload.author(),
            message: payload.head_title(),
            received_at: now,
        });
        match enqueue(&*self.queue, &key, event, now).await {
            Ok(()) => {
                info!(tenant.id = %tenant.id, workflow.env = %env, event.id = %event_id, %repo, "push accepted");
                Answer {
                    status: StatusCode::ACCEPTED,
                    body: json!({
                        "status": "accepted",
                        "event_id": event_id.as_str(),
                        "workflow": key.to_string(),
                    }),
                    retry_after: None,
                }
            }
            Err(e) => {
                warn!(tenant.id = %tenant.id, error = %crate::ports::chain(&e), "push not queued");
                Answer::error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the event queue is unavailable; nothing was accepted, resend later",
                )
            }
        }
    }
}

/// The event id of a push delivery (see the module docs for the dedup each choice gives).
pub fn event_id(
    headers: &HeaderMap,
    project: u64,
    git_ref: &str,
    before: &str,
    after: &str,
) -> Result<EventId, String> {
    if let Some(key) = header(headers, "idempotency-key") {
        return caller_chosen(key).map_err(|e| format!("Idempotency-Key: {e}"));
    }
    if let Some(uuid) = header(headers, "x-gitlab-event-uuid") {
        return caller_chosen(uuid).map_err(|e| format!("X-Gitlab-Event-UUID: {e}"));
    }
    // `before` is part of it so that a push back to a commit seen before (a force push) is a
    // new event.
    let digest = Sha256::digest(format!("{project}\n{git_ref}\n{before}\n{after}").as_bytes());
    EventId::new(format!("push:{}", hex::encode(digest))).map_err(|e| e.to_string())
}

/// The prefix of event ids chosen by the sender of a webhook.
pub const CALLER_PREFIX: &str = "gitlab:";

/// The event id of a caller-chosen `value`: [`CALLER_PREFIX`] and the value, or its digest when
/// the two would be too long for an event id.
fn caller_chosen(value: &str) -> Result<EventId, String> {
    // Checked on its own first, so that a bad value is refused with its own rule.
    EventId::new(value).map_err(|e| e.to_string())?;
    let id = format!("{CALLER_PREFIX}{value}");
    if id.len() <= 128 {
        return EventId::new(id).map_err(|e| e.to_string());
    }
    let digest = hex::encode(Sha256::digest(value.as_bytes()));
    EventId::new(format!("{CALLER_PREFIX}sha256:{digest}")).map_err(|e| e.to_string())
}

/// `POST /hooks/gitlab/{tenant}`: the token (and a signature's headers) are checked before
/// the body is read, and the body is scanned as it arrives, keeping only what the event needs:
/// so it may be as large as GitLab's largest pushes (`tenant_max_body_bytes`) at the cost of
/// a small one in memory.
async fn receive_for<S: Store, Q: Queue>(
    State(ingress): State<Arc<Ingress<S, Q>>>,
    Path(tenant): Path<String>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Answer {
    let config = &ingress.config;
    let handled = async {
        let source = ingress.client_address(&headers, Some(peer));
        let tenant = match ingress
            .authenticate_headers(&tenant, source, &headers)
            .await
        {
            Ok(t) => t,
            Err(answer) => return answer,
        };
        let mut signature = match &tenant.webhook.signing_secret {
            None => None,
            Some(secret) => match Signature::start(secret, &headers, ingress.clock.now()) {
                Ok(s) => Some(s),
                Err(e) => {
                    return ingress.unauthenticated(
                        source,
                        format_args!("Standard Webhooks signature for tenant {}: {e}", tenant.id),
                    );
                }
            },
        };
        let scanned = scan_body(
            body,
            config.tenant_max_body_bytes,
            config.body_timeout,
            signature.as_mut(),
        )
        .await;
        let payload = match scanned {
            Ok(p) => p,
            Err(Refused::Malformed(e)) => {
                ingress.log_refusal("malformed", format_args!("tenant {}: {e}", tenant.id));
                return Answer::error(StatusCode::BAD_REQUEST, e);
            }
            Err(Refused::Answer(answer)) => return answer,
        };
        let signed = signature.map_or(Ok(()), Signature::verify);
        ingress
            .handle_for(&tenant, source, &headers, &payload, signed)
            .await
    };
    traced("/hooks/gitlab/{tenant}", config.request_timeout, handled).await
}

/// Why a streamed body was not scanned to the end.
enum Refused {
    /// It is not a JSON document, or a field is of the wrong type (the message says where).
    Malformed(String),
    /// Too large, too slow, or cut off: the answer says so.
    Answer(Answer),
}

/// Reads `body` chunk by chunk, up to `limit` bytes within `timeout`, feeding each chunk to
/// the scanner and to `signature`; a malformed document stops the reading at once. Only the
/// scanner's kept fields and the current chunk are held.
async fn scan_body(
    mut body: axum::body::Body,
    limit: usize,
    timeout: Duration,
    mut signature: Option<&mut Signature>,
) -> Result<Payload, Refused> {
    use http_body_util::BodyExt as _;
    if announced_over(&body, limit) {
        return Err(Refused::Answer(too_large(limit)));
    }
    let read = async {
        let mut scanner = Scanner::new();
        let mut total = 0usize;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| Refused::Answer(unreadable(&e)))?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            total = total.saturating_add(data.len());
            if total > limit {
                return Err(Refused::Answer(too_large(limit)));
            }
            if let Some(s) = signature.as_deref_mut() {
                s.update(&data);
            }
            scanner.feed(&data).map_err(Refused::Malformed)?;
        }
        scanner.finish().map_err(Refused::Malformed)
    };
    match tokio::time::timeout(timeout, read).await {
        Ok(result) => result,
        Err(_) => Err(Refused::Answer(too_slow(timeout))),
    }
}

/// `413`: the body is larger than `limit`.
fn too_large(limit: usize) -> Answer {
    Answer::error(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("the body is larger than {limit} bytes"),
    )
}

/// `400`: the body could not be read (the connection broke, a chunk was malformed).
fn unreadable(e: &dyn std::fmt::Display) -> Answer {
    Answer::error(
        StatusCode::BAD_REQUEST,
        format!("the body could not be read: {e}"),
    )
}

/// `408`: the body did not arrive within `timeout`.
fn too_slow(timeout: Duration) -> Answer {
    Answer::error(
        StatusCode::REQUEST_TIMEOUT,
        format!(
            "the body took longer than {} s to arrive",
            timeout.as_secs()
        ),
    )
}

/// `handled`'s answer, in the request's span for `route`, or `503` when it takes longer
/// than `deadline`.
async fn traced(
    route: &'static str,
    deadline: Duration,
    handled: impl Future<Output = Answer>,
) -> Answer {
    let span = tracing::info_span!(
        "webhook",
        otel.kind = "server",
        http.request.method = "POST",
        http.route = route,
        http.response.status_code = tracing::field::Empty,
    );
    let answer = match tokio::time::timeout(deadline, handled.instrument(span.clone())).await {
        Ok(answer) => answer,
        Err(_) => Answer::error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "the request took longer than {} s; send it again",
                deadline.as_secs()
            ),
        ),
    };
    span.record("http.response.status_code", answer.status.as_u16());
    answer
}

/// Whether `body` says (by its Content-Length) that it is larger than `limit`: then it is
/// refused before any of it is read.
fn announced_over(body: &axum::body::Body, limit: usize) -> bool {
    let announced = axum::body::HttpBody::size_hint(body).lower();
    usize::try_from(announced).map_or(true, |n| n > limit)
}

/// Reads `body` up to `limit` bytes within `timeout`.
async fn read_body(
    body: axum::body::Body,
    limit: usize,
    timeout: Duration,
) -> Result<Bytes, Answer> {
    if announced_over(&body, limit) {
        return Err(too_large(limit));
    }
    let limited = http_body_util::Limited::new(body, limit);
    match tokio::time::timeout(timeout, http_body_util::BodyExt::collect(limited)).await {
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(too_large(limit)),
        Ok(Err(e)) => Err(unreadable(&e)),
        Err(_) => Err(too_slow(timeout)),
    }
}

async fn receive<S: Store, Q: Queue>(
    State(ingress): State<Arc<Ingress<S, Q>>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Answer {
    let config = &ingress.config;
    let handled = async {
        match read_body(body, config.max_body_bytes, config.body_timeout).await {
            Ok(bytes) => ingress.handle(Some(peer), &headers, &bytes).await,
            Err(answer) => answer,
        }
    };
    traced("/hooks/gitlab", config.request_timeout, handled).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caller_chosen_ids_are_namespaced_and_fit() {
        assert_eq!(caller_chosen("K").expect("id").as_str(), "gitlab:K");
        let long = "x".repeat(128);
        let id = caller_chosen(&long).expect("id");
        assert!(id.as_str().starts_with("gitlab:sha256:") && id.as_str().len() <= 128);
        assert_ne!(caller_chosen(&"y".repeat(128)).expect("id"), id);
        assert!(caller_chosen("with space").is_err());
        assert!(caller_chosen("").is_err());
    }
}
