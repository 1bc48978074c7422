//! Global router: pool selection on NVIDIA Dynamo's grid.
//!
//! Format and formula: Dynamo `components/src/dynamo/global_router/pool_selection.py` and
//! `examples/hierarchical_planner/global_router_config.json`. For an axis with `min`, `max`
//! and `resolution`, the cell of a value `x` is
//! `clamp(floor((x - min) / ((max - min) / resolution)), 0, resolution - 1)`.
//! A missing SLO target takes the middle of its range, `(min + max) / 2`.
//! The prefill pool is `prefill_pool_mapping[isl_cell][ttft_cell]`, the decode pool
//! `decode_pool_mapping[context_length_cell][itl_cell]`.
//!
//! Dynamo's newer unit-suffixed names (`ttft_min_ms`, `itl_max_ms`, ...) are accepted as
//! aliases. Fields pdx does not use (`prefill_pool_dynamo_namespaces`, priorities, ...) are
//! accepted and ignored: pools are named in pdx's own config.

use crate::CoreError;
use serde::{Deserialize, Serialize};

/// Prefill axis: (input sequence length in tokens, TTFT target in ms) → prefill pool index.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PrefillPoolSelectionStrategy {
    /// Lowest TTFT target of the grid, ms.
    #[serde(alias = "ttft_min_ms")]
    pub ttft_min: f64,
    /// Highest TTFT target of the grid, ms.
    #[serde(alias = "ttft_max_ms")]
    pub ttft_max: f64,
    /// TTFT cells.
    pub ttft_resolution: u32,
    /// Lowest ISL, tokens.
    pub isl_min: f64,
    /// Highest ISL, tokens.
    pub isl_max: f64,
    /// ISL cells.
    pub isl_resolution: u32,
    /// `[isl_cell][ttft_cell]` → prefill pool index.
    pub prefill_pool_mapping: Vec<Vec<usize>>,
}

/// Decode axis: (context length in tokens, ITL target in ms) → decode pool index.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DecodePoolSelectionStrategy {
    /// Lowest ITL target, ms.
    #[serde(alias = "itl_min_ms")]
    pub itl_min: f64,
    /// Highest ITL target, ms.
    #[serde(alias = "itl_max_ms")]
    pub itl_max: f64,
    /// ITL cells.
    pub itl_resolution: u32,
    /// Lowest context length, tokens.
    pub context_length_min: f64,
    /// Highest context length, tokens.
    pub context_length_max: f64,
    /// Context-length cells.
    pub context_length_resolution: u32,
    /// `[context_length_cell][itl_cell]` → decode pool index.
    pub decode_pool_mapping: Vec<Vec<usize>>,
}

/// Dynamo's `global_router_config.json` (disaggregated mode).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GlobalRouterConfig {
    /// Number of prefill pools; pool indices are `0..num_prefill_pools`.
    pub num_prefill_pools: usize,
    /// Number of decode pools.
    pub num_decode_pools: usize,
    /// Prefill grid.
    pub prefill_pool_selection_strategy: PrefillPoolSelectionStrategy,
    /// Decode grid.
    pub decode_pool_selection_strategy: DecodePoolSelectionStrategy,
    /// Everything else Dynamo puts in the file (namespaces, priorities, mode), ignored.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// The grid cell of `x` on an axis (Dynamo `_clamp_index`).
pub fn cell(x: f64, min: f64, max: f64, resolution: u32) -> usize {
    let step = (max - min) / f64::from(resolution);
    let v = ((x - min) / step).floor();
    if v.is_nan() || v < 0.0 {
        0
    } else {
        (v as usize).min(resolution as usize - 1)
    }
}

fn check_axis(name: &str, min: f64, max: f64, res: u32) -> Result<(), CoreError> {
    if res == 0 || !min.is_finite() || !max.is_finite() || min >= max {
        return Err(CoreError::InvalidGrid(format!(
            "{name}: need min < max and resolution > 0 (min {min}, max {max}, resolution {res})"
        )));
    }
    Ok(())
}

