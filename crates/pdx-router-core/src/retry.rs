//! Prefill retry and fallback rules of the vLLM NixlConnector flow.
//!
//! When a prefill attempt fails with a retryable failure (connect error, timeout, 429, 5xx,
//! broken response), the router tries another prefill worker after an exponential backoff
//! (`base · 2^(attempt−1)`, capped), up to `max_attempts` attempts in all. When they are
//! used up (or no prefill worker is left), it either sends the request to a decode worker
//! alone (decode-only fallback: the decode engine computes the prompt itself) or answers 503
//! (504 when the last failure was a timeout). A fatal failure (a 4xx other than 429: the
//! request itself is bad) is passed to the client as is and never retried.

/// Why one upstream attempt failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamFailure {
    /// TCP connect failed or the connection broke before a response.
    Connect,
    /// No response within the upstream timeout.
    Timeout,
    /// An HTTP error status.
    Status(u16),
    /// A 2xx response that could not be used (bad JSON, no `kv_transfer_params`).
    BadResponse,
}

impl UpstreamFailure {
    /// True when another worker may succeed: everything but 4xx other than 429.
    pub fn is_retryable(self) -> bool {
        match self {
            UpstreamFailure::Status(s) => s == 429 || s >= 500,
            _ => true,
        }
    }
    /// True when the worker itself is at fault (counts against its circuit breaker).
    pub fn counts_against_worker(self) -> bool {
        self.is_retryable()
    }
    /// The breaker's view: connect failures and timeouts are [`crate::FailureCause::Unreachable`]
    /// (an active health check that reaches the worker clears them), statuses and unusable responses
    /// [`crate::FailureCause::Service`].
    pub fn cause(self) -> crate::FailureCause {
        match self {
            UpstreamFailure::Connect | UpstreamFailure::Timeout => crate::FailureCause::Unreachable,
            UpstreamFailure::Status(_) | UpstreamFailure::BadResponse => {
                crate::FailureCause::Service
            }
        }
    }
}

/// What to do once prefill is out of attempts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FallbackMode {
    /// Send the request to a decode worker without KV (it prefills locally).
    DecodeOnly,
    /// Answer 503 (504 after a timeout).
    Fail,
}

/// Retry settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    /// Prefill attempts in all, including the first (≥ 1).
    pub max_attempts: u32,
    /// Backoff before the second attempt, µs.
    pub backoff_base_us: u64,
    /// Largest backoff, µs.
    pub backoff_max_us: u64,
    /// After the last attempt.
    pub fallback: FallbackMode,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 3,
            backoff_base_us: 10_000,
            backoff_max_us: 200_000,
            fallback: FallbackMode::DecodeOnly,
        }
    }
}

/// The decision after a failed prefill attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrefillDecision {
    /// Wait `backoff_us`, then try another prefill worker (the failed one excluded).
    Retry {
        /// Backoff, µs.
        backoff_us: u64,
    },
    /// Send the request to a decode worker alone.
    DecodeOnly,
    /// Answer the client with this status (503, or 504 after a timeout).
    Fail {
        /// HTTP status.
        status: u16,
    },
    /// Give the upstream's own error to the client (fatal: the request is bad).
    PassThrough {
        /// The upstream's HTTP status.
        status: u16,
    },
}

impl RetryPolicy {
    /// Decision after attempt number `attempt` (1-based) failed with `failure`;
    /// `workers_left` is how many eligible prefill workers remain untried.
    pub fn on_prefill_failure(
        &self,
        attempt: u32,
        failure: UpstreamFailure,
        workers_left: usize,
    ) -> PrefillDecision {
        if !failure.is_retryable() {
            if let UpstreamFailure::Status(status) = failure {
                return PrefillDecision::PassThrough { status };
            }
        }
        if attempt < self.max_attempts && workers_left > 0 {
            let shift = (attempt - 1).min(20);
            let backoff_us = self
                .backoff_base_us
                .saturating_mul(1 << shift)
                .min(self.backoff_max_us);
            return PrefillDecision::Retry { backoff_us };
        }
        self.exhausted(failure == UpstreamFailure::Timeout)
    }

    /// Decision when no prefill worker could be chosen at all (or attempts ran out).
    pub fn exhausted(&self, timed_out: bool) -> PrefillDecision {
        match self.fallback {
            FallbackMode::DecodeOnly => PrefillDecision::DecodeOnly,
            FallbackMode::Fail => PrefillDecision::Fail {
                status: if timed_out { 504 } else { 503 },
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_with_capped_exponential_backoff() {
        let p = RetryPolicy {
            max_attempts: 5,
            backoff_base_us: 100,
            backoff_max_us: 300,
            fallback: FallbackMode::Fail,
        };
        let f = UpstreamFailure::Status(500);
        assert_eq!(
            p.on_prefill_failure(1, f, 3),
            PrefillDecision::Retry { backoff_us: 100 }
        );
        assert_eq!(
            p.on_prefill_failure(2, f, 3),
            PrefillDecision::Retry { backoff_us: 200 }
        );
        assert_eq!(
            p.on_prefill_failure(3, f, 3),
            PrefillDecision::Retry { backoff_us: 300 }
        );
        assert_eq!(
            p.on_prefill_failure(5, f, 3),
            PrefillDecision::Fail { status: 503 }
        );
        assert_eq!(
            p.on_prefill_failure(5, UpstreamFailure::Timeout, 3),
            PrefillDecision::Fail { status: 504 }
        );
    }

    #[test]
    fn no_workers_left_means_fallback() {
        let p = RetryPolicy::default();
        assert_eq!(
            p.on_prefill_failure(1, UpstreamFailure::Connect, 0),
            PrefillDecision::DecodeOnly
        );
        assert_eq!(
            p.on_prefill_failure(3, UpstreamFailure::Status(502), 9),
            PrefillDecision::DecodeOnly
        );
        assert_eq!(p.exhausted(false), PrefillDecision::DecodeOnly);
    }

    #[test]
    fn client_errors_pass_through_and_429_retries() {
        let p = RetryPolicy::default();
        assert_eq!(
            p.on_prefill_failure(1, UpstreamFailure::Status(400), 5),
            PrefillDecision::PassThrough { status: 400 }
        );
        assert!(matches!(
            p.on_prefill_failure(1, UpstreamFailure::Status(429), 5),
            PrefillDecision::Retry { .. }
        ));
        assert!(matches!(
            p.on_prefill_failure(1, UpstreamFailure::BadResponse, 5),
            PrefillDecision::Retry { .. }
        ));
        assert!(!UpstreamFailure::Status(404).counts_against_worker());
        assert!(UpstreamFailure::Timeout.counts_against_worker());
    }
}
