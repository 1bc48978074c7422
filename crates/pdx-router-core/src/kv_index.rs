//! The exact per-worker prefix index, fed by the engines' KV events ([`crate::kv_events`]), with
//! per-worker sequence tracking, gap detection, replay and reset. Sans-IO: the caller (the router's
//! subscriber thread) hands in every received message and runs the replays this index asks for.
//!
//! **Keys.** Engines' block hashes are opaque (vLLM's are SHA-256 or Python `hash()` values, seeded per
//! process), so the index keys blocks by the router's own chained hashes
//! ([`pdx_tokens::chain_block_hash`]), computed from each `BlockStored`'s `token_ids` and its parent's
//! router hash, the same hashes the router computes for a prompt ([`pdx_tokens::block_hashes`]). Per worker
//! it maps engine hash → router hash, so a `BlockRemoved` (engine hashes only) can be applied. This is how
//! Dynamo's KV indexer treats engine hashes too (`lib/kv-router`: "local" engine hashes mapped to the
//! router's sequence hashes).
//!
//! **Reference counts.** vLLM can cache two blocks with the same hash (two requests filled the same
//! prefix at once) and then sends `BlockStored` twice and `BlockRemoved` once per evicted block; each
//! engine hash and router hash therefore counts its stores, and a block leaves the index when its count
//! reaches zero.
//!
//! **Sequence numbers.** vLLM numbers every batch (0, 1, 2, ... per publisher process). Per worker:
//! * the next expected number arrives: applied;
//! * a larger one (a gap: the PUB socket dropped messages, the router was disconnected): the index asks
//!   for a replay from the first missing number ([`ReplayRequest`]) and holds live batches (bounded) until
//!   the replay ends; the replay socket sends every buffered batch from there, then an end marker;
//! * the replay cannot cover the gap (its first batch is past the missing one: the publisher's buffer,
//!   `buffer_steps` batches, no longer holds it), or fails: the worker's entries are cleared (a **reset**),
//!   what the replay and the live stream still bring is applied (the rebuild), and the worker is
//!   **approximate** until the index is provably complete again: an `AllBlocksCleared`, a publisher restart
//!   (numbers start again at 0) or a replay that covers the publisher's whole history (from number 0);
//! * a smaller one: the publisher restarted, and with it the engine (its cache is empty): cleared.
//!
//! When a worker connects, the index asks for a replay from the next number it expects (0 at first), so
//! it learns what the engine cached before the router subscribed.
//!
//! **What is skipped.** Events whose blocks the router's hashes cannot describe: a LoRA adapter's blocks
//! (`lora_id`/`lora_name`), blocks with extra hash keys (multimodal inputs, `cache_salt`), blocks of another
//! medium than `GPU` (CPU offload tiers) or of a KV cache group other than 0. A `BlockStored` whose parent
//! the index does not know (its store was skipped, or came before a reset) is counted as an orphan and
//! skipped: its router hash cannot be computed.

use crate::kv_events::{decode_batch, BlockStored, DecodeLimits, EngineHash, KvEvent, MEDIUM_GPU};
use crate::policy::KvIndex;
use std::collections::{HashMap, VecDeque};

/// Bounds of the index (per worker), against engines that send too much or never stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexLimits {
    /// Distinct blocks indexed per worker; past it the worker is reset and approximate. The default,
    /// 2^21 blocks (32 Mi tokens at 16 per block), is more than any one engine's KV cache.
    pub max_blocks_per_worker: usize,
    /// Live batches held per worker while a replay runs; past it live batches are dropped (the gap they
    /// leave is found, and replayed, like any other).
    pub max_pending_batches: usize,
    /// Bytes of live batches held per worker while a replay runs.
    pub max_pending_bytes: usize,
    /// Bounds of one decoded batch.
    pub decode: DecodeLimits,
}

impl Default for IndexLimits {
    fn default() -> Self {
        Self {
            max_blocks_per_worker: 1 << 21,
            max_pending_batches: 65_536,
            max_pending_bytes: 64 << 20,
            decode: DecodeLimits::default(),
        }
    }
}

