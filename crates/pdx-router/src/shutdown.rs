//! Graceful shutdown ("drain"), as a router behind a Kubernetes Service or a load balancer needs it.
//!
//! On SIGTERM or SIGINT (`pdx serve`) or [`crate::RouterServer::shutdown`]:
//! 1. `/ready` answers 503, so health-checking balancers stop sending new requests;
//! 2. every listening socket is shut down, so no new connection is accepted;
//! 3. requests in flight (routed, or streaming their answer) run to their end; their connections then close
//!    (`connection: close` on the last answer), and idle keep-alive connections close within
//!    [`IDLE_DRAIN_CHECK`];
//! 4. when nothing is left, or at the deadline (`--shutdown-timeout-secs`, 30 s by default, Kubernetes' default
//!    grace period), the server threads end. Requests still running at the deadline are dropped, which closes
//!    their upstream connections, so engines abort them and free their KV blocks (as on a client disconnect).

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

/// How often an idle keep-alive connection looks at the drain state while it waits for a request head.
pub const IDLE_DRAIN_CHECK: Duration = Duration::from_secs(1);
/// How often a server thread looks at its open connections once draining.
pub(crate) const DRAIN_POLL: Duration = Duration::from_millis(20);

/// Drain state shared by every server thread.
#[derive(Debug, Default)]
pub struct Drain {
    deadline: OnceLock<Instant>,
    active: AtomicUsize,
    /// Set when the deadline passed with requests still in flight (they were dropped).
    cut_short: AtomicBool,
}

impl Drain {
    /// Starts draining with a deadline `timeout` from now; later calls keep the first deadline.
    pub fn begin(&self, timeout: Duration) {
        let _ = self.deadline.set(Instant::now() + timeout);
    }

    /// True once draining has started.
    pub fn is_draining(&self) -> bool {
        self.deadline.get().is_some()
    }

    /// True once draining has started and its deadline has passed.
    pub fn past_deadline(&self) -> bool {
        self.deadline.get().is_some_and(|d| Instant::now() >= *d)
    }

    /// Records that the deadline passed with requests in flight, if there are any now.
    pub(crate) fn note_deadline(&self) {
        if self.active_requests() > 0 {
            self.cut_short.store(true, Ordering::Relaxed);
        }
    }

    /// True when requests were still in flight at the deadline.
    pub fn was_cut_short(&self) -> bool {
        self.cut_short.load(Ordering::Relaxed)
    }

    /// Requests being routed or answered now, on all threads.
    pub fn active_requests(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    /// Counts one request as active until the guard drops.
    pub fn track(&self) -> ActiveRequest<'_> {
        self.active.fetch_add(1, Ordering::Relaxed);
        ActiveRequest(self)
    }
}

/// One active request ([`Drain::track`]).
#[derive(Debug)]
pub struct ActiveRequest<'a>(&'a Drain);

impl Drop for ActiveRequest<'_> {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Per server thread: ends the connection tasks still running at the drain deadline. Each connection task
/// races its work against [`KillSwitch::killed`]; [`KillSwitch::kill`] wakes them all, so they drop their
/// sockets (client and upstream) at once instead of leaking with the runtime.
#[derive(Debug, Default)]
pub(crate) struct KillSwitch {
    killed: Cell<bool>,
    next_id: Cell<u64>,
    /// Wakers of the connection tasks waiting on [`Killed`], by id (removed when a task ends).
    wakers: RefCell<HashMap<u64, Waker>>,
}

impl KillSwitch {
    /// Ends every [`Killed`] future of this switch.
    pub(crate) fn kill(&self) {
        self.killed.set(true);
        let wakers: Vec<Waker> = self.wakers.borrow_mut().drain().map(|(_, w)| w).collect();
        for w in wakers {
            w.wake();
        }
    }

    /// A future that completes when the switch is killed.
    pub(crate) fn killed(self: &Rc<Self>) -> Killed {
        let id = self.next_id.get();
        self.next_id.set(id + 1);
        Killed {
            switch: self.clone(),
            id,
            registered: false,
        }
    }
}

/// Completes when its [`KillSwitch`] is killed.
#[derive(Debug)]
pub(crate) struct Killed {
    switch: Rc<KillSwitch>,
    id: u64,
    registered: bool,
}

impl Future for Killed {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.switch.killed.get() {
            return Poll::Ready(());
        }
        // A task's waker does not change, so it is stored once: later polls only read the flag.
        if !self.registered {
            self.registered = true;
            let (id, waker) = (self.id, cx.waker().clone());
            self.switch.wakers.borrow_mut().insert(id, waker);
        }
        Poll::Pending
    }
}

impl Drop for Killed {
    fn drop(&mut self) {
        if self.registered {
            self.switch.wakers.borrow_mut().remove(&self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drain_counts_requests_and_keeps_the_first_deadline() {
        let d = Drain::default();
        assert!(!d.is_draining() && !d.past_deadline());
        let a = d.track();
        let b = d.track();
        assert_eq!(d.active_requests(), 2);
        drop(a);
        assert_eq!(d.active_requests(), 1);
        d.begin(Duration::ZERO);
        d.begin(Duration::from_secs(3600)); // ignored: the first deadline stays
        assert!(d.is_draining() && d.past_deadline());
        drop(b);
        assert_eq!(d.active_requests(), 0);
    }

    #[test]
    fn kill_switch_wakes_and_ends_every_waiter_and_forgets_ended_ones() {
        use std::sync::atomic::AtomicUsize;
        use std::sync::Arc;
        use std::task::Wake;
        struct Count(AtomicUsize);
        impl Wake for Count {
            fn wake(self: Arc<Self>) {
                self.0.fetch_add(1, Ordering::Relaxed);
            }
        }
        let sw = Rc::new(KillSwitch::default());
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(count.clone());
        let mut cx = Context::from_waker(&waker);
        let mut a = Box::pin(sw.killed());
        let mut b = Box::pin(sw.killed());
        let mut gone = Box::pin(sw.killed());
        assert!(a.as_mut().poll(&mut cx).is_pending());
        assert!(a.as_mut().poll(&mut cx).is_pending());
        assert!(b.as_mut().poll(&mut cx).is_pending());
        assert!(gone.as_mut().poll(&mut cx).is_pending());
        assert_eq!(sw.wakers.borrow().len(), 3);
        drop(gone); // a connection that ended: its waker is forgotten
        assert_eq!(sw.wakers.borrow().len(), 2);
        sw.kill();
        assert_eq!(count.0.load(Ordering::Relaxed), 2);
        assert!(a.as_mut().poll(&mut cx).is_ready());
        assert!(b.as_mut().poll(&mut cx).is_ready());
        // A waiter made after the kill is done at once.
        let mut late = Box::pin(sw.killed());
        assert!(late.as_mut().poll(&mut cx).is_ready());
    }
}
