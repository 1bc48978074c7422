//! KV cache: block manager with prefix caching and LRU eviction, deterministic block content,
//! and the prefill side's table of blocks held for remote decode.
//!
//! Prefix caching follows vLLM's V1 `KVCacheManager`: a full block is identified by the
//! chained hash `h_i = XXH3-64(token ids of block i, seed = h_{i-1})` (Dynamo and vLLM also
//! hash token ids per block, chained on the parent hash); a new request reuses the longest
//! run of leading blocks whose hashes are cached. Freed blocks that carry a hash stay cached
//! and become evictable; the least recently freed is evicted first, and a request's blocks
//! are freed tail first so prefixes outlive their suffixes (vLLM frees in reverse order too).
//!
//! With [`BlockManager::record_events`] on, every change of the prefix cache is also recorded as a vLLM
//! KV cache event ([`KvCacheEvent`]) in the order it happened, for the engine to publish
//! ([`crate::kv_events`]): `BlockStored` where full blocks enter the cache, `BlockRemoved` where an
//! evictable block is evicted, `AllBlocksCleared` on [`BlockManager::reset_prefix_cache`].

use crate::error::MockError;
pub use crate::kv_events::KvCacheEvent;
use std::collections::{BTreeMap, HashMap};

pub use pdx_tokens::{block_hashes, mix64};

/// Shape of the KV bytes of one block.
///
/// Layout of a block in memory: `[layer][slot][bytes_per_token_layer]`, with
/// `bytes_per_token_layer = kv_heads * head_dim * 2 (K and V) * dtype_bytes / scale_down`
/// rounded up to a multiple of 8.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvLayout {
    /// Tokens per block.
    pub block_size: usize,
    /// Transformer layers.
    pub layers: usize,
    /// Bytes per token per layer (multiple of 8).
    pub bytes_per_token_layer: usize,
}

impl KvLayout {
    /// Bytes of one block.
    pub fn block_bytes(&self) -> usize {
        self.block_size * self.layers * self.bytes_per_token_layer
    }

    /// Fills the first `n_tokens` slots of a block with the content for the block whose
    /// chained hash is `block_hash` (a deterministic function of the token ids up to the end of
    /// the block, the position and the layer). Cost: one [`mix64`] per 8 bytes.
    pub fn fill(&self, block: &mut [u8], block_hash: u64, n_tokens: usize) {
        for layer in 0..self.layers {
            for slot in 0..n_tokens {
                let seed = slot_seed(block_hash, layer, slot);
                let off = (layer * self.block_size + slot) * self.bytes_per_token_layer;
                for (w, word) in block[off..off + self.bytes_per_token_layer]
                    .chunks_exact_mut(8)
                    .enumerate()
                {
                    word.copy_from_slice(&mix64(seed.wrapping_add(w as u64)).to_le_bytes());
                }
            }
        }
    }

    /// True when the first `n_tokens` slots of `block` hold exactly what [`Self::fill`] writes.
    pub fn verify(&self, block: &[u8], block_hash: u64, n_tokens: usize) -> bool {
        if block.len() < self.block_bytes() {
            return false;
        }
        for layer in 0..self.layers {
            for slot in 0..n_tokens {
                let seed = slot_seed(block_hash, layer, slot);
                let off = (layer * self.block_size + slot) * self.bytes_per_token_layer;
                for (w, word) in block[off..off + self.bytes_per_token_layer]
                    .chunks_exact(8)
                    .enumerate()
                {
                    if word != mix64(seed.wrapping_add(w as u64)).to_le_bytes() {
                        return false;
                    }
                }
            }
        }
        true
    }
}

#[inline]
fn slot_seed(block_hash: u64, layer: usize, slot: usize) -> u64 {
    mix64(block_hash ^ ((layer as u64) << 40) ^ ((slot as u64) << 20))
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

#[derive(Debug, Clone, Default)]
struct BlockMeta {
    ref_cnt: u32,
    hash: Option<u64>,
    /// LRU stamp while evictable.
    stamp: u64,
}

/// Blocks given to one request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Allocation {
    /// Block table: block ids in prompt order, then blocks reserved for output.
    pub blocks: Vec<u32>,
    /// Leading blocks that were prefix-cache hits (their KV is already computed).
    pub cached_blocks: usize,
}

