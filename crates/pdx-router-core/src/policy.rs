//! Local router: picks one worker of a pool.
//!
//! Policies:
//! * `round_robin`: the next eligible worker in order;
//! * `least_loaded`: fewest in-flight requests, ties broken by fewest in-flight tokens;
//! * `power_of_two`: two distinct eligible workers drawn at random, the less loaded wins
//!   (Mitzenmacher, "The Power of Two Choices in Randomized Load Balancing", 2001);
//! * `kv_aware`: NVIDIA Dynamo's KV router. With engine telemetry (any eligible worker scraped
//!   recently) it is Dynamo's load-aware logit (`examples/llm/components/kv_router.py`,
//!   `lib/llm/src/kv_router/scheduler.rs`, `docs/router/kv_cache_routing.md`):
//!   `logit = overlap_weight · overlap − kv_usage − normalized_waiting`, where `overlap` is the
//!   fraction of the prompt's blocks the worker holds, `kv_usage` the engine's KV-cache usage (0–1)
//!   and `normalized_waiting` its waiting requests over the pool's largest (pdx adds the requests it
//!   has in flight there, which the engine's last scrape cannot show yet). The highest logit wins
//!   at temperature 0; above 0 a worker is drawn with probability `softmax(logit / temperature)`
//!   (Dynamo's `--router-temperature`). Without telemetry it is Dynamo's block cost
//!   `overlap_weight · (prompt blocks − overlap blocks) + decode blocks in flight`, lowest wins.
//!   The overlap comes with each [`Candidate`] (the caller computes it, e.g. from [`KvIndex`], an
//!   approximate per-worker prefix index built from the router's own decisions with a TTL, Dynamo's
//!   `--no-kv-events` mode, keyed by the prompt's chained block hashes: XXH3-64 per block seeded
//!   with the parent hash, `pdx_tokens::block_hashes`);
//! * `score`: the routing lab's score `α/TTFT + β·TPOT + γ·free_mem − δ·queue` plus a KV-locality
//!   boost per matched prefix block, highest wins (see [`ScoreWeights`] for each term and its units).
//!   For prefill pools the expected TTFT is the work the worker has queued plus the request's own
//!   uncached tokens, over that worker's observed prefill speed, so it sees worker speed and prefix
//!   hits together; decode pools balance tokens in flight (prompt plus output still to come), not
//!   request counts.

use crate::telemetry::TelemetrySnapshot;
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
    /// Dynamo KV router: load-aware logit over prefix overlap with telemetry, block cost without.
    KvAware,
    /// The routing lab's score over telemetry, queue and prefix overlap.
    Score,
}

impl Policy {
    /// Whether the policy reads the prompt's prefix overlap (then prompts are tokenized and hashed).
    pub fn uses_overlap(self) -> bool {
        matches!(self, Policy::KvAware | Policy::Score)
    }

    /// Whether the policy reads worker telemetry.
    pub fn uses_telemetry(self) -> bool {
        matches!(self, Policy::KvAware | Policy::Score)
    }
}

impl std::str::FromStr for Policy {
    type Err = CoreError;
    fn from_str(s: &str) -> Result<Self, CoreError> {
        Ok(match s {
            "round_robin" | "round-robin" => Policy::RoundRobin,
            "least_loaded" | "least-loaded" => Policy::LeastLoaded,
            "power_of_two" | "power-of-two" | "p2c" => Policy::PowerOfTwo,
            "kv_aware" | "kv-aware" | "kv" => Policy::KvAware,
            "score" => Policy::Score,
            other => return Err(CoreError::UnknownPolicy(other.to_string())),
        })
    }
}

/// What a pool's workers do, as far as the `score` policy is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PoolKind {
    /// Prefill workers: TTFT is the request's own prefill.
    Prefill,
    /// Decode workers: balanced by tokens in flight.
    Decode,
    /// Aggregated workers (prefill and decode).
    #[default]
    Aggregated,
}

