//! The audit trail of token reads: who read which connection's token, and who was refused.
//!
//! A read is recorded in memory at once (no I/O on the token path) and folded per
//! (connection, peer uid, minute, outcome) into one `token_read` or `token_refused` event
//! with a count; a background task writes the minutes that are over in one durable
//! transaction, and everything at shutdown. So 10,000 reads cost a handful of writes, not
//! 10,000 fsyncs. Until written, folded reads are shown from memory by [`Audit::events`].
//!
//! A read folded into an existing event takes the folds' lock for reading only (its count is
//! an atomic) and allocates nothing: concurrent token reads never wait for each other here.
//! Only the first read of a fold, the flush's removal of written folds and the bound take
//! it for writing.
//!
//! **Architecture Invariant:** an audit event never holds a token: only ids, uids, pids,
//! routes and counts.

use crate::ledger::AnyLedger;
use crate::metrics::Metrics;
use crate::model::{Event, EventKind, EventPeer, StoredEvent, Time};
use chrono::{DurationRound, Utc};
use parking_lot::RwLock;
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

/// How often finished minutes are written. Short enough that an admin sees a read within
/// seconds of its minute's end, long enough to fold a busy minute into one write.
pub const FLUSH_EVERY: Duration = Duration::from_secs(5);

/// The most folded entries kept in memory while the ledger cannot be written (a full disk);
/// past it, the oldest are dropped with a warning. Bounds memory under a long outage.
pub const MAX_PENDING: usize = 100_000;

/// Whether a read was served or refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ReadOutcome {
    /// A token was handed out (`token_read`).
    Served,
    /// The peer may not read this connection's tokens: 403 (`token_refused`).
    Refused,
}

impl ReadOutcome {
    fn kind(self) -> EventKind {
        match self {
            ReadOutcome::Served => EventKind::TokenRead,
            ReadOutcome::Refused => EventKind::TokenRefused,
        }
    }
}

/// The fold key, with the connection id: one event per connection, uid, minute and
/// outcome. The minute, uid and outcome order the folds (oldest minute first, which the
/// bound drops first); a copy, so that looking a fold up allocates nothing.
type Group = (Time, u32, ReadOutcome);

/// Every fold not yet written: by minute, uid and outcome, then by connection id (looked up
/// by `&str`).
type Folds = BTreeMap<Group, HashMap<Box<str>, Fold>>;

/// What a fold has gathered so far.
#[derive(Debug)]
struct Fold {
    /// Reads folded: an atomic, so that a read of an existing fold needs only the read lock.
    count: AtomicU64,
    first_at: Time,
    /// The pid of the first read in the minute.
    pid: Option<u32>,
    /// The route of the first read (`connection_token`, `site_token`).
    route: &'static str,
}

/// A fold as read at one instant (what a flush writes, or what [`Audit::events`] shows).
#[derive(Clone, Debug)]
struct Seen {
    count: u32,
    first_at: Time,
    pid: Option<u32>,
    route: &'static str,
}

impl Fold {
    fn seen(&self) -> Seen {
        Seen {
            count: u32::try_from(self.count.load(Ordering::Relaxed)).unwrap_or(u32::MAX),
            first_at: self.first_at,
            pid: self.pid,
            route: self.route,
        }
    }
}

/// The audit trail. Cheap to clone.
#[derive(Clone)]
pub struct Audit {
    pending: Arc<RwLock<Folds>>,
    /// How many folds `pending` holds (for [`MAX_PENDING`]), kept as they come and go.
    len: Arc<AtomicUsize>,
    /// Folds dropped because the ledger could not take them and memory was full: logged
    /// once per flush, not once per read.
    dropped: Arc<std::sync::atomic::AtomicU64>,
    ledger: AnyLedger,
    metrics: Arc<Metrics>,
}

impl Audit {
    /// An audit trail that writes into `ledger`.
    pub fn new(ledger: impl Into<AnyLedger>, metrics: Arc<Metrics>) -> Audit {
        Audit {
            pending: Arc::new(RwLock::new(BTreeMap::new())),
            len: Arc::default(),
            dropped: Arc::default(),
            ledger: ledger.into(),
            metrics,
        }
    }

