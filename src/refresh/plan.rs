//! When each chain is refreshed next, how urgent that is, and the queue that holds it.
//!
//! No loop polls the ledger: every connection has at most one entry in the queue (its next
//! action and that action's urgency), replaced whenever its state changes; the scheduler
//! sleeps until the earliest one.

use crate::config::RefreshConfig;
use crate::model::{Status, Time};
use parking_lot::Mutex;
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

/// Instants in the queue are nanoseconds from the queue's base, shifted left by this many
/// bits to make room for the urgency below them: one `u64` orders by instant, then urgency.
/// 62 bits of nanoseconds are 146 years, so no planned instant is ever rounded (an instant
/// further out is kept as base + 146 years: later than every other, and never due).
const URGENCY_BITS: u32 = 2;

/// The largest offset from the base the queue keeps, in nanoseconds.
const MAX_OFFSET_NANOS: u64 = u64::MAX >> URGENCY_BITS;

/// `pos` of a handle that is not planned.
const NOT_PLANNED: u32 = 0;

/// The planner's state: a binary min-heap of the planned connections, indexed by handle so
/// that a re-plan or a cancellation finds its entry in O(1) and moves it in O(log n).
/// A connection is named by its slot handle (`refresh::Handle`, a small number given at
/// install), not its id, and an entry is packed into 16 bytes in three dense vectors, no
/// node or allocation of its own: the key (instant and urgency, 8 bytes), the handle (4) and
/// the handle's place in the heap (4). A `BTreeSet<(Instant, Urgency, u32)>` of 24-byte
/// entries in half-full nodes beside a `Vec<Option<(Instant, Urgency)>>` was about 79 bytes a
/// connection at the scale bench's 100,000. The engine cancels a connection's plan before
/// its handle is freed, so a handle here always names the slot that planned it.
struct Queue {
    /// Instant zero of the keys: the queue's creation. Every instant the engine plans is
    /// "now" or later (`next_action` never plans in the past), so none is before it; one
    /// that were would be kept as the base itself, due as soon as anything.
    base: Instant,
    /// The heap's keys: `offset_nanos << URGENCY_BITS | urgency`, so that comparing keys
    /// (then handles) is the order of `(Instant, Urgency, handle)`.
    keys: Vec<u64>,
    /// The heap's handles, beside `keys` (one vector of `(u64, u32)` would pad each entry to
    /// 16 bytes).
    handles: Vec<u32>,
    /// Each handle's place in the heap plus one ([`NOT_PLANNED`]: not planned): a re-plan
    /// finds and replaces the old entry (one per chain, however often it is re-planned), and
    /// `next_of` answers the API's `next_rotation_at` without walking the queue. Indexed,
    /// not hashed: handles are dense.
    pos: Vec<u32>,
}

impl Queue {
    fn new() -> Queue {
        Queue {
            base: Instant::now(),
            keys: Vec::new(),
            handles: Vec::new(),
            pos: Vec::new(),
        }
    }

    /// The key of an entry.
    fn key(&self, at: Instant, urgency: Urgency) -> u64 {
        let nanos = at.saturating_duration_since(self.base).as_nanos();
        let offset = u64::try_from(nanos).map_or(MAX_OFFSET_NANOS, |n| n.min(MAX_OFFSET_NANOS));
        (offset << URGENCY_BITS) | urgency as u64
    }

    /// The entry a key stands for.
    fn entry(&self, key: u64) -> (Instant, Urgency) {
        let urgency = match key & ((1 << URGENCY_BITS) - 1) {
            0 => Urgency::Recover,
            1 => Urgency::Renew,
            _ => Urgency::Rotate,
        };
        (
            self.base + Duration::from_nanos(key >> URGENCY_BITS),
            urgency,
        )
    }

    /// Where `handle` is in the heap, if planned.
    fn place(&self, handle: u32) -> Option<usize> {
        match self.pos.get(handle as usize) {
            Some(&p) if p != NOT_PLANNED => Some(p as usize - 1),
            _ => None,
        }
    }

    /// Whether heap entry `a` comes before entry `b`.
    fn before(&self, a: usize, b: usize) -> bool {
        (self.keys[a], self.handles[a]) < (self.keys[b], self.handles[b])
    }

    /// Swaps two heap entries, keeping `pos` in step.
    fn swap(&mut self, a: usize, b: usize) {
        self.keys.swap(a, b);
        self.handles.swap(a, b);
        self.pos[self.handles[a] as usize] = a as u32 + 1;
        self.pos[self.handles[b] as usize] = b as u32 + 1;
    }

    /// Moves entry `i` up or down to its place.
    fn sift(&mut self, mut i: usize) {
        while i > 0 {
            let parent = (i - 1) / 2;
            if !self.before(i, parent) {
                break;
            }
            self.swap(i, parent);
            i = parent;
        }
        loop {
            let (l, r) = (2 * i + 1, 2 * i + 2);
            let mut least = i;
            if l < self.keys.len() && self.before(l, least) {
                least = l;
            }
            if r < self.keys.len() && self.before(r, least) {
                least = r;
            }
            if least == i {
                break;
            }
            self.swap(i, least);
            i = least;
        }
    }

    /// The entry of `handle`, if planned.
    fn get(&self, handle: u32) -> Option<(Instant, Urgency)> {
        self.place(handle).map(|i| self.entry(self.keys[i]))
    }

    /// The earliest entry's key, if any.
    fn first(&self) -> Option<u64> {
        self.keys.first().copied()
    }

