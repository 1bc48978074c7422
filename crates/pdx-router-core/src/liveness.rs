//! Heartbeat bookkeeping of a registered worker: it is live while its last heartbeat is at
//! most `ttl_us` old. Statically configured workers have no TTL and never expire.
//!
//! [`HealthCheck`]: what active `GET /health` checks (and connect failures on the request path) say about
//! a worker, and when the next check is due.

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

/// What active health checks know about a worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// Not checked yet. Usable: a router started before (or with) its workers routes to them at once, and
    /// the first failed connect or check marks them down.
    Unknown,
    /// The last check passed, or the worker answered a request.
    Up,
    /// The last check failed, or a connect to it failed: no requests until a check passes.
    Down,
}

/// Active health-check state of one worker, fed the time in µs.
///
/// Checks run every `interval_us` while the worker is up or unknown, and every `recheck_us` (shorter)
/// while it is down or its breaker is open, so a worker that comes back serves again within
/// `recheck_us`, at most one interval.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthCheck {
    state: Health,
    last_start_us: Option<u64>,
    checking: bool,
}

impl Default for HealthCheck {
    fn default() -> Self {
        Self::new()
    }
}

impl HealthCheck {
    /// An unchecked worker.
    pub fn new() -> Self {
        Self {
            state: Health::Unknown,
            last_start_us: None,
            checking: false,
        }
    }

    /// Current state.
    pub fn state(&self) -> Health {
        self.state
    }

    /// True unless the worker is down.
    pub fn usable(&self) -> bool {
        self.state != Health::Down
    }

    /// Whether a check should start at `now_us`: none is running, and none started within `interval_us`
    /// (or within `recheck_us` when the worker is down or `urgent`, e.g. its breaker is open).
    pub fn due(&self, now_us: u64, interval_us: u64, recheck_us: u64, urgent: bool) -> bool {
        if self.checking {
            return false;
        }
        let every = if urgent || self.state == Health::Down {
            recheck_us.min(interval_us)
        } else {
            interval_us
        };
        self.last_start_us
            .is_none_or(|t| now_us.saturating_sub(t) >= every)
    }

    /// A check starts at `now_us`.
    pub fn start(&mut self, now_us: u64) {
        self.checking = true;
        self.last_start_us = Some(now_us);
    }

    /// The check ended: `ok` when the worker answered `GET /health` with a 2xx in time. Returns the
    /// previous state.
    pub fn finish(&mut self, ok: bool) -> Health {
        self.checking = false;
        let old = self.state;
        self.state = if ok { Health::Up } else { Health::Down };
        old
    }

    /// A connect to the worker failed on the request path: down until a check passes. Returns the
    /// previous state.
    pub fn on_unreachable(&mut self) -> Health {
        std::mem::replace(&mut self.state, Health::Down)
    }

    /// The worker answered a request: an unknown worker is up (a down one stays down until its check).
    pub fn on_answered(&mut self) {
        if self.state == Health::Unknown {
            self.state = Health::Up;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_check_schedule_and_states() {
        let (interval, recheck) = (5_000_000, 500_000);
        let mut h = HealthCheck::new();
        assert_eq!(h.state(), Health::Unknown);
        assert!(h.usable(), "unknown workers are usable");
        assert!(
            h.due(0, interval, recheck, false),
            "the first check runs at once"
        );
        h.start(0);
        assert!(
            !h.due(10_000_000, interval, recheck, false),
            "one check at a time"
        );
        assert_eq!(h.finish(false), Health::Unknown);
        assert!(!h.usable());
        // Down: rechecked every `recheck_us`, not every interval.
        assert!(!h.due(400_000, interval, recheck, false));
        assert!(h.due(500_000, interval, recheck, false));
        h.start(500_000);
        assert_eq!(h.finish(true), Health::Down);
        assert!(h.usable());
        // Up: every interval, unless urgent (breaker open).
        assert!(!h.due(1_000_000, interval, recheck, false));
        assert!(h.due(1_000_000, interval, recheck, true));
        assert!(h.due(5_500_000, interval, recheck, false));
        // A failed connect on the request path marks it down at once.
        assert_eq!(h.on_unreachable(), Health::Up);
        assert!(!h.usable());
        h.on_answered();
        assert!(!h.usable(), "only a check brings a down worker back");
        let mut u = HealthCheck::new();
        u.on_answered();
        assert_eq!(u.state(), Health::Up);
        // A recheck period longer than the interval is capped at the interval.
        let mut d = HealthCheck::new();
        d.start(0);
        d.finish(false);
        assert!(d.due(1_000, 1_000, 60_000_000, false));
    }

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
