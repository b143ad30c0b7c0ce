//! The undo stack of a bake: every temporary resource is recorded *before* the call that makes
//! it, and released in reverse order on success, on error and on SIGINT/SIGTERM. Records name
//! resources by what bakery chose (key-pair name, group name, build-id tag), not only by the id
//! AWS returns, so a resource whose create call was interrupted mid-flight is still found.

use std::time::Duration;

use crate::aws::{ec2, AwsError};
use crate::output::{Event, Reporter};
use crate::wait::{self, Poll, Probe};

pub use bakery_core::marks::BUILD_ID_TAG;

/// How long cleanup waits for an instance to terminate before deleting its security group.
const TERMINATE_TIMEOUT: Duration = Duration::from_secs(10 * 60);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Temp {
    KeyPair {
        name: String,
    },
    SecurityGroup {
        name: String,
        vpc_id: String,
        id: Option<String>,
    },
    /// Every instance tagged with this build id.
    Instances {
        build_id: String,
    },
    /// Every AMI (and its snapshots) tagged with this build id: removed unless the bake succeeded.
    Images {
        build_id: String,
    },
}

impl Temp {
    pub fn kind(&self) -> &'static str {
        match self {
            Temp::KeyPair { .. } => "key pair",
            Temp::SecurityGroup { .. } => "security group",
            Temp::Instances { .. } => "instance",
            Temp::Images { .. } => "image",
        }
    }

    pub fn label(&self) -> String {
        match self {
            Temp::KeyPair { name } => name.clone(),
            Temp::SecurityGroup { name, id, .. } => id.clone().unwrap_or_else(|| name.clone()),
            Temp::Instances { build_id } | Temp::Images { build_id } => {
                format!("tagged {BUILD_ID_TAG}={build_id}")
            }
        }
    }

    /// The command that removes it by hand, printed when the user keeps resources.
    pub fn removal_hint(&self, region: &str) -> String {
        match self {
            Temp::KeyPair { name } => {
                format!("aws ec2 delete-key-pair --region {region} --key-name {name}")
            }
            Temp::SecurityGroup { name, id, vpc_id } => match id {
                Some(id) => format!("aws ec2 delete-security-group --region {region} --group-id {id}"),
                None => format!(
                    "aws ec2 delete-security-group --region {region} --group-id $(aws ec2 describe-security-groups --region {region} --filters Name=group-name,Values={name} Name=vpc-id,Values={vpc_id} --query 'SecurityGroups[0].GroupId' --output text)"
                ),
            },
            Temp::Instances { build_id } => format!(
                "aws ec2 terminate-instances --region {region} --instance-ids $(aws ec2 describe-instances --region {region} --filters Name=tag:{BUILD_ID_TAG},Values={build_id} --query 'Reservations[].Instances[].InstanceId' --output text)"
            ),
            Temp::Images { build_id } => format!(
                "aws ec2 deregister-image --region {region} --image-id $(aws ec2 describe-images --region {region} --owners self --filters Name=tag:{BUILD_ID_TAG},Values={build_id} --query 'Images[0].ImageId' --output text)"
            ),
        }
    }
}

#[derive(Debug, Default)]
pub struct UndoStack {
    items: Vec<Temp>,
}

/// A cleanup step that failed; reported after the original error.
#[derive(Debug, Clone)]
pub struct CleanupFailure {
    pub kind: &'static str,
    pub id: String,
    pub error: String,
}

impl UndoStack {
    pub fn push(&mut self, t: Temp) {
        self.items.push(t);
    }

    /// Records the id AWS gave a security group pushed by name.
    pub fn set_group_id(&mut self, group_name: &str, group_id: &str) {
        for t in &mut self.items {
            if let Temp::SecurityGroup { name, id, .. } = t {
                if name == group_name {
                    *id = Some(group_id.to_string());
                }
            }
        }
    }

