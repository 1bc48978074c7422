//! The thread hand-offs of pdx's KV transfer engine (`pdx-transfer`), small enough to model-check with loom:
//!
//! - [`Completion`]: a transfer request's state (`Idle` → `InProgress` → `Done` | `Failed`, re-posted from
//!   either end state), finished by whichever thread completes the transfer and awaited by polling, by a
//!   blocking wait with a timeout, or by any number of async tasks (each future has a waker slot of its own);
//! - [`Mailbox`]: a bounded queue that drops its oldest item when full (an agent's notifications), with `push`,
//!   `take` (everything, oldest first) and a blocking `wait` with a timeout.
//!
//! [`Completion`] hands off through its waiter list: a waiter (a thread's crossbeam
//! [`Parker`](crossbeam_utils::sync::Parker), or a task's `Waker`) registers, re-checks the condition and parks;
//! the finishing side changes the state, then wakes the registered waiters, and touches no lock and makes no
//! system call when nobody waits (a `std` `Condvar::notify_all` makes a `futex` call every time). [`Mailbox`]
//! keeps a mutex and condvar, notified only when someone waits (crossbeam's options measured slower). Both sides
//! go through a read-modify-write of the waiter count, so one of them always sees the other: no wake-up is lost
//! (the loom models in `tests/loom.rs` check it).
//!
//! Under `cfg(loom)` the mutexes, atomics and crossbeam's parker are loom's, and a wait with a timeout may time
//! out at any point (loom does not model time), so the models explore both outcomes.

#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod completion;
mod mailbox;
mod sync;
mod waiters;

pub use completion::{Completion, State, WaiterSlot};
pub use mailbox::Mailbox;
