//! The requests a simulation replays: from a trace as `pdx replay` would send them (same
//! `--speed`, `--duration`, `--max-requests`, `--scale-tokens` and chat-template tokens), or
//! synthetic; and the chained KV block hashes their prompts get.

use crate::SimError;
use pdx_replay::trace::{TraceRequest, MOONCAKE_BLOCK_TOKENS};

/// One request of a simulation.
#[derive(Debug, Clone, PartialEq)]
pub struct SimRequest {
    /// Arrival, ns from the start.
    pub arrival_ns: u64,
    /// Prompt tokens as the engine counts them.
    pub isl: u32,
    /// Output tokens (`max_tokens`, `ignore_eos`).
    pub osl: u32,
    /// Mooncake prefix-block ids (empty: a prompt shared with no other request).
    pub hash_ids: Vec<u64>,
}

/// How trace requests become simulated ones (the `pdx replay` options of the same names).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Shaping {
    /// Time factor.
    pub speed: f64,
    /// Only arrivals within this many seconds.
    pub duration_s: Option<f64>,
    /// At most this many requests.
    pub max_requests: Option<usize>,
    /// Token-length factor.
    pub scale_tokens: f64,
    /// Prompt tokens the chat template adds (`/v1/chat/completions`: 2; completions: 0).
    pub overhead_tokens: u32,
}

impl Default for Shaping {
    fn default() -> Self {
        Self {
            speed: 1.0,
            duration_s: None,
            max_requests: None,
            scale_tokens: 1.0,
            overhead_tokens: pdx_tokens::CHAT_OVERHEAD_TOKENS as u32,
        }
    }
}

/// The simulated requests of a trace, as `pdx replay` plans them.
///
/// Errors: [`SimError::Invalid`] for a non-positive speed or scale, or no request left.
pub fn from_trace(trace: Vec<TraceRequest>, s: &Shaping) -> Result<Vec<SimRequest>, SimError> {
    let ok = |v: f64| v > 0.0 && v.is_finite();
    if !(ok(s.speed) && ok(s.scale_tokens)) {
        return Err(SimError::Invalid(
            "--speed and --scale-tokens must be positive".into(),
        ));
    }
    let scale = |n: u32| ((f64::from(n) * s.scale_tokens).round() as u32).max(1);
    let mut out = Vec::with_capacity(trace.len());
    for r in trace {
        let at = r.arrival_ms / s.speed / 1e3;
        if s.duration_s.is_some_and(|d| at > d) || s.max_requests.is_some_and(|m| out.len() >= m) {
            break;
        }
        out.push(SimRequest {
            arrival_ns: (at * 1e9) as u64,
            isl: scale(r.input_tokens).max(s.overhead_tokens + 1),
            osl: scale(r.output_tokens),
            hash_ids: r.hash_ids,
        });
    }
    if out.is_empty() {
        return Err(SimError::Invalid(
            "no request of the trace falls within the limits".into(),
        ));
    }
    Ok(out)
}

/// A synthetic workload: `requests=N,rate=R,isl=I,osl=O[,long_isl=L,long_fraction=F,jitter=J,seed=S]`:
/// Poisson arrivals at `R` req/s; prompts of `I` tokens, or `L` with probability `F`; outputs of
/// `O` tokens; every length drawn uniformly within ±`J` (a fraction, default 0.25) of its mean.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Synthetic {
    /// Requests.
    pub requests: usize,
    /// Mean arrival rate, req/s.
    pub rate: f64,
    /// Short prompt length, tokens.
    pub isl: u32,
    /// Long prompt length, tokens.
    pub long_isl: u32,
    /// Fraction of long prompts.
    pub long_fraction: f64,
    /// Output length, tokens.
    pub osl: u32,
    /// Relative spread of lengths.
    pub jitter: f64,
    /// Random seed.
    pub seed: u64,
}

impl std::str::FromStr for Synthetic {
    type Err = SimError;
    fn from_str(spec: &str) -> Result<Self, SimError> {
        let bad = |why: &str| SimError::Invalid(format!("--synthetic `{spec}`: {why}"));
        let mut s = Synthetic {
            requests: 1000,
            rate: 10.0,
            isl: 1024,
            long_isl: 8192,
            long_fraction: 0.0,
            osl: 128,
            jitter: 0.25,
            seed: 1,
        };
        for kv in spec.split(',').filter(|p| !p.trim().is_empty()) {
            let (k, v) = kv.split_once('=').ok_or_else(|| bad("want KEY=VALUE"))?;
            let f: f64 = v.trim().parse().map_err(|_| bad("a value is no number"))?;
            if !(f.is_finite() && f >= 0.0) {
                return Err(bad("values must be finite and >= 0"));
            }
            match k.trim() {
                "requests" => s.requests = f as usize,
                "rate" => s.rate = f,
                "isl" => s.isl = f as u32,
                "long_isl" => s.long_isl = f as u32,
                "long_fraction" => s.long_fraction = f,
                "osl" => s.osl = f as u32,
                "jitter" => s.jitter = f,
                "seed" => s.seed = f as u64,
                other => return Err(bad(&format!("unknown key {other}"))),
            }
        }
        if s.requests == 0 || s.rate <= 0.0 || s.isl == 0 || s.osl == 0 || s.long_isl == 0 {
            return Err(bad("requests, rate, isl, long_isl and osl must be > 0"));
        }
        if s.long_fraction > 1.0 || s.jitter >= 1.0 {
            return Err(bad("long_fraction must be <= 1 and jitter < 1"));
        }
        Ok(s)
    }
}

