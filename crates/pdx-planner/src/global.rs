//! The global planner: splits a total GPU budget across the pools' replica requests.
//!
//! Each pool's predicted SLO attainment is modelled as a concave function of its replicas,
//! `a(n) = 1 − (1 − n/needed)²` below what it needs and 1 from there on: the first missing
//! replicas cost little, a pool far below its need loses most of its requests (queues grow
//! without bound when a pool runs over capacity). The split maximises
//! `Σ priority · share · a(n)` (share: the pool's fraction of its role's requests) within the
//! budget: first every pool's minimum, highest priority first, then one replica at a time to
//! the pool with the largest gain per GPU, until every pool has what it wants or no replica
//! fits. For concave gains this greedy order is optimal when replicas cost the same GPUs
//! (the marginal-allocation result of Fox, "Discrete optimization via marginal analysis",
//! 1966). Budget that no pool needs stays unused: the point is to spend fewer GPU-hours.

use crate::local::ReplicaRequest;

/// Predicted attainment of a pool with `n` replicas when it needs `needed`.
pub fn attainment(n: f64, needed: f64) -> f64 {
    if needed <= 0.0 || n >= needed {
        1.0
    } else {
        let gap = 1.0 - n / needed;
        1.0 - gap * gap
    }
}

/// Replicas for each request (same order) within `budget_gpus`. `share[i]` is request `i`'s
/// fraction of its role's traffic (0..=1; pools of a role with no traffic get only their
/// minimum).
pub fn split(budget_gpus: u64, reqs: &[ReplicaRequest], share: &[f64]) -> Vec<u32> {
    let mut n = vec![0u32; reqs.len()];
    let mut left = budget_gpus;
    // 1. Minimums, by priority.
    let mut order: Vec<usize> = (0..reqs.len()).collect();
    order.sort_by(|&a, &b| reqs[b].priority.total_cmp(&reqs[a].priority));
    for &i in &order {
        let g = u64::from(reqs[i].gpus_per_replica.max(1));
        let fit = (left / g).min(u64::from(reqs[i].min)) as u32;
        n[i] = fit;
        left -= u64::from(fit) * g;
    }
    // 2. Marginal gains.
    loop {
        let mut best: Option<(f64, usize)> = None;
        for (i, r) in reqs.iter().enumerate() {
            let g = u64::from(r.gpus_per_replica.max(1));
            if n[i] >= r.desired || g > left {
                continue;
            }
            let w = r.priority * share.get(i).copied().unwrap_or(1.0).max(1e-6);
            let k = f64::from(n[i]);
            let gain = w * (attainment(k + 1.0, r.needed) - attainment(k, r.needed)) / g as f64;
            // Ties: the pool furthest from what it wants.
            let gain = gain + 1e-12 * f64::from(r.desired - n[i]);
            if best.is_none_or(|(b, _)| gain > b) {
                best = Some((gain, i));
            }
        }
        let Some((_, i)) = best else { break };
        n[i] += 1;
        left -= u64::from(reqs[i].gpus_per_replica.max(1));
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(name: &str, needed: f64, min: u32, gpus: u32, prio: f64) -> ReplicaRequest {
        ReplicaRequest {
            pool: name.into(),
            needed,
            desired: (needed.ceil() as u32).max(min),
            min,
            max: 100,
            gpus_per_replica: gpus,
            priority: prio,
            rate: 0.0,
            isl: 0.0,
            osl: 0.0,
            prefill_correction: 1.0,
            decode_correction: 1.0,
        }
    }

    #[test]
    fn enough_budget_gives_each_what_it_wants_and_no_more() {
        let r = [req("a", 3.2, 1, 1, 1.0), req("b", 1.5, 1, 2, 1.0)];
        assert_eq!(split(100, &r, &[1.0, 1.0]), vec![4, 2]);
    }

    #[test]
    fn short_budget_is_spread_by_concave_gain_and_respects_gpus_per_replica() {
        let r = [req("a", 10.0, 1, 1, 1.0), req("b", 10.0, 1, 1, 1.0)];
        // Equal needs, equal weights: an even split.
        assert_eq!(split(10, &r, &[0.5, 0.5]), vec![5, 5]);
        // A replica of b costs 2 GPUs: a gets more replicas.
        let r = [req("a", 10.0, 1, 1, 1.0), req("b", 10.0, 1, 2, 1.0)];
        let n = split(12, &r, &[0.5, 0.5]);
        assert!(n[0] > n[1], "{n:?}");
        assert!(u64::from(n[0]) + 2 * u64::from(n[1]) <= 12);
        // Priority moves GPUs.
        let r = [req("a", 10.0, 1, 1, 4.0), req("b", 10.0, 1, 1, 1.0)];
        let n = split(10, &r, &[0.5, 0.5]);
        assert!(n[0] > n[1], "{n:?}");
    }

    #[test]
    fn minimums_come_first_by_priority() {
        let r = [req("low", 5.0, 3, 1, 1.0), req("high", 5.0, 3, 1, 2.0)];
        assert_eq!(split(4, &r, &[0.5, 0.5]), vec![1, 3]);
        assert_eq!(split(0, &r, &[0.5, 0.5]), vec![0, 0]);
    }

    #[test]
    fn attainment_is_concave_and_capped() {
        assert_eq!(attainment(0.0, 4.0), 0.0);
        assert_eq!(attainment(4.0, 4.0), 1.0);
        assert_eq!(attainment(9.0, 4.0), 1.0);
        assert!(attainment(2.0, 4.0) > 0.5);
        assert_eq!(attainment(0.0, 0.0), 1.0);
    }
}
