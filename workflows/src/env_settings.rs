//! What an operator sets per tenant environment besides config vars: the Auto Scaling group's
//! sizing and scaling policy, how many releases are kept for rollback, and whether the
//! environment was decommissioned (then the ingress answers its pushes as ignored). Kept with
//! the tenant record; every field left unset takes the platform's default.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The most instances a group may be given.
pub const MAX_INSTANCES: u32 = 100;

/// How many releases are kept when the environment does not say.
pub const DEFAULT_KEEP_RELEASES: u32 = 3;

/// The most releases an environment may keep.
pub const MAX_KEEP_RELEASES: u32 = 20;

/// A target-tracking scaling policy: the group adds or removes instances to hold the metric
/// at the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Scaling {
    /// Average CPU utilization of the group's instances, in percent (1 to 100).
    Cpu(u32),
    /// Requests per target per minute counted by the load balancer (at least 1).
    RequestsPerTarget(u32),
}

impl Scaling {
    /// Parses `cpu:60` or `requests:1000`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let (kind, value) = text
            .split_once(':')
            .ok_or_else(|| format!("scaling {text:?}: expected cpu:PERCENT or requests:COUNT"))?;
        let n: u32 = value
            .parse()
            .map_err(|_| format!("scaling {text:?}: {value:?} is not a whole number"))?;
        let scaling = match kind {
            "cpu" => Scaling::Cpu(n),
            "requests" => Scaling::RequestsPerTarget(n),
            _ => {
                return Err(format!(
                    "scaling {text:?}: {kind:?} is neither cpu nor requests"
                ));
            }
        };
        scaling.validate()?;
        Ok(scaling)
    }

    /// The target is within bounds.
    pub fn validate(self) -> Result<(), String> {
        match self {
            Scaling::Cpu(p) if !(1..=100).contains(&p) => Err(format!(
                "scaling: a CPU target is a percentage from 1 to 100, not {p}"
            )),
            Scaling::RequestsPerTarget(0) => {
                Err("scaling: a requests-per-target target is at least 1".to_owned())
            }
            _ => Ok(()),
        }
    }
}

impl std::fmt::Display for Scaling {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Scaling::Cpu(p) => write!(f, "cpu:{p}"),
            Scaling::RequestsPerTarget(n) => write!(f, "requests:{n}"),
        }
    }
}

/// One environment's settings; `None` takes the platform's default (`[infrastructure]`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EnvSettings {
    /// The group's minimum size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_size: Option<u32>,
    /// The group's maximum size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_size: Option<u32>,
    /// The group's desired size at creation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_size: Option<u32>,
    /// The app instances' EC2 instance type.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_type: Option<String>,
    /// The target-tracking policy; unset: the platform's (none by default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scaling: Option<Scaling>,
    /// How many deployed releases keep their images and artifacts for rollback.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_releases: Option<u32>,
    /// Set when the environment is decommissioned (`wfctl decommission`), cleared when it is
    /// provisioned again (`wfctl provision`): meanwhile the ingress answers its pushes as
    /// ignored.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub decommissioned: bool,
}

/// The sizing a group is created with, every field resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sizing {
    /// Minimum size.
    pub min: u32,
    /// Maximum size.
    pub max: u32,
    /// Desired size.
    pub desired: u32,
    /// Instance type.
    pub instance_type: String,
    /// Target tracking, if any.
    pub scaling: Option<Scaling>,
}

impl Sizing {
    /// Checks `min <= desired <= max <= MAX_INSTANCES` and `max >= 1`; the error names the
    /// fields.
    pub fn validate(&self) -> Result<(), String> {
        let Sizing {
            min, max, desired, ..
        } = *self;
        if max == 0 {
            return Err("max_size must be at least 1".to_owned());
        }
        if max > MAX_INSTANCES {
            return Err(format!(
                "max_size {max} is over the limit of {MAX_INSTANCES}"
            ));
        }
        if min > max {
            return Err(format!("min_size {min} is greater than max_size {max}"));
        }
        if desired < min || desired > max {
            return Err(format!(
                "desired_size {desired} is not within min_size {min} and max_size {max}"
            ));
        }
        if !valid_instance_type(&self.instance_type) {
            return Err(format!(
                "instance_type {:?} is not an EC2 instance type (family.size, like t3.micro)",
                self.instance_type
            ));
        }
        if let Some(s) = self.scaling {
            s.validate()?;
        }
        Ok(())
    }
}

