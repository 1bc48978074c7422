//! Heartbeat bookkeeping of a registered worker: it is live while its last heartbeat is at
//! most `ttl_us` old. Statically configured workers have no TTL and never expire.

/// Liveness of one worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Liveness {
    /// Heartbeat TTL, µs; `None` for static workers.
    pub ttl_us: Option<u64>,
    /// Time of the last heartbeat, µs.
    pub last_beat_us: u64,
}

impl Liveness {
    /// A static worker: never expires.
    pub fn fixed() -> Self {
        Self {
            ttl_us: None,
            last_beat_us: 0,
        }
    }
    /// A registered worker that just sent its first heartbeat.
    pub fn registered(now_us: u64, ttl_us: u64) -> Self {
        Self {
            ttl_us: Some(ttl_us),
            last_beat_us: now_us,
        }
    }
    /// A heartbeat at `now_us`.
    pub fn beat(&mut self, now_us: u64) {
        self.last_beat_us = self.last_beat_us.max(now_us);
    }
    /// True when the heartbeat is overdue at `now_us`.
    pub fn expired(&self, now_us: u64) -> bool {
        self.ttl_us
            .is_some_and(|ttl| now_us.saturating_sub(self.last_beat_us) > ttl)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expires_after_ttl_unless_beating() {
        let mut l = Liveness::registered(1_000, 500);
        assert!(!l.expired(1_500));
        assert!(l.expired(1_501));
        l.beat(1_400);
        assert!(!l.expired(1_900));
        l.beat(100); // out-of-order beat does not move time back
        assert!(l.expired(1_901));
        assert!(!Liveness::fixed().expired(u64::MAX));
    }
}
