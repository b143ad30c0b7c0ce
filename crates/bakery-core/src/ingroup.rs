//! The rollout's in-group options that match ASG Instance Refresh's preferences: skip matching,
//! what to do with scale-in-protected and Standby instances, checkpoints, and the batch ramp.
//! One struct, [`InGroup`], so a caller that builds a rollout request (`bakery release`) sets
//! them all in one field and gets the CLI's defaults from [`Default`].
//!
//! Defaults, and where they differ from Instance Refresh's `RefreshPreferences`:
//! - `skip_matching`: **on** (Instance Refresh's `SkipMatching` defaults to false). A rollout
//!   is asked for "this image everywhere"; an instance already on the target image and launch
//!   template version is that already, and replacing it costs capacity for nothing.
//!   `--no-skip-matching` replaces every instance, as Instance Refresh does by default.
//! - `protected_instances`: `Ignore`, as `ScaleInProtectedInstances`' default.
//! - `standby_instances`: `Ignore`, as `StandbyInstances`' default.
//! - `checkpoints`: none; `checkpoint_pause` 1 hour, as `CheckpointDelay`'s default (3600 s).
//! - `ramp`: `Fixed` (every batch after the canary is `--max-surge`).

use std::time::Duration;

/// What a rollout does with an old instance that is scale-in protected, or in Standby
/// (Instance Refresh's `ScaleInProtectedInstances` / `StandbyInstances`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum InstancePolicy {
    /// Leave it as it is; the rollout finishes without it (and says so).
    #[default]
    Ignore,
    /// Wait for it to become unprotected / leave Standby, for at most the health timeout, then
    /// fail naming it.
    Wait,
    /// Replace it like any other old instance.
    Replace,
}

impl InstancePolicy {
    pub const CHOICES: &'static str = "ignore, wait or replace";

    pub fn as_str(self) -> &'static str {
        match self {
            InstancePolicy::Ignore => "ignore",
            InstancePolicy::Wait => "wait",
            InstancePolicy::Replace => "replace",
        }
    }
}

impl std::str::FromStr for InstancePolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "ignore" => Ok(InstancePolicy::Ignore),
            "wait" => Ok(InstancePolicy::Wait),
            "replace" => Ok(InstancePolicy::Replace),
            other => Err(format!(
                "{other:?} is not a policy; use {}",
                InstancePolicy::CHOICES
            )),
        }
    }
}

impl std::fmt::Display for InstancePolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How batch sizes grow after the canary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Ramp {
    /// Every batch after the canary launches `--max-surge` instances.
    #[default]
    Fixed,
    /// Batches of 1, 2, 4, … instances, capped at `--max-surge`.
    Exponential,
}

impl Ramp {
    pub fn as_str(self) -> &'static str {
        match self {
            Ramp::Fixed => "fixed",
            Ramp::Exponential => "exponential",
        }
    }
}

impl std::str::FromStr for Ramp {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "fixed" => Ok(Ramp::Fixed),
            "exponential" => Ok(Ramp::Exponential),
            other => Err(format!("{other:?} is not a ramp; use fixed or exponential")),
        }
    }
}

impl std::fmt::Display for Ramp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Checkpoint percentages, validated as Instance Refresh's `CheckpointPercentages`: ascending,
/// each unique, each 1..=100, and the last 100 (so the rollout replaces every instance).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Checkpoints(Vec<u32>);

impl Checkpoints {
    pub fn new(percents: Vec<u32>) -> Result<Self, String> {
        if percents.is_empty() {
            return Ok(Checkpoints(percents));
        }
        for (i, &p) in percents.iter().enumerate() {
            if !(1..=100).contains(&p) {
                return Err(format!(
                    "checkpoint {p} is out of range; each checkpoint is a percentage from 1 to 100"
                ));
            }
            if i > 0 && p <= percents[i - 1] {
                return Err(format!(
                    "checkpoint {p} follows {}; list the checkpoints in ascending order, each once (e.g. 25,50,100)",
                    percents[i - 1]
                ));
            }
        }
        if percents.last() != Some(&100) {
            return Err(format!(
                "the last checkpoint is {}, not 100; end the list with 100 so the rollout replaces every instance (e.g. {},100)",
                percents.last().copied().unwrap_or_default(),
                percents
                    .iter()
                    .map(u32::to_string)
                    .collect::<Vec<_>>()
                    .join(",")
            ));
        }
        Ok(Checkpoints(percents))
    }

