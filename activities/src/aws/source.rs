//! `source_infra` and `source_app`: the pushed commit, packed and kept in the artifact bucket.
//!
//! The artifact's key names the tenant, the environment, the repository and the commit
//! ([`Names::artifact_key`]); a commit id addresses its content, so an artifact that is there
//! is never fetched again. Otherwise `git` fetches exactly that commit (shallow) from
//! [`Infrastructure::source_url`](super::Infrastructure::source_url), `git archive` packs its
//! tree as a gzipped tar, and S3 stores it tagged with tenant and env.
//!
//! Private repositories: a GitLab deploy token is read from Secrets Manager
//! ([`Infrastructure::deploy_token_secret`](super::Infrastructure::deploy_token_secret), a
//! JSON `{"username": ..., "token": ...}`) and handed to git as an HTTP header through
//! `GIT_CONFIG_*` environment variables: it never appears in a command line, a URL, a log
//! line or the record.

use std::path::Path;
use std::time::Duration;

use aws_sdk_s3::primitives::ByteStream;
use base64::Engine as _;
use serde::Deserialize;
use tokio::process::Command;
use workflows::{GitSha, RepoKind, SourceOutput, StepOutput};

use super::error::{classify, code};
use super::{AwsCloud, Error, Names, tags};
use crate::{Invocation, Outcome};

pub(super) async fn reconcile(
    cloud: &AwsCloud,
    names: &Names,
    invocation: Invocation<'_>,
    repo: RepoKind,
) -> Result<Outcome, Error> {
    let release = &invocation.task.release;
    let sha = match repo {
        RepoKind::Infra => release.infra.as_ref(),
        RepoKind::App => release.app.as_ref(),
    }
    .ok_or_else(|| Error::Terminal(format!("the release has no {repo} commit to fetch")))?;
    let key = names.artifact_key(repo, sha);
    let bucket = &cloud.infra.artifact_bucket;
    if stored(cloud, &key).await? {
        tracing::debug!(artifact = %key, "artifact present; not fetched again");
        return Ok(done(sha, key));
    }
    let header = deploy_token_header(cloud, names).await?;
    let url = cloud
        .infra
        .source_url
        .replace("{tenant}", names.key().tenant.as_str())
        .replace("{repo}", repo_name(repo));
    let dir = private_dir()
        .map_err(|e| Error::Retryable(format!("cannot create a working directory: {e}")))?;
    let limits = GitLimits {
        timeout: Duration::from_secs(cloud.infra.source_timeout_secs),
        max_bytes: cloud.infra.source_max_mib.saturating_mul(1024 * 1024),
    };
    let archive = fetch_and_pack(dir.path(), &url, sha, header.as_deref(), limits).await?;
    let body = ByteStream::from_path(&archive)
        .await
        .map_err(|e| Error::Retryable(format!("cannot read the packed source: {e}")))?;
    let tagging = tags(names, invocation.task.run)
        .into_iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&");
    cloud
        .clients
        .s3
        .put_object()
        .bucket(bucket)
        .key(&key)
        .body(body)
        .content_type("application/gzip")
        .tagging(tagging)
        .send()
        .await
        .map_err(|e| classify("s3:PutObject", &format!("s3://{bucket}/{key}"), &e))?;
    tracing::info!(artifact = %key, "source packed and stored");
    Ok(done(sha, key))
}

/// The key of the artifact of `repo` at `sha` under the environment's prefix, the only part of
/// the bucket its instances may read. An artifact stored before artifacts were kept per
/// environment (`recorded` by the source step under `<tenant>/<repo>/<sha>.tar.gz`) is copied
/// there first.
pub(super) async fn in_prefix(
    cloud: &AwsCloud,
    names: &Names,
    repo: RepoKind,
    sha: &GitSha,
    recorded: Option<&SourceOutput>,
) -> Result<String, Error> {
    let key = names.artifact_key(repo, sha);
    let bucket = &cloud.infra.artifact_bucket;
    let s3 = &cloud.clients.s3;
    if stored(cloud, &key).await? {
        return Ok(key);
    }
    let Some(old) = recorded.filter(|r| r.sha == *sha && r.artifact_key != key) else {
        return Err(Error::Terminal(format!(
            "the {repo} artifact s3://{bucket}/{key} is missing (deleted by hand?); push {repo} again"
        )));
    };
    let old_key = &old.artifact_key;
    s3.copy_object()
        .bucket(bucket)
        .key(&key)
        .copy_source(format!("{bucket}/{old_key}"))
        .send()
        .await
        .map_err(|e| classify("s3:CopyObject", &format!("s3://{bucket}/{old_key}"), &e))?;
    tracing::info!(from = %old_key, to = %key, "artifact copied under the environment's prefix");
    Ok(key)
}

