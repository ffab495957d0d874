//! Tenants, keys and pushes as the tests write them.

use workflows::{
    Domain, Environment, Event, EventId, GitSha, Push, RepoKind, Tenant, TenantId, Timestamp,
    WorkflowKey,
};

/// Tenant `id` of domain `<id>.example` with GitLab projects `infra` and `app`, whose webhook
/// secret hashes to zeros.
pub fn tenant(id: &str, infra: u64, app: u64) -> Tenant {
    Tenant::new(
        TenantId::new(id).expect("tenant id"),
        Domain::new(format!("{id}.example")).expect("domain"),
        infra,
        app,
        "00".repeat(32),
        Timestamp::from_unix_millis(1_000),
    )
}

/// The workflow of `tenant` in `env`.
pub fn key(tenant: &str, env: Environment) -> WorkflowKey {
    WorkflowKey::new(TenantId::new(tenant).expect("tenant id"), env)
}

/// A push of commit `n` (as 40 hex digits) of `repo` to `main`, with event id `id`.
pub fn push(id: &str, repo: RepoKind, n: u32, now: Timestamp) -> Event {
    Event::Push(Push {
        event_id: EventId::new(id).expect("event id"),
        repo,
        sha: GitSha::new(format!("{n:040x}")).expect("sha"),
        before: None,
        git_ref: "refs/heads/main".into(),
        author: "jane".into(),
        message: format!("commit {n}"),
        received_at: now,
    })
}
