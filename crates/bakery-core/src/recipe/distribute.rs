//! The recipe's `[distribute]` table: where a baked image goes after the bake, and who may use
//! it. The regions it is copied to (in parallel), their encryption keys, the accounts,
//! organizations and organizational units it is shared with (launch permission on the image,
//! `createVolumePermission` on its snapshots), the tags every copy carries from its creation, the
//! SSM parameter that publishes each region's id, its deprecation and deregistration protection.
//!
//! Each field has a pure check ([`check_region`], [`check_account`], ...) used twice: by the
//! recipe's loader, which locates a mistake in the file, and by `bakery promote`'s flags
//! ([`Flags::validate`]), which names the flag. Both say what to write instead.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use toml::Spanned;

use super::{Loader, S};

/// Every AWS Region bakery knows by name: commercial, GovCloud and China. A region outside this
/// list is a typo far more often than a Region newer than this release; the error says which
/// known name is closest.
pub const AWS_REGIONS: &[&str] = &[
    "us-east-1",
    "us-east-2",
    "us-west-1",
    "us-west-2",
    "af-south-1",
    "ap-east-1",
    "ap-east-2",
    "ap-south-1",
    "ap-south-2",
    "ap-southeast-1",
    "ap-southeast-2",
    "ap-southeast-3",
    "ap-southeast-4",
    "ap-southeast-5",
    "ap-southeast-6",
    "ap-southeast-7",
    "ap-northeast-1",
    "ap-northeast-2",
    "ap-northeast-3",
    "ca-central-1",
    "ca-west-1",
    "eu-central-1",
    "eu-central-2",
    "eu-west-1",
    "eu-west-2",
    "eu-west-3",
    "eu-south-1",
    "eu-south-2",
    "eu-north-1",
    "il-central-1",
    "me-south-1",
    "me-central-1",
    "mx-central-1",
    "sa-east-1",
    "us-gov-east-1",
    "us-gov-west-1",
    "cn-north-1",
    "cn-northwest-1",
];

/// AWS allows 50 tags on a resource; bakery adds its own to every copy.
pub const MAX_USER_TAGS: usize = 50 - RESERVED_TAGS;
/// `bakery:build-id` and `bakery:source-image` on every copy and its snapshots.
const RESERVED_TAGS: usize = 2;
/// EC2 refuses a deprecation time more than 10 years ahead.
pub const MAX_DEPRECATION: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// The validated `[distribute]` table (or `bakery promote`'s flags).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Distribute {
    /// Regions to copy the image to, in the recipe's order, without repeats. The region the
    /// image is baked in may be listed: it gets no copy, the rest of the settings apply to it.
    pub regions: Vec<String>,
    /// Encrypt every copy's snapshots (with the region's key from `kms_key_ids`, else the
    /// region's default EBS key).
    pub encrypted: bool,
    /// Region -> KMS key (id, alias or ARN) of that region; only regions of `regions`.
    pub kms_key_ids: BTreeMap<String, String>,
    /// Account ids (12 digits) given launch permission on every image and
    /// `createVolumePermission` on its snapshots.
    pub accounts: Vec<String>,
    /// Organization ARNs given launch permission on every image.
    pub organization_arns: Vec<String>,
    /// Organizational-unit ARNs given launch permission on every image.
    pub ou_arns: Vec<String>,
    /// On every copy and its snapshots, at creation.
    pub tags: BTreeMap<String, String>,
    /// Written in every region (the source's too) with that region's AMI id, data type
    /// `aws:ec2:image`.
    pub ssm_parameter: Option<String>,
    pub deprecate_at: Option<DeprecateAt>,
    pub deregistration_protection: bool,
}

impl Distribute {
    /// Whether the image is shared with anyone.
    pub fn shares(&self) -> bool {
        !(self.accounts.is_empty() && self.organization_arns.is_empty() && self.ou_arns.is_empty())
    }

    /// The regions that get a copy when the image lives in `source_region`.
    pub fn copy_regions<'a>(&'a self, source_region: &'a str) -> impl Iterator<Item = &'a str> {
        self.regions
            .iter()
            .map(String::as_str)
            .filter(move |r| *r != source_region)
    }
}

