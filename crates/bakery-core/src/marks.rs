//! The vocabulary of bakery's marks on AWS: every `bakery:*` tag and its encoding. Tags are
//! records, not locks: they say what bakery made and what it is doing, so that `gc`, `status`,
//! a resumed run and another machine can read them.
//!
//! A bake's resources carry [`BUILD_ID_TAG`]; its temporary ones also [`TEMPORARY_TAG`] and
//! [`EXPIRES_TAG`] (when `gc` may take them if the bake's process is gone); its image
//! [`COMPLETE_TAG`] once the manifest is written.
//!
//! A rollout's durable state, kept on the Auto Scaling group's own tags so that any machine can
//! resume it after the process that began it died: what is being rolled out and from where
//! (`bakery:rollout`), how far it got (`bakery:rollout-progress`), and who drives it now
//! (`bakery:rollout-lock`, with an expiry renewed while the driver lives). Tag values are
//! limited to 256 characters, hence the short keys.

use serde::{Deserialize, Serialize};

use crate::plan::Progress;

/// On every resource a bake creates: the build it belongs to.
pub const BUILD_ID_TAG: &str = "bakery:build-id";
/// On the bake's temporary instance, key pair and security group.
pub const TEMPORARY_TAG: &str = "bakery:temporary";
/// When a temporary resource may be collected by `gc` (RFC 3339), if its bake is gone.
pub const EXPIRES_TAG: &str = "bakery:expires-at";
/// On every resource a bake creates while it runs: the bake's process, `host:pid`.
pub const OWNER_TAG: &str = "bakery:owner";
/// On a bake's temporary instance: the name its image will have, so that two bakes of one name
/// find each other before either provisions (see [`yield_name_to`]).
pub const IMAGE_NAME_TAG: &str = "bakery:image-name";
/// On an image once its bake finished and its manifest was written.
pub const COMPLETE_TAG: &str = "bakery:complete";
/// On an image: the AMI it was baked from, and the recipe's hash.
pub const SOURCE_AMI_TAG: &str = "bakery:source-ami";
pub const RECIPE_SHA_TAG: &str = "bakery:recipe-sha256";
/// On an image's snapshots: the image they belong to.
pub const IMAGE_TAG: &str = "bakery:image";
/// On a group a rollout stopped: why.
pub const REASON_TAG: &str = "bakery:rollout-reason";
/// On a group whose `HealthCheck` process a daemon suspended: the daemon (a [`Lock`]).
pub const TAKEOVER_TAG: &str = "bakery:daemon";

pub const STATE_TAG: &str = "bakery:rollout";
pub const PROGRESS_TAG: &str = "bakery:rollout-progress";
pub const LOCK_TAG: &str = "bakery:rollout-lock";

/// What the rollout is and what it must restore.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutState {
    pub id: String,
    /// The AMI being rolled out.
    pub ami: String,
    /// The launch template.
    pub lt: String,
    /// The version the group used before, and the version made for the rollout.
    pub from: String,
    pub to: String,
    /// Desired, min and max before the rollout.
    pub d: u32,
    pub mn: u32,
    pub mx: u32,
    /// True when the rollout suspended `AZRebalance` (and so must resume it).
    #[serde(default)]
    pub az: bool,
    /// When it began (seconds since the epoch).
    pub t: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    #[serde(rename = "roll")]
    Rolling,
    #[serde(rename = "back")]
    RollingBack,
}

/// Where it stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProgressTag {
    pub ph: Phase,
    pub b: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bt: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ch: Option<u64>,
    #[serde(default)]
    pub cd: bool,
}

impl ProgressTag {
    pub fn progress(&self) -> Progress {
        Progress {
            batch: self.b,
            batch_started: self.bt,
            canary_healthy_at: self.ch,
            canary_done: self.cd,
        }
    }

    pub fn new(phase: Phase, p: &Progress) -> Self {
        Self {
            ph: phase,
            b: p.batch,
            bt: p.batch_started,
            ch: p.canary_healthy_at,
            cd: p.canary_done,
        }
    }
}

/// Who holds the group, until when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lock {
    /// `host:pid`, plus a random token that tells two processes on one host apart.
    pub owner: String,
    pub token: String,
    pub since: u64,
    pub expires: u64,
}

impl Lock {
    pub fn encode(&self) -> String {
        format!(
            "owner={};token={};since={};expires={}",
            self.owner, self.token, self.since, self.expires
        )
    }

