//! Group commit: every write of the SQLite ledger goes through one queue, and one writer at a
//! time commits whatever queued while the previous commit ran in a single durable
//! transaction (one fsync for the lot).
//!
//! A caller enqueues its write with a oneshot and awaits it. The writer runs on tokio's
//! blocking pool while the queue is not empty: it takes at most [`MAX_BATCH`] writes, runs
//! `BEGIN IMMEDIATE`, each write inside its own `SAVEPOINT` (a write that fails is rolled back
//! to its savepoint and keeps its own error; the others go on), one `COMMIT`, and only then
//! answers every caller of the batch. It never waits to gather a batch: a lone write is
//! committed at once, alone, as before; under load the batch is what queued meanwhile.
//!
//! **Architecture Invariant:** a caller is answered only after the `COMMIT` its write was part
//! of has returned. A write whose `COMMIT` failed gets that SQLite error, exactly as a lone
//! write's failed commit reports it (`LedgerError::Sqlite`): the engine treats it as an
//! unknown outcome. When SQLite itself rolls the whole transaction back (a full disk or an
//! I/O error in a statement), the writes that ran before it in that transaction get the
//! error that did it, and the writes not yet run go into a fresh transaction.

use super::seal::Keyring;
use super::{Inner, LedgerError};
use parking_lot::Mutex;
use rusqlite::Connection;
use std::collections::VecDeque;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;
use tokio::time::Instant;

/// The most writes one transaction takes. Under a refresh storm each of the
/// `refresh.max_concurrent` attempts has at most one write in flight, so a batch of 128 holds
/// a whole wave at the default and at the 64 (one fsync instead of 64); the bound
/// caps what the first caller of a batch waits for beyond its own write (every statement of
/// the batch runs before the `COMMIT`: a few milliseconds for a full batch, fsync included,
/// measured on a shared 2-core machine) and how much one commit appends to the WAL (a few
/// pages per chain write).
pub(super) const MAX_BATCH: usize = 128;

/// The writes waiting for the writer, and whether a writer is running.
#[derive(Default)]
pub(super) struct Queue {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// In arrival order; the writer takes from the front.
    jobs: VecDeque<Box<dyn Job>>,
    /// A writer task is running (or about to): a new write only joins the queue. Cleared by
    /// the writer, under this lock, when it finds the queue empty after a commit.
    running: bool,
}

impl Queue {
    /// Tests only: how many writes wait.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.state.lock().jobs.len()
    }
}

/// One caller's write, type-erased for the queue.
trait Job: Send {
    /// Runs the write inside the batch's transaction (its savepoint is the writer's): false
    /// when it failed (its error is kept for its caller).
    fn run(&mut self, db: &Connection, keys: &Keyring) -> bool;
    /// Replaces its outcome by a failure (its savepoint could not be released).
    fn fail(&mut self, e: rusqlite::Error);
    /// The SQLite error it failed with, if any (for the other writes of a transaction that
    /// SQLite rolled back because of it).
    fn sqlite_error(&self) -> Option<rusqlite::Error>;
    /// Answers the caller, `commit` being the outcome of its transaction's `COMMIT` (or of
    /// its `BEGIN`, when the write never ran) and `held` how long that transaction held the
    /// ledger (from its `BEGIN` to its `COMMIT`'s return).
    fn answer(self: Box<Self>, commit: Result<(), &rusqlite::Error>, held: Duration);
}

/// A write `f` and where its answer goes.
struct Write<R, F> {
    /// Taken when it runs.
    f: Option<F>,
    /// Its own outcome, once run (a write that never ran gets its transaction's error).
    out: Option<Result<R, LedgerError>>,
    reply: oneshot::Sender<(Result<R, LedgerError>, Duration)>,
}

