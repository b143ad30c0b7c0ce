//! Groups shared among several daemons through the `[lease]` table: this daemon's membership,
//! the leases of the groups the assignment gives it, and the guard before every mutating call.
//!
//! The decisions are [`bakery_core::membership`]'s (who is alive, which groups are whose:
//! rendezvous hashing) and [`bakery_core::lease`]'s (who may take a lease); the leases are
//! [`crate::lease`]'s keepers, the fence of fenced rollouts. Each round [`Sharing::refresh`]
//! renews the membership (taking it again after it lapsed), reads the members (one `Scan`),
//! releases the groups assigned elsewhere and takes the ones assigned here. [`Sharing::guard`]
//! renews a group's lease at once (a conditional write carrying its fencing token) and returns
//! the fence the mutating call runs in: a daemon that lost its lease (paused, cut off, its
//! membership lapsed) makes no further mutating call for the group.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bakery_core::daemon_config::LeaseSettings;
use bakery_core::lease::Timing;
use bakery_core::membership;
use tokio::time::Instant;

use crate::aws::Aws;
use crate::lease::{describe_loss, Fence, Keeper, LeaseError, Store};

/// What a round's [`Sharing::refresh`] found.
#[derive(Debug, Clone, Default)]
pub struct Ownership {
    /// The groups whose leases this daemon holds now: the ones it acts on.
    pub owned: BTreeSet<String>,
    /// This daemon's own membership is valid.
    pub member: bool,
    /// Live members, this daemon included when its membership is valid.
    pub live: usize,
}

/// The figures `/metrics` exports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Figures {
    pub renewals: u64,
    pub failures: u64,
    pub takeovers: u64,
}

/// A group lease taken, with the owner it was taken over from; or why it was not.
type Taken = Result<(Keeper, Option<String>), LeaseError>;

#[derive(Default)]
struct State {
    member: Option<Keeper>,
    groups: BTreeMap<String, Arc<Keeper>>,
    /// Renewals of keepers already dropped, so that the totals only grow.
    retired: (u64, u64),
}

impl State {
    fn retire(&mut self, k: &Keeper) {
        let (r, f) = k.renewals();
        self.retired.0 += r;
        self.retired.1 += f;
    }
}

/// This daemon's part in the shared lease table.
pub struct Sharing {
    store: Store,
    region: String,
    /// `host:pid`: the member's name and every lease's owner.
    me: String,
    timing: Timing,
    state: tokio::sync::Mutex<State>,
    takeovers: AtomicU64,
}

/// The groups a guard let through, the ones it refused (and why), and the fence for the call.
pub struct Guarded {
    pub ok: Vec<String>,
    pub refused: Vec<(String, String)>,
    pub fence: Fence,
}

fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or_default()
}

impl Sharing {
    /// Opens the lease table (it must exist with the lease key schema: the error names the
    /// expected one) and takes this daemon's membership.
    pub async fn open(aws: &Aws, settings: &LeaseSettings) -> Result<Sharing, LeaseError> {
        let store = Store::open(aws, &settings.table).await?;
        let s = Sharing {
            store,
            region: aws.region.clone(),
            me: crate::host::owner(),
            timing: membership::timing(settings.ttl),
            state: tokio::sync::Mutex::new(State::default()),
            takeovers: AtomicU64::new(0),
        };
        let mut st = s.state.lock().await;
        s.ensure_member(&mut st).await;
        drop(st);
        Ok(s)
    }

    pub fn table(&self) -> &str {
        self.store.table()
    }

    pub fn me(&self) -> &str {
        &self.me
    }

    /// The membership, taken (again) when there is none or it lapsed.
    async fn ensure_member(&self, st: &mut State) -> bool {
        if let Some(m) = &st.member {
            match m.check() {
                Ok(()) => return true,
                Err(lost) => {
                    tracing::warn!(table = %self.table(), now_held_by = %describe_loss(&lost, self.table()), "membership lost: this daemon acts on no group until it is a member again");
                    if let Some(m) = st.member.take() {
                        st.retire(&m);
                    }
                }
            }
        }
        let key = membership::member_key(&self.region, &self.me);
        match self.store.acquire(&key, &self.me, self.timing).await {
            Ok(k) => {
                tracing::info!(member = %self.me, table = %self.table(), ttl_s = (self.timing.ttl + self.timing.margin).as_secs_f64(), "membership taken");
                st.member = Some(k);
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not take this daemon's membership; trying again next round");
                false
            }
        }
    }

