//! A promotion's decisions, without I/O: what each region's record says, which step comes next,
//! the client token of a copy, how long a copy may go without progress and when to look again.
//! The loop in `promote/mod.rs` observes, calls these, and acts.
//!
//! A region's record is written ahead of every step, in two places: the local journal next to
//! the manifest and the source image's tag `bakery:promote-<region>` (so another machine can
//! resume). A record is one short line: `copying a=1 ami=- c=1a2b3c4d`.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use bakery_core::recipe::distribute::Distribute;

/// On the source image, one per region (the source region's too): that region's [`Record`].
pub const PROMOTE_TAG_PREFIX: &str = "bakery:promote-";
/// On every copy and its snapshots: the image it was copied from, and that image's region.
pub const SOURCE_IMAGE_TAG: &str = "bakery:source-image";
pub const SOURCE_REGION_TAG: &str = "bakery:source-region";

/// The tag key of `region`'s record.
pub fn tag_key(region: &str) -> String {
    format!("{PROMOTE_TAG_PREFIX}{region}")
}

/// Where a region stands. Written *before* the step it names starts (`Copying`, `Publishing`)
/// or after it ended (`Copied`, `Done`, `RolledBack`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Stage {
    /// CopyImage is (about to be) asked, with the attempt's client token.
    Copying,
    /// The copy is available.
    Copied,
    /// Shares, deprecation, protection and the SSM parameter are being applied.
    Publishing,
    Done,
    /// The promotion failed and this region's copy was removed.
    RolledBack,
}

impl Stage {
    fn word(self) -> &'static str {
        match self {
            Stage::Copying => "copying",
            Stage::Copied => "copied",
            Stage::Publishing => "publishing",
            Stage::Done => "done",
            Stage::RolledBack => "rolled-back",
        }
    }

    fn from_word(w: &str) -> Option<Stage> {
        [
            Stage::Copying,
            Stage::Copied,
            Stage::Publishing,
            Stage::Done,
            Stage::RolledBack,
        ]
        .into_iter()
        .find(|s| s.word() == w)
    }
}

/// One region's record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub stage: Stage,
    /// Which copy attempt (part of the client token); 0 for the source region (no copy).
    pub attempt: u32,
    /// The region's image, once known.
    pub ami: Option<String>,
    /// Fingerprint of what the copy was made with ([`copy_hash`]).
    pub copy: String,
    /// Fingerprint of what was (or is being) published ([`publish_hash`]).
    pub publish: Option<String>,
}

impl Record {
    /// The tag value: at most ~90 characters, far below the 256 a tag value may have.
    pub fn encode(&self) -> String {
        let mut s = format!(
            "{} a={} ami={} c={}",
            self.stage.word(),
            self.attempt,
            self.ami.as_deref().unwrap_or("-"),
            self.copy
        );
        if let Some(p) = &self.publish {
            s.push_str(&format!(" p={p}"));
        }
        s
    }

    pub fn decode(s: &str) -> Option<Record> {
        let mut words = s.split_whitespace();
        let stage = Stage::from_word(words.next()?)?;
        let mut r = Record {
            stage,
            attempt: 0,
            ami: None,
            copy: String::new(),
            publish: None,
        };
        for w in words {
            let (k, v) = w.split_once('=')?;
            match k {
                "a" => r.attempt = v.parse().ok()?,
                "ami" => r.ami = (v != "-").then(|| v.to_string()),
                "c" => r.copy = v.to_string(),
                "p" => r.publish = Some(v.to_string()),
                _ => {}
            }
        }
        Some(r)
    }

    /// How far it got: a later attempt, else a later stage.
    fn rank(&self) -> (u32, Stage) {
        (self.attempt, self.stage)
    }
}

/// The record to resume from, given the local journal's and the source image's tag: the one
/// that got further (both are written, the journal first; a machine that died between the two
/// writes left the journal ahead, another machine has only the tag).
pub fn merge(local: Option<Record>, tag: Option<Record>) -> Option<Record> {
    match (local, tag) {
        (Some(a), Some(b)) => Some(if b.rank() > a.rank() { b } else { a }),
        (a, b) => a.or(b),
    }
}

/// What to do next in a region that gets a copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Ask CopyImage with this attempt's token: a new copy, or (same attempt) the one already
    /// asked for, which the token makes EC2 answer with instead of copying again.
    Copy { attempt: u32 },
    /// The copy is known: wait until it is available.
    Wait { attempt: u32, ami: String },
    /// The copy is available: apply the shares, deprecation, protection and parameter.
    Publish { attempt: u32, ami: String },
    /// Done with these very settings: nothing to do.
    Nothing { ami: String },
    /// The region's copy was made with other settings: the user must decide.
    Refuse(String),
}