impl<R, F> Job for Write<R, F>
where
    R: Send + 'static,
    F: FnOnce(&Connection, &Keyring) -> Result<R, LedgerError> + Send + 'static,
{
    fn run(&mut self, db: &Connection, keys: &Keyring) -> bool {
        let Some(f) = self.f.take() else {
            return self.out.as_ref().is_some_and(Result::is_ok);
        };
        // A panicking write fails alone, as a panic on the blocking pool did before.
        let out = catch_unwind(AssertUnwindSafe(|| f(db, keys)))
            .unwrap_or_else(|_| Err(LedgerError::Task("the ledger write panicked".into())));
        let ok = out.is_ok();
        self.out = Some(out);
        ok
    }

    fn fail(&mut self, e: rusqlite::Error) {
        self.out = Some(Err(LedgerError::Sqlite(e)));
    }

    fn sqlite_error(&self) -> Option<rusqlite::Error> {
        match &self.out {
            Some(Err(LedgerError::Sqlite(e))) => Some(copy_error(e)),
            _ => None,
        }
    }

    fn answer(self: Box<Self>, commit: Result<(), &rusqlite::Error>, held: Duration) {
        let result = match (self.out, commit) {
            // Its savepoint was rolled back: it did not land, whatever the commit did.
            (Some(Err(e)), _) => Err(e),
            (Some(Ok(r)), Ok(())) => Ok(r),
            (_, Err(e)) => Err(LedgerError::Sqlite(copy_error(e))),
            // Not reached: a write is answered after it ran or with its transaction's error.
            (None, Ok(())) => Err(LedgerError::Task("the ledger write never ran".into())),
        };
        // A caller that went away (its future dropped) needs no answer: the write ran anyway,
        // as a write on the blocking pool always did.
        let _ = self.reply.send((result, held));
    }
}

/// Queues `f` for the writer and waits for the outcome of the commit it was part of.
pub(super) async fn write<R, F>(inner: &Arc<Inner>, f: F) -> Result<R, LedgerError>
where
    R: Send + 'static,
    F: FnOnce(&Connection, &Keyring) -> Result<R, LedgerError> + Send + 'static,
{
    write_held(inner, f).await.0
}

/// [`write`], and how long the transaction it was part of held the ledger (from its
/// `BEGIN` to its `COMMIT`'s return, the other writes of its batch and the commit's sync
/// included): what housekeeping reports of its transactions.
pub(super) async fn write_held<R, F>(inner: &Arc<Inner>, f: F) -> (Result<R, LedgerError>, Duration)
where
    R: Send + 'static,
    F: FnOnce(&Connection, &Keyring) -> Result<R, LedgerError> + Send + 'static,
{
    let (reply, answer) = oneshot::channel();
    let job = Box::new(Write {
        f: Some(f),
        out: None,
        reply,
    });
    let start = {
        let mut st = inner.queue.state.lock();
        st.jobs.push_back(job);
        !std::mem::replace(&mut st.running, true)
    };
    if start {
        spawn_writer(inner.clone());
    }
    answer.await.unwrap_or_else(|_| {
        (
            Err(LedgerError::Task(
                "the ledger writer stopped before answering".into(),
            )),
            Duration::ZERO,
        )
    })
}

/// Starts a writer on the blocking pool (the queue's `running` already set).
fn spawn_writer(inner: Arc<Inner>) {
    let guard = Running {
        inner,
        started: false,
    };
    tokio::task::spawn_blocking(move || drain(guard));
}

/// The writer: batches until the queue is empty. It holds the ledger only while writes are
/// queued (a closed ledger's lock file goes with its last handle, as before).
fn drain(mut guard: Running) {
    guard.started = true;
    loop {
        let answers = {
            // The database first: writes queue while another user of the connection (a
            // read of the maintenance job, `set_node`) holds it, and go in one batch.
            let mut db = guard.inner.db.lock();
            let batch: VecDeque<Box<dyn Job>> = {
                let mut st = guard.inner.queue.state.lock();
                let n = st.jobs.len().min(MAX_BATCH);
                st.jobs.drain(..n).collect()
            };
            let answers = run_batch(&mut db, &guard.inner.keys, batch);
            #[cfg(test)]
            guard
                .inner
                .transactions
                .fetch_add(answers.len() as u64, std::sync::atomic::Ordering::Relaxed);
            answers
        };
        let more = {
            let mut st = guard.inner.queue.state.lock();
            st.running = !st.jobs.is_empty();
            st.running
        };
        if !more {
            // Let go of the ledger before the last answers: a caller that closes it next
            // must find its lock file released.
            drop(guard);
            answer(answers);
            return;
        }
        answer(answers);
    }
}

/// The writer's hold on the ledger, and what happens when a writer ends other than by finding
/// the queue empty. Should the writer itself panic (a write cannot: each is caught), the
/// callers of its batch get `Task` errors (their senders are dropped), the transaction is
/// rolled back, and the queue goes to a new writer rather than waiting for a dead one. Should
/// it never run (the runtime is shutting down), the queued writes are dropped unrun, so that
/// their callers get `Task` errors instead of waiting forever.
struct Running {
    inner: Arc<Inner>,
    /// The writer began: from here on a drop without a panic is its normal end.
    started: bool,
}

