//! What every AWS adapter of the orchestrator shares: one classifier of the AWS SDK's errors
//! ([`classify`]), and the HTTPS client every SDK client uses ([`http_client`]).
//!
//! The SDK retries throttling, 5xx and transport errors itself (standard retry mode) before an
//! error reaches us; [`classify`] then says what is left: a [`Class`] that knows whether
//! trying again later may pass, the service's error code and message, and the HTTP status.
//! The queue and store adapters turn it into port errors, the reconcilers into step outcomes;
//! both agree on what is retryable because both ask this one function.
//!
//! Codes are sorted with the SDK's own lists of throttling and transient codes (the ones its
//! retry classifier uses), then with the codes of [`BUSY_CODES`], [`NOT_FOUND_CODES`] and
//! [`ACCESS_DENIED_CODES`]; a code in none of them is decided by the status: 5xx and 429 may
//! pass, any other answer is the request's fault.

use aws_runtime::retries::classifiers::{THROTTLING_ERRORS, TRANSIENT_ERRORS};
use aws_smithy_http_client::proxy::ProxyConfig;
use aws_smithy_http_client::tls::{self, rustls_provider::CryptoMode};
use aws_smithy_http_client::{Builder, ConnectorBuilder};
use aws_smithy_runtime_api::client::http::SharedHttpClient;
use aws_smithy_runtime_api::client::orchestrator::HttpResponse;
use aws_smithy_runtime_api::client::result::SdkError;
use aws_smithy_types::error::display::DisplayErrorContext;
use aws_smithy_types::error::metadata::ProvideErrorMetadata;

/// The HTTPS client of every AWS SDK client: the SDK's own (hyper, rustls, the proxy from the
/// standard `HTTPS_PROXY`/`NO_PROXY` variables, the client's timeouts and sleep), with rustls
/// on the `ring` provider instead of `aws-lc`, whose C build was a minute of every clean build.
/// Give it to the configuration loader (`aws_config::ConfigLoader::http_client`), or to an
/// `SdkConfig` built by hand; the SDK crates are built without a default client.
pub fn http_client() -> SharedHttpClient {
    Builder::new().build_with_connector_fn(|settings, components| {
        let mut connector =
            ConnectorBuilder::default().tls_provider(tls::Provider::Rustls(CryptoMode::Ring));
        connector.set_connector_settings(settings.cloned());
        if let Some(components) = components {
            connector.set_sleep_impl(components.sleep_impl());
        }
        connector.set_proxy_config(Some(ProxyConfig::from_env()));
        connector.build()
    })
}

/// Codes of a resource that is not in a state to allow the request yet, or that was just
/// created and is not visible everywhere yet (EC2 is eventually consistent: an id it just
/// returned may be unknown to the next request). Waiting lets them pass.
pub const BUSY_CODES: &[&str] = &[
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
    "RequestExpired",
    "TransactionConflictException",
    "InvalidInstanceID.NotFound",
    "InvalidAMIID.NotFound",
    "InvalidGroup.NotFound",
];

/// Codes of a resource that does not exist (a queue or table not created): retrying will not
/// create it.
pub const NOT_FOUND_CODES: &[&str] = &[
    "ResourceNotFoundException",
    "AWS.SimpleQueueService.NonExistentQueue",
    "QueueDoesNotExist",
    "NoSuchBucket",
];

/// Codes of a request the credentials may not make (a permission missing, or credentials
/// that are not valid).
pub const ACCESS_DENIED_CODES: &[&str] = &[
    "AccessDenied",
    "AccessDeniedException",
    "UnauthorizedOperation",
    "AuthFailure",
    "InvalidClientTokenId",
    "UnrecognizedClientException",
    "SignatureDoesNotMatch",
    "IncompleteSignature",
    "MissingAuthenticationToken",
];

/// What an AWS request's failure means for whoever made it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// The request rate (or a rate quota) was exceeded: slow down and retry.
    Throttled,
    /// The service failed (a 5xx, or a 429 it did not explain).
    Server,
    /// The request timed out, never reached the service, or its answer could not be read.
    Transient,
    /// The resource is settling, contended, or not visible yet: retry after a while.
    Busy,
    /// The resource does not exist.
    NotFound,
    /// The credentials may not do this (a missing IAM permission, invalid credentials).
    AccessDenied,
    /// The request is wrong (validation, a limit, a conflict) or could not even be built.
    Invalid,
}