/// When the images are deprecated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeprecateAt {
    /// This long after the promotion (`deprecate_at = "90d"`).
    After { seconds: u64 },
    /// At this time, seconds since the epoch (`deprecate_at = "2027-01-01T00:00:00Z"`).
    At { unix: u64 },
}

impl DeprecateAt {
    /// The deprecation time, seconds since the epoch, for a promotion at `now`.
    pub fn time(&self, now: u64) -> u64 {
        match *self {
            DeprecateAt::After { seconds } => now.saturating_add(seconds),
            DeprecateAt::At { unix } => unix,
        }
    }

    /// Why EC2 would refuse this time at `now` (in the past, or more than 10 years ahead).
    pub fn refused_at(&self, now: u64) -> Option<String> {
        let t = self.time(now);
        if t <= now {
            Some(format!(
                "deprecate_at {} is in the past; give a future date or a duration such as \"90d\"",
                rfc3339(t)
            ))
        } else if t - now > MAX_DEPRECATION.as_secs() {
            Some(format!(
                "deprecate_at {} is more than 10 years ahead, which EC2 refuses",
                rfc3339(t)
            ))
        } else {
            None
        }
    }
}

/// A field's mistake, with what to write instead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub message: String,
    pub hint: String,
}

fn problem(message: impl Into<String>, hint: impl Into<String>) -> Problem {
    Problem {
        message: message.into(),
        hint: hint.into(),
    }
}

/// A Region name bakery knows; else the closest known name as the hint.
pub fn check_region(region: &str) -> Result<(), Problem> {
    if AWS_REGIONS.contains(&region) {
        return Ok(());
    }
    let closest = AWS_REGIONS
        .iter()
        .min_by_key(|r| edit_distance(r, region))
        .copied()
        .unwrap_or("us-east-1");
    Err(problem(
        format!("{region:?} is not an AWS Region"),
        if edit_distance(closest, region) <= 3 {
            format!("did you mean \"{closest}\"? Regions are written like \"eu-west-1\"")
        } else {
            "Regions are written like \"eu-west-1\" or \"ap-northeast-2\"".into()
        },
    ))
}

/// An AWS account id: exactly 12 digits.
pub fn check_account(account: &str) -> Result<(), Problem> {
    let digits = account.chars().filter(char::is_ascii_digit).count();
    if digits == 12 && account.len() == 12 {
        return Ok(());
    }
    let why = if digits == account.len() {
        format!("{} digits", account.len())
    } else {
        "not only digits".into()
    };
    Err(problem(
        format!("{account:?} is not an AWS account id ({why})"),
        "an account id is exactly 12 digits, e.g. \"111122223333\" (keep leading zeros)",
    ))
}

/// `arn:PARTITION:organizations::ACCOUNT:organization/o-xxxxxxxxxx`.
pub fn check_organization_arn(arn: &str) -> Result<(), Problem> {
    let ok = org_arn_resource(arn)
        .and_then(|r| r.strip_prefix("organization/"))
        .is_some_and(is_org_id);
    if ok {
        Ok(())
    } else {
        Err(problem(
            format!("{arn:?} is not an organization ARN"),
            "e.g. \"arn:aws:organizations::111122223333:organization/o-exampleorgid\"",
        ))
    }
}

/// `arn:PARTITION:organizations::ACCOUNT:ou/o-xxxxxxxxxx/ou-xxxx-xxxxxxxx`.
pub fn check_ou_arn(arn: &str) -> Result<(), Problem> {
    let ok = org_arn_resource(arn)
        .and_then(|r| r.strip_prefix("ou/"))
        .and_then(|r| r.split_once('/'))
        .is_some_and(|(org, ou)| is_org_id(org) && is_ou_id(ou));
    if ok {
        Ok(())
    } else {
        Err(problem(
            format!("{arn:?} is not an organizational unit ARN"),
            "e.g. \"arn:aws:organizations::111122223333:ou/o-exampleorgid/ou-ab12-cdef3456\"",
        ))
    }
}

