//! The lease store: leases with fencing tokens in a DynamoDB table, so that one process at a time
//! acts on a shared thing (a group's rollout). The decisions (who may take a key, when a holder
//! must stop, what a failed write means) are [`bakery_core::lease`]'s; this module does the I/O.
//!
//! - [`Store::init`] makes the table (`bakery init --lease-table`), [`Store::open`] checks it
//!   before use (exists, right key schema, `ACTIVE`, waiting a bounded time while `CREATING`).
//! - [`Store::acquire`] reads the key's record and writes it conditionally on what it read; of
//!   two racing takers exactly one wins, the other learns who.
//! - A [`Keeper`] holds the lease: a heartbeat renews it every third of its TTL, each
//!   [`Keeper::verify`] (the guard before a mutating call) renews it at once, and a [`Fence`]
//!   abandons a call still running (retrying) when the lease runs out on this process's clock.
//!   Once the lease ran out, or a write found another holder, the keeper writes nothing more.
//! - [`Keeper::release`] ends the lease on a clean stop (the record stays, with its token).

use std::future::Future;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bakery_core::lease::{self as decide, Acquire, Conflict, Lease, Lost, Standing, Timing};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::aws::dynamodb::{self, Put};
use crate::aws::{Aws, AwsError};
use crate::wait::{Poll, Probe, WaitError};

pub use bakery_core::lease::{rollout_key, EXPECTED_SCHEMA};

/// How long `open` waits for a table that is still `CREATING` (DynamoDB takes seconds to a
/// minute for an on-demand table).
pub const TABLE_WAIT: Duration = Duration::from_secs(120);

#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error(
        "lease table {table} does not exist in {region}: create it with \
         `bakery init --lease-table {table}`, or name another table (--lease-table, BAKERY_LEASE_TABLE)"
    )]
    NoTable { table: String, region: String },
    #[error(
        "table {table} in {region} is not a lease table: its key schema is {found}; bakery's lease \
         table needs a {EXPECTED_SCHEMA}. Create one with `bakery init --lease-table NAME` and \
         name it instead"
    )]
    WrongSchema {
        table: String,
        region: String,
        found: String,
    },
    #[error("lease table {table} in {region} is {status}, not ACTIVE (waited {waited:?}); check it in the DynamoDB console")]
    NotActive {
        table: String,
        region: String,
        status: String,
        waited: Duration,
    },
    #[error("{} is held by {} (fencing token {})", holder.key, holder.owner, holder.token)]
    Held { holder: Lease },
    #[error(transparent)]
    Aws(#[from] AwsError),
}

impl crate::wait::Outage for LeaseError {
    fn is_outage(&self) -> bool {
        matches!(self, LeaseError::Aws(e) if e.transient)
    }
}

impl LeaseError {
    /// A mistake the user fixes in the command or the table, as opposed to AWS failing.
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            LeaseError::NoTable { .. }
                | LeaseError::WrongSchema { .. }
                | LeaseError::NotActive { .. }
        )
    }
}

/// What `bakery init --lease-table` did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Init {
    pub table: String,
    pub region: String,
    /// The table was made by this run (else it existed with the right schema).
    pub created: bool,
    /// TTL was turned on by this run.
    pub ttl_enabled: bool,
    /// The TTL attribute as the table has it now (`ttl`, or another one set by someone else).
    pub ttl_attribute: Option<String>,
}

/// An open lease table.
#[derive(Debug, Clone)]
pub struct Store {
    db: aws_sdk_dynamodb::Client,
    table: String,
    region: String,
}

impl Store {
    /// Creates the table if it does not exist (and turns TTL on), waits until it is `ACTIVE`;
    /// changes nothing when it exists with the right schema and TTL. A table of that name with
    /// another key schema is an error naming the expected one.
    pub async fn init(aws: &Aws, table: &str) -> Result<Init, LeaseError> {
        let db = &aws.dynamodb;
        let created = match dynamodb::describe_table(db, table).await? {
            Some(t) => {
                check(&t, table, &aws.region)?;
                false
            }
            None => dynamodb::create_table(db, table).await?,
        };
        let store = Store::open(aws, table).await?;
        let (status, attribute) = dynamodb::ttl_of(db, table).await?;
        let ttl_enabled = match (status.as_str(), attribute.as_deref()) {
            ("ENABLED" | "ENABLING", _) => false,
            _ => {
                dynamodb::enable_ttl(db, table).await?;
                true
            }
        };
        if let Some(other) = attribute
            .as_deref()
            .filter(|a| *a != decide::TTL_ATTRIBUTE && !ttl_enabled)
        {
            tracing::warn!(
                table,
                attribute = other,
                "the table's TTL is on another attribute: old lease records will not be deleted"
            );
        }
        Ok(Init {
            table: store.table,
            region: store.region,
            created,
            ttl_enabled,
            ttl_attribute: if ttl_enabled {
                Some(decide::TTL_ATTRIBUTE.to_string())
            } else {
                attribute
            },
        })
    }