fn check_mapping(
    name: &str,
    m: &[Vec<usize>],
    rows: u32,
    cols: u32,
    pools: usize,
) -> Result<(), CoreError> {
    if m.len() != rows as usize || m.iter().any(|r| r.len() != cols as usize) {
        return Err(CoreError::InvalidGrid(format!(
            "{name} must be {rows} rows of {cols} pool indices"
        )));
    }
    if let Some(p) = m.iter().flatten().find(|&&p| p >= pools) {
        return Err(CoreError::InvalidGrid(format!(
            "{name} names pool {p}, but there are {pools}"
        )));
    }
    Ok(())
}

impl GlobalRouterConfig {
    /// Parses and validates the JSON document.
    ///
    /// Errors: [`CoreError::Parse`], [`CoreError::InvalidGrid`].
    pub fn from_json(s: &str) -> Result<Self, CoreError> {
        let c: Self = serde_json::from_str(s).map_err(|e| CoreError::Parse(e.to_string()))?;
        c.validate()?;
        Ok(c)
    }

    /// Checks ranges, resolutions, mapping shapes and pool indices.
    ///
    /// Errors: [`CoreError::InvalidGrid`].
    pub fn validate(&self) -> Result<(), CoreError> {
        let p = &self.prefill_pool_selection_strategy;
        check_axis("ttft", p.ttft_min, p.ttft_max, p.ttft_resolution)?;
        check_axis("isl", p.isl_min, p.isl_max, p.isl_resolution)?;
        check_mapping(
            "prefill_pool_mapping",
            &p.prefill_pool_mapping,
            p.isl_resolution,
            p.ttft_resolution,
            self.num_prefill_pools,
        )?;
        let d = &self.decode_pool_selection_strategy;
        check_axis("itl", d.itl_min, d.itl_max, d.itl_resolution)?;
        check_axis(
            "context_length",
            d.context_length_min,
            d.context_length_max,
            d.context_length_resolution,
        )?;
        check_mapping(
            "decode_pool_mapping",
            &d.decode_pool_mapping,
            d.context_length_resolution,
            d.itl_resolution,
            self.num_decode_pools,
        )
    }

    /// Prefill pool for a prompt of `isl` tokens and an optional TTFT target (ms).
    pub fn select_prefill_pool(&self, isl: u64, ttft_target_ms: Option<f64>) -> usize {
        let p = &self.prefill_pool_selection_strategy;
        let ttft = ttft_target_ms.unwrap_or((p.ttft_min + p.ttft_max) / 2.0);
        let i = cell(isl as f64, p.isl_min, p.isl_max, p.isl_resolution);
        let t = cell(ttft, p.ttft_min, p.ttft_max, p.ttft_resolution);
        p.prefill_pool_mapping[i][t]
    }

    /// Decode pool for a context of `context_length` tokens and an optional ITL target (ms).
    pub fn select_decode_pool(&self, context_length: u64, itl_target_ms: Option<f64>) -> usize {
        let d = &self.decode_pool_selection_strategy;
        let itl = itl_target_ms.unwrap_or((d.itl_min + d.itl_max) / 2.0);
        let c = cell(
            context_length as f64,
            d.context_length_min,
            d.context_length_max,
            d.context_length_resolution,
        );
        let t = cell(itl, d.itl_min, d.itl_max, d.itl_resolution);
        d.decode_pool_mapping[c][t]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Dynamo `examples/hierarchical_planner/global_router_config.json`, verbatim shape.
    pub const DYNAMO_EXAMPLE: &str = r#"{
        "num_prefill_pools": 2,
        "num_decode_pools": 1,
        "prefill_pool_dynamo_namespaces": ["prefill_pool_0", "prefill_pool_1"],
        "decode_pool_dynamo_namespaces": ["decode_pool_0"],
        "prefill_pool_selection_strategy": {
            "ttft_min": 10, "ttft_max": 1000, "ttft_resolution": 2,
            "isl_min": 0, "isl_max": 32000, "isl_resolution": 2,
            "prefill_pool_mapping": [[0,1],[0,1]]
        },
        "decode_pool_selection_strategy": {
            "itl_min": 10, "itl_max": 100, "itl_resolution": 2,
            "context_length_min": 0, "context_length_max": 32000, "context_length_resolution": 2,
            "decode_pool_mapping": [[0,0],[0,0]]
        }
    }"#;

