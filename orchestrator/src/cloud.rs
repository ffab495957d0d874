//! The activities a worker runs, as configured: the simulated cloud (in the embedded file) or,
//! with the `aws` feature, the AWS reconcilers (on `[infrastructure]`, with listener
//! priorities held in the store).

use std::sync::Arc;

#[cfg(feature = "aws")]
use activities::aws::AwsCloud;
use activities::simulated::{SimConfig, SimulatedCloud};
use activities::{Activities, Invocation, Outcome};
use workflows::{RetryPolicy, StepKind};

#[cfg(feature = "aws")]
use crate::allocations::StoreAllocations;
use crate::clock::SharedClock;
use crate::config::{ActivitiesKind, Config};
use crate::ports::Store;

/// Why the configured activities cannot start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `[simulated]` holds settings that are not valid.
    #[error("invalid [simulated] settings")]
    SimulatedSettings(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The simulated cloud's tables in the embedded file cannot be opened.
    #[error("cannot open the simulated cloud")]
    Simulated(#[source] activities::simulated::Error),
    /// The AWS settings are incomplete or name what does not exist.
    #[cfg(feature = "aws")]
    #[error("the AWS activities cannot start")]
    Aws(#[source] activities::aws::Error),
    /// `activities = "aws"` in a build without the `aws` feature.
    #[error(
        "activities = \"aws\" needs a build with the `aws` feature (cargo build -p orchestrator \
         --features aws)"
    )]
    AwsNotBuilt,
}

/// The simulated cloud or the AWS reconcilers.
#[derive(Debug)]
pub struct Cloud(Kind);

#[derive(Debug)]
enum Kind {
    Simulated(SimulatedCloud),
    #[cfg(feature = "aws")]
    Aws(Box<AwsCloud>),
}

impl Cloud {
    /// The activities `config` asks for: the simulated cloud in the embedded file (its time
    /// scale from `[simulated]`, else `default_scale`, overridden by `time_scale`), or the AWS
    /// reconcilers, whose settings and infrastructure are checked before anything runs.
    pub async fn open<S: Store>(
        config: &Config,
        store: Arc<S>,
        clock: SharedClock,
        default_scale: f64,
        time_scale: Option<f64>,
    ) -> Result<Self, Error> {
        match config.activities {
            ActivitiesKind::Simulated => {
                let sim = sim_config(config, default_scale, time_scale)?;
                let cloud = SimulatedCloud::open_with_clock(&config.embedded.path, sim, clock)
                    .map_err(Error::Simulated)?;
                // The store only matters to the AWS reconcilers (listener priorities).
                let _ = store;
                Ok(Cloud(Kind::Simulated(cloud)))
            }
            #[cfg(feature = "aws")]
            ActivitiesKind::Aws => Ok(Cloud(Kind::Aws(Box::new(aws(config, store, clock).await?)))),
            #[cfg(not(feature = "aws"))]
            ActivitiesKind::Aws => Err(Error::AwsNotBuilt),
        }
    }

    /// The simulated cloud's time scale; 1 for the AWS reconcilers.
    pub fn time_scale(&self) -> f64 {
        match &self.0 {
            Kind::Simulated(c) => c.config().time_scale,
            #[cfg(feature = "aws")]
            Kind::Aws(_) => 1.0,
        }
    }
}

/// `[simulated]` as a [`SimConfig`], with `default_scale` unless it sets a time scale, and
/// `flag` over both.
fn sim_config(config: &Config, default_scale: f64, flag: Option<f64>) -> Result<SimConfig, Error> {
    let mut table = config.simulated.clone();
    if !table.contains_key("time_scale") {
        table.insert("time_scale".into(), toml::Value::Float(default_scale));
    }
    if let Some(scale) = flag {
        table.insert("time_scale".into(), toml::Value::Float(scale));
    }
    let sim: SimConfig = table
        .try_into()
        .map_err(|e: toml::de::Error| Error::SimulatedSettings(Box::new(e)))?;
    sim.validate()
        .map_err(|e| Error::SimulatedSettings(Box::new(e)))?;
    Ok(sim)
}

impl Activities for Cloud {
    async fn invoke(&self, invocation: Invocation<'_>) -> Outcome {
        match &self.0 {
            Kind::Simulated(c) => c.invoke(invocation).await,
            #[cfg(feature = "aws")]
            Kind::Aws(c) => c.invoke(invocation).await,
        }
    }

    async fn abandon(&self, invocation: Invocation<'_>) -> Result<(), String> {
        match &self.0 {
            Kind::Simulated(c) => c.abandon(invocation).await,
            #[cfg(feature = "aws")]
            Kind::Aws(c) => c.abandon(invocation).await,
        }
    }

    fn retry_policy(&self, step: StepKind) -> RetryPolicy {
        match &self.0 {
            Kind::Simulated(c) => c.retry_policy(step),
            #[cfg(feature = "aws")]
            Kind::Aws(c) => c.retry_policy(step),
        }
    }
}

/// The AWS reconcilers on `config.infrastructure`, with the standard AWS environment; the
/// settings are checked first (each missing one named), then that what they name exists.
#[cfg(feature = "aws")]
pub async fn aws<S: Store>(
    config: &Config,
    store: Arc<S>,
    clock: SharedClock,
) -> Result<AwsCloud, Error> {
    let sdk = crate::aws::load_sdk_config().await;
    let cloud = AwsCloud::new(
        activities::aws::Clients::new(&sdk),
        config.infrastructure.clone(),
        StoreAllocations(store),
        Arc::new(move || clock.now()),
    )
    .map_err(Error::Aws)?;
    cloud.verify().await.map_err(Error::Aws)?;
    tracing::info!(vpc = %cloud.infrastructure().vpc_id, "AWS activities ready");
    Ok(cloud)
}