/// What happened to one worker's event stream so far (counters since the worker was added).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WorkerStats {
    /// Batches applied (live and replayed).
    pub batches: u64,
    /// Events applied.
    pub events: u64,
    /// Blocks stored (each block of each applied `BlockStored`).
    pub stored_blocks: u64,
    /// Blocks removed.
    pub removed_blocks: u64,
    /// `AllBlocksCleared` events.
    pub cleared: u64,
    /// Sequence gaps found on the live stream.
    pub gaps: u64,
    /// Replays asked for.
    pub replays: u64,
    /// Replays that failed (no answer, broken connection, bad frames).
    pub replay_failures: u64,
    /// Resets: the worker's entries were cleared because events were lost for good.
    pub resets: u64,
    /// Publisher restarts (sequence numbers went back).
    pub restarts: u64,
    /// Batches that did not decode (each also resets the worker).
    pub decode_errors: u64,
    /// Stored blocks skipped because their parent was unknown.
    pub orphans: u64,
    /// Events skipped (LoRA, extra keys, other medium or group).
    pub skipped: u64,
    /// Blocks indexed now.
    pub blocks: u64,
    /// The index knows this worker's cache exactly now.
    pub exact: bool,
}

/// The index asks the caller to replay a worker's batches from `from` (its replay socket: send `from` as
/// 8 bytes big-endian, feed each answer to [`ExactIndex::on_replay`], then call
/// [`ExactIndex::on_replay_end`], or [`ExactIndex::on_replay_failed`] on any failure or timeout).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplayRequest {
    /// Worker id.
    pub worker: u64,
    /// First sequence number wanted.
    pub from: u64,
}

#[derive(Debug, Default)]
struct Replay {
    from: u64,
    received: u64,
    pending: VecDeque<(u64, Vec<u8>)>,
    pending_bytes: usize,
}

#[derive(Debug, Default)]
struct WorkerIndex {
    /// Engine hash → (router hash, stores).
    engine: HashMap<EngineHash, (u64, u32)>,
    /// Router hash → stores.
    blocks: HashMap<u64, u32>,
    block_size: Option<u32>,
    exact: bool,
    next: Option<u64>,
    replay: Option<Replay>,
    /// The worker has a replay socket, and its last replay did not fail.
    replay_ok: bool,
    has_replay: bool,
    stats: WorkerStats,
}

impl WorkerIndex {
    fn clear(&mut self) {
        self.engine.clear();
        self.blocks.clear();
        self.engine.shrink_to(1024);
        self.blocks.shrink_to(1024);
    }

    /// Events were lost for good: forget everything, approximate until proven complete.
    fn reset(&mut self) {
        self.stats.resets += 1;
        self.clear();
        self.exact = false;
    }

    fn apply(&mut self, payload: &[u8], limits: &IndexLimits) {
        let batch = match decode_batch(payload, &limits.decode) {
            Ok(b) => b,
            Err(_) => {
                // Counted; the subscriber logs the counters. What the batch held is unknown: reset.
                self.stats.decode_errors += 1;
                self.reset();
                return;
            }
        };
        self.stats.batches += 1;
        for ev in batch.events {
            self.stats.events += 1;
            match ev {
                KvEvent::BlockStored(s) => self.store(s, limits),
                KvEvent::BlockRemoved {
                    block_hashes,
                    medium,
                    group_idx,
                } => {
                    if !tracked(medium.as_deref(), group_idx) {
                        self.stats.skipped += 1;
                        continue;
                    }
                    for h in block_hashes {
                        self.remove(h);
                    }
                }
                KvEvent::AllBlocksCleared => {
                    self.stats.cleared += 1;
                    self.clear();
                    // From here on every change is seen: the index is complete again.
                    self.exact = true;
                }
            }
        }
    }

