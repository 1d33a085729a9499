//! When each connection is refreshed next, and the timer queue that holds those times.
//!
//! No loop polls the ledger: every connection has at most one planned instant in a heap,
//! re-planned whenever its state changes, and the scheduler sleeps until the earliest one.

use crate::config::RefreshConfig;
use crate::model::{Record, Status, Time};
use chrono::Utc;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::Mutex;
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Instant;

/// Rotation jitter: a chain is rotated at `rotate_after × (1 ± this)`, so that a ledger
/// imported at once does not rotate at once. Derived from the connection id and rotation
/// time, so the planned instant is stable across re-plans.
pub const ROTATION_JITTER: f64 = 0.1;

/// A connection is *hot* when a caller asked for its token within this many access-token
/// lifetimes; hot connections get their access token renewed ahead of expiry so that callers
/// never wait for the provider.
pub const HOT_LIFETIMES: u32 = 2;

/// Hot connections are renewed at least this long before `access_token_margin` is reached:
/// room for the provider's latency, so no caller waits.
pub const MIN_RENEW_LEAD: Duration = Duration::from_secs(1);

/// The earliest instant at which a connection needs an action, or `None` when it needs none
/// (a `needs_reauth` chain is never retried automatically).
pub fn next_action(
    rec: &Record,
    settings: &RefreshConfig,
    not_before: Option<Instant>,
    uncommitted: bool,
    last_requested: Option<Instant>,
    commit_retry: Duration,
) -> Option<Instant> {
    let now_i = Instant::now();
    if uncommitted {
        return Some(now_i + commit_retry);
    }
    if rec.conn.status == Status::NeedsReauth {
        return None;
    }
    let now_w = Utc::now();
    let at_wall = |t: Time| now_i + (t - now_w).to_std().unwrap_or(Duration::ZERO);
    let factor = jitter_factor(&rec.conn.id, rec.chain.rotated_at);
    let rotate_in = settings.rotate_after.mul_f64(factor);
    let mut due = at_wall(
        rec.chain.rotated_at
            + chrono::Duration::from_std(rotate_in).unwrap_or(chrono::Duration::MAX),
    );
    if rec.chain.attempt_started_at.is_some() {
        due = now_i;
    }
    if let (true, Some(access), Some(refreshed)) = (
        is_hot(rec, last_requested),
        &rec.chain.access,
        rec.conn.last_refresh_at,
    ) {
        let lifetime = (access.expires_at - refreshed)
            .to_std()
            .unwrap_or(Duration::ZERO);
        {
            // Renew a little before the margin is reached, so that the refresh has finished
            // (callers asking for `margin` of validity are still served from cache while it
            // runs); but with at least a third of the token's life used, so a margin longer
            // than the lifetime cannot renew without end.
            let lead = (settings.access_token_margin / 2).max(MIN_RENEW_LEAD);
            let margin = (settings.access_token_margin + lead).min(lifetime * 2 / 3);
            let renew = access.expires_at
                - chrono::Duration::from_std(margin).unwrap_or(chrono::Duration::MAX);
            due = due.min(at_wall(renew));
        }
    }
    Some(match not_before {
        Some(nb) if nb > due => nb,
        _ => due,
    })
}

/// Whether a caller asked for this connection's token within [`HOT_LIFETIMES`] access-token
/// lifetimes.
pub fn is_hot(rec: &Record, last_requested: Option<Instant>) -> bool {
    let (Some(asked), Some(access), Some(refreshed)) =
        (last_requested, &rec.chain.access, rec.conn.last_refresh_at)
    else {
        return false;
    };
    let lifetime = (access.expires_at - refreshed)
        .to_std()
        .unwrap_or(Duration::ZERO);
    !lifetime.is_zero() && asked.elapsed() < lifetime * HOT_LIFETIMES
}

/// A stable factor in `[1 - ROTATION_JITTER, 1 + ROTATION_JITTER]` for one rotation.
fn jitter_factor(id: &str, rotated_at: Time) -> f64 {
    let mut h = std::hash::DefaultHasher::new();
    id.hash(&mut h);
    rotated_at.timestamp_millis().hash(&mut h);
    let unit = (h.finish() % 10_000) as f64 / 10_000.0;
    1.0 - ROTATION_JITTER + 2.0 * ROTATION_JITTER * unit
}

#[derive(Default)]
struct PlanState {
    heap: BinaryHeap<Reverse<(Instant, u64, String)>>,
    current: HashMap<String, (Instant, u64)>,
    seq: u64,
}

/// The timer queue: one planned instant per connection.
pub struct Planner {
    state: Mutex<PlanState>,
    notify: Notify,
}

impl Planner {
    /// An empty queue.
    pub fn new() -> Planner {
        Planner {
            state: Mutex::new(PlanState::default()),
            notify: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PlanState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Plans (or re-plans) a connection.
    pub fn schedule(&self, id: &str, at: Instant) {
        let mut st = self.lock();
        st.seq += 1;
        let seq = st.seq;
        st.current.insert(id.to_owned(), (at, seq));
        st.heap.push(Reverse((at, seq, id.to_owned())));
        drop(st);
        self.notify.notify_one();
    }

    /// Forgets a connection's plan.
    pub fn cancel(&self, id: &str) {
        self.lock().current.remove(id);
    }

    /// The earliest planned instant.
    pub fn next_due(&self) -> Option<Instant> {
        let mut st = self.lock();
        while let Some(Reverse((at, seq, id))) = st.heap.peek() {
            if st.current.get(id) == Some(&(*at, *seq)) {
                return Some(*at);
            }
            st.heap.pop();
        }
        None
    }

    /// Removes and returns every connection whose instant has come, earliest first.
    pub fn take_due(&self, now: Instant) -> Vec<String> {
        let mut st = self.lock();
        let mut out = Vec::new();
        while let Some(Reverse((at, seq, id))) = st.heap.peek().cloned() {
            if at > now {
                break;
            }
            st.heap.pop();
            if st.current.get(&id) == Some(&(at, seq)) {
                st.current.remove(&id);
                out.push(id);
            }
        }
        out
    }

    /// The planned instant of a connection as wall-clock time.
    pub fn next_wall(&self, id: &str) -> Option<Time> {
        let (at, _) = *self.lock().current.get(id)?;
        let now = Instant::now();
        let delta = if at > now { at - now } else { Duration::ZERO };
        Some(Utc::now() + chrono::Duration::from_std(delta).unwrap_or(chrono::Duration::MAX))
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

    #[tokio::test(start_paused = true)]
    async fn replanning_replaces_the_old_instant() {
        let p = Planner::new();
        let t0 = Instant::now();
        p.schedule("a", t0 + Duration::from_secs(10));
        p.schedule("b", t0 + Duration::from_secs(5));
        p.schedule("a", t0 + Duration::from_secs(1));
        assert_eq!(p.next_due(), Some(t0 + Duration::from_secs(1)));
        tokio::time::advance(Duration::from_secs(6)).await;
        assert_eq!(
            p.take_due(Instant::now()),
            vec!["a".to_string(), "b".to_string()]
        );
        assert_eq!(
            p.next_due(),
            None,
            "the stale 10 s entry of a must not fire"
        );
        p.schedule("c", Instant::now());
        p.cancel("c");
        assert!(
            p.take_due(Instant::now() + Duration::from_secs(100))
                .is_empty()
        );
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
