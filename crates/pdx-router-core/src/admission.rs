//! Admission shaping of one pool: a limit on concurrent prefills that narrows multiplicatively
//! when the pool's smoothed TTFT exceeds its set point and reopens additively while it is healthy
//! (AIMD, as TCP congestion control: Chiu and Jain, "Analysis of the Increase and Decrease
//! Algorithms for Congestion Avoidance in Computer Networks", 1989), with a bounded FIFO wait
//! queue in front of it. A request arriving to a full queue is refused at once (the router answers
//! 429 with `Retry-After`); one that waits past its deadline is dropped from the queue (503).
//!
//! The limit starts small and grows by one per healthy completion, doubling per round (TCP's slow
//! start), until the smoothed TTFT first goes over half the set point: a pool whose capacity is not
//! known yet is not handed a burst it cannot serve in time, and slow start ends on rising latency
//! before it overshoots (as TCP's HyStart leaves slow start on rising delay rather than on loss).
//!
//! The set point is a fraction of the TTFT target (half by default), because what a client sees is
//! more than the engines' mean: an engine's TTFT spreads around its mean (a prefill waits for the
//! step running when it arrives: between one and two step times), and the wait in this queue comes on
//! top. Holding the mean at half the target and the wait under a quarter of it keeps the admitted
//! requests' p99 near the target. The queue is as long as the pool can drain within the longest wait
//! (Little's law: the limit over the smoothed TTFT is the pool's rate), capped by its configured
//! length, so a request that would time out in it is refused at once instead.
//!
//! Sans-IO: the caller asks [`Admission::request`], gets [`Decision::Admit`], a ticket to wait on,
//! or [`Decision::Reject`]; reports each admitted request's end with [`Admission::release`] (with
//! the TTFT it observed, if any), then hands out the slots [`Admission::next_grant`] returns. A
//! waiter that gives up calls [`Admission::cancel`]. Times are µs on the caller's clock.
//!
//! The TTFT fed back is the engine's part (a prefill request's duration; the first token's delay on
//! an aggregated worker), not the time spent in this queue: the limit tunes how much work the pool's
//! engines take at once, and the queue's own wait is bounded separately by the deadline.
//!
//! A decode pool is shaped the same way on its TPOT ([`Signal::Tpot`]): a slot covers a whole request, taken
//! before its prefill (so no prefill is spent on a request its decode pool cannot take) and held until its
//! stream ends, and the samples are the mean ITL over windows of a stream's token events, fed while it streams
//! ([`Admission::observe`]). A decode engine's step time grows with its batch (vLLM's step: a fixed cost plus a
//! cost per sequence and per context token), so concurrent streams set the TPOT at once, but a stream admitted
//! too many stays for its whole length: the limit is cut to a fraction of the streams in flight (not of itself),
//! so repeated slow samples while the excess drains do not cut it again and again, and slow start lasts until
//! the first cut (an idle decode step is already a large part of the target).

use crate::telemetry::Ewma;
use std::collections::VecDeque;

/// What a pool's latency samples are, which sets what a slot covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// Prefill and aggregated pools: one TTFT sample per request, given with its slot back
    /// ([`Admission::release`]); a slot covers the prefill. The wait queue holds what the pool drains within
    /// the longest wait (Little's law).
    Ttft,
    /// Decode pools: TPOT samples (mean ITL over a window of a stream's token events, [`Admission::observe`])
    /// while a stream holds its slot, from before its prefill to its end; the wait queue is the configured
    /// length.
    Tpot,
}

