//! The exact index against an oracle: `pdx mock`'s block manager (prefix cache with LRU eviction) serves a
//! random request stream on several workers; its KV events, encoded as the mock publishes them (engine
//! hashes scrambled per worker, so the index can only use the token ids), feed the router's exact index.
//! For every query the index's overlap per worker must equal the block manager's own count of cached
//! leading blocks, and `kv_aware` must pick what it picks with the oracle's overlaps. Then events are
//! lost: a gap a replay covers, and one beyond the replay buffer (reset, then exact again once the cache
//! is cleared).

use pdx_mock::kv_cache::{BlockManager, KvCacheEvent};
use pdx_mock::kv_events::encode_batch;
use pdx_router_core::kv_index::ExactOverlap;
use pdx_router_core::{Candidate, ExactIndex, Policy, ReplayRequest, Selector};
use std::collections::VecDeque;

/// `sel.choose` with each candidate's overlap as the router reads it (`kv_overlap`: `exact` where it knows the
/// worker, else the selector's approximate index), so the index and the oracle are asked the same way.
fn choose_with(
    sel: &mut Selector,
    cands: &[Candidate],
    hashes: &[u64],
    now_us: u64,
    exact: &dyn ExactOverlap,
) -> Option<usize> {
    let bs = sel.block_size.max(1);
    let cands: Vec<Candidate> = cands
        .iter()
        .map(|c| Candidate {
            overlap_blocks: pdx_router_core::kv_index::kv_overlap(
                Some(exact),
                &sel.index,
                c.id,
                hashes,
                bs,
                now_us,
            ) as u64,
            ..*c
        })
        .collect();
    sel.choose(&cands, hashes, now_us)
}

const BS: usize = 4;

/// SplitMix64 generator: reproducible streams without a dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// An engine: the mock's block manager, its running requests, its published batches.
struct Engine {
    kv: BlockManager,
    running: VecDeque<Vec<u32>>,
    salt: u64,
    seq: u64,
    /// Every batch published (the replay buffer keeps a suffix of it).
    log: Vec<(u64, Vec<u8>)>,
}

impl Engine {
    fn new(num_blocks: u32, salt: u64) -> Self {
        let mut kv = BlockManager::new(num_blocks, BS);
        kv.record_events(true);
        Self {
            kv,
            running: VecDeque::new(),
            salt,
            seq: 0,
            log: Vec::new(),
        }
    }

    /// The engine's hashes as a subscriber sees them: opaque (a per-worker bijection of the mock's).
    fn scramble(&self, h: u64) -> u64 {
        pdx_tokens::mix64(h ^ self.salt)
    }

    /// Runs one request: frees old ones while blocks are short, allocates, commits the prompt.
    fn serve(&mut self, prompt: &[u32], out_tokens: usize) {
        let hashes = pdx_tokens::block_hashes(prompt, BS);
        let n_full = prompt.len() / BS;
        let total = (prompt.len() + out_tokens).div_ceil(BS);
        let alloc = loop {
            match self.kv.allocate(&hashes[..n_full], total) {
                Ok(a) => break a,
                Err(_) => {
                    let old = self.running.pop_front().expect("a request to finish");
                    self.kv.free(&old);
                }
            }
        };
        self.kv
            .commit_prompt(&alloc.blocks[..n_full], &hashes[..n_full], prompt);
        self.running.push_back(alloc.blocks);
    }

    fn finish_some(&mut self, rng: &mut Rng) {
        while !self.running.is_empty() && rng.below(3) == 0 {
            let b = self.running.pop_front().unwrap();
            self.kv.free(&b);
        }
    }