/// The resource part of an Organizations ARN with a known partition and a 12-digit account.
fn org_arn_resource(arn: &str) -> Option<&str> {
    let mut parts = arn.splitn(6, ':');
    let (arn_, partition, service, region, account, resource) = (
        parts.next()?,
        parts.next()?,
        parts.next()?,
        parts.next()?,
        parts.next()?,
        parts.next()?,
    );
    (arn_ == "arn"
        && matches!(partition, "aws" | "aws-cn" | "aws-us-gov")
        && service == "organizations"
        && region.is_empty()
        && check_account(account).is_ok())
    .then_some(resource)
}

fn lower_alnum(s: &str) -> bool {
    s.chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
}

/// `o-` and 10 to 32 lowercase letters or digits.
fn is_org_id(s: &str) -> bool {
    s.strip_prefix("o-")
        .is_some_and(|r| (10..=32).contains(&r.len()) && lower_alnum(r))
}

/// `ou-`, 4 to 32 lowercase letters or digits (the root), `-`, 8 to 32 more.
fn is_ou_id(s: &str) -> bool {
    s.strip_prefix("ou-")
        .and_then(|r| r.split_once('-'))
        .is_some_and(|(root, rest)| {
            (4..=32).contains(&root.len())
                && lower_alnum(root)
                && (8..=32).contains(&rest.len())
                && lower_alnum(rest)
        })
}

