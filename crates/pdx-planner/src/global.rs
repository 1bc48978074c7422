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

use crate::local::{PoolRole, ReplicaRequest};
use serde::Serialize;

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

/// A routing adjustment: send `fraction` of pool `from`'s new requests to pool `to` (same
/// role) for the next interval, because the budget capped `from` below what it needs while
/// `to` has replicas to spare.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Diversion {
    /// The capped pool (name, as in the configuration).
    pub from: String,
    /// The pool with headroom that takes the diverted requests.
    pub to: String,
    /// Fraction of `from`'s new requests to send to `to`, in `(0, 1]`.
    pub fraction: f64,
}

/// Routing adjustments for capped pools (the global planner's "move requests between the
/// grid's cells").
///
/// A pool is capped when its target is below the replicas it needs (`target < needed`).
/// A replica of pool `i` serves `rate_i / needed_i` of its requests per second at the SLO, so
/// a capped pool's excess load is `rate · (1 − target/needed)` req/s. A pool of the same role
/// has headroom when `target > needed`: `target − needed` spare replicas. The diverted
/// requests keep the capped pool's ISL/OSL mix, so a spare replica is counted as taking
/// `rate_i / needed_i` of them per second (pools of a role serve the same model; where their
/// hardware differs this is an approximation). Capped pools, largest excess first, each
/// divert to the pool with the most spare replicas left: `min(excess, spare) / rate` of their
/// requests, and those spare replicas are used up, so a pool's diversions never exceed its
/// headroom.
///
/// `roles`, `reqs` and `targets` are in configuration order (same length).
pub fn diversions(roles: &[PoolRole], reqs: &[ReplicaRequest], targets: &[u32]) -> Vec<Diversion> {
    let n = reqs.len().min(roles.len()).min(targets.len());
    let mut capped: Vec<(f64, usize)> = (0..n)
        .filter_map(|i| {
            let r = &reqs[i];
            let t = f64::from(targets[i]);
            (t < r.needed && r.rate > 0.0).then(|| (r.rate * (1.0 - t / r.needed), i))
        })
        .collect();
    capped.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    // Spare replicas of each pool with headroom.
    let mut spare: Vec<f64> = (0..n)
        .map(|j| (f64::from(targets[j]) - reqs[j].needed).max(0.0))
        .collect();
    let mut out = Vec::new();
    for (excess, i) in capped {
        // The capped pool's requests per second per replica at the SLO.
        let per_replica = reqs[i].rate / reqs[i].needed;
        let best = (0..n)
            .filter(|&j| j != i && roles[j] == roles[i] && spare[j] > 0.0)
            .max_by(|&a, &b| spare[a].total_cmp(&spare[b]).then(b.cmp(&a)));
        let Some(j) = best else { continue };
        let moved = excess.min(spare[j] * per_replica);
        if moved <= 0.0 {
            continue;
        }
        spare[j] -= moved / per_replica;
        out.push(Diversion {
            from: reqs[i].pool.clone(),
            to: reqs[j].pool.clone(),
            fraction: (moved / reqs[i].rate).min(1.0),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(name: &str, needed: f64, min: u32, gpus: u32, prio: f64) -> ReplicaRequest {
        req_rate(name, needed, min, gpus, prio, 0.0)
    }

    fn req_rate(
        name: &str,
        needed: f64,
        min: u32,
        gpus: u32,
        prio: f64,
        rate: f64,
    ) -> ReplicaRequest {
        ReplicaRequest {
            pool: name.into(),
            needed,
            desired: (needed.ceil() as u32).max(min),
            min,
            max: 100,
            gpus_per_replica: gpus,
            priority: prio,
            rate,
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

    #[test]
    fn capped_pool_diverts_its_excess_up_to_the_other_pools_spare() {
        use PoolRole::*;
        // a needs 4 replicas for 40 req/s (10 req/s each) but got 2: 20 req/s too many.
        // b needs 2 for 20 req/s and got 4: 2 spare replicas × 10 req/s = 20 req/s.
        let r = [
            req_rate("a", 4.0, 1, 1, 1.0, 40.0),
            req_rate("b", 2.0, 1, 1, 1.0, 20.0),
        ];
        let d = diversions(&[Prefill, Prefill], &r, &[2, 4]);
        assert_eq!(
            d,
            vec![Diversion {
                from: "a".into(),
                to: "b".into(),
                fraction: 0.5
            }]
        );
        // b has only 1 spare replica (10 req/s): a quarter of a's 40 req/s.
        let d = diversions(&[Prefill, Prefill], &r, &[2, 3]);
        assert_eq!(d[0].fraction, 0.25);
        // The spare replica counts at a's 10 req/s per replica (the diverted requests are
        // a's), whatever b's own traffic.
        let r2 = [
            req_rate("a", 4.0, 1, 1, 1.0, 40.0),
            req_rate("b", 2.0, 1, 1, 1.0, 80.0),
        ];
        let d = diversions(&[Prefill, Prefill], &r2, &[2, 3]);
        assert_eq!(d[0].fraction, 0.25);
        // Never more than the excess: a short by 1 of 4 (10 req/s), b with 2 spare.
        let d = diversions(&[Prefill, Prefill], &r, &[3, 4]);
        assert_eq!(d[0].fraction, 0.25);
    }

    #[test]
    fn no_diversion_across_roles_without_headroom_or_when_nothing_is_capped() {
        use PoolRole::*;
        let r = [
            req_rate("a", 4.0, 1, 1, 1.0, 40.0),
            req_rate("b", 2.0, 1, 1, 1.0, 20.0),
        ];
        // Other role: no diversion.
        assert!(diversions(&[Prefill, Decode], &r, &[2, 4]).is_empty());
        // b exactly at its need: no headroom.
        assert!(diversions(&[Prefill, Prefill], &r, &[2, 2]).is_empty());
        // Both capped.
        assert!(diversions(&[Prefill, Prefill], &r, &[2, 1]).is_empty());
        // Nothing capped.
        assert!(diversions(&[Prefill, Prefill], &r, &[4, 4]).is_empty());
    }

    #[test]
    fn two_capped_pools_share_one_spare_largest_excess_first() {
        use PoolRole::*;
        // a: 30 req/s excess (6 needed, 3 given, 10 req/s each); c: 10 req/s excess;
        // b: idle pool with 4 spare replicas (40 req/s of a's or c's requests).
        let r = [
            req_rate("a", 6.0, 1, 1, 1.0, 60.0),
            req_rate("b", 0.0, 1, 1, 1.0, 0.0),
            req_rate("c", 2.0, 1, 1, 1.0, 20.0),
        ];
        let d = diversions(&[Decode, Decode, Decode], &r, &[3, 4, 1]);
        assert_eq!(d.len(), 2);
        assert_eq!(
            (d[0].from.as_str(), d[0].to.as_str(), d[0].fraction),
            ("a", "b", 0.5)
        );
        // 10 req/s of b's 40 left (1 replica): all of c's 10 req/s excess = half of its 20.
        assert_eq!(
            (d[1].from.as_str(), d[1].to.as_str(), d[1].fraction),
            ("c", "b", 0.5)
        );
    }
}
