//! The AWS backend: the `Queue` port on SQS ([`sqs`]), the `Store` port on DynamoDB
//! ([`dynamo`]), the `Journal` as [`Batched`] over both, `orchestrator init`
//! ([`init`]), and request accounting.
//!
//! AWS settings come from the standard AWS environment and profiles (`AWS_REGION`,
//! `AWS_ENDPOINT_URL`, `AWS_PROFILE`, credentials chain); nothing AWS-specific is invented. The
//! only setting of our own is the name prefix of the queues and tables.

pub mod dynamo;
pub mod init;
pub mod sqs;

use std::sync::Arc;

use crate::ports::Error;
pub use crate::requests::{RequestCount, RequestCounter};
use crate::stack::{Batched, Stack};
use aws_common::Class;
use aws_smithy_runtime_api::box_error::BoxError;
use aws_smithy_runtime_api::client::interceptors::Intercept;
use aws_smithy_runtime_api::client::interceptors::context::BeforeTransmitInterceptorContextRef;
use aws_smithy_runtime_api::client::orchestrator::{HttpResponse, Metadata};
use aws_smithy_runtime_api::client::result::SdkError;
use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;
use aws_smithy_types::config_bag::ConfigBag;
use aws_smithy_types::error::metadata::ProvideErrorMetadata;

/// The names of the queues and tables, all derived from one prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    /// `<prefix>-events.fifo`: pushes and signals, FIFO per workflow.
    pub events_queue: String,
    /// `<prefix>-events-dlq.fifo`: its dead-letter queue.
    pub events_dlq: String,
    /// `<prefix>-steps`: step messages and timers.
    pub steps_queue: String,
    /// `<prefix>-steps-dlq`: its dead-letter queue.
    pub steps_dlq: String,
    /// `<prefix>-workflows`: workflow records.
    pub workflows_table: String,
    /// `<prefix>-history`: history entries.
    pub history_table: String,
    /// `<prefix>-tenants`: tenant records and project-id pointers.
    pub tenants_table: String,
    /// `<prefix>-allocations`: allocated values (rule priorities).
    pub allocations_table: String,
}

impl Names {
    /// The names for `prefix`.
    pub fn new(prefix: &str) -> Self {
        Self {
            events_queue: format!("{prefix}-events.fifo"),
            events_dlq: format!("{prefix}-events-dlq.fifo"),
            steps_queue: format!("{prefix}-steps"),
            steps_dlq: format!("{prefix}-steps-dlq"),
            workflows_table: format!("{prefix}-workflows"),
            history_table: format!("{prefix}-history"),
            tenants_table: format!("{prefix}-tenants"),
            allocations_table: format!("{prefix}-allocations"),
        }
    }
}

/// What a worker runs on: DynamoDB, SQS and the [`Batched`] journal over both.
pub type AwsStack = Stack<dynamo::DynamoStore, sqs::SqsQueue, Batched>;

/// Connects to the queues and tables of `names` (checking that they exist), with every request
/// counted on `counter`; commits group up to `max_group` at a time.
pub async fn connect(
    sdk: &aws_config::SdkConfig,
    names: &Names,
    counter: &RequestCounter,
    max_group: usize,
) -> Result<AwsStack, Error> {
    let store = Arc::new(dynamo::DynamoStore::connect(sdk, names, counter).await?);
    let queue = Arc::new(sqs::SqsQueue::connect(sdk, names, counter).await?);
    Ok(Stack {
        journal: Arc::new(Batched::new(store.clone(), queue.clone(), max_group)),
        store,
        queue,
    })
}

/// Loads the AWS configuration the standard way (environment, profiles, credential chain), on
/// the HTTPS client of [`aws_common::http_client`].
pub async fn load_sdk_config() -> aws_config::SdkConfig {
    aws_config::defaults(aws_config::BehaviorVersion::latest())
        .http_client(aws_common::http_client())
        .load()
        .await
}

impl Intercept for RequestCounter {
    fn name(&self) -> &'static str {
        "RequestCounter"
    }

    fn read_before_transmit(
        &self,
        _context: &BeforeTransmitInterceptorContextRef<'_>,
        _runtime_components: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let (service, operation) = cfg
            .load::<Metadata>()
            .map(|m| (m.service().to_owned(), m.name().to_owned()))
            .unwrap_or_else(|| ("unknown".to_owned(), "unknown".to_owned()));
        self.count(&service, &operation);
        Ok(())
    }
}

/// Maps an SDK error to a port error by [`aws_common::classify`]: what may pass (throttling,
/// 5xx, timeouts, connection failures) is `Unavailable`; a missing resource names it and
/// `orchestrator init`, denied access names the IAM permission to grant, and anything else is
/// the request's fault. The cause is the classified error: the service's code and message.
pub(crate) fn sdk_error<E>(
    backend: &'static str,
    action: &str,
    resource: &str,
    err: SdkError<E, HttpResponse>,
) -> Error
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    let classified = aws_common::classify(&err);
    match classified.class {
        Class::NotFound => Error::invalid_by(
            format!(
                "{resource} does not exist ({backend} {action}): create it with `orchestrator init`"
            ),
            classified,
        ),
        Class::AccessDenied => Error::invalid_by(
            format!(
                "access denied: {action} on {resource}; grant {} on it",
                permission(backend, action)
            ),
            classified,
        ),
        class if class.is_retryable() => {
            Error::unavailable_by(backend, format!("{action} on {resource}"), classified)
        }
        _ => Error::invalid_by(format!("{action} on {resource} failed"), classified),
    }
}

/// The IAM action that allows `action` of `backend`'s API: batch operations are allowed by
/// the single-item action, and a DynamoDB transaction by the actions of its items.
fn permission(backend: &str, action: &str) -> String {
    let action = match (backend, action) {
        ("sqs", "SendMessageBatch") => "SendMessage",
        ("sqs", "DeleteMessageBatch") => "DeleteMessage",
        ("sqs", "ChangeMessageVisibilityBatch") => "ChangeMessageVisibility",
        ("dynamodb", "TransactWriteItems") => {
            return "dynamodb:PutItem, dynamodb:DeleteItem and dynamodb:ConditionCheckItem"
                .to_owned();
        }
        (_, a) => a,
    };
    format!("{backend}:{action}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_prefix() {
        let n = Names::new("acme-prod");
        assert_eq!(n.events_queue, "acme-prod-events.fifo");
        assert_eq!(n.events_dlq, "acme-prod-events-dlq.fifo");
        assert_eq!(n.steps_queue, "acme-prod-steps");
        assert_eq!(n.history_table, "acme-prod-history");
    }

    #[test]
    fn denied_actions_name_the_iam_permission() {
        assert_eq!(permission("sqs", "SendMessageBatch"), "sqs:SendMessage");
        assert_eq!(permission("sqs", "ReceiveMessage"), "sqs:ReceiveMessage");
        assert_eq!(permission("dynamodb", "Query"), "dynamodb:Query");
        assert!(permission("dynamodb", "TransactWriteItems").contains("dynamodb:PutItem"));
    }
}
