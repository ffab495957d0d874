//! Script reports in the artifact bucket (see [`crate::report`]): listing a prefix tells each
//! report's outcome by its key's suffix; only a failed report is read.

use aws_sdk_s3::primitives::ByteStream;

use super::error::classify;
use super::{AwsCloud, Error};
use crate::report::{FAILED_SUFFIX, MAX_REPORT_BYTES, OK_SUFFIX, Report};

/// What the reports under a prefix say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Found {
    /// No report yet.
    None,
    /// Reports that all passed: their keys.
    Passed(Vec<String>),
    /// A failed report: its key and what it says.
    Failed(String, Report),
}

/// The reports whose keys start with `prefix` (at most the first 1,000: an environment's
/// group never has more instances).
pub(super) async fn under(cloud: &AwsCloud, prefix: &str) -> Result<Found, Error> {
    let bucket = &cloud.infra.artifact_bucket;
    let out = cloud
        .clients
        .s3
        .list_objects_v2()
        .bucket(bucket)
        .prefix(prefix)
        .send()
        .await
        .map_err(|e| classify("s3:ListObjectsV2", prefix, &e))?;
    let keys: Vec<String> = out
        .contents()
        .iter()
        .filter_map(|o| o.key())
        .map(str::to_owned)
        .collect();
    if let Some(failed) = keys.iter().find(|k| k.ends_with(FAILED_SUFFIX)) {
        let report = read(cloud, failed).await?;
        return Ok(Found::Failed(failed.clone(), report));
    }
    let passed: Vec<String> = keys
        .into_iter()
        .filter(|k| k.ends_with(OK_SUFFIX))
        .collect();
    Ok(if passed.is_empty() {
        Found::None
    } else {
        Found::Passed(passed)
    })
}

/// Reads the report at `key`, at most [`MAX_REPORT_BYTES`] of it.
async fn read(cloud: &AwsCloud, key: &str) -> Result<Report, Error> {
    let out = cloud
        .clients
        .s3
        .get_object()
        .bucket(&cloud.infra.artifact_bucket)
        .key(key)
        .range(format!("bytes=0-{}", MAX_REPORT_BYTES - 1))
        .send()
        .await
        .map_err(|e| classify("s3:GetObject", key, &e))?;
    let bytes = collect(out.body, key).await?;
    Ok(Report::parse(&String::from_utf8_lossy(&bytes)))
}

async fn collect(body: ByteStream, key: &str) -> Result<Vec<u8>, Error> {
    let data = body
        .collect()
        .await
        .map_err(|e| Error::Retryable(format!("s3:GetObject on {key}: reading the body: {e}")))?;
    let mut bytes = data.into_bytes().to_vec();
    bytes.truncate(MAX_REPORT_BYTES);
    Ok(bytes)
}