/// Block pool with prefix caching and LRU eviction. Not thread-safe; the engine wraps it in a
/// mutex.
#[derive(Debug)]
pub struct BlockManager {
    block_size: usize,
    meta: Vec<BlockMeta>,
    /// Blocks with no hash and no references.
    free: Vec<u32>,
    /// Cached full blocks: hash → block id.
    cached: HashMap<u64, u32>,
    /// Evictable blocks (ref 0, hashed) by LRU stamp.
    evictable: BTreeMap<u64, u32>,
    tick: u64,
    in_use: u32,
    /// Recorded KV cache events (`None`: not recording).
    events: Option<Vec<KvCacheEvent>>,
}

impl BlockManager {
    /// A pool of `num_blocks` blocks of `block_size` tokens.
    pub fn new(num_blocks: u32, block_size: usize) -> Self {
        Self {
            block_size,
            meta: vec![BlockMeta::default(); num_blocks as usize],
            free: (0..num_blocks).rev().collect(),
            cached: HashMap::new(),
            evictable: BTreeMap::new(),
            tick: 0,
            in_use: 0,
            events: None,
        }
    }

    /// Starts (or stops) recording KV cache events; stopping drops what was recorded.
    pub fn record_events(&mut self, on: bool) {
        self.events = on.then(Vec::new);
    }

    /// The events recorded since the last call, oldest first (empty when not recording).
    pub fn take_events(&mut self) -> Vec<KvCacheEvent> {
        self.events.as_mut().map(std::mem::take).unwrap_or_default()
    }

    fn record(&mut self, ev: KvCacheEvent) {
        if let Some(evs) = &mut self.events {
            evs.push(ev);
        }
    }

    /// An evicted block: evictions of one allocation become one event, as vLLM's per-step queue does not split
    /// them (and nothing is made when events are off: this runs per evicted block).
    fn record_removed(&mut self, h: u64) {
        let Some(evs) = &mut self.events else { return };
        if let Some(KvCacheEvent::BlockRemoved { block_hashes }) = evs.last_mut() {
            block_hashes.push(h);
        } else {
            evs.push(KvCacheEvent::BlockRemoved {
                block_hashes: vec![h],
            });
        }
    }

    /// Clears the prefix cache, as vLLM's `reset_prefix_cache`: only when no block is in use (then every
    /// cached block becomes free and `AllBlocksCleared` is recorded). Returns whether it did.
    pub fn reset_prefix_cache(&mut self) -> bool {
        if self.in_use > 0 {
            return false;
        }
        for (_, b) in std::mem::take(&mut self.evictable) {
            self.meta[b as usize].hash = None;
            self.free.push(b);
        }
        self.cached.clear();
        self.record(KvCacheEvent::AllBlocksCleared);
        true
    }

    /// Tokens per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }
    /// Capacity in blocks.
    pub fn num_blocks(&self) -> u32 {
        self.meta.len() as u32
    }
    /// Blocks referenced by at least one request.
    pub fn used_blocks(&self) -> u32 {
        self.in_use
    }
    /// Fraction of blocks in use, `0.0..=1.0` (vLLM `kv_cache_usage_perc`: evictable cached
    /// blocks count as free).
    pub fn usage(&self) -> f64 {
        if self.meta.is_empty() {
            0.0
        } else {
            f64::from(self.in_use) / self.meta.len() as f64
        }
    }
    /// Number of cached (hashed) blocks, in use or evictable.
    pub fn cached_blocks(&self) -> usize {
        self.cached.len()
    }

    /// Leading blocks of `hashes` (full blocks only) that are cached, without taking them.
    pub fn count_hits(&self, full_hashes: &[u64]) -> usize {
        full_hashes
            .iter()
            .take_while(|h| self.cached.contains_key(h))
            .count()
    }

