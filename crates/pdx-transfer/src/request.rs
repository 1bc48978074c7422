//! Transfer requests: the READ/WRITE state machine and its completion (pollable, blocking and awaitable).
//!
//! States: `Idle` → `post` → `InProgress` → `Done` | `Failed`; `post` again from `Done` or `Failed` re-runs the
//! same plan without re-validation; `post` while `InProgress` is refused with [`TransferError::InProgress`].

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use pdx_handoff::{State, WaiterSlot};

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

/// Completion shared by a request and whoever finishes it (the posting thread or a connection thread): the
/// hand-off of `pdx-handoff` (an atomic state, crossbeam parkers for blocked threads, a waker per future).
#[derive(Debug)]
pub(crate) struct Completion {
    inner: pdx_handoff::Completion<TransferError>,
}

impl Completion {
    pub fn new() -> Arc<Completion> {
        Arc::new(Completion {
            inner: pdx_handoff::Completion::new(),
        })
    }

    /// Idle/Done/Failed → InProgress; refuses when already in progress.
    pub fn begin(&self) -> Result<()> {
        if self.inner.begin() {
            Ok(())
        } else {
            Err(TransferError::InProgress)
        }
    }

    /// Finishes the current post and wakes blocking and async waiters.
    pub fn finish(&self, result: Result<()>) {
        self.inner.finish(result);
    }

    /// The error of the last failed post.
    fn error(&self) -> TransferError {
        self.inner.with_error(|e| {
            e.map_or_else(
                || TransferError::Invalid("transfer failed".into()),
                TransferError::duplicate,
            )
        })
    }

    pub fn status(&self) -> Result<XferStatus> {
        match self.inner.state() {
            State::Idle => Ok(XferStatus::Idle),
            State::InProgress => Ok(XferStatus::InProgress),
            State::Done => Ok(XferStatus::Done),
            State::Failed => Err(self.error()),
        }
    }

    /// The outcome of a post in `state`, `None` while in progress.
    fn outcome(&self, state: State) -> Option<Result<()>> {
        match state {
            State::InProgress => None,
            State::Done => Some(Ok(())),
            State::Failed => Some(Err(self.error())),
            State::Idle => Some(Err(TransferError::Invalid(
                "transfer request was never posted".into(),
            ))),
        }
    }

    /// The outcome of the current post if it has one (`None` while in progress), without blocking.
    #[cfg_attr(not(feature = "ucx"), allow(dead_code))]
    pub fn try_outcome(&self) -> Option<Result<()>> {
        self.outcome(self.inner.state())
    }

    /// Blocks until the current post completes, or `timeout` passes ([`TransferError::InProgress`]).
    pub fn wait(&self, timeout: Option<Duration>) -> Result<()> {
        let state = self.inner.wait(timeout);
        self.outcome(state)
            .unwrap_or(Err(TransferError::InProgress))
    }
}

/// Future that resolves when the current post of a transfer request completes. Runtime-agnostic: it is woken
/// from whichever thread completes the transfer, so it works under monoio, tokio or any executor. Any number of
/// these futures may wait for one request (each keeps a waker of its own).
#[derive(Debug)]
pub struct XferCompletion {
    completion: Arc<Completion>,
    slot: WaiterSlot,
}

impl XferCompletion {
    pub(crate) fn new(completion: Arc<Completion>) -> XferCompletion {
        XferCompletion {
            completion,
            slot: WaiterSlot::default(),
        }
    }
}

impl Future for XferCompletion {
    type Output = Result<()>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<()>> {
        let this = &mut *self;
        match this.completion.inner.poll(cx, &mut this.slot) {
            Poll::Ready(state) => Poll::Ready(
                this.completion
                    .outcome(state)
                    .unwrap_or(Err(TransferError::InProgress)),
            ),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl Drop for XferCompletion {
    fn drop(&mut self) {
        self.completion.inner.forget(&mut self.slot);
    }
}