    fn store(&mut self, s: BlockStored, limits: &IndexLimits) {
        if !tracked(s.medium.as_deref(), s.group_idx)
            || s.lora_id.is_some()
            || s.lora_name.is_some()
            || s.has_extra_keys
        {
            self.stats.skipped += 1;
            return;
        }
        if self.block_size.is_some_and(|b| b != s.block_size) {
            // Only a new engine process can change its block size, and it starts with an empty cache.
            self.clear();
        }
        self.block_size = Some(s.block_size);
        let mut parent = match s.parent_block_hash {
            None => None,
            Some(p) => match self.engine.get(&p) {
                Some(&(r, _)) => Some(r),
                None => {
                    self.stats.orphans += s.block_hashes.len() as u64;
                    return;
                }
            },
        };
        let bs = s.block_size as usize;
        for (i, &eh) in s.block_hashes.iter().enumerate() {
            let tokens = &s.token_ids[i * bs..(i + 1) * bs];
            let rh = pdx_tokens::chain_block_hash(parent, tokens);
            parent = Some(rh);
            if !self.blocks.contains_key(&rh) && self.blocks.len() >= limits.max_blocks_per_worker {
                self.reset();
                return;
            }
            match self.engine.get_mut(&eh) {
                Some((r, n)) if *r == rh => *n += 1,
                Some(_) => {
                    // The same engine hash for other tokens: the older store is stale.
                    self.remove_all(eh);
                    self.engine.insert(eh, (rh, 1));
                }
                None => {
                    self.engine.insert(eh, (rh, 1));
                }
            }
            *self.blocks.entry(rh).or_insert(0) += 1;
            self.stats.stored_blocks += 1;
        }
    }

    fn remove(&mut self, eh: EngineHash) {
        let Some((rh, n)) = self.engine.get_mut(&eh) else {
            return;
        };
        let rh = *rh;
        *n -= 1;
        if *n == 0 {
            self.engine.remove(&eh);
        }
        self.unref(rh, 1);
        self.stats.removed_blocks += 1;
    }

    fn remove_all(&mut self, eh: EngineHash) {
        if let Some((rh, n)) = self.engine.remove(&eh) {
            self.unref(rh, n);
        }
    }

    fn unref(&mut self, rh: u64, k: u32) {
        if let Some(c) = self.blocks.get_mut(&rh) {
            *c = c.saturating_sub(k);
            if *c == 0 {
                self.blocks.remove(&rh);
            }
        }
    }

    fn start_replay(&mut self, worker: u64, from: u64) -> ReplayRequest {
        self.stats.replays += 1;
        if from == 0 {
            // The whole history comes again: start from nothing.
            self.clear();
            self.exact = false;
        }
        self.next = Some(from);
        let pending = self.replay.take().map(|r| r.pending).unwrap_or_default();
        let pending_bytes = pending.iter().map(|(_, p)| p.len()).sum();
        self.replay = Some(Replay {
            from,
            received: 0,
            pending,
            pending_bytes,
        });
        ReplayRequest { worker, from }
    }

    /// A batch from the live stream, or a held one once a replay ended.
    fn live(
        &mut self,
        worker: u64,
        seq: u64,
        payload: &[u8],
        limits: &IndexLimits,
    ) -> Option<ReplayRequest> {
        // Copied only when held behind a running replay; applied batches are read in place.
        if let Some(r) = &mut self.replay {
            if r.pending.len() < limits.max_pending_batches
                && r.pending_bytes + payload.len() <= limits.max_pending_bytes
            {
                r.pending_bytes += payload.len();
                r.pending.push_back((seq, payload.to_vec()));
            }
            return None;
        }
        let can_replay = self.has_replay && self.replay_ok;
        match self.next {
            Some(n) if seq == n => {}
            Some(n) if seq < n => {
                // Numbers went back: a new publisher process, a new engine with an empty cache.
                self.stats.restarts += 1;
                self.clear();
                self.next = None;
                return self.live(worker, seq, payload, limits);
            }
            None if seq == 0 => self.exact = true,
            gap => {
                let from = gap.unwrap_or(0);
                if gap.is_some() {
                    self.stats.gaps += 1;
                }
                if can_replay {
                    let req = self.start_replay(worker, from);
                    if let Some(r) = &mut self.replay {
                        r.pending_bytes += payload.len();
                        r.pending.push_back((seq, payload.to_vec()));
                    }
                    return Some(req);
                }
                if gap.is_some() {
                    self.reset();
                } else {
                    // The first batch seen is not the publisher's first: what came before is unknown.
                    self.exact = false;
                }
            }
        }
        self.apply(payload, limits);
        // The publisher's number, from the wire: `u64::MAX` leaves the next one unknown instead of overflowing.
        self.next = seq.checked_add(1);
        None
    }
}