/// The next step for `region`, from its record and the fingerprints of the settings asked now.
pub fn next(region: &str, record: Option<&Record>, copy: &str, publish: &str) -> Next {
    let Some(r) = record else {
        return Next::Copy { attempt: 1 };
    };
    let copied_otherwise = || {
        Next::Refuse(format!(
            "{region} already has {} from this build, copied with other settings (encryption, key or tags); \
             promote with the settings it was copied with, or remove it (`bakery prune`) to copy again",
            r.ami.as_deref().unwrap_or("a copy")
        ))
    };
    match (r.stage, &r.ami) {
        (Stage::RolledBack, _) => Next::Copy {
            attempt: r.attempt + 1,
        },
        _ if r.copy != copy => copied_otherwise(),
        (Stage::Copying, None) => Next::Copy { attempt: r.attempt },
        (Stage::Copying, Some(ami)) => Next::Wait {
            attempt: r.attempt,
            ami: ami.clone(),
        },
        (Stage::Done, Some(ami)) if r.publish.as_deref() == Some(publish) => {
            Next::Nothing { ami: ami.clone() }
        }
        (_, Some(ami)) => Next::Publish {
            attempt: r.attempt,
            ami: ami.clone(),
        },
        // A record past copying always names its image; one that does not is read as not begun.
        (_, None) => Next::Copy { attempt: r.attempt },
    }
}

/// The source region's next step: its image exists already.
pub fn next_source(record: Option<&Record>, ami: &str, publish: &str) -> Next {
    match record {
        Some(r) if r.stage == Stage::Done && r.publish.as_deref() == Some(publish) => {
            Next::Nothing { ami: ami.into() }
        }
        _ => Next::Publish {
            attempt: 0,
            ami: ami.into(),
        },
    }
}

/// CopyImage's client token for one attempt in one region (at most 64 ASCII characters): a
/// rerun of the same attempt is answered with the same copy, never a second one.
pub fn client_token(build_id: &str, region: &str, attempt: u32) -> String {
    let t = format!("bakery-{build_id}-{region}-{attempt}");
    if t.len() <= 64 {
        t
    } else {
        format!("bakery-{}", &hex(t.as_bytes())[..48])
    }
}

fn hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Fingerprint of what a copy to `region` is made with: encryption, its key, the tags.
pub fn copy_hash(d: &Distribute, region: &str) -> String {
    let v = serde_json::json!([d.encrypted, d.kms_key_ids.get(region), d.tags]);
    hex(v.to_string().as_bytes())[..8].to_string()
}

/// Fingerprint of what is published in every region: shares, parameter, deprecation,
/// protection.
pub fn publish_hash(d: &Distribute) -> String {
    let v = serde_json::json!([
        d.accounts,
        d.organization_arns,
        d.ou_arns,
        d.ssm_parameter,
        d.deprecate_at,
        d.deregistration_protection
    ]);
    hex(v.to_string().as_bytes())[..8].to_string()
}

/// The tags of a copy (image and snapshots), at creation: the settings' tags and bakery's.
pub fn copy_tags(
    d: &Distribute,
    build_id: &str,
    source_ami: &str,
    source_region: &str,
) -> BTreeMap<String, String> {
    let mut t = d.tags.clone();
    t.insert(
        bakery_core::marks::BUILD_ID_TAG.to_string(),
        build_id.to_string(),
    );
    t.insert(SOURCE_IMAGE_TAG.to_string(), source_ami.to_string());
    t.insert(SOURCE_REGION_TAG.to_string(), source_region.to_string());
    t
}

/// Why a copy (an image tagged [`SOURCE_IMAGE_TAG`]) in `region` is the leftover of a failed
/// promotion, or `None` when a promotion records it as its copy (done, or paused and
/// resumable). `source_tags`: the source image's tags, `None` when it no longer exists.
pub fn leftover_copy(
    copy_id: &str,
    copy_state: &str,
    region: &str,
    source_tags: Option<&BTreeMap<String, String>>,
) -> Option<String> {
    if matches!(copy_state, "failed" | "error" | "invalid") {
        return Some(format!("a copy that ended {copy_state}"));
    }
    let Some(tags) = source_tags else {
        return Some("its source image no longer exists".into());
    };
    match tags.get(&tag_key(region)).and_then(|t| Record::decode(t)) {
        None => Some("no promotion records it on its source image".into()),
        Some(r) if r.stage == Stage::RolledBack => Some("its promotion was rolled back".into()),
        Some(Record { ami: Some(a), .. }) if a != copy_id => Some(format!(
            "an earlier attempt: the promotion's copy in {region} is {a}"
        )),
        Some(_) => None,
    }
}