/// Admission settings of one pool.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdmissionConfig {
    /// What the samples measure.
    pub signal: Signal,
    /// Latency target, µs: TTFT ([`Signal::Ttft`]) or TPOT ([`Signal::Tpot`]).
    pub target_us: u64,
    /// The limit narrows while the pool's smoothed latency is above this fraction of the target, `0 < f ≤ 1`.
    pub setpoint: f64,
    /// Limit at start.
    pub initial_limit: u32,
    /// Smallest limit (at least 1: the pool always takes some work).
    pub min_limit: u32,
    /// Largest limit.
    pub max_limit: u32,
    /// Factor applied to the limit on a decrease, `0 < f < 1`.
    pub decrease_factor: f64,
    /// Added to the limit per limit's worth of healthy completions while the limit is in use (about one
    /// per round of requests, as TCP's congestion avoidance), after slow start.
    pub increase: f64,
    /// Longest wait queue; a request that finds it full is refused.
    pub max_queue: usize,
    /// Longest wait in the queue, µs (a request's own TTFT target, when shorter, bounds it further).
    pub max_wait_us: u64,
    /// EWMA weight of a TTFT sample.
    pub alpha: f64,
    /// `Retry-After` of a refusal, seconds.
    pub retry_after_secs: u32,
}

impl AdmissionConfig {
    /// Defaults around a TTFT target: the smoothed TTFT held at half the target; start at 2 concurrent
    /// prefills in slow start, between 1 and 4096, ×0.7 on a decrease (at most once per target period),
    /// then +1 per round while healthy; a queue of at most 64 waiting at most a quarter of the target; α = 0.3;
    /// `Retry-After: 1`.
    pub fn with_target_us(target_us: u64) -> Self {
        Self {
            signal: Signal::Ttft,
            target_us,
            setpoint: 0.5,
            initial_limit: 2,
            min_limit: 1,
            max_limit: 4096,
            decrease_factor: 0.7,
            increase: 1.0,
            max_queue: 64,
            max_wait_us: target_us / 4,
            alpha: 0.3,
            retry_after_secs: 1,
        }
    }

    /// Defaults of a decode pool around a TPOT target (µs): the smoothed TPOT held at 0.9 of the target (a
    /// stream's TPOT is the mean of its ITLs, which varies less than TTFT); start at 8 concurrent requests
    /// in slow start, between 1 and 4096; a cut goes to 0.8 of the streams in flight; +1 per round while
    /// healthy; a queue of at most 64 waiting at most 100 ms (the wait comes before the prefill, so it adds
    /// to TTFT); α = 0.05 (a sample per window of each stream's tokens); `Retry-After: 1`.
    pub fn for_decode(tpot_target_us: u64) -> Self {
        Self {
            signal: Signal::Tpot,
            setpoint: 0.9,
            initial_limit: 8,
            decrease_factor: 0.8,
            max_wait_us: 100_000,
            alpha: 0.05,
            ..Self::with_target_us(tpot_target_us)
        }
    }

    /// Checks the settings.
    ///
    /// Errors: [`crate::CoreError::InvalidSetting`] for a zero target, limits out of order, a decrease
    /// factor outside `(0, 1)`, a negative increase, or α outside `(0, 1]`.
    pub fn validate(&self) -> Result<(), crate::CoreError> {
        let bad = |m: String| Err(crate::CoreError::InvalidSetting(m));
        if self.target_us == 0 {
            return bad("admission latency target must be above 0".into());
        }
        if self.min_limit == 0
            || self.min_limit > self.max_limit
            || !(self.min_limit..=self.max_limit).contains(&self.initial_limit)
        {
            return bad(format!(
                "admission limits must satisfy 1 <= min ({}) <= initial ({}) <= max ({})",
                self.min_limit, self.initial_limit, self.max_limit
            ));
        }
        if !(self.setpoint > 0.0 && self.setpoint <= 1.0) {
            return bad(format!(
                "admission setpoint must be in (0, 1], got {}",
                self.setpoint
            ));
        }
        if !(self.decrease_factor > 0.0 && self.decrease_factor < 1.0) {
            return bad(format!(
                "admission decrease factor must be in (0, 1), got {}",
                self.decrease_factor
            ));
        }
        if !(self.increase >= 0.0 && self.increase.is_finite()) {
            return bad(format!(
                "admission increase must be >= 0, got {}",
                self.increase
            ));
        }
        if !(self.alpha > 0.0 && self.alpha <= 1.0) {
            return bad(format!(
                "admission alpha must be in (0, 1], got {}",
                self.alpha
            ));
        }
        Ok(())
    }
}