    /// Takes the entry of `handle` out, if planned.
    fn take(&mut self, handle: u32) -> Option<(Instant, Urgency)> {
        let i = self.place(handle)?;
        let last = self.keys.len() - 1;
        if i != last {
            self.swap(i, last);
        }
        let key = self.keys.pop().expect("planned");
        self.handles.pop();
        self.pos[handle as usize] = NOT_PLANNED;
        if i < self.keys.len() {
            self.sift(i);
        }
        Some(self.entry(key))
    }

    /// Sets the entry of `handle`; returns whether it changed.
    fn put(&mut self, handle: u32, at: Instant, urgency: Urgency) -> bool {
        let key = self.key(at, urgency);
        if let Some(i) = self.place(handle) {
            if self.keys[i] == key {
                return false;
            }
            self.keys[i] = key;
            self.sift(i);
            return true;
        }
        let h = handle as usize;
        if self.pos.len() <= h {
            self.pos.resize(h + 1, NOT_PLANNED);
        }
        self.keys.push(key);
        self.handles.push(handle);
        let i = self.keys.len() - 1;
        self.pos[h] = i as u32 + 1;
        self.sift(i);
        true
    }

    /// Room for `n` more planned connections.
    fn reserve(&mut self, n: usize) {
        self.keys.reserve(n);
        self.handles.reserve(n);
        self.pos.reserve(n);
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
            queue: Mutex::new(Queue::new()),
            notify: Notify::new(),
        }
    }

    fn lock(&self) -> parking_lot::MutexGuard<'_, Queue> {
        self.queue.lock()
    }

    /// Room for `n` more planned connections (a load's).
    pub fn reserve(&self, n: usize) {
        self.lock().reserve(n);
    }

    /// Plans (or re-plans) connection `handle`, replacing its earlier entry.
    pub fn schedule(&self, handle: u32, at: Instant, urgency: Urgency) {
        let changed = self.lock().put(handle, at, urgency);
        if changed {
            self.notify.notify_one();
        }
    }

    /// Forgets a connection's plan.
    pub fn cancel(&self, handle: u32) {
        self.lock().take(handle);
    }

    /// The earliest planned instant.
    pub fn next_due(&self) -> Option<Instant> {
        let q = self.lock();
        q.first().map(|key| q.entry(key).0)
    }

    /// Removes and returns every connection whose instant has come, with its urgency, in
    /// the queue's order (instant, then urgency, then handle).
    pub fn take_due(&self, now: Instant) -> Vec<Due> {
        let mut q = self.lock();
        let mut out = Vec::new();
        while let Some(key) = q.first() {
            if q.entry(key).0 > now {
                break;
            }
            let handle = q.handles[0];
            let (_, urgency) = q.take(handle).expect("the first entry is planned");
            out.push(Due { handle, urgency });
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
        let planned = q.pos.iter().filter(|&&p| p != NOT_PLANNED).count();
        debug_assert_eq!(q.keys.len(), planned);
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

    #[tokio::test(start_paused = true)]
    async fn the_heap_keeps_the_order_of_instant_urgency_and_handle() {
        // A model of the queue (the ordered set it replaced) against the heap, over a long
        // run of seeded re-plans, cancellations and takes, with many equal instants.
        let p = Planner::new();
        let t0 = Instant::now();
        let mut model: std::collections::BTreeSet<(Instant, Urgency, u32)> = Default::default();
        let mut current: std::collections::HashMap<u32, (Instant, Urgency)> = Default::default();
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let urgencies = [Urgency::Recover, Urgency::Renew, Urgency::Rotate];
        for step in 0..20_000 {
            let handle = (next() % 300) as u32;
            match next() % 10 {
                0..=5 => {
                    let at = t0 + Duration::from_millis(next() % 50);
                    let u = urgencies[(next() % 3) as usize];
                    p.schedule(handle, at, u);
                    if let Some(old) = current.insert(handle, (at, u)) {
                        model.remove(&(old.0, old.1, handle));
                    }
                    model.insert((at, u, handle));
                }
                6 | 7 => {
                    p.cancel(handle);
                    if let Some(old) = current.remove(&handle) {
                        model.remove(&(old.0, old.1, handle));
                    }
                }
                _ => {
                    let now = t0 + Duration::from_millis(next() % 60);
                    let want: Vec<Due> = model
                        .iter()
                        .take_while(|(at, _, _)| *at <= now)
                        .map(|&(_, urgency, handle)| Due { handle, urgency })
                        .collect();
                    for d in &want {
                        let old = current.remove(&d.handle).expect("planned");
                        model.remove(&(old.0, old.1, d.handle));
                    }
                    assert_eq!(p.take_due(now), want, "step {step}");
                }
            }
            assert_eq!(p.len(), model.len());
            assert_eq!(p.next_due(), model.first().map(|e| e.0));
            let probe = (next() % 300) as u32;
            assert_eq!(
                p.next_of(probe),
                current
                    .get(&probe)
                    .map(|&(at, urgency)| Planned { at, urgency })
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn instants_are_kept_exactly_and_far_ones_are_never_due() {
        let p = Planner::new();
        let at = Instant::now() + Duration::new(86_400 * 400, 123_456_789);
        p.schedule(3, at, Urgency::Renew);
        assert_eq!(
            p.next_of(3),
            Some(Planned {
                at,
                urgency: Urgency::Renew
            })
        );
        let far = Instant::now() + Duration::from_secs(86_400 * 365 * 200);
        p.schedule(4, far, Urgency::Rotate);
        assert!(
            p.take_due(Instant::now() + Duration::from_secs(86_400 * 365 * 100))
                .len()
                == 1
        );
        assert!(
            p.next_of(4)
                .is_some_and(|planned| planned.at > Instant::now())
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