/// Whether the router's index follows blocks of this medium and KV cache group: GPU blocks (or an engine
/// too old to say) of the first group.
fn tracked(medium: Option<&str>, group_idx: Option<i64>) -> bool {
    medium.is_none_or(|m| m == MEDIUM_GPU) && group_idx.is_none_or(|g| g == 0)
}

/// The exact prefix index of every worker that publishes KV events.
#[derive(Debug, Default)]
pub struct ExactIndex {
    limits: IndexLimits,
    workers: HashMap<u64, WorkerIndex>,
}

impl ExactIndex {
    /// An empty index.
    pub fn new(limits: IndexLimits) -> Self {
        Self {
            limits,
            workers: HashMap::new(),
        }
    }

    /// Starts tracking `worker` (no-op if tracked). `has_replay`: its publisher has a replay socket.
    pub fn add_worker(&mut self, worker: u64, has_replay: bool) {
        self.workers.entry(worker).or_insert_with(|| WorkerIndex {
            has_replay,
            replay_ok: has_replay,
            ..Default::default()
        });
    }

    /// Forgets `worker` (removed from the registry, or no longer publishing).
    pub fn remove_worker(&mut self, worker: u64) {
        self.workers.remove(&worker);
    }

    /// Whether `worker` is tracked.
    pub fn contains(&self, worker: u64) -> bool {
        self.workers.contains_key(&worker)
    }

