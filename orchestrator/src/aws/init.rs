//! `orchestrator init` on AWS: creates the queues (with their dead-letter queues and redrive
//! policies) and the tables (with their indexes), idempotently, for sandboxes and moto.

use aws_config::SdkConfig;

use super::{Names, RequestCounter, dynamo, sqs};
use crate::ports::Error;

/// Creates everything the AWS backend needs with the names of `names`; running it again
/// changes nothing that is already right.
pub async fn create_all(sdk: &SdkConfig, names: &Names, max_receives: u32) -> Result<(), Error> {
    let counter = RequestCounter::new();
    sqs::create_queues(&sqs::client(sdk, &counter), names, max_receives).await?;
    dynamo::create_tables(&dynamo::client(sdk, &counter), names).await?;
    tracing::info!(
        events = %names.events_queue,
        steps = %names.steps_queue,
        workflows = %names.workflows_table,
        requests = counter.total(),
        "queues and tables ready"
    );
    Ok(())
}