    /// Allocates `total_blocks` blocks for a request whose full prompt blocks hash to
    /// `full_hashes`; leading cached blocks are reused (prefix hits).
    ///
    /// Errors: [`MockError::TooLarge`] if `total_blocks` exceeds the capacity,
    /// [`MockError::OutOfBlocks`] if not enough blocks are free or evictable now (nothing is
    /// taken in that case).
    pub fn allocate(
        &mut self,
        full_hashes: &[u64],
        total_blocks: usize,
    ) -> Result<Allocation, MockError> {
        if total_blocks > self.meta.len() {
            return Err(MockError::TooLarge {
                needed: total_blocks as u32,
                capacity: self.meta.len() as u32,
            });
        }
        let hits: Vec<u32> = full_hashes
            .iter()
            .take(total_blocks)
            .map_while(|h| self.cached.get(h).copied())
            .collect();
        let evictable_hits = hits
            .iter()
            .filter(|&&b| self.meta[b as usize].ref_cnt == 0)
            .count();
        let needed = total_blocks - hits.len();
        let available = self.free.len() + self.evictable.len() - evictable_hits;
        if needed > available {
            return Err(MockError::OutOfBlocks {
                needed: needed as u32,
                available: available as u32,
            });
        }
        let mut blocks = Vec::with_capacity(total_blocks);
        for &b in &hits {
            self.take_ref(b);
            blocks.push(b);
        }
        for _ in 0..needed {
            let b = match self.free.pop() {
                Some(b) => b,
                None => {
                    let (_, b) = self.evictable.pop_first().expect("checked available");
                    let m = &mut self.meta[b as usize];
                    if let Some(h) = m.hash.take() {
                        self.cached.remove(&h);
                        self.record_removed(h);
                    }
                    b
                }
            };
            self.meta[b as usize].ref_cnt = 1;
            self.in_use += 1;
            blocks.push(b);
        }
        Ok(Allocation {
            blocks,
            cached_blocks: hits.len(),
        })
    }

    fn take_ref(&mut self, b: u32) {
        let m = &mut self.meta[b as usize];
        if m.ref_cnt == 0 {
            self.evictable.remove(&m.stamp);
            self.in_use += 1;
        }
        m.ref_cnt += 1;
    }

    /// Registers computed full blocks in the prefix cache: `blocks[i]` holds the block hashing
    /// to `full_hashes[i]`. A hash already cached in another block is left as is. Records no event
    /// (the token ids are unknown here): see [`BlockManager::commit_prompt`].
    pub fn commit(&mut self, blocks: &[u32], full_hashes: &[u64]) {
        self.commit_inner(blocks, full_hashes, None);
    }

    /// [`BlockManager::commit`] for a prompt of token ids `prompt` (at least `full_hashes.len()` full
    /// blocks): each run of newly cached blocks is recorded as one `BlockStored` with the blocks' token ids
    /// and the hash of the block before the run as its parent (vLLM's `cache_full_blocks`).
    pub fn commit_prompt(&mut self, blocks: &[u32], full_hashes: &[u64], prompt: &[u32]) {
        self.commit_inner(blocks, full_hashes, Some(prompt));
    }

    fn commit_inner(&mut self, blocks: &[u32], full_hashes: &[u64], prompt: Option<&[u32]>) {
        let bs = self.block_size;
        let mut run: Option<usize> = None;
        let n = blocks.len().min(full_hashes.len());
        for i in 0..=n {
            let new = i < n && {
                let (b, h) = (blocks[i], full_hashes[i]);
                let fresh = self.meta[b as usize].hash.is_none() && !self.cached.contains_key(&h);
                if fresh {
                    self.meta[b as usize].hash = Some(h);
                    self.cached.insert(h, b);
                }
                fresh
            };
            match (new, run) {
                (true, None) => run = Some(i),
                (false, Some(start)) => {
                    run = None;
                    if let Some(p) = prompt.filter(|p| p.len() >= i * bs) {
                        self.record(KvCacheEvent::BlockStored {
                            block_hashes: full_hashes[start..i].to_vec(),
                            parent_block_hash: start.checked_sub(1).map(|j| full_hashes[j]),
                            token_ids: p[start * bs..i * bs].to_vec(),
                            block_size: bs as u32,
                        });
                    }
                }
                _ => {}
            }
        }
    }

    /// Releases one reference on each block, tail first. Blocks reaching zero references
    /// become evictable (if cached) or free.
    pub fn free(&mut self, blocks: &[u32]) {
        for &b in blocks.iter().rev() {
            let m = &mut self.meta[b as usize];
            debug_assert!(m.ref_cnt > 0, "double free of block {b}");
            if m.ref_cnt == 0 {
                continue;
            }
            m.ref_cnt -= 1;
            if m.ref_cnt == 0 {
                self.in_use -= 1;
                if m.hash.is_some() {
                    self.tick += 1;
                    m.stamp = self.tick;
                    self.evictable.insert(self.tick, b);
                } else {
                    self.free.push(b);
                }
            }
        }
    }
}

/// Blocks a prefill engine keeps for a remote decode, by request id, until the decode side's
/// read notification or a deadline (vLLM NixlConnector: freed on the consumer's notification,
/// or after `VLLM_NIXL_ABORT_REQUEST_TIMEOUT`, default 480 s). Sans-IO: callers pass the time.
#[derive(Debug, Default)]
pub struct HoldTable {
    held: HashMap<String, (Vec<u32>, std::time::Instant)>,
}

