//! The queues of `orchestrator init` and the start-up check: both queues with their
//! dead-letter queues and redrive policies, created idempotently; a queue that is missing or
//! lacks its policy named.

use aws_sdk_sqs::Client;
use aws_sdk_sqs::types::QueueAttributeName;
use tracing::info;

use super::{BACKEND, DEFAULT_VISIBILITY, RETENTION, Target, queue_resource, unavailable};
use crate::aws::{Names, sdk_error};
use crate::ports::Error;

/// Creates the four queues of `names` (idempotently: run it again to converge settings):
/// the dead-letter queues first, then the main queues, all with a retention of 14 days; the
/// events queues FIFO with content-based deduplication off; the main queues with a visibility
/// timeout of 60 s and the redrive policy `{"deadLetterTargetArn": <dlq>, "maxReceiveCount":
/// max_receives}`. `CreateQueue` gets only the attributes a queue cannot change (`FifoQueue`),
/// so an existing queue is found again; the rest is set with `SetQueueAttributes`.
pub async fn create_queues(client: &Client, names: &Names, max_receives: u32) -> Result<(), Error> {
    if !(1..=1000).contains(&max_receives) {
        return Err(Error::invalid(format!(
            "max_receives must be between 1 and 1000 (SQS maxReceiveCount), not {max_receives}"
        )));
    }
    let retention = RETENTION.as_secs().to_string();
    let visibility = DEFAULT_VISIBILITY.as_secs().to_string();
    for (main, dlq, fifo) in [
        (&names.events_queue, &names.events_dlq, true),
        (&names.steps_queue, &names.steps_dlq, false),
    ] {
        let dlq_url = create_queue(client, dlq, fifo).await?;
        let mut dlq_attributes = vec![(
            QueueAttributeName::MessageRetentionPeriod,
            retention.clone(),
        )];
        if fifo {
            dlq_attributes.push((
                QueueAttributeName::ContentBasedDeduplication,
                "false".to_owned(),
            ));
        }
        set_attributes(client, dlq, &dlq_url, dlq_attributes).await?;
        let dlq_arn = queue_arn(client, dlq, &dlq_url).await?;

        let main_url = create_queue(client, main, fifo).await?;
        let policy = serde_json::json!({
            "deadLetterTargetArn": dlq_arn,
            "maxReceiveCount": max_receives,
        })
        .to_string();
        let mut attributes = vec![
            (
                QueueAttributeName::MessageRetentionPeriod,
                retention.clone(),
            ),
            (QueueAttributeName::VisibilityTimeout, visibility.clone()),
            (QueueAttributeName::RedrivePolicy, policy),
        ];
        if fifo {
            attributes.push((
                QueueAttributeName::ContentBasedDeduplication,
                "false".to_owned(),
            ));
        }
        set_attributes(client, main, &main_url, attributes).await?;
        info!(queue = %main, dead_letter_queue = %dlq, max_receives, "queue ready");
    }
    Ok(())
}

async fn create_queue(client: &Client, name: &str, fifo: bool) -> Result<String, Error> {
    let mut request = client.create_queue().queue_name(name);
    if fifo {
        request = request.attributes(QueueAttributeName::FifoQueue, "true");
    }
    let out = request
        .send()
        .await
        .map_err(|e| sdk_error(BACKEND, "CreateQueue", &format!("queue {name}"), e))?;
    out.queue_url
        .ok_or_else(|| unavailable(format!("CreateQueue of {name} returned no URL")))
}

async fn set_attributes(
    client: &Client,
    name: &str,
    url: &str,
    attributes: Vec<(QueueAttributeName, String)>,
) -> Result<(), Error> {
    client
        .set_queue_attributes()
        .queue_url(url)
        .set_attributes(Some(attributes.into_iter().collect()))
        .send()
        .await
        .map_err(|e| sdk_error(BACKEND, "SetQueueAttributes", &format!("queue {name}"), e))?;
    Ok(())
}

async fn queue_arn(client: &Client, name: &str, url: &str) -> Result<String, Error> {
    let out = client
        .get_queue_attributes()
        .queue_url(url)
        .attribute_names(QueueAttributeName::QueueArn)
        .send()
        .await
        .map_err(|e| sdk_error(BACKEND, "GetQueueAttributes", &format!("queue {name}"), e))?;
    out.attributes
        .and_then(|mut a| a.remove(&QueueAttributeName::QueueArn))
        .ok_or_else(|| unavailable(format!("GetQueueAttributes of {name} returned no QueueArn")))
}

pub(super) async fn queue_url(client: &Client, name: &str) -> Result<Target, Error> {
    let out = client
        .get_queue_url()
        .queue_name(name)
        .send()
        .await
        .map_err(|e| sdk_error(BACKEND, "GetQueueUrl", &format!("queue {name}"), e))?;
    let url = out
        .queue_url
        .ok_or_else(|| unavailable(format!("GetQueueUrl of {name} returned no URL")))?;
    Ok(Target {
        name: name.to_owned(),
        url,
    })
}

/// Reads `main`'s redrive policy: it must send dead letters to `dlq`. Returns its
/// `maxReceiveCount`.
pub(super) async fn redrive_policy(
    client: &Client,
    main: &Target,
    dlq: &Target,
) -> Result<u32, Error> {
    let out = client
        .get_queue_attributes()
        .queue_url(&main.url)
        .attribute_names(QueueAttributeName::RedrivePolicy)
        .send()
        .await
        .map_err(|e| sdk_error(BACKEND, "GetQueueAttributes", &queue_resource(main), e))?;
    let missing = || {
        Error::invalid(format!(
            "queue {} has no redrive policy to {}: run `orchestrator init`",
            main.name, dlq.name
        ))
    };
    let policy = out
        .attributes
        .and_then(|mut a| a.remove(&QueueAttributeName::RedrivePolicy))
        .ok_or_else(missing)?;
    let policy: serde_json::Value = serde_json::from_str(&policy).map_err(|e| {
        Error::invalid(format!(
            "queue {} has a redrive policy that is not JSON ({e}): run `orchestrator init`",
            main.name
        ))
    })?;
    let target = policy
        .get("deadLetterTargetArn")
        .and_then(|v| v.as_str())
        .ok_or_else(missing)?;
    if target.rsplit(':').next() != Some(dlq.name.as_str()) {
        return Err(Error::invalid(format!(
            "queue {} sends its dead letters to {target}, not to {}: run `orchestrator init`",
            main.name, dlq.name
        )));
    }
    // SQS writes the count as a number; older tools wrote a string.
    let max = policy.get("maxReceiveCount").and_then(|v| {
        v.as_u64()
            .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
    });
    max.and_then(|m| u32::try_from(m).ok()).ok_or_else(missing)
}