    fn lock(&self) -> parking_lot::RwLockReadGuard<'_, Folds> {
        self.pending.read()
    }

    /// Records one read. O(log n) in memory; never waits for I/O; a read of a fold that
    /// exists already (every read of a minute but the first) shares the lock with the others
    /// and allocates nothing.
    pub fn record(
        &self,
        connection: &str,
        uid: u32,
        pid: Option<u32>,
        route: &'static str,
        outcome: ReadOutcome,
    ) {
        let now = Utc::now();
        let minute = now
            .duration_trunc(chrono::Duration::minutes(1))
            .unwrap_or(now);
        let group = (minute, uid, outcome);
        if let Some(fold) = self.lock().get(&group).and_then(|g| g.get(connection)) {
            fold.count.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let mut pending = self.pending.write();
        let folds = pending.entry(group).or_default();
        if let Some(fold) = folds.get(connection) {
            // Another read made it meanwhile.
            fold.count.fetch_add(1, Ordering::Relaxed);
            return;
        }
        folds.insert(
            connection.into(),
            Fold {
                count: AtomicU64::new(1),
                first_at: now,
                pid,
                route,
            },
        );
        if self.len.fetch_add(1, Ordering::Relaxed) + 1 > MAX_PENDING {
            // Drop one fold of the oldest group.
            if let Some(mut oldest) = pending.first_entry() {
                let victim = oldest.get().keys().next().cloned();
                if let Some(victim) = victim {
                    oldest.get_mut().remove(&victim);
                    self.len.fetch_sub(1, Ordering::Relaxed);
                }
                if oldest.get().is_empty() {
                    oldest.remove();
                }
            }
            drop(pending);
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Writes folds of minutes that are over (or all of them, `all`), in one transaction.
    /// On failure they stay in memory for the next try.
    pub async fn flush(&self, all: bool) {
        let dropped = self.dropped.swap(0, Ordering::Relaxed);
        if dropped > 0 {
            tracing::warn!(
                dropped,
                "the audit trail cannot be written and is full; dropped its oldest folded reads"
            );
        }
        let now = Utc::now();
        let this_minute = now
            .duration_trunc(chrono::Duration::minutes(1))
            .unwrap_or(now);
        let due: Vec<(Group, Box<str>, Seen)> = self
            .lock()
            .iter()
            .filter(|(g, _)| all || g.0 < this_minute)
            .flat_map(|(g, folds)| folds.iter().map(|(c, f)| (*g, c.clone(), f.seen())))
            .collect();
        if due.is_empty() {
            return;
        }
        let batch = due
            .iter()
            .map(|(g, c, f)| (c.to_string(), f.first_at, event_of(g, f)))
            .collect();
        match self.ledger.append_batch(batch).await {
            Ok(()) => {
                self.metrics.audit_write(true);
                let mut pending = self.pending.write();
                for (g, c, f) in due {
                    // Reads that arrived meanwhile in the same fold stay pending. (Under the
                    // write lock no read is counting.)
                    let Some(folds) = pending.get_mut(&g) else {
                        continue;
                    };
                    if let Some(now) = folds.get_mut(&c) {
                        let left = now.count.get_mut();
                        *left -= u64::from(f.count).min(*left);
                        if *left == 0 {
                            folds.remove(&c);
                            self.len.fetch_sub(1, Ordering::Relaxed);
                        }
                    }
                    if folds.is_empty() {
                        pending.remove(&g);
                    }
                }
            }
            Err(e) => {
                self.metrics.audit_write(false);
                tracing::error!(error = %e, "cannot write the audit trail of token reads; keeping it in memory and retrying");
            }
        }
    }

    /// Writes finished minutes every [`FLUSH_EVERY`] until `shutdown`, then everything.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                _ = tokio::time::sleep(FLUSH_EVERY) => self.flush(false).await,
            }
        }
        self.flush(true).await;
    }

    /// A connection's history, newest first: the ledger's events merged with the reads
    /// still folding in memory.
    pub async fn events(
        &self,
        connection: &str,
        since: Option<Time>,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, crate::ledger::AnyError> {
        let mut out = self
            .ledger
            .events(connection.to_owned(), since, limit)
            .await?;
        let pending: Vec<StoredEvent> = self
            .lock()
            .iter()
            .filter_map(|(g, folds)| Some((g, folds.get(connection)?.seen())))
            .filter(|(_, f)| since.is_none_or(|s| f.first_at >= s))
            .map(|(g, f)| {
                let e = event_of(g, &f);
                StoredEvent {
                    at: f.first_at,
                    kind: e.kind,
                    message: e.message,
                    node: None,
                    peer: e.peer,
                    count: e.count,
                }
            })
            .collect();
        out.extend(pending);
        out.sort_by_key(|e| std::cmp::Reverse(e.at));
        out.truncate(limit);
        Ok(out)
    }
}