impl Drop for Running {
    fn drop(&mut self) {
        if !self.started {
            let unrun = {
                let mut st = self.inner.queue.state.lock();
                st.running = false;
                std::mem::take(&mut st.jobs)
            };
            drop(unrun);
            return;
        }
        if !std::thread::panicking() {
            return;
        }
        {
            let db = self.inner.db.lock();
            if !db.is_autocommit() {
                let _ = db.execute_batch("ROLLBACK");
            }
        }
        let restart = {
            let mut st = self.inner.queue.state.lock();
            st.running = !st.jobs.is_empty();
            st.running
        };
        if restart {
            spawn_writer(self.inner.clone());
        }
    }
}

/// Writes of one transaction, the outcome of its `COMMIT` and how long it held the ledger.
type Answers = Vec<(Vec<Box<dyn Job>>, Result<(), rusqlite::Error>, Duration)>;

fn answer(answers: Answers) {
    for (jobs, commit, held) in answers {
        for job in jobs {
            job.answer(commit.as_ref().map(|_| ()), held);
        }
    }
}

/// Runs `batch` in as few transactions as SQLite allows (one, unless it rolls one back).
fn run_batch(db: &mut Connection, keys: &Keyring, mut batch: VecDeque<Box<dyn Job>>) -> Answers {
    let mut answers = Answers::new();
    while !batch.is_empty() {
        let began = Instant::now();
        if let Err(e) = db.execute_batch("BEGIN IMMEDIATE") {
            answers.push((batch.drain(..).collect(), Err(e), began.elapsed()));
            break;
        }
        let mut ran: Vec<Box<dyn Job>> = Vec::with_capacity(batch.len());
        let mut rolled_back = None;
        while let Some(mut job) = batch.pop_front() {
            run_one(db, keys, job.as_mut());
            if db.is_autocommit() {
                // SQLite rolled the transaction back (a full disk, an I/O error): the writes
                // before this one are gone with it; the rest go into the next transaction.
                rolled_back = Some(job.sqlite_error().unwrap_or_else(|| {
                    rusqlite::Error::SqliteFailure(
                        rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_ABORT),
                        Some("the transaction was rolled back".into()),
                    )
                }));
                ran.push(job);
                break;
            }
            ran.push(job);
        }
        let commit = match rolled_back {
            Some(e) => Err(e),
            None => db.execute_batch("COMMIT").inspect_err(|_| {
                if !db.is_autocommit() {
                    let _ = db.execute_batch("ROLLBACK");
                }
            }),
        };
        answers.push((ran, commit, began.elapsed()));
    }
    answers
}

/// Runs one write in its own savepoint: released when it succeeded, rolled back when not.
fn run_one(db: &Connection, keys: &Keyring, job: &mut dyn Job) {
    if let Err(e) = db.execute_batch("SAVEPOINT w") {
        job.fail(e);
        return;
    }
    if job.run(db, keys) {
        match db.execute_batch("RELEASE w") {
            Ok(()) => return,
            Err(e) => job.fail(e),
        }
    }
    if !db.is_autocommit() && db.execute_batch("ROLLBACK TO w; RELEASE w").is_err() {
        // The failed write's effects could not be undone alone: were the transaction
        // committed, they would land (a merge's DELETE without its UPDATE). Roll all of it
        // back; `run_batch` then sees autocommit and fails the writes before this one too.
        if !db.is_autocommit() {
            let _ = db.execute_batch("ROLLBACK");
        }
    }
}

