//! An environment's group size and target-tracking policy: the tenant's settings for the
//! environment (`wfctl tenant set`) over the platform's defaults (`[infrastructure]`).

use aws_sdk_autoscaling::types::{
    MetricType, PredefinedMetricSpecification, TargetTrackingConfiguration,
};
use workflows::{Scaling, Sizing};

use super::error::classify;
use super::{AwsCloud, Error};
use crate::Invocation;

/// The name of the target-tracking policy put on every group that has one.
pub(super) const POLICY: &str = "target-tracking";

/// The sizing of `invocation`'s environment; settings that contradict each other (a minimum
/// over the maximum) are a terminal error naming the field.
pub(super) fn sizing(cloud: &AwsCloud, invocation: Invocation<'_>) -> Result<Sizing, Error> {
    invocation
        .settings
        .sizing(&cloud.infra.default_sizing())
        .map_err(|e| Error::Terminal(format!("the environment's sizing: {e}")))
}

/// `app/<lb name>/<lb id>/targetgroup/<tg name>/<tg id>`: what a requests-per-target policy
/// names, from the listener's and the target group's ARNs.
pub(super) fn resource_label(listener_arn: &str, target_group_arn: &str) -> Option<String> {
    let lb = listener_arn.split_once(":listener/")?.1;
    let mut parts = lb.split('/');
    let (kind, name, id) = (parts.next()?, parts.next()?, parts.next()?);
    let tg = target_group_arn.split_once(":targetgroup/")?.1;
    Some(format!("{kind}/{name}/{id}/targetgroup/{tg}"))
}

/// Puts `scaling` on `group` as its target-tracking policy (putting it again replaces it).
pub(super) async fn ensure_policy(
    cloud: &AwsCloud,
    group: &str,
    scaling: Scaling,
    target_group_arn: &str,
) -> Result<(), Error> {
    let (metric, target, label) = match scaling {
        Scaling::Cpu(p) => (MetricType::AsgAverageCpuUtilization, p, None),
        Scaling::RequestsPerTarget(n) => (
            MetricType::AlbRequestCountPerTarget,
            n,
            Some(
                resource_label(&cloud.infra.listener_arn, target_group_arn).ok_or_else(|| {
                    Error::Terminal(format!(
                        "a requests-per-target policy needs the load balancer of listener {} and target group {target_group_arn}",
                        cloud.infra.listener_arn
                    ))
                })?,
            ),
        ),
    };
    let config = TargetTrackingConfiguration::builder()
        .predefined_metric_specification(
            PredefinedMetricSpecification::builder()
                .predefined_metric_type(metric)
                .set_resource_label(label)
                .build(),
        )
        .target_value(f64::from(target))
        .build();
    cloud
        .clients
        .autoscaling
        .put_scaling_policy()
        .auto_scaling_group_name(group)
        .policy_name(POLICY)
        .policy_type("TargetTrackingScaling")
        .target_tracking_configuration(config)
        .send()
        .await
        .map_err(|e| classify("autoscaling:PutScalingPolicy", group, &e))?;
    tracing::info!(group, policy = %scaling, "scaling policy put");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_resource_label_names_load_balancer_and_target_group() {
        let listener = "arn:aws:elasticloadbalancing:eu-west-1:123456789012:listener/app/shared/50dc6c495c0c9188/f2f7dc8efc522ab2";
        let tg = "arn:aws:elasticloadbalancing:eu-west-1:123456789012:targetgroup/acme-dev/943f017f100becff";
        assert_eq!(
            resource_label(listener, tg).as_deref(),
            Some("app/shared/50dc6c495c0c9188/targetgroup/acme-dev/943f017f100becff")
        );
        assert_eq!(resource_label("arn:listener", tg), None);
    }
}