    /// The table, checked: it exists, has the lease schema, and is `ACTIVE` (waiting up to
    /// [`TABLE_WAIT`] while it is being created).
    pub async fn open(aws: &Aws, table: &str) -> Result<Store, LeaseError> {
        let db = aws.dynamodb.clone();
        let region = aws.region.clone();
        let (client, region_name) = (&db, region.as_str());
        let waited = crate::wait::until(
            format!("lease table {table} to be ACTIVE"),
            TABLE_WAIT,
            Poll::API,
            move || async move {
                match dynamodb::describe_table(client, table).await? {
                    None => Err(LeaseError::NoTable {
                        table: table.to_string(),
                        region: region_name.to_string(),
                    }),
                    Some(t) => {
                        check(&t, table, region_name)?;
                        Ok(match t.status.as_str() {
                            "ACTIVE" | "UPDATING" => Probe::Ready(()),
                            other => Probe::Pending(other.to_string()),
                        })
                    }
                }
            },
        )
        .await;
        match waited {
            Ok(()) => Ok(Store {
                db,
                table: table.to_string(),
                region,
            }),
            Err(WaitError::Failed(e)) => Err(e),
            Err(WaitError::Timeout { waited, last, .. }) => Err(LeaseError::NotActive {
                table: table.to_string(),
                region,
                status: last,
                waited,
            }),
        }
    }

    pub fn table(&self) -> &str {
        &self.table
    }

    /// The records whose keys start with `prefix` (a consistent scan: the daemons' member
    /// leases).
    pub async fn scan(&self, prefix: &str) -> Result<Vec<Lease>, LeaseError> {
        Ok(dynamodb::scan_leases(&self.db, &self.table, prefix).await?)
    }

    /// The record of `key`, as it stands.
    pub async fn read(&self, key: &str) -> Result<Option<Lease>, LeaseError> {
        Ok(dynamodb::get_lease(&self.db, &self.table, key).await?)
    }

    /// Takes the lease of `key` for `owner` (`host:pid`) and starts keeping it; refused with
    /// [`LeaseError::Held`] while another live process holds it.
    pub async fn acquire(
        &self,
        key: &str,
        owner: &str,
        timing: Timing,
    ) -> Result<Keeper, LeaseError> {
        let mut read = self.read(key).await?;
        // A take can lose a race only to a writer that changed the record meanwhile; decide
        // again on the record that won (it is held, or, rarely, released again already).
        for _ in 0..3 {
            let sent = mono_ms();
            let decision = decide::acquire(
                key,
                read.as_ref(),
                owner,
                wall_ms(),
                timing,
                new_rvn(),
                crate::host::pid_alive,
            );
            let (write, expect) = match decision {
                Acquire::Held { holder } => return Err(LeaseError::Held { holder }),
                Acquire::Take { write, expect } => (write, expect),
            };
            let put = dynamodb::put_lease(
                &self.db,
                &self.table,
                &write,
                write.record_ttl(wall_ms()),
                &expect,
            )
            .await?;
            let won = match put {
                Put::Written => true,
                Put::Conflict(found) => match decide::conflict(&write, found.as_ref()) {
                    Conflict::OwnWrite => true,
                    Conflict::Lost(Lost::To(winner)) => {
                        read = Some(winner);
                        false
                    }
                    Conflict::Lost(_) => {
                        read = None;
                        false
                    }
                },
            };
            if won {
                tracing::info!(key, token = write.token, table = %self.table, "lease taken");
                return Ok(Keeper::start(self.clone(), write, sent, timing));
            }
        }
        match read {
            Some(holder) => Err(LeaseError::Held { holder }),
            None => Err(LeaseError::Aws(AwsError {
                action: "dynamodb:PutItem",
                resource: key.to_string(),
                code: None,
                message: "the lease record kept changing while taking it".into(),
                transient: true,
            })),
        }
    }
}