impl HoldTable {
    /// Holds `blocks` for `request_id` until `deadline`. A previous hold under the same id is
    /// returned so the caller can free it.
    pub fn hold(
        &mut self,
        request_id: String,
        blocks: Vec<u32>,
        deadline: std::time::Instant,
    ) -> Option<Vec<u32>> {
        self.held
            .insert(request_id, (blocks, deadline))
            .map(|(b, _)| b)
    }
    /// Removes the hold of `request_id` (read notification); returns its blocks.
    pub fn release(&mut self, request_id: &str) -> Option<Vec<u32>> {
        self.held.remove(request_id).map(|(b, _)| b)
    }
    /// Removes every hold whose deadline is `<= now`; returns their blocks.
    pub fn expire(&mut self, now: std::time::Instant) -> Vec<(String, Vec<u32>)> {
        let ids: Vec<String> = self
            .held
            .iter()
            .filter(|(_, (_, d))| *d <= now)
            .map(|(k, _)| k.clone())
            .collect();
        ids.into_iter()
            .filter_map(|k| self.held.remove(&k).map(|(b, _)| (k, b)))
            .collect()
    }
    /// Number of requests held.
    pub fn len(&self) -> usize {
        self.held.len()
    }
    /// True when nothing is held.
    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn toks(n: u32, seed: u32) -> Vec<u32> {
        (0..n).map(|i| i * 31 + seed).collect()
    }

    #[test]
    fn hashes_are_chained() {
        let a = block_hashes(&toks(40, 1), 16);
        assert_eq!(a.len(), 3);
        let mut t = toks(40, 1);
        t[0] = 999; // changing block 0 changes every later hash
        let b = block_hashes(&t, 16);
        assert!(a.iter().zip(&b).all(|(x, y)| x != y));
        let c = block_hashes(&toks(32, 1), 16);
        assert_eq!(a[..2], c[..]);
    }

    #[test]
    fn prefix_hits_after_free_and_partial_blocks_not_cached() {
        let mut m = BlockManager::new(10, 16);
        let t = toks(40, 1);
        let h = block_hashes(&t, 16);
        let full = &h[..40 / 16];
        let a = m.allocate(full, 3).unwrap();
        assert_eq!(a.cached_blocks, 0);
        m.commit(&a.blocks, full);
        m.free(&a.blocks);
        assert_eq!(m.used_blocks(), 0);
        assert_eq!(m.cached_blocks(), 2);
        // same prefix, longer prompt
        let t2 = toks(64, 1);
        let h2 = block_hashes(&t2, 16);
        assert_eq!(m.count_hits(&h2), 2);
        let b = m.allocate(&h2, 4).unwrap();
        assert_eq!(b.cached_blocks, 2);
        assert_eq!(b.blocks[..2], a.blocks[..2]);
        // concurrent sharing: a second request takes refs on the same blocks
        let c = m.allocate(&h2[..2], 2).unwrap();
        assert_eq!(c.blocks, b.blocks[..2]);
        assert_eq!(m.used_blocks(), 4);
        m.free(&c.blocks);
        assert_eq!(m.used_blocks(), 4);
        m.free(&b.blocks);
        assert_eq!(m.used_blocks(), 0);
    }

    #[test]
    fn eviction_under_pressure_is_lru_and_tail_first() {
        let mut m = BlockManager::new(4, 16);
        let h1 = block_hashes(&toks(32, 1), 16);
        let a = m.allocate(&h1, 2).unwrap();
        m.commit(&a.blocks, &h1);
        m.free(&a.blocks);
        let h2 = block_hashes(&toks(32, 2), 16);
        let b = m.allocate(&h2, 2).unwrap();
        m.commit(&b.blocks, &h2);
        m.free(&b.blocks);
        assert_eq!(m.cached_blocks(), 4);
        // needs 1 block: evicts the LRU one, which is request 1's tail block
        let c = m.allocate(&[], 1).unwrap();
        assert_eq!(c.blocks, vec![a.blocks[1]]);
        assert_eq!(m.count_hits(&h1), 1, "request 1 keeps its first block");
        assert_eq!(m.count_hits(&h2), 2);
        // needs all 4 with 1 in use: fails, takes nothing
        let e = m.allocate(&[], 4).unwrap_err();
        assert!(matches!(
            e,
            MockError::OutOfBlocks {
                needed: 4,
                available: 3
            }
        ));
        assert!(e.is_retryable());
        assert_eq!(m.used_blocks(), 1);
        assert!(matches!(
            m.allocate(&[], 5),
            Err(MockError::TooLarge { .. })
        ));
        m.free(&c.blocks);
        let all = m.allocate(&[], 4).unwrap();
        assert_eq!(all.blocks.len(), 4);
        assert_eq!(m.cached_blocks(), 0);
        assert!((m.usage() - 1.0).abs() < 1e-9);
    }

