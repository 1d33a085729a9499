//! `refresh.max_concurrent` as a priority gate: refreshes wait for a permit in order of
//! urgency, then nearest inactivity deadline, then arrival, whoever started them.
//!
//! A plain semaphore is first-come first-served: after a downtime, a chain whose outcome is
//! unknown (it must be retried inside the reuse leeway) would wait behind every bulk
//! rotation queued before it. Here a waiter can also be raised (a caller joined a queued
//! rotation), and the limit can change at run time (a reload).
//!
//! A permit covers the provider: an attempt whose request has been answered hands its permit
//! to the next waiter while it commits the answer ([`Permit::committing`]), so that a storm's
//! `max_concurrent` requests are not kept waiting for the ledger's commits as well. Shutdown
//! ([`Permits::idle`]) still waits for those commits.

use super::plan::Urgency;
use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use tokio::sync::{Notify, oneshot};

/// The order of waiters: urgency, then inactivity deadline (Unix ms; on a shared ledger the
/// `attempt::permit_order` of it: its 10-minute window, then a per-daemon hash), then arrival.
pub type Priority = (Urgency, i64);

#[derive(Default)]
struct State {
    limit: usize,
    in_use: usize,
    /// Attempts that gave their permit back once the provider answered and are committing
    /// that answer ([`Committing`]): not counted against `limit`, but waited for by `idle`.
    committing: usize,
    closed: bool,
    seq: u64,
    waiters: BTreeMap<(Priority, u64), oneshot::Sender<Permit>>,
    keys: HashMap<u64, Priority>,
}

/// The gate. Cheap to clone.
#[derive(Clone)]
pub struct Permits {
    state: Arc<Mutex<State>>,
    idle: Arc<Notify>,
}

/// A held permit; dropping it hands it to the most urgent waiter.
pub struct Permit {
    /// `None` once handed on by [`Permit::committing`] (its drop then releases nothing).
    permits: Option<Permits>,
}

/// A place in the queue, used to raise its priority while it waits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ticket(u64);

/// An attempt committing its provider's answer after handing its permit on
/// ([`Permit::committing`]); dropped when the commit is over.
pub struct Committing {
    permits: Permits,
}

/// A reserved place in the queue.
pub struct Waiting {
    permits: Permits,
    ticket: Ticket,
    rx: Option<oneshot::Receiver<Permit>>,
}

impl Waiting {
    /// Waits until let in.
    pub async fn wait(mut self) -> Result<Permit, Closed> {
        match self.rx.take() {
            Some(rx) => rx.await.map_err(|_| Closed),
            None => Err(Closed),
        }
    }
}

impl Drop for Waiting {
    /// Leaves the queue (let in, or given up: an attempt that made no request).
    fn drop(&mut self) {
        let mut st = self.permits.lock();
        if let Some(k) = st.keys.remove(&self.ticket.0) {
            st.waiters.remove(&(k, self.ticket.0));
        }
    }
}

/// The gate was closed (shutdown): no new refresh starts.
#[derive(Debug)]
pub struct Closed;

impl Permits {
    /// A gate of `limit` permits (at least one).
    pub fn new(limit: usize) -> Permits {
        Permits {
            state: Arc::new(Mutex::new(State {
                limit: limit.max(1),
                ..State::default()
            })),
            idle: Arc::new(Notify::new()),
        }
    }

