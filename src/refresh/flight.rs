//! Attempts as tasks the engine owns.
//!
//! A caller that needs a chain refreshed joins the attempt running for it, or starts one; the
//! attempt runs on a task spawned here, never inside the caller's future, so a caller that
//! hangs up (a dropped HTTP connection, a timeout, a cancelled job) changes nothing. Every
//! exit of an attempt goes through [`FlightGuard`]: `finish` settles the outcome and
//! re-plans the chain; if the task ends any other way (a panic, an abort), its `Drop` clears
//! the flight and re-plans a retry. There is no path out of an attempt that leaves a chain
//! unplanned.

use super::permits::Ticket;
use super::plan::Urgency;
use super::{Engine, Failure, Need, Slot, SlotState, attempt};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use tokio::sync::{oneshot, watch};
use tokio::task::AbortHandle;

/// The shared result of one attempt: `None` until it ends.
type Shared = Option<Result<(), Failure>>;

/// A running attempt, as the slot records it.
pub(crate) struct Flight {
    rx: watch::Receiver<Shared>,
    ticket: Ticket,
    /// Started by an operator (or an import): tokend's own backoff does not stop it.
    forced: bool,
}

impl Flight {
    /// Whether this attempt ignores tokend's own backoff.
    pub(crate) fn forced(&self) -> bool {
        self.forced
    }

    /// A handle on this attempt's result.
    pub(crate) fn join(&self) -> Joined {
        Joined {
            rx: self.rx.clone(),
        }
    }
}

/// A caller's handle on an attempt: awaiting it is all a caller does.
pub(crate) struct Joined {
    rx: watch::Receiver<Shared>,
}

impl Joined {
    /// The attempt's result. Dropping this future at any point has no effect on the attempt.
    pub(crate) async fn result(mut self) -> Result<(), Failure> {
        loop {
            if let Some(r) = self.rx.borrow_and_update().clone() {
                return r;
            }
            if self.rx.changed().await.is_err() {
                return self.rx.borrow().clone().unwrap_or_else(|| {
                    Err(Failure::Internal(
                        "the refresh stopped before it finished; it is retried".into(),
                    ))
                });
            }
        }
    }
}

impl Engine {
    /// Joins the attempt running for `slot`, or starts one for `need` on an engine task.
    /// Called with the slot's state locked, so that two callers cannot both start one.
    pub(crate) fn join_or_start(
        self: &Arc<Self>,
        slot: &Arc<Slot>,
        st: &mut SlotState,
        need: Need,
    ) -> Joined {
        if let Some(f) = &st.flight {
            if matches!(need, Need::Lifetime(_) | Need::Forced) {
                // Someone waits now: the queued attempt moves up to a caller's urgency.
                self.permits.raise(f.ticket, (Urgency::Renew, i64::MIN));
            }
            return Joined { rx: f.rx.clone() };
        }
        if self.tasks.stopped() {
            let (_, rx) = watch::channel(Some(Err(Failure::Internal(
                "the refresh engine is stopping".into(),
            ))));
            return Joined { rx };
        }
        let (tx, rx) = watch::channel(None);
        let ticket = self.permits.ticket();
        st.flight = Some(Box::new(Flight {
            rx: rx.clone(),
            ticket,
            forced: need == Need::Forced,
        }));
        // A scheduled attempt reserves its place by priority now; the scheduler lets the
        // batch in once every due chain has reserved.
        let reserved = match need {
            Need::Scheduled(urgency) => {
                let deadline =
                    st.rec.used_at() + super::chrono_dur(self.settings().inactivity_expiry);
                let order =
                    super::attempt::permit_order(self, st.rec.id(), deadline.timestamp_millis());
                Some(self.permits.reserve(ticket, (urgency, order)))
            }
            _ => None,
        };
        let defused = Arc::new(AtomicBool::new(false));
        let guard = FlightGuard {
            engine: self.clone(),
            slot: slot.clone(),
            tx: Some(tx),
            ticket,
            defused: defused.clone(),
        };
        let spawned = self.tasks.spawn(async move {
            // The chain lock is held from before the attempt until its outcome is settled in
            // memory, so that a merge or a removal waiting for it sees the settled state.
            let slot = guard.slot.clone();
            let chain = match slot.chain.try_lock() {
                Some(g) => g,
                None => {
                    // A merge or removal holds it: give up the reserved place (a permit
                    // granted to a task that cannot run yet would starve the others).
                    let mut reserved = reserved;
                    drop(reserved.take());
                    let g = slot.chain.lock().await;
                    return finish_with(guard, g, need, ticket, None).await;
                }
            };
            finish_with(guard, chain, need, ticket, reserved).await
        });
        if let Err(refused) = spawned {
            // The engine stopped between the check above and the spawn: nothing ran. The
            // slot is locked by this very thread, so the guard must not touch it: defuse
            // it, undo the flight here, and let the callers see the closed channel.
            defused.store(true, Ordering::Relaxed);
            drop(refused);
            st.flight = None;
            self.permits.forget(ticket);
        }
        Joined { rx }
    }
}

