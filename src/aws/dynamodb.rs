//! Thin typed wrappers over the DynamoDB calls of the lease store (`crate::lease`): the table
//! (describe, create, TTL) and one lease record (read, conditional write). Every write is a
//! conditional `PutItem` that asks for the record as it stands when its condition fails
//! (`ReturnValuesOnConditionCheckFailure=ALL_OLD`), so a refused writer learns who holds the key
//! without another read.

use std::collections::HashMap;

use aws_sdk_dynamodb::error::SdkError;
use aws_sdk_dynamodb::operation::put_item::PutItemError;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, KeySchemaElement, KeyType,
    ReturnValuesOnConditionCheckFailure, ScalarAttributeType, TimeToLiveSpecification,
};
use aws_sdk_dynamodb::Client;
use bakery_core::lease::{Expect, Lease, PARTITION_KEY, TTL_ATTRIBUTE};

use super::{call, AwsError};

/// What `DescribeTable` says of a table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    /// `CREATING`, `ACTIVE`, `UPDATING`, `DELETING`, ...
    pub status: String,
    /// (attribute, `HASH` | `RANGE`)
    pub keys: Vec<(String, String)>,
    /// (attribute, `S` | `N` | `B`)
    pub types: Vec<(String, String)>,
}

pub async fn describe_table(db: &Client, table: &str) -> Result<Option<Table>, AwsError> {
    let out = match call("dynamodb:DescribeTable", table, || {
        db.describe_table().table_name(table).send()
    })
    .await
    {
        Ok(out) => out,
        Err(e) if e.code() == Some("ResourceNotFoundException") => return Ok(None),
        Err(e) => return Err(e),
    };
    let Some(t) = out.table() else {
        return Ok(None);
    };
    Ok(Some(Table {
        status: t
            .table_status()
            .map(|s| s.as_str().to_string())
            .unwrap_or_default(),
        keys: t
            .key_schema()
            .iter()
            .map(|k| {
                (
                    k.attribute_name().to_string(),
                    k.key_type().as_str().to_string(),
                )
            })
            .collect(),
        types: t
            .attribute_definitions()
            .iter()
            .map(|a| {
                (
                    a.attribute_name().to_string(),
                    a.attribute_type().as_str().to_string(),
                )
            })
            .collect(),
    }))
}

/// Creates a lease table (`pk` string partition key, on-demand). `Ok(false)`: it already
/// existed (another `init` got there first).
pub async fn create_table(db: &Client, table: &str) -> Result<bool, AwsError> {
    let bad = |e: aws_sdk_dynamodb::error::BuildError| AwsError {
        action: "dynamodb:CreateTable",
        resource: table.to_string(),
        code: None,
        message: e.to_string(),
        transient: false,
    };
    let attribute = AttributeDefinition::builder()
        .attribute_name(PARTITION_KEY)
        .attribute_type(ScalarAttributeType::S)
        .build()
        .map_err(bad)?;
    let key = KeySchemaElement::builder()
        .attribute_name(PARTITION_KEY)
        .key_type(KeyType::Hash)
        .build()
        .map_err(bad)?;
    match call("dynamodb:CreateTable", table, || {
        db.create_table()
            .table_name(table)
            .attribute_definitions(attribute.clone())
            .key_schema(key.clone())
            .billing_mode(BillingMode::PayPerRequest)
            .send()
    })
    .await
    {
        Ok(_) => Ok(true),
        Err(e) if e.code() == Some("ResourceInUseException") => Ok(false),
        Err(e) => Err(e),
    }
}

/// The table's TTL: (status `ENABLED` | `ENABLING` | `DISABLED` | `DISABLING`, attribute).
pub async fn ttl_of(db: &Client, table: &str) -> Result<(String, Option<String>), AwsError> {
    let out = call("dynamodb:DescribeTimeToLive", table, || {
        db.describe_time_to_live().table_name(table).send()
    })
    .await?;
    let d = out.time_to_live_description();
    Ok((
        d.and_then(|d| d.time_to_live_status())
            .map(|s| s.as_str().to_string())
            .unwrap_or_else(|| "DISABLED".into()),
        d.and_then(|d| d.attribute_name()).map(str::to_string),
    ))
}

/// Turns TTL on for the lease records' `ttl` attribute.
pub async fn enable_ttl(db: &Client, table: &str) -> Result<(), AwsError> {
    let spec = TimeToLiveSpecification::builder()
        .enabled(true)
        .attribute_name(TTL_ATTRIBUTE)
        .build()
        .map_err(|e| AwsError {
            action: "dynamodb:UpdateTimeToLive",
            resource: table.to_string(),
            code: None,
            message: e.to_string(),
            transient: false,
        })?;
    call("dynamodb:UpdateTimeToLive", table, || {
        db.update_time_to_live()
            .table_name(table)
            .time_to_live_specification(spec.clone())
            .send()
    })
    .await?;
    Ok(())
}

/// The record of `key` (a consistent read), if there is one.
pub async fn get_lease(db: &Client, table: &str, key: &str) -> Result<Option<Lease>, AwsError> {
    let out = call("dynamodb:GetItem", key, || {
        db.get_item()
            .table_name(table)
            .key(PARTITION_KEY, AttributeValue::S(key.to_string()))
            .consistent_read(true)
            .send()
    })
    .await?;
    Ok(out.item().map(lease_of))
}