fn check(t: &dynamodb::Table, table: &str, region: &str) -> Result<(), LeaseError> {
    decide::check_schema(&t.keys, &t.types).map_err(|found| LeaseError::WrongSchema {
        table: table.to_string(),
        region: region.to_string(),
        found,
    })
}

/// Milliseconds since the epoch, on this machine's clock: what records say.
fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or_default()
}

/// Milliseconds on this process's monotonic clock: how a holder judges its own lease (a
/// wall-clock step cannot lengthen it).
fn mono_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    let start = *START.get_or_init(Instant::now);
    u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX)
}

fn instant_at(ms: u64) -> Instant {
    let now = mono_ms();
    if ms >= now {
        Instant::now() + Duration::from_millis(ms - now)
    } else {
        Instant::now() - Duration::from_millis(now - ms)
    }
}

fn new_rvn() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// What a holder knows of its lease.
#[derive(Debug, Clone)]
enum Status {
    /// Held, and usable until `valid_until` (this process's clock) unless renewed.
    Held {
        lease: Lease,
        valid_until: Instant,
    },
    Lost(Lost),
    Released,
}

struct Holding {
    lease: Lease,
    /// When the last successful write was sent ([`mono_ms`]).
    written_ms: u64,
    ended: Option<Status>,
}

struct Shared {
    store: Store,
    timing: Timing,
    /// Serialises the writes (heartbeat, guard, release): each is conditional on the last.
    holding: tokio::sync::Mutex<Holding>,
    status: watch::Sender<Status>,
    /// Renewals written, and renewals that failed (not answered, or the lease lost).
    renewed: std::sync::atomic::AtomicU64,
    failed: std::sync::atomic::AtomicU64,
}

/// Why a renewal did not happen.
#[derive(Debug)]
pub enum RenewError {
    /// The lease is gone: stop.
    Lost(Lost),
    /// The store did not answer; the lease may still be valid (see [`Keeper::check`]).
    Failed(AwsError),
}

impl Shared {
    fn publish(&self, h: &Holding) {
        let status = match &h.ended {
            Some(s) => s.clone(),
            None => Status::Held {
                lease: h.lease.clone(),
                valid_until: instant_at(valid_until_ms(h.written_ms, self.timing)),
            },
        };
        self.status.send_replace(status);
    }

    /// One conditional renewal, never sent once the lease ran out on this process's clock, and
    /// abandoned when it runs out while the write is being retried.
    async fn renew(&self) -> Result<(), RenewError> {
        let r = self.renew_once().await;
        let counter = if r.is_ok() {
            &self.renewed
        } else {
            &self.failed
        };
        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        r
    }

    async fn renew_once(&self) -> Result<(), RenewError> {
        let mut h = self.holding.lock().await;
        match &h.ended {
            Some(Status::Lost(l)) => return Err(RenewError::Lost(l.clone())),
            Some(_) => return Err(RenewError::Lost(Lost::Expired)),
            None => {}
        }
        let sent = mono_ms();
        let left = match decide::standing(h.written_ms, sent, self.timing) {
            Standing::Expired => return Err(self.lose(&mut h, Lost::Expired)),
            Standing::Valid { left, .. } => left,
        };
        let (next, expect) = decide::renewal(&h.lease, wall_ms(), self.timing, new_rvn());
        let put = dynamodb::put_lease(
            &self.store.db,
            &self.store.table,
            &next,
            next.record_ttl(wall_ms()),
            &expect,
        );
        match tokio::time::timeout(left, put).await {
            Err(_) => Err(self.lose(&mut h, Lost::Expired)),
            Ok(Err(e)) => Err(RenewError::Failed(e)),
            Ok(Ok(put)) => {
                let conflict = match put {
                    Put::Written => Conflict::OwnWrite,
                    Put::Conflict(found) => decide::conflict(&next, found.as_ref()),
                };
                match conflict {
                    Conflict::OwnWrite => {
                        h.lease = next;
                        h.written_ms = sent;
                        self.publish(&h);
                        Ok(())
                    }
                    Conflict::Lost(l) => Err(self.lose(&mut h, l)),
                }
            }
        }
    }

    fn lose(&self, h: &mut Holding, lost: Lost) -> RenewError {
        tracing::warn!(key = %h.lease.key, token = h.lease.token, why = ?lost, "lease lost");
        h.ended = Some(Status::Lost(lost.clone()));
        self.publish(h);
        RenewError::Lost(lost)
    }
}