    fn lock(&self) -> parking_lot::MutexGuard<'_, State> {
        self.state.lock()
    }

    /// A ticket for a later [`Permits::acquire`]; raising it before or while it waits moves
    /// it ahead.
    pub fn ticket(&self) -> Ticket {
        let mut st = self.lock();
        st.seq += 1;
        Ticket(st.seq)
    }

    /// Waits for a permit at `priority` (or the raised priority of `ticket`).
    pub async fn acquire(&self, ticket: Ticket, priority: Priority) -> Result<Permit, Closed> {
        {
            let mut st = self.lock();
            if st.closed {
                return Err(Closed);
            }
            if st.in_use < st.limit && st.waiters.is_empty() {
                st.keys.remove(&ticket.0);
                st.in_use += 1;
                return Ok(Permit {
                    permits: Some(self.clone()),
                });
            }
        }
        self.reserve(ticket, priority).wait().await
    }

    /// Takes a place in the queue now, without being let in yet even if a permit is free:
    /// a batch of due chains reserves all its places first, then [`Permits::dispatch`] lets
    /// the most urgent in, whatever order their tasks start in.
    pub fn reserve(&self, ticket: Ticket, priority: Priority) -> Waiting {
        let (tx, rx) = oneshot::channel();
        let mut st = self.lock();
        if st.closed {
            drop(tx);
        } else {
            let priority = st
                .keys
                .get(&ticket.0)
                .map_or(priority, |k| (*k).min(priority));
            st.waiters.insert((priority, ticket.0), tx);
            st.keys.insert(ticket.0, priority);
        }
        Waiting {
            permits: self.clone(),
            ticket,
            rx: Some(rx),
        }
    }

    /// Lets waiters in while permits are free.
    pub fn dispatch(&self) {
        self.hand_over();
    }

    /// Moves a waiting (or not yet waiting) ticket up to `priority`, if that is higher.
    pub fn raise(&self, ticket: Ticket, priority: Priority) {
        let mut st = self.lock();
        match st.keys.get(&ticket.0).copied() {
            Some(old) if old <= priority => {}
            Some(old) => {
                if let Some(tx) = st.waiters.remove(&(old, ticket.0)) {
                    st.waiters.insert((priority, ticket.0), tx);
                }
                st.keys.insert(ticket.0, priority);
            }
            None => {
                st.keys.insert(ticket.0, priority);
            }
        }
    }

    /// Forgets a ticket whose attempt ended (a raise may have recorded it without a wait).
    pub fn forget(&self, ticket: Ticket) {
        let mut st = self.lock();
        if let Some(k) = st.keys.remove(&ticket.0) {
            st.waiters.remove(&(k, ticket.0));
        }
    }

    /// How many tickets the gate remembers (waiting or raised): for leak checks.
    #[cfg(test)]
    pub fn remembered(&self) -> usize {
        self.lock().keys.len()
    }

    /// Changes the limit (a reload); waiters are let in at once when it grows.
    pub fn set_limit(&self, limit: usize) {
        self.lock().limit = limit.max(1);
        self.hand_over();
    }

    /// Refuses every waiter and every later acquire (shutdown).
    pub fn close(&self) {
        let mut st = self.lock();
        st.closed = true;
        st.waiters.clear();
    }

    /// Permits in use now (tests: leak checks and diagnostics).
    #[cfg(test)]
    pub fn in_use(&self) -> usize {
        self.lock().in_use
    }

    /// Resolves once no permit is in use and no attempt that held one is still committing.
    pub async fn idle(&self) {
        loop {
            let notified = self.idle.notified();
            if self.lock().is_idle() {
                return;
            }
            notified.await;
        }
    }

    fn release(&self) {
        self.lock().in_use -= 1;
        self.hand_over();
    }

    /// Gives free permits to the most urgent waiters that are still there.
    fn hand_over(&self) {
        loop {
            let mut st = self.lock();
            if st.in_use >= st.limit || st.closed {
                break;
            }
            let Some((_, tx)) = st.waiters.pop_first() else {
                break;
            };
            st.in_use += 1;
            drop(st);
            if let Err(mut p) = tx.send(Permit {
                permits: Some(self.clone()),
            }) {
                // The waiter is gone: take the permit back without re-entering.
                p.permits = None;
                self.lock().in_use -= 1;
            }
        }
        if self.lock().is_idle() {
            self.idle.notify_waiters();
        }
    }
}

impl State {
    fn is_idle(&self) -> bool {
        self.in_use == 0 && self.committing == 0
    }
}

impl Permit {
    /// Hands the permit to the next waiter now and keeps the attempt counted until the
    /// returned guard is dropped: for the commit of a provider's answer, which needs no
    /// request (the attempt still holds its chain's lock; only the provider's concurrency is
    /// given back early).
    pub fn committing(mut self) -> Committing {
        // The permit's own release happens here, with the count moved to `committing`.
        let permits = self.permits.take().expect("a permit is handed on once");
        {
            let mut st = permits.lock();
            st.in_use -= 1;
            st.committing += 1;
        }
        permits.hand_over();
        Committing { permits }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(permits) = self.permits.take() {
            permits.release();
        }
    }
}

