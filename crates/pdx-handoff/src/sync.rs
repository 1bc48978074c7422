//! The synchronization types the hand-offs are built from: `std`'s normally, loom's under `cfg(loom)`, and a
//! deadline whose timed park may end at any moment under loom (which does not model time).

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicU8, AtomicUsize};
#[cfg(loom)]
pub(crate) use loom::sync::{Condvar, Mutex, MutexGuard};
#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{AtomicU8, AtomicUsize};
#[cfg(not(loom))]
pub(crate) use std::sync::{Condvar, Mutex, MutexGuard};

pub(crate) use crossbeam_utils::sync::Parker;
use std::time::Duration;

/// Locks `m`, taking the data of a poisoned lock as it is (a waiter list or a queue stays valid whatever a
/// panicking holder did).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// When a blocking wait gives up.
pub(crate) struct Deadline {
    #[cfg(not(loom))]
    at: Option<std::time::Instant>,
    #[cfg(loom)]
    bounded: bool,
    #[cfg(loom)]
    parked: std::cell::Cell<bool>,
}

impl Deadline {
    /// `timeout` from now; `None` waits for ever.
    pub fn after(timeout: Option<Duration>) -> Deadline {
        Deadline {
            #[cfg(not(loom))]
            at: timeout.map(|t| {
                let now = std::time::Instant::now();
                now.checked_add(t)
                    .unwrap_or(now + Duration::from_secs(1 << 32))
            }),
            #[cfg(loom)]
            bounded: timeout.is_some(),
            #[cfg(loom)]
            parked: std::cell::Cell::new(false),
        }
    }

    /// True once the deadline has passed.
    pub fn expired(&self) -> bool {
        #[cfg(not(loom))]
        return self.at.is_some_and(|at| std::time::Instant::now() >= at);
        // Under loom a bounded wait times out after its first park: with the scheduler choosing when that park
        // ends, the models see the wait time out before, during and after the other side's hand-off.
        #[cfg(loom)]
        return self.bounded && self.parked.get();
    }

    /// Waits on `cv` (with `guard` of `m`) until notified or the deadline passes (either may also end it early).
    pub fn wait<'a, T>(
        &self,
        cv: &Condvar,
        m: &'a Mutex<T>,
        guard: MutexGuard<'a, T>,
    ) -> MutexGuard<'a, T> {
        #[cfg(not(loom))]
        {
            let _ = m;
            match self.at {
                Some(at) => {
                    let left = at.saturating_duration_since(std::time::Instant::now());
                    cv.wait_timeout(guard, left)
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
                None => cv.wait(guard).unwrap_or_else(|e| e.into_inner()),
            }
        }
        #[cfg(loom)]
        if self.bounded {
            self.parked.set(true);
            drop(guard);
            loom::thread::yield_now();
            lock(m)
        } else {
            cv.wait(guard).unwrap_or_else(|e| e.into_inner())
        }
    }

    /// Parks on `p` until unparked or the deadline passes (either may also end it early).
    pub fn park(&self, p: &Parker) {
        #[cfg(not(loom))]
        match self.at {
            Some(at) => p.park_deadline(at),
            None => p.park(),
        }
        #[cfg(loom)]
        if self.bounded {
            self.parked.set(true);
            loom::thread::yield_now();
        } else {
            p.park();
        }
    }
}