fn valid_until_ms(written_ms: u64, timing: Timing) -> u64 {
    written_ms
        .saturating_add(u64::try_from(timing.ttl.as_millis()).unwrap_or(u64::MAX))
        .saturating_sub(u64::try_from(timing.margin.as_millis()).unwrap_or(u64::MAX))
}

/// A held lease: renewed in the background every third of its TTL until released, lost or
/// dropped (dropping stops the heartbeat and leaves the lease to run out).
pub struct Keeper {
    shared: Arc<Shared>,
    cancel: CancellationToken,
    heartbeat: Option<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for Keeper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keeper")
            .field("lease", &self.lease())
            .finish()
    }
}

impl Keeper {
    fn start(store: Store, lease: Lease, written_ms: u64, timing: Timing) -> Keeper {
        let holding = Holding {
            lease: lease.clone(),
            written_ms,
            ended: None,
        };
        let (status, _) = watch::channel(Status::Held {
            lease,
            valid_until: instant_at(valid_until_ms(written_ms, timing)),
        });
        let shared = Arc::new(Shared {
            store,
            timing,
            holding: tokio::sync::Mutex::new(holding),
            status,
            renewed: Default::default(),
            failed: Default::default(),
        });
        let cancel = CancellationToken::new();
        let heartbeat = tokio::spawn(heartbeat(shared.clone(), cancel.clone()));
        Keeper {
            shared,
            cancel,
            heartbeat: Some(heartbeat),
        }
    }

    /// The record as last written by this holder.
    pub fn lease(&self) -> Lease {
        match &*self.shared.status.borrow() {
            Status::Held { lease, .. } => lease.clone(),
            _ => Lease {
                key: String::new(),
                owner: String::new(),
                token: 0,
                rvn: String::new(),
                expires_at_ms: 0,
                since_ms: 0,
            },
        }
    }

    pub fn table(&self) -> &str {
        &self.shared.store.table
    }

    /// Whether the lease is still this process's, on its own clock (no call).
    pub fn check(&self) -> Result<(), Lost> {
        match &*self.shared.status.borrow() {
            Status::Held { valid_until, .. } if Instant::now() < *valid_until => Ok(()),
            Status::Held { .. } | Status::Released => Err(Lost::Expired),
            Status::Lost(l) => Err(l.clone()),
        }
    }

    /// The guard before a mutating call: renews the lease with a conditional write carrying
    /// its fencing token, and returns the fence the call runs in. When the store does not
    /// answer, the lease still valid on this process's clock is proof enough (nobody may take
    /// it before it runs out); once it ran out, or another holder is found, it is lost.
    pub async fn verify(&self) -> Result<Fence, Lost> {
        match self.shared.renew().await {
            Ok(()) => {}
            Err(RenewError::Lost(l)) => return Err(l),
            Err(RenewError::Failed(e)) => {
                self.check()?;
                tracing::warn!(error = %e, "could not renew the lease; it is still valid, going on");
            }
        }
        Ok(self.fence())
    }

    /// Until when the lease may be acted on, on this process's clock (`None`: lost or released).
    pub fn valid_until(&self) -> Option<Instant> {
        match &*self.shared.status.borrow() {
            Status::Held { valid_until, .. } => Some(*valid_until),
            _ => None,
        }
    }

    /// Renewals written so far, and renewals that failed (not answered, or the lease lost).
    pub fn renewals(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (
            self.shared.renewed.load(Relaxed),
            self.shared.failed.load(Relaxed),
        )
    }

    /// The fence for calls made now: it ends when the lease is lost or runs out.
    pub fn fence(&self) -> Fence {
        Fence(FenceKind::Lease(self.shared.status.subscribe()))
    }