    /// One round's membership and group leases: the groups this daemon acts on now, among
    /// `watched` (every group its configuration selects, as just read).
    pub async fn refresh(&self, watched: &[String]) -> Ownership {
        let mut st = self.state.lock().await;
        let member = self.ensure_member(&mut st).await;
        self.forget_lost(&mut st);
        let records = match self
            .store
            .scan(&membership::member_prefix(&self.region))
            .await
        {
            Ok(r) => r,
            Err(e) => {
                // Without the member list, keep what is held (the leases still fence it).
                tracing::warn!(error = %e, "could not read the members; keeping the groups held");
                return self.ownership(&st, member, 0);
            }
        };
        let live = membership::live_members(&records, &self.me, member, wall_ms(), self.timing);
        let held: BTreeSet<String> = st.groups.keys().cloned().collect();
        let plan = membership::plan(watched, &live, &self.me, &held);
        let mut releases = self.hand_over(&mut st, &plan.release);
        let mut takes = self.start_takes(plan.take);
        while let Some(Ok((g, taken))) = takes.join_next().await {
            self.record_take(&mut st, g, taken);
        }
        while releases.join_next().await.is_some() {}
        self.ownership(&st, member, live.len())
    }

    /// Forgets the leases lost or run out since the last round (the heartbeat stopped).
    fn forget_lost(&self, st: &mut State) {
        let lost: Vec<String> = st
            .groups
            .iter()
            .filter(|(_, k)| k.check().is_err())
            .map(|(g, _)| g.clone())
            .collect();
        for g in lost {
            if let Some(k) = st.groups.remove(&g) {
                let why = k.check().err().map(|l| describe_loss(&l, self.table()));
                tracing::warn!(group = %g, now_held_by = ?why, "group lease lost: no further mutating call for this group");
                st.retire(&k);
            }
        }
    }

    /// Starts releasing the leases of the groups assigned elsewhere now.
    fn hand_over(&self, st: &mut State, release: &[String]) -> tokio::task::JoinSet<()> {
        let mut releases = tokio::task::JoinSet::new();
        for g in release {
            if let Some(k) = st.groups.remove(g) {
                st.retire(&k);
                tracing::info!(group = %g, "handing the group over: it is assigned to another daemon now");
                if let Ok(k) = Arc::try_unwrap(k) {
                    releases.spawn(k.release());
                }
            }
        }
        releases
    }

    /// Starts taking the leases of the groups assigned here; each task answers with the group,
    /// and the lease with the owner it was taken over from (if it ran out in another's hands).
    fn start_takes(&self, take: Vec<String>) -> tokio::task::JoinSet<(String, Taken)> {
        let mut takes = tokio::task::JoinSet::new();
        for g in take {
            let (store, me, timing) = (self.store.clone(), self.me.clone(), self.timing);
            let key = membership::group_key(&self.region, &g);
            takes.spawn(async move {
                let previous = store.read(&key).await;
                let taken = match previous {
                    Ok(ref p) => store.acquire(&key, &me, timing).await.map(|k| {
                        let from = p.as_ref().filter(|r| membership::is_takeover(Some(r), &me));
                        (k, from.map(|r| r.owner.clone()))
                    }),
                    Err(e) => Err(e),
                };
                (g, taken)
            });
        }
        takes
    }