    #[test]
    fn hit_on_evictable_block_is_not_counted_as_available() {
        let mut m = BlockManager::new(2, 16);
        let h = block_hashes(&toks(16, 1), 16);
        let a = m.allocate(&h, 1).unwrap();
        m.commit(&a.blocks, &h);
        m.free(&a.blocks);
        // 1 hit (evictable) + 2 new = 3 > 2 blocks
        assert!(m.allocate(&h, 3).is_err());
        let b = m.allocate(&h, 2).unwrap();
        assert_eq!(b.cached_blocks, 1);
        assert_eq!(m.used_blocks(), 2);
    }

    #[test]
    fn cache_changes_are_recorded_as_vllm_kv_events_in_order() {
        let mut m = BlockManager::new(4, 4);
        m.record_events(true);
        let t = toks(12, 1);
        let h = block_hashes(&t, 4);
        let a = m.allocate(&h[..2], 3).unwrap();
        m.commit_prompt(&a.blocks[..2], &h[..2], &t);
        assert_eq!(
            m.take_events(),
            vec![KvCacheEvent::BlockStored {
                block_hashes: h[..2].to_vec(),
                parent_block_hash: None,
                token_ids: t[..8].to_vec(),
                block_size: 4,
            }]
        );
        // A longer prompt on the cached prefix: only its new third block is stored, parent block 2.
        let b = m.allocate(&h, 3).unwrap();
        assert_eq!(b.cached_blocks, 2);
        m.commit_prompt(&b.blocks, &h, &t);
        assert_eq!(
            m.take_events(),
            vec![KvCacheEvent::BlockStored {
                block_hashes: vec![h[2]],
                parent_block_hash: Some(h[1]),
                token_ids: t[8..].to_vec(),
                block_size: 4,
            }]
        );
        m.free(&a.blocks);
        m.free(&b.blocks);
        // Pressure evicts the tail blocks first: one BlockRemoved per allocation.
        let c = m.allocate(&[], 3).unwrap();
        assert_eq!(
            m.take_events(),
            vec![KvCacheEvent::BlockRemoved {
                block_hashes: vec![h[2], h[1]]
            }]
        );
        assert!(!m.reset_prefix_cache(), "blocks in use");
        m.free(&c.blocks);
        assert!(m.reset_prefix_cache());
        assert_eq!(m.take_events(), vec![KvCacheEvent::AllBlocksCleared]);
        assert_eq!(m.cached_blocks(), 0);
        m.record_events(false);
        let d = m.allocate(&h[..1], 1).unwrap();
        m.commit_prompt(&d.blocks, &h[..1], &t);
        assert!(m.take_events().is_empty(), "not recording");
    }

    #[test]
    fn fill_verify_detects_any_change() {
        let l = KvLayout {
            block_size: 4,
            layers: 3,
            bytes_per_token_layer: 64,
        };
        let mut buf = vec![0u8; l.block_bytes()];
        l.fill(&mut buf, 42, 3);
        assert!(l.verify(&buf, 42, 3));
        assert!(!l.verify(&buf, 43, 3));
        assert!(!l.verify(&buf, 42, 4), "slot 3 was not filled");
        let last_filled = (2 * 4 + 2) * 64 + 63; // layer 2, slot 2, last byte
        buf[last_filled] ^= 1;
        assert!(!l.verify(&buf, 42, 3));
    }

    #[test]
    fn hold_table_releases_and_expires() {
        let mut t = HoldTable::default();
        let now = Instant::now();
        t.hold("a".into(), vec![1, 2], now + Duration::from_secs(480));
        t.hold("b".into(), vec![3], now + Duration::from_secs(1));
        assert_eq!(t.release("a"), Some(vec![1, 2]));
        assert_eq!(t.release("a"), None);
        assert!(t.expire(now).is_empty());
        assert_eq!(
            t.expire(now + Duration::from_secs(2)),
            vec![("b".to_string(), vec![3])]
        );
        assert!(t.is_empty());
    }
}
