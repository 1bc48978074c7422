//! Per-worker circuit breaker (closed → open → half-open), the pattern of Nygard's
//! "Release It!" as sglang-router and vllm-router implement it: `failure_threshold`
//! consecutive failures open it; after `open_us` one probe request is let through
//! (half-open); its success closes the breaker, its failure opens it again. A probe that ends with neither
//! (its client went away, the other half of a prefill/decode pair failed first) would hold the breaker
//! half-open for good, so a probe older than `open_us` no longer blocks the next one.

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

/// A circuit breaker, fed the time in µs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CircuitBreaker {
    cfg: BreakerConfig,
    state: BreakerState,
}

impl CircuitBreaker {
    /// A closed breaker.
    pub fn new(cfg: BreakerConfig) -> Self {
        Self {
            cfg,
            state: BreakerState::Closed { failures: 0 },
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
    }

    /// A request failed at `now_us` (only failures that count against the worker).
    pub fn on_failure(&mut self, now_us: u64) {
        if self.cfg.failure_threshold == 0 {
            return;
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