/// Weights of the `score` policy, after the routing lab's `α/TTFT + β·TPOT + γ·free_mem − δ·queue`
/// plus a KV-locality boost; higher is better. Each term is put on a scale shared by the pool's
/// eligible workers at decision time, so the weights are plain numbers of about 1:
/// * `α · (TTFT_best / TTFT)`: the lab's `α/TTFT` with TTFT in units of the best worker's (1 for the
///   best, ½ for one twice as slow). TTFT is the expected one (prefill pools: tokens queued plus the
///   request's uncached tokens over the worker's prefill speed) or the worker's EWMA;
/// * `β · (TPOT / TPOT_max)`: the worker's EWMA TPOT over the pool's slowest. The lab's sign is kept,
///   so β is negative to penalize slow decoding;
/// * `γ · free_mem`: `1 − kv_usage` (0 when the engine's usage is unknown);
/// * `− δ · (queue / queue_max)`: requests waiting in the engine plus those in flight from the router
///   (prefill, aggregated), or tokens in flight (decode), over the pool's largest;
/// * `+ kv_boost · overlap_blocks`: per matched prefix block.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScoreWeights {
    /// Weight of `1/TTFT`.
    pub alpha: f64,
    /// Weight of TPOT (negative: a penalty).
    pub beta: f64,
    /// Weight of free KV memory.
    pub gamma: f64,
    /// Weight of the queue (subtracted).
    pub delta: f64,
    /// Score per matched prefix block.
    pub kv_boost: f64,
}

impl Default for ScoreWeights {
    /// α = 1, β = −0.5, γ = 0.3, δ = 0.5, 0.002 per matched block (a 64-block, 1024-token shared
    /// prefix is worth about an eighth of the gap between a worker and one twice as fast).
    fn default() -> Self {
        Self {
            alpha: 1.0,
            beta: -0.5,
            gamma: 0.3,
            delta: 0.5,
            kv_boost: 0.002,
        }
    }
}

impl ScoreWeights {
    /// The default weights of a pool of `kind`, chosen by measurement (`benches/compare_policies.sh`, the
    /// Mooncake trace, see `docs/benchmarks.md` "Scheduling quality"):
    /// * prefill: α = 1 and nothing else: the expected TTFT (tokens queued plus the request's uncached
    ///   tokens, over the worker's measured prefill speed) already holds the queue and the prefix overlap;
    ///   the extra queue and locality terms only pulled requests away from the fastest finish;
    /// * decode: δ = 1 and nothing else: the tokens in flight on each worker (prompt plus output still
    ///   expected), which is what a decode step's time grows with; the EWMA TTFT and TPOT terms lag the
    ///   load they measure and sent bursts to the worker that had just looked fastest;
    /// * aggregated: [`ScoreWeights::default`], the lab's mix.
    pub fn default_for(kind: PoolKind) -> Self {
        let none = Self {
            alpha: 0.0,
            beta: 0.0,
            gamma: 0.0,
            delta: 0.0,
            kv_boost: 0.0,
        };
        match kind {
            PoolKind::Prefill => Self { alpha: 1.0, ..none },
            PoolKind::Decode => Self { delta: 1.0, ..none },
            PoolKind::Aggregated => Self::default(),
        }
    }

    /// Checks the weights.
    ///
    /// Errors: [`CoreError::InvalidSetting`] for a non-finite weight.
    pub fn validate(&self) -> Result<(), CoreError> {
        let all = [self.alpha, self.beta, self.gamma, self.delta, self.kv_boost];
        if all.iter().all(|w| w.is_finite()) {
            Ok(())
        } else {
            Err(CoreError::InvalidSetting(format!(
                "score weights must be finite numbers: {self:?}"
            )))
        }
    }
}

/// What the local router knows about one worker at decision time.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candidate {
    /// Stable worker id (also the [`KvIndex`] key).
    pub id: u64,
    /// Requests the router has in flight on it.
    pub in_flight_requests: u64,
    /// Tokens the router has in flight on it: prompt plus output still expected (prefill requests: the
    /// prompt).
    pub in_flight_tokens: u64,
    /// Healthy, not draining, breaker allows a request, not excluded by a retry.
    pub eligible: bool,
    /// Leading blocks of the request's prompt the worker is believed to hold (computed by the caller).
    pub overlap_blocks: u64,
    /// The worker's telemetry (`kv_aware`, `score`).
    pub telemetry: TelemetrySnapshot,
}

