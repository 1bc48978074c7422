//! A transfer request's completion: its state, set by whoever finishes the transfer and awaited by polling,
//! blocking (with a timeout) or async tasks.

use std::sync::atomic::Ordering::{AcqRel, Acquire, Release};
use std::task::{Context, Poll};
use std::time::Duration;

use crate::sync::{lock, AtomicU8, Deadline, Mutex, Parker};
use crate::waiters::{Waiter, Waiters};

const IDLE: u8 = 0;
const IN_PROGRESS: u8 = 1;
const DONE: u8 = 2;
const FAILED: u8 = 3;

/// Where a request is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Never posted.
    Idle,
    /// Posted, not finished.
    InProgress,
    /// Finished successfully.
    Done,
    /// Finished with an error ([`Completion::with_error`] reads it).
    Failed,
}

impl State {
    fn of(raw: u8) -> State {
        match raw {
            IDLE => State::Idle,
            IN_PROGRESS => State::InProgress,
            DONE => State::Done,
            _ => State::Failed,
        }
    }
}

/// The registration of one future (one poller) among a completion's waiters: each future has its own, so any
/// number of tasks can await the same request. Pass the same slot to every [`Completion::poll`] of a future and
/// to [`Completion::forget`] when it is dropped.
#[derive(Debug, Default)]
pub struct WaiterSlot(Option<u64>);

/// A request's completion: `Idle` → [`Completion::begin`] → `InProgress` → [`Completion::finish`] → `Done` or
/// `Failed`, and `begin` again from either end state (a re-post). `finish` wakes every waiter: blocked threads
/// ([`Completion::wait`]) and tasks ([`Completion::poll`]).
///
/// `E` is the error a failed post keeps (read with [`Completion::with_error`]).
pub struct Completion<E> {
    state: AtomicU8,
    /// The error of the last failed post; written before `state` says `Failed`.
    error: Mutex<Option<E>>,
    waiters: Waiters,
}

impl<E> Default for Completion<E> {
    fn default() -> Self {
        Self::new()
    }
}

impl<E> std::fmt::Debug for Completion<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Completion")
            .field("state", &self.state())
            .finish()
    }
}

impl<E> Completion<E> {
    /// An `Idle` completion.
    pub fn new() -> Self {
        Completion {
            state: AtomicU8::new(IDLE),
            error: Mutex::new(None),
            waiters: Waiters::new(),
        }
    }

    /// `Idle`, `Done` or `Failed` → `InProgress`. Returns false, changing nothing, while in progress.
    pub fn begin(&self) -> bool {
        let mut s = self.state.load(Acquire);
        loop {
            if s == IN_PROGRESS {
                return false;
            }
            match self
                .state
                .compare_exchange_weak(s, IN_PROGRESS, AcqRel, Acquire)
            {
                Ok(_) => return true,
                Err(now) => s = now,
            }
        }
    }

    /// Finishes the current post with `result` and wakes every waiter. With nobody waiting this is one store and
    /// one uncontended atomic operation (plus a lock to keep the error, on failure).
    pub fn finish(&self, result: Result<(), E>) {
        let to = match result {
            Ok(()) => DONE,
            Err(e) => {
                *lock(&self.error) = Some(e);
                FAILED
            }
        };
        self.state.store(to, Release);
        self.waiters.wake_all();
    }

    /// The current state.
    pub fn state(&self) -> State {
        State::of(self.state.load(Acquire))
    }

    /// Runs `f` on the error of the last failed post (`None` if no post failed yet).
    pub fn with_error<R>(&self, f: impl FnOnce(Option<&E>) -> R) -> R {
        f(lock(&self.error).as_ref())
    }

    /// Blocks until the state is not `InProgress` or `timeout` passes (`None`: no bound); returns the state then
    /// (`InProgress` only on timeout). Returns at once when not in progress.
    pub fn wait(&self, timeout: Option<Duration>) -> State {
        let s = self.state();
        if s != State::InProgress {
            return s;
        }
        let deadline = Deadline::after(timeout);
        let parker = Parker::new();
        loop {
            let id = self
                .waiters
                .register(Waiter::Thread(parker.unparker().clone()));
            let s = self.state();
            if s != State::InProgress || deadline.expired() {
                self.waiters.deregister(id);
                return s;
            }
            deadline.park(&parker);
            self.waiters.deregister(id);
        }
    }