/// The records whose key starts with `prefix` (a consistent `Scan`, every page).
pub async fn scan_leases(db: &Client, table: &str, prefix: &str) -> Result<Vec<Lease>, AwsError> {
    let mut out = Vec::new();
    let mut start: Option<HashMap<String, AttributeValue>> = None;
    loop {
        let page = call("dynamodb:Scan", table, || {
            db.scan()
                .table_name(table)
                .consistent_read(true)
                .filter_expression("begins_with(#pk, :prefix)")
                .expression_attribute_names("#pk", PARTITION_KEY)
                .expression_attribute_values(":prefix", AttributeValue::S(prefix.to_string()))
                .set_exclusive_start_key(start.clone())
                .send()
        })
        .await?;
        out.extend(page.items().iter().map(lease_of));
        match page.last_evaluated_key() {
            Some(k) if !k.is_empty() => start = Some(k.clone()),
            _ => return Ok(out),
        }
    }
}

/// How a conditional write went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Put {
    Written,
    /// The condition failed; the record as it stands (none: there is no record).
    Conflict(Option<Lease>),
}

/// Writes `lease` (with the TTL attribute `record_ttl`) if the record is as `expect` says.
pub async fn put_lease(
    db: &Client,
    table: &str,
    lease: &Lease,
    record_ttl: u64,
    expect: &Expect,
) -> Result<Put, AwsError> {
    let mut names = HashMap::new();
    let mut values = HashMap::new();
    let condition = match expect {
        Expect::Absent => {
            names.insert("#pk".to_string(), PARTITION_KEY.to_string());
            "attribute_not_exists(#pk)"
        }
        Expect::Version { rvn } => {
            names.insert("#rvn".to_string(), "rvn".to_string());
            values.insert(":rvn".to_string(), AttributeValue::S(rvn.clone()));
            "#rvn = :rvn"
        }
        Expect::Held { owner, token, rvn } => {
            names.insert("#rvn".to_string(), "rvn".to_string());
            names.insert("#owner".to_string(), "owner".to_string());
            names.insert("#token".to_string(), "token".to_string());
            values.insert(":rvn".to_string(), AttributeValue::S(rvn.clone()));
            values.insert(":owner".to_string(), AttributeValue::S(owner.clone()));
            values.insert(":token".to_string(), AttributeValue::N(token.to_string()));
            "#owner = :owner AND #token = :token AND #rvn = :rvn"
        }
    };
    let request = db
        .put_item()
        .table_name(table)
        .set_item(Some(item_of(lease, record_ttl)))
        .condition_expression(condition)
        .set_expression_attribute_names(Some(names))
        .set_expression_attribute_values((!values.is_empty()).then_some(values))
        .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld);
    call("dynamodb:PutItem", &lease.key, || {
        let request = request.clone();
        async move {
            match request.send().await {
                Ok(_) => Ok(Put::Written),
                Err(SdkError::ServiceError(ctx))
                    if matches!(ctx.err(), PutItemError::ConditionalCheckFailedException(_)) =>
                {
                    let found = match ctx.err() {
                        PutItemError::ConditionalCheckFailedException(c) => c.item().map(lease_of),
                        _ => None,
                    };
                    Ok(Put::Conflict(found))
                }
                Err(e) => Err(e),
            }
        }
    })
    .await
}

fn item_of(l: &Lease, record_ttl: u64) -> HashMap<String, AttributeValue> {
    HashMap::from([
        (PARTITION_KEY.to_string(), AttributeValue::S(l.key.clone())),
        ("owner".to_string(), AttributeValue::S(l.owner.clone())),
        ("token".to_string(), AttributeValue::N(l.token.to_string())),
        ("rvn".to_string(), AttributeValue::S(l.rvn.clone())),
        (
            "expires_at".to_string(),
            AttributeValue::N(l.expires_at_ms.to_string()),
        ),
        (
            "since".to_string(),
            AttributeValue::N(l.since_ms.to_string()),
        ),
        (
            TTL_ATTRIBUTE.to_string(),
            AttributeValue::N(record_ttl.to_string()),
        ),
    ])
}

/// A record as read; a missing or malformed attribute reads as empty or zero (an item bakery
/// did not write is then an expired lease with token 0).
fn lease_of(item: &HashMap<String, AttributeValue>) -> Lease {
    let s = |k: &str| {
        item.get(k)
            .and_then(|v| v.as_s().ok())
            .cloned()
            .unwrap_or_default()
    };
    let n = |k: &str| {
        item.get(k)
            .and_then(|v| v.as_n().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or_default()
    };
    Lease {
        key: s(PARTITION_KEY),
        owner: s("owner"),
        token: n("token"),
        rvn: s("rvn"),
        expires_at_ms: n("expires_at"),
        since_ms: n("since"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_reads_back_as_written() {
        let l = Lease {
            key: "rollout#us-east-1#web".into(),
            owner: "ci-1:200".into(),
            token: 12,
            rvn: "abc".into(),
            expires_at_ms: 1_800_000_010_000,
            since_ms: 1_800_000_000_000,
        };
        let item = item_of(&l, 1_800_086_410);
        assert_eq!(lease_of(&item), l);
        assert_eq!(
            item.get("ttl"),
            Some(&AttributeValue::N("1800086410".into()))
        );
    }
}
