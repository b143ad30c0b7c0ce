//! The one place bakery talks to AWS from: client construction (the `aws-config` default chain
//! with the user's region, profile and endpoint overrides) and the single retry policy every
//! call goes through, under the client's own call policy (`budget.rs`). Service-specific
//! wrappers live beside it, one file per service.

pub mod autoscaling;
pub mod budget;
pub mod dynamodb;
pub mod ec2;
pub mod elbv2;
pub mod launch_template;
pub mod references;
pub mod sqs;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_sdk_ec2::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_smithy_types::retry::RetryConfig;
use aws_smithy_types::timeout::TimeoutConfig;
use backon::{ExponentialBuilder, Retryable};

pub use budget::CallPolicy;

/// How the user pointed bakery at AWS (global CLI options).
#[derive(Debug, Clone, Default)]
pub struct Target {
    pub region: Option<String>,
    pub profile: Option<String>,
    pub endpoint_url: Option<String>,
}

/// Clients for every service bakery uses, sharing one configuration, and the call policy
/// (retry budget, token bucket, per-action counts) their calls follow inside [`Aws::scope`].
#[derive(Clone, Debug)]
pub struct Aws {
    pub region: String,
    pub policy: Arc<CallPolicy>,
    pub ec2: aws_sdk_ec2::Client,
    pub ssm: aws_sdk_ssm::Client,
    pub autoscaling: aws_sdk_autoscaling::Client,
    pub elb: aws_sdk_elasticloadbalancingv2::Client,
    pub secrets: aws_sdk_secretsmanager::Client,
    pub rds: aws_sdk_rds::Client,
    pub iam: aws_sdk_iam::Client,
    /// The lease table's service (`crate::lease`).
    pub dynamodb: aws_sdk_dynamodb::Client,
    /// Release gates' alarms.
    pub cloudwatch: aws_sdk_cloudwatch::Client,
    /// The daemon's fleet-events queue.
    pub sqs: aws_sdk_sqs::Client,
    /// AssumeRole for a release target in another account.
    pub sts: aws_sdk_sts::Client,
    /// The configuration these clients were made from (to derive another region's or role's).
    pub config: SdkConfig,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "no AWS region is configured: pass --region, set AWS_REGION, or set `region` in your AWS profile"
    )]
    NoRegion,
}

impl Aws {
    /// Loads the shared configuration: environment, profile (`--profile`), SSO, assume-role and
    /// IMDS, as every AWS tool does. The SDK's own retries are turned off so that [`call`] is the
    /// only retry policy (one budget, one place that logs a retry). An attempt that gets no
    /// answer within [`ATTEMPT_TIMEOUT`] (an endpoint that accepts and never answers) fails
    /// and is retried like any transient error, instead of waiting forever.
    pub async fn connect(target: &Target) -> Result<Self, ConfigError> {
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .retry_config(RetryConfig::disabled())
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(5))
                    .operation_attempt_timeout(ATTEMPT_TIMEOUT)
                    .build(),
            );
        if let Some(region) = &target.region {
            loader = loader.region(Region::new(region.clone()));
        }
        if let Some(profile) = &target.profile {
            loader = loader.profile_name(profile);
        }
        if let Some(url) = &target.endpoint_url {
            loader = loader.endpoint_url(url);
        }
        Self::from_config(loader.load().await)
    }

    /// Clients for every service from one loaded configuration.
    pub fn from_config(config: SdkConfig) -> Result<Self, ConfigError> {
        let region = config
            .region()
            .map(|r| r.to_string())
            .ok_or(ConfigError::NoRegion)?;
        Ok(Self {
            region,
            policy: Arc::new(CallPolicy::default()),
            ec2: aws_sdk_ec2::Client::new(&config),
            ssm: aws_sdk_ssm::Client::new(&config),
            autoscaling: aws_sdk_autoscaling::Client::new(&config),
            elb: aws_sdk_elasticloadbalancingv2::Client::new(&config),
            secrets: aws_sdk_secretsmanager::Client::new(&config),
            rds: aws_sdk_rds::Client::new(&config),
            iam: aws_sdk_iam::Client::new(&config),
            dynamodb: aws_sdk_dynamodb::Client::new(&config),
            cloudwatch: aws_sdk_cloudwatch::Client::new(&config),
            sqs: aws_sdk_sqs::Client::new(&config),
            sts: aws_sdk_sts::Client::new(&config),
            config,
        })
    }

    /// The same clients under another call policy (the daemon's own budget).
    pub fn with_policy(&self, policy: Arc<CallPolicy>) -> Self {
        Self {
            policy,
            ..self.clone()
        }
    }

    /// Runs `f` with this client's call policy governing every call made in it (tasks it
    /// spawns need their own scope).
    pub async fn scope<F: Future>(&self, f: F) -> F::Output {
        budget::scope(self.policy.clone(), f).await
    }
}