/// A place in the wait queue.
pub type Ticket = u64;

/// The answer to [`Admission::request`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Go now (a slot is taken: [`Admission::release`] it).
    Admit,
    /// Wait for [`Admission::next_grant`] to return this ticket, or [`Admission::cancel`] it.
    Queued(Ticket),
    /// The queue is full: refuse, come back after `retry_after_secs`.
    Reject {
        /// Seconds.
        retry_after_secs: u32,
    },
}

/// What [`Admission::cancel`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cancelled {
    /// The ticket was waiting and is gone.
    Removed,
    /// The ticket is not queued (it was granted a slot: the caller owns that slot).
    NotQueued,
}

/// One pool's admission state.
#[derive(Debug, Clone)]
pub struct Admission {
    cfg: AdmissionConfig,
    limit: f64,
    in_flight: u32,
    queue: VecDeque<(Ticket, u64)>,
    next_ticket: Ticket,
    /// The smoothed latency of the pool's signal (TTFT or TPOT), seconds.
    latency: Ewma,
    last_decrease_us: Option<u64>,
    /// No decrease yet: grow by one per healthy completion.
    slow_start: bool,
}

impl Admission {
    /// A pool's admission at its initial limit.
    pub fn new(cfg: AdmissionConfig) -> Self {
        Self {
            cfg,
            limit: f64::from(cfg.initial_limit.max(1)),
            in_flight: 0,
            queue: VecDeque::new(),
            next_ticket: 1,
            latency: Ewma::default(),
            last_decrease_us: None,
            slow_start: true,
        }
    }

    /// The settings.
    pub fn config(&self) -> &AdmissionConfig {
        &self.cfg
    }

    /// The current limit (whole requests).
    pub fn limit(&self) -> u32 {
        self.limit as u32
    }

    /// Admitted requests not released yet.
    pub fn in_flight(&self) -> u32 {
        self.in_flight
    }

    /// Requests waiting.
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// The pool's smoothed latency (TTFT or TPOT, by [`AdmissionConfig::signal`]), seconds.
    pub fn ewma_s(&self) -> Option<f64> {
        self.latency.get()
    }

    /// How many may wait now: as many as the pool drains within the longest wait at its current rate
    /// (limit over smoothed TTFT), at least one, at most the configured length; the configured length
    /// before the first sample.
    pub fn queue_room(&self) -> usize {
        if self.cfg.signal == Signal::Tpot {
            return self.cfg.max_queue;
        }
        let Some(t) = self.latency.get().filter(|t| *t > 0.0) else {
            return self.cfg.max_queue;
        };
        let drained = self.limit * (self.cfg.max_wait_us as f64 / 1e6) / t;
        (drained.ceil() as usize).clamp(1, self.cfg.max_queue.max(1))
    }

    /// A request arrives at `now_us` and may wait until `deadline_us`. It is admitted when a slot is free
    /// and nobody waits before it (FIFO), queued while the queue has room ([`Admission::queue_room`]),
    /// refused otherwise.
    pub fn request(&mut self, _now_us: u64, deadline_us: u64) -> Decision {
        if self.queue.is_empty() && self.in_flight < self.limit() {
            self.in_flight += 1;
            return Decision::Admit;
        }
        if self.cfg.max_queue == 0 || self.queue.len() >= self.queue_room() {
            return Decision::Reject {
                retry_after_secs: self.cfg.retry_after_secs,
            };
        }
        let t = self.next_ticket;
        self.next_ticket += 1;
        self.queue.push_back((t, deadline_us));
        Decision::Queued(t)
    }

    /// The deadline a request arriving at `now_us` gets: the configured longest wait, shortened by the
    /// request's own TTFT target (µs) when it has one.
    pub fn deadline(&self, now_us: u64, request_target_us: Option<u64>) -> u64 {
        let wait = request_target_us.map_or(self.cfg.max_wait_us, |t| t.min(self.cfg.max_wait_us));
        now_us.saturating_add(wait)
    }