/// `family.size`: lowercase letters, digits and `-`, one dot, at most 32 characters.
pub fn valid_instance_type(text: &str) -> bool {
    let ok = |part: &str| {
        !part.is_empty()
            && part
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    };
    text.len() <= 32 && text.split_once('.').is_some_and(|(f, s)| ok(f) && ok(s))
}

impl EnvSettings {
    /// The sizing these settings give over the platform's `defaults`; checked.
    pub fn sizing(&self, defaults: &Sizing) -> Result<Sizing, String> {
        let min = self.min_size.unwrap_or(defaults.min);
        let max = self.max_size.unwrap_or(defaults.max);
        // An unset desired size follows the bounds set here: within them, the default.
        let desired = self
            .desired_size
            .unwrap_or_else(|| defaults.desired.clamp(min.min(max), max.max(min)));
        let sizing = Sizing {
            min,
            max,
            desired,
            instance_type: self
                .instance_type
                .clone()
                .unwrap_or_else(|| defaults.instance_type.clone()),
            scaling: self.scaling.or(defaults.scaling),
        };
        sizing.validate()?;
        Ok(sizing)
    }

    /// How many releases are kept.
    pub fn keep_releases(&self) -> u32 {
        self.keep_releases.unwrap_or(DEFAULT_KEEP_RELEASES)
    }

    /// Whether nothing is set (the environment takes every default and is not decommissioned).
    pub fn is_default(&self) -> bool {
        *self == EnvSettings::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defaults() -> Sizing {
        Sizing {
            min: 1,
            max: 1,
            desired: 1,
            instance_type: "t3.micro".into(),
            scaling: None,
        }
    }

    #[test]
    fn unset_fields_take_the_defaults_and_desired_follows_the_bounds() {
        let s = EnvSettings {
            min_size: Some(2),
            max_size: Some(6),
            ..EnvSettings::default()
        };
        let sizing = s.sizing(&defaults()).expect("valid");
        assert_eq!((sizing.min, sizing.max, sizing.desired), (2, 6, 2));
        assert_eq!(sizing.instance_type, "t3.micro");
        assert_eq!(
            EnvSettings::default().sizing(&defaults()).expect("valid"),
            defaults()
        );
    }

    #[test]
    fn bad_sizes_are_refused_naming_the_field() {
        let cases = [
            (
                Some(3),
                Some(2),
                None,
                "min_size 3 is greater than max_size 2",
            ),
            (Some(1), Some(2), Some(5), "desired_size 5 is not within"),
            (None, Some(0), None, "max_size must be at least 1"),
            (None, Some(101), None, "max_size 101 is over the limit"),
        ];
        for (min, max, desired, error) in cases {
            let s = EnvSettings {
                min_size: min,
                max_size: max,
                desired_size: desired,
                ..EnvSettings::default()
            };
            let e = s.sizing(&defaults()).expect_err("refused");
            assert!(e.starts_with(error), "{e}");
        }
        let s = EnvSettings {
            instance_type: Some("t3 micro; rm".into()),
            ..EnvSettings::default()
        };
        assert!(
            s.sizing(&defaults())
                .expect_err("refused")
                .starts_with("instance_type")
        );
    }

    #[test]
    fn scaling_parses_and_prints() {
        assert_eq!(Scaling::parse("cpu:60"), Ok(Scaling::Cpu(60)));
        assert_eq!(
            Scaling::parse("requests:1000"),
            Ok(Scaling::RequestsPerTarget(1000))
        );
        assert_eq!(Scaling::Cpu(60).to_string(), "cpu:60");
        for bad in ["cpu:0", "cpu:101", "requests:0", "memory:5", "cpu", "cpu:x"] {
            assert!(Scaling::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn instance_types_are_family_dot_size() {
        for good in ["t3.micro", "m7g.2xlarge", "u-6tb1.56xlarge"] {
            assert!(valid_instance_type(good), "{good}");
        }
        for bad in [
            "",
            "t3",
            "T3.micro",
            "t3.micro.x",
            ".micro",
            "t3.",
            "t3 .micro",
        ] {
            assert!(!valid_instance_type(bad), "{bad}");
        }
    }
}