/// A failed AWS call, after retries: what was attempted, on what, and AWS's own code.
#[derive(Debug, thiserror::Error)]
#[error("{action} ({resource}) failed: {message}")]
pub struct AwsError {
    pub action: &'static str,
    pub resource: String,
    /// The AWS error code (`InvalidAMIID.NotFound`, ...), when the service answered with one.
    pub code: Option<String>,
    pub message: String,
    /// The call failed for want of a useful answer (throttled, 5xx, timeout, no connection)
    /// and ran out of retries: the thing asked about may be fine, and asking again later may work.
    pub transient: bool,
}

impl AwsError {
    pub fn code(&self) -> Option<&str> {
        self.code.as_deref()
    }

    /// True when AWS says the thing does not exist (any `*.NotFound` / `*NotFound*` code).
    pub fn is_not_found(&self) -> bool {
        self.code().is_some_and(|c| c.contains("NotFound"))
    }
}

impl crate::wait::Outage for AwsError {
    fn is_outage(&self) -> bool {
        self.transient
    }
}

/// Error codes AWS services use for throttling; retried with backoff.
const THROTTLING_CODES: &[&str] = &[
    "Throttling",
    "ThrottlingException",
    "ThrottledException",
    "RequestThrottledException",
    "TooManyRequestsException",
    "RequestLimitExceeded",
    "RequestThrottled",
    "SlowDown",
    "PriorRequestNotComplete",
    "EC2ThrottledException",
];

/// Error codes that mean "try again" without being throttling.
const TRANSIENT_CODES: &[&str] = &[
    "InternalError",
    "InternalFailure",
    "ServiceUnavailable",
    "Unavailable",
    "RequestTimeout",
    "RequestTimeoutException",
];

fn is_throttling<E: ProvideErrorMetadata, R>(err: &SdkError<E, R>) -> bool {
    err.code().is_some_and(|c| THROTTLING_CODES.contains(&c))
}

/// The retry decision for one failed attempt.
fn is_retryable<E: ProvideErrorMetadata, R>(err: &SdkError<E, R>) -> bool
where
    R: HttpStatus,
{
    match err {
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            true
        }
        SdkError::ServiceError(ctx) => {
            let status = ctx.raw().status_code();
            err.code()
                .is_some_and(|c| THROTTLING_CODES.contains(&c) || TRANSIENT_CODES.contains(&c))
                || (500..600).contains(&status)
        }
        _ => false,
    }
}

/// Access to a raw response's status, so [`is_retryable`] can treat any 5xx as transient.
pub trait HttpStatus {
    fn status_code(&self) -> u16;
}

impl HttpStatus for aws_smithy_runtime_api::http::Response {
    fn status_code(&self) -> u16 {
        self.status().as_u16()
    }
}

/// How long one attempt of a call may go unanswered (CreateImage, the slowest call, answers in
/// seconds).
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(60);

/// The retry policy: jittered exponential backoff from 200 ms, at most 5 s apart, for at most
/// 9 attempts and `retry_budget` of sleeping (30 s by default: long enough to ride out a
/// throttling burst, short enough that a real outage surfaces while the user is still watching;
/// the daemon keeps it within its interval, since its next round asks again anyway and a round
/// must not outlast the watchdog).
fn backoff(retry_budget: Duration) -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(Duration::from_secs(5))
        .with_max_times(8)
        .with_total_delay(Some(retry_budget))
        .with_jitter()
}

/// Runs one AWS call under the retry policy and turns its final error into an [`AwsError`]
/// naming `action` and `resource`. The call follows the policy of the [`Aws::scope`] it runs
/// in: each attempt waits on its token bucket and is counted there.
pub async fn call<T, E, F, Fut>(
    action: &'static str,
    resource: impl Into<String>,
    f: F,
) -> Result<T, AwsError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, SdkError<E, aws_smithy_runtime_api::http::Response>>>,
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let resource = resource.into();
    let policy = budget::current();
    let retry_budget = policy
        .as_ref()
        .map_or(budget::DEFAULT_RETRY_BUDGET, |p| p.retry_budget());
    let mut f = f;
    let attempt = || {
        let fut = f();
        let policy = policy.clone();
        async move {
            if let Some(p) = &policy {
                if !budget::take_prepaid() {
                    p.acquire().await;
                }
            }
            let r = fut.await;
            if let Some(p) = &policy {
                p.record(action, r.as_ref().err().map(is_throttling));
            }
            r
        }
    };
    attempt
        .retry(backoff(retry_budget))
        .sleep(tokio::time::sleep)
        .when(is_retryable)
        .notify(|err, after| {
            tracing::warn!(
                action,
                resource = %resource,
                code = err.code().unwrap_or("-"),
                retry_in_ms = after.as_millis() as u64,
                "AWS call failed; retrying"
            );
        })
        .await
        .map_err(|err| AwsError {
            action,
            resource: resource.clone(),
            code: err.code().map(str::to_string),
            message: match err.message() {
                Some(m) => format!("{}: {m}", err.code().unwrap_or("error")),
                None => DisplayErrorContext(&err).to_string(),
            },
            transient: is_retryable(&err),
        })
}