    /// Publishes what the block manager recorded as one batch (if anything): its sequence number and
    /// payload.
    fn publish(&mut self) -> Option<(u64, Vec<u8>)> {
        let events: Vec<KvCacheEvent> = self
            .kv
            .take_events()
            .into_iter()
            .map(|e| match e {
                KvCacheEvent::BlockStored {
                    block_hashes,
                    parent_block_hash,
                    token_ids,
                    block_size,
                } => KvCacheEvent::BlockStored {
                    block_hashes: block_hashes.iter().map(|&h| self.scramble(h)).collect(),
                    parent_block_hash: parent_block_hash.map(|h| self.scramble(h)),
                    token_ids,
                    block_size,
                },
                KvCacheEvent::BlockRemoved { block_hashes } => KvCacheEvent::BlockRemoved {
                    block_hashes: block_hashes.iter().map(|&h| self.scramble(h)).collect(),
                },
                KvCacheEvent::AllBlocksCleared => KvCacheEvent::AllBlocksCleared,
            })
            .collect();
        if events.is_empty() {
            return None;
        }
        let b = (self.seq, encode_batch(0.0, &events));
        self.seq += 1;
        self.log.push(b.clone());
        Some(b)
    }

    /// The oracle: leading blocks of `prompt` this engine has cached.
    fn cached(&self, prompt: &[u32]) -> usize {
        let h = pdx_tokens::block_hashes(prompt, BS);
        self.kv.count_hits(&h[..prompt.len() / BS])
    }
}

struct Oracle<'a>(&'a [Engine]);
impl ExactOverlap for Oracle<'_> {
    fn exact_overlap(&self, worker: u64, hashes: &[u64], _bs: u64) -> Option<usize> {
        Some(self.0[worker as usize].kv.count_hits(hashes))
    }
}

/// Prompts: one of a few shared prefixes (system prompts, documents), then a private suffix.
fn prompt(rng: &mut Rng) -> Vec<u32> {
    let p = rng.below(6) as u32;
    let prefix_len = 4 + 4 * (p as usize % 4) + rng.below(3) as usize;
    let mut t: Vec<u32> = (0..prefix_len as u32).map(|i| 1000 * p + i).collect();
    let suffix = rng.below(14) as usize;
    let salt = rng.below(4) as u32; // few distinct suffixes, so suffix blocks are shared too
    t.extend((0..suffix as u32).map(|i| 50_000 + 100 * salt + i));
    t
}

fn full_hashes(prompt: &[u32]) -> Vec<u64> {
    let h = pdx_tokens::block_hashes(prompt, BS);
    h[..prompt.len() / BS].to_vec()
}

fn assert_matches(ix: &ExactIndex, engines: &[Engine], rng: &mut Rng, step: usize) {
    for _ in 0..8 {
        let q = prompt(rng);
        let h = full_hashes(&q);
        for (w, e) in engines.iter().enumerate() {
            assert_eq!(
                ix.overlap(w as u64, &h, BS as u64),
                Some(e.cached(&q)),
                "step {step}, worker {w}, prompt {q:?}"
            );
        }
    }
}

#[test]
fn the_exact_index_equals_an_oracle_of_every_workers_cache() {
    let mut rng = Rng(17);
    // Small caches, so blocks are evicted all the time.
    let mut engines: Vec<Engine> = (0..3)
        .map(|w| Engine::new(24 + 8 * w, 0xabc + w as u64))
        .collect();
    let mut ix = ExactIndex::default();
    for w in 0..3 {
        // Connecting asks for the history: there is none yet.
        ix.add_worker(w, true);
        let req = ix.on_connected(w).unwrap();
        assert_eq!(replay(&mut ix, &engines[w as usize], req, 10_000), None);
    }
    let mut by_index = Selector::new(Policy::KvAware, 5);
    let mut by_oracle = Selector::new(Policy::KvAware, 5);
    by_index.block_size = BS as u64;
    by_oracle.block_size = BS as u64;
    let mut stored = 0;
    for step in 0..1500 {
        let q = prompt(&mut rng);
        let h = full_hashes(&q);
        let cands: Vec<Candidate> = (0..3)
            .map(|w| {
                let running = engines[w as usize].running.len() as u64;
                Candidate::new(w, running, 4 * running, true)
            })
            .collect();
        let pick = choose_with(&mut by_index, &cands, &h, step, &ix).unwrap();
        let oracle_pick = choose_with(&mut by_oracle, &cands, &h, step, &Oracle(&engines)).unwrap();
        assert_eq!(pick, oracle_pick, "step {step}: kv_aware chose differently");
        let e = &mut engines[pick];
        e.finish_some(&mut rng);
        e.serve(&q, 1 + rng.below(8) as usize);
        if let Some((seq, payload)) = e.publish() {
            assert_eq!(ix.on_live(pick as u64, seq, &payload), None);
        }
        assert_matches(&ix, &engines, &mut rng, step as usize);
        stored = ix.stats(0).unwrap().stored_blocks;
    }
    let s: Vec<_> = (0..3).map(|w| ix.stats(w).unwrap()).collect();
    assert!(stored > 50, "{s:?}");
    assert!(
        s.iter()
            .all(|s| s.removed_blocks > 20 && s.exact && s.resets == 0),
        "every worker evicted blocks and stayed exact: {s:?}"
    );
}

