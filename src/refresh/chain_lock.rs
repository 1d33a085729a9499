//! The slot's chain lock: an async mutex of one byte, its waiters parked in one process-wide
//! table only while it is contended.
//!
//! Every slot holds one (`Slot::chain`): the attempt, a merge and a removal hold it for their
//! whole duration, provider call included, so that one refresh at most is in flight per
//! connection (ARCHITECTURE.md's second invariant). A `tokio::sync::Mutex<()>` carries its
//! own wait list in every slot (40 bytes, 4 MB at 100,000 connections), yet nearly every
//! acquisition is uncontended: only a merge or a removal racing an attempt ever waits. So
//! the lock is a byte of state, and the waiters of a contended lock wait in [`PARKED`]'s
//! table, keyed by the lock's address (stable: a waiter and a guard borrow the lock, so it
//! can neither move nor be freed while either exists, and its entry leaves the table
//! before the last waiter does).
//!
//! The rules that make it correct, each checked by a test below:
//! - mutual exclusion: the lock is taken only by a compare-and-swap from unlocked, or handed
//!   by the releasing owner directly to the first waiter (the state stays locked);
//! - no lost wake-up: a waiter marks the state [`HAS_WAITERS`] (a compare-and-swap from
//!   locked) and enqueues itself under the table's mutex; an owner whose release finds that
//!   bit takes the same mutex, so it either sees the waiter or the waiter sees it unlocked;
//! - cancellation: a waiter dropped at its await leaves the queue (the last one clears the
//!   bit); one dropped after the lock was handed to it, before it saw that, hands it on or
//!   releases it; a guard dropped (also by a panic's unwinding) releases the lock;
//! - first come, first served among the waiters, so none starves. No timer is involved: it
//!   works the same under tokio's paused clock (the simulation).

use parking_lot::Mutex;
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, LazyLock};
use std::task::{Context, Poll, Waker};

/// The state bit of a held lock.
const LOCKED: u8 = 1;

/// The state bit saying that the table holds waiters of this lock; only ever set with
/// [`LOCKED`], and changed only under the table's mutex.
const HAS_WAITERS: u8 = 2;

/// A waiter in the table.
struct Waiter {
    /// Set (under the table's mutex) when the releasing owner handed the lock to this
    /// waiter: from then on the waiter owns it, whether or not it is polled again.
    granted: Arc<AtomicBool>,
    /// What wakes the waiting task.
    waker: Waker,
}

/// The waiters of every contended chain lock, by the lock's address, first come first.
/// A lock without waiters has no entry: an idle slot costs nothing here.
static PARKED: LazyLock<Mutex<HashMap<usize, VecDeque<Waiter>>>> = LazyLock::new(Default::default);

/// An async mutual-exclusion lock of one byte, guarding no data (the chain's state is
/// behind the slot's own lock): who holds it may run an attempt, a merge or a removal.
#[derive(Default)]
pub(crate) struct ChainLock {
    /// [`LOCKED`] and [`HAS_WAITERS`].
    state: AtomicU8,
}

/// Holds a [`ChainLock`]; dropping it releases the lock (or hands it to the first waiter).
#[must_use = "the lock is released when the guard is dropped"]
pub(crate) struct ChainGuard<'a> {
    /// The lock held.
    lock: &'a ChainLock,
}

/// The future of [`ChainLock::lock`].
#[must_use = "futures do nothing unless awaited"]
pub(crate) struct Acquire<'a> {
    /// The lock wanted.
    lock: &'a ChainLock,
    /// This waiter's flag, once it is in the table (`None`: not queued, or done).
    queued: Option<Arc<AtomicBool>>,
}

impl ChainLock {
    /// An unlocked lock.
    pub(crate) const fn new() -> ChainLock {
        ChainLock {
            state: AtomicU8::new(0),
        }
    }

    /// The lock if nobody holds it now.
    pub(crate) fn try_lock(&self) -> Option<ChainGuard<'_>> {
        self.state
            .compare_exchange(0, LOCKED, Ordering::Acquire, Ordering::Relaxed)
            .ok()
            .map(|_| ChainGuard { lock: self })
    }

    /// Waits for the lock. Cancellation-safe: dropping the future at any point leaves the
    /// lock as if it had never been asked for.
    pub(crate) fn lock(&self) -> Acquire<'_> {
        Acquire {
            lock: self,
            queued: None,
        }
    }

    /// The table's key of this lock: its address.
    fn key(&self) -> usize {
        std::ptr::from_ref(self).addr()
    }

    /// Releases the lock held by the caller.
    fn unlock(&self) {
        if self
            .state
            .compare_exchange(LOCKED, 0, Ordering::Release, Ordering::Relaxed)
            .is_ok()
        {
            return;
        }
        // Waiters: hand the lock to the first.
        let wake = self.hand_off(&mut PARKED.lock());
        if let Some(waker) = wake {
            waker.wake();
        }
    }

    /// With the lock held by the caller and the table locked: hands the lock to the first
    /// waiter (the state stays locked; its bit of waiters cleared if it was the last) and
    /// returns what wakes it, or releases the lock when nobody waits.
    fn hand_off(&self, table: &mut HashMap<usize, VecDeque<Waiter>>) -> Option<Waker> {
        let key = self.key();
        let next = table.get_mut(&key).and_then(VecDeque::pop_front);
        if table.get(&key).is_some_and(VecDeque::is_empty) {
            table.remove(&key);
        }
        match next {
            Some(waiter) => {
                if !table.contains_key(&key) {
                    self.state.store(LOCKED, Ordering::Relaxed);
                }
                waiter.granted.store(true, Ordering::Release);
                Some(waiter.waker)
            }
            None => {
                self.state.store(0, Ordering::Release);
                None
            }
        }
    }

    /// How many waiters of this lock the table holds (tests only).
    #[cfg(test)]
    fn waiters(&self) -> usize {
        PARKED.lock().get(&self.key()).map_or(0, VecDeque::len)
    }
}

