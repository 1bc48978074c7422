//! Load predictors: the next adjustment interval's value of a series (request count, ISL, OSL)
//! from the values observed so far, as Dynamo's SLA planner does with its `constant`, `arima`,
//! `prophet` and `kalman` predictors (`components/planner`, "Load Prediction").
//!
//! * [`Predictor::Constant`]: the next value is the last one (Dynamo's `constant`).
//! * [`Predictor::Holt`]: Holt's linear (double exponential) smoothing, a level and a trend
//!   (Holt, "Forecasting seasonals and trends by exponentially weighted moving averages", 1957;
//!   Hyndman & Athanasopoulos, *Forecasting: Principles and Practice*, §8.2):
//!   `level_t = α·y_t + (1 − α)(level_{t−1} + trend_{t−1})`,
//!   `trend_t = β(level_t − level_{t−1}) + (1 − β)·trend_{t−1}`,
//!   forecast `ŷ_{t+1} = level_t + trend_t`, floored at 0 (loads are never negative).
//!   It follows a ramp without the one-interval lag of `constant`, which is what a diurnal
//!   curve's rising and falling flanks need. No crate of the ecosystem was worth a dependency
//!   for these few lines (`augurs` pulls a large stack); this one is tested below.

use serde::{Deserialize, Serialize};

/// Which predictor, with its parameters (TOML: `predictor = { kind = "holt", alpha = 0.5 }`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum PredictorKind {
    /// The last observed value.
    Constant,
    /// Holt's double exponential smoothing.
    Holt {
        /// Level smoothing, `0 < α ≤ 1` (default 0.5).
        #[serde(default = "half")]
        alpha: f64,
        /// Trend smoothing, `0 ≤ β ≤ 1` (default 0.3).
        #[serde(default = "three_tenths")]
        beta: f64,
    },
}

fn half() -> f64 {
    0.5
}
fn three_tenths() -> f64 {
    0.3
}

impl Default for PredictorKind {
    fn default() -> Self {
        PredictorKind::Holt {
            alpha: 0.5,
            beta: 0.3,
        }
    }
}

impl PredictorKind {
    /// Checks the parameters' ranges. Errors: a message naming the bad one.
    pub fn validate(&self) -> Result<(), String> {
        match *self {
            PredictorKind::Constant => Ok(()),
            PredictorKind::Holt { alpha, beta } => {
                if !(alpha > 0.0 && alpha <= 1.0 && (0.0..=1.0).contains(&beta)) {
                    Err(format!(
                        "holt predictor needs 0 < alpha <= 1 and 0 <= beta <= 1 (alpha {alpha}, beta {beta})"
                    ))
                } else {
                    Ok(())
                }
            }
        }
    }
}

/// A predictor's state.
#[derive(Debug, Clone, PartialEq)]
pub struct Predictor {
    kind: PredictorKind,
    level: Option<f64>,
    trend: f64,
    last: Option<f64>,
}

impl Predictor {
    /// A predictor with no observation yet.
    pub fn new(kind: PredictorKind) -> Self {
        Self {
            kind,
            level: None,
            trend: 0.0,
            last: None,
        }
    }

    /// Feeds the value observed over the interval that just ended. Non-finite values are
    /// ignored (an interval without data says nothing about the load).
    pub fn observe(&mut self, y: f64) {
        if !y.is_finite() {
            return;
        }
        if let PredictorKind::Holt { alpha, beta } = self.kind {
            match self.level {
                None => self.level = Some(y),
                Some(l) => {
                    let level = alpha * y + (1.0 - alpha) * (l + self.trend);
                    self.trend = beta * (level - l) + (1.0 - beta) * self.trend;
                    self.level = Some(level);
                }
            }
        }
        self.last = Some(y);
    }

    /// The forecast for the next interval; `None` before the first observation.
    pub fn predict(&self) -> Option<f64> {
        self.predict_ahead(1.0)
    }

    /// The forecast `h` intervals ahead (Holt: `level + h·trend`; constant: the last value).
    /// Planners look past the next interval when new workers take that long to start.
    pub fn predict_ahead(&self, h: f64) -> Option<f64> {
        match self.kind {
            PredictorKind::Constant => self.last,
            PredictorKind::Holt { .. } => self.level.map(|l| (l + h * self.trend).max(0.0)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_repeats_the_last_value() {
        let mut p = Predictor::new(PredictorKind::Constant);
        assert_eq!(p.predict(), None);
        p.observe(3.0);
        p.observe(7.0);
        p.observe(f64::NAN);
        assert_eq!(p.predict(), Some(7.0));
    }

    #[test]
    fn holt_follows_a_ramp_without_lag_and_never_goes_negative() {
        let mut p = Predictor::new(PredictorKind::Holt {
            alpha: 0.5,
            beta: 0.5,
        });
        for t in 0..30 {
            p.observe(10.0 + 2.0 * f64::from(t));
        }
        // After 30 points of y = 10 + 2t the next value is 70; the constant predictor says 68.
        let f = p.predict().unwrap();
        assert!((f - 70.0).abs() < 0.1, "{f}");
        assert!((p.predict_ahead(3.0).unwrap() - 74.0).abs() < 0.2);
        // A steep fall is extrapolated but floored at 0.
        for y in [40.0, 10.0, 0.0, 0.0] {
            p.observe(y);
        }
        assert_eq!(p.predict(), Some(0.0));
        // A flat series converges to its value.
        let mut q = Predictor::new(PredictorKind::default());
        for _ in 0..50 {
            q.observe(5.0);
        }
        assert!((q.predict().unwrap() - 5.0).abs() < 1e-9);
    }

    #[test]
    fn parameters_are_checked_and_parse_from_toml() {
        assert!(PredictorKind::Holt {
            alpha: 0.0,
            beta: 0.1
        }
        .validate()
        .is_err());
        assert!(PredictorKind::Holt {
            alpha: 0.3,
            beta: 1.5
        }
        .validate()
        .is_err());
        #[derive(Deserialize)]
        struct W {
            p: PredictorKind,
        }
        let w: W = toml::from_str("p = { kind = \"holt\", alpha = 0.7 }").unwrap();
        assert_eq!(
            w.p,
            PredictorKind::Holt {
                alpha: 0.7,
                beta: 0.3
            }
        );
        let w: W = toml::from_str("p = { kind = \"constant\" }").unwrap();
        assert_eq!(w.p, PredictorKind::Constant);
        assert!(toml::from_str::<W>("p = { kind = \"arima\" }").is_err());
    }
}
