//! When each chain is refreshed next, how urgent that is, and the queue that holds it.
//!
//! No loop polls the ledger: every connection has at most one entry in the queue (its next
//! action and that action's urgency), replaced whenever its state changes; the scheduler
//! sleeps until the earliest one.

use crate::config::RefreshConfig;
use crate::model::{Status, Time};
use parking_lot::Mutex;
use std::collections::BTreeSet;
use std::hash::{Hash, Hasher};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Instant;

/// Rotation jitter: a chain is rotated at `rotate_after × (1 ± this)`, so that a ledger
/// imported at once does not rotate at once. Derived from the connection id and the last use,
/// so the planned instant is stable across re-plans.
pub const ROTATION_JITTER: f64 = 0.1;

/// A connection is *hot* when a caller asked for its token within this many access-token
/// lifetimes; hot connections get their access token renewed ahead of expiry so that callers
/// never wait for the provider.
pub const HOT_LIFETIMES: u32 = 2;

/// Hot connections are renewed at least this long before `access_token_margin` is reached:
/// room for the provider's latency, so no caller waits.
pub const MIN_RENEW_LEAD: Duration = Duration::from_secs(1);

/// How urgent a chain's next action is. Refreshes wait for a `max_concurrent` permit in this
/// order (then by nearest inactivity deadline), whoever started them: after a downtime, an
/// unknown outcome inside the leeway never waits behind an hour of bulk rotations.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Urgency {
    /// The outcome of an earlier attempt is unknown (it must be retried inside the reuse
    /// leeway), or a rotated token waits for its commit.
    Recover,
    /// A caller waits for a token, or a hot connection's access token nears its margin.
    Renew,
    /// A refresh token is due for rotation.
    Rotate,
}

/// What the planner needs to know of a chain beyond its record.
pub struct PlanInput<'a> {
    /// What it needs of the committed record.
    pub facts: ChainFacts<'a>,
    /// No provider call before this (backoff or `Retry-After`).
    pub not_before: Option<Instant>,
    /// A chain change waits for its commit.
    pub held: bool,
    /// When a caller last asked for a token.
    pub last_requested: Option<Instant>,
}

/// What the planner (and the cached token path's `satisfies`) needs of a chain, read from
/// the engine's packed record or from a [`Record`] alike: a few fields, not a record.
#[derive(Clone, Copy, Debug)]
pub struct ChainFacts<'a> {
    /// The connection id (the rotation jitter's seed).
    pub id: &'a str,
    /// The status.
    pub status: Status,
    /// When the refresh token was last used.
    pub used_at: Time,
    /// Whether an attempt marker is set.
    pub marked: bool,
    /// The access token's expiry, if there is one.
    pub access_expires_at: Option<Time>,
    /// When the last refresh succeeded.
    pub last_refresh_at: Option<Time>,
}

impl<'a> ChainFacts<'a> {
    /// The facts of a record.
    pub fn of(rec: &'a crate::model::Record) -> ChainFacts<'a> {
        ChainFacts {
            id: &rec.conn.id,
            status: rec.conn.status,
            used_at: rec.chain.used_at,
            marked: rec.chain.attempt_started_at.is_some(),
            access_expires_at: rec.chain.access.as_ref().map(|a| a.expires_at),
            last_refresh_at: rec.conn.last_refresh_at,
        }
    }
}

/// A connection's next planned action: when, and how urgent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Planned {
    /// When the action is due.
    pub at: Instant,
    /// Its place in the permit order.
    pub urgency: Urgency,
}

/// A connection whose planned instant has come ([`Planner::take_due`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Due {
    /// The connection's slot handle (`refresh::Handle`).
    pub handle: u32,
    /// The urgency it was planned with.
    pub urgency: Urgency,
}

