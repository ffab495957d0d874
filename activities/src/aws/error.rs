//! Errors of the AWS reconcilers, classified retryable or terminal.
//!
//! The SDK's modeled errors are mostly absent for EC2 (its errors are unmodeled in the Rust
//! SDK), so every service error is classified by its `code()` and HTTP status: throttling,
//! 5xx and the codes of [`RETRYABLE_CODES`] may pass; everything else (validation, access
//! denied, limits) will not pass by retrying.

use aws_smithy_runtime_api::client::orchestrator::HttpResponse;
use aws_smithy_runtime_api::client::result::SdkError;
use aws_smithy_types::error::metadata::ProvideErrorMetadata;

/// Error codes that mean "try again later" besides throttling and 5xx.
const RETRYABLE_CODES: &[&str] = &[
    "Throttling",
    "ThrottlingException",
    "ThrottledException",
    "RequestLimitExceeded",
    "RequestThrottled",
    "RequestThrottledException",
    "TooManyRequestsException",
    "SlowDown",
    "PriorRequestNotComplete",
    "InternalError",
    "InternalFailure",
    "InternalServerError",
    "ServiceUnavailable",
    "Unavailable",
    "RequestTimeout",
    "RequestTimeoutException",
    "RequestExpired",
    "IncorrectState",
    "IncorrectInstanceState",
    "InsufficientInstanceCapacity",
    "InsufficientDBInstanceCapacity",
    "InvalidDBInstanceState",
    "ResourceInUse",
    "ResourceContention",
    "ScalingActivityInProgress",
    "DependencyViolation",
    "OperationAborted",
    "InvalidInstanceID.NotFound",
    "InvalidAMIID.NotFound",
    "InvalidGroup.NotFound",
];

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

/// The error code of an SDK error, when the service sent one.
pub(crate) fn code<E: ProvideErrorMetadata>(e: &SdkError<E, HttpResponse>) -> Option<&str> {
    match e {
        SdkError::ServiceError(s) => s.err().code(),
        _ => None,
    }
}

/// Classifies `e`, raised by `operation` (`"ec2:RunInstances"`) on `resource`.
pub(crate) fn classify<E>(operation: &str, resource: &str, e: &SdkError<E, HttpResponse>) -> Error
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    match e {
        SdkError::ServiceError(service) => {
            let status = service.raw().status().as_u16();
            let err = service.err();
            let code = err.code().unwrap_or("unknown");
            let message = err.message().unwrap_or("no message");
            let text = format!("{operation} on {resource}: {code}: {message}");
            if status >= 500 || status == 429 || RETRYABLE_CODES.contains(&code) {
                Error::Retryable(text)
            } else {
                Error::Terminal(text)
            }
        }
        SdkError::ConstructionFailure(_) => Error::Terminal(format!(
            "{operation} on {resource}: cannot build the request: {}",
            aws_smithy_types::error::display::DisplayErrorContext(e)
        )),
        // Timeouts, connection failures and unreadable responses may pass.
        other => Error::Retryable(format!(
            "{operation} on {resource}: {}",
            aws_smithy_types::error::display::DisplayErrorContext(other)
        )),
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
    fn throttling_and_server_errors_are_retryable_validation_is_not() {
        for (status, code) in [
            (400, "RequestLimitExceeded"),
            (400, "Throttling"),
            (503, "Whatever"),
            (500, "InternalError"),
            (400, "DependencyViolation"),
        ] {
            let e = classify("ec2:RunInstances", "builder", &service_error(status, code));
            assert!(e.is_retryable(), "{status} {code}: {e}");
        }
        for (status, code) in [
            (400, "InvalidParameterValue"),
            (403, "UnauthorizedOperation"),
            (400, "InstanceLimitExceeded"),
        ] {
            let e = classify("ec2:RunInstances", "builder", &service_error(status, code));
            assert!(!e.is_retryable(), "{status} {code}: {e}");
            let text = e.to_string();
            assert!(
                text.contains("ec2:RunInstances")
                    && text.contains(code)
                    && text.contains("builder"),
                "{text}"
            );
        }
        assert_eq!(
            code(&service_error(400, "InvalidGroup.Duplicate")),
            Some("InvalidGroup.Duplicate")
        );
    }
}