    /// An admitted request ended its prefill (or failed: `ttft_s` `None`) at `now_us`; a decode pool's request
    /// ended its stream, with its last window's TPOT if any. Its slot is free; a sample moves the limit as
    /// [`Admission::observe`] says. Then call [`Admission::next_grant`] until it returns `None`.
    pub fn release(&mut self, sample_s: Option<f64>, now_us: u64) {
        // In use: every slot taken, or someone waiting.
        let was_full = f64::from(self.in_flight) + 1.0 >= self.limit || !self.queue.is_empty();
        self.in_flight = self.in_flight.saturating_sub(1);
        if let Some(x) = sample_s {
            self.adjust(x, now_us, was_full, self.in_flight);
        }
    }

    /// A latency sample (seconds) from a request that keeps its slot (a decode stream's window of ITLs) at
    /// `now_us`. While the smoothed latency is above the set point the limit is cut by the decrease factor:
    /// TTFT pools at most once per target period; decode pools to that fraction of the requests in flight, once
    /// no more are in flight than the limit (the excess of an earlier cut has drained), never up. A decode
    /// sample counts at most 4 × the target (a client that stops reading delays its own stream's token events,
    /// and must not move the pool by more). While it is not, and the limit is in use, the limit grows: by one per sample in slow start (until the
    /// smoothed TTFT first goes over half the set point; a decode pool's until its first cut), by
    /// `increase / limit` after. Non-finite or negative samples are ignored. A cut may leave a waiter's grant
    /// due later; an increase may free a slot: call [`Admission::next_grant`] after.
    pub fn observe(&mut self, sample_s: f64, now_us: u64) {
        let was_full = f64::from(self.in_flight) >= self.limit || !self.queue.is_empty();
        self.adjust(sample_s, now_us, was_full, self.in_flight);
    }

    fn adjust(&mut self, x: f64, now_us: u64, was_full: bool, in_flight: u32) {
        if !(x.is_finite() && x >= 0.0) {
            return;
        }
        let x = match self.cfg.signal {
            Signal::Ttft => x,
            Signal::Tpot => x.min(4.0 * self.cfg.target_us as f64 / 1e6),
        };
        self.latency.feed(x, self.cfg.alpha);
        let Some(e) = self.latency.get() else { return };
        let setpoint_us = self.cfg.setpoint * self.cfg.target_us as f64;
        if self.cfg.signal == Signal::Ttft && e * 1e6 > setpoint_us / 2.0 {
            self.slow_start = false;
        }
        let (lo, hi) = (f64::from(self.cfg.min_limit), f64::from(self.cfg.max_limit));
        if e * 1e6 > setpoint_us {
            match self.cfg.signal {
                Signal::Ttft => {
                    let due = self
                        .last_decrease_us
                        .is_none_or(|t| now_us.saturating_sub(t) >= self.cfg.target_us);
                    if due {
                        self.limit = (self.limit * self.cfg.decrease_factor).max(lo);
                        self.last_decrease_us = Some(now_us);
                    }
                }
                Signal::Tpot => {
                    let cut = (f64::from(in_flight) * self.cfg.decrease_factor).max(lo);
                    if f64::from(in_flight) <= self.limit && cut < self.limit {
                        self.limit = cut;
                    }
                }
            }
            self.slow_start = false;
        } else if was_full {
            let step = if self.slow_start {
                1.0
            } else {
                self.cfg.increase / self.limit
            };
            self.limit = (self.limit + step).min(hi);
        }
    }

    /// The next waiting ticket that may go now (its slot is taken for it), or `None`.
    pub fn next_grant(&mut self) -> Option<Ticket> {
        if self.in_flight >= self.limit() {
            return None;
        }
        let (t, _) = self.queue.pop_front()?;
        self.in_flight += 1;
        Some(t)
    }