/// The earliest instant at which a connection needs an action and how urgent it is, or
/// `None` when it needs none (a `needs_reauth` chain is never retried automatically).
pub fn next_action(
    input: &PlanInput<'_>,
    settings: &RefreshConfig,
    now_w: Time,
    commit_retry: Duration,
) -> Option<Planned> {
    let now_i = Instant::now();
    let rec = &input.facts;
    if input.held {
        return Some(Planned {
            at: now_i + commit_retry,
            urgency: Urgency::Recover,
        });
    }
    if rec.marked {
        // An unknown outcome is resolved first, whatever the status: the same token must be
        // presented again inside the leeway.
        return Some(Planned {
            at: input.not_before.map_or(now_i, |nb| nb.max(now_i)),
            urgency: Urgency::Recover,
        });
    }
    if rec.status == Status::NeedsReauth {
        return None;
    }
    let at_wall = |t: Time| now_i + (t - now_w).to_std().unwrap_or(Duration::ZERO);
    let factor = jitter_factor(rec.id, rec.used_at);
    let rotate_in = settings.rotate_after.mul_f64(factor);
    let mut due = (
        at_wall(
            rec.used_at + chrono::Duration::from_std(rotate_in).unwrap_or(chrono::Duration::MAX),
        ),
        Urgency::Rotate,
    );
    if let (true, Some(expires_at), Some(refreshed)) = (
        is_hot(
            rec.access_expires_at,
            rec.last_refresh_at,
            input.last_requested,
        ),
        rec.access_expires_at,
        rec.last_refresh_at,
    ) {
        let lifetime = (expires_at - refreshed).to_std().unwrap_or(Duration::ZERO);
        // Renew a little before the margin is reached, so that the refresh has finished
        // (callers asking for `margin` of validity are still served from cache while it
        // runs); but with at least a third of the token's life used, so a margin longer
        // than the lifetime cannot renew without end.
        let lead = (settings.access_token_margin / 2).max(MIN_RENEW_LEAD);
        let margin = (settings.access_token_margin + lead).min(lifetime * 2 / 3);
        let renew = at_wall(
            expires_at - chrono::Duration::from_std(margin).unwrap_or(chrono::Duration::MAX),
        );
        if renew < due.0 {
            due = (renew, due.1.min(Urgency::Renew));
        }
    }
    let (at, urgency) = match input.not_before {
        Some(nb) if nb > due.0 => (nb, due.1),
        _ => due,
    };
    Some(Planned { at, urgency })
}

/// Whether a caller asked for this connection's token within [`HOT_LIFETIMES`] access-token
/// lifetimes (the access token's lifetime: from the last refresh to its expiry).
pub fn is_hot(
    access_expires_at: Option<Time>,
    last_refresh_at: Option<Time>,
    last_requested: Option<Instant>,
) -> bool {
    let (Some(asked), Some(expires_at), Some(refreshed)) =
        (last_requested, access_expires_at, last_refresh_at)
    else {
        return false;
    };
    let lifetime = (expires_at - refreshed).to_std().unwrap_or(Duration::ZERO);
    !lifetime.is_zero() && asked.elapsed() < lifetime * HOT_LIFETIMES
}

/// A stable factor in `[1 - ROTATION_JITTER, 1 + ROTATION_JITTER]` for one use of a token.
fn jitter_factor(id: &str, used_at: Time) -> f64 {
    let mut h = std::hash::DefaultHasher::new();
    id.hash(&mut h);
    used_at.timestamp_millis().hash(&mut h);
    let unit = (h.finish() % 10_000) as f64 / 10_000.0;
    1.0 - ROTATION_JITTER + 2.0 * ROTATION_JITTER * unit
}

/// The planner's state: both views of the same entries, changed together under one lock.
/// A connection is named by its slot handle (`refresh::Handle`, a small number given at
/// install), not its id: 24 bytes an entry in `order` and in `current`, no allocation (an id
/// in each, shared, was about 220 bytes a connection with the maps' room at the scale
/// bench's 100,000). The engine cancels a connection's plan before its handle is freed, so a
/// handle here always names the slot that planned it.
#[derive(Default)]
struct Queue {
    /// Ordered by instant, then urgency: exactly one entry per planned connection.
    order: BTreeSet<(Instant, Urgency, u32)>,
    /// Each planned connection's entry in `order`, by handle (`None`: not planned): a
    /// re-plan finds and replaces the old entry (one per chain, however often it is
    /// re-planned), and `next_of` answers the API's `next_rotation_at` without walking the
    /// queue. Indexed, not hashed: handles are dense.
    current: Vec<Option<(Instant, Urgency)>>,
}

impl Queue {
    /// The entry of `handle`, if planned.
    fn get(&self, handle: u32) -> Option<(Instant, Urgency)> {
        self.current.get(handle as usize).copied().flatten()
    }

    /// Takes the entry of `handle` out, if planned.
    fn take(&mut self, handle: u32) -> Option<(Instant, Urgency)> {
        self.current.get_mut(handle as usize).and_then(Option::take)
    }

    /// Sets the entry of `handle`; returns the one it replaces.
    fn put(&mut self, handle: u32, entry: (Instant, Urgency)) -> Option<(Instant, Urgency)> {
        let at = handle as usize;
        if self.current.len() <= at {
            self.current.resize(at + 1, None);
        }
        self.current[at].replace(entry)
    }
}

/// The timer queue: one planned action per connection.
pub struct Planner {
    /// The entries. A blocking (parking_lot) mutex: every operation is a few map updates,
    /// never held across an await.
    queue: Mutex<Queue>,
    /// Wakes the scheduler loop when an entry is planned, so one planned earlier than its
    /// current sleep (a new import, a hot connection, a retry) is not left waiting for the
    /// heartbeat.
    notify: Notify,
}

