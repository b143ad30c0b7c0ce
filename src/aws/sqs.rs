//! Thin typed wrappers over the SQS calls of the daemon's fleet events (`[events] queue_url`):
//! the queue checked at start, messages received by long poll, deleted once handled, or made
//! visible again at once for another daemon (the owner of the instance's group).

use aws_sdk_sqs::types::QueueAttributeName;
use aws_sdk_sqs::Client;

use super::{call, AwsError};

/// One message: its body (the event JSON) and the handle that deletes or releases it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub body: String,
    pub receipt: String,
}

/// Whether `code` says the queue does not exist (SQS's JSON protocol answers
/// `QueueDoesNotExist`; its query-compatible code is `AWS.SimpleQueueService.NonExistentQueue`).
pub fn is_missing_queue(code: Option<&str>) -> bool {
    matches!(
        code,
        Some("QueueDoesNotExist" | "AWS.SimpleQueueService.NonExistentQueue")
    )
}

/// The queue's ARN: asking for it checks that the queue exists and can be read.
pub async fn check(sqs: &Client, url: &str) -> Result<String, AwsError> {
    let out = call("sqs:GetQueueAttributes", url, || {
        sqs.get_queue_attributes()
            .queue_url(url)
            .attribute_names(QueueAttributeName::QueueArn)
            .send()
    })
    .await?;
    Ok(out
        .attributes()
        .and_then(|a| a.get(&QueueAttributeName::QueueArn))
        .cloned()
        .unwrap_or_default())
}

/// Up to `max` messages, waiting up to `wait_s` seconds for the first (long poll).
pub async fn receive(
    sqs: &Client,
    url: &str,
    wait_s: i32,
    max: i32,
) -> Result<Vec<Message>, AwsError> {
    let out = call("sqs:ReceiveMessage", url, || {
        sqs.receive_message()
            .queue_url(url)
            .wait_time_seconds(wait_s)
            .max_number_of_messages(max)
            .send()
    })
    .await?;
    Ok(out
        .messages()
        .iter()
        .filter_map(|m| {
            Some(Message {
                body: m.body()?.to_string(),
                receipt: m.receipt_handle()?.to_string(),
            })
        })
        .collect())
}

pub async fn delete(sqs: &Client, url: &str, receipt: &str) -> Result<(), AwsError> {
    call("sqs:DeleteMessage", url, || {
        sqs.delete_message()
            .queue_url(url)
            .receipt_handle(receipt)
            .send()
    })
    .await?;
    Ok(())
}

/// Makes the message visible again at once (another daemon owns its instance's group).
pub async fn release(sqs: &Client, url: &str, receipt: &str) -> Result<(), AwsError> {
    call("sqs:ChangeMessageVisibility", url, || {
        sqs.change_message_visibility()
            .queue_url(url)
            .receipt_handle(receipt)
            .visibility_timeout(0)
            .send()
    })
    .await?;
    Ok(())
}