    /// Polls for the end of the current post: `Ready` with the state when it is not `InProgress`; otherwise
    /// registers `cx`'s waker in `slot` (replacing the one a previous poll of the same future left) and returns
    /// `Pending`.
    pub fn poll(&self, cx: &mut Context<'_>, slot: &mut WaiterSlot) -> Poll<State> {
        let s = self.state();
        if s != State::InProgress {
            self.forget(slot);
            return Poll::Ready(s);
        }
        slot.0 = Some(self.waiters.update(slot.0, cx.waker()));
        let s = self.state();
        if s != State::InProgress {
            self.forget(slot);
            return Poll::Ready(s);
        }
        Poll::Pending
    }

    /// Waiters registered now (diagnostics and tests: it drops back to 0 once every waiter returned).
    pub fn registered_waiters(&self) -> usize {
        self.waiters.len()
    }

    /// Removes the registration in `slot` (a future dropped before it was ready).
    pub fn forget(&self, slot: &mut WaiterSlot) {
        if let Some(id) = slot.0.take() {
            self.waiters.deregister(id);
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::task::Wake;

    struct Flag(std::sync::atomic::AtomicUsize);
    impl Wake for Flag {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, AcqRel);
        }
    }

    #[test]
    fn life_cycle() {
        let c: Completion<String> = Completion::new();
        assert_eq!(c.state(), State::Idle);
        assert_eq!(c.wait(None), State::Idle, "an idle request does not block");
        assert!(c.begin());
        assert!(!c.begin(), "a post in progress refuses another");
        c.finish(Err("boom".into()));
        assert_eq!(c.state(), State::Failed);
        assert_eq!(c.with_error(|e| e.cloned()), Some("boom".to_string()));
        assert!(c.begin(), "re-post after failure");
        assert_eq!(c.wait(Some(Duration::from_millis(5))), State::InProgress);
        c.finish(Ok(()));
        assert_eq!(c.wait(None), State::Done);
        assert_eq!(c.registered_waiters(), 0, "no registration left behind");
    }

    #[test]
    fn every_future_is_woken_and_dropped_ones_deregister() {
        let c: Completion<()> = Completion::new();
        assert!(c.begin());
        let flags: Vec<Arc<Flag>> = (0..3).map(|_| Arc::new(Flag(0.into()))).collect();
        let mut slots: Vec<WaiterSlot> = (0..3).map(|_| WaiterSlot::default()).collect();
        for (f, slot) in flags.iter().zip(&mut slots) {
            let waker = f.clone().into();
            let mut cx = Context::from_waker(&waker);
            assert_eq!(c.poll(&mut cx, slot), Poll::Pending);
            // Polling again keeps one registration per future.
            assert_eq!(c.poll(&mut cx, slot), Poll::Pending);
        }
        assert_eq!(c.registered_waiters(), 3);
        c.forget(&mut slots[2]);
        assert_eq!(c.registered_waiters(), 2);
        c.finish(Ok(()));
        let woken: Vec<usize> = flags.iter().map(|f| f.0.load(Acquire)).collect();
        assert_eq!(
            woken,
            vec![1, 1, 0],
            "the two live futures woken once each, the dropped one not"
        );
        assert_eq!(c.registered_waiters(), 0);
    }

    #[test]
    fn a_blocked_thread_is_woken_by_another() {
        let c: Arc<Completion<()>> = Arc::new(Completion::new());
        assert!(c.begin());
        let finisher = {
            let c = c.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(20));
                c.finish(Ok(()));
            })
        };
        // A generous bound: only a guard against a hang.
        assert_eq!(c.wait(Some(Duration::from_secs(20))), State::Done);
        finisher.join().unwrap();
    }
}
