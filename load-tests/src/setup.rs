//! What the load generators share to set a run up: the tenants they register, the
//! `orchestrator` binary they start, the ingress they wait for, and the push payload they vary.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use http_body_util::Full;
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use orchestrator::clock::{Clock, SystemClock};
use orchestrator::ports::Store;
use orchestrator::tenants::token_sha256;
use workflows::{Domain, GitSha, Tenant, TenantId};

/// The GitLab project of tenant `i`'s infrastructure repository; its application repository
/// is the next one.
pub fn infra_project(i: usize) -> u64 {
    1_000_000 + 2 * i as u64
}

/// Registers `n` tenants, the `i`-th named `id(i)`, whose webhooks carry `token`.
pub async fn register_tenants<S: Store>(
    store: &S,
    n: usize,
    id: impl Fn(usize) -> TenantId,
    token: &str,
) -> Result<()> {
    let now = SystemClock.now();
    for i in 0..n {
        let id = id(i);
        let tenant = Tenant::new(
            id.clone(),
            Domain::new(format!("{id}.example"))?,
            infra_project(i),
            infra_project(i) + 1,
            token_sha256(token),
            now,
        );
        store.put_tenant(&tenant, false).await?;
    }
    Ok(())
}

/// The `orchestrator` binary: `given`, else the one next to the running binary.
pub fn orchestrator_binary(given: Option<&PathBuf>) -> Result<PathBuf> {
    match given {
        Some(p) => Ok(p.clone()),
        None => Ok(std::env::current_exe()?
            .parent()
            .context("no directory of this binary")?
            .join("orchestrator")),
    }
}

/// Waits (up to 20 s) until the ingress on `listen` answers its health check.
pub async fn wait_for_health(
    client: &Client<HttpConnector, Full<Bytes>>,
    listen: &str,
) -> Result<()> {
    let health: hyper::Uri = format!("http://{listen}/healthz").parse()?;
    let started = Instant::now();
    loop {
        let req = hyper::Request::get(health.clone()).body(Full::new(Bytes::new()))?;
        if let Ok(r) = client.request(req).await
            && r.status().is_success()
        {
            return Ok(());
        }
        if started.elapsed() > Duration::from_secs(20) {
            bail!("the ingress did not start on {listen}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// GitLab's documented push payload, for the generators to set project, ref and commit in.
pub fn push_template() -> Result<serde_json::Value> {
    Ok(serde_json::from_str(include_str!(
        "../../orchestrator/tests/data/gitlab/gitlab-docs_push.json"
    ))?)
}

/// The `n`-th commit of a generated push: `n` as 40 hex digits.
pub fn commit(n: u64) -> Result<GitSha, workflows::id::Error> {
    GitSha::new(format!("{n:040x}"))
}

/// The `n` of a commit made by [`commit`] (0 for another commit).
pub fn commit_number(sha: &GitSha) -> u64 {
    sha.as_str()
        .get(24..)
        .and_then(|tail| u64::from_str_radix(tail, 16).ok())
        .unwrap_or(0)
}

/// This process's peak resident set so far (`VmHWM`), in MiB; 0 where `/proc` has none.
pub fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}