impl Candidate {
    /// A candidate with no prefix overlap and no telemetry.
    pub fn new(id: u64, in_flight_requests: u64, in_flight_tokens: u64, eligible: bool) -> Self {
        Self {
            id,
            in_flight_requests,
            in_flight_tokens,
            eligible,
            overlap_blocks: 0,
            telemetry: TelemetrySnapshot::UNKNOWN,
        }
    }
}

/// The request being placed, as the policies see it.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// The prompt's chained block hashes (full blocks only; recorded in the approximate index).
    pub block_hashes: &'a [u64],
    /// Prompt tokens.
    pub prompt_tokens: u64,
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

/// Per-pool selection state: round-robin cursor, random state, KV index, `score` weights.
#[derive(Debug, Clone)]
pub struct Selector {
    /// The policy.
    pub policy: Policy,
    /// Weight of prefix overlap in `kv_aware` (Dynamo's `--kv-overlap-score-weight`, default 1): of
    /// blocks to prefill against decode load in the block cost, of the overlap fraction in the logit.
    pub overlap_weight: f64,
    /// `kv_aware` softmax temperature (Dynamo's `--router-temperature`; 0, the default: the best logit).
    pub temperature: f64,
    /// Tokens per KV block (to turn in-flight tokens into blocks).
    pub block_size: u64,
    /// What the pool's workers do (`score`).
    pub kind: PoolKind,
    /// `score` weights.
    pub weights: ScoreWeights,
    cursor: u64,
    rng: u64,
    /// The approximate prefix index (`kv_aware`, `score`): see [`Selector::fill_overlap`].
    pub index: KvIndex,
}