/// Whether the artifact bucket holds `key`.
async fn stored(cloud: &AwsCloud, key: &str) -> Result<bool, Error> {
    let bucket = &cloud.infra.artifact_bucket;
    let head = cloud
        .clients
        .s3
        .head_object()
        .bucket(bucket)
        .key(key)
        .send()
        .await;
    match head {
        Ok(_) => Ok(true),
        Err(e) if is_not_found(&e) => Ok(false),
        Err(e) => Err(classify(
            "s3:HeadObject",
            &format!("s3://{bucket}/{key}"),
            &e,
        )),
    }
}

fn done(sha: &GitSha, key: String) -> Outcome {
    Outcome::Done(StepOutput::Source(SourceOutput {
        sha: sha.clone(),
        artifact_key: key,
    }))
}

fn repo_name(repo: RepoKind) -> &'static str {
    match repo {
        RepoKind::Infra => "infra",
        RepoKind::App => "app",
    }
}

fn is_not_found<R>(
    e: &aws_sdk_s3::error::SdkError<aws_sdk_s3::operation::head_object::HeadObjectError, R>,
) -> bool {
    matches!(e, aws_sdk_s3::error::SdkError::ServiceError(s) if s.err().is_not_found())
}

#[derive(Deserialize)]
struct DeployToken {
    username: String,
    token: String,
}

/// The `Authorization` header of the tenant's deploy token, if one is configured.
async fn deploy_token_header(cloud: &AwsCloud, names: &Names) -> Result<Option<String>, Error> {
    let Some(secret) = &cloud.infra.deploy_token_secret else {
        return Ok(None);
    };
    let id = secret.replace("{tenant}", names.key().tenant.as_str());
    let value = cloud
        .clients
        .secrets
        .get_secret_value()
        .secret_id(&id)
        .send()
        .await;
    let value = match value {
        Ok(v) => v,
        Err(e) if code(&e) == Some("ResourceNotFoundException") => {
            return Err(Error::Terminal(format!(
                "the deploy token secret {id} does not exist: create it with {{\"username\": ..., \"token\": ...}}"
            )));
        }
        Err(e) => return Err(classify("secretsmanager:GetSecretValue", &id, &e)),
    };
    let text = value.secret_string().unwrap_or_default();
    // The secret's content is never quoted in an error.
    let token: DeployToken = serde_json::from_str(text).map_err(|_| {
        Error::Terminal(format!(
            "the deploy token secret {id} is not JSON with string fields username and token"
        ))
    })?;
    let basic = base64::engine::general_purpose::STANDARD
        .encode(format!("{}:{}", token.username, token.token));
    Ok(Some(format!("Authorization: Basic {basic}")))
}

/// A working directory only this process's user may enter (the tenant's source, the deploy
/// token's git configuration): mode 0700, removed when dropped.
fn private_dir() -> std::io::Result<tempfile::TempDir> {
    let mut builder = tempfile::Builder::new();
    builder.prefix("tenant-source-");
    #[cfg(unix)]
    builder.permissions(std::os::unix::fs::PermissionsExt::from_mode(0o700));
    builder.tempdir()
}

/// What one source step's git may use: time for each command, and bytes in its working
/// directory (the fetched objects, then the archive).
#[derive(Debug, Clone, Copy)]
struct GitLimits {
    timeout: Duration,
    max_bytes: u64,
}

/// Fetches commit `sha` of `url` into `dir` and packs its tree; returns the archive's path.
async fn fetch_and_pack(
    dir: &Path,
    url: &str,
    sha: &GitSha,
    header: Option<&str>,
    limits: GitLimits,
) -> Result<std::path::PathBuf, Error> {
    let repo = dir.join("repo");
    let archive = dir.join("source.tar.gz");
    git(
        dir,
        dir,
        vec!["init", "--quiet", "--bare", "repo"],
        None,
        limits,
    )
    .await?;
    git(
        dir,
        &repo,
        vec!["fetch", "--quiet", "--depth", "1", url, sha.as_str()],
        header,
        limits,
    )
    .await?;
    let fetched = git(dir, &repo, vec!["rev-parse", "FETCH_HEAD"], None, limits).await?;
    if fetched.trim() != sha.as_str() {
        return Err(Error::Terminal(format!(
            "fetching {sha} from {url} gave {}",
            fetched.trim()
        )));
    }
    let out = archive.to_string_lossy().into_owned();
    git(
        dir,
        &repo,
        vec!["archive", "--format=tar.gz", "-o", &out, sha.as_str()],
        None,
        limits,
    )
    .await?;
    Ok(archive)
}