// ---------------------------------------------------------------------------------------------
// Waiting for a copy.

/// How long a copy may show no progress (neither its percent nor its state changing) before
/// the wait gives up: 15 minutes plus 30 seconds per GiB of the image, at most 6 hours. The
/// wait has no fixed length: a large copy that keeps moving is waited for, however long.
pub fn stall_limit(size_gib: u64) -> Duration {
    (Duration::from_secs(15 * 60) + Duration::from_secs(30) * size_gib.min(100_000) as u32)
        .min(Duration::from_secs(6 * 3600))
}

/// Tracks a copy's progress to tell a slow copy from a stuck one, and which changes are worth
/// an event.
#[derive(Debug, Clone)]
pub struct Progress {
    seen: Option<(String, Option<u8>)>,
    since: Duration,
    limit: Duration,
    /// The last state and percent reported, and when.
    reported: Option<(String, Option<u8>, Duration)>,
}

/// A progress event at most every this many percent (a state change is always reported) ...
const REPORT_PERCENT: u8 = 10;
/// ... or this long after the last one, if anything changed.
const REPORT_EVERY: Duration = Duration::from_secs(10);

impl Progress {
    pub fn new(limit: Duration) -> Self {
        Self {
            seen: None,
            since: Duration::ZERO,
            limit,
            reported: None,
        }
    }

    /// Records what a probe saw at `elapsed`: true when it is worth a progress event (the state
    /// changed, the percent moved by 10 points, or 10 s passed since the last event and
    /// something changed).
    pub fn observe(&mut self, state: &str, percent: Option<u8>, elapsed: Duration) -> bool {
        let now = Some((state.to_string(), percent));
        if self.seen == now {
            return false;
        }
        self.seen = now;
        self.since = elapsed;
        let report = match &self.reported {
            None => true,
            Some((s, p, at)) => {
                s != state
                    || p.is_none() != percent.is_none()
                    || percent.unwrap_or(0).abs_diff(p.unwrap_or(0)) >= REPORT_PERCENT
                    || elapsed.saturating_sub(*at) >= REPORT_EVERY
            }
        };
        if report {
            self.reported = Some((state.to_string(), percent, elapsed));
        }
        report
    }

    /// True when nothing changed for longer than the limit.
    pub fn stalled(&self, elapsed: Duration) -> bool {
        elapsed.saturating_sub(self.since) > self.limit
    }
}

/// The pause before the next look at a copy, `elapsed` after it started, at `percent`: 3% of
/// the time waited (80 ms to 15 s, as every API wait), but no later than the copy's expected
/// end (its pace so far, from the percent), so the wait overshoots by little however long it is.
pub fn next_poll(elapsed: Duration, percent: Option<u8>) -> Duration {
    let base = crate::wait::Poll::API.next_interval(elapsed);
    match percent {
        Some(p @ 1..=99) => {
            let left = elapsed.mul_f64(f64::from(100 - p) / f64::from(p));
            base.min(left.max(Duration::from_millis(50)))
        }
        _ => base,
    }
}

// ---------------------------------------------------------------------------------------------
// The local journal.