/// SplitMix64 (Steele, Lea & Flood, 2014): a small, seedable generator.
#[derive(Debug, Clone)]
pub struct SplitMix(u64);

impl SplitMix {
    /// A generator from a seed.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

impl Synthetic {
    /// The synthetic trace (arrivals in ms, as a trace file would give them).
    pub fn trace(&self) -> Vec<TraceRequest> {
        let mut rng = SplitMix::new(self.seed);
        let mut t = 0.0f64;
        let mut out = Vec::with_capacity(self.requests);
        let len = |mean: u32, rng: &mut SplitMix| {
            let f = 1.0 + self.jitter * (2.0 * rng.unit() - 1.0);
            ((f64::from(mean) * f).round() as u32).max(1)
        };
        for _ in 0..self.requests {
            out.push(TraceRequest {
                arrival_ms: t * 1e3,
                input_tokens: if rng.unit() < self.long_fraction {
                    len(self.long_isl, &mut rng)
                } else {
                    len(self.isl, &mut rng)
                },
                output_tokens: len(self.osl, &mut rng),
                hash_ids: Vec::new(),
            });
            t += -(1.0 - rng.unit()).ln() / self.rate;
        }
        out
    }
}

/// Chained hashes of a prompt's full KV blocks (`block_size` tokens each), standing in for
/// `pdx_tokens::block_hashes` of the prompt `pdx replay` would build: the replayer writes 512
/// tokens of the same text for Mooncake id `hash_ids[j]` in every request that has it at that
/// place (scaled traces too: `pdx_replay::prompt`), so a 16-token block is identified by the
/// id of the 512-token run holding its last token, chained on its parent like the real
/// hashes. Tokens past the ids, and requests without ids, get hashes of their own (`unique`
/// salts them).
pub fn block_hashes(r: &SimRequest, block_size: u32, unique: u64, out: &mut Vec<u64>) {
    out.clear();
    let bs = u64::from(block_size.max(1));
    let seg = MOONCAKE_BLOCK_TOKENS as u64;
    let mut h = 0x5044_5853_494d_u64; // "PDXSIM"
    for b in 0..u64::from(r.isl) / bs {
        let last = b * bs + bs - 1;
        let content = match r.hash_ids.get((last / seg) as usize) {
            Some(&id) => id,
            None => unique ^ 0xA5A5_0000_0000_0000,
        };
        h = pdx_tokens::mix64(h ^ pdx_tokens::mix64(content.wrapping_add(b << 48)));
        out.push(h);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trace_shaping_matches_replay_planning() {
        let t = vec![
            TraceRequest {
                arrival_ms: 0.0,
                input_tokens: 1,
                output_tokens: 10,
                hash_ids: vec![7],
            },
            TraceRequest {
                arrival_ms: 2000.0,
                input_tokens: 1000,
                output_tokens: 3,
                hash_ids: vec![],
            },
            TraceRequest {
                arrival_ms: 9000.0,
                input_tokens: 5,
                output_tokens: 5,
                hash_ids: vec![],
            },
        ];
        let s = Shaping {
            speed: 2.0,
            duration_s: Some(2.0),
            scale_tokens: 0.5,
            ..Shaping::default()
        };
        let r = from_trace(t.clone(), &s).unwrap();
        assert_eq!(r.len(), 2); // 9 s / 2 = 4.5 s > 2 s
        assert_eq!(r[1].arrival_ns, 1_000_000_000);
        assert_eq!((r[0].isl, r[0].osl), (3, 5)); // at least overhead + 1
        assert_eq!((r[1].isl, r[1].osl), (500, 2));
        assert!(from_trace(t, &Shaping { speed: 0.0, ..s }).is_err());
    }

    #[test]
    fn shared_mooncake_ids_share_leading_block_hashes() {
        let a = SimRequest {
            arrival_ns: 0,
            isl: 1100,
            osl: 1,
            hash_ids: vec![1, 2, 3],
        };
        let b = SimRequest {
            hash_ids: vec![1, 9, 3],
            ..a.clone()
        };
        let (mut ha, mut hb) = (Vec::new(), Vec::new());
        block_hashes(&a, 16, 1, &mut ha);
        block_hashes(&b, 16, 2, &mut hb);
        assert_eq!(ha.len(), 68);
        // The first 512 tokens (32 blocks) are the same text; from there on they differ,
        // including after the third id (chained on the parent).
        assert_eq!(ha[..32], hb[..32]);
        assert!(ha[32..].iter().zip(&hb[32..]).all(|(x, y)| x != y));
        // Without ids: nothing shared.
        let c = SimRequest {
            hash_ids: vec![],
            ..a.clone()
        };
        let mut hc = Vec::new();
        block_hashes(&c, 16, 3, &mut hc);
        assert_ne!(hc[0], ha[0]);
    }

    #[test]
    fn synthetic_spec_and_rate() {
        let s: Synthetic =
            "requests=20000,rate=100,isl=100,long_isl=1000,long_fraction=0.25,osl=10"
                .parse()
                .unwrap();
        let t = s.trace();
        let span = t.last().unwrap().arrival_ms / 1e3;
        assert!((t.len() as f64 / span - 100.0).abs() < 5.0, "{span}");
        let long = t.iter().filter(|r| r.input_tokens > 500).count() as f64 / t.len() as f64;
        assert!((long - 0.25).abs() < 0.02, "{long}");
        assert!(t.iter().all(|r| (7..=13).contains(&r.output_tokens)));
        assert!("rate=0".parse::<Synthetic>().is_err());
        assert!("colour=1".parse::<Synthetic>().is_err());
        assert!("jitter=1".parse::<Synthetic>().is_err());
    }
}
