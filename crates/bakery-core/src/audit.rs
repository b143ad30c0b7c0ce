//! The audit's evaluation: the classic web architecture's checks as pure functions over facts
//! that `bakery audit` gathered from AWS (the `bakery` crate's `audit` module does the calls).
//! Each check gives one [`Finding`]; a failed one names the resource to change and a one-line
//! fix. IAM policy evaluation follows IAM's rules for `Action`/`NotAction`,
//! `Resource`/`NotResource` and explicit denies (conditions are not evaluated).

use std::collections::BTreeSet;

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Info,
    Low,
    Medium,
    High,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Finding {
    pub check: &'static str,
    pub severity: Severity,
    pub passed: bool,
    pub detail: String,
    /// For a failed check: what to change, in one line.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

/// One ingress rule of a security group, flattened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// The security group the rule belongs to.
    pub group: String,
    pub from: i32,
    pub to: i32,
    pub cidrs: Vec<String>,
    pub groups: Vec<String>,
}

impl Rule {
    fn covers(&self, port: i32) -> bool {
        (self.from == -1 && self.to == -1) || (self.from <= port && port <= self.to)
    }

    fn ports(&self) -> String {
        if self.from == -1 && self.to == -1 {
            "all ports".into()
        } else if self.from == self.to {
            format!("port {}", self.from)
        } else {
            format!("ports {}-{}", self.from, self.to)
        }
    }
}

/// Whether the rules admit `port` only from `allowed` groups (and from no CIDR at all). Each
/// problem names the security group and the rule.
pub fn only_from_groups(
    rules: &[Rule],
    port: i32,
    allowed: &BTreeSet<String>,
) -> Result<(), Vec<String>> {
    let mut problems = Vec::new();
    for r in rules.iter().filter(|r| r.covers(port)) {
        for c in &r.cidrs {
            problems.push(format!(
                "{}: the rule for {} admits {c}; revoke it",
                r.group,
                r.ports()
            ));
        }
        for g in r.groups.iter().filter(|g| !allowed.contains(*g)) {
            problems.push(format!(
                "{}: the rule for {} admits group {g}; revoke it",
                r.group,
                r.ports()
            ));
        }
    }
    if !rules
        .iter()
        .any(|r| r.covers(port) && r.groups.iter().any(|g| allowed.contains(g)))
    {
        problems.push(format!(
            "port {port} is not open to {} at all; authorize it from that group",
            join_or(allowed.iter(), "(no group)")
        ));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems)
    }
}

fn join_or<'a>(it: impl Iterator<Item = &'a String>, empty: &str) -> String {
    let v: Vec<&str> = it.map(String::as_str).collect();
    if v.is_empty() {
        empty.to_string()
    } else {
        v.join(", ")
    }
}