    /// Tracked worker ids.
    pub fn worker_ids(&self) -> impl Iterator<Item = u64> + '_ {
        self.workers.keys().copied()
    }

    /// The subscription to `worker`'s publisher is (re)established: asks for a replay from the next
    /// expected sequence number, so batches published while the router was not subscribed are applied.
    /// Also lets the worker's replay socket be tried again after a failure.
    pub fn on_connected(&mut self, worker: u64) -> Option<ReplayRequest> {
        let w = self.workers.get_mut(&worker)?;
        w.replay_ok = w.has_replay;
        if !w.has_replay || w.replay.is_some() {
            return None;
        }
        let from = w.next.unwrap_or(0);
        Some(w.start_replay(worker, from))
    }

    /// A batch `seq` from `worker`'s live stream (`payload`: the msgpack `KVEventBatch`). Returns a replay
    /// to run when it finds a gap.
    pub fn on_live(&mut self, worker: u64, seq: u64, payload: &[u8]) -> Option<ReplayRequest> {
        let limits = self.limits;
        let w = self.workers.get_mut(&worker)?;
        w.live(worker, seq, payload, &limits)
    }

    /// A batch `seq` answered by `worker`'s replay socket. Ignored when no replay runs.
    pub fn on_replay(&mut self, worker: u64, seq: u64, payload: &[u8]) {
        let limits = self.limits;
        let Some(w) = self.workers.get_mut(&worker) else {
            return;
        };
        let Some(r) = &mut w.replay else { return };
        r.received += 1;
        let from = r.from;
        let next = w.next.unwrap_or(from);
        if seq < next {
            return; // already applied
        }
        if seq > next {
            // The replay starts past the batch we miss: the publisher's buffer no longer holds it.
            w.reset();
        } else if from == 0 && seq == 0 {
            // The publisher's whole history is coming, in order.
            w.exact = true;
        }
        w.apply(payload, &limits);
        w.next = seq.checked_add(1);
    }

    /// `worker`'s replay ended with the end marker: the held live batches are applied (a gap among them
    /// asks for another replay).
    pub fn on_replay_end(&mut self, worker: u64) -> Option<ReplayRequest> {
        let limits = self.limits;
        let w = self.workers.get_mut(&worker)?;
        let r = w.replay.take()?;
        if r.received == 0 && r.from == 0 {
            // Nothing was ever published (or kept): nothing is cached that the index lacks.
            w.exact = true;
        }
        self.drain(worker, r.pending, &limits)
    }

    /// `worker`'s replay failed (unreachable, timed out, bad frames): its entries are reset, the held live
    /// batches applied, and later gaps reset it too until it reconnects.
    pub fn on_replay_failed(&mut self, worker: u64) {
        let limits = self.limits;
        let Some(w) = self.workers.get_mut(&worker) else {
            return;
        };
        let Some(r) = w.replay.take() else { return };
        w.stats.replay_failures += 1;
        w.replay_ok = false;
        w.reset();
        w.next = r.pending.front().map(|(s, _)| *s);
        let _ = self.drain(worker, r.pending, &limits);
    }

    fn drain(
        &mut self,
        worker: u64,
        mut pending: VecDeque<(u64, Vec<u8>)>,
        limits: &IndexLimits,
    ) -> Option<ReplayRequest> {
        let w = self.workers.get_mut(&worker)?;
        while let Some((seq, payload)) = pending.pop_front() {
            if w.next.is_some_and(|n| seq < n) {
                continue; // the replay brought it already
            }
            if let Some(req) = w.live(worker, seq, &payload, limits) {
                // Another gap: the rest waits behind the new replay.
                if let Some(r) = &mut w.replay {
                    r.pending_bytes += pending.iter().map(|(_, p)| p.len()).sum::<usize>();
                    r.pending.extend(pending);
                }
                return Some(req);
            }
        }
        None
    }

    /// Leading blocks of `hashes` (the router's chained hashes of a prompt at `block_size` tokens per
    /// block) cached on `worker`, if the index knows that worker exactly: tracked, complete (not
    /// approximate), no replay running, and publishing blocks of that size. `None` otherwise.
    pub fn overlap(&self, worker: u64, hashes: &[u64], block_size: u64) -> Option<usize> {
        let w = self.workers.get(&worker)?;
        if !w.exact || w.replay.is_some() {
            return None;
        }
        if w.block_size.is_some_and(|b| u64::from(b) != block_size) {
            return None;
        }
        Some(
            hashes
                .iter()
                .take_while(|h| w.blocks.contains_key(h))
                .count(),
        )
    }

    /// Counters and state of `worker`.
    pub fn stats(&self, worker: u64) -> Option<WorkerStats> {
        self.workers.get(&worker).map(|w| WorkerStats {
            blocks: w.blocks.len() as u64,
            exact: w.exact && w.replay.is_none(),
            ..w.stats
        })
    }

    /// Whether `worker`'s index holds the block with router hash `hash`.
    pub fn holds(&self, worker: u64, hash: u64) -> bool {
        self.workers
            .get(&worker)
            .is_some_and(|w| w.blocks.contains_key(&hash))
    }
}

/// Where `kv_aware` reads a worker's prefix overlap from.
pub trait ExactOverlap {
    /// The exact overlap of `hashes` (chained, `block_size` tokens per block) on `worker`, or `None` when
    /// this source does not know that worker exactly.
    fn exact_overlap(&self, worker: u64, hashes: &[u64], block_size: u64) -> Option<usize>;
}

impl ExactOverlap for ExactIndex {
    fn exact_overlap(&self, worker: u64, hashes: &[u64], block_size: u64) -> Option<usize> {
        self.overlap(worker, hashes, block_size)
    }
}