impl Class {
    /// Whether trying again later may pass.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            Class::Throttled | Class::Server | Class::Transient | Class::Busy
        )
    }
}

/// An SDK error, classified. As an error, it reads `code: message`: what the service said,
/// without the SDK's layers around it; adapters keep it as the cause of their own errors.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", self.summary())]
pub struct Classified {
    /// What it means.
    pub class: Class,
    /// The service's error code, when it answered with one.
    pub code: Option<String>,
    /// The service's message, or a description of what failed before an answer.
    pub message: String,
    /// The HTTP status of the answer, when there was one.
    pub status: Option<u16>,
}

impl Classified {
    /// Whether trying again later may pass.
    pub fn is_retryable(&self) -> bool {
        self.class.is_retryable()
    }

    /// `code: message`, or the message alone when there is no code.
    pub fn summary(&self) -> String {
        match &self.code {
            Some(code) => format!("{code}: {}", self.message),
            None => self.message.clone(),
        }
    }
}

/// The error code of an SDK error, when the service answered with one.
pub fn code<E: ProvideErrorMetadata>(e: &SdkError<E, HttpResponse>) -> Option<&str> {
    match e {
        SdkError::ServiceError(s) => s.err().code(),
        _ => None,
    }
}

/// Classifies `e`: by the service's error code when there is one it knows, else by the HTTP
/// status; an error before any answer by its kind (a request that cannot be built or a
/// dispatch refused by the client's own configuration is invalid; timeouts, connection
/// failures and unreadable answers are transient).
pub fn classify<E>(e: &SdkError<E, HttpResponse>) -> Classified
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    let context = || DisplayErrorContext(e).to_string();
    match e {
        SdkError::ServiceError(service) => {
            let status = service.raw().status().as_u16();
            let err = service.err();
            let code = err.code();
            Classified {
                class: class_of(code, status),
                code: code.map(str::to_owned),
                message: err.message().map_or_else(context, str::to_owned),
                status: Some(status),
            }
        }
        SdkError::ConstructionFailure(_) => Classified {
            class: Class::Invalid,
            code: None,
            message: format!("the request cannot be built: {}", context()),
            status: None,
        },
        SdkError::DispatchFailure(d) if d.is_user() => Classified {
            class: Class::Invalid,
            code: None,
            message: context(),
            status: None,
        },
        SdkError::ResponseError(r) => Classified {
            class: Class::Transient,
            code: None,
            message: context(),
            status: Some(r.raw().status().as_u16()),
        },
        // Timeouts and the other dispatch failures (connection refused or reset, DNS).
        _ => Classified {
            class: Class::Transient,
            code: None,
            message: context(),
            status: None,
        },
    }
}