/// Feeds `engine`'s batches `from..` to the index as its replay socket would, keeping only the last
/// `buffer` batches.
fn replay(
    ix: &mut ExactIndex,
    e: &Engine,
    req: ReplayRequest,
    buffer: usize,
) -> Option<ReplayRequest> {
    let kept = &e.log[e.log.len().saturating_sub(buffer)..];
    for (seq, p) in kept.iter().filter(|(s, _)| *s >= req.from) {
        ix.on_replay(req.worker, *seq, p);
    }
    ix.on_replay_end(req.worker)
}

#[test]
fn lost_batches_are_recovered_by_replay_or_by_reset() {
    let mut rng = Rng(99);
    let mut engines = vec![Engine::new(40, 1)];
    let mut ix = ExactIndex::default();
    ix.add_worker(0, true);
    let req = ix.on_connected(0).unwrap();
    assert_eq!(replay(&mut ix, &engines[0], req, 10_000), None);
    let mut lost = 0;
    for step in 0..400usize {
        let e = &mut engines[0];
        e.finish_some(&mut rng);
        e.serve(&prompt(&mut rng), 3);
        let Some((seq, payload)) = e.publish() else {
            continue;
        };
        // Every 50th batch is lost on the way (a forced sequence gap); the next one finds the gap.
        if step % 50 == 7 {
            lost += 1;
            continue;
        }
        if let Some(req) = ix.on_live(0, seq, &payload) {
            assert_eq!(req.from, seq - 1, "replay from the lost batch");
            assert_eq!(replay(&mut ix, &engines[0], req, 10_000), None);
        }
        assert_matches(&ix, &engines, &mut rng, step);
    }
    let s = ix.stats(0).unwrap();
    assert_eq!((s.gaps, s.resets), (lost, 0), "{s:?}");
    assert!(s.exact);

    // Now a gap of 30 batches while the publisher keeps only the last 10.
    let e = &mut engines[0];
    for _ in 0..30 {
        e.serve(&prompt(&mut rng), 3);
        e.finish_some(&mut rng);
        e.publish();
    }
    let (seq, payload) = loop {
        e.serve(&prompt(&mut rng), 3);
        if let Some(b) = e.publish() {
            break b;
        }
    };
    let req = ix.on_live(0, seq, &payload).unwrap();
    assert_eq!(replay(&mut ix, &engines[0], req, 10), None);
    let s = ix.stats(0).unwrap();
    assert_eq!(s.resets, 1, "{s:?}");
    assert!(!s.exact, "approximate after losing events for good");
    let q = prompt(&mut rng);
    assert_eq!(ix.overlap(0, &full_hashes(&q), BS as u64), None);
    // The engine's cache is cleared (vLLM reset_prefix_cache): exact again, and equal to the oracle
    // from then on.
    let e = &mut engines[0];
    while let Some(b) = e.running.pop_front() {
        e.kv.free(&b);
    }
    assert!(e.kv.reset_prefix_cache());
    let (seq, payload) = e.publish().unwrap();
    assert_eq!(ix.on_live(0, seq, &payload), None);
    assert!(ix.stats(0).unwrap().exact);
    for step in 0..100 {
        let e = &mut engines[0];
        e.finish_some(&mut rng);
        e.serve(&prompt(&mut rng), 3);
        if let Some((seq, payload)) = e.publish() {
            assert_eq!(ix.on_live(0, seq, &payload), None);
        }
        assert_matches(&ix, &engines, &mut rng, step);
    }
}