    pub fn decode(s: &str) -> Option<Lock> {
        let mut owner = None;
        let mut token = None;
        let mut since = None;
        let mut expires = None;
        for part in s.split(';') {
            match part.split_once('=')? {
                ("owner", v) => owner = Some(v.to_string()),
                ("token", v) => token = Some(v.to_string()),
                ("since", v) => since = v.parse().ok(),
                ("expires", v) => expires = v.parse().ok(),
                _ => {}
            }
        }
        Some(Lock {
            owner: owner?,
            token: token.unwrap_or_default(),
            since: since?,
            expires: expires?,
        })
    }

    /// Whether `other` may take this lock at `now`: it expired, or its owner was a process on
    /// this very host that no longer exists (a SIGKILLed run).
    pub fn is_stale(&self, now: u64, this_host: &str, pid_alive: impl Fn(u32) -> bool) -> bool {
        if now >= self.expires {
            return true;
        }
        match self.owner.rsplit_once(':') {
            Some((host, pid)) if host == this_host => {
                pid.parse::<u32>().map(|p| !pid_alive(p)).unwrap_or(false)
            }
            _ => false,
        }
    }
}

/// Whether a bake that made a resource may still be running, from the resource's tags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BakeLiveness {
    /// Its bake may still be running (the reason says why gc leaves it alone).
    Running(String),
    /// Its bake is over: the resource is a leftover.
    Over,
}

/// A bake's resource belongs to a running bake while its [`EXPIRES_TAG`] (seconds since the
/// epoch, `expires`) lies in the future, unless its [`OWNER_TAG`] names a process on this host
/// that no longer exists (a SIGKILLed bake). A resource without either mark (made by an older
/// bakery) is judged by its age alone, by the caller.
pub fn bake_liveness(
    owner: Option<&str>,
    expires: Option<u64>,
    now: u64,
    this_host: &str,
    pid_alive: impl Fn(u32) -> bool,
) -> BakeLiveness {
    if let Some((host, pid)) = owner.and_then(|o| o.rsplit_once(':')) {
        if host == this_host {
            return match pid.parse::<u32>() {
                Ok(p) if pid_alive(p) => BakeLiveness::Running(format!(
                    "its bake (pid {p} on this host) is still running"
                )),
                _ => BakeLiveness::Over,
            };
        }
    }
    match expires {
        Some(e) if e > now => BakeLiveness::Running(format!(
            "its bake ({}) may still be running until its expiry, {}s from now",
            owner.unwrap_or("another process"),
            e - now
        )),
        _ => BakeLiveness::Over,
    }
}

/// Two bakes that would make images of one name (AMI names are unique per account and region):
/// each launches its instance tagged with the name, then looks for the others. The bake whose
/// instance launched first keeps the name (a tie within the same second: the smaller build id);
/// every other one yields, before provisioning, with the build it yields to. Each contender is
/// `(launch time in seconds, build id)`.
pub fn yield_name_to<'a>(
    mine: (i64, &str),
    others: impl IntoIterator<Item = (i64, &'a str)>,
) -> Option<&'a str> {
    others
        .into_iter()
        .filter(|o| o.1 != mine.1)
        .min()
        .filter(|o| (o.0, o.1) < mine)
        .map(|o| o.1)
}

/// How far past the end of its launch second a bake waits before it looks for contenders: the
/// margin for the client's clock against EC2's and for DescribeInstances catching up with a
/// RunInstances that just returned.
pub const NAME_CHECK_MARGIN_MS: i64 = 1000;

/// How long (ms) a bake whose instance launched at `launched` (seconds since the epoch: EC2 gives
/// launch times to the second) waits at `now_ms` (ms since the epoch) before it looks for other
/// bakes of its image name. Looking only once the launch second is over is what makes
/// [`yield_name_to`] sound: every contender ordered before this bake (launched earlier, or in the
/// same second) then already exists, and two bakes that tie both look after both launched, so
/// they agree on the one that keeps the name. Looking at once, the first of two bakes launched in
/// one second could see nobody and go on while the second, ordered first by its smaller build id,
/// went on too; the second then failed at CreateImage (`InvalidAMIName.Duplicate`, exit 1) after
/// provisioning. An unknown launch time (0) does not wait.
pub fn name_check_wait_ms(launched: i64, now_ms: i64) -> u64 {
    if launched <= 0 {
        return 0;
    }
    let at = launched
        .saturating_add(1)
        .saturating_mul(1000)
        .saturating_add(NAME_CHECK_MARGIN_MS);
    u64::try_from(at.saturating_sub(now_ms)).unwrap_or(0)
}

