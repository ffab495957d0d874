//! Errors of the AWS reconcilers, retryable or terminal as [`aws_common::classify`] says.
//!
//! The SDK's modeled errors are mostly absent for EC2 (its errors are unmodeled in the Rust
//! SDK), so the reconcilers match error codes ([`code`]) for the answers they expect
//! (`InvalidGroup.Duplicate`: adopt) and classify the rest.

use aws_smithy_runtime_api::client::orchestrator::HttpResponse;
use aws_smithy_runtime_api::client::result::SdkError;
use aws_smithy_types::error::metadata::ProvideErrorMetadata;

pub(crate) use aws_common::code;

/// Why a reconciler invocation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A call failed in a way that may pass (throttling, 5xx, a resource not settled yet).
    #[error("{0}")]
    Retryable(String),
    /// A call failed in a way retrying will not fix, or the step cannot succeed.
    #[error("{0}")]
    Terminal(String),
}

impl Error {
    /// Whether the step's retry policy should try again.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Error::Retryable(_))
    }
}

/// Classifies `e`, raised by `operation` (`"ec2:RunInstances"`) on `resource`: the text names
/// both, then the service's code and message (it becomes the step's error in the history).
pub(crate) fn classify<E>(operation: &str, resource: &str, e: &SdkError<E, HttpResponse>) -> Error
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    let classified = aws_common::classify(e);
    let text = format!("{operation} on {resource}: {}", classified.summary());
    if classified.is_retryable() {
        Error::Retryable(text)
    } else {
        Error::Terminal(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_smithy_runtime_api::http::StatusCode;
    use aws_smithy_types::body::SdkBody;
    use aws_smithy_types::error::ErrorMetadata;

    fn service_error(status: u16, code: &str) -> SdkError<ErrorMetadata, HttpResponse> {
        let meta = ErrorMetadata::builder()
            .code(code)
            .message("it went wrong")
            .build();
        let raw = HttpResponse::new(
            StatusCode::try_from(status).expect("status"),
            SdkBody::empty(),
        );
        SdkError::service_error(meta, raw)
    }

    #[test]
    fn the_text_names_operation_resource_and_code() {
        let e = classify(
            "ec2:RunInstances",
            "builder",
            &service_error(503, "Whatever"),
        );
        assert!(e.is_retryable(), "{e}");
        for (status, code) in [
            (400, "InvalidParameterValue"),
            (400, "InstanceLimitExceeded"),
        ] {
            let e = classify("ec2:RunInstances", "builder", &service_error(status, code));
            assert!(!e.is_retryable(), "{status} {code}: {e}");
            assert_eq!(
                e.to_string(),
                format!("ec2:RunInstances on builder: {code}: it went wrong")
            );
        }
    }
}
