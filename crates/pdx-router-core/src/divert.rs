//! Deterministic request diversion between two pools of the same role.
//!
//! The global planner (`pdx-planner`, `global::diversions`) decides, when the GPU budget caps a
//! pool below what its load needs, that a fraction of that pool's new requests should go to a
//! pool of the same role with replicas to spare. [`Divert`] applies such a fraction exactly and
//! without randomness, by the credit method `pdx sim` uses: every request adds `fraction` to a
//! credit, and a request is diverted when the credit reaches one (which then drops by one). Over
//! any `N` consecutive requests from the start, exactly `floor(N * fraction)` are diverted.
//!
//! The credit is kept as a request counter (one atomic `fetch_add` per request, no lock): request
//! number `n` (from 0) is diverted when `floor((n + 1) * f) > floor(n * f)`, `f` in fixed point of
//! [`PARTS`] parts.

use crate::CoreError;
use std::sync::atomic::{AtomicU64, Ordering};

/// Fixed-point resolution of a fraction: parts per billion (a fraction is rounded to the nearest).
pub const PARTS: u64 = 1_000_000_000;

/// Diverts `fraction` of the requests offered to it (see the module docs).
#[derive(Debug)]
pub struct Divert {
    /// The fraction, in parts of [`PARTS`], in `1..=PARTS`.
    parts: u64,
    /// Requests offered so far.
    seen: AtomicU64,
}

impl Divert {
    /// A diverter of `fraction` of the requests, starting at no credit.
    ///
    /// Errors: [`CoreError::InvalidSetting`] unless `fraction` is finite and in `(0, 1]` (a fraction
    /// that rounds to zero parts is refused too: it would never divert).
    pub fn new(fraction: f64) -> Result<Self, CoreError> {
        if !(fraction.is_finite() && fraction > 0.0 && fraction <= 1.0) {
            return Err(CoreError::InvalidSetting(format!(
                "diversion fraction must be in (0, 1], got {fraction}"
            )));
        }
        let parts = (fraction * PARTS as f64).round() as u64;
        if parts == 0 {
            return Err(CoreError::InvalidSetting(format!(
                "diversion fraction {fraction} is below 1/{PARTS}"
            )));
        }
        Ok(Self {
            parts: parts.min(PARTS),
            seen: AtomicU64::new(0),
        })
    }

    /// The fraction diverted (after rounding to [`PARTS`]).
    pub fn fraction(&self) -> f64 {
        self.parts as f64 / PARTS as f64
    }

    /// Requests offered so far.
    pub fn seen(&self) -> u64 {
        self.seen.load(Ordering::Relaxed)
    }

    /// Offers one request: whether it is diverted. Thread-safe; concurrent callers each get a
    /// distinct request number, so the exact count holds across threads too.
    pub fn next(&self) -> bool {
        let n = self.seen.fetch_add(1, Ordering::Relaxed);
        Self::diverts(n, self.parts)
    }

    /// Whether request number `n` (from 0) is diverted at `parts` of [`PARTS`].
    fn diverts(n: u64, parts: u64) -> bool {
        let (n, p, q) = (u128::from(n), u128::from(parts), u128::from(PARTS));
        (n + 1) * p / q > n * p / q
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count(f: f64, n: u64) -> u64 {
        let d = Divert::new(f).unwrap();
        (0..n).filter(|_| d.next()).count() as u64
    }

    #[test]
    fn diverts_exactly_the_fraction() {
        for &(f, n) in &[
            (0.5, 100),
            (0.5, 101),
            (0.25, 1000),
            (0.3, 10),
            (0.3, 7),
            (1.0, 17),
            (0.01, 99),
            (0.01, 100),
            (2.0 / 3.0, 9),
        ] {
            let want = (f * n as f64 + 1e-9).floor() as u64;
            assert_eq!(count(f, n), want, "fraction {f} of {n}");
        }
    }

    #[test]
    fn same_order_as_the_simulator_credit() {
        // pdx sim: credit += f; divert when credit >= 1, then credit -= 1.
        let f = 0.375;
        let d = Divert::new(f).unwrap();
        let mut credit = 0.0;
        for i in 0..64 {
            credit += f;
            let sim = credit >= 1.0;
            if sim {
                credit -= 1.0;
            }
            assert_eq!(d.next(), sim, "request {i}");
        }
        assert_eq!(d.seen(), 64);
    }

    #[test]
    fn half_alternates() {
        let d = Divert::new(0.5).unwrap();
        let v: Vec<bool> = (0..6).map(|_| d.next()).collect();
        assert_eq!(v, [false, true, false, true, false, true]);
    }

    #[test]
    fn refuses_bad_fractions() {
        for f in [0.0, -0.5, 1.5, f64::NAN, f64::INFINITY, 1e-12] {
            assert!(Divert::new(f).is_err(), "{f}");
        }
        assert!((Divert::new(1.0).unwrap().fraction() - 1.0).abs() < 1e-12);
    }

    #[test]
    fn no_overflow_far_along() {
        let d = Divert::new(0.5).unwrap();
        d.seen.store(u64::MAX - 2, Ordering::Relaxed);
        let a = d.next();
        let b = d.next();
        assert_ne!(a, b);
    }
}
