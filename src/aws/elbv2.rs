//! Target health from Elastic Load Balancing: one `DescribeTargetHealth` per target group (not
//! per instance), turned into plain data.

use std::collections::BTreeMap;

use aws_sdk_elasticloadbalancingv2::Client;

use super::{call, AwsError};

/// A target's state in one target group: `initial`, `healthy`, `unhealthy`, `draining`, ...
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetState {
    pub state: String,
    pub reason: Option<String>,
    pub description: Option<String>,
}

/// Health of every registered target of a target group, by target id.
pub async fn target_health(
    elb: &Client,
    target_group_arn: &str,
) -> Result<BTreeMap<String, TargetState>, AwsError> {
    let out = call(
        "elasticloadbalancing:DescribeTargetHealth",
        target_group_arn,
        || {
            elb.describe_target_health()
                .target_group_arn(target_group_arn)
                .send()
        },
    )
    .await?;
    Ok(out
        .target_health_descriptions()
        .iter()
        .filter_map(|d| {
            let id = d.target()?.id()?.to_string();
            let h = d.target_health();
            Some((
                id,
                TargetState {
                    state: h
                        .and_then(|h| h.state())
                        .map(|s| s.as_str().to_string())
                        .unwrap_or_default(),
                    reason: h.and_then(|h| h.reason()).map(|r| r.as_str().to_string()),
                    description: h.and_then(|h| h.description()).map(str::to_string),
                },
            ))
        })
        .collect())
}