fn event_of(&(minute, uid, outcome): &Group, f: &Seen) -> Event {
    let pid = f.pid.map_or_else(String::new, |p| format!(" (pid {p})"));
    let what = match outcome {
        ReadOutcome::Served => "token read",
        ReadOutcome::Refused => "token read refused",
    };
    let plural = if f.count == 1 { "" } else { "s" };
    let mut e = Event::new(
        outcome.kind(),
        format!(
            "{} {what}{plural} by uid {}{pid} through {} in the minute from {}",
            f.count,
            uid,
            f.route,
            minute.format("%H:%M")
        ),
    );
    e.peer = Some(EventPeer { uid, pid: f.pid });
    e.count = f.count;
    e
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::Ledger;

    /// Reads from many threads at once all count, in one fold per connection, uid and
    /// minute; past [`MAX_PENDING`] folds the oldest are dropped and counted.
    #[tokio::test]
    async fn concurrent_reads_all_count_and_the_folds_stay_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(dir.path(), &Default::default()).unwrap();
        let audit = Audit::new(ledger, Arc::new(Metrics::new(false)));
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..10_000 {
                        audit.record("c1", 1001, Some(7), "connection_token", ReadOutcome::Served);
                    }
                });
            }
        });
        let shown = audit.events("c1", None, 10).await.unwrap();
        // One fold, or two if a minute ended meanwhile.
        assert!(shown.len() <= 2, "{shown:?}");
        assert_eq!(
            shown.iter().map(|e| u64::from(e.count)).sum::<u64>(),
            40_000
        );
        let folds = |a: &Audit| a.lock().values().map(HashMap::len).sum::<usize>();
        let before = folds(&audit);
        let extra = MAX_PENDING - before + 5;
        for i in 0..extra {
            audit.record(
                &format!("c{i}x"),
                1001,
                None,
                "site_token",
                ReadOutcome::Refused,
            );
        }
        assert_eq!(folds(&audit), MAX_PENDING);
        assert_eq!(audit.len.load(Ordering::Relaxed), MAX_PENDING);
        assert_eq!(audit.dropped.load(Ordering::Relaxed), 5);
    }

    #[tokio::test]
    async fn reads_fold_per_uid_and_minute_and_flush_in_one_write() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(dir.path(), &Default::default()).unwrap();
        let rec = crate::model::sample_record("c1", "conf", "rt", Utc::now());
        ledger.insert(rec, vec![]).await.unwrap();
        let metrics = Arc::new(Metrics::new(false));
        let audit = Audit::new(ledger.clone(), metrics);
        for _ in 0..1000 {
            audit.record("c1", 1001, Some(7), "connection_token", ReadOutcome::Served);
        }
        audit.record(
            "c1",
            1002,
            Some(8),
            "connection_token",
            ReadOutcome::Refused,
        );
        let shown = audit.events("c1", None, 10).await.unwrap();
        assert_eq!(shown.len(), 2, "pending reads are shown: {shown:?}");
        audit.flush(true).await;
        assert!(audit.lock().is_empty());
        let stored = ledger.events("c1".into(), None, 10).await.unwrap();
        let reads: Vec<_> = stored
            .iter()
            .filter(|e| e.kind == EventKind::TokenRead)
            .collect();
        assert_eq!(reads.len(), 1);
        assert_eq!(reads[0].count, 1000);
        assert_eq!(
            reads[0].peer,
            Some(EventPeer {
                uid: 1001,
                pid: Some(7)
            })
        );
        assert!(
            stored
                .iter()
                .any(|e| e.kind == EventKind::TokenRefused && e.count == 1)
        );
    }
}
