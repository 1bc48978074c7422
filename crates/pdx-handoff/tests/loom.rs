//! loom models of the hand-offs: every interleaving (up to the preemption bound) of the racing sides, with
//! loom's mutexes, atomics and crossbeam's parker. A lost wake-up shows as a deadlock, which loom reports.
//!
//! ```text
//! RUSTFLAGS="--cfg loom --cfg crossbeam_loom" cargo test -p pdx-handoff --test loom --release
//! ```
//! (a target directory of its own, e.g. `CARGO_TARGET_DIR=target/loom`, keeps the normal build's artifacts.)

#![cfg(loom)]

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use loom::sync::Arc;
use loom::thread;
use pdx_handoff::{Completion, Mailbox, State, WaiterSlot};

fn model(f: impl Fn() + Sync + Send + 'static) {
    let mut b = loom::model::Builder::new();
    // Enough to reorder every step of two or three short threads; unbounded runs take minutes.
    b.preemption_bound = Some(3);
    b.check(f);
}

/// A future over a completion, as `pdx_transfer::XferCompletion` is.
struct Done<'a> {
    c: &'a Completion<u8>,
    slot: WaiterSlot,
}

impl Future for Done<'_> {
    type Output = State;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<State> {
        let this = &mut *self;
        this.c.poll(cx, &mut this.slot)
    }
}

impl Drop for Done<'_> {
    fn drop(&mut self) {
        self.c.forget(&mut self.slot);
    }
}

#[test]
fn completion_blocking_wait_races_finish() {
    model(|| {
        let c = Arc::new(Completion::<u8>::new());
        assert!(c.begin());
        let finisher = {
            let c = c.clone();
            thread::spawn(move || c.finish(Err(7)))
        };
        assert_eq!(c.wait(None), State::Failed);
        assert_eq!(c.with_error(|e| e.copied()), Some(7));
        finisher.join().unwrap();
        assert_eq!(c.registered_waiters(), 0);
    });
}

#[test]
fn completion_waker_registration_races_finish() {
    model(|| {
        let c = Arc::new(Completion::<u8>::new());
        assert!(c.begin());
        let finisher = {
            let c = c.clone();
            thread::spawn(move || c.finish(Ok(())))
        };
        let state = loom::future::block_on(Done {
            c: &c,
            slot: WaiterSlot::default(),
        });
        assert_eq!(state, State::Done);
        finisher.join().unwrap();
        assert_eq!(c.registered_waiters(), 0);
    });
}

#[test]
fn completion_two_waiters_and_a_repost() {
    model(|| {
        let c = Arc::new(Completion::<u8>::new());
        assert!(c.begin());
        let waiter = {
            let c = c.clone();
            thread::spawn(move || c.wait(None))
        };
        // Finish, then post again and fail: the waiter returns at an end state of one of the posts, never hangs.
        c.finish(Ok(()));
        let reposted = c.begin();
        assert!(reposted, "nothing else posts");
        let second = {
            let c = c.clone();
            thread::spawn(move || c.begin())
        };
        let refused = !second.join().unwrap();
        assert!(refused, "a post in progress refuses another");
        c.finish(Err(1));
        let seen = waiter.join().unwrap();
        assert!(matches!(seen, State::Done | State::Failed), "{seen:?}");
        assert_eq!(c.registered_waiters(), 0);
    });
}

#[test]
fn completion_wait_with_timeout_races_finish() {
    model(|| {
        let c = Arc::new(Completion::<u8>::new());
        assert!(c.begin());
        let finisher = {
            let c = c.clone();
            thread::spawn(move || c.finish(Ok(())))
        };
        // Times out (InProgress) or sees the end; either way it leaves no registration behind.
        let seen = c.wait(Some(Duration::from_secs(1)));
        assert!(matches!(seen, State::InProgress | State::Done), "{seen:?}");
        finisher.join().unwrap();
        assert_eq!(c.state(), State::Done);
        assert_eq!(c.registered_waiters(), 0);
    });
}

#[test]
fn mailbox_push_take_and_timed_wait_lose_nothing() {
    model(|| {
        let m = Arc::new(Mailbox::new(4));
        let pusher = {
            let m = m.clone();
            thread::spawn(move || {
                m.push(1u8);
                m.push(2u8);
            })
        };
        let waiter = {
            let m = m.clone();
            thread::spawn(move || m.wait(Duration::from_secs(1)))
        };
        let mut got = waiter.join().unwrap();
        pusher.join().unwrap();
        got.extend(m.take());
        assert_eq!(got, vec![1, 2], "each item once, in order");
        assert_eq!(m.registered_waiters(), 0);
    });
}

#[test]
fn mailbox_blocked_waiter_is_woken() {
    model(|| {
        let m = Arc::new(Mailbox::new(4));
        let pusher = {
            let m = m.clone();
            thread::spawn(move || {
                m.push(9u8);
            })
        };
        // An unbounded wait: only a push can end it, so a lost wake-up deadlocks the model.
        let got = m.wait(Duration::MAX);
        assert_eq!(got, vec![9]);
        pusher.join().unwrap();
    });
}

#[test]
fn mailbox_full_drops_the_oldest_only() {
    model(|| {
        let m = Arc::new(Mailbox::new(1));
        let pushers: Vec<_> = [1u8, 2]
            .into_iter()
            .map(|i| {
                let m = m.clone();
                thread::spawn(move || {
                    m.push(i);
                    assert!(m.len() <= 1, "never over capacity");
                })
            })
            .collect();
        let taken = m.take();
        for p in pushers {
            p.join().unwrap();
        }
        let mut all = taken.clone();
        all.extend(m.take());
        // Whatever the order: nothing duplicated, never more than the capacity held.
        assert!(!all.is_empty() && all.len() <= 2, "{all:?}");
        let mut dedup = all.clone();
        dedup.dedup();
        assert_eq!(dedup, all);
    });
}