pub fn encode<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

pub fn decode<T: for<'de> Deserialize<'de>>(s: &str) -> Option<T> {
    serde_json::from_str(s).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_fits_in_a_tag_value() {
        let s = RolloutState {
            id: "r-20261127105033-89ddd894".into(),
            ami: "ami-0ae7d836f38cd2b75".into(),
            lt: "lt-0123456789abcdef0".into(),
            from: "12345".into(),
            to: "12346".into(),
            d: 1000,
            mn: 1000,
            mx: 2000,
            az: true,
            t: 1_764_240_000,
        };
        let text = encode(&s);
        assert!(text.len() <= 256, "{} chars: {text}", text.len());
        assert_eq!(decode::<RolloutState>(&text), Some(s));
        let p = ProgressTag {
            ph: Phase::RollingBack,
            b: 100,
            bt: Some(1_764_240_000),
            ch: Some(1_764_240_000),
            cd: true,
        };
        assert_eq!(decode::<ProgressTag>(&encode(&p)), Some(p));
    }

    #[test]
    fn a_bake_is_running_until_its_expiry_unless_its_local_process_is_gone() {
        let live = |owner, expires, alive: bool| {
            bake_liveness(owner, expires, 1000, "build-7", move |_| alive)
        };
        assert!(matches!(
            live(Some("build-7:42"), Some(2000), true),
            BakeLiveness::Running(_)
        ));
        assert_eq!(
            live(Some("build-7:42"), Some(2000), false),
            BakeLiveness::Over
        );
        // A local process that still lives keeps even an expired bake (a bake longer than
        // its expiry is still a bake).
        assert!(matches!(
            live(Some("build-7:42"), Some(500), true),
            BakeLiveness::Running(_)
        ));
        // Another host's bake is trusted until it expires.
        assert!(matches!(
            live(Some("ci-3:42"), Some(2000), false),
            BakeLiveness::Running(_)
        ));
        assert_eq!(live(Some("ci-3:42"), Some(1000), true), BakeLiveness::Over);
        assert_eq!(live(None, None, true), BakeLiveness::Over);
        assert!(matches!(
            live(None, Some(1001), false),
            BakeLiveness::Running(_)
        ));
    }

    #[test]
    fn the_earliest_bake_keeps_an_image_name() {
        let all = [(100, "b-2-aaaa"), (101, "b-1-zzzz"), (100, "b-2-bbbb")];
        // Launched first wins, whatever the ids; a tie in the second goes to the smaller id.
        assert_eq!(yield_name_to((101, "b-1-zzzz"), all), Some("b-2-aaaa"));
        assert_eq!(yield_name_to((100, "b-2-bbbb"), all), Some("b-2-aaaa"));
        assert_eq!(yield_name_to((100, "b-2-aaaa"), all), None);
        assert_eq!(
            yield_name_to((1, "b-1"), [(1, "b-1")]),
            None,
            "not to itself"
        );
        assert_eq!(yield_name_to((1, "b-1"), []), None);
    }

    #[test]
    fn a_bake_looks_for_contenders_only_once_its_launch_second_is_over() {
        // Launched at second 100: it looks at 101 s plus the margin, whenever it asks.
        assert_eq!(name_check_wait_ms(100, 100_000), 1000 + 1000);
        assert_eq!(name_check_wait_ms(100, 100_999), 1 + 1000);
        assert_eq!(name_check_wait_ms(100, 101_500), 500);
        assert_eq!(name_check_wait_ms(100, 102_000), 0);
        assert_eq!(name_check_wait_ms(100, 160_000), 0, "long past: at once");
        assert_eq!(name_check_wait_ms(0, 5_000), 0, "launch time unknown");
        assert_eq!(
            name_check_wait_ms(i64::MAX, 0),
            u64::try_from(i64::MAX).unwrap()
        );
    }

    #[test]
    fn a_lock_is_stale_when_expired_or_its_local_owner_is_dead() {
        let l = Lock {
            owner: "build-7:4242".into(),
            token: "abc".into(),
            since: 100,
            expires: 160,
        };
        assert_eq!(Lock::decode(&l.encode()), Some(l.clone()));
        assert!(!l.is_stale(120, "build-7", |_| true));
        assert!(
            l.is_stale(120, "build-7", |_| false),
            "a dead local owner frees the lock"
        );
        assert!(
            !l.is_stale(120, "other-host", |_| false),
            "a remote owner is trusted until expiry"
        );
        assert!(l.is_stale(160, "other-host", |_| true));
    }
}
