//! Per-worker circuit breaker (closed → open → half-open), the pattern of Nygard's
//! "Release It!" as sglang-router and vllm-router implement it: `failure_threshold`
//! consecutive failures open it; after `open_us` one probe request is let through
//! (half-open); its success closes the breaker, its failure opens it again. A probe that ends with neither
//! (its client went away, the other half of a prefill/decode pair failed first) would hold the breaker
//! half-open for good, so a probe older than `open_us` no longer blocks the next one.
//!
//! Failures have a cause. A *reachability* failure (connect refused, the connection broke, no answer in
//! time) says the worker could not be reached; a *service* failure (5xx, 429, a response that cannot be
//! used) says it answered badly. A breaker opened by reachability failures alone is closed by an active
//! health check that reaches the worker again ([`CircuitBreaker::on_reachable`]): a restarted worker
//! serves again within one health-check interval instead of waiting out `open_us` and a probe. A breaker
//! opened by a service failure ignores health checks (`GET /health` says nothing about whether
//! completions work) and waits for its probe.

/// Breaker settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerConfig {
    /// Consecutive failures that open the breaker (0 disables the breaker).
    pub failure_threshold: u32,
    /// How long it stays open before a probe, µs.
    pub open_us: u64,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            failure_threshold: 5,
            open_us: 10_000_000,
        }
    }
}

/// Breaker state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Requests flow; counts consecutive failures.
    Closed {
        /// Consecutive failures so far.
        failures: u32,
    },
    /// No requests until `until_us`.
    Open {
        /// End of the open period, µs.
        until_us: u64,
    },
    /// One probe is allowed; `probing` while it is in flight.
    HalfOpen {
        /// A probe is in flight.
        probing: bool,
        /// When the last probe was let through, µs.
        since_us: u64,
    },
}

/// Why a request failed, for the breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureCause {
    /// The worker could not be reached: connect failed, the connection broke, or no answer in time.
    Unreachable,
    /// The worker answered, badly: 5xx, 429, a response that cannot be used.
    Service,
}

/// A circuit breaker, fed the time in µs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CircuitBreaker {
    cfg: BreakerConfig,
    state: BreakerState,
    /// Every failure since the last success was [`FailureCause::Unreachable`].
    unreachable_only: bool,
}

impl CircuitBreaker {
    /// A closed breaker.
    pub fn new(cfg: BreakerConfig) -> Self {
        Self {
            cfg,
            state: BreakerState::Closed { failures: 0 },
            unreachable_only: true,
        }
    }

    /// Current state.
    pub fn state(&self) -> BreakerState {
        self.state
    }

    /// Whether a request may be sent now, without taking the half-open probe slot.
    pub fn can_send(&self, now_us: u64) -> bool {
        match self.state {
            BreakerState::Closed { .. } => true,
            BreakerState::Open { until_us } => now_us >= until_us,
            BreakerState::HalfOpen { probing, since_us } => {
                !probing || self.probe_expired(since_us, now_us)
            }
        }
    }

    /// Takes permission to send a request now (may move open → half-open and take the probe).
    pub fn acquire(&mut self, now_us: u64) -> bool {
        match self.state {
            BreakerState::Closed { .. } => true,
            BreakerState::Open { until_us } if now_us >= until_us => {
                self.state = BreakerState::HalfOpen {
                    probing: true,
                    since_us: now_us,
                };
                true
            }
            BreakerState::Open { .. } => false,
            BreakerState::HalfOpen { probing, since_us }
                if !probing || self.probe_expired(since_us, now_us) =>
            {
                self.state = BreakerState::HalfOpen {
                    probing: true,
                    since_us: now_us,
                };
                true
            }
            BreakerState::HalfOpen { .. } => false,
        }
    }

    /// A probe let through at `since_us` that has reported nothing for `open_us` is taken as abandoned.
    fn probe_expired(&self, since_us: u64, now_us: u64) -> bool {
        now_us >= since_us.saturating_add(self.cfg.open_us)
    }

    /// A request succeeded.
    pub fn on_success(&mut self) {
        self.state = BreakerState::Closed { failures: 0 };
        self.unreachable_only = true;
    }

    /// A half-open probe got a good response head: the worker answers again, so the breaker closes now
    /// rather than when the probe's body ends (a streamed decode may run for minutes, and while the probe
    /// is out no other request may use the worker). True when it closed.
    pub fn on_probe_answered(&mut self) -> bool {
        if let BreakerState::HalfOpen { .. } = self.state {
            self.on_success();
            return true;
        }
        false
    }

    /// An active health check reached the worker. Closes a breaker that only reachability failures
    /// opened (the worker is back: restarted, or its network healed); a breaker opened by a service
    /// failure stays as it is. True when it closed.
    pub fn on_reachable(&mut self) -> bool {
        match self.state {
            BreakerState::Closed { .. } => false,
            _ if self.unreachable_only => {
                self.on_success();
                true
            }
            _ => false,
        }
    }

