//! The audit trail of token reads: who read which connection's token, and who was refused.
//!
//! A read is recorded in memory at once (no I/O on the token path) and folded per
//! (connection, peer uid, minute, outcome) into one `token_read` or `token_refused` event
//! with a count; a background task writes the minutes that are over in one durable
//! transaction, and everything at shutdown. So 10,000 reads cost a handful of writes, not
//! 10,000 fsyncs. Until written, folded reads are shown from memory by [`Audit::events`].
//!
//! **Architecture Invariant:** an audit event never holds a token: only ids, uids, pids,
//! routes and counts.

use crate::ledger::AnyLedger;
use crate::metrics::Metrics;
use crate::model::{Event, EventKind, EventPeer, StoredEvent, Time};
use chrono::{DurationRound, Utc};
use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
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

/// The fold key: one event per connection, uid, minute and outcome.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Key {
    minute: Time,
    connection: String,
    uid: u32,
    outcome: ReadOutcome,
}

/// What a fold has gathered so far.
#[derive(Clone, Debug)]
struct Fold {
    count: u32,
    first_at: Time,
    /// The pid of the first read in the minute.
    pid: Option<u32>,
    /// The route of the first read (`connection_token`, `site_token`).
    route: &'static str,
}

/// The audit trail. Cheap to clone.
#[derive(Clone)]
pub struct Audit {
    pending: Arc<Mutex<BTreeMap<Key, Fold>>>,
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
            pending: Arc::new(Mutex::new(BTreeMap::new())),
            dropped: Arc::default(),
            ledger: ledger.into(),
            metrics,
        }
    }

    fn lock(&self) -> parking_lot::MutexGuard<'_, BTreeMap<Key, Fold>> {
        self.pending.lock()
    }

    /// Records one read. O(log n) in memory; never waits for I/O.
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
        let key = Key {
            minute,
            connection: connection.to_owned(),
            uid,
            outcome,
        };
        let mut pending = self.lock();
        pending
            .entry(key)
            .and_modify(|f| f.count = f.count.saturating_add(1))
            .or_insert(Fold {
                count: 1,
                first_at: now,
                pid,
                route,
            });
        if pending.len() > MAX_PENDING {
            pending.pop_first();
            drop(pending);
            self.dropped
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Writes folds of minutes that are over (or all of them, `all`), in one transaction.
    /// On failure they stay in memory for the next try.
    pub async fn flush(&self, all: bool) {
        let dropped = self.dropped.swap(0, std::sync::atomic::Ordering::Relaxed);
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
        let due: Vec<(Key, Fold)> = self
            .lock()
            .iter()
            .filter(|(k, _)| all || k.minute < this_minute)
            .map(|(k, f)| (k.clone(), f.clone()))
            .collect();
        if due.is_empty() {
            return;
        }
        let batch = due
            .iter()
            .map(|(k, f)| (k.connection.clone(), f.first_at, event_of(k, f)))
            .collect();
        match self.ledger.append_batch(batch).await {
            Ok(()) => {
                self.metrics.audit_write(true);
                let mut pending = self.lock();
                for (k, f) in due {
                    // Reads that arrived meanwhile in the same fold stay pending.
                    if let Some(now) = pending.get_mut(&k) {
                        now.count -= f.count.min(now.count);
                        if now.count == 0 {
                            pending.remove(&k);
                        }
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
            .filter(|(k, f)| k.connection == connection && since.is_none_or(|s| f.first_at >= s))
            .map(|(k, f)| {
                let e = event_of(k, f);
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

fn event_of(k: &Key, f: &Fold) -> Event {
    let pid = f.pid.map_or_else(String::new, |p| format!(" (pid {p})"));
    let what = match k.outcome {
        ReadOutcome::Served => "token read",
        ReadOutcome::Refused => "token read refused",
    };
    let plural = if f.count == 1 { "" } else { "s" };
    let mut e = Event::new(
        k.outcome.kind(),
        format!(
            "{} {what}{plural} by uid {}{pid} through {} in the minute from {}",
            f.count,
            k.uid,
            f.route,
            k.minute.format("%H:%M")
        ),
    );
    e.peer = Some(EventPeer {
        uid: k.uid,
        pid: f.pid,
    });
    e.count = f.count;
    e
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::Ledger;

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