    /// Drops the record of the images: the bake succeeded and the AMI is the product.
    pub fn keep_images(&mut self) {
        self.items.retain(|t| !matches!(t, Temp::Images { .. }));
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    pub fn items(&self) -> &[Temp] {
        &self.items
    }

    /// Takes the most recent record, to release it.
    pub fn pop(&mut self) -> Option<Temp> {
        self.items.pop()
    }

    /// The most recent record, left in place.
    /// The newest temporary that is not an image (images stay until the bake is complete).
    pub fn last_temporary(&self) -> Option<&Temp> {
        self.items
            .iter()
            .rev()
            .find(|t| !matches!(t, Temp::Images { .. }))
    }

    pub fn last(&self) -> Option<&Temp> {
        self.items.last()
    }

    /// Drops a record once its resource is released.
    pub fn forget(&mut self, t: &Temp) {
        if let Some(i) = self.items.iter().rposition(|x| x == t) {
            self.items.remove(i);
        }
    }
}

/// Releases one temporary resource. Idempotent: a resource already gone is success.
pub async fn release(
    client: &aws_sdk_ec2::Client,
    t: &Temp,
    reporter: &Reporter,
) -> Result<(), AwsError> {
    match t {
        Temp::KeyPair { name } => {
            ec2::delete_key_pair(client, name).await?;
            reporter.emit(Event::ResourceReleased {
                kind: t.kind().into(),
                id: name.clone(),
            });
        }
        Temp::SecurityGroup { name, vpc_id, id } => {
            let id = match id {
                Some(id) => Some(id.clone()),
                None => ec2::security_group_named(client, name, vpc_id).await?,
            };
            if let Some(id) = id {
                delete_group_when_free(client, &id).await?;
                reporter.emit(Event::ResourceReleased {
                    kind: t.kind().into(),
                    id,
                });
            }
        }
        Temp::Instances { build_id } => {
            let found = ec2::instances_tagged(client, BUILD_ID_TAG, build_id).await?;
            let ids: Vec<String> = found.iter().map(|i| i.id.clone()).collect();
            ec2::terminate_instances(client, &ids).await?;
            for id in &ids {
                wait_terminated(client, id).await?;
                reporter.emit(Event::ResourceReleased {
                    kind: t.kind().into(),
                    id: id.clone(),
                });
            }
        }
        Temp::Images { build_id } => {
            for image in ec2::images_tagged(client, BUILD_ID_TAG, build_id).await? {
                ec2::delete_image(client, &image).await?;
                reporter.emit(Event::ResourceReleased {
                    kind: t.kind().into(),
                    id: image.id.clone(),
                });
            }
        }
    }
    Ok(())
}

async fn wait_terminated(client: &aws_sdk_ec2::Client, id: &str) -> Result<(), AwsError> {
    let r = wait::until(
        format!("instance {id} to terminate"),
        TERMINATE_TIMEOUT,
        Poll::API,
        || async {
            Ok(match ec2::describe_instance(client, id).await? {
                None => Probe::Ready(()),
                Some(i) if i.state == "terminated" => Probe::Ready(()),
                Some(i) => Probe::Pending(i.state),
            })
        },
    )
    .await;
    r.map_err(|e| match e {
        wait::WaitError::Failed(e) => e,
        timeout => AwsError {
            action: "ec2:TerminateInstances",
            resource: id.to_string(),
            code: None,
            message: timeout.to_string(),
            transient: false,
        },
    })
}

/// A group cannot be deleted while a terminating instance still uses it
/// (`DependencyViolation`); retry that until the instance is gone.
async fn delete_group_when_free(client: &aws_sdk_ec2::Client, id: &str) -> Result<(), AwsError> {
    let r = wait::until(
        format!("security group {id} to be free"),
        TERMINATE_TIMEOUT,
        Poll::API,
        || async {
            match ec2::delete_security_group(client, id).await {
                Ok(()) => Ok(Probe::Ready(())),
                Err(e) if e.code() == Some("DependencyViolation") => {
                    Ok(Probe::Pending("still in use".into()))
                }
                Err(e) => Err(e),
            }
        },
    )
    .await;
    r.map_err(|e| match e {
        wait::WaitError::Failed(e) => e,
        timeout => AwsError {
            action: "ec2:DeleteSecurityGroup",
            resource: id.to_string(),
            code: Some("DependencyViolation".into()),
            message: timeout.to_string(),
            transient: false,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn releases_in_reverse_order_and_keeps_the_image_on_success() {
        let mut s = UndoStack::default();
        s.push(Temp::KeyPair { name: "k".into() });
        s.push(Temp::SecurityGroup {
            name: "g".into(),
            vpc_id: "vpc-1".into(),
            id: None,
        });
        s.push(Temp::Instances {
            build_id: "b".into(),
        });
        s.push(Temp::Images {
            build_id: "b".into(),
        });
        s.set_group_id("g", "sg-1");
        s.keep_images();
        let order: Vec<String> = std::iter::from_fn(|| s.pop()).map(|t| t.label()).collect();
        assert_eq!(order, vec!["tagged bakery:build-id=b", "sg-1", "k"]);
    }

    #[test]
    fn a_record_is_forgotten_only_after_its_release() {
        let mut s = UndoStack::default();
        s.push(Temp::KeyPair { name: "k".into() });
        s.push(Temp::Instances {
            build_id: "b".into(),
        });
        let last = s.last().cloned().unwrap();
        assert_eq!(s.items().len(), 2, "looking does not remove");
        s.forget(&last);
        assert_eq!(s.items(), [Temp::KeyPair { name: "k".into() }]);
    }

    #[test]
    fn removal_hints_name_the_resource() {
        let t = Temp::SecurityGroup {
            name: "g".into(),
            vpc_id: "vpc-1".into(),
            id: Some("sg-9".into()),
        };
        assert!(t.removal_hint("us-east-1").contains("--group-id sg-9"));
    }
}