impl Selector {
    /// A selector; `seed` seeds `power_of_two`'s and the softmax's generator.
    pub fn new(policy: Policy, seed: u64) -> Self {
        Self {
            policy,
            overlap_weight: 1.0,
            temperature: 0.0,
            block_size: 16,
            kind: PoolKind::Aggregated,
            weights: ScoreWeights::default(),
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

    /// Sets each candidate's `overlap_blocks` from the approximate index (the leading blocks of
    /// `block_hashes` recorded for it within the TTL).
    pub fn fill_overlap(&self, cands: &mut [Candidate], block_hashes: &[u64], now_us: u64) {
        for c in cands {
            c.overlap_blocks = self.index.overlap(c.id, block_hashes, now_us) as u64;
        }
    }

    /// Picks a worker: the index into `cands`, or `None` when none is eligible. The prompt counts
    /// `block_hashes.len() × block_size` tokens (see [`Selector::choose_request`]).
    pub fn choose(
        &mut self,
        cands: &[Candidate],
        block_hashes: &[u64],
        now_us: u64,
    ) -> Option<usize> {
        let req = Request {
            block_hashes,
            prompt_tokens: block_hashes.len() as u64 * self.block_size.max(1),
        };
        self.choose_request(cands, &req, now_us)
    }

    /// Picks a worker for `req`: the index into `cands`, or `None` when none is eligible. Under
    /// `kv_aware` and `score` the chosen worker's entry in the approximate index is updated with the
    /// prompt's blocks.
    pub fn choose_request(
        &mut self,
        cands: &[Candidate],
        req: &Request<'_>,
        now_us: u64,
    ) -> Option<usize> {
        let n = cands.len();
        let eligible = cands.iter().filter(|c| c.eligible).count();
        if eligible == 0 {
            return None;
        }
        let load = |c: &Candidate| (c.in_flight_requests, c.in_flight_tokens);
        let start = self.cursor as usize % n;
        self.cursor = self.cursor.wrapping_add(1);
        // Eligible candidates in rotation order from `start` (ties go to the first in this order).
        let mut order = (0..n)
            .map(|k| (start + k) % n)
            .filter(|&i| cands[i].eligible);
        let pick = match self.policy {
            Policy::RoundRobin => order.next(),
            Policy::LeastLoaded => order.min_by_key(|&i| load(&cands[i])),
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
                if cands.iter().any(|c| c.eligible && c.telemetry.engine_known) {
                    let logits: Vec<(usize, f64)> = self.dynamo_logits(cands, req, order);
                    self.sample(&logits)
                } else {
                    let total = req.block_hashes.len() as f64;
                    let bs = self.block_size.max(1);
                    let w = self.overlap_weight;
                    order.min_by(|&a, &b| {
                        let cost = |c: &Candidate| {
                            w * (total - c.overlap_blocks as f64).max(0.0)
                                + c.in_flight_tokens.div_ceil(bs) as f64
                        };
                        cost(&cands[a]).total_cmp(&cost(&cands[b]))
                    })
                }
            }
            Policy::Score => {
                let scores = self.scores(cands, req, order);
                argmax(&scores)
            }
        };
        if let Some(i) = pick {
            if self.policy.uses_overlap() && !req.block_hashes.is_empty() {
                self.index.record(cands[i].id, req.block_hashes, now_us);
            }
        }
        pick
    }

    /// Dynamo's logits of the eligible candidates (in `order`): `overlap_weight · overlap fraction −
    /// kv_usage − waiting / max waiting`, where waiting counts the engine's queue plus the router's
    /// requests in flight there. A worker whose engine state is unknown counts as full (`kv_usage` 1)
    /// with the largest queue any worker reported: unknown is never idle.
    fn dynamo_logits(
        &self,
        cands: &[Candidate],
        req: &Request<'_>,
        order: impl Iterator<Item = usize> + Clone,
    ) -> Vec<(usize, f64)> {
        let blocks = req.block_hashes.len().max(1) as f64;
        let worst_waiting = order
            .clone()
            .filter_map(|i| cands[i].telemetry.waiting)
            .fold(0.0, f64::max);
        let waiting = |c: &Candidate| {
            let engine = if c.telemetry.engine_known {
                c.telemetry.waiting.unwrap_or(0.0)
            } else {
                worst_waiting
            };
            engine + c.in_flight_requests as f64
        };
        let max_waiting = order
            .clone()
            .map(|i| waiting(&cands[i]))
            .fold(0.0, f64::max);
        order
            .map(|i| {
                let c = &cands[i];
                let overlap = (c.overlap_blocks as f64 / blocks).min(1.0);
                let kv = if c.telemetry.engine_known {
                    c.telemetry.kv_usage.unwrap_or(1.0)
                } else {
                    1.0
                };
                let norm_waiting = if max_waiting > 0.0 {
                    waiting(c) / max_waiting
                } else {
                    0.0
                };
                (i, self.overlap_weight * overlap - kv - norm_waiting)
            })
            .collect()
    }

    /// The `score` of each eligible candidate (in `order`); see [`ScoreWeights`].
    fn scores(
        &self,
        cands: &[Candidate],
        req: &Request<'_>,
        order: impl Iterator<Item = usize> + Clone,
    ) -> Vec<(usize, f64)> {
        let bs = self.block_size.max(1);
        let mean = |f: &dyn Fn(&Candidate) -> Option<f64>| {
            let (sum, k) = order
                .clone()
                .filter_map(|i| f(&cands[i]))
                .fold((0.0, 0u32), |(s, k), x| (s + x, k + 1));
            (k > 0).then(|| sum / f64::from(k))
        };
        // A worker not measured yet is taken to be like the pool's average (a new worker is neither
        // favoured nor shunned for it); with nothing measured every worker is alike.
        let speed_default = mean(&|c| c.telemetry.prefill_tokens_per_s).unwrap_or(1.0);
        let ttft_default = mean(&|c| c.telemetry.ttft_s).unwrap_or(1.0);
        let tpot_default = mean(&|c| c.telemetry.tpot_s).unwrap_or(0.0);
        let worst_waiting = order
            .clone()
            .filter_map(|i| cands[i].telemetry.waiting)
            .fold(0.0, f64::max);
        struct Est {
            i: usize,
            ttft: f64,
            tpot: f64,
            free: f64,
            queue: f64,
            overlap: f64,
        }
        let est: Vec<Est> = order
            .map(|i| {
                let c = &cands[i];
                let t = &c.telemetry;
                let ttft = match self.kind {
                    PoolKind::Prefill => {
                        let speed = t
                            .prefill_tokens_per_s
                            .filter(|s| *s > 0.0)
                            .unwrap_or(speed_default);
                        let uncached = req
                            .prompt_tokens
                            .saturating_sub(c.overlap_blocks.saturating_mul(bs));
                        (c.in_flight_tokens + uncached).max(1) as f64 / speed
                    }
                    PoolKind::Decode | PoolKind::Aggregated => t.ttft_s.unwrap_or(ttft_default),
                };
                let engine_waiting = if t.engine_known {
                    t.waiting.unwrap_or(0.0)
                } else {
                    worst_waiting
                };
                let queue = match self.kind {
                    PoolKind::Decode => c.in_flight_tokens as f64,
                    PoolKind::Prefill | PoolKind::Aggregated => {
                        engine_waiting + c.in_flight_requests as f64
                    }
                };
                let free = if t.engine_known {
                    t.kv_usage.map_or(0.0, |u| 1.0 - u)
                } else {
                    0.0
                };
                Est {
                    i,
                    ttft: ttft.max(1e-6),
                    tpot: t.tpot_s.unwrap_or(tpot_default),
                    free,
                    queue,
                    overlap: c.overlap_blocks as f64,
                }
            })
            .collect();
        let best_ttft = est.iter().map(|e| e.ttft).fold(f64::INFINITY, f64::min);
        let max_tpot = est.iter().map(|e| e.tpot).fold(0.0, f64::max);
        let max_queue = est.iter().map(|e| e.queue).fold(0.0, f64::max);
        let w = &self.weights;
        est.iter()
            .map(|e| {
                let tpot = if max_tpot > 0.0 {
                    e.tpot / max_tpot
                } else {
                    0.0
                };
                let queue = if max_queue > 0.0 {
                    e.queue / max_queue
                } else {
                    0.0
                };
                let s = w.alpha * (best_ttft / e.ttft) + w.beta * tpot + w.gamma * e.free
                    - w.delta * queue
                    + w.kv_boost * e.overlap;
                (e.i, s)
            })
            .collect()
    }

    /// Temperature 0: the highest logit (the first in rotation order on ties); above 0: a draw with
    /// probability `softmax(logit / temperature)`.
    fn sample(&mut self, logits: &[(usize, f64)]) -> Option<usize> {
        let t = self.temperature;
        if !(t > 0.0 && t.is_finite()) {
            return argmax(logits);
        }
        let max = logits.iter().map(|l| l.1).fold(f64::NEG_INFINITY, f64::max);
        let weights: Vec<f64> = logits.iter().map(|l| ((l.1 - max) / t).exp()).collect();
        let total: f64 = weights.iter().sum();
        // 53 random bits: a uniform draw in [0, 1).
        let mut u = (self.next_rand() >> 11) as f64 / (1u64 << 53) as f64 * total;
        for (l, w) in logits.iter().zip(&weights) {
            if u < *w {
                return Some(l.0);
            }
            u -= w;
        }
        logits.last().map(|l| l.0)
    }
}

/// The index with the highest value (the first on ties; `None` for no values).
fn argmax(v: &[(usize, f64)]) -> Option<usize> {
    v.iter()
        .fold(None::<(usize, f64)>, |best, &(i, x)| match best {
            Some((_, b)) if b >= x => best,
            _ => Some((i, x)),
        })
        .map(|(i, _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(id: u64, req: u64, tok: u64) -> Candidate {
        Candidate::new(id, req, tok, true)
    }

    /// What the router does: the caller fills the overlap, then the selector chooses.
    fn choose_with_index(
        s: &mut Selector,
        cs: &[Candidate],
        hashes: &[u64],
        t: u64,
    ) -> Option<usize> {
        let mut cs = cs.to_vec();
        s.fill_overlap(&mut cs, hashes, t);
        s.choose(&cs, hashes, t)
    }

    fn known(waiting: f64, kv: f64) -> TelemetrySnapshot {
        TelemetrySnapshot {
            engine_known: true,
            waiting: Some(waiting),
            running: Some(0.0),
            kv_usage: Some(kv),
            age_us: Some(0),
            ..TelemetrySnapshot::UNKNOWN
        }
    }

    #[test]
    fn parses_names() {
        assert_eq!("kv_aware".parse::<Policy>().unwrap(), Policy::KvAware);
        assert_eq!("p2c".parse::<Policy>().unwrap(), Policy::PowerOfTwo);
        assert_eq!("score".parse::<Policy>().unwrap(), Policy::Score);
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
    fn kv_aware_without_telemetry_follows_prefix_then_load() {
        let mut s = Selector::new(Policy::KvAware, 1);
        let cs = [c(10, 0, 0), c(20, 0, 0)];
        let prompt_a: Vec<u64> = (1..=8).collect();
        let first = choose_with_index(&mut s, &cs, &prompt_a, 0).unwrap();
        // Same prefix again: the worker that holds it is cheaper (0 blocks to prefill).
        for t in 1..5 {
            assert_eq!(choose_with_index(&mut s, &cs, &prompt_a, t), Some(first));
        }
        assert_eq!(s.index.overlap(cs[first].id, &prompt_a, 5), 8);
        // A longer prompt sharing 8 blocks: still the same worker.
        let prompt_b: Vec<u64> = (1..=12).collect();
        assert_eq!(choose_with_index(&mut s, &cs, &prompt_b, 6), Some(first));
        // Heavy decode load outweighs the 12-block overlap: cost 0 + 100 vs 12 + 0.
        let mut loaded = cs;
        loaded[first].in_flight_tokens = 1600;
        assert_eq!(
            choose_with_index(&mut s, &loaded, &prompt_b, 7),
            Some(1 - first)
        );
        // Entries expire after the TTL.
        let ttl = 120_000_000;
        assert_eq!(s.index.overlap(cs[first].id, &prompt_b, 6 + ttl + 1), 0);
    }

    #[test]
    fn kv_aware_with_telemetry_is_dynamos_logit() {
        let mut s = Selector::new(Policy::KvAware, 1);
        let hashes: Vec<u64> = (1..=10).collect();
        // A holds 8 of 10 blocks but is busy; B holds none and is idle. Logits (weight 1):
        // A = 0.8 − 0.9 − 4/4 = −1.1, B = 0 − 0.1 − 0 = −0.1: B.
        let a = Candidate {
            overlap_blocks: 8,
            telemetry: known(4.0, 0.9),
            ..c(1, 0, 0)
        };
        let b = Candidate {
            telemetry: known(0.0, 0.1),
            ..c(2, 0, 0)
        };
        assert_eq!(s.choose(&[a, b], &hashes, 0), Some(1));
        // Dynamo's weight of 2 on overlap (its original 2·overlap): A = 1.6 − 1.9 = −0.3, still B; with
        // A lightly loaded, A = 1.6 − 0.2 − 0.25 = 1.15 over B = −0.1.
        s.overlap_weight = 2.0;
        assert_eq!(s.choose(&[a, b], &hashes, 0), Some(1));
        let a_light = Candidate {
            telemetry: known(1.0, 0.2),
            ..a
        };
        let b_q = Candidate {
            telemetry: known(4.0, 0.1),
            ..b
        };
        assert_eq!(s.choose(&[a_light, b_q], &hashes, 0), Some(0));
        // The router's own in-flight requests count as waiting: requests sent since the last scrape move
        // the choice before the engine shows them.
        s.overlap_weight = 1.0;
        let idle = |id| Candidate {
            telemetry: known(0.0, 0.2),
            ..c(id, 0, 0)
        };
        let mut busy = idle(1);
        busy.in_flight_requests = 5;
        assert_eq!(s.choose(&[busy, idle(2)], &[], 0), Some(1));
    }

    #[test]
    fn kv_aware_counts_an_unknown_worker_as_loaded_not_idle() {
        let mut s = Selector::new(Policy::KvAware, 1);
        let fresh = Candidate {
            telemetry: known(2.0, 0.5),
            ..c(1, 0, 0)
        };
        let unknown = c(2, 0, 0);
        for _ in 0..4 {
            assert_eq!(s.choose(&[unknown, fresh], &[], 0), Some(1));
        }
    }

    #[test]
    fn kv_aware_temperature_samples_by_softmax() {
        let mut s = Selector::new(Policy::KvAware, 7);
        s.temperature = 0.5;
        // Logits −0.1 and −0.6: softmax(l / 0.5) = e^0 : e^−1 = 0.731 : 0.269.
        let a = Candidate {
            telemetry: known(0.0, 0.1),
            ..c(1, 0, 0)
        };
        let b = Candidate {
            telemetry: known(0.0, 0.6),
            ..c(2, 0, 0)
        };
        let mut n = [0u32; 2];
        for _ in 0..20_000 {
            n[s.choose(&[a, b], &[], 0).unwrap()] += 1;
        }
        let p = f64::from(n[0]) / 20_000.0;
        assert!((p - 0.731).abs() < 0.02, "{p}");
        // Temperature 0: always the best.
        s.temperature = 0.0;
        for _ in 0..100 {
            assert_eq!(s.choose(&[a, b], &[], 0), Some(0));
        }
    }

    fn prefill(speed: f64, in_flight_requests: u64, in_flight_tokens: u64, id: u64) -> Candidate {
        Candidate {
            telemetry: TelemetrySnapshot {
                prefill_tokens_per_s: Some(speed),
                ..known(0.0, 0.2)
            },
            ..c(id, in_flight_requests, in_flight_tokens)
        }
    }

    fn score_selector(kind: PoolKind) -> Selector {
        let mut s = Selector::new(Policy::Score, 1);
        s.kind = kind;
        s
    }

    #[test]
    fn score_a_slow_worker_with_the_prefix_loses_to_a_fast_one_when_its_queue_is_long() {
        let mut s = score_selector(PoolKind::Prefill);
        let req = Request {
            block_hashes: &[0; 40],
            prompt_tokens: 640,
        };
        // Slow (1000 tokens/s) holds 30 of 40 blocks but has 5 prefills (3200 tokens) queued; fast
        // (2000 tokens/s) holds nothing and has one (640 tokens).
        let slow = Candidate {
            overlap_blocks: 30,
            ..prefill(1000.0, 5, 3200, 1)
        };
        let fast = prefill(2000.0, 1, 640, 2);
        assert_eq!(s.choose_request(&[slow, fast], &req, 0), Some(1));
        // Both idle: the prefix saves more than the speed (160 tokens at 1000/s beats 640 at 2000/s).
        let slow_idle = Candidate {
            overlap_blocks: 30,
            ..prefill(1000.0, 0, 0, 1)
        };
        let fast_idle = prefill(2000.0, 0, 0, 2);
        assert_eq!(s.choose_request(&[slow_idle, fast_idle], &req, 0), Some(0));
    }

    #[test]
    fn score_role_defaults_follow_expected_ttft_and_tokens_in_flight() {
        // Prefill defaults: the soonest expected finish, whatever the queue counts say. Fast
        // (2000 tokens/s) has 4 requests (2000 tokens) queued, slow (1000 tokens/s) 1 of 1500: the
        // request (500 tokens) finishes at 1.25 s on fast, 2 s on slow.
        let mut s = score_selector(PoolKind::Prefill);
        s.weights = ScoreWeights::default_for(PoolKind::Prefill);
        let req = Request {
            block_hashes: &[],
            prompt_tokens: 500,
        };
        let fast = prefill(2000.0, 4, 2000, 1);
        let slow = prefill(1000.0, 1, 1500, 2);
        assert_eq!(s.choose_request(&[slow, fast], &req, 0), Some(1));
        // Decode defaults: fewest tokens in flight, even on the worker whose EWMA TPOT looked worst.
        let mut s = score_selector(PoolKind::Decode);
        s.weights = ScoreWeights::default_for(PoolKind::Decode);
        let busy_fast = Candidate {
            telemetry: TelemetrySnapshot {
                tpot_s: Some(0.01),
                ttft_s: Some(0.05),
                ..known(0.0, 0.3)
            },
            ..c(1, 2, 9_000)
        };
        let light_slow = Candidate {
            telemetry: TelemetrySnapshot {
                tpot_s: Some(0.03),
                ttft_s: Some(0.5),
                ..known(0.0, 0.3)
            },
            ..c(2, 5, 4_000)
        };
        assert_eq!(s.choose_request(&[busy_fast, light_slow], &req, 0), Some(1));
        // Aggregated pools keep the lab's mix.
        assert_eq!(
            ScoreWeights::default_for(PoolKind::Aggregated),
            ScoreWeights::default()
        );
    }

    #[test]
    fn score_sends_prefill_work_in_proportion_to_worker_speed() {
        let mut s = score_selector(PoolKind::Prefill);
        let req = Request {
            block_hashes: &[],
            prompt_tokens: 500,
        };
        let mut cs = [prefill(3000.0, 0, 0, 1), prefill(1000.0, 0, 0, 2)];
        let mut n = [0u32; 2];
        // Requests pile up (none finishes): each goes where it would start soonest.
        for _ in 0..200 {
            let i = s.choose_request(&cs, &req, 0).unwrap();
            n[i] += 1;
            cs[i].in_flight_requests += 1;
            cs[i].in_flight_tokens += 500;
        }
        let ratio = f64::from(n[0]) / f64::from(n[1]);
        assert!((1.5..=3.5).contains(&ratio), "{n:?}");
    }

    #[test]
    fn score_balances_decode_by_tokens_not_requests() {
        let mut s = score_selector(PoolKind::Decode);
        let req = Request {
            block_hashes: &[],
            prompt_tokens: 100,
        };
        // A runs 2 long requests (20000 tokens left), B 6 short ones (1200): B.
        let a = Candidate {
            telemetry: known(0.0, 0.3),
            ..c(1, 2, 20_000)
        };
        let b = Candidate {
            telemetry: known(0.0, 0.3),
            ..c(2, 6, 1_200)
        };
        assert_eq!(s.choose_request(&[a, b], &req, 0), Some(1));
        // A worker that decodes twice as slowly (EWMA TPOT) loses at equal tokens.
        let slow = Candidate {
            telemetry: TelemetrySnapshot {
                tpot_s: Some(0.04),
                ..known(0.0, 0.3)
            },
            ..c(1, 2, 1000)
        };
        let fast = Candidate {
            telemetry: TelemetrySnapshot {
                tpot_s: Some(0.02),
                ..known(0.0, 0.3)
            },
            ..c(2, 2, 1000)
        };
        for _ in 0..3 {
            assert_eq!(s.choose_request(&[slow, fast], &req, 0), Some(1));
        }
    }

    #[test]
    fn score_counts_an_unknown_worker_as_loaded_not_idle() {
        let mut s = score_selector(PoolKind::Aggregated);
        let req = Request {
            block_hashes: &[],
            prompt_tokens: 100,
        };
        // The stale worker has nothing in flight from this router, but its engine may be full: it gets
        // the largest reported queue and no free memory, and loses to a lightly loaded known worker.
        let unknown = c(1, 0, 0);
        let fresh = Candidate {
            telemetry: known(1.0, 0.4),
            ..c(2, 0, 0)
        };
        for _ in 0..3 {
            assert_eq!(s.choose_request(&[unknown, fresh], &req, 0), Some(1));
        }
        // With nothing known anywhere (scraping off), workers are alike and load decides.
        let a = c(1, 3, 0);
        let b = c(2, 1, 0);
        assert_eq!(s.choose_request(&[a, b], &req, 0), Some(1));
    }

    #[test]
    fn score_free_memory_and_locality_weights() {
        let mut s = score_selector(PoolKind::Aggregated);
        let req = Request {
            block_hashes: &[0; 8],
            prompt_tokens: 128,
        };
        let full = Candidate {
            telemetry: known(0.0, 0.95),
            ..c(1, 0, 0)
        };
        let roomy = Candidate {
            telemetry: known(0.0, 0.10),
            ..c(2, 0, 0)
        };
        assert_eq!(s.choose_request(&[full, roomy], &req, 0), Some(1));
        // A large locality boost overrides it.
        s.weights.kv_boost = 1.0;
        let full_with_prefix = Candidate {
            overlap_blocks: 8,
            ..full
        };
        assert_eq!(
            s.choose_request(&[full_with_prefix, roomy], &req, 0),
            Some(0)
        );
        assert!(ScoreWeights {
            alpha: f64::NAN,
            ..Default::default()
        }
        .validate()
        .is_err());
    }

    #[test]
    fn score_records_the_prompt_in_the_approximate_index() {
        let mut s = score_selector(PoolKind::Prefill);
        let cs = [c(1, 0, 0), c(2, 0, 0)];
        let h: Vec<u64> = (1..=4).collect();
        let i = choose_with_index(&mut s, &cs, &h, 0).unwrap();
        assert_eq!(s.index.overlap(cs[i].id, &h, 1), 4);
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