    /// Ends the lease on a clean stop: stops the heartbeat, then writes the record as released
    /// (conditional on still holding it). A lease already lost or run out is left as it is.
    pub async fn release(mut self) {
        self.cancel.cancel();
        if let Some(h) = self.heartbeat.take() {
            let _ = h.await;
        }
        let shared = &self.shared;
        let mut h = shared.holding.lock().await;
        if h.ended.is_some() {
            return;
        }
        let Standing::Valid { left, .. } = decide::standing(h.written_ms, mono_ms(), shared.timing)
        else {
            return;
        };
        let (released, expect) = decide::release(&h.lease, new_rvn());
        let put = dynamodb::put_lease(
            &shared.store.db,
            &shared.store.table,
            &released,
            released.record_ttl(wall_ms()),
            &expect,
        );
        match tokio::time::timeout(left, put).await {
            Ok(Ok(Put::Written)) => {
                tracing::info!(key = %h.lease.key, token = h.lease.token, "lease released")
            }
            Ok(Ok(Put::Conflict(found))) => {
                if decide::conflict(&released, found.as_ref()) != Conflict::OwnWrite {
                    tracing::warn!(key = %h.lease.key, "lease not released: it was no longer ours");
                }
            }
            Ok(Err(e)) => {
                tracing::warn!(key = %h.lease.key, error = %e, "could not release the lease; it runs out by itself")
            }
            Err(_) => {
                tracing::warn!(key = %h.lease.key, "could not release the lease in time; it runs out by itself")
            }
        }
        h.ended = Some(Status::Released);
        shared.publish(&h);
    }
}

impl Drop for Keeper {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// Renews every third of the TTL; after a failed attempt, again a second later (the lease
/// stays valid for two more thirds less the margin). Ends when cancelled or the lease is lost.
async fn heartbeat(shared: Arc<Shared>, cancel: CancellationToken) {
    loop {
        let wait = {
            let h = shared.holding.lock().await;
            if h.ended.is_some() {
                return;
            }
            match decide::standing(h.written_ms, mono_ms(), shared.timing) {
                Standing::Valid { renew_in, .. } => renew_in,
                Standing::Expired => Duration::ZERO,
            }
        };
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        match shared.renew().await {
            Ok(()) => {}
            Err(RenewError::Lost(_)) => return,
            Err(RenewError::Failed(e)) => {
                tracing::warn!(error = %e, "lease renewal failed; trying again");
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    }
}

/// What a mutating call runs in: it is abandoned (no further attempt is sent) once the lease
/// is lost or runs out, or once its deadline passes.
#[derive(Debug)]
pub struct Fence(FenceKind);

#[derive(Debug)]
enum FenceKind {
    Lease(watch::Receiver<Status>),
    Until(Instant),
}

/// A call abandoned by its [`Fence`].
#[derive(Debug, thiserror::Error)]
pub enum Fenced<E> {
    #[error("the lease ran out or was lost while the call was under way")]
    Lost(Lost),
    #[error(transparent)]
    Call(E),
}

impl Fence {
    /// A fence with a fixed deadline (a lock without a lease: the tag's expiry).
    pub fn until(deadline: Instant) -> Fence {
        Fence(FenceKind::Until(deadline))
    }

    pub async fn run<T, E>(self, call: impl Future<Output = Result<T, E>>) -> Result<T, Fenced<E>> {
        tokio::select! {
            biased;
            r = call => r.map_err(Fenced::Call),
            lost = self.ended() => Err(Fenced::Lost(lost)),
        }
    }

    /// Resolves when the lease is lost or runs out (or the deadline passes).
    async fn ended(self) -> Lost {
        let mut rx = match self.0 {
            FenceKind::Until(deadline) => {
                tokio::time::sleep_until(deadline).await;
                return Lost::Expired;
            }
            FenceKind::Lease(rx) => rx,
        };
        loop {
            let status = rx.borrow_and_update().clone();
            let valid_until = match status {
                Status::Held { valid_until, .. } => valid_until,
                Status::Lost(l) => return l,
                Status::Released => return Lost::Expired,
            };
            tokio::select! {
                _ = tokio::time::sleep_until(valid_until) => {
                    if !rx.has_changed().unwrap_or(false) {
                        return Lost::Expired;
                    }
                }
                changed = rx.changed() => {
                    if changed.is_err() {
                        tokio::time::sleep_until(valid_until).await;
                        return Lost::Expired;
                    }
                }
            }
        }
    }
}

/// Says who has the lease now, for a holder that lost it.
pub fn describe_loss(lost: &Lost, table: &str) -> String {
    match lost {
        Lost::To(l) => format!(
            "{} (fencing token {} in lease table {table})",
            l.owner, l.token
        ),
        Lost::Deleted => format!("nobody: its record was deleted from lease table {table}"),
        Lost::Expired => format!(
            "nobody yet: this run's lease in table {table} ran out before it could renew it"
        ),
    }
}