    pub fn percents(&self) -> &[u32] {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl std::str::FromStr for Checkpoints {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s.is_empty() {
            return Ok(Checkpoints::default());
        }
        let percents = s
            .split(',')
            .map(|p| {
                let p = p.trim();
                p.strip_suffix('%')
                    .unwrap_or(p)
                    .parse::<u32>()
                    .map_err(|_| {
                        format!("{p:?} is not a percentage; list whole percentages, e.g. 25,50,100")
                    })
            })
            .collect::<Result<Vec<u32>, String>>()?;
        Checkpoints::new(percents)
    }
}

/// Instance Refresh's default `CheckpointDelay`: one hour.
pub const DEFAULT_CHECKPOINT_PAUSE: Duration = Duration::from_secs(3600);

/// The rollout's in-group options (see the module's comment for the defaults).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InGroup {
    /// Leave alone instances already on the target image and launch-template version.
    pub skip_matching: bool,
    /// Old instances that are scale-in protected.
    pub protected_instances: InstancePolicy,
    /// Old instances in Standby.
    pub standby_instances: InstancePolicy,
    /// Pause when the percentage of instances replaced reaches each of these.
    pub checkpoints: Checkpoints,
    /// How long each checkpoint pauses.
    pub checkpoint_pause: Duration,
    /// How batch sizes grow after the canary.
    pub ramp: Ramp,
}

impl Default for InGroup {
    fn default() -> Self {
        InGroup {
            skip_matching: true,
            protected_instances: InstancePolicy::Ignore,
            standby_instances: InstancePolicy::Ignore,
            checkpoints: Checkpoints::default(),
            checkpoint_pause: DEFAULT_CHECKPOINT_PAUSE,
            ramp: Ramp::Fixed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_documented_ones() {
        let d = InGroup::default();
        assert!(d.skip_matching);
        assert_eq!(d.protected_instances, InstancePolicy::Ignore);
        assert_eq!(d.standby_instances, InstancePolicy::Ignore);
        assert!(d.checkpoints.is_empty());
        assert_eq!(d.checkpoint_pause, Duration::from_secs(3600));
        assert_eq!(d.ramp, Ramp::Fixed);
    }

    #[test]
    fn policies_and_ramps_parse() {
        assert_eq!("wait".parse::<InstancePolicy>(), Ok(InstancePolicy::Wait));
        assert_eq!(
            "Replace".parse::<InstancePolicy>(),
            Ok(InstancePolicy::Replace)
        );
        let e = "skip".parse::<InstancePolicy>().unwrap_err();
        assert!(
            e.contains("\"skip\"") && e.contains("ignore, wait or replace"),
            "{e}"
        );
        assert_eq!("exponential".parse::<Ramp>(), Ok(Ramp::Exponential));
        assert!("linear"
            .parse::<Ramp>()
            .unwrap_err()
            .contains("fixed or exponential"));
    }

    #[test]
    fn checkpoints_are_validated_case_by_case() {
        let ok = |s: &str| s.parse::<Checkpoints>().map(|c| c.percents().to_vec());
        assert_eq!(ok("25,50,100"), Ok(vec![25, 50, 100]));
        assert_eq!(ok("100"), Ok(vec![100]));
        assert_eq!(ok("10%, 100%"), Ok(vec![10, 100]));
        assert_eq!(ok(""), Ok(vec![]));
        let err = |s: &str| s.parse::<Checkpoints>().unwrap_err();
        assert!(
            err("50,25,100").contains("ascending"),
            "{}",
            err("50,25,100")
        );
        assert!(err("25,25,100").contains("ascending"));
        assert!(err("0,100").contains("from 1 to 100"));
        assert!(err("25,150").contains("from 1 to 100"));
        let e = err("25,50");
        assert!(e.contains("not 100") && e.contains("25,50,100"), "{e}");
        assert!(err("25,half,100").contains("\"half\" is not a percentage"));
    }
}
