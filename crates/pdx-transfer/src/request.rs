//! Transfer requests: the READ/WRITE state machine and its completion (pollable, blocking and awaitable).
//!
//! States: `Idle` → `post` → `InProgress` → `Done` | `Failed`; `post` again from `Done` or `Failed` re-runs the
//! same plan without re-validation; `post` while `InProgress` is refused with [`TransferError::InProgress`].

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use crate::error::{Result, TransferError};

/// Direction of a transfer, from the initiator's point of view (NIXL `NIXL_READ` / `NIXL_WRITE`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum XferOp {
    /// Copy remote memory into local memory.
    Read,
    /// Copy local memory into remote memory.
    Write,
}

/// Where a transfer request is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XferStatus {
    /// Created, never posted.
    Idle,
    /// Posted, not complete.
    InProgress,
    /// Complete: every byte moved and the notification (if any) sent.
    Done,
}

#[derive(Debug)]
enum State {
    Idle,
    InProgress,
    Done,
    Failed(TransferError),
}

#[derive(Debug)]
struct Shared {
    state: State,
    waker: Option<Waker>,
}

/// Completion shared by a request and whoever finishes it (the posting thread or a connection thread).
#[derive(Debug)]
pub(crate) struct Completion {
    shared: Mutex<Shared>,
    cv: Condvar,
}

impl Completion {
    pub fn new() -> Arc<Completion> {
        Arc::new(Completion {
            shared: Mutex::new(Shared {
                state: State::Idle,
                waker: None,
            }),
            cv: Condvar::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Idle/Done/Failed → InProgress; refuses when already in progress.
    pub fn begin(&self) -> Result<()> {
        let mut s = self.lock();
        if matches!(s.state, State::InProgress) {
            return Err(TransferError::InProgress);
        }
        s.state = State::InProgress;
        Ok(())
    }

    /// Finishes the current post and wakes blocking and async waiters.
    pub fn finish(&self, result: Result<()>) {
        let waker = {
            let mut s = self.lock();
            s.state = match result {
                Ok(()) => State::Done,
                Err(e) => State::Failed(e),
            };
            s.waker.take()
        };
        self.cv.notify_all();
        if let Some(w) = waker {
            w.wake();
        }
    }

    pub fn status(&self) -> Result<XferStatus> {
        match &self.lock().state {
            State::Idle => Ok(XferStatus::Idle),
            State::InProgress => Ok(XferStatus::InProgress),
            State::Done => Ok(XferStatus::Done),
            State::Failed(e) => Err(e.duplicate()),
        }
    }

    fn outcome(state: &State) -> Option<Result<()>> {
        match state {
            State::InProgress => None,
            State::Done => Some(Ok(())),
            State::Failed(e) => Some(Err(e.duplicate())),
            State::Idle => Some(Err(TransferError::Invalid(
                "transfer request was never posted".into(),
            ))),
        }
    }

    /// The outcome of the current post if it has one (`None` while in progress), without blocking.
    #[cfg_attr(not(feature = "ucx"), allow(dead_code))]
    pub fn try_outcome(&self) -> Option<Result<()>> {
        Self::outcome(&self.lock().state)
    }

    pub fn wait(&self, timeout: Option<Duration>) -> Result<()> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut s = self.lock();
        loop {
            if let Some(r) = Self::outcome(&s.state) {
                return r;
            }
            s = match deadline {
                None => self.cv.wait(s).unwrap_or_else(|e| e.into_inner()),
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(TransferError::InProgress);
                    }
                    self.cv
                        .wait_timeout(s, left)
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
            };
        }
    }

    fn poll(&self, cx: &mut Context<'_>) -> Poll<Result<()>> {
        let mut s = self.lock();
        match Self::outcome(&s.state) {
            Some(r) => Poll::Ready(r),
            None => {
                s.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

/// Future that resolves when the current post of a transfer request completes. Runtime-agnostic: it is woken
/// from whichever thread completes the transfer, so it works under monoio, tokio or any executor.
#[derive(Debug)]
pub struct XferCompletion {
    pub(crate) completion: Arc<Completion>,
}

impl Future for XferCompletion {
    type Output = Result<()>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<()>> {
        self.completion.poll(cx)
    }
}
