//! Local router: picks one worker of a pool.
//!
//! Policies:
//! * `round_robin`: the next eligible worker in order;
//! * `least_loaded`: fewest in-flight requests, ties broken by fewest in-flight tokens;
//! * `power_of_two`: two distinct eligible workers drawn at random, the less loaded wins
//!   (Mitzenmacher, "The Power of Two Choices in Randomized Load Balancing", 2001);
//! * `kv_aware`: NVIDIA Dynamo's KV-router cost (`lib/llm/src/kv_router/scheduler.rs`,
//!   `docs/router/kv_cache_routing.md`): `cost = w · (prompt blocks − cached overlap) +
//!   decode blocks in flight`, lowest wins. The overlap comes from [`KvIndex`], an approximate
//!   per-worker prefix index built from the router's own decisions with a TTL (Dynamo's
//!   `--no-kv-events` mode), keyed by the prompt's chained block hashes
//!   (`pdx_mock::kv_cache::block_hashes`: XXH3-64 per block seeded with the parent hash).

use crate::CoreError;
use std::collections::HashMap;

/// A local routing policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Policy {
    /// Next eligible worker in order.
    RoundRobin,
    /// Fewest in-flight requests, then tokens.
    LeastLoaded,
    /// Best of two random choices.
    PowerOfTwo,
    /// Dynamo KV-router cost over the prefix index.
    KvAware,
}

impl std::str::FromStr for Policy {
    type Err = CoreError;
    fn from_str(s: &str) -> Result<Self, CoreError> {
        Ok(match s {
            "round_robin" | "round-robin" => Policy::RoundRobin,
            "least_loaded" | "least-loaded" => Policy::LeastLoaded,
            "power_of_two" | "power-of-two" | "p2c" => Policy::PowerOfTwo,
            "kv_aware" | "kv-aware" | "kv" => Policy::KvAware,
            other => return Err(CoreError::UnknownPolicy(other.to_string())),
        })
    }
}

/// What the local router knows about one worker at decision time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    /// Stable worker id (also the [`KvIndex`] key).
    pub id: u64,
    /// Requests the router has in flight on it.
    pub in_flight_requests: u64,
    /// Tokens (prompt + expected output) the router has in flight on it.
    pub in_flight_tokens: u64,
    /// Healthy, not draining, breaker allows a request, not excluded by a retry.
    pub eligible: bool,
}

/// Approximate per-worker prefix-cache index: which chained block hashes the router has sent
/// to which worker, and when (µs). Entries expire after `ttl_us`; a worker keeps at most
/// `max_blocks_per_worker` entries (the oldest are pruned first).
#[derive(Debug, Clone)]
pub struct KvIndex {
    ttl_us: u64,
    max_blocks_per_worker: usize,
    workers: HashMap<u64, HashMap<u64, u64>>,
}

impl KvIndex {
    /// An empty index. Dynamo's default TTL is 120 s.
    pub fn new(ttl_us: u64, max_blocks_per_worker: usize) -> Self {
        Self {
            ttl_us,
            max_blocks_per_worker: max_blocks_per_worker.max(1),
            workers: HashMap::new(),
        }
    }

    /// Leading blocks of `hashes` the worker is believed to hold at `now_us`.
    pub fn overlap(&self, worker: u64, hashes: &[u64], now_us: u64) -> usize {
        let Some(w) = self.workers.get(&worker) else {
            return 0;
        };
        hashes
            .iter()
            .take_while(|h| {
                w.get(h)
                    .is_some_and(|&t| now_us.saturating_sub(t) <= self.ttl_us)
            })
            .count()
    }

    /// Records that `hashes` were routed to `worker` at `now_us`.
    pub fn record(&mut self, worker: u64, hashes: &[u64], now_us: u64) {
        let ttl = self.ttl_us;
        let cap = self.max_blocks_per_worker;
        let w = self.workers.entry(worker).or_default();
        for &h in hashes {
            w.insert(h, now_us);
        }
        if w.len() > cap {
            w.retain(|_, t| now_us.saturating_sub(*t) <= ttl);
            if w.len() > cap {
                let mut times: Vec<u64> = w.values().copied().collect();
                let keep = cap - cap / 10;
                times.sort_unstable_by(|a, b| b.cmp(a));
                let cutoff = times[keep.min(times.len() - 1)];
                w.retain(|_, t| *t > cutoff);
            }
        }
    }

    /// Forgets a worker (removed from the registry).
    pub fn remove_worker(&mut self, worker: u64) {
        self.workers.remove(&worker);
    }

