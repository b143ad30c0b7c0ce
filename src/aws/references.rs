//! Resolves a recipe's `secret:` and `rds:` references, once per bake: Secrets Manager values
//! (optionally one key of a JSON secret, optionally a version stage) and RDS endpoints. Every
//! secret value is registered with the [`Redactor`] before anything can print it; error messages
//! name the secret and the key, never a value.

use std::collections::{BTreeMap, BTreeSet};

use super::{call, Aws, AwsError};
use crate::recipe::template::{parse_reference, RdsField, Reference};
use crate::secret::Redactor;

#[derive(Debug, thiserror::Error)]
pub enum ReferenceError {
    #[error("secret {id}: not found in this region (check the name or ARN, and that the caller may read it)")]
    SecretNotFound { id: String },
    #[error("secret {id} holds no string value (binary secrets cannot be used in a recipe)")]
    NotAString { id: String },
    #[error("secret {id} is not a JSON object, so `#{key}` cannot select from it; drop `#{key}` to use the whole value")]
    NotJson { id: String, key: String },
    #[error("secret {id} has no key `{key}` (it has: {keys})")]
    NoSuchKey {
        id: String,
        key: String,
        keys: String,
    },
    #[error("RDS instance {0}: not found in this region")]
    DbNotFound(String),
    #[error("RDS instance {0} has no endpoint yet (is it still being created?)")]
    NoEndpoint(String),
    #[error(transparent)]
    Aws(#[from] AwsError),
}

/// Every reference's value by its text, and the redactor that hides the secret ones.
pub async fn resolve(
    aws: &Aws,
    refs: &BTreeSet<String>,
) -> Result<(BTreeMap<String, String>, Redactor), ReferenceError> {
    let mut values = BTreeMap::new();
    let mut redactor = Redactor::default();
    let mut fetched: BTreeMap<(String, Option<String>), String> = BTreeMap::new();
    for text in refs {
        let Ok(r) = parse_reference(text) else {
            continue;
        };
        let value = match r {
            Reference::Secret { id, key, stage } => {
                let whole = match fetched.get(&(id.clone(), stage.clone())) {
                    Some(v) => v.clone(),
                    None => {
                        let v = secret_string(aws, &id, stage.as_deref()).await?;
                        redactor.add(&v);
                        fetched.insert((id.clone(), stage), v.clone());
                        v
                    }
                };
                match key {
                    None => {
                        // The whole secret goes to the provisioner: each value inside a JSON
                        // secret could be printed on its own, so each is hidden too.
                        if let Ok(serde_json::Value::Object(map)) =
                            serde_json::from_str::<serde_json::Value>(&whole)
                        {
                            for val in map.values() {
                                match val {
                                    serde_json::Value::String(s) => redactor.add(s),
                                    other => redactor.add(&other.to_string()),
                                }
                            }
                        }
                        whole
                    }
                    Some(key) => {
                        let Ok(serde_json::Value::Object(map)) =
                            serde_json::from_str::<serde_json::Value>(&whole)
                        else {
                            return Err(ReferenceError::NotJson { id, key });
                        };
                        let value = match map.get(&key) {
                            Some(serde_json::Value::String(s)) => s.clone(),
                            Some(other) => other.to_string(),
                            None => {
                                return Err(ReferenceError::NoSuchKey {
                                    id,
                                    key,
                                    keys: map.keys().cloned().collect::<Vec<_>>().join(", "),
                                })
                            }
                        };
                        redactor.add(&value);
                        value
                    }
                }
            }
            Reference::Rds { instance, field } => rds_value(aws, instance, field).await?,
        };
        values.insert(text.clone(), value);
    }
    Ok((values, redactor))
}

/// The value of `{{rds:INSTANCE.FIELD}}`: the database's engine, address or port.
async fn rds_value(aws: &Aws, instance: String, field: RdsField) -> Result<String, ReferenceError> {
    let rds = &aws.rds;
    let out = call("rds:DescribeDBInstances", &instance, || {
        rds.describe_db_instances()
            .db_instance_identifier(&instance)
            .send()
    })
    .await;
    let out = match out {
        Ok(o) => o,
        Err(e) if e.code() == Some("DBInstanceNotFound") => {
            return Err(ReferenceError::DbNotFound(instance))
        }
        Err(e) => return Err(e.into()),
    };
    let db = out
        .db_instances()
        .first()
        .ok_or_else(|| ReferenceError::DbNotFound(instance.clone()))?;
    Ok(match field {
        RdsField::Engine => db.engine().unwrap_or_default().to_string(),
        RdsField::Address => db
            .endpoint()
            .and_then(|e| e.address())
            .map(str::to_string)
            .ok_or(ReferenceError::NoEndpoint(instance))?,
        RdsField::Port => db
            .endpoint()
            .and_then(|e| e.port())
            .map(|p| p.to_string())
            .ok_or(ReferenceError::NoEndpoint(instance))?,
    })
}

async fn secret_string(aws: &Aws, id: &str, stage: Option<&str>) -> Result<String, ReferenceError> {
    let sm = &aws.secrets;
    let out = call("secretsmanager:GetSecretValue", id, || {
        sm.get_secret_value()
            .secret_id(id)
            .set_version_stage(stage.map(str::to_string))
            .send()
    })
    .await;
    match out {
        Ok(o) => o
            .secret_string()
            .map(str::to_string)
            .ok_or_else(|| ReferenceError::NotAString { id: id.to_string() }),
        Err(e) if e.code() == Some("ResourceNotFoundException") => {
            Err(ReferenceError::SecretNotFound { id: id.to_string() })
        }
        Err(e) => Err(e.into()),
    }
}
