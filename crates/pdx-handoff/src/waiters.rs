//! The waiters of a hand-off: threads (crossbeam parkers) and async tasks (wakers), woken all at once.
//!
//! A waiter registers, re-checks its condition, and parks (or returns `Pending`); the other side changes the
//! condition, then calls [`Waiters::wake_all`]. Registration counts the waiter with a read-modify-write before
//! the re-check, and `wake_all` reads the count with a read-modify-write after the change. Read-modify-writes of
//! one atomic are totally ordered and each reads the latest value: if the waker's comes first, the waiter's
//! reads from it (acquire from release) and so sees the change; otherwise the waker sees the count. No wake-up
//! is lost, without relying on `SeqCst` store-load ordering (which loom does not model), and with nobody
//! waiting `wake_all` is one uncontended atomic operation: no lock, no system call.

use std::task::Waker;

use crossbeam_utils::sync::Unparker;

use crate::sync::{lock, AtomicUsize, Mutex};
use std::sync::atomic::Ordering::{AcqRel, Acquire};

/// Someone waiting.
pub(crate) enum Waiter {
    /// A blocked thread.
    Thread(Unparker),
    /// An async task.
    Task(Waker),
}

#[derive(Default)]
struct Slots {
    next: u64,
    list: Vec<(u64, Waiter)>,
}

/// The registered waiters.
pub(crate) struct Waiters {
    slots: Mutex<Slots>,
    /// Entries of `slots.list`, written under its lock, read without it by [`Waiters::wake_all`].
    count: AtomicUsize,
}

impl Waiters {
    pub fn new() -> Waiters {
        Waiters {
            slots: Mutex::new(Slots::default()),
            count: AtomicUsize::new(0),
        }
    }

    /// Registers `w`; returns its id. The caller re-checks its condition after this.
    pub fn register(&self, w: Waiter) -> u64 {
        let mut s = lock(&self.slots);
        let id = s.next;
        s.next += 1;
        s.list.push((id, w));
        self.count.fetch_add(1, AcqRel);
        id
    }

    /// Points `id` (a re-polled future's registration) at `waker`, registering it again if it was woken since;
    /// returns its id.
    pub fn update(&self, id: Option<u64>, waker: &Waker) -> u64 {
        if let Some(id) = id {
            let mut s = lock(&self.slots);
            if let Some(entry) = s.list.iter_mut().find(|e| e.0 == id) {
                if !matches!(&entry.1, Waiter::Task(w) if w.will_wake(waker)) {
                    entry.1 = Waiter::Task(waker.clone());
                }
                return id;
            }
        }
        self.register(Waiter::Task(waker.clone()))
    }

    /// Removes `id` if it is still registered (it is not once woken).
    pub fn deregister(&self, id: u64) {
        // The caller registered `id` itself, so it reads its own increment or a later value: 0 means a wake-up
        // has removed it (and everyone else) since.
        if self.count.load(Acquire) == 0 {
            return;
        }
        let mut s = lock(&self.slots);
        if let Some(pos) = s.list.iter().position(|e| e.0 == id) {
            s.list.swap_remove(pos);
            self.count.fetch_sub(1, AcqRel);
        }
    }

    /// Wakes (and removes) every registered waiter. Call it after changing the condition they wait for.
    pub fn wake_all(&self) {
        // A read-modify-write, not a load: see the module docs.
        if self.count.fetch_add(0, AcqRel) == 0 {
            return;
        }
        let woken = {
            let mut s = lock(&self.slots);
            self.count.fetch_sub(s.list.len(), AcqRel);
            std::mem::take(&mut s.list)
        };
        for (_, w) in woken {
            match w {
                Waiter::Thread(u) => u.unpark(),
                Waiter::Task(w) => w.wake(),
            }
        }
    }

    /// Waiters registered now.
    pub fn len(&self) -> usize {
        self.count.load(Acquire)
    }
}