/// The same SQLite error for another caller (`rusqlite::Error` is not `Clone`): a failure
/// keeps its code and message, anything else its text.
fn copy_error(e: &rusqlite::Error) -> rusqlite::Error {
    match e {
        rusqlite::Error::SqliteFailure(code, msg) => {
            rusqlite::Error::SqliteFailure(*code, msg.clone())
        }
        other => rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_ERROR),
            Some(other.to_string()),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Ledger, LedgerError, seal};
    use crate::model::{Event, EventKind, Record, sample_record};
    use crate::secret::Secret;
    use chrono::Utc;
    use std::sync::atomic::Ordering;

    /// The writing connection held on a thread of its own, so that writes queue behind it
    /// and go in one batch once it is let go.
    struct Hold {
        release: std::sync::mpsc::Sender<()>,
        thread: std::thread::JoinHandle<()>,
    }

    fn hold(ledger: &Ledger) -> Hold {
        let inner = ledger.inner.clone();
        let (locked, is_locked) = std::sync::mpsc::channel();
        let (release, released) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            let _db = inner.db.lock();
            locked.send(()).unwrap();
            let _ = released.recv();
        });
        is_locked.recv().unwrap();
        Hold { release, thread }
    }

    impl Hold {
        /// Waits until `n` writes are queued, then lets the writer have the connection.
        async fn release_after(self, ledger: &Ledger, n: usize) {
            while ledger.inner.queue.len() < n {
                tokio::task::yield_now().await;
            }
            self.release.send(()).unwrap();
            self.thread.join().unwrap();
        }
    }

    fn transactions(ledger: &Ledger) -> u64 {
        ledger.inner.transactions.load(Ordering::Relaxed)
    }

    fn record(i: usize) -> Record {
        sample_record(&format!("c{i}"), &format!("conn-{i}"), "rt-0", Utc::now())
    }

    /// `rec` rotated to `token` at the next version.
    fn rotated(rec: &Record, token: &str) -> Record {
        let mut next = rec.clone();
        next.chain.previous = Some(Box::new((
            rec.chain.refresh_token.clone(),
            rec.chain.rotated_at,
        )));
        next.chain.refresh_token = Secret::new(token);
        next.chain.version += 1;
        next
    }

    async fn ledger_with(dir: &std::path::Path, n: usize) -> Ledger {
        let ledger = Ledger::open(dir, &seal::KeySource::default()).unwrap();
        for i in 0..n {
            ledger.insert(record(i), vec![]).await.unwrap();
        }
        ledger
    }

    async fn stored_token(ledger: &Ledger, i: usize) -> (String, u64) {
        let rec = ledger.load_one(format!("c{i}")).await.unwrap().unwrap();
        (
            rec.chain.refresh_token.expose().to_owned(),
            rec.chain.version,
        )
    }

    #[tokio::test]
    async fn concurrent_chain_writes_share_a_commit_and_each_gets_its_own_answer() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = ledger_with(dir.path(), 40).await;
        let before = transactions(&ledger);
        let held = hold(&ledger);
        let mut writes = Vec::new();
        for i in 0..40 {
            // Every fourth chain gets two writers from the same version: one must conflict.
            let racers = if i % 4 == 0 { 2 } else { 1 };
            for r in 0..racers {
                let (l, rec) = (ledger.clone(), rotated(&record(i), &format!("rt-{i}-{r}")));
                let events = vec![Event::new(EventKind::Rotated, format!("writer {r}"))];
                writes.push((
                    i,
                    r,
                    tokio::spawn(async move { l.save_chain(rec, 0, events).await }),
                ));
            }
        }
        held.release_after(&ledger, writes.len()).await;
        let mut won = std::collections::HashMap::new();
        for (i, r, w) in writes {
            match w.await.unwrap() {
                Ok(()) => assert!(won.insert(i, r).is_none(), "c{i}: two writers won"),
                Err(LedgerError::Conflict(id)) => assert_eq!(id, format!("c{i}")),
                Err(e) => panic!("c{i} writer {r}: {e}"),
            }
        }
        assert_eq!(transactions(&ledger) - before, 1, "one batch, one commit");
        assert_eq!(won.len(), 40, "every chain has exactly one winner");
        // Durably: a fresh open sees every winner, and only the winner's event.
        drop(ledger);
        let ledger = Ledger::open(dir.path(), &seal::KeySource::default()).unwrap();
        for (i, r) in won {
            assert_eq!(stored_token(&ledger, i).await, (format!("rt-{i}-{r}"), 1));
            let events = ledger.events(format!("c{i}"), None, 10).await.unwrap();
            let messages: Vec<_> = events.iter().map(|e| e.message.clone()).collect();
            assert_eq!(messages, vec![format!("writer {r}")], "c{i}");
        }
    }

    #[tokio::test]
    async fn a_batch_takes_at_most_max_batch_writes() {
        let dir = tempfile::tempdir().unwrap();
        let n = super::MAX_BATCH + 10;
        let ledger = ledger_with(dir.path(), n).await;
        let before = transactions(&ledger);
        let held = hold(&ledger);
        let writes: Vec<_> = (0..n)
            .map(|i| {
                let (l, rec) = (ledger.clone(), rotated(&record(i), "rt-1"));
                tokio::spawn(async move { l.save_chain(rec, 0, vec![]).await })
            })
            .collect();
        held.release_after(&ledger, n).await;
        for w in writes {
            w.await.unwrap().unwrap();
        }
        assert_eq!(
            transactions(&ledger) - before,
            2,
            "{} and then 10",
            super::MAX_BATCH
        );
        for i in [0, n - 1] {
            assert_eq!(stored_token(&ledger, i).await, ("rt-1".into(), 1));
        }
    }

    #[tokio::test]
    async fn a_failing_write_is_rolled_back_alone_and_the_rest_of_its_batch_commits() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = ledger_with(dir.path(), 2).await;
        let before = transactions(&ledger);
        let held = hold(&ledger);
        let first = tokio::spawn({
            let (l, rec) = (ledger.clone(), rotated(&record(0), "rt-0-new"));
            async move { l.save_chain(rec, 0, vec![]).await }
        });
        // A write that changes something, then fails: its change must not land.
        let partial = tokio::spawn({
            let l = ledger.clone();
            async move {
                l.write(|db, _| {
                    super::super::append_events(
                        db,
                        Some("c1"),
                        Utc::now(),
                        &[Event::new(EventKind::Other("partial".into()), "half done")],
                    )?;
                    Err::<(), _>(LedgerError::Corrupt("failed halfway".into()))
                })
                .await
            }
        });
        // A constraint failure (the account is taken by c1) and a taken label.
        let mut same_account = record(9);
        same_account.conn.account_id = Some("acct-c1".into());
        let constraint = tokio::spawn({
            let l = ledger.clone();
            async move { l.insert(same_account, vec![]).await }
        });
        let mut same_label = record(8);
        same_label.conn.label = "conn-0".into();
        let label = tokio::spawn({
            let l = ledger.clone();
            async move { l.insert(same_label, vec![]).await }
        });
        let last = tokio::spawn({
            let (l, rec) = (ledger.clone(), rotated(&record(1), "rt-1-new"));
            async move { l.save_chain(rec, 0, vec![]).await }
        });
        held.release_after(&ledger, 5).await;
        first.await.unwrap().unwrap();
        let e = partial.await.unwrap().unwrap_err();
        assert!(matches!(e, LedgerError::Corrupt(_)), "{e}");
        let e = constraint.await.unwrap().unwrap_err();
        assert!(
            matches!(&e, LedgerError::Sqlite(_)) && e.to_string().contains("UNIQUE"),
            "{e}"
        );
        let e = label.await.unwrap().unwrap_err();
        assert!(matches!(e, LedgerError::LabelTaken(_)), "{e}");
        last.await.unwrap().unwrap();
        assert_eq!(transactions(&ledger) - before, 1, "one batch, one commit");
        assert_eq!(stored_token(&ledger, 0).await, ("rt-0-new".into(), 1));
        assert_eq!(stored_token(&ledger, 1).await, ("rt-1-new".into(), 1));
        assert!(ledger.load_one("c9".into()).await.unwrap().is_none());
        assert!(ledger.load_one("c8".into()).await.unwrap().is_none());
        assert!(
            ledger
                .events("c1".into(), None, 10)
                .await
                .unwrap()
                .is_empty()
        );
    }

    /// A failed write whose savepoint cannot be rolled back alone (here it released the
    /// savepoint itself, so `ROLLBACK TO` finds none) must not reach the `COMMIT`: the whole
    /// transaction is rolled back, the writes before it fail, the rest run in a new one.
    #[tokio::test]
    async fn a_failed_write_that_cannot_be_undone_alone_rolls_back_its_whole_transaction() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = ledger_with(dir.path(), 2).await;
        let held = hold(&ledger);
        let first = tokio::spawn({
            let (l, rec) = (ledger.clone(), rotated(&record(0), "rt-0-new"));
            async move { l.save_chain(rec, 0, vec![]).await }
        });
        let stuck = tokio::spawn({
            let l = ledger.clone();
            async move {
                l.write(|db, _| {
                    super::super::append_events(
                        db,
                        Some("c1"),
                        Utc::now(),
                        &[Event::new(EventKind::Other("partial".into()), "half done")],
                    )?;
                    db.execute_batch("RELEASE w")?;
                    Err::<(), _>(LedgerError::Corrupt("failed halfway".into()))
                })
                .await
            }
        });
        let after = tokio::spawn({
            let (l, rec) = (ledger.clone(), rotated(&record(1), "rt-1-new"));
            async move { l.save_chain(rec, 0, vec![]).await }
        });
        held.release_after(&ledger, 3).await;
        assert!(
            first.await.unwrap().is_err(),
            "its transaction was rolled back"
        );
        let e = stuck.await.unwrap().unwrap_err();
        assert!(matches!(e, LedgerError::Corrupt(_)), "{e}");
        after.await.unwrap().unwrap();
        assert_eq!(stored_token(&ledger, 0).await, ("rt-0".into(), 0));
        assert_eq!(stored_token(&ledger, 1).await, ("rt-1-new".into(), 1));
        assert!(
            ledger
                .events("c1".into(), None, 10)
                .await
                .unwrap()
                .is_empty(),
            "the failed write's event did not land"
        );
    }

    #[tokio::test]
    async fn a_failing_commit_fails_every_write_of_its_batch() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = ledger_with(dir.path(), 2).await;
        let before = transactions(&ledger);
        let held = hold(&ledger);
        let mut saves = Vec::new();
        for i in 0..2 {
            let (l, rec) = (ledger.clone(), rotated(&record(i), "rt-new"));
            saves.push(tokio::spawn(
                async move { l.save_chain(rec, 0, vec![]).await },
            ));
        }
        // A write that succeeds but makes the COMMIT fail: a foreign key checked at commit.
        let poison = tokio::spawn({
            let l = ledger.clone();
            async move {
                l.write(|db, _| {
                    db.execute_batch(
                        "PRAGMA defer_foreign_keys = ON; \
                         INSERT INTO sites (connection_id, cloud_id, url, name, scopes, first_seen_at, last_seen_at) \
                         VALUES ('nobody', 'x', 'https://x', 'x', '', 0, 0);",
                    )?;
                    Ok(())
                })
                .await
            }
        });
        held.release_after(&ledger, 3).await;
        for w in saves.into_iter().chain([poison]) {
            let e = w.await.unwrap().unwrap_err();
            assert!(
                matches!(&e, LedgerError::Sqlite(_)) && e.to_string().contains("FOREIGN KEY"),
                "{e}"
            );
        }
        assert_eq!(transactions(&ledger) - before, 1);
        for i in 0..2 {
            assert_eq!(stored_token(&ledger, i).await, ("rt-0".into(), 0), "c{i}");
        }
        // The writer goes on with the next batch.
        ledger
            .save_chain(rotated(&record(0), "rt-later"), 0, vec![])
            .await
            .unwrap();
        assert_eq!(stored_token(&ledger, 0).await, ("rt-later".into(), 1));
    }

    #[tokio::test]
    async fn a_transaction_sqlite_rolled_back_fails_the_writes_before_and_reruns_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = ledger_with(dir.path(), 2).await;
        let before = transactions(&ledger);
        let held = hold(&ledger);
        let first = tokio::spawn({
            let (l, rec) = (ledger.clone(), rotated(&record(0), "rt-0-new"));
            async move { l.save_chain(rec, 0, vec![]).await }
        });
        // As SQLite does on some I/O errors: the whole transaction is rolled back.
        let rollback = tokio::spawn({
            let l = ledger.clone();
            async move { l.write(|db, _| Ok(db.execute_batch("ROLLBACK")?)).await }
        });
        let after = tokio::spawn({
            let (l, rec) = (ledger.clone(), rotated(&record(1), "rt-1-new"));
            async move { l.save_chain(rec, 0, vec![]).await }
        });
        held.release_after(&ledger, 3).await;
        let e = first.await.unwrap().unwrap_err();
        assert!(matches!(e, LedgerError::Sqlite(_)), "{e}");
        assert!(rollback.await.unwrap().is_err());
        after.await.unwrap().unwrap();
        assert_eq!(
            transactions(&ledger) - before,
            2,
            "the rest ran in a new one"
        );
        assert_eq!(stored_token(&ledger, 0).await, ("rt-0".into(), 0));
        assert_eq!(stored_token(&ledger, 1).await, ("rt-1-new".into(), 1));
    }
}