impl<'a> Future for Acquire<'a> {
    type Output = ChainGuard<'a>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<ChainGuard<'a>> {
        let lock = self.lock;
        if let Some(granted) = &self.queued {
            if granted.load(Ordering::Acquire) {
                self.queued = None;
                return Poll::Ready(ChainGuard { lock });
            }
            let mut table = PARKED.lock();
            // Granted meanwhile? Under the mutex, the answer cannot change.
            if granted.load(Ordering::Acquire) {
                drop(table);
                self.queued = None;
                return Poll::Ready(ChainGuard { lock });
            }
            let me = table
                .get_mut(&lock.key())
                .and_then(|q| q.iter_mut().find(|w| Arc::ptr_eq(&w.granted, granted)))
                .expect("a waiter not granted the lock is in the table");
            if !me.waker.will_wake(cx.waker()) {
                me.waker = cx.waker().clone();
            }
            return Poll::Pending;
        }
        if lock
            .state
            .compare_exchange(0, LOCKED, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
        {
            return Poll::Ready(ChainGuard { lock });
        }
        let mut table = PARKED.lock();
        let mut state = lock.state.load(Ordering::Relaxed);
        loop {
            if state & LOCKED == 0 {
                // Released meanwhile (then nobody waits: waiters keep it locked).
                match lock.state.compare_exchange(
                    state,
                    state | LOCKED,
                    Ordering::Acquire,
                    Ordering::Relaxed,
                ) {
                    Ok(_) => return Poll::Ready(ChainGuard { lock }),
                    Err(now) => state = now,
                }
                continue;
            }
            // Locked: say that a waiter is coming, so that the owner's release takes the
            // table's mutex (which this thread holds) and finds it.
            match lock.state.compare_exchange(
                state,
                state | HAS_WAITERS,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => break,
                Err(now) => state = now,
            }
        }
        let granted = Arc::new(AtomicBool::new(false));
        table.entry(lock.key()).or_default().push_back(Waiter {
            granted: granted.clone(),
            waker: cx.waker().clone(),
        });
        drop(table);
        self.queued = Some(granted);
        Poll::Pending
    }
}

impl Drop for Acquire<'_> {
    fn drop(&mut self) {
        let Some(granted) = self.queued.take() else {
            return;
        };
        let wake = {
            let mut table = PARKED.lock();
            if granted.load(Ordering::Acquire) {
                // Handed over, but this waiter is gone: hand it on (or release it).
                self.lock.hand_off(&mut table)
            } else {
                let key = self.lock.key();
                if let Some(q) = table.get_mut(&key) {
                    q.retain(|w| !Arc::ptr_eq(&w.granted, &granted));
                    if q.is_empty() {
                        table.remove(&key);
                        self.lock.state.fetch_and(!HAS_WAITERS, Ordering::Relaxed);
                    }
                }
                None
            }
        };
        if let Some(waker) = wake {
            waker.wake();
        }
    }
}