    /// Blocks tracked for `worker`.
    pub fn len(&self, worker: u64) -> usize {
        self.workers.get(&worker).map_or(0, HashMap::len)
    }
}

/// Per-pool selection state: round-robin cursor, random state, KV index.
#[derive(Debug, Clone)]
pub struct Selector {
    /// The policy.
    pub policy: Policy,
    /// Weight of blocks to prefill against decode load in the `kv_aware` cost (Dynamo's
    /// `--kv-overlap-score-weight`, default 1).
    pub overlap_weight: f64,
    /// Tokens per KV block (to turn in-flight tokens into blocks).
    pub block_size: u64,
    cursor: u64,
    rng: u64,
    /// The prefix index (`kv_aware`).
    pub index: KvIndex,
}

impl Selector {
    /// A selector; `seed` seeds `power_of_two`'s generator.
    pub fn new(policy: Policy, seed: u64) -> Self {
        Self {
            policy,
            overlap_weight: 1.0,
            block_size: 16,
            cursor: 0,
            rng: seed | 1,
            index: KvIndex::new(120_000_000, 1 << 20),
        }
    }

    fn next_rand(&mut self) -> u64 {
        // xorshift64*
        let mut x = self.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Picks a worker: the index into `cands`, or `None` when none is eligible.
    /// `block_hashes` are the prompt's chained block hashes (used by `kv_aware` only; the
    /// chosen worker's entry in the index is updated).
    pub fn choose(
        &mut self,
        cands: &[Candidate],
        block_hashes: &[u64],
        now_us: u64,
    ) -> Option<usize> {
        self.choose_with(cands, block_hashes, now_us, None)
    }

    /// [`Selector::choose`] with `kv_aware` reading a worker's overlap from `exact` (the engines' KV
    /// events) where that knows the worker exactly ([`crate::kv_index::kv_overlap`]).
    pub fn choose_with(
        &mut self,
        cands: &[Candidate],
        block_hashes: &[u64],
        now_us: u64,
        exact: Option<&dyn crate::kv_index::ExactOverlap>,
    ) -> Option<usize> {
        let n = cands.len();
        let eligible = cands.iter().filter(|c| c.eligible).count();
        if eligible == 0 {
            return None;
        }
        let load = |c: &Candidate| (c.in_flight_requests, c.in_flight_tokens);
        let start = self.cursor as usize % n;
        self.cursor = self.cursor.wrapping_add(1);
        let pick = match self.policy {
            Policy::RoundRobin => (0..n).map(|k| (start + k) % n).find(|&i| cands[i].eligible),
            Policy::LeastLoaded => (0..n)
                .map(|k| (start + k) % n)
                .filter(|&i| cands[i].eligible)
                .min_by_key(|&i| load(&cands[i])),
            Policy::PowerOfTwo => {
                let idx: Vec<usize> = (0..n).filter(|&i| cands[i].eligible).collect();
                if idx.len() == 1 {
                    Some(idx[0])
                } else {
                    let a = (self.next_rand() % idx.len() as u64) as usize;
                    let mut b = (self.next_rand() % (idx.len() as u64 - 1)) as usize;
                    if b >= a {
                        b += 1;
                    }
                    let (a, b) = (idx[a], idx[b]);
                    Some(if load(&cands[b]) < load(&cands[a]) {
                        b
                    } else {
                        a
                    })
                }
            }
            Policy::KvAware => {
                let total = block_hashes.len() as f64;
                let bs = self.block_size.max(1);
                let mut best: Option<(f64, usize)> = None;
                for k in 0..n {
                    let i = (start + k) % n;
                    let c = &cands[i];
                    if !c.eligible {
                        continue;
                    }
                    let overlap = crate::kv_index::kv_overlap(
                        exact,
                        &self.index,
                        c.id,
                        block_hashes,
                        bs,
                        now_us,
                    ) as f64;
                    let decode_blocks = c.in_flight_tokens.div_ceil(bs) as f64;
                    let cost = self.overlap_weight * (total - overlap) + decode_blocks;
                    if best.is_none_or(|(b, _)| cost < b) {
                        best = Some((cost, i));
                    }
                }
                best.map(|(_, i)| i)
            }
        };
        if let Some(i) = pick {
            if self.policy == Policy::KvAware && !block_hashes.is_empty() {
                self.index.record(cands[i].id, block_hashes, now_us);
            }
        }
        pick
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(id: u64, req: u64, tok: u64) -> Candidate {
        Candidate {
            id,
            in_flight_requests: req,
            in_flight_tokens: tok,
            eligible: true,
        }
    }

    #[test]
    fn parses_names() {
        assert_eq!("kv_aware".parse::<Policy>().unwrap(), Policy::KvAware);
        assert_eq!("p2c".parse::<Policy>().unwrap(), Policy::PowerOfTwo);
        assert!(matches!(
            "fastest".parse::<Policy>(),
            Err(CoreError::UnknownPolicy(_))
        ));
    }

    #[test]
    fn round_robin_cycles_and_skips_ineligible() {
        let mut s = Selector::new(Policy::RoundRobin, 1);
        let mut cs = vec![c(1, 0, 0), c(2, 0, 0), c(3, 0, 0)];
        let picks: Vec<_> = (0..6).map(|_| s.choose(&cs, &[], 0).unwrap()).collect();
        assert_eq!(picks, vec![0, 1, 2, 0, 1, 2]);
        cs[1].eligible = false;
        let picks: Vec<_> = (0..4).map(|_| s.choose(&cs, &[], 0).unwrap()).collect();
        assert!(!picks.contains(&1));
        assert!(picks.contains(&0) && picks.contains(&2));
        for x in &mut cs {
            x.eligible = false;
        }
        assert_eq!(s.choose(&cs, &[], 0), None);
        assert_eq!(s.choose(&[], &[], 0), None);
    }

    #[test]
    fn least_loaded_uses_requests_then_tokens() {
        let mut s = Selector::new(Policy::LeastLoaded, 1);
        let cs = [c(1, 3, 10), c(2, 1, 900), c(3, 1, 100), c(4, 5, 0)];
        for _ in 0..4 {
            assert_eq!(s.choose(&cs, &[], 0), Some(2));
        }
        let mut cs2 = cs;
        cs2[2].eligible = false;
        assert_eq!(s.choose(&cs2, &[], 0), Some(1));
    }

    #[test]
    fn power_of_two_never_picks_the_most_loaded_of_many_and_spreads() {
        let mut s = Selector::new(Policy::PowerOfTwo, 42);
        let cs = [c(1, 0, 0), c(2, 0, 0), c(3, 100, 0)];
        let mut counts = [0; 3];
        for _ in 0..3000 {
            counts[s.choose(&cs, &[], 0).unwrap()] += 1;
        }
        // Worker 3 loses every pairing it is in.
        assert_eq!(counts[2], 0);
        assert!(counts[0] > 500 && counts[1] > 500, "{counts:?}");
        let one = [
            c(1, 0, 0),
            Candidate {
                eligible: false,
                ..c(2, 0, 0)
            },
        ];
        assert_eq!(s.choose(&one, &[], 0), Some(0));
    }

    #[test]
    fn kv_aware_follows_prefix_then_load() {
        let mut s = Selector::new(Policy::KvAware, 1);
        let cs = [c(10, 0, 0), c(20, 0, 0)];
        let prompt_a: Vec<u64> = (1..=8).collect();
        let first = s.choose(&cs, &prompt_a, 0).unwrap();
        // Same prefix again: the worker that holds it is cheaper (0 blocks to prefill).
        for t in 1..5 {
            assert_eq!(s.choose(&cs, &prompt_a, t), Some(first));
        }
        assert_eq!(s.index.overlap(cs[first].id, &prompt_a, 5), 8);
        // A longer prompt sharing 8 blocks: still the same worker.
        let prompt_b: Vec<u64> = (1..=12).collect();
        assert_eq!(s.choose(&cs, &prompt_b, 6), Some(first));
        // Heavy decode load outweighs the 12-block overlap: cost 0 + 100 vs 12 + 0.
        let mut loaded = cs;
        loaded[first].in_flight_tokens = 1600;
        assert_eq!(s.choose(&loaded, &prompt_b, 7), Some(1 - first));
        // Entries expire after the TTL.
        let ttl = 120_000_000;
        assert_eq!(s.index.overlap(cs[first].id, &prompt_b, 6 + ttl + 1), 0);
    }

    #[test]
    fn kv_index_is_bounded() {
        let mut ix = KvIndex::new(u64::MAX, 100);
        for t in 0..1000u64 {
            ix.record(1, &[t], t);
        }
        assert!(ix.len(1) <= 100, "{}", ix.len(1));
        // Newest entries survive.
        assert_eq!(ix.overlap(1, &[999], 1000), 1);
        assert_eq!(ix.overlap(1, &[0], 1000), 0);
        ix.remove_worker(1);
        assert_eq!(ix.len(1), 0);
    }
}
