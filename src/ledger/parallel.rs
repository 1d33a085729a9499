//! Work a load spreads over threads: opening every sealed token of a large ledger is most of
//! start-up (XChaCha20-Poly1305 over three tokens a row), and it needs nothing but the keys,
//! so the rows are read on one thread and opened on several. Both ledgers use it.

use std::num::NonZeroUsize;

/// Items below which [`map`] works on the calling thread alone: starting a thread costs
/// more than opening a few thousand tokens.
const MIN_PER_THREAD: usize = 2048;

/// Threads [`map`] uses at most (the calling one included): the machines tokend runs on have
/// a few cores, and more threads than cores only add switches.
const MAX_THREADS: usize = 4;

/// `f` of every item, in order, on up to [`MAX_THREADS`] threads (one per available core,
/// each with at least [`MIN_PER_THREAD`] items): each takes a contiguous share, the calling
/// thread the first. The error is the first item's in order that failed, as a loop would
/// return it; a panic on any thread is resumed on the calling one.
pub(super) fn map<T, R, E, F>(items: Vec<T>, f: F) -> Result<Vec<R>, E>
where
    T: Send,
    R: Send,
    E: Send,
    F: Fn(T) -> Result<R, E> + Sync,
{
    let cores = std::thread::available_parallelism().map_or(1, NonZeroUsize::get);
    let threads = cores
        .min(MAX_THREADS)
        .min(items.len() / MIN_PER_THREAD)
        .max(1);
    if threads == 1 {
        return items.into_iter().map(f).collect();
    }
    let share = items.len().div_ceil(threads);
    let mut items = items.into_iter();
    let first: Vec<T> = items.by_ref().take(share).collect();
    let f = &f;
    std::thread::scope(|s| {
        let others: Vec<_> = (1..threads)
            .map(|_| {
                let part: Vec<T> = items.by_ref().take(share).collect();
                s.spawn(move || part.into_iter().map(f).collect::<Result<Vec<R>, E>>())
            })
            .collect();
        let mut out = first.into_iter().map(f).collect::<Result<Vec<R>, E>>();
        for other in others {
            let part = other
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            if let Ok(all) = &mut out {
                match part {
                    Ok(mut part) => all.append(&mut part),
                    Err(e) => out = Err(e),
                }
            }
        }
        out
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_item_comes_back_in_order_whatever_the_split() {
        for n in [
            0,
            1,
            MIN_PER_THREAD - 1,
            2 * MIN_PER_THREAD + 1,
            9 * MIN_PER_THREAD + 7,
        ] {
            let items: Vec<usize> = (0..n).collect();
            let out = map(items, |i| Ok::<_, ()>(i * 3)).unwrap();
            assert_eq!(out, (0..n).map(|i| i * 3).collect::<Vec<_>>(), "{n} items");
        }
    }

    #[test]
    fn the_first_failing_item_in_order_is_the_error() {
        let n = 8 * MIN_PER_THREAD;
        // Failures in the last share and in a middle one: the middle one is reported, as a
        // loop over the items would report it.
        let bad = [n - 5, n / 2 + 3, n / 2 + 9];
        let err = map((0..n).collect(), |i| {
            if bad.contains(&i) { Err(i) } else { Ok(i) }
        })
        .unwrap_err();
        assert_eq!(err, n / 2 + 3);
    }

    #[test]
    fn a_panic_on_another_thread_reaches_the_caller() {
        let n = 8 * MIN_PER_THREAD;
        let caught = std::panic::catch_unwind(|| {
            map((0..n).collect::<Vec<usize>>(), |i| {
                assert!(i != n - 1, "the last item");
                Ok::<_, ()>(i)
            })
        });
        assert!(caught.is_err());
    }
}