/// The prefix overlap `kv_aware` uses for one worker: the exact index's when the worker publishes KV
/// events and the index knows it exactly, else the approximate index built from the router's own
/// decisions ([`KvIndex`]).
pub fn kv_overlap(
    exact: Option<&dyn ExactOverlap>,
    approx: &KvIndex,
    worker: u64,
    hashes: &[u64],
    block_size: u64,
    now_us: u64,
) -> usize {
    exact
        .and_then(|x| x.exact_overlap(worker, hashes, block_size))
        .unwrap_or_else(|| approx.overlap(worker, hashes, now_us))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv_events::{encode_batch, KvEventBatch};

    const BS: u32 = 4;

    /// A worker's batch storing the blocks of `tokens` after `skip` cached blocks, with engine hashes
    /// `salt ^ i` (opaque to the index).
    fn store(tokens: &[u32], skip: usize, salt: u64) -> Vec<u8> {
        let n = tokens.len() / BS as usize;
        let eh = |i: usize| salt ^ (i as u64 + 1).wrapping_mul(0x9E37_79B9);
        encode_batch(&KvEventBatch {
            ts: 0.0,
            events: vec![KvEvent::BlockStored(BlockStored {
                block_hashes: (skip..n).map(eh).collect(),
                parent_block_hash: skip.checked_sub(1).map(eh),
                token_ids: tokens[skip * BS as usize..n * BS as usize].to_vec(),
                block_size: BS,
                medium: Some("GPU".into()),
                ..Default::default()
            })],
            data_parallel_rank: Some(0),
        })
    }

    fn remove(hashes: Vec<u64>) -> Vec<u8> {
        encode_batch(&KvEventBatch {
            ts: 0.0,
            events: vec![KvEvent::BlockRemoved {
                block_hashes: hashes,
                medium: Some("GPU".into()),
                group_idx: None,
            }],
            data_parallel_rank: None,
        })
    }

    fn toks(n: u32, seed: u32) -> Vec<u32> {
        (0..n).map(|i| i * 17 + seed).collect()
    }

    fn hashes(t: &[u32]) -> Vec<u64> {
        pdx_tokens::block_hashes(t, BS as usize)
    }

    #[test]
    fn stored_blocks_are_keyed_by_the_routers_hashes_and_removed_by_engine_hash() {
        let mut ix = ExactIndex::default();
        ix.add_worker(1, false);
        let t = toks(16, 1);
        assert_eq!(ix.on_live(1, 0, &store(&t[..8], 0, 7)), None);
        assert_eq!(ix.on_live(1, 1, &store(&t, 2, 7)), None);
        assert_eq!(ix.overlap(1, &hashes(&t), 4), Some(4));
        // Another prompt sharing the first block only.
        let mut u = t.clone();
        u[5] = 999;
        assert_eq!(ix.overlap(1, &hashes(&u), 4), Some(1));
        // Evict the tail (engine hash of block 3).
        let eh3 = 7 ^ 4u64.wrapping_mul(0x9E37_79B9);
        ix.on_live(1, 2, &remove(vec![eh3]));
        assert_eq!(ix.overlap(1, &hashes(&t), 4), Some(3));
        assert_eq!(ix.overlap(1, &hashes(&t), 8), None, "other block size");
        assert_eq!(ix.overlap(2, &hashes(&t), 4), None, "untracked worker");
        let s = ix.stats(1).unwrap();
        assert_eq!((s.blocks, s.stored_blocks, s.removed_blocks), (3, 4, 1));
        assert!(s.exact);
    }

    #[test]
    fn the_last_sequence_number_a_publisher_can_send_does_not_overflow() {
        // The number comes from the worker's frame: u64::MAX on the live stream and on a replay must neither
        // panic nor wrap into "a new publisher" (batch 0).
        let mut ix = ExactIndex::default();
        ix.add_worker(1, false);
        let t = toks(8, 1);
        assert_eq!(ix.on_live(1, u64::MAX, &store(&t, 0, 7)), None);
        assert_eq!(ix.stats(1).unwrap().restarts, 0);
        assert!(!ix.stats(1).unwrap().exact, "history before it unknown");
        assert_eq!(ix.on_live(1, 5, &store(&toks(8, 2), 0, 8)), None);
        let mut ix = ExactIndex::default();
        ix.add_worker(2, true);
        assert_eq!(
            ix.on_connected(2),
            Some(ReplayRequest { worker: 2, from: 0 })
        );
        ix.on_replay(2, u64::MAX, &store(&t, 0, 7));
        assert_eq!(ix.on_replay_end(2), None);
    }

    #[test]
    fn a_forced_gap_is_recovered_by_replay() {
        let mut ix = ExactIndex::default();
        ix.add_worker(1, true);
        // Connecting asks for the history; the publisher had none.
        assert_eq!(
            ix.on_connected(1),
            Some(ReplayRequest { worker: 1, from: 0 })
        );
        assert_eq!(ix.on_replay_end(1), None);
        assert!(ix.stats(1).unwrap().exact);
        let (a, b, c) = (toks(8, 1), toks(8, 2), toks(8, 3));
        let batches = [store(&a, 0, 10), store(&b, 0, 20), store(&c, 0, 30)];
        assert_eq!(ix.on_live(1, 0, &batches[0]), None);
        // Batch 1 is lost; batch 2 arrives: a gap, a replay from 1.
        assert_eq!(
            ix.on_live(1, 2, &batches[2]),
            Some(ReplayRequest { worker: 1, from: 1 })
        );
        assert_eq!(
            ix.overlap(1, &hashes(&a), 4),
            None,
            "not exact while replaying"
        );
        // A live batch arriving during the replay is held, not applied out of order.
        let d = toks(8, 4);
        ix.on_live(1, 3, &store(&d, 0, 40));
        ix.on_replay(1, 1, &batches[1]);
        ix.on_replay(1, 2, &batches[2]);
        assert_eq!(ix.on_replay_end(1), None);
        for p in [&a, &b, &c, &d] {
            assert_eq!(ix.overlap(1, &hashes(p), 4), Some(2), "{p:?}");
        }
        let s = ix.stats(1).unwrap();
        assert_eq!((s.gaps, s.replays, s.resets, s.batches), (1, 2, 0, 4));
        assert!(s.exact);
        // The next live batch continues the sequence.
        assert_eq!(ix.on_live(1, 4, &remove(vec![10 ^ 0x9E37_79B9])), None);
        assert_eq!(ix.overlap(1, &hashes(&a), 4), Some(0));
    }

    #[test]
    fn a_gap_beyond_the_replay_buffer_resets_and_rebuilds_until_cleared() {
        let mut ix = ExactIndex::default();
        ix.add_worker(1, true);
        ix.on_connected(1);
        ix.on_replay_end(1);
        let (a, b, c) = (toks(8, 1), toks(8, 2), toks(8, 3));
        ix.on_live(1, 0, &store(&a, 0, 10));
        // Batches 1..=5 are lost and the publisher kept only 4 and later.
        let req = ix.on_live(1, 6, &store(&c, 0, 30)).unwrap();
        assert_eq!(req.from, 1);
        ix.on_replay(1, 4, &store(&b, 0, 20));
        ix.on_replay(1, 5, &remove(vec![]));
        ix.on_replay(1, 6, &store(&c, 0, 30));
        assert_eq!(ix.on_replay_end(1), None);
        let s = ix.stats(1).unwrap();
        assert_eq!(s.resets, 1);
        assert!(!s.exact, "what batches 1..=3 did is unknown");
        assert_eq!(ix.overlap(1, &hashes(&b), 4), None, "approximate: not used");
        // The rebuild kept what the replay brought; `a` (before the reset) is gone.
        assert!(ix.holds(1, hashes(&b)[1]) && ix.holds(1, hashes(&c)[1]));
        assert!(!ix.holds(1, hashes(&a)[0]));
        // The engine clears its cache: exact again.
        let clear = encode_batch(&KvEventBatch {
            ts: 0.0,
            events: vec![KvEvent::AllBlocksCleared],
            data_parallel_rank: None,
        });
        ix.on_live(1, 7, &clear);
        assert_eq!(ix.overlap(1, &hashes(&b), 4), Some(0));
        assert!(ix.stats(1).unwrap().exact);
    }

    #[test]
    fn failed_replays_restarts_and_bad_batches() {
        let mut ix = ExactIndex::default();
        ix.add_worker(1, true);
        ix.on_connected(1);
        ix.on_replay_failed(1);
        let s = ix.stats(1).unwrap();
        assert_eq!((s.replay_failures, s.resets, s.exact), (1, 1, false));
        let a = toks(8, 1);
        // Without a working replay socket a gap resets at once, and no replay is asked for.
        assert_eq!(ix.on_live(1, 3, &store(&a, 0, 10)), None);
        assert_eq!(ix.on_live(1, 5, &store(&a, 0, 10)), None);
        assert_eq!(ix.stats(1).unwrap().gaps, 1);
        // The publisher restarts: numbers from 0, the engine's cache is empty, the index exact.
        assert_eq!(ix.on_live(1, 0, &store(&a, 0, 11)), None);
        let s = ix.stats(1).unwrap();
        assert_eq!((s.restarts, s.blocks, s.exact), (1, 2, true));
        assert_eq!(ix.overlap(1, &hashes(&a), 4), Some(2));
        // A batch that does not decode: counted, the worker reset.
        assert_eq!(ix.on_live(1, 1, b"\x92\xc1"), None);
        let s = ix.stats(1).unwrap();
        assert_eq!((s.decode_errors, s.blocks, s.exact), (1, 0, false));
        // Orphans and skipped events leave the index alone.
        ix.on_live(1, 2, &store(&a, 1, 99));
        assert_eq!(ix.stats(1).unwrap().orphans, 1);
        ix.remove_worker(1);
        assert!(ix.stats(1).is_none());
    }

    #[test]
    fn duplicate_stores_are_reference_counted_and_the_index_is_bounded() {
        let mut ix = ExactIndex::new(IndexLimits {
            max_blocks_per_worker: 3,
            ..IndexLimits::default()
        });
        ix.add_worker(1, false);
        let a = toks(8, 1);
        ix.on_live(1, 0, &store(&a, 0, 10));
        ix.on_live(1, 1, &store(&a, 0, 10));
        ix.on_live(1, 2, &remove(vec![10 ^ 0x9E37_79B9]));
        assert_eq!(ix.overlap(1, &hashes(&a), 4), Some(2), "one copy is left");
        ix.on_live(1, 3, &remove(vec![10 ^ 0x9E37_79B9]));
        assert_eq!(ix.overlap(1, &hashes(&a), 4), Some(0));
        // Two more blocks would pass the limit of 3: the worker resets.
        ix.on_live(1, 4, &store(&toks(8, 2), 0, 20));
        ix.on_live(1, 5, &store(&toks(8, 3), 0, 30));
        let s = ix.stats(1).unwrap();
        assert!(s.blocks <= 3 && s.resets == 1 && !s.exact, "{s:?}");
    }

    #[test]
    fn kv_overlap_prefers_the_exact_index_only_where_it_is_exact() {
        let mut ix = ExactIndex::default();
        ix.add_worker(1, false);
        let a = toks(8, 1);
        ix.on_live(1, 0, &store(&a, 0, 10));
        let mut approx = KvIndex::new(u64::MAX, 100);
        approx.record(2, &hashes(&a), 0);
        approx.record(1, &hashes(&toks(8, 9)), 0);
        let h = hashes(&a);
        assert_eq!(kv_overlap(Some(&ix), &approx, 1, &h, 4, 0), 2, "exact");
        assert_eq!(
            kv_overlap(Some(&ix), &approx, 2, &h, 4, 0),
            2,
            "no events: approximate"
        );
        assert_eq!(
            kv_overlap(None, &approx, 1, &h, 4, 0),
            0,
            "no exact index at all"
        );
    }
}
