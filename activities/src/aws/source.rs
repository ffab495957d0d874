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
    let head = cloud
        .clients
        .s3
        .head_object()
        .bucket(bucket)
        .key(&key)
        .send()
        .await;
    match head {
        Ok(_) => {
            tracing::debug!(artifact = %key, "artifact present; not fetched again");
            return Ok(done(sha, key));
        }
        Err(e) if is_not_found(&e) => {}
        Err(e) => {
            return Err(classify(
                "s3:HeadObject",
                &format!("s3://{bucket}/{key}"),
                &e,
            ));
        }
    }
    let header = deploy_token_header(cloud, names).await?;
    let url = cloud
        .infra
        .source_url
        .replace("{tenant}", names.key().tenant.as_str())
        .replace("{repo}", repo_name(repo));
    let dir = tempfile::tempdir()
        .map_err(|e| Error::Retryable(format!("cannot create a working directory: {e}")))?;
    let archive = fetch_and_pack(dir.path(), &url, sha, header.as_deref()).await?;
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
    match s3.head_object().bucket(bucket).key(&key).send().await {
        Ok(_) => return Ok(key),
        Err(e) if is_not_found(&e) => {}
        Err(e) => {
            return Err(classify(
                "s3:HeadObject",
                &format!("s3://{bucket}/{key}"),
                &e,
            ));
        }
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

/// Fetches commit `sha` of `url` into `dir` and packs its tree; returns the archive's path.
async fn fetch_and_pack(
    dir: &Path,
    url: &str,
    sha: &GitSha,
    header: Option<&str>,
) -> Result<std::path::PathBuf, Error> {
    let repo = dir.join("repo");
    let archive = dir.join("source.tar.gz");
    git(dir, &["init", "--quiet", "--bare", "repo"], None).await?;
    git(
        &repo,
        &["fetch", "--quiet", "--depth", "1", url, sha.as_str()],
        header,
    )
    .await?;
    let fetched = git(&repo, &["rev-parse", "FETCH_HEAD"], None).await?;
    if fetched.trim() != sha.as_str() {
        return Err(Error::Terminal(format!(
            "fetching {sha} from {url} gave {}",
            fetched.trim()
        )));
    }
    let out = archive.to_string_lossy().into_owned();
    git(
        &repo,
        &["archive", "--format=tar.gz", "-o", &out, sha.as_str()],
        None,
    )
    .await?;
    Ok(archive)
}

/// Runs git in `dir`; its stdout, or a retryable error with what it said (a remote may be
/// unreachable for a while; the step's retry policy bounds the attempts).
async fn git(dir: &Path, args: &[&str], header: Option<&str>) -> Result<String, Error> {
    let mut cmd = Command::new("git");
    cmd.args(args)
        .current_dir(dir)
        .env("GIT_TERMINAL_PROMPT", "0")
        .env_remove("GIT_DIR")
        .kill_on_drop(true);
    if let Some(header) = header {
        cmd.env("GIT_CONFIG_COUNT", "1")
            .env("GIT_CONFIG_KEY_0", "http.extraHeader")
            .env("GIT_CONFIG_VALUE_0", header);
    }
    let out = cmd
        .output()
        .await
        .map_err(|e| Error::Terminal(format!("cannot run git: {e}")))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        let said = String::from_utf8_lossy(&out.stderr);
        Err(Error::Retryable(format!(
            "git {} failed ({}): {}",
            args.first().copied().unwrap_or_default(),
            out.status,
            said.trim().chars().take(500).collect::<String>()
        )))
    }
}