/// The journal next to the manifest (`<manifest>.journal.json`): the settings and every
/// region's record, plus what only this machine needs (a parameter's value before it was
/// written, for a rollback).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Journal {
    pub build_id: String,
    pub source_region: String,
    pub source_ami: String,
    pub settings: Distribute,
    pub regions: BTreeMap<String, RegionEntry>,
    /// How the last run ended: `running`, `done`, `paused` or `rolled back: ERROR`.
    pub outcome: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RegionEntry {
    pub record: Record,
    #[serde(default)]
    pub snapshot_ids: Vec<String>,
    /// The SSM parameter's value before this promotion wrote it (`Some(None)`: there was none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameter_before: Option<Option<String>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(stage: Stage, attempt: u32, ami: Option<&str>) -> Record {
        Record {
            stage,
            attempt,
            ami: ami.map(str::to_string),
            copy: "c1".into(),
            publish: None,
        }
    }

    #[test]
    fn a_record_fits_a_tag_and_reads_back() {
        let r = Record {
            publish: Some("89abcdef".into()),
            ..rec(Stage::Publishing, 12, Some("ami-0123456789abcdef0"))
        };
        let s = r.encode();
        assert_eq!(
            s,
            "publishing a=12 ami=ami-0123456789abcdef0 c=c1 p=89abcdef"
        );
        assert!(s.len() < 256);
        assert_eq!(Record::decode(&s), Some(r));
        let r = rec(Stage::Copying, 1, None);
        assert_eq!(Record::decode(&r.encode()), Some(r));
        assert_eq!(Record::decode("flying a=1"), None);
        assert_eq!(Record::decode(""), None);
    }

    #[test]
    fn the_record_that_got_further_wins() {
        let journal = rec(Stage::Copied, 1, Some("ami-1"));
        let tag = rec(Stage::Copying, 1, None);
        assert_eq!(
            merge(Some(journal.clone()), Some(tag.clone())),
            Some(journal.clone())
        );
        assert_eq!(
            merge(Some(tag.clone()), Some(journal.clone())),
            Some(journal.clone())
        );
        assert_eq!(merge(None, Some(tag.clone())), Some(tag), "another machine");
        let retried = rec(Stage::Copying, 2, None);
        let rolled = rec(Stage::RolledBack, 1, Some("ami-1"));
        assert_eq!(
            merge(Some(rolled), Some(retried.clone())),
            Some(retried),
            "a later attempt"
        );
    }

    #[test]
    fn each_record_leads_to_its_next_step() {
        let n = |r: Option<&Record>| next("eu-west-1", r, "c1", "p1");
        assert_eq!(n(None), Next::Copy { attempt: 1 });
        assert_eq!(
            n(Some(&rec(Stage::Copying, 1, None))),
            Next::Copy { attempt: 1 },
            "same token: EC2 answers with the copy already made, if any"
        );
        assert_eq!(
            n(Some(&rec(Stage::Copying, 1, Some("ami-1")))),
            Next::Wait {
                attempt: 1,
                ami: "ami-1".into()
            }
        );
        for stage in [Stage::Copied, Stage::Publishing, Stage::Done] {
            assert_eq!(
                n(Some(&rec(stage, 1, Some("ami-1")))),
                Next::Publish {
                    attempt: 1,
                    ami: "ami-1".into()
                },
                "{stage:?}"
            );
        }
        let done = Record {
            publish: Some("p1".into()),
            ..rec(Stage::Done, 1, Some("ami-1"))
        };
        assert_eq!(
            n(Some(&done)),
            Next::Nothing {
                ami: "ami-1".into()
            }
        );
        assert_eq!(
            n(Some(&rec(Stage::RolledBack, 1, Some("ami-1")))),
            Next::Copy { attempt: 2 },
            "a rolled-back region copies again with a new token"
        );
        let other = Record {
            copy: "c2".into(),
            ..done
        };
        assert!(matches!(n(Some(&other)), Next::Refuse(m) if m.contains("other settings")));
    }

    #[test]
    fn the_source_region_only_publishes() {
        assert_eq!(
            next_source(None, "ami-s", "p1"),
            Next::Publish {
                attempt: 0,
                ami: "ami-s".into()
            }
        );
        let done = Record {
            publish: Some("p1".into()),
            ..rec(Stage::Done, 0, Some("ami-s"))
        };
        assert_eq!(
            next_source(Some(&done), "ami-s", "p1"),
            Next::Nothing {
                ami: "ami-s".into()
            }
        );
        assert!(matches!(
            next_source(Some(&done), "ami-s", "p2"),
            Next::Publish { .. }
        ));
    }

    #[test]
    fn tokens_are_stable_per_attempt_and_fit_ec2s_limit() {
        let b = "20261127105033-89ddd894";
        assert_eq!(
            client_token(b, "eu-west-1", 1),
            client_token(b, "eu-west-1", 1)
        );
        assert_ne!(
            client_token(b, "eu-west-1", 1),
            client_token(b, "eu-west-1", 2)
        );
        assert_ne!(
            client_token(b, "eu-west-1", 1),
            client_token(b, "eu-west-2", 1)
        );
        assert!(client_token(b, "ap-southeast-7", 4_000_000_000).len() <= 64);
        assert!(client_token(&"x".repeat(80), "eu-west-1", 1).len() <= 64);
    }

    #[test]
    fn fingerprints_follow_only_their_settings() {
        let mut d = Distribute {
            regions: vec!["eu-west-1".into()],
            ..Distribute::default()
        };
        let (c, p) = (copy_hash(&d, "eu-west-1"), publish_hash(&d));
        d.accounts.push("111122223333".into());
        assert_eq!(
            copy_hash(&d, "eu-west-1"),
            c,
            "a share does not change the copy"
        );
        assert_ne!(publish_hash(&d), p);
        d.encrypted = true;
        assert_ne!(copy_hash(&d, "eu-west-1"), c);
    }

    #[test]
    fn a_copy_is_a_leftover_unless_its_promotion_records_it() {
        let tags = |r: &Record| BTreeMap::from([(tag_key("eu-west-1"), r.encode())]);
        let mine = rec(Stage::Done, 1, Some("ami-1"));
        assert_eq!(
            leftover_copy("ami-1", "available", "eu-west-1", Some(&tags(&mine))),
            None
        );
        let paused = rec(Stage::Copying, 1, None);
        assert_eq!(
            leftover_copy("ami-1", "pending", "eu-west-1", Some(&tags(&paused))),
            None,
            "a paused promotion's copy is resumable"
        );
        for (id, state, source, why) in [
            ("ami-1", "failed", Some(tags(&mine)), "ended failed"),
            ("ami-1", "available", None, "no longer exists"),
            (
                "ami-1",
                "available",
                Some(BTreeMap::new()),
                "no promotion records it",
            ),
            (
                "ami-1",
                "available",
                Some(tags(&rec(Stage::RolledBack, 1, Some("ami-1")))),
                "rolled back",
            ),
            (
                "ami-0",
                "available",
                Some(tags(&mine)),
                "an earlier attempt",
            ),
        ] {
            let got = leftover_copy(id, state, "eu-west-1", source.as_ref()).unwrap();
            assert!(got.contains(why), "{got}");
        }
    }

    #[test]
    fn a_copy_is_stalled_only_after_the_limit_without_any_change() {
        assert_eq!(stall_limit(0), Duration::from_secs(900));
        assert_eq!(stall_limit(8), Duration::from_secs(900 + 240));
        assert_eq!(stall_limit(10_000), Duration::from_secs(6 * 3600));
        let s = Duration::from_secs;
        let mut p = Progress::new(s(60));
        assert!(p.observe("pending", Some(0), s(0)));
        assert!(!p.observe("pending", Some(0), s(30)));
        assert!(!p.stalled(s(59)));
        assert!(
            p.observe("pending", Some(1), s(59)),
            "it moved (and 10 s passed)"
        );
        assert!(!p.stalled(s(110)));
        assert!(p.stalled(s(120)));
    }

    #[test]
    fn progress_is_reported_every_ten_percent_or_ten_seconds_and_at_each_state() {
        let ms = Duration::from_millis;
        let mut p = Progress::new(Duration::from_secs(600));
        assert!(p.observe("pending", None, ms(0)));
        assert!(p.observe("pending", Some(3), ms(100)), "the first percent");
        assert!(
            !p.observe("pending", Some(7), ms(200)),
            "moving, but by less than 10"
        );
        assert!(!p.stalled(ms(200)));
        assert!(p.observe("pending", Some(13), ms(300)));
        assert!(p.observe("pending", Some(14), ms(10_400)), "10 s later");
        assert!(p.observe("available", Some(15), ms(10_500)), "a new state");
    }

    #[test]
    fn polls_aim_at_the_expected_end_of_a_copy() {
        let s = Duration::from_secs;
        // Early on: 80 ms, as every API wait.
        assert_eq!(
            next_poll(Duration::ZERO, Some(0)),
            Duration::from_millis(80)
        );
        // 60 s into a copy at 50%: 3% of 60 s = 1.8 s (the end is 60 s away).
        assert_eq!(next_poll(s(60), Some(50)), Duration::from_millis(1800));
        // 2.9 s into a 3 s copy (96%): the end is ~0.12 s away at this pace; 3% (87 ms) comes first.
        assert_eq!(
            next_poll(Duration::from_millis(2900), Some(96)),
            Duration::from_millis(87)
        );
        // An hour into a copy at 99%: 15 s would overshoot; the end is ~36 s away at this pace,
        // so 15 s; at 99% after 10 minutes the end is ~6 s away: 6 s, not 15.
        assert_eq!(next_poll(s(3600), Some(99)), s(15));
        let p = next_poll(s(600), Some(99));
        assert!(p > s(6) && p < Duration::from_millis(6100), "{p:?}");
        // Without a percent: the plain pace.
        assert_eq!(next_poll(s(600), None), s(15));
    }
}
