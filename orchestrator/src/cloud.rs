//! The activities a worker runs, as configured: the simulated cloud (in the embedded file) or
//! the AWS reconcilers (on `[infrastructure]`, with listener priorities held in the store).

use std::sync::Arc;

use activities::aws::{AwsCloud, Clients};
use activities::simulated::SimulatedCloud;
use activities::{Activities, Invocation, Outcome};
use workflows::{RetryPolicy, StepKind};

use crate::allocations::StoreAllocations;
use crate::clock::SharedClock;
use crate::config::Config;
use crate::ports::Store;

/// The simulated cloud or the AWS reconcilers.
#[derive(Debug)]
pub enum Cloud<S: Store> {
    /// The simulated cloud.
    Simulated(SimulatedCloud),
    /// The AWS reconcilers.
    Aws(Box<AwsCloud<StoreAllocations<S>>>),
}

impl<S: Store> Activities for Cloud<S> {
    async fn invoke(&self, invocation: Invocation<'_>) -> Outcome {
        match self {
            Cloud::Simulated(c) => c.invoke(invocation).await,
            Cloud::Aws(c) => c.invoke(invocation).await,
        }
    }

    async fn abandon(&self, invocation: Invocation<'_>) -> Result<(), String> {
        match self {
            Cloud::Simulated(c) => c.abandon(invocation).await,
            Cloud::Aws(c) => c.abandon(invocation).await,
        }
    }

    fn retry_policy(&self, step: StepKind) -> RetryPolicy {
        match self {
            Cloud::Simulated(c) => c.retry_policy(step),
            Cloud::Aws(c) => c.retry_policy(step),
        }
    }
}

/// The AWS reconcilers on `config.infrastructure`, with the standard AWS environment; the
/// settings are checked first (each missing one named), then that what they name exists.
pub async fn aws<S: Store>(
    config: &Config,
    store: Arc<S>,
    clock: SharedClock,
) -> Result<AwsCloud<StoreAllocations<S>>, activities::aws::Error> {
    let sdk = crate::aws::load_sdk_config().await;
    let cloud = AwsCloud::new(
        Clients::new(&sdk),
        config.infrastructure.clone(),
        StoreAllocations(store),
        Arc::new(move || clock.now()),
    )?;
    cloud.verify().await?;
    Ok(cloud)
}