impl Planner {
    /// An empty queue.
    pub fn new() -> Planner {
        Planner {
            queue: Mutex::new(Queue::default()),
            notify: Notify::new(),
        }
    }

    fn lock(&self) -> parking_lot::MutexGuard<'_, Queue> {
        self.queue.lock()
    }

    /// Room for `n` more planned connections (a load's).
    pub fn reserve(&self, n: usize) {
        self.lock().current.reserve(n);
    }

    /// Plans (or re-plans) connection `handle`, replacing its earlier entry.
    pub fn schedule(&self, handle: u32, at: Instant, urgency: Urgency) {
        let mut q = self.lock();
        if let Some((old_at, old_u)) = q.put(handle, (at, urgency)) {
            if (old_at, old_u) == (at, urgency) {
                return;
            }
            q.order.remove(&(old_at, old_u, handle));
        }
        q.order.insert((at, urgency, handle));
        drop(q);
        self.notify.notify_one();
    }

    /// Forgets a connection's plan.
    pub fn cancel(&self, handle: u32) {
        let mut q = self.lock();
        if let Some((at, u)) = q.take(handle) {
            q.order.remove(&(at, u, handle));
        }
    }

    /// The earliest planned instant.
    pub fn next_due(&self) -> Option<Instant> {
        self.lock().order.first().map(|(at, _, _)| *at)
    }

    /// Removes and returns every connection whose instant has come, with its urgency.
    pub fn take_due(&self, now: Instant) -> Vec<Due> {
        let mut q = self.lock();
        let mut out = Vec::new();
        while let Some((at, _, _)) = q.order.first() {
            if *at > now {
                break;
            }
            let (_, u, handle) = q.order.pop_first().expect("peeked");
            q.take(handle);
            out.push(Due { handle, urgency: u });
        }
        out
    }

    /// The planned instant of a connection, if it has one.
    pub fn next_of(&self, handle: u32) -> Option<Planned> {
        self.lock()
            .get(handle)
            .map(|(at, urgency)| Planned { at, urgency })
    }

    /// How many connections are planned (one entry each).
    #[cfg(test)]
    pub fn len(&self) -> usize {
        let q = self.lock();
        let planned = q.current.iter().flatten().count();
        debug_assert_eq!(q.order.len(), planned);
        planned
    }

    /// Whether nothing is planned.
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Resolves when the plan changed.
    pub async fn changed(&self) {
        self.notify.notified().await
    }
}

impl Default for Planner {
    fn default() -> Self {
        Planner::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;

    #[tokio::test(start_paused = true)]
    async fn one_entry_per_connection_and_replanning_replaces_it() {
        let p = Planner::new();
        let t0 = Instant::now();
        let (a, b, c) = (0, 1, 7);
        p.schedule(a, t0 + Duration::from_secs(10), Urgency::Rotate);
        p.schedule(b, t0 + Duration::from_secs(5), Urgency::Rotate);
        p.schedule(a, t0 + Duration::from_secs(1), Urgency::Recover);
        assert_eq!(p.len(), 2, "a replan replaces, it does not add");
        assert_eq!(p.next_due(), Some(t0 + Duration::from_secs(1)));
        tokio::time::advance(Duration::from_secs(6)).await;
        assert_eq!(
            p.take_due(Instant::now()),
            vec![
                Due {
                    handle: a,
                    urgency: Urgency::Recover
                },
                Due {
                    handle: b,
                    urgency: Urgency::Rotate
                }
            ]
        );
        assert_eq!(p.next_due(), None, "the old 10 s entry of a is gone");
        p.schedule(c, Instant::now(), Urgency::Renew);
        assert_eq!(p.len(), 1);
        p.cancel(c);
        assert!(p.is_empty());
        assert!(
            p.take_due(Instant::now() + Duration::from_secs(100))
                .is_empty()
        );
    }

    #[test]
    fn urgency_orders_recovery_first() {
        assert!(Urgency::Recover < Urgency::Renew && Urgency::Renew < Urgency::Rotate);
    }

    #[test]
    fn jitter_is_stable_and_bounded() {
        let t = Utc::now();
        let a = jitter_factor("c1", t);
        assert_eq!(a, jitter_factor("c1", t));
        let spread: std::collections::HashSet<u64> = (0..100)
            .map(|i| (jitter_factor(&format!("c{i}"), t) * 1000.0) as u64)
            .collect();
        assert!(spread.len() > 20);
        for i in 0..1000 {
            let f = jitter_factor(&format!("x{i}"), t);
            assert!((0.9..=1.1).contains(&f), "{f}");
        }
    }
}