impl Drop for Committing {
    fn drop(&mut self) {
        let idle = {
            let mut st = self.permits.lock();
            st.committing -= 1;
            st.is_idle()
        };
        if idle {
            self.permits.idle.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_most_urgent_waiter_goes_first_and_raising_moves_it_up() {
        let p = Permits::new(1);
        let held = p.acquire(p.ticket(), (Urgency::Rotate, 0)).await.unwrap();
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        let raised = p.ticket();
        for (name, ticket, prio) in [
            ("rotate-late", p.ticket(), (Urgency::Rotate, 20)),
            ("rotate-early", p.ticket(), (Urgency::Rotate, 10)),
            ("raised", raised, (Urgency::Rotate, 30)),
            ("recover", p.ticket(), (Urgency::Recover, 99)),
        ] {
            let (p, order) = (p.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                let _permit = p.acquire(ticket, prio).await.unwrap();
                order.lock().push(name);
                tokio::task::yield_now().await;
            }));
            tokio::task::yield_now().await;
        }
        p.raise(raised, (Urgency::Renew, 0));
        drop(held);
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(
            *order.lock(),
            vec!["recover", "raised", "rotate-early", "rotate-late"]
        );
        assert_eq!(p.in_use(), 0);
    }

    #[tokio::test]
    async fn a_vanished_waiter_does_not_keep_its_permit_and_close_refuses() {
        let p = Permits::new(1);
        let held = p.acquire(p.ticket(), (Urgency::Rotate, 0)).await.unwrap();
        let p2 = p.clone();
        let waiter =
            tokio::spawn(async move { p2.acquire(p2.ticket(), (Urgency::Rotate, 0)).await });
        tokio::task::yield_now().await;
        waiter.abort();
        let _ = waiter.await;
        drop(held);
        assert_eq!(p.in_use(), 0);
        let again = p.acquire(p.ticket(), (Urgency::Rotate, 0)).await.unwrap();
        drop(again);
        p.idle().await;
        p.close();
        assert!(p.acquire(p.ticket(), (Urgency::Recover, 0)).await.is_err());
    }

    #[tokio::test]
    async fn a_reserved_batch_is_let_in_by_priority_not_by_arrival() {
        let p = Permits::new(1);
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut waits = Vec::new();
        for (name, prio) in [
            ("late", (Urgency::Rotate, 30)),
            ("early", (Urgency::Rotate, 10)),
            ("mid", (Urgency::Rotate, 20)),
        ] {
            waits.push((name, p.reserve(p.ticket(), prio)));
        }
        let mut tasks = Vec::new();
        for (name, w) in waits {
            let order = order.clone();
            tasks.push(tokio::spawn(async move {
                let _permit = w.wait().await.unwrap();
                order.lock().push(name);
                tokio::task::yield_now().await;
            }));
        }
        p.dispatch();
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(*order.lock(), vec!["early", "mid", "late"]);
    }

    #[tokio::test]
    async fn a_committing_attempt_lets_the_next_in_and_idle_waits_for_its_commit() {
        let p = Permits::new(1);
        let held = p.acquire(p.ticket(), (Urgency::Rotate, 0)).await.unwrap();
        let p2 = p.clone();
        let next = tokio::spawn(async move {
            let permit = p2.acquire(p2.ticket(), (Urgency::Rotate, 0)).await;
            permit.map(drop)
        });
        tokio::task::yield_now().await;
        assert!(!next.is_finished(), "the only permit is taken");
        let committing = held.committing();
        next.await.unwrap().unwrap();
        assert_eq!(p.in_use(), 0);
        let p3 = p.clone();
        let idle = tokio::spawn(async move { p3.idle().await });
        tokio::task::yield_now().await;
        assert!(!idle.is_finished(), "an attempt is still committing");
        drop(committing);
        idle.await.unwrap();
    }

    #[tokio::test]
    async fn a_larger_limit_lets_waiters_in() {
        let p = Permits::new(1);
        let _a = p.acquire(p.ticket(), (Urgency::Rotate, 0)).await.unwrap();
        let p2 = p.clone();
        let b = tokio::spawn(async move {
            p2.acquire(p2.ticket(), (Urgency::Rotate, 0))
                .await
                .map(|_| ())
        });
        tokio::task::yield_now().await;
        p.set_limit(2);
        b.await.unwrap().unwrap();
    }
}