/// An SSM parameter name as a path: a leading slash, the characters SSM accepts, at most 15
/// levels and 1011 characters, not under the reserved `/aws` or `/ssm`.
pub fn check_parameter_name(name: &str) -> Result<(), Problem> {
    let hint = "write a path such as \"/bakery/web/latest\"";
    if !name.starts_with('/') {
        return Err(problem(
            format!("parameter name {name:?} does not start with a slash"),
            format!("{hint}: bakery writes one parameter per region, at the same path"),
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "_.-/".contains(*c)))
    {
        return Err(problem(
            format!("parameter name {name:?} contains {c:?}"),
            format!("SSM parameter names use letters, digits and _ . - /; {hint}"),
        ));
    }
    if name.len() > 1011
        || name.matches('/').count() > 15
        || name.ends_with('/')
        || name.contains("//")
    {
        return Err(problem(
            format!("parameter name {name:?} is not a valid parameter path"),
            format!("at most 15 levels and 1011 characters, no empty level; {hint}"),
        ));
    }
    let first = name[1..]
        .split('/')
        .next()
        .unwrap_or_default()
        .to_ascii_lowercase();
    if first.starts_with("aws") || first.starts_with("ssm") {
        return Err(problem(
            format!("parameter name {name:?} is under a path AWS reserves"),
            format!("parameter names may not begin with \"aws\" or \"ssm\"; {hint}"),
        ));
    }
    Ok(())
}

/// A duration ("90d", "12w") or an RFC 3339 date ("2027-01-01T00:00:00Z", or "2027-01-01" for
/// midnight UTC). Whether the date lies ahead is checked when the promotion starts
/// ([`DeprecateAt::refused_at`]).
pub fn parse_deprecate_at(text: &str) -> Result<DeprecateAt, Problem> {
    let t = text.trim();
    let hint =
        "write a duration such as \"90d\" or an RFC 3339 date such as \"2027-01-01T00:00:00Z\"";
    if t.starts_with(|c: char| c.is_ascii_digit()) && t.len() >= 10 && t.as_bytes()[4] == b'-' {
        return parse_rfc3339(t)
            .map(|unix| DeprecateAt::At { unix })
            .ok_or_else(|| {
                problem(
                    format!("`deprecate_at` = {text:?} is not an RFC 3339 date"),
                    hint,
                )
            });
    }
    match humantime::parse_duration(t) {
        Ok(d) if d >= Duration::from_secs(60) && d <= MAX_DEPRECATION => Ok(DeprecateAt::After {
            seconds: d.as_secs(),
        }),
        Ok(_) => Err(problem(
            format!("`deprecate_at` = {text:?} is out of range: 1m to 10 years"),
            "EC2 deprecates an image at a future time at most 10 years ahead",
        )),
        Err(e) => Err(problem(
            format!("`deprecate_at` = {text:?} is neither a duration ({e}) nor a date"),
            hint,
        )),
    }
}

/// A KMS key for `region`: a key id, an alias, or an ARN in that region (keys are regional: a
/// key ARN of another region would fail the copy after it started).
pub fn check_kms_key(region: &str, key: &str) -> Result<(), Problem> {
    if key.trim().is_empty() {
        return Err(problem(
            format!("the KMS key for {region} is empty"),
            "give a key id, \"alias/NAME\" or a key ARN of that region",
        ));
    }
    if let Some(rest) = key.strip_prefix("arn:") {
        let parts: Vec<&str> = rest.splitn(5, ':').collect();
        if parts.len() != 5 || parts[1] != "kms" {
            return Err(problem(
                format!("{key:?} is not a KMS key ARN"),
                "e.g. \"arn:aws:kms:eu-west-1:111122223333:key/1234abcd-...\" or \"alias/ebs\"",
            ));
        }
        if parts[2] != region {
            return Err(problem(
                format!(
                    "the KMS key for {region} is in {}: a copy can only be encrypted with a key of its own region",
                    parts[2]
                ),
                format!("give a key of {region} (its ARN, id or alias)"),
            ));
        }
    }
    Ok(())
}

/// Levenshtein distance, for "did you mean".
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

/// Seconds since the epoch of an RFC 3339 time (`Z` or `±HH:MM`, optional fraction), or of a
/// bare date (midnight UTC).
pub fn parse_rfc3339(s: &str) -> Option<u64> {
    let num = |t: &str| -> Option<i64> {
        (!t.is_empty() && t.chars().all(|c| c.is_ascii_digit()))
            .then(|| t.parse().ok())
            .flatten()
    };
    let (date, time) = match s.find(['T', 't', ' ']) {
        Some(i) => (&s[..i], Some(&s[i + 1..])),
        None => (s, None),
    };
    let mut d = date.split('-');
    let (y, m, day) = (num(d.next()?)?, num(d.next()?)?, num(d.next()?)?);
    if d.next().is_some() || !(1..=12).contains(&m) || !(1..=days_in_month(y, m)).contains(&day) {
        return None;
    }
    let mut secs = days_from_civil(y, m, day) * 86_400;
    if let Some(t) = time {
        let (clock, offset) = if let Some(c) = t.strip_suffix(['Z', 'z']) {
            (c, 0)
        } else {
            let i = t.rfind(['+', '-'])?;
            let (c, o) = t.split_at(i);
            let sign = if o.starts_with('-') { -1 } else { 1 };
            let (oh, om) = o[1..].split_once(':')?;
            let (oh, om) = (num(oh)?, num(om)?);
            if oh > 23 || om > 59 {
                return None;
            }
            (c, sign * (oh * 3600 + om * 60))
        };
        let clock = clock.split('.').next()?;
        let mut c = clock.split(':');
        let (h, mi, se) = (num(c.next()?)?, num(c.next()?)?, num(c.next()?)?);
        if c.next().is_some() || h > 23 || mi > 59 || se > 60 {
            return None;
        }
        secs += h * 3600 + mi * 60 + se - offset;
    }
    u64::try_from(secs).ok()
}

fn days_in_month(y: i64, m: i64) -> i64 {
    match m {
        2 if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `YYYY-MM-DDTHH:MM:SSZ` of seconds since the epoch.
pub fn rfc3339(unix: u64) -> String {
    let days = (unix / 86_400) as i64;
    let rem = unix % 86_400;
    // The inverse of days_from_civil.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

// ---------------------------------------------------------------------------------------------
// The recipe's table.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDistribute {
    regions: Option<Vec<S>>,
    encrypted: Option<bool>,
    kms_key_ids: Option<BTreeMap<S, S>>,
    accounts: Option<Vec<S>>,
    organization_arns: Option<Vec<S>>,
    ou_arns: Option<Vec<S>>,
    tags: Option<BTreeMap<String, S>>,
    ssm_parameter: Option<S>,
    deprecate_at: Option<S>,
    deregistration_protection: Option<bool>,
}

impl Loader<'_> {
    fn located(&mut self, at: usize, r: Result<(), Problem>) -> bool {
        match r {
            Ok(()) => true,
            Err(p) => {
                self.error(at, p.message, p.hint);
                false
            }
        }
    }

    /// Renders and checks each value of a list.
    fn checked_list(
        &mut self,
        list: &Option<Vec<S>>,
        check: fn(&str) -> Result<(), Problem>,
    ) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for s in list.iter().flatten() {
            let v = self.render(s);
            let at = s.span().start;
            if super::unresolved(&v) || !self.located(at, check(&v)) {
                continue;
            }
            if out.contains(&v) {
                self.error(at, format!("{v:?} is listed twice"), "list each value once");
                continue;
            }
            out.push(v);
        }
        out
    }

    pub(super) fn distribute(&mut self, raw: &Spanned<RawDistribute>) -> Distribute {
        let r = raw.get_ref();
        let regions = self.checked_list(&r.regions, check_region);
        let encrypted = r.encrypted.unwrap_or(false);
        let mut kms_key_ids = BTreeMap::new();
        for (region, key) in r.kms_key_ids.iter().flatten() {
            let (name, value) = (self.render(region), self.render(key));
            if !regions.contains(&name) {
                self.error(
                    region.span().start,
                    format!("`kms_key_ids` names {name:?}, which is not in `regions`"),
                    format!(
                        "give keys for the regions the image is copied to ({}); the source region's encryption is [instance.root_volume]'s",
                        super::list_or_none(&regions)
                    ),
                );
                continue;
            }
            if self.located(key.span().start, check_kms_key(&name, &value)) {
                kms_key_ids.insert(name, value);
            }
        }
        if !kms_key_ids.is_empty() && !encrypted {
            let at = r
                .kms_key_ids
                .iter()
                .flatten()
                .next()
                .map_or(raw.span().start, |(k, _)| k.span().start);
            self.error(
                at,
                "`kms_key_ids` are given but `encrypted` is not true",
                "add `encrypted = true` (a key only applies to an encrypted copy)",
            );
        }
        let accounts = self.checked_list(&r.accounts, check_account);
        let organization_arns = self.checked_list(&r.organization_arns, check_organization_arn);
        let ou_arns = self.checked_list(&r.ou_arns, check_ou_arn);
        let tags = self.tags(&r.tags, raw.span().start);
        if tags.len() > MAX_USER_TAGS {
            self.error(
                raw.span().start,
                format!(
                    "[distribute] has {} tags; at most {MAX_USER_TAGS}",
                    tags.len()
                ),
                "AWS allows 50 tags on an image and bakery adds 2 of its own",
            );
        }
        let ssm_parameter = r.ssm_parameter.as_ref().map(|p| {
            let v = self.render(p);
            self.located(p.span().start, check_parameter_name(&v));
            v
        });
        let deprecate_at = r.deprecate_at.as_ref().and_then(|d| {
            let v = self.render(d);
            match parse_deprecate_at(&v) {
                Ok(at) => Some(at),
                Err(p) => {
                    self.error(d.span().start, p.message, p.hint);
                    None
                }
            }
        });
        Distribute {
            regions,
            encrypted,
            kms_key_ids,
            accounts,
            organization_arns,
            ou_arns,
            tags,
            ssm_parameter,
            deprecate_at,
            deregistration_protection: r.deregistration_protection.unwrap_or(false),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The same settings from the command line (`bakery promote`).

/// `bakery promote`'s distribution flags, as given.
#[derive(Debug, Clone, Default)]
pub struct Flags {
    pub regions: Vec<String>,
    pub encrypted: bool,
    /// `REGION=KEY`
    pub kms_key_ids: Vec<String>,
    pub accounts: Vec<String>,
    pub organization_arns: Vec<String>,
    pub ou_arns: Vec<String>,
    /// `KEY=VALUE`
    pub tags: Vec<String>,
    pub ssm_parameter: Option<String>,
    pub deprecate_at: Option<String>,
    pub deregistration_protection: bool,
}

impl Flags {
    /// The settings, or every mistake, each naming its flag.
    pub fn validate(&self) -> Result<Distribute, Vec<String>> {
        let mut errors = Vec::new();
        let regions = flag_list(&mut errors, "to", &self.regions, check_region);
        let accounts = flag_list(&mut errors, "account", &self.accounts, check_account);
        let organization_arns = flag_list(
            &mut errors,
            "organization-arn",
            &self.organization_arns,
            check_organization_arn,
        );
        let ou_arns = flag_list(&mut errors, "ou-arn", &self.ou_arns, check_ou_arn);
        let mut kms_key_ids = BTreeMap::new();
        for kv in &self.kms_key_ids {
            let Some((region, key)) = kv.split_once('=') else {
                flag_error(
                    &mut errors,
                    "kms-key-id",
                    problem(
                        format!("{kv:?} is not REGION=KEY"),
                        "e.g. --kms-key-id eu-west-1=alias/ebs",
                    ),
                );
                continue;
            };
            if !regions.iter().any(|r| r == region) {
                flag_error(
                    &mut errors,
                    "kms-key-id",
                    problem(
                        format!("{region:?} is not one of the regions to copy to"),
                        format!("copy to it (--to {region}) or drop the key"),
                    ),
                );
                continue;
            }
            match check_kms_key(region, key) {
                Ok(()) => {
                    kms_key_ids.insert(region.to_string(), key.to_string());
                }
                Err(p) => flag_error(&mut errors, "kms-key-id", p),
            }
        }
        if !kms_key_ids.is_empty() && !self.encrypted {
            flag_error(
                &mut errors,
                "kms-key-id",
                problem("a key is given without --encrypted", "add --encrypted"),
            );
        }
        let mut tags = BTreeMap::new();
        for kv in &self.tags {
            match kv.split_once('=') {
                Some((k, v))
                    if !k.is_empty()
                        && k.len() <= 128
                        && !k.starts_with("aws:")
                        && !k.starts_with("bakery:") =>
                {
                    tags.insert(k.to_string(), v.to_string());
                }
                _ => flag_error(
                    &mut errors,
                    "tag",
                    problem(
                        format!("{kv:?} is not KEY=VALUE with an allowed key"),
                        "keys are 1 to 128 characters, not starting with aws: or bakery:",
                    ),
                ),
            }
        }
        if tags.len() > MAX_USER_TAGS {
            flag_error(
                &mut errors,
                "tag",
                problem(
                    format!("{} tags; at most {MAX_USER_TAGS}", tags.len()),
                    "AWS allows 50 tags on an image and bakery adds 2 of its own",
                ),
            );
        }
        if let Some(p) = &self.ssm_parameter {
            if let Err(e) = check_parameter_name(p) {
                flag_error(&mut errors, "ssm-parameter", e);
            }
        }
        let deprecate_at = match self.deprecate_at.as_deref().map(parse_deprecate_at) {
            Some(Err(p)) => {
                flag_error(&mut errors, "deprecate-at", p);
                None
            }
            Some(Ok(d)) => Some(d),
            None => None,
        };
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(Distribute {
            regions,
            encrypted: self.encrypted,
            kms_key_ids,
            accounts,
            organization_arns,
            ou_arns,
            tags,
            ssm_parameter: self.ssm_parameter.clone(),
            deprecate_at,
            deregistration_protection: self.deregistration_protection,
        })
    }
}

fn flag_error(errors: &mut Vec<String>, flag: &str, p: Problem) {
    errors.push(format!("--{flag}: {}; {}", p.message, p.hint));
}

/// The values of a repeatable, comma-separable flag, each checked, without repeats.
fn flag_list(
    errors: &mut Vec<String>,
    flag: &str,
    values: &[String],
    check: fn(&str) -> Result<(), Problem>,
) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for v in values.iter().flat_map(|v| v.split(',')).map(str::trim) {
        match check(v) {
            Err(p) => flag_error(errors, flag, p),
            Ok(()) if !out.iter().any(|o| o == v) => out.push(v.to_string()),
            Ok(()) => {}
        }
    }
    out
}

#[cfg(test)]
mod tests;