    /// A waiter gives up (its deadline passed, or its client went away).
    pub fn cancel(&mut self, ticket: Ticket) -> Cancelled {
        match self.queue.iter().position(|(t, _)| *t == ticket) {
            Some(i) => {
                self.queue.remove(i);
                Cancelled::Removed
            }
            None => Cancelled::NotQueued,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> AdmissionConfig {
        AdmissionConfig {
            initial_limit: 4,
            max_queue: 2,
            alpha: 1.0,
            setpoint: 1.0,
            max_wait_us: 50_000,
            ..AdmissionConfig::with_target_us(100_000)
        }
    }

    #[test]
    fn admits_up_to_the_limit_then_queues_then_refuses() {
        let mut a = Admission::new(cfg());
        for _ in 0..4 {
            assert_eq!(a.request(0, 50_000), Decision::Admit);
        }
        assert_eq!(a.request(0, 50_000), Decision::Queued(1));
        assert_eq!(a.request(0, 50_000), Decision::Queued(2));
        assert_eq!(
            a.request(0, 50_000),
            Decision::Reject {
                retry_after_secs: 1
            }
        );
        assert_eq!((a.in_flight(), a.queued()), (4, 2));
        // A release hands the slot to the first waiter, in order.
        a.release(None, 10);
        assert_eq!(a.next_grant(), Some(1));
        assert_eq!(a.next_grant(), None, "no slot left");
        // The second waiter gives up: gone from the queue; a granted ticket is not queued.
        assert_eq!(a.cancel(2), Cancelled::Removed);
        assert_eq!(a.cancel(1), Cancelled::NotQueued);
        assert_eq!(a.queued(), 0);
        // FIFO: with someone waiting, a newcomer queues even if a slot just freed.
        assert_eq!(a.request(0, 1), Decision::Queued(3));
        a.release(None, 20);
        assert_eq!(a.request(0, 1), Decision::Queued(4));
        assert_eq!(a.next_grant(), Some(3));
    }

    #[test]
    fn the_limit_narrows_multiplicatively_when_ttft_is_over_target_at_most_once_per_period() {
        let mut a = Admission::new(AdmissionConfig {
            initial_limit: 20,
            ..cfg()
        });
        for _ in 0..20 {
            assert_eq!(a.request(0, 0), Decision::Admit);
        }
        a.release(Some(0.5), 1_000);
        assert_eq!(a.limit(), 14, "20 x 0.7");
        // Another slow sample within the same target period: no second cut.
        a.release(Some(0.5), 50_000);
        assert_eq!(a.limit(), 14);
        a.release(Some(0.5), 101_000);
        assert_eq!(a.limit(), 9, "14 x 0.7 = 9.8");
        // Never below the minimum.
        for k in 0..20 {
            a.release(Some(0.5), 202_000 + k * 100_000);
        }
        assert_eq!(a.limit(), 1);
    }

    #[test]
    fn slow_start_doubles_per_round_until_the_first_decrease() {
        let mut a = Admission::new(AdmissionConfig {
            initial_limit: 2,
            max_queue: 0,
            ..cfg()
        });
        // Rounds of healthy completions with every slot in use (a freed slot is taken again at once):
        // 2 -> 4 -> 8 -> 16.
        while a.request(0, 0) == Decision::Admit {}
        for want in [4, 8, 16] {
            let n = a.limit();
            for _ in 0..n {
                a.release(Some(0.01), 0);
                while a.request(0, 0) == Decision::Admit {}
            }
            assert_eq!(a.limit(), want);
        }
        // Over half the set point: slow start is over (about one more per round from now on).
        a.release(Some(0.07), 0);
        assert_eq!(a.limit(), 16);
        assert!(!a.slow_start);
        while a.request(0, 0) == Decision::Admit {}
        // Over the set point: cut.
        a.release(Some(1.0), 0);
        assert_eq!(a.limit(), 11);
        for _ in 0..11 {
            while a.request(0, 0) == Decision::Admit {}
            a.release(Some(0.001), 1);
        }
        let l = a.limit();
        assert!((11..=12).contains(&l), "{l}");
    }

    #[test]
    fn the_limit_reopens_additively_while_healthy_and_in_use_only() {
        let mut a = Admission::new(AdmissionConfig {
            initial_limit: 2,
            ..cfg()
        });
        a.slow_start = false;
        // Healthy samples with the limit not in use: no growth.
        assert_eq!(a.request(0, 0), Decision::Admit);
        for t in 0..10 {
            a.release(Some(0.01), t);
            assert_eq!(a.request(0, 0), Decision::Admit);
        }
        assert_eq!(a.limit(), 2);
        // In use (both slots taken): about +1 per limit's worth of completions.
        let mut done = 0;
        while a.limit() < 4 {
            while a.request(0, 0) == Decision::Admit {}
            // Drain what queued so it does not block later requests.
            while a.queued() > 0 {
                let _ = a.cancel(a.queue[0].0);
            }
            a.release(Some(0.01), 1_000);
            done += 1;
            assert!(done < 20, "limit does not grow: {}", a.limit());
        }
        assert!((4..=8).contains(&done), "{done} completions to grow 2 -> 4");
        assert!(a.limit <= f64::from(a.config().max_limit));
    }

    #[test]
    fn a_cut_limit_admits_nobody_until_in_flight_falls_below_it() {
        let mut a = Admission::new(AdmissionConfig {
            initial_limit: 10,
            max_queue: 8,
            ..cfg()
        });
        for _ in 0..10 {
            assert_eq!(a.request(0, 0), Decision::Admit);
        }
        assert!(matches!(a.request(0, 0), Decision::Queued(_)));
        a.release(Some(1.0), 1);
        assert_eq!(a.limit(), 7);
        assert_eq!(a.in_flight(), 9);
        assert_eq!(a.next_grant(), None, "9 in flight, limit 7");
        a.release(None, 2);
        a.release(None, 3);
        assert_eq!(a.next_grant(), None, "7 in flight, limit 7");
        a.release(None, 4);
        assert!(a.next_grant().is_some());
    }

    #[test]
    fn the_queue_holds_what_the_pool_drains_within_the_longest_wait() {
        let mut a = Admission::new(AdmissionConfig {
            initial_limit: 4,
            max_queue: 64,
            max_wait_us: 250_000,
            target_us: 1_000_000,
            increase: 0.0,
            ..cfg()
        });
        a.slow_start = false;
        assert_eq!(a.queue_room(), 64, "no sample yet: the configured length");
        for _ in 0..4 {
            assert_eq!(a.request(0, 0), Decision::Admit);
        }
        // 4 at a time, 0.5 s each: 8 per second, 2 within a 250 ms wait.
        a.release(Some(0.5), 0);
        assert_eq!(a.limit(), 4);
        assert_eq!(a.request(0, 0), Decision::Admit);
        assert_eq!(a.queue_room(), 2);
        assert!(matches!(a.request(0, 0), Decision::Queued(_)));
        assert!(matches!(a.request(0, 0), Decision::Queued(_)));
        assert!(matches!(a.request(0, 0), Decision::Reject { .. }));
        // The set point is a fraction of the target: 0.5 s is over half of 0.8 s.
        let mut b = Admission::new(AdmissionConfig {
            target_us: 800_000,
            setpoint: 0.5,
            initial_limit: 10,
            ..cfg()
        });
        assert_eq!(b.request(0, 0), Decision::Admit);
        b.release(Some(0.5), 0);
        assert_eq!(b.limit(), 7);
    }

    fn decode_cfg() -> AdmissionConfig {
        AdmissionConfig {
            alpha: 1.0,
            setpoint: 1.0,
            initial_limit: 4,
            max_queue: 3,
            ..AdmissionConfig::for_decode(30_000)
        }
    }

    #[test]
    fn a_decode_pool_grows_by_its_streams_samples_without_freeing_slots() {
        let mut a = Admission::new(decode_cfg());
        while a.request(0, 0) == Decision::Admit {}
        assert_eq!((a.in_flight(), a.limit()), (4, 4));
        // Healthy windows of streams still running: slow start adds one per sample, slots stay taken.
        for _ in 0..4 {
            a.observe(0.012, 0);
        }
        assert_eq!((a.in_flight(), a.limit()), (4, 8));
        // The queued request (one was queued by the loop above) goes first, then newcomers.
        assert!(a.next_grant().is_some());
        while a.request(0, 0) == Decision::Admit {}
        assert_eq!(a.in_flight(), 8);
        // Slow start lasts past half the set point (an idle decode step is already much of the target).
        a.observe(0.025, 0);
        assert!(a.slow_start);
        assert_eq!(a.limit(), 9);
    }

    #[test]
    fn a_decode_pool_cuts_to_a_fraction_of_its_streams_once_while_they_drain() {
        let mut a = Admission::new(AdmissionConfig {
            initial_limit: 20,
            ..decode_cfg()
        });
        for _ in 0..20 {
            assert_eq!(a.request(0, 0), Decision::Admit);
        }
        a.observe(0.040, 10);
        assert_eq!(a.limit(), 16, "0.8 x 20 in flight");
        assert!(!a.slow_start);
        // Still slow while the excess streams run: no second cut until no more are in flight than the limit.
        for t in 0..10 {
            a.observe(0.040, 20 + t);
        }
        assert_eq!(a.limit(), 16);
        for want in [16, 16, 16] {
            a.release(Some(0.040), 100);
            assert_eq!(a.limit(), want, "{} in flight", a.in_flight());
        }
        // 16 in flight, within the limit, still slow: 0.8 x 16; then the new excess drains again.
        a.release(Some(0.040), 100);
        assert_eq!((a.in_flight(), a.limit), (16, 12.8));
        a.release(Some(0.040), 100);
        a.observe(0.040, 200);
        assert_eq!((a.in_flight(), a.limit), (15, 12.8));
        // Healthy again with the limit in use: additive, about +1 per limit's worth of samples.
        a.observe(0.010, 300);
        let l = a.limit;
        assert!((l - (12.8 + 1.0 / 12.8)).abs() < 1e-9, "{l}");
        // A release with no sample (a failed stream) moves nothing.
        a.release(None, 400);
        assert_eq!((a.in_flight(), a.limit()), (14, 12));
    }

    #[test]
    fn a_decode_pool_queues_up_to_its_configured_length() {
        let mut a = Admission::new(decode_cfg());
        while a.request(0, 0) == Decision::Admit {}
        a.observe(0.001, 0);
        // One queued by the loop, two more fit, the fourth is refused whatever the samples say.
        assert_eq!(a.queue_room(), 3);
        assert!(matches!(a.request(0, 0), Decision::Queued(_)));
        assert!(matches!(a.request(0, 0), Decision::Queued(_)));
        assert!(matches!(a.request(0, 0), Decision::Reject { .. }));
        // Bad samples are ignored.
        let before = (a.limit, a.ewma_s());
        a.observe(f64::NAN, 0);
        a.observe(-1.0, 0);
        assert_eq!((a.limit, a.ewma_s()), before);
        // A huge one (a client that stopped reading for 10 s) counts as 4 x the 30 ms target.
        a.observe(10.0, 0);
        assert_eq!(a.ewma_s(), Some(0.120));
    }

    #[test]
    fn deadlines_take_the_shorter_of_the_pool_wait_and_the_request_target() {
        let a = Admission::new(cfg());
        assert_eq!(a.deadline(1_000, None), 51_000);
        assert_eq!(a.deadline(1_000, Some(20_000)), 21_000);
        assert_eq!(a.deadline(1_000, Some(900_000)), 51_000);
    }

    #[test]
    fn settings_are_checked() {
        assert!(cfg().validate().is_ok());
        for c in [
            AdmissionConfig {
                target_us: 0,
                ..cfg()
            },
            AdmissionConfig {
                min_limit: 0,
                ..cfg()
            },
            AdmissionConfig {
                initial_limit: 5000,
                ..cfg()
            },
            AdmissionConfig {
                decrease_factor: 1.0,
                ..cfg()
            },
            AdmissionConfig {
                increase: -1.0,
                ..cfg()
            },
            AdmissionConfig {
                alpha: 0.0,
                ..cfg()
            },
            AdmissionConfig {
                setpoint: 0.0,
                ..cfg()
            },
        ] {
            assert!(c.validate().is_err(), "{c:?}");
        }
    }
}