    /// Records the answer of one take: the lease held now, or why not.
    fn record_take(&self, st: &mut State, g: String, taken: Taken) {
        match taken {
            Ok((k, from)) => {
                match &from {
                    Some(from) => {
                        self.takeovers.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(group = %g, previous = %from, token = k.lease().token, "group taken over from a daemon whose lease ran out");
                    }
                    None => {
                        tracing::info!(group = %g, token = k.lease().token, "group lease taken")
                    }
                }
                st.groups.insert(g, Arc::new(k));
            }
            Err(LeaseError::Held { holder }) => {
                tracing::debug!(group = %g, holder = %holder.owner, "the group is assigned here; waiting for its holder to hand it over or its lease to run out");
            }
            Err(e) => {
                tracing::warn!(group = %g, error = %e, "could not take the group's lease; trying again next round")
            }
        }
    }

    fn ownership(&self, st: &State, member: bool, live: usize) -> Ownership {
        Ownership {
            owned: st
                .groups
                .iter()
                .filter(|(_, k)| k.check().is_ok())
                .map(|(g, _)| g.clone())
                .collect(),
            member,
            live,
        }
    }

    /// The guard before a mutating call on `groups`: each group's lease is renewed at once (a
    /// conditional write with its fencing token); the groups whose lease is not this daemon's
    /// any more are refused. The call runs in the returned fence, which ends when the first of
    /// the leases let through runs out.
    pub async fn guard(&self, groups: &[String]) -> Guarded {
        let keepers: Vec<(String, Option<Arc<Keeper>>)> = {
            let st = self.state.lock().await;
            groups
                .iter()
                .map(|g| (g.clone(), st.groups.get(g).cloned()))
                .collect()
        };
        let mut verifies = tokio::task::JoinSet::new();
        let mut refused = Vec::new();
        for (g, k) in keepers {
            match k {
                None => refused.push((g, "this daemon holds no lease of the group".to_string())),
                Some(k) => {
                    verifies.spawn(async move {
                        let r = k.verify().await.map(|_| k.valid_until());
                        (g, r)
                    });
                }
            }
        }
        let mut ok = Vec::new();
        let mut until: Option<Instant> = None;
        while let Some(Ok((g, r))) = verifies.join_next().await {
            match r {
                Ok(Some(v)) => {
                    until = Some(until.map_or(v, |u| u.min(v)));
                    ok.push(g);
                }
                Ok(None) => refused.push((g, "the group's lease ran out".to_string())),
                Err(lost) => refused.push((
                    g,
                    format!(
                        "the group's lease is lost, now held by {}",
                        describe_loss(&lost, self.table())
                    ),
                )),
            }
        }
        ok.sort();
        Guarded {
            ok,
            refused,
            fence: Fence::until(until.unwrap_or_else(Instant::now)),
        }
    }

    /// Until when this daemon's membership is valid, in milliseconds since the epoch on this
    /// machine's clock (0: not a member). The heartbeat renews it meanwhile.
    pub async fn member_until(&self) -> u64 {
        let st = self.state.lock().await;
        let Some(until) = st.member.as_ref().and_then(|m| m.valid_until()) else {
            return 0;
        };
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return 0;
        }
        wall_ms().saturating_add(u64::try_from(left.as_millis()).unwrap_or(u64::MAX))
    }

    pub async fn figures(&self) -> Figures {
        let st = self.state.lock().await;
        let (mut renewals, mut failures) = st.retired;
        for k in st.member.iter().chain(st.groups.values().map(|k| &**k)) {
            let (r, f) = k.renewals();
            renewals += r;
            failures += f;
        }
        Figures {
            renewals,
            failures,
            takeovers: self.takeovers.load(Ordering::Relaxed),
        }
    }

    /// A clean stop: every group lease released (the next owners take them at once), then the
    /// membership, within `limit`.
    pub async fn stop(&self, limit: Duration) {
        let mut st = self.state.lock().await;
        let groups = std::mem::take(&mut st.groups);
        let member = st.member.take();
        drop(st);
        let mut set = tokio::task::JoinSet::new();
        for (_, k) in groups {
            if let Ok(k) = Arc::try_unwrap(k) {
                set.spawn(k.release());
            }
        }
        let all = async {
            while set.join_next().await.is_some() {}
            if let Some(m) = member {
                m.release().await;
            }
        };
        if tokio::time::timeout(limit, all).await.is_err() {
            tracing::warn!("could not release every lease in time; they run out by themselves");
        }
    }
}