impl Drop for ChainGuard<'_> {
    fn drop(&mut self) {
        self.lock.unlock();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    /// Polls a future once, with a waker that does nothing.
    fn poll_once<F: Future + Unpin>(f: &mut F) -> Poll<F::Output> {
        Pin::new(f).poll(&mut Context::from_waker(Waker::noop()))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn many_tasks_never_hold_it_together() {
        let lock = Arc::new(ChainLock::new());
        let inside = Arc::new(AtomicUsize::new(0));
        let done = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..32)
            .map(|_| {
                let (lock, inside, done) = (lock.clone(), inside.clone(), done.clone());
                tokio::spawn(async move {
                    for i in 0..300 {
                        let _g = if i % 3 == 0 {
                            match lock.try_lock() {
                                Some(g) => g,
                                None => lock.lock().await,
                            }
                        } else {
                            lock.lock().await
                        };
                        assert_eq!(inside.fetch_add(1, Ordering::SeqCst), 0, "two holders");
                        if i % 2 == 0 {
                            tokio::task::yield_now().await;
                        }
                        assert_eq!(inside.fetch_sub(1, Ordering::SeqCst), 1, "two holders");
                        done.fetch_add(1, Ordering::SeqCst);
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(done.load(Ordering::SeqCst), 32 * 300);
        assert!(lock.try_lock().is_some(), "free at the end");
        assert_eq!(lock.waiters(), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn waiters_dropped_at_their_await_leave_it_usable() {
        // Half the tasks give up after a moment (a `timeout` drops their future while it
        // waits, or just after the lock was handed to it); the others must all get it.
        let lock = Arc::new(ChainLock::new());
        let inside = Arc::new(AtomicUsize::new(0));
        let got = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..64)
            .map(|n| {
                let (lock, inside, got) = (lock.clone(), inside.clone(), got.clone());
                tokio::spawn(async move {
                    for i in 0..100 {
                        let g = if (n + i) % 2 == 0 {
                            let wait = Duration::from_micros(((n * 7 + i) % 50) as u64);
                            match tokio::time::timeout(wait, lock.lock()).await {
                                Ok(g) => g,
                                Err(_) => continue,
                            }
                        } else {
                            lock.lock().await
                        };
                        assert_eq!(inside.fetch_add(1, Ordering::SeqCst), 0, "two holders");
                        tokio::task::yield_now().await;
                        inside.fetch_sub(1, Ordering::SeqCst);
                        got.fetch_add(1, Ordering::SeqCst);
                        drop(g);
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        assert!(
            got.load(Ordering::SeqCst) >= 32 * 100,
            "every patient waiter got it"
        );
        assert_eq!(lock.waiters(), 0, "no waiter stranded in the table");
        assert!(lock.try_lock().is_some(), "free at the end");
    }

    #[test]
    fn a_waiter_dropped_after_the_hand_over_hands_it_on() {
        let lock = ChainLock::new();
        let held = lock.try_lock().expect("free");
        let (mut first, mut second, mut third) = (lock.lock(), lock.lock(), lock.lock());
        assert!(poll_once(&mut first).is_pending());
        assert!(poll_once(&mut second).is_pending());
        assert!(poll_once(&mut third).is_pending());
        assert_eq!(lock.waiters(), 3);
        assert!(lock.try_lock().is_none());
        // The third gives up while it waits: it leaves the queue.
        drop(third);
        assert_eq!(lock.waiters(), 2);
        // The owner releases: the first is handed the lock, but is dropped before it is
        // polled again; it must hand it on to the second.
        drop(held);
        assert_eq!(lock.waiters(), 1);
        assert!(lock.try_lock().is_none(), "handed over, not released");
        drop(first);
        assert_eq!(lock.waiters(), 0);
        assert!(lock.try_lock().is_none(), "handed on to the second");
        let Poll::Ready(g) = poll_once(&mut second) else {
            panic!("the second waiter owns the lock");
        };
        assert!(lock.try_lock().is_none());
        drop(g);
        drop(second);
        assert!(lock.try_lock().is_some(), "released");
        // A waiter that is the last and was handed the lock, dropped unpolled: released.
        let held = lock.try_lock().expect("free");
        let mut only = lock.lock();
        assert!(poll_once(&mut only).is_pending());
        drop(held);
        drop(only);
        assert_eq!(lock.waiters(), 0);
        assert!(lock.try_lock().is_some(), "released by the dropped waiter");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_guard_dropped_by_a_panic_releases_it() {
        let lock = Arc::new(ChainLock::new());
        let holder = {
            let lock = lock.clone();
            tokio::spawn(async move {
                let _g = lock.lock().await;
                tokio::task::yield_now().await;
                panic!("the attempt panicked while holding the chain lock");
            })
        };
        let waiter = {
            let lock = lock.clone();
            tokio::spawn(async move {
                let _g = lock.lock().await;
            })
        };
        assert!(holder.await.is_err(), "the holder panicked");
        waiter
            .await
            .expect("the waiter got the lock after the panic");
        assert!(lock.try_lock().is_some());
        assert_eq!(lock.waiters(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn works_under_the_paused_clock() {
        let lock = Arc::new(ChainLock::new());
        let held = lock.lock().await;
        let gave_up = tokio::time::timeout(Duration::from_secs(5), lock.lock()).await;
        assert!(gave_up.is_err(), "held: the waiter times out");
        assert_eq!(lock.waiters(), 0);
        let waiter = {
            let lock = lock.clone();
            tokio::spawn(async move {
                let _g = lock.lock().await;
                tokio::time::sleep(Duration::from_secs(60)).await;
            })
        };
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(lock.waiters(), 1);
        drop(held);
        waiter.await.unwrap();
        assert!(lock.try_lock().is_some());
    }

    #[test]
    fn it_is_one_byte() {
        assert_eq!(std::mem::size_of::<ChainLock>(), 1);
    }
}