    #[test]
    fn dynamo_example_selects_by_ttft() {
        let g = GlobalRouterConfig::from_json(DYNAMO_EXAMPLE).unwrap();
        // TTFT step = 495 ms: targets below 505 ms → column 0 → pool 0; above → pool 1.
        assert_eq!(g.select_prefill_pool(100, Some(50.0)), 0);
        assert_eq!(g.select_prefill_pool(100, Some(504.9)), 0);
        assert_eq!(g.select_prefill_pool(100, Some(505.0)), 1);
        assert_eq!(g.select_prefill_pool(31_000, Some(900.0)), 1);
        // Missing target: middle of the range (505 ms) → pool 1.
        assert_eq!(g.select_prefill_pool(100, None), 1);
        // Clamped on both sides.
        assert_eq!(g.select_prefill_pool(10_000_000, Some(-5.0)), 0);
        assert_eq!(g.select_prefill_pool(0, Some(1e9)), 1);
        assert_eq!(g.select_decode_pool(5, Some(1.0)), 0);
        assert_eq!(g.select_decode_pool(50_000, None), 0);
    }

    #[test]
    fn cell_formula_and_isl_axis() {
        assert_eq!(cell(0.0, 0.0, 32000.0, 2), 0);
        assert_eq!(cell(15999.0, 0.0, 32000.0, 2), 0);
        assert_eq!(cell(16000.0, 0.0, 32000.0, 2), 1);
        assert_eq!(cell(64000.0, 0.0, 32000.0, 2), 1);
        assert_eq!(cell(f64::NAN, 0.0, 1.0, 4), 0);
        let mut g = GlobalRouterConfig::from_json(DYNAMO_EXAMPLE).unwrap();
        g.prefill_pool_selection_strategy.prefill_pool_mapping = vec![vec![0, 0], vec![1, 1]];
        g.validate().unwrap();
        assert_eq!(g.select_prefill_pool(100, None), 0);
        assert_eq!(g.select_prefill_pool(20_000, None), 1);
    }

    #[test]
    fn unit_suffixed_aliases_parse() {
        let j = DYNAMO_EXAMPLE
            .replace("\"ttft_min\"", "\"ttft_min_ms\"")
            .replace("\"itl_max\"", "\"itl_max_ms\"");
        let g = GlobalRouterConfig::from_json(&j).unwrap();
        assert_eq!(g.prefill_pool_selection_strategy.ttft_min, 10.0);
        assert_eq!(g.decode_pool_selection_strategy.itl_max, 100.0);
    }

    #[test]
    fn rejects_bad_grids() {
        let bad_shape = DYNAMO_EXAMPLE.replace("[[0,1],[0,1]]", "[[0,1]]");
        assert!(matches!(
            GlobalRouterConfig::from_json(&bad_shape),
            Err(CoreError::InvalidGrid(_))
        ));
        let bad_pool = DYNAMO_EXAMPLE.replace("[[0,0],[0,0]]", "[[0,0],[0,3]]");
        assert!(matches!(
            GlobalRouterConfig::from_json(&bad_pool),
            Err(CoreError::InvalidGrid(_))
        ));
        let zero_res = DYNAMO_EXAMPLE.replace("\"itl_resolution\": 2", "\"itl_resolution\": 0");
        assert!(GlobalRouterConfig::from_json(&zero_res).is_err());
        assert!(matches!(
            GlobalRouterConfig::from_json("{"),
            Err(CoreError::Parse(_))
        ));
    }
}