/// IAM's wildcard match (`*` any run, `?` one character), in linear space and O(p·v) worst-case
/// time (the greedy algorithm with one backtrack point: no exponential blow-up on `a*a*a*…b`).
pub fn wildcard(pattern: &str, value: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let v: Vec<char> = value.chars().collect();
    let (mut pi, mut vi) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while vi < v.len() {
        // A `*` in the pattern is always a wildcard, even facing a literal `*` in the value.
        if pi < p.len() && p[pi] == '*' {
            star = Some((pi, vi));
            pi += 1;
        } else if pi < p.len() && (p[pi] == '?' || p[pi] == v[vi]) {
            pi += 1;
            vi += 1;
        } else if let Some((sp, sv)) = star {
            pi = sp + 1;
            vi = sv + 1;
            star = Some((sp, sv + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

fn strings(v: Option<&serde_json::Value>) -> Option<Vec<String>> {
    match v? {
        serde_json::Value::String(s) => Some(vec![s.clone()]),
        serde_json::Value::Array(a) => Some(
            a.iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect(),
        ),
        _ => Some(Vec::new()),
    }
}

/// Whether one statement applies to `action` on `resource`: `Action` matches (or `NotAction`
/// does not), and `Resource` matches (or `NotResource` does not). Actions are matched without
/// regard to case, resources with.
fn statement_applies(st: &serde_json::Value, action: &str, resource: &str) -> bool {
    let action = action.to_ascii_lowercase();
    let action_match = |list: Vec<String>| {
        list.iter()
            .any(|a| wildcard(&a.to_ascii_lowercase(), &action))
    };
    let acts = match (strings(st.get("Action")), strings(st.get("NotAction"))) {
        (Some(a), _) => action_match(a),
        (None, Some(n)) => !action_match(n),
        (None, None) => false,
    };
    let res = match (strings(st.get("Resource")), strings(st.get("NotResource"))) {
        (Some(r), _) => r.iter().any(|r| wildcard(r, resource)),
        (None, Some(n)) => !n.iter().any(|r| wildcard(r, resource)),
        (None, None) => false,
    };
    acts && res
}

/// Whether policy documents allow `action` on `resource`: an `Allow` statement applies and no
/// `Deny` statement does (IAM's evaluation within one account; conditions are not evaluated).
pub fn policies_allow(documents: &[serde_json::Value], action: &str, resource: &str) -> bool {
    let mut allowed = false;
    for doc in documents {
        let statements = match doc.get("Statement") {
            Some(serde_json::Value::Array(a)) => a.iter().collect(),
            Some(s @ serde_json::Value::Object(_)) => vec![s],
            _ => Vec::new(),
        };
        for st in statements {
            if !statement_applies(st, action, resource) {
                continue;
            }
            match st.get("Effect").and_then(|e| e.as_str()) {
                Some("Deny") => return false,
                Some("Allow") => allowed = true,
                _ => {}
            }
        }
    }
    allowed
}

// ---------------------------------------------------------------------------------------------
// Facts: what `bakery audit` read from AWS, as plain values.

/// A subnet and whether its route table sends 0.0.0.0/0 to an internet gateway.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SubnetFact {
    pub id: String,
    pub public: bool,
    /// The route table that decides it (for the fix).
    pub route_table: Option<String>,
    pub cidr: String,
    /// The network ACL associated with the subnet, and its entries.
    pub nacl: Option<Nacl>,
}

/// A network ACL: numbered rules per direction, evaluated lowest number first, first match
/// wins, and an implicit deny of everything else.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Nacl {
    pub id: String,
    pub entries: Vec<NaclEntry>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NaclEntry {
    pub rule: i32,
    pub egress: bool,
    /// `-1` (all), `6` (TCP), ...
    pub protocol: String,
    pub allow: bool,
    pub cidr: String,
    /// Port range; `None` for all ports.
    pub ports: Option<(i32, i32)>,
}

/// Whether a network ACL admits TCP `ports` (all of them) between the subnet and `peer` (a
/// CIDR) in one direction, as AWS evaluates it: rules in ascending order, the first that
/// matches decides. A rule that allows only part of the traffic does not suffice; a deny that
/// touches any of it fails. The error names the rule to change.
pub fn nacl_admits(nacl: &Nacl, egress: bool, ports: (i32, i32), peer: &str) -> Result<(), String> {
    let Ok(peer_net) = peer.parse::<ipnet::IpNet>() else {
        return Err(format!("{peer} is not a CIDR"));
    };
    let mut rules: Vec<&NaclEntry> = nacl.entries.iter().filter(|e| e.egress == egress).collect();
    rules.sort_by_key(|e| e.rule);
    let way = if egress { "outbound" } else { "inbound" };
    for e in rules {
        if e.protocol != "-1" && e.protocol != "6" && !e.protocol.eq_ignore_ascii_case("tcp") {
            continue;
        }
        let (lo, hi) = e.ports.unwrap_or((0, 65535));
        if hi < ports.0 || lo > ports.1 {
            continue;
        }
        let Ok(net) = e.cidr.parse::<ipnet::IpNet>() else {
            continue;
        };
        let overlaps = net.contains(&peer_net) || peer_net.contains(&net);
        if !overlaps {
            continue;
        }
        if !e.allow {
            return Err(format!(
                "{} {way} rule {} denies TCP {}-{} {} {}",
                nacl.id,
                e.rule,
                ports.0,
                ports.1,
                if egress { "to" } else { "from" },
                e.cidr
            ));
        }
        if net.contains(&peer_net) && lo <= ports.0 && hi >= ports.1 {
            return Ok(());
        }
    }
    Err(format!(
        "{} has no {way} rule allowing TCP {}-{} {} {peer}",
        nacl.id,
        ports.0,
        ports.1,
        if egress { "to" } else { "from" }
    ))
}

/// The launch-template version the group launches.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TemplateFact {
    pub id: String,
    pub version: i64,
    pub imdsv2_required: bool,
    pub security_groups: Vec<String>,
    /// Every block device mapping asks for encryption (and there is at least one).
    pub encrypts_all_volumes: bool,
    pub instance_profile: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadBalancerFact {
    pub name: String,
    pub internet_facing: bool,
    pub subnets: Vec<SubnetFact>,
    pub security_groups: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatabaseFact {
    pub name: String,
    pub publicly_accessible: bool,
    pub port: i32,
    pub rules: Vec<Rule>,
}

/// The secret the instance role should read, and the role's policy documents.
#[derive(Debug, Clone, PartialEq)]
pub struct SecretFact {
    pub arn: String,
    /// `None`: the launch template has no instance profile.
    pub profile: Option<String>,
    pub policies: Vec<serde_json::Value>,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Facts {
    pub group: String,
    pub subnets: Vec<SubnetFact>,
    pub instances: Vec<String>,
    pub instances_with_public_ip: Vec<String>,
    pub template: Option<TemplateFact>,
    /// `None`: the group is behind no load balancer.
    pub load_balancers: Option<Vec<LoadBalancerFact>>,
    pub app_port: i32,
    /// The ingress rules of the template's security groups.
    pub app_rules: Vec<Rule>,
    /// The databases checked (named, or every one in the group's VPC).
    pub databases: Vec<DatabaseFact>,
    pub unencrypted_volumes: Vec<String>,
    /// `None`: no secret was named (`--secret`).
    pub secret: Option<SecretFact>,
}

/// Every check over the facts, in the order the table prints them.
pub fn evaluate(f: &Facts) -> Vec<Finding> {
    let mut out = vec![private_subnets(f)];
    out.push(load_balancer_public(f));
    out.push(app_port(f));
    out.extend(databases(f));
    out.push(network_acls(f));
    out.push(imdsv2(f));
    out.push(ebs_encrypted(f));
    out.push(secret_readable(f));
    out
}

fn finding(
    check: &'static str,
    severity: Severity,
    passed: bool,
    detail: String,
    fix: impl FnOnce() -> String,
) -> Finding {
    Finding {
        check,
        severity,
        passed,
        detail,
        fix: (!passed).then(fix),
    }
}

fn private_subnets(f: &Facts) -> Finding {
    let public: Vec<&SubnetFact> = f.subnets.iter().filter(|s| s.public).collect();
    let ok = public.is_empty() && f.instances_with_public_ip.is_empty();
    let detail = if ok {
        format!(
            "{} subnet(s), none routed to an internet gateway; no instance has a public IP",
            f.subnets.len()
        )
    } else {
        format!(
            "public subnets in the group: {}; instances with a public IP: {}",
            join_or(public.iter().map(|s| &s.id), "none"),
            join_or(f.instances_with_public_ip.iter(), "none")
        )
    };
    finding(
        "instances in private subnets",
        Severity::High,
        ok,
        detail,
        || match public.first() {
            Some(s) => format!(
                "set the group's subnets (VPCZoneIdentifier of {}) to private ones, without {}{}",
                f.group,
                s.id,
                s.route_table
                    .as_ref()
                    .map(|t| format!(" (route table {t} routes 0.0.0.0/0 to an internet gateway)"))
                    .unwrap_or_default()
            ),
            None => "turn off public IPs in the launch template (AssociatePublicIpAddress = false)"
                .into(),
        },
    )
}

fn load_balancer_public(f: &Facts) -> Finding {
    let Some(lbs) = &f.load_balancers else {
        return finding(
            "load balancer in public subnets",
            Severity::Info,
            true,
            "the group is behind no load balancer".into(),
            String::new,
        );
    };
    let private: Vec<String> = lbs
        .iter()
        .filter(|lb| lb.internet_facing)
        .flat_map(|lb| {
            lb.subnets
                .iter()
                .filter(|s| !s.public)
                .map(move |s| format!("{} in {}", lb.name, s.id))
        })
        .collect();
    let ok = private.is_empty();
    finding(
        "load balancer in public subnets",
        Severity::Medium,
        ok,
        if ok {
            format!(
                "{} internet-facing load balancer(s), all in public subnets",
                lbs.iter().filter(|l| l.internet_facing).count()
            )
        } else {
            format!(
                "internet-facing but in a private subnet: {}",
                private.join(", ")
            )
        },
        || {
            format!(
                "move {} into public subnets (SetSubnets), whose route tables send 0.0.0.0/0 to an internet gateway",
                private.join(", ")
            )
        },
    )
}

fn lb_groups(f: &Facts) -> BTreeSet<String> {
    f.load_balancers
        .iter()
        .flatten()
        .flat_map(|lb| lb.security_groups.iter().cloned())
        .collect()
}

fn app_port(f: &Facts) -> Finding {
    let allowed = lb_groups(f);
    let groups = f
        .template
        .as_ref()
        .map(|t| t.security_groups.clone())
        .unwrap_or_default();
    let r = only_from_groups(&f.app_rules, f.app_port, &allowed);
    let ok = r.is_ok();
    let problems = r.err().unwrap_or_default();
    finding(
        "app port only from the load balancer",
        Severity::High,
        ok,
        if ok {
            format!(
                "port {} of {} admits only {}",
                f.app_port,
                groups.join(", "),
                join_or(allowed.iter(), "(none)")
            )
        } else {
            problems.join("; ")
        },
        || {
            format!(
                "in {}: admit port {} from {} only",
                join_or(groups.iter(), "the instances' security group"),
                f.app_port,
                join_or(allowed.iter(), "the load balancer's security group")
            )
        },
    )
}

fn databases(f: &Facts) -> Vec<Finding> {
    if f.databases.is_empty() {
        return vec![finding(
            "database only from the instances",
            Severity::Info,
            true,
            "no RDS instance in the group's VPC".into(),
            String::new,
        )];
    }
    let app: BTreeSet<String> = f
        .template
        .iter()
        .flat_map(|t| t.security_groups.iter().cloned())
        .collect();
    let mut out = Vec::new();
    for db in &f.databases {
        out.push(finding(
            "database not publicly accessible",
            Severity::High,
            !db.publicly_accessible,
            format!("{}: PubliclyAccessible = {}", db.name, db.publicly_accessible),
            || {
                format!(
                    "aws rds modify-db-instance --db-instance-identifier {} --no-publicly-accessible",
                    db.name
                )
            },
        ));
        let r = only_from_groups(&db.rules, db.port, &app);
        let ok = r.is_ok();
        let problems = r.err().unwrap_or_default();
        out.push(finding(
            "database only from the instances",
            Severity::High,
            ok,
            if ok {
                format!(
                    "{}: port {} admits only the instances' group",
                    db.name, db.port
                )
            } else {
                format!("{}: {}", db.name, problems.join("; "))
            },
            || {
                format!(
                    "in the database's security group: admit port {} from {} only",
                    db.port,
                    join_or(app.iter(), "the instances' security group")
                )
            },
        ));
    }
    out
}

/// Ephemeral ports: where the return traffic of a TCP connection goes.
const EPHEMERAL: (i32, i32) = (1024, 65535);

fn network_acls(f: &Facts) -> Finding {
    let check = "network ACLs admit the app's traffic";
    let lb_subnets: Vec<&SubnetFact> = f
        .load_balancers
        .iter()
        .flatten()
        .flat_map(|lb| lb.subnets.iter())
        .collect();
    if lb_subnets.is_empty() {
        return finding(
            check,
            Severity::Info,
            true,
            "the group is behind no load balancer".into(),
            String::new,
        );
    }
    let port = (f.app_port, f.app_port);
    let mut problems = Vec::new();
    let mut fixes = Vec::new();
    let mut need = |s: &SubnetFact, egress: bool, ports: (i32, i32), peer: &SubnetFact| {
        let Some(nacl) = &s.nacl else { return };
        if let Err(why) = nacl_admits(nacl, egress, ports, &peer.cidr) {
            problems.push(format!("subnet {}: {why}", s.id));
            fixes.push(format!(
                "add to {} an {} rule allowing TCP {}-{} {} {} (below any deny that matches)",
                nacl.id,
                if egress { "outbound" } else { "inbound" },
                ports.0,
                ports.1,
                if egress { "to" } else { "from" },
                peer.cidr
            ));
        }
    };
    for g in &f.subnets {
        for l in &lb_subnets {
            need(g, false, port, l);
            need(g, true, EPHEMERAL, l);
            need(l, true, port, g);
            need(l, false, EPHEMERAL, g);
        }
    }
    let ok = problems.is_empty();
    finding(
        check,
        Severity::High,
        ok,
        if ok {
            format!(
                "the group's {} subnet(s) admit port {} from the load balancer's {} and return traffic (1024-65535) to them, and the reverse",
                f.subnets.len(),
                f.app_port,
                lb_subnets.len()
            )
        } else {
            problems.join("; ")
        },
        || {
            fixes.sort();
            fixes.dedup();
            fixes.join("; ")
        },
    )
}

fn imdsv2(f: &Facts) -> Finding {
    let ok = f.template.as_ref().is_some_and(|t| t.imdsv2_required);
    finding(
        "IMDSv2 required",
        Severity::High,
        ok,
        match &f.template {
            Some(t) => format!(
                "launch template {} version {}: HttpTokens {}",
                t.id,
                t.version,
                if ok { "required" } else { "optional" }
            ),
            None => "the group has no launch template to check".into(),
        },
        || {
            match &f.template {
            Some(t) => format!(
                "make a new version of {} with MetadataOptions.HttpTokens = required (bakery rollout does)",
                t.id
            ),
            None => "launch the group from a launch template that requires IMDSv2".into(),
        }
        },
    )
}

fn ebs_encrypted(f: &Facts) -> Finding {
    let template_encrypts = f.template.as_ref().is_some_and(|t| t.encrypts_all_volumes);
    let ok = template_encrypts || (!f.instances.is_empty() && f.unencrypted_volumes.is_empty());
    let detail = if template_encrypts {
        "the launch template encrypts every volume".into()
    } else if !f.unencrypted_volumes.is_empty() {
        format!(
            "unencrypted volumes: {} (and the launch template does not ask for encryption)",
            f.unencrypted_volumes.join(", ")
        )
    } else if f.instances.is_empty() {
        "no instances, and the launch template does not ask for encryption".into()
    } else {
        format!(
            "every volume of the {} instance(s) is encrypted",
            f.instances.len()
        )
    };
    finding(
        "EBS volumes encrypted",
        Severity::Medium,
        ok,
        detail,
        || {
            format!(
            "set Ebs.Encrypted = true on every block device of {} (or turn on EBS encryption by default in the region)",
            f.template
                .as_ref()
                .map(|t| format!("launch template {} version {}", t.id, t.version))
                .unwrap_or_else(|| "the launch template".into())
        )
        },
    )
}

const GET_SECRET: &str = "secretsmanager:GetSecretValue";

fn secret_readable(f: &Facts) -> Finding {
    let check = "instance role reads the secret";
    let Some(s) = &f.secret else {
        return finding(
            check,
            Severity::Info,
            true,
            "not checked: pass --secret NAME_OR_ARN".into(),
            String::new,
        );
    };
    let Some(profile) = &s.profile else {
        return finding(
            check,
            Severity::High,
            false,
            format!(
                "the launch template has no instance profile, so instances cannot read {}",
                s.arn
            ),
            || {
                "give the launch template an instance profile whose role allows secretsmanager:GetSecretValue on the secret".into()
            },
        );
    };
    let ok = policies_allow(&s.policies, GET_SECRET, &s.arn);
    finding(
        check,
        Severity::High,
        ok,
        if ok {
            format!(
                "instance profile {profile} allows {GET_SECRET} on {}",
                s.arn
            )
        } else {
            format!(
                "instance profile {profile} has no policy allowing {GET_SECRET} on {}",
                s.arn
            )
        },
        || {
            format!(
                "attach to the role of {profile} a policy allowing {GET_SECRET} on {} (and remove any Deny that matches)",
                s.arn
            )
        },
    )
}

#[cfg(test)]
mod tests;