/// The git command `args` in `cwd`, in a scrubbed environment: nothing of the orchestrator's
/// (AWS credentials, proxies, git settings) reaches it, no system or user configuration is
/// read, it never prompts, and it speaks only `https`, `http` and `file` (no `ext::` or `ssh`
/// commands a URL could name). `home` is its `HOME`. The deploy token's header, if any, goes
/// in through `GIT_CONFIG_*`, never the command line.
fn git_command(home: &Path, cwd: &Path, args: &[&str], header: Option<&str>) -> Command {
    let mut cmd = Command::new("git");
    cmd.args(args)
        .current_dir(cwd)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", home)
        .env("LANG", "C")
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_ALLOW_PROTOCOL", "https:http:file")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    if let Some(header) = header {
        cmd.env("GIT_CONFIG_COUNT", "1")
            .env("GIT_CONFIG_KEY_0", "http.extraHeader")
            .env("GIT_CONFIG_VALUE_0", header);
    }
    cmd
}

/// Bytes of the files under `dir`.
fn size_of(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            match entry.metadata() {
                Ok(m) if m.is_dir() => stack.push(entry.path()),
                Ok(m) => total += m.len(),
                Err(_) => {}
            }
        }
    }
    total
}

/// `Ok` while `dir` holds at most `limits.max_bytes`; else the terminal error of git command
/// `what`.
async fn within_cap(dir: &Path, limits: GitLimits, what: &str) -> Result<(), Error> {
    let dir = dir.to_path_buf();
    let used = tokio::task::spawn_blocking(move || size_of(&dir))
        .await
        .unwrap_or(0);
    if used > limits.max_bytes {
        return Err(Error::Terminal(format!(
            "git {what} stopped: the commit's source takes more than {} MiB (source_max_mib)",
            limits.max_bytes / (1024 * 1024)
        )));
    }
    Ok(())
}

/// Runs git (see [`git_command`]) in `cwd` under the private directory `dir`, within
/// `limits`: killed, and the step failed, when it runs longer than the timeout or `dir`
/// grows past the cap (checked twice a second). Its stdout, or a retryable error with what it
/// said (a remote may be unreachable for a while; the step's retry policy bounds attempts).
async fn git(
    dir: &Path,
    cwd: &Path,
    args: Vec<&str>,
    header: Option<&str>,
    limits: GitLimits,
) -> Result<String, Error> {
    let what = args.first().copied().unwrap_or_default().to_owned();
    let child = git_command(dir, cwd, &args, header)
        .spawn()
        .map_err(|e| Error::Terminal(format!("cannot run git: {e}")))?;
    let output = child.wait_with_output();
    tokio::pin!(output);
    let deadline = tokio::time::Instant::now() + limits.timeout;
    let out = loop {
        tokio::select! {
            out = &mut output => break out.map_err(|e| Error::Terminal(format!("git {what}: {e}")))?,
            () = tokio::time::sleep(Duration::from_millis(500)) => {
                if tokio::time::Instant::now() >= deadline {
                    return Err(Error::Retryable(format!(
                        "git {what} took longer than {} s and was stopped",
                        limits.timeout.as_secs()
                    )));
                }
                within_cap(dir, limits, &what).await?;
            }
        }
    };
    // A command quicker than the first check is checked once it is done.
    within_cap(dir, limits, &what).await?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        let said = String::from_utf8_lossy(&out.stderr);
        Err(Error::Retryable(format!(
            "git {what} failed ({}): {}",
            out.status,
            said.trim().chars().take(500).collect::<String>()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn git_runs_in_a_scrubbed_environment() {
        let cmd = git_command(
            Path::new("/work"),
            Path::new("/work/repo"),
            &["fetch", "url"],
            Some("Authorization: Basic eA=="),
        );
        let envs: std::collections::BTreeMap<String, Option<String>> = cmd
            .as_std()
            .get_envs()
            .map(|(k, v)| {
                (
                    k.to_string_lossy().into_owned(),
                    v.map(|v| v.to_string_lossy().into_owned()),
                )
            })
            .collect();
        let keys: Vec<&str> = envs.keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            [
                "GIT_ALLOW_PROTOCOL",
                "GIT_CONFIG_COUNT",
                "GIT_CONFIG_GLOBAL",
                "GIT_CONFIG_KEY_0",
                "GIT_CONFIG_NOSYSTEM",
                "GIT_CONFIG_VALUE_0",
                "GIT_TERMINAL_PROMPT",
                "HOME",
                "LANG",
                "PATH",
            ],
            "only these reach git"
        );
        assert_eq!(
            envs["GIT_ALLOW_PROTOCOL"].as_deref(),
            Some("https:http:file")
        );
        assert_eq!(envs["HOME"].as_deref(), Some("/work"));
        assert!(
            !cmd.as_std()
                .get_args()
                .any(|a| a.to_string_lossy().contains("Basic")),
            "the token is never on the command line"
        );
    }
}