    /// A request failed at `now_us` with a service failure (only failures that count against the worker).
    pub fn on_failure(&mut self, now_us: u64) {
        self.on_failure_cause(now_us, FailureCause::Service);
    }

    /// A request failed at `now_us` for `cause` (only failures that count against the worker).
    pub fn on_failure_cause(&mut self, now_us: u64, cause: FailureCause) {
        if self.cfg.failure_threshold == 0 {
            return;
        }
        if cause == FailureCause::Service {
            self.unreachable_only = false;
        }
        self.state = match self.state {
            BreakerState::Closed { failures } if failures + 1 < self.cfg.failure_threshold => {
                BreakerState::Closed {
                    failures: failures + 1,
                }
            }
            _ => BreakerState::Open {
                until_us: now_us.saturating_add(self.cfg.open_us),
            },
        };
    }

    /// True while requests are refused.
    pub fn is_open(&self, now_us: u64) -> bool {
        !self.can_send(now_us)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_threshold_then_probes() {
        let mut b = CircuitBreaker::new(BreakerConfig {
            failure_threshold: 3,
            open_us: 1000,
        });
        b.on_failure(0);
        b.on_failure(1);
        assert!(b.acquire(2));
        b.on_success();
        b.on_failure(3);
        b.on_failure(4);
        assert!(b.can_send(5));
        b.on_failure(5);
        assert_eq!(b.state(), BreakerState::Open { until_us: 1005 });
        assert!(!b.acquire(500));
        assert!(b.is_open(1004));
        // Half-open: exactly one probe.
        assert!(b.acquire(1005));
        assert!(!b.acquire(1006));
        // Probe fails: open again.
        b.on_failure(1010);
        assert_eq!(b.state(), BreakerState::Open { until_us: 2010 });
        assert!(b.acquire(2010));
        b.on_success();
        assert_eq!(b.state(), BreakerState::Closed { failures: 0 });
    }

    #[test]
    fn abandoned_probe_does_not_hold_the_breaker_half_open() {
        let mut b = CircuitBreaker::new(BreakerConfig {
            failure_threshold: 1,
            open_us: 1000,
        });
        b.on_failure(0);
        assert!(b.acquire(1000)); // the probe: it never reports (its client went away)
        assert!(!b.can_send(1500) && !b.acquire(1500));
        // After another open period without an outcome, a new probe goes through; it decides.
        assert!(b.can_send(2000));
        assert!(b.acquire(2000));
        assert!(!b.acquire(2001));
        b.on_success();
        assert_eq!(b.state(), BreakerState::Closed { failures: 0 });
    }

    #[test]
    fn a_health_check_closes_a_breaker_only_unreachability_opened() {
        let cfg = BreakerConfig {
            failure_threshold: 2,
            open_us: 10_000_000,
        };
        let mut b = CircuitBreaker::new(cfg);
        assert!(!b.on_reachable(), "a closed breaker stays closed");
        b.on_failure_cause(0, FailureCause::Unreachable);
        b.on_failure_cause(1, FailureCause::Unreachable);
        assert!(b.is_open(2));
        // The worker restarted: the health check reaches it long before open_us is over.
        assert!(b.on_reachable());
        assert_eq!(b.state(), BreakerState::Closed { failures: 0 });
        assert!(b.acquire(3));

        // One 500 in the streak: the health check says nothing about completions; wait for the probe.
        b.on_failure_cause(10, FailureCause::Unreachable);
        b.on_failure_cause(11, FailureCause::Service);
        assert!(b.is_open(12));
        assert!(!b.on_reachable());
        assert!(b.is_open(12));
        // A success resets the cause.
        assert!(b.acquire(11 + cfg.open_us));
        b.on_success();
        b.on_failure_cause(20, FailureCause::Unreachable);
        b.on_failure_cause(21, FailureCause::Unreachable);
        assert!(b.on_reachable());
    }

    #[test]
    fn a_probe_that_answers_closes_the_breaker_at_its_head() {
        let mut b = CircuitBreaker::new(BreakerConfig {
            failure_threshold: 1,
            open_us: 1000,
        });
        assert!(!b.on_probe_answered(), "closed: nothing to do");
        b.on_failure(0);
        assert!(!b.on_probe_answered(), "open, no probe out: stays open");
        assert!(b.is_open(1));
        assert!(b.acquire(1000));
        assert!(!b.acquire(1001), "the probe is out");
        assert!(b.on_probe_answered());
        assert!(
            b.acquire(1002),
            "closed: requests flow while the probe's body streams"
        );
    }

    #[test]
    fn zero_threshold_disables() {
        let mut b = CircuitBreaker::new(BreakerConfig {
            failure_threshold: 0,
            open_us: 1,
        });
        for t in 0..100 {
            b.on_failure(t);
        }
        assert!(b.acquire(100));
    }
}