/// The class of a service's answer with `code` and `status`.
fn class_of(code: Option<&str>, status: u16) -> Class {
    let known = |list: &[&str]| code.is_some_and(|c| list.contains(&c));
    if known(THROTTLING_ERRORS) {
        Class::Throttled
    } else if known(TRANSIENT_ERRORS) {
        Class::Transient
    } else if known(BUSY_CODES) {
        Class::Busy
    } else if known(NOT_FOUND_CODES) {
        Class::NotFound
    } else if known(ACCESS_DENIED_CODES) {
        Class::AccessDenied
    } else if status == 429 {
        Class::Throttled
    } else if status >= 500 {
        Class::Server
    } else {
        Class::Invalid
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_smithy_runtime_api::client::result::ConnectorError;
    use aws_smithy_runtime_api::http::StatusCode;
    use aws_smithy_types::body::SdkBody;
    use aws_smithy_types::error::ErrorMetadata;

    type Error = SdkError<ErrorMetadata, HttpResponse>;

    fn service(status: u16, code: &str) -> Error {
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

    fn uncoded(status: u16) -> Error {
        let raw = HttpResponse::new(
            StatusCode::try_from(status).expect("status"),
            SdkBody::empty(),
        );
        SdkError::service_error(ErrorMetadata::builder().build(), raw)
    }

    fn io() -> Error {
        let e = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        SdkError::dispatch_failure(ConnectorError::io(Box::new(e)))
    }

    fn user() -> Error {
        SdkError::dispatch_failure(ConnectorError::user("no TLS provider".into()))
    }

    fn timeout() -> Error {
        SdkError::timeout_error("read timed out")
    }

    fn construction() -> Error {
        SdkError::construction_failure("missing field `TableName`")
    }

    fn unreadable(status: u16) -> Error {
        let raw = HttpResponse::new(
            StatusCode::try_from(status).expect("status"),
            SdkBody::from("<html>"),
        );
        SdkError::response_error("cannot parse the answer", raw)
    }

    #[test]
    fn every_kind_of_failure_has_its_class() {
        use Class::*;
        let table: Vec<(&str, Error, Class)> = vec![
            // Throttling codes are throttling whatever the status.
            (
                "DynamoDB throttling",
                service(400, "ThrottlingException"),
                Throttled,
            ),
            (
                "DynamoDB capacity",
                service(400, "ProvisionedThroughputExceededException"),
                Throttled,
            ),
            ("EC2 rate", service(503, "RequestLimitExceeded"), Throttled),
            (
                "SQS throttling",
                service(403, "RequestThrottled"),
                Throttled,
            ),
            ("S3 slow down", service(503, "SlowDown"), Throttled),
            ("a 429 without a code", uncoded(429), Throttled),
            // 5xx with codes nobody listed are the service's failures: retry.
            (
                "DynamoDB 500, unknown code",
                service(500, "SomethingNew"),
                Server,
            ),
            ("a 503 without a code", uncoded(503), Server),
            (
                "internal error",
                service(500, "InternalServerError"),
                Server,
            ),
            ("SQS internal", service(500, "InternalFailure"), Server),
            // Before or around the answer.
            (
                "request timeout code",
                service(400, "RequestTimeout"),
                Transient,
            ),
            ("a timeout", timeout(), Transient),
            ("connection refused", io(), Transient),
            ("an unreadable 200", unreadable(200), Transient),
            ("a dispatch refused by our configuration", user(), Invalid),
            ("a request that cannot be built", construction(), Invalid),
            // Settling resources.
            ("EC2 dependency", service(400, "DependencyViolation"), Busy),
            (
                "EC2 eventual consistency",
                service(400, "InvalidInstanceID.NotFound"),
                Busy,
            ),
            ("RDS state", service(400, "InvalidDBInstanceState"), Busy),
            // Missing resources and permissions.
            (
                "missing table",
                service(400, "ResourceNotFoundException"),
                NotFound,
            ),
            (
                "missing queue",
                service(400, "AWS.SimpleQueueService.NonExistentQueue"),
                NotFound,
            ),
            (
                "DynamoDB denied",
                service(400, "AccessDeniedException"),
                AccessDenied,
            ),
            (
                "EC2 denied",
                service(403, "UnauthorizedOperation"),
                AccessDenied,
            ),
            ("SQS denied", service(403, "AccessDenied"), AccessDenied),
            (
                "bad key",
                service(403, "InvalidClientTokenId"),
                AccessDenied,
            ),
            // The request's fault.
            ("validation", service(400, "ValidationException"), Invalid),
            (
                "EC2 parameter",
                service(400, "InvalidParameterValue"),
                Invalid,
            ),
            ("EC2 quota", service(400, "InstanceLimitExceeded"), Invalid),
            ("an unknown 400", service(400, "Whatever"), Invalid),
            ("an unknown 403", uncoded(403), Invalid),
        ];
        for (what, error, class) in table {
            let c = classify(&error);
            assert_eq!(c.class, class, "{what}: {c:?}");
            assert_eq!(c.is_retryable(), class.is_retryable(), "{what}");
        }
    }

    #[test]
    fn retryable_classes_are_exactly_the_passing_ones() {
        use Class::*;
        for class in [Throttled, Server, Transient, Busy] {
            assert!(class.is_retryable(), "{class:?}");
        }
        for class in [NotFound, AccessDenied, Invalid] {
            assert!(!class.is_retryable(), "{class:?}");
        }
    }

    #[test]
    fn the_answer_is_kept() {
        let c = classify(&service(400, "ValidationException"));
        assert_eq!(c.code.as_deref(), Some("ValidationException"));
        assert_eq!(c.message, "it went wrong");
        assert_eq!(c.status, Some(400));
        assert_eq!(c.summary(), "ValidationException: it went wrong");
        let t = classify(&timeout());
        assert_eq!((t.code, t.status), (None, None));
        assert!(t.message.contains("read timed out"), "{}", t.message);
        assert_eq!(
            code(&service(400, "InvalidGroup.Duplicate")),
            Some("InvalidGroup.Duplicate")
        );
        assert_eq!(code(&timeout()), None);
    }
}
