//! Notifications (NIXL `genNotif` / `getNotifs`): what they are, and the bounded queue an agent receives them in.
//!
//! Every backend delivers the notifications it receives into its agent's one [`NotificationQueue`] (the push
//! model: the `tcp` connections' threads, the listener's handlers, UCX's active-message handler, and agents of
//! this process pushing directly), so `Agent::take_notifications` and `Agent::wait_notifications` see them all
//! in arrival order without polling each backend as NIXL's `getNotifs` does.

use std::time::Duration;

use pdx_handoff::Mailbox;

/// A notification: a payload an agent sent to this one, usually on completion of a transfer (NIXL notifications,
/// e.g. vLLM NixlConnector's "blocks read, free them" message).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notification {
    /// Sending agent's name.
    pub from: String,
    /// The payload (at most 64 KiB).
    pub payload: Vec<u8>,
}

/// Notifications received by an agent, oldest first. Bounded: past its capacity ([`NotificationQueue::CAPACITY`]
/// by default) the oldest are dropped (with a warning) so a consumer that never takes them cannot exhaust memory.
/// A `pdx-handoff` mailbox: a push wakes blocked waiters, and costs no system call when none waits.
#[derive(Debug)]
pub(crate) struct NotificationQueue {
    mailbox: Mailbox<Notification>,
}

impl Default for NotificationQueue {
    fn default() -> Self {
        Self::with_capacity(Self::CAPACITY)
    }
}

impl NotificationQueue {
    /// Notifications kept before the oldest are dropped (1,048,576: at 64 KiB each a hard bound, in practice a
    /// few tens of bytes each).
    pub const CAPACITY: usize = 1 << 20;

    /// A queue that keeps at most `capacity` notifications (at least 1).
    pub fn with_capacity(capacity: usize) -> Self {
        NotificationQueue {
            mailbox: Mailbox::new(capacity),
        }
    }

    /// Delivers `n`, dropping the oldest when full, and wakes waiters.
    pub fn push(&self, n: Notification) {
        if self.mailbox.push(n) {
            tracing::warn!("notification queue full; dropping the oldest");
        }
    }

    /// Takes everything received so far, oldest first.
    pub fn take(&self) -> Vec<Notification> {
        self.mailbox.take()
    }

    /// Waits up to `timeout` for at least one notification, then takes all of them (empty on timeout).
    pub fn wait(&self, timeout: Duration) -> Vec<Notification> {
        self.mailbox.wait(timeout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(i: u8) -> Notification {
        Notification {
            from: "peer".into(),
            payload: vec![i],
        }
    }

    #[test]
    fn take_returns_everything_oldest_first_once() {
        let q = NotificationQueue::default();
        q.push(n(1));
        q.push(n(2));
        assert_eq!(q.take(), vec![n(1), n(2)]);
        assert!(q.take().is_empty());
    }

    #[test]
    fn a_full_queue_drops_the_oldest() {
        let q = NotificationQueue::with_capacity(2);
        for i in 1..=3 {
            q.push(n(i));
        }
        assert_eq!(q.take(), vec![n(2), n(3)]);
    }

    #[test]
    fn wait_returns_empty_on_timeout_and_wakes_on_push() {
        let q = std::sync::Arc::new(NotificationQueue::default());
        assert!(q.wait(Duration::from_millis(10)).is_empty());
        let pusher = {
            let q = q.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(20));
                q.push(n(7));
            })
        };
        // A generous bound: only guards against a hang.
        assert_eq!(q.wait(Duration::from_secs(20)), vec![n(7)]);
        pusher.join().unwrap();
    }
}