async fn finish_with(
    guard: FlightGuard,
    chain: super::chain_lock::ChainGuard<'_>,
    need: Need,
    ticket: Ticket,
    reserved: Option<super::permits::Waiting>,
) {
    let mut hold = None;
    let outcome = attempt::run(
        &guard.engine,
        &guard.slot,
        need,
        ticket,
        reserved,
        &mut hold,
    )
    .await;
    guard.finish(outcome);
    // Only now, with a failed commit's change held in the slot, may the gate go idle (drain).
    drop(hold);
    drop(chain);
}

/// Owns the end of one attempt.
struct FlightGuard {
    engine: Arc<Engine>,
    slot: Arc<Slot>,
    tx: Option<watch::Sender<Shared>>,
    ticket: Ticket,
    /// Set by [`Engine::join_or_start`] when the engine refused to spawn the attempt: the
    /// slot is then locked by the very thread dropping the guard, which undoes the flight
    /// itself. Every other drop may (and must) lock the slot.
    defused: Arc<AtomicBool>,
}

impl FlightGuard {
    /// Settles the outcome (the one place that derives state, events, notifications and the
    /// next plan from it), ends the flight and hands the result to every waiting caller.
    /// Should settling panic, `Drop` still ends the flight.
    fn finish(mut self, outcome: attempt::Outcome) {
        let (result, effects) = {
            let mut st = self.slot.lock();
            let settled = attempt::settle(&self.engine, &mut st, outcome);
            attempt::release_claim(&self.engine, &mut st);
            st.flight = None;
            self.engine.replan_locked(&st);
            settled
        };
        let tx = self.tx.take();
        self.engine.permits.forget(self.ticket);
        effects.apply(&self.engine, &self.slot);
        if let Some(tx) = tx {
            let _ = tx.send(Some(result));
        }
    }
}

impl Drop for FlightGuard {
    fn drop(&mut self) {
        let Some(tx) = self.tx.take() else { return };
        if self.defused.load(Ordering::Relaxed) {
            return;
        }
        self.engine.permits.forget(self.ticket);
        // The task ended without settling (a panic or an abort). Memory may be behind the
        // store: reload before the next attempt, plan a retry (a marker, if any, makes it a
        // recovery). This waits for the slot's lock: skipping the clean-up when another
        // thread held it (a scrape, a token request) would leave a dead flight that every
        // caller joins and the scheduler skips, until a restart.
        {
            let mut st = self.slot.lock();
            // A release the engine can no longer send (a crash) just lapses.
            attempt::release_claim(&self.engine, &mut st);
            st.flight = None;
            st.stale = true;
            let retry = tokio::time::Instant::now() + self.engine.settings().backoff_min;
            if self.engine.not_before(&st).is_none_or(|nb| nb < retry) {
                self.engine.set_not_before(&mut st, Some(retry));
                st.claim_wait = false;
            }
            self.engine.replan_locked(&st);
        }
        let _ = tx.send(Some(Err(Failure::Internal(
            "the refresh stopped before it finished; it is retried".into(),
        ))));
    }
}

/// Every task the engine started, so that they can be aborted together (a simulated crash)
/// and so that none is detached from the engine.
#[derive(Default)]
pub(crate) struct Tasks {
    inner: Arc<Mutex<TasksInner>>,
}

#[derive(Default)]
struct TasksInner {
    next: u64,
    handles: HashMap<u64, AbortHandle>,
    aborted: bool,
}

impl Tasks {
    /// Spawns `fut` as an engine task; after [`Tasks::abort_all`] it is refused and handed
    /// back unpolled, for the caller to drop where that is safe.
    pub(crate) fn spawn<F>(&self, fut: F) -> Result<(), F>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let mut inner = self.inner.lock();
        if inner.aborted {
            return Err(fut);
        }
        let id = inner.next;
        inner.next += 1;
        let registry = self.inner.clone();
        let handle = tokio::spawn(async move {
            fut.await;
            registry.lock().handles.remove(&id);
        });
        inner.handles.insert(id, handle.abort_handle());
        Ok(())
    }

    /// Runs `fut` as an engine task and returns a receiver of its result: the caller may drop
    /// the receiver (hang up) without stopping the task.
    pub(crate) fn run<T: Send + 'static>(
        &self,
        fut: impl Future<Output = T> + Send + 'static,
    ) -> oneshot::Receiver<T> {
        let (tx, rx) = oneshot::channel();
        // Refused (the engine stopped): the dropped sender tells the caller.
        let _ = self.spawn(async move {
            let _ = tx.send(fut.await);
        });
        rx
    }

    /// Whether [`Tasks::abort_all`] ran: nothing new may start.
    pub(crate) fn stopped(&self) -> bool {
        self.inner.lock().aborted
    }

    /// Aborts every task (a simulated crash) and refuses new ones.
    #[cfg(test)]
    pub(crate) fn abort_all(&self) {
        let mut inner = self.inner.lock();
        inner.aborted = true;
        for (_, h) in inner.handles.drain() {
            h.abort();
        }
    }
}
