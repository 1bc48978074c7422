//! vLLM's KV cache events on the wire: a strict, bounded decoder of `KVEventBatch` payloads, and the
//! encoder of the same bytes (for tests, the fuzz corpus and simulated engines).
//!
//! Source: vLLM `vllm/distributed/kv_events.py`. A publisher (`ZmqEventPublisher`) sends each batch as a
//! ZMQ multipart message `[topic, sequence (8 bytes, big-endian), payload]`, the payload being the msgpack
//! encoding (msgspec) of
//! ```text
//! EventBatch(ts: float, events: list, data_parallel_rank: int | None)      array_like=True
//! BlockStored(block_hashes, parent_block_hash, token_ids, block_size,
//!             lora_id, medium, lora_name, [extra_keys, group_idx, ...])      tag=True
//! BlockRemoved(block_hashes, medium, [group_idx])                           tag=True
//! AllBlocksCleared()                                                        tag=True
//! ```
//! msgspec's `array_like=True, tag=True` writes an event as an array whose first element is the tag (the
//! class name): `["BlockStored", [h1, h2], parent, [t1, ...], 16, null, "GPU", null]`. vLLM PR #42892
//! (2026) dropped `array_like` from the events, which then become tagged maps (`{"type": "BlockStored",
//! "block_hashes": [...], ...}`); the decoder reads both shapes (and a map-shaped batch too), so one
//! router fronts engines of either age. Fields vLLM appends later (`extra_keys`, `group_idx`, ...) are
//! read when they matter and skipped otherwise; omitted trailing fields take their defaults (msgspec's
//! `omit_defaults`).
//!
//! Block hashes are opaque to the router (as in Dynamo's indexer): vLLM sends a 64-bit integer by
//! default (`VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES`) or the raw hash bytes; both become a `u64` key here
//! ([`EngineHash`]). The router keys its own index by hashes it computes from `token_ids`
//! ([`crate::kv_index`]).
//!
//! Everything read comes from the network: every count is checked against [`DecodeLimits`] before
//! anything is allocated for it, nesting is bounded, and any malformed input is a
//! [`CoreError::KvEvents`], never a panic.

use crate::CoreError;

/// An engine's block hash, reduced to 64 bits: an integer hash as is (a negative one as its two's
/// complement), a byte-string hash (1 to [`MAX_HASH_BYTES`] bytes) through XXH3-64.
pub type EngineHash = u64;

/// Longest byte-string block hash accepted, bytes (vLLM's are 32: SHA-256).
pub const MAX_HASH_BYTES: usize = 64;
/// Longest string field (tag, medium, LoRA name) accepted, bytes.
pub const MAX_STR_BYTES: usize = 256;
/// Deepest nesting of a skipped (unknown) field, levels.
pub const MAX_SKIP_DEPTH: usize = 16;
/// The sequence number vLLM's replay socket sends last (`-1` as 8 bytes big-endian), with an empty
/// payload.
pub const END_SEQ: [u8; 8] = [0xff; 8];
/// The tag vLLM's `medium` carries for blocks in GPU memory (`MEDIUM_GPU`).
pub const MEDIUM_GPU: &str = "GPU";

/// Bounds of one decoded batch. The defaults hold any real engine step: a 128k-token prompt at block
/// size 16 is 8192 block hashes and 131072 token ids in one `BlockStored`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeLimits {
    /// Events in one batch.
    pub max_events: usize,
    /// Block hashes in one event.
    pub max_block_hashes: usize,
    /// Token ids in one event.
    pub max_token_ids: usize,
    /// Largest `block_size`, tokens.
    pub max_block_size: u32,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        Self {
            max_events: 16_384,
            max_block_hashes: 65_536,
            max_token_ids: 1 << 21,
            max_block_size: 4096,
        }
    }
}

/// `BlockStored`: full blocks entered the engine's prefix cache.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct BlockStored {
    /// The engine's hashes of the new blocks, in prompt order.
    pub block_hashes: Vec<EngineHash>,
    /// The engine's hash of the block before the first new one (`None`: the first block of a prompt).
    pub parent_block_hash: Option<EngineHash>,
    /// The token ids of the new blocks, `block_size` per block.
    pub token_ids: Vec<u32>,
    /// Tokens per block.
    pub block_size: u32,
    /// LoRA adapter id (blocks of an adapter hash differently in the engine).
    pub lora_id: Option<i64>,
    /// Where the blocks live (`"GPU"`; `None` from engines older than the field).
    pub medium: Option<String>,
    /// LoRA adapter name.
    pub lora_name: Option<String>,
    /// Some block has extra hash keys (multimodal inputs, `cache_salt`, ...): the engine's hash covers
    /// more than the token ids.
    pub has_extra_keys: bool,
    /// KV cache group (hybrid models; `None`: the only group).
    pub group_idx: Option<i64>,
}

/// One KV cache event.
#[derive(Debug, Clone, PartialEq)]
pub enum KvEvent {
    /// Blocks stored.
    BlockStored(BlockStored),
    /// Blocks evicted from the prefix cache.
    BlockRemoved {
        /// The engine's hashes of the evicted blocks.
        block_hashes: Vec<EngineHash>,
        /// Where they lived.
        medium: Option<String>,
        /// KV cache group.
        group_idx: Option<i64>,
    },
    /// The whole prefix cache was cleared (vLLM `reset_prefix_cache`).
    AllBlocksCleared,
}

/// A decoded `KVEventBatch`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct KvEventBatch {
    /// When the engine made the batch, seconds since the Unix epoch.
    pub ts: f64,
    /// The events, in the order the engine's cache changed.
    pub events: Vec<KvEvent>,
    /// The data-parallel rank of the publishing engine.
    pub data_parallel_rank: Option<i64>,
}

fn err(offset: usize, reason: impl Into<String>) -> CoreError {
    CoreError::KvEvents {
        offset,
        reason: reason.into(),
    }
}

/// A bounded msgpack reader over one payload.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

/// A msgpack integer, wide enough for both `u64` and `i64`.
type Int = i128;

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], CoreError> {
        if self.buf.len() - self.pos < n {
            return Err(err(self.pos, format!("truncated: {n} more bytes needed")));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn be(&mut self, n: usize) -> Result<u64, CoreError> {
        Ok(self
            .take(n)?
            .iter()
            .fold(0u64, |a, &b| (a << 8) | u64::from(b)))
    }

    fn marker(&mut self) -> Result<rmp::Marker, CoreError> {
        Ok(rmp::Marker::from_u8(self.take(1)?[0]))
    }

    fn peek_nil(&mut self) -> bool {
        if self.buf.get(self.pos) == Some(&0xc0) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    /// A declared element count, checked against `max` and against the bytes left (every element takes
    /// at least one byte), so nothing is reserved for elements that cannot be there.
    fn count(&mut self, n: u64, max: usize, what: &str) -> Result<usize, CoreError> {
        let left = (self.buf.len() - self.pos) as u64;
        if n > max as u64 {
            return Err(err(
                self.pos,
                format!("{what}: {n} elements, at most {max}"),
            ));
        }
        if n > left {
            return Err(err(
                self.pos,
                format!("{what}: {n} elements in {left} bytes"),
            ));
        }
        Ok(n as usize)
    }

    fn array_len(&mut self, max: usize, what: &str) -> Result<usize, CoreError> {
        let at = self.pos;
        let n = match self.marker()? {
            rmp::Marker::FixArray(n) => u64::from(n),
            rmp::Marker::Array16 => self.be(2)?,
            rmp::Marker::Array32 => self.be(4)?,
            m => return Err(err(at, format!("{what}: expected an array, got {m:?}"))),
        };
        self.count(n, max, what)
    }

    fn int(&mut self, what: &str) -> Result<Int, CoreError> {
        let at = self.pos;
        Ok(match self.marker()? {
            rmp::Marker::FixPos(v) => Int::from(v),
            rmp::Marker::FixNeg(v) => Int::from(v),
            rmp::Marker::U8 => Int::from(self.be(1)?),
            rmp::Marker::U16 => Int::from(self.be(2)?),
            rmp::Marker::U32 => Int::from(self.be(4)?),
            rmp::Marker::U64 => Int::from(self.be(8)?),
            rmp::Marker::I8 => Int::from(self.be(1)? as u8 as i8),
            rmp::Marker::I16 => Int::from(self.be(2)? as u16 as i16),
            rmp::Marker::I32 => Int::from(self.be(4)? as u32 as i32),
            rmp::Marker::I64 => Int::from(self.be(8)? as i64),
            m => return Err(err(at, format!("{what}: expected an integer, got {m:?}"))),
        })
    }

    fn opt_i64(&mut self, what: &str) -> Result<Option<i64>, CoreError> {
        if self.peek_nil() {
            return Ok(None);
        }
        let at = self.pos;
        let v = self.int(what)?;
        i64::try_from(v)
            .map(Some)
            .map_err(|_| err(at, format!("{what}: {v} is out of range")))
    }

    fn float(&mut self, what: &str) -> Result<f64, CoreError> {
        let at = self.pos;
        match self.marker()? {
            rmp::Marker::F64 => Ok(f64::from_bits(self.be(8)?)),
            rmp::Marker::F32 => Ok(f64::from(f32::from_bits(self.be(4)? as u32))),
            _ => {
                // msgspec writes an integral float as a float, but accept an integer timestamp too.
                self.pos = at;
                Ok(self.int(what)? as f64)
            }
        }
    }

    fn str(&mut self, what: &str) -> Result<&'a str, CoreError> {
        let at = self.pos;
        let n = match self.marker()? {
            rmp::Marker::FixStr(n) => u64::from(n),
            rmp::Marker::Str8 => self.be(1)?,
            rmp::Marker::Str16 => self.be(2)?,
            rmp::Marker::Str32 => self.be(4)?,
            m => return Err(err(at, format!("{what}: expected a string, got {m:?}"))),
        };
        if n > MAX_STR_BYTES as u64 {
            return Err(err(at, format!("{what}: string of {n} bytes")));
        }
        std::str::from_utf8(self.take(n as usize)?)
            .map_err(|_| err(at, format!("{what}: not UTF-8")))
    }

    fn opt_str(&mut self, what: &str) -> Result<Option<String>, CoreError> {
        if self.peek_nil() {
            return Ok(None);
        }
        Ok(Some(self.str(what)?.to_string()))
    }

    fn hash(&mut self, what: &str) -> Result<EngineHash, CoreError> {
        let at = self.pos;
        let bin = match rmp::Marker::from_u8(*self.buf.get(at).unwrap_or(&0xc1)) {
            rmp::Marker::Bin8 => Some(1),
            rmp::Marker::Bin16 => Some(2),
            rmp::Marker::Bin32 => Some(4),
            _ => None,
        };
        if let Some(w) = bin {
            self.pos += 1;
            let n = self.be(w)?;
            if n == 0 || n > MAX_HASH_BYTES as u64 {
                return Err(err(at, format!("{what}: hash of {n} bytes")));
            }
            let bytes = self.take(n as usize)?;
            return Ok(xxhash_rust::xxh3::xxh3_64(bytes));
        }
        let v = self.int(what)?;
        if let Ok(u) = u64::try_from(v) {
            Ok(u)
        } else if let Ok(i) = i64::try_from(v) {
            Ok(i as u64)
        } else {
            Err(err(at, format!("{what}: {v} is out of range")))
        }
    }

    fn opt_hash(&mut self, what: &str) -> Result<Option<EngineHash>, CoreError> {
        if self.peek_nil() {
            return Ok(None);
        }
        self.hash(what).map(Some)
    }

    fn hashes(&mut self, max: usize) -> Result<Vec<EngineHash>, CoreError> {
        let n = self.array_len(max, "block_hashes")?;
        let mut v = Vec::with_capacity(n);
        for _ in 0..n {
            v.push(self.hash("block_hashes")?);
        }
        Ok(v)
    }

    fn token_ids(&mut self, max: usize) -> Result<Vec<u32>, CoreError> {
        let n = self.array_len(max, "token_ids")?;
        let mut v = Vec::with_capacity(n);
        for _ in 0..n {
            let at = self.pos;
            let t = self.int("token_ids")?;
            v.push(u32::try_from(t).map_err(|_| err(at, format!("token id {t} out of range")))?);
        }
        Ok(v)
    }

    /// `extra_keys`: nil, or a list with one entry per block, each nil or a tuple. True when any entry is
    /// not nil. The entries themselves are skipped.
    fn extra_keys(&mut self) -> Result<bool, CoreError> {
        if self.peek_nil() {
            return Ok(false);
        }
        let n = self.array_len(usize::MAX, "extra_keys")?;
        let mut any = false;
        for _ in 0..n {
            if !self.peek_nil() {
                any = true;
                self.skip(1)?;
            }
        }
        Ok(any)
    }

    /// Skips one value of any type, nested at most [`MAX_SKIP_DEPTH`] levels.
    fn skip(&mut self, depth: usize) -> Result<(), CoreError> {
        let at = self.pos;
        if depth > MAX_SKIP_DEPTH {
            return Err(err(at, "value nested too deeply"));
        }
        use rmp::Marker as M;
        let (bytes, items) = match self.marker()? {
            M::FixPos(_) | M::FixNeg(_) | M::Null | M::True | M::False => (0, 0),
            M::U8 | M::I8 => (1, 0),
            M::U16 | M::I16 => (2, 0),
            M::U32 | M::I32 | M::F32 => (4, 0),
            M::U64 | M::I64 | M::F64 => (8, 0),
            M::FixStr(n) => (u64::from(n), 0),
            M::Str8 | M::Bin8 => (self.be(1)?, 0),
            M::Str16 | M::Bin16 => (self.be(2)?, 0),
            M::Str32 | M::Bin32 => (self.be(4)?, 0),
            M::FixExt1 => (2, 0),
            M::FixExt2 => (3, 0),
            M::FixExt4 => (5, 0),
            M::FixExt8 => (9, 0),
            M::FixExt16 => (17, 0),
            M::Ext8 => (self.be(1)? + 1, 0),
            M::Ext16 => (self.be(2)? + 1, 0),
            M::Ext32 => (self.be(4)? + 1, 0),
            M::FixArray(n) => (0, u64::from(n)),
            M::Array16 => (0, self.be(2)?),
            M::Array32 => (0, self.be(4)?),
            M::FixMap(n) => (0, 2 * u64::from(n)),
            M::Map16 => (0, 2 * self.be(2)?),
            M::Map32 => (0, 2 * self.be(4)?),
            M::Reserved => return Err(err(at, "reserved msgpack marker 0xc1")),
        };
        if bytes > (self.buf.len() - self.pos) as u64 {
            return Err(err(at, "truncated value"));
        }
        self.pos += bytes as usize;
        let items = self.count(items, usize::MAX, "skipped value")?;
        for _ in 0..items {
            self.skip(depth + 1)?;
        }
        Ok(())
    }

    /// The length of a map at the reader, or `None` (nothing consumed) if the next value is not a map.
    fn try_map_len(&mut self) -> Result<Option<usize>, CoreError> {
        let at = self.pos;
        let n = match rmp::Marker::from_u8(*self.buf.get(at).unwrap_or(&0xc1)) {
            rmp::Marker::FixMap(n) => {
                self.pos += 1;
                u64::from(n)
            }
            rmp::Marker::Map16 => {
                self.pos += 1;
                self.be(2)?
            }
            rmp::Marker::Map32 => {
                self.pos += 1;
                self.be(4)?
            }
            _ => return Ok(None),
        };
        // A map entry takes at least two bytes.
        if n.saturating_mul(2) > (self.buf.len() - self.pos) as u64 {
            return Err(err(at, format!("map of {n} entries in too few bytes")));
        }
        Ok(Some(n as usize))
    }
}

/// Decodes one `KVEventBatch` payload strictly: the whole payload must be one batch, every count within
/// `limits`.
///
/// Errors: [`CoreError::KvEvents`] with the byte offset and the reason (malformed msgpack, an unknown event
/// tag, a missing field, a count over a limit, a `BlockStored` whose `token_ids` are not
/// `block_hashes × block_size`, bytes after the batch).
pub fn decode_batch(payload: &[u8], limits: &DecodeLimits) -> Result<KvEventBatch, CoreError> {
    let mut r = Reader {
        buf: payload,
        pos: 0,
    };
    let batch = if let Some(n) = r.try_map_len()? {
        let mut b = KvEventBatch::default();
        let mut seen_events = false;
        for _ in 0..n {
            match r.str("batch field")? {
                "ts" => b.ts = r.float("ts")?,
                "events" => {
                    b.events = events(&mut r, limits)?;
                    seen_events = true;
                }
                "data_parallel_rank" => b.data_parallel_rank = r.opt_i64("data_parallel_rank")?,
                _ => r.skip(1)?,
            }
        }
        if !seen_events {
            return Err(err(0, "batch has no `events`"));
        }
        b
    } else {
        let n = r.array_len(64, "batch")?;
        if n < 2 {
            return Err(err(
                0,
                format!("batch of {n} fields, expected ts and events"),
            ));
        }
        let ts = r.float("ts")?;
        let events = events(&mut r, limits)?;
        let data_parallel_rank = if n > 2 {
            r.opt_i64("data_parallel_rank")?
        } else {
            None
        };
        for _ in 3..n {
            r.skip(1)?;
        }
        KvEventBatch {
            ts,
            events,
            data_parallel_rank,
        }
    };
    if r.pos != payload.len() {
        return Err(err(r.pos, "bytes after the batch"));
    }
    Ok(batch)
}

fn events(r: &mut Reader<'_>, limits: &DecodeLimits) -> Result<Vec<KvEvent>, CoreError> {
    let n = r.array_len(limits.max_events, "events")?;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(event(r, limits)?);
    }
    Ok(out)
}

fn event(r: &mut Reader<'_>, limits: &DecodeLimits) -> Result<KvEvent, CoreError> {
    let at = r.pos;
    if let Some(n) = r.try_map_len()? {
        return event_map(r, n, at, limits);
    }
    let n = r.array_len(64, "event")?;
    if n == 0 {
        return Err(err(at, "event without a tag"));
    }
    let tag = r.str("event tag")?;
    // Positional fields after the tag; a missing trailing field takes its default.
    let fields = n - 1;
    let ev = match tag {
        "BlockStored" => {
            if fields < 4 {
                return Err(err(
                    at,
                    format!("BlockStored with {fields} fields, expected 4 or more"),
                ));
            }
            let mut s = BlockStored {
                block_hashes: r.hashes(limits.max_block_hashes)?,
                parent_block_hash: r.opt_hash("parent_block_hash")?,
                token_ids: r.token_ids(limits.max_token_ids)?,
                block_size: block_size(r, limits)?,
                ..BlockStored::default()
            };
            for i in 4..fields {
                match i {
                    4 => s.lora_id = r.opt_i64("lora_id")?,
                    5 => s.medium = r.opt_str("medium")?,
                    6 => s.lora_name = r.opt_str("lora_name")?,
                    7 => s.has_extra_keys = r.extra_keys()?,
                    8 => s.group_idx = r.opt_i64("group_idx")?,
                    _ => r.skip(1)?,
                }
            }
            check_stored(&s, at)?;
            KvEvent::BlockStored(s)
        }
        "BlockRemoved" => {
            if fields < 1 {
                return Err(err(at, "BlockRemoved without block_hashes"));
            }
            let block_hashes = r.hashes(limits.max_block_hashes)?;
            let (mut medium, mut group_idx) = (None, None);
            for i in 1..fields {
                match i {
                    1 => medium = r.opt_str("medium")?,
                    2 => group_idx = r.opt_i64("group_idx")?,
                    _ => r.skip(1)?,
                }
            }
            KvEvent::BlockRemoved {
                block_hashes,
                medium,
                group_idx,
            }
        }
        "AllBlocksCleared" => {
            for _ in 0..fields {
                r.skip(1)?;
            }
            KvEvent::AllBlocksCleared
        }
        other => return Err(err(at, format!("unknown event tag {:?}", other))),
    };
    Ok(ev)
}

fn block_size(r: &mut Reader<'_>, limits: &DecodeLimits) -> Result<u32, CoreError> {
    let at = r.pos;
    let v = r.int("block_size")?;
    match u32::try_from(v) {
        Ok(b) if b >= 1 && b <= limits.max_block_size => Ok(b),
        _ => Err(err(
            at,
            format!("block_size {v} not in 1..={}", limits.max_block_size),
        )),
    }
}

fn check_stored(s: &BlockStored, at: usize) -> Result<(), CoreError> {
    let want = s.block_hashes.len() as u64 * u64::from(s.block_size);
    if s.token_ids.len() as u64 != want {
        return Err(err(
            at,
            format!(
                "BlockStored: {} token ids for {} blocks of {} tokens",
                s.token_ids.len(),
                s.block_hashes.len(),
                s.block_size
            ),
        ));
    }
    Ok(())
}

/// An event encoded as a tagged map (vLLM after PR #42892): `{"type": TAG, field: value, ...}`.
fn event_map(
    r: &mut Reader<'_>,
    n: usize,
    at: usize,
    limits: &DecodeLimits,
) -> Result<KvEvent, CoreError> {
    let mut tag = None;
    let mut s = BlockStored::default();
    let (mut hashes, mut tokens, mut size) = (false, false, false);
    for _ in 0..n {
        match r.str("event field")? {
            "type" => tag = Some(r.str("event tag")?),
            "block_hashes" => {
                s.block_hashes = r.hashes(limits.max_block_hashes)?;
                hashes = true;
            }
            "parent_block_hash" => s.parent_block_hash = r.opt_hash("parent_block_hash")?,
            "token_ids" => {
                s.token_ids = r.token_ids(limits.max_token_ids)?;
                tokens = true;
            }
            "block_size" => {
                s.block_size = block_size(r, limits)?;
                size = true;
            }
            "lora_id" => s.lora_id = r.opt_i64("lora_id")?,
            "medium" => s.medium = r.opt_str("medium")?,
            "lora_name" => s.lora_name = r.opt_str("lora_name")?,
            "extra_keys" => s.has_extra_keys = r.extra_keys()?,
            "group_idx" => s.group_idx = r.opt_i64("group_idx")?,
            _ => r.skip(1)?,
        }
    }
    match tag {
        Some("BlockStored") if hashes && tokens && size => {
            check_stored(&s, at)?;
            Ok(KvEvent::BlockStored(s))
        }
        Some("BlockStored") => Err(err(
            at,
            "BlockStored without block_hashes, token_ids or block_size",
        )),
        Some("BlockRemoved") if hashes => Ok(KvEvent::BlockRemoved {
            block_hashes: s.block_hashes,
            medium: s.medium,
            group_idx: s.group_idx,
        }),
        Some("BlockRemoved") => Err(err(at, "BlockRemoved without block_hashes")),
        Some("AllBlocksCleared") => Ok(KvEvent::AllBlocksCleared),
        Some(other) => Err(err(at, format!("unknown event tag {:?}", other))),
        None => Err(err(at, "event map without `type`")),
    }
}

/// Encodes a batch as vLLM's msgspec encoder does with `array_like=True, tag=True` (the shape before
/// vLLM PR #42892): `[ts, [events...], data_parallel_rank]`, each event `[tag, fields...]` with
/// `lora_id`, `medium` and `lora_name` always present and later fields omitted at their defaults.
/// Integers take their smallest msgpack form, as msgspec writes them.
pub fn encode_batch(batch: &KvEventBatch) -> Vec<u8> {
    use rmp::encode as e;
    let mut w = Vec::with_capacity(64);
    let dp = batch.data_parallel_rank.is_some();
    // Writes into a Vec cannot fail.
    let _ = e::write_array_len(&mut w, if dp { 3 } else { 2 });
    let _ = e::write_f64(&mut w, batch.ts);
    let _ = e::write_array_len(&mut w, batch.events.len() as u32);
    let opt_str = |w: &mut Vec<u8>, s: &Option<String>| match s {
        Some(s) => {
            let _ = e::write_str(w, s);
        }
        None => {
            let _ = e::write_nil(w);
        }
    };
    for ev in &batch.events {
        match ev {
            KvEvent::BlockStored(s) => {
                let extra = s.group_idx.is_some();
                let _ = e::write_array_len(&mut w, if extra { 10 } else { 8 });
                let _ = e::write_str(&mut w, "BlockStored");
                write_hashes(&mut w, &s.block_hashes);
                match s.parent_block_hash {
                    Some(h) => {
                        let _ = e::write_uint(&mut w, h);
                    }
                    None => {
                        let _ = e::write_nil(&mut w);
                    }
                }
                let _ = e::write_array_len(&mut w, s.token_ids.len() as u32);
                for &t in &s.token_ids {
                    let _ = e::write_uint(&mut w, u64::from(t));
                }
                let _ = e::write_uint(&mut w, u64::from(s.block_size));
                match s.lora_id {
                    Some(l) => {
                        let _ = e::write_sint(&mut w, l);
                    }
                    None => {
                        let _ = e::write_nil(&mut w);
                    }
                }
                opt_str(&mut w, &s.medium);
                opt_str(&mut w, &s.lora_name);
                if let Some(g) = s.group_idx {
                    let _ = e::write_nil(&mut w); // extra_keys
                    let _ = e::write_sint(&mut w, g);
                }
            }
            KvEvent::BlockRemoved {
                block_hashes,
                medium,
                group_idx,
            } => {
                let _ = e::write_array_len(&mut w, if group_idx.is_some() { 4 } else { 3 });
                let _ = e::write_str(&mut w, "BlockRemoved");
                write_hashes(&mut w, block_hashes);
                opt_str(&mut w, medium);
                if let Some(g) = group_idx {
                    let _ = e::write_sint(&mut w, *g);
                }
            }
            KvEvent::AllBlocksCleared => {
                let _ = e::write_array_len(&mut w, 1);
                let _ = e::write_str(&mut w, "AllBlocksCleared");
            }
        }
    }
    if let Some(dp) = batch.data_parallel_rank {
        let _ = e::write_sint(&mut w, dp);
    }
    w
}

fn write_hashes(w: &mut Vec<u8>, hashes: &[EngineHash]) {
    let _ = rmp::encode::write_array_len(w, hashes.len() as u32);
    for &h in hashes {
        let _ = rmp::encode::write_uint(w, h);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(hashes: Vec<u64>, parent: Option<u64>, bs: u32) -> KvEvent {
        let n = hashes.len() as u32 * bs;
        KvEvent::BlockStored(BlockStored {
            block_hashes: hashes,
            parent_block_hash: parent,
            token_ids: (0..n).map(|i| i * 3 + 1).collect(),
            block_size: bs,
            medium: Some(MEDIUM_GPU.into()),
            ..Default::default()
        })
    }

    #[test]
    fn round_trips_every_event_kind() {
        let b = KvEventBatch {
            ts: 1_700_000_000.25,
            events: vec![
                stored(vec![u64::MAX, 7], None, 4),
                stored(vec![3], Some(7), 4),
                KvEvent::BlockRemoved {
                    block_hashes: vec![7, 3],
                    medium: Some("GPU".into()),
                    group_idx: None,
                },
                KvEvent::AllBlocksCleared,
            ],
            data_parallel_rank: Some(0),
        };
        let bytes = encode_batch(&b);
        assert_eq!(decode_batch(&bytes, &DecodeLimits::default()).unwrap(), b);
    }

    #[test]
    fn golden_bytes_of_the_array_shape() {
        // What msgspec writes for
        // KVEventBatch(ts=1.5, events=[BlockStored([5], None, [1, 2], 2, None, "GPU", None),
        //                              AllBlocksCleared()], data_parallel_rank=0)
        let mut g = vec![0x93, 0xcb];
        g.extend_from_slice(&1.5f64.to_be_bytes());
        g.extend_from_slice(&[0x92, 0x98, 0xab]);
        g.extend_from_slice(b"BlockStored");
        g.extend_from_slice(&[0x91, 0x05, 0xc0, 0x92, 0x01, 0x02, 0x02, 0xc0, 0xa3]);
        g.extend_from_slice(b"GPU");
        g.extend_from_slice(&[0xc0, 0x91, 0xb0]);
        g.extend_from_slice(b"AllBlocksCleared");
        g.push(0x00);
        let b = decode_batch(&g, &DecodeLimits::default()).unwrap();
        assert_eq!(b.ts, 1.5);
        assert_eq!(b.data_parallel_rank, Some(0));
        assert_eq!(
            b.events,
            vec![
                KvEvent::BlockStored(BlockStored {
                    block_hashes: vec![5],
                    token_ids: vec![1, 2],
                    block_size: 2,
                    medium: Some("GPU".into()),
                    ..Default::default()
                }),
                KvEvent::AllBlocksCleared
            ]
        );
        assert_eq!(encode_batch(&b), g, "the encoder writes msgspec's bytes");
    }

    #[test]
    fn reads_the_map_shape_bytes_hashes_and_older_field_sets() {
        use rmp::encode as e;
        // [ts, [{"type": "BlockStored", ...}, {"type": "BlockRemoved", ...}], 0], with a 32-byte hash,
        // a negative (Python hash()) parent and an unknown field.
        let mut w = Vec::new();
        e::write_array_len(&mut w, 3).unwrap();
        e::write_f64(&mut w, 2.0).unwrap();
        e::write_array_len(&mut w, 3).unwrap();
        e::write_map_len(&mut w, 6).unwrap();
        e::write_str(&mut w, "type").unwrap();
        e::write_str(&mut w, "BlockStored").unwrap();
        e::write_str(&mut w, "block_hashes").unwrap();
        e::write_array_len(&mut w, 1).unwrap();
        e::write_bin(&mut w, &[9u8; 32]).unwrap();
        e::write_str(&mut w, "parent_block_hash").unwrap();
        e::write_sint(&mut w, -5).unwrap();
        e::write_str(&mut w, "token_ids").unwrap();
        e::write_array_len(&mut w, 2).unwrap();
        e::write_uint(&mut w, 10).unwrap();
        e::write_uint(&mut w, 70_000).unwrap();
        e::write_str(&mut w, "cache_salt").unwrap();
        e::write_map_len(&mut w, 1).unwrap();
        e::write_str(&mut w, "k").unwrap();
        e::write_array_len(&mut w, 0).unwrap();
        e::write_str(&mut w, "block_size").unwrap();
        e::write_uint(&mut w, 2).unwrap();
        e::write_map_len(&mut w, 2).unwrap();
        e::write_str(&mut w, "block_hashes").unwrap();
        e::write_array_len(&mut w, 1).unwrap();
        e::write_uint(&mut w, 4).unwrap();
        e::write_str(&mut w, "type").unwrap();
        e::write_str(&mut w, "BlockRemoved").unwrap();
        // vLLM 0.9's BlockStored: no medium, no lora_name.
        e::write_array_len(&mut w, 6).unwrap();
        e::write_str(&mut w, "BlockStored").unwrap();
        e::write_array_len(&mut w, 1).unwrap();
        e::write_uint(&mut w, 8).unwrap();
        e::write_nil(&mut w).unwrap();
        e::write_array_len(&mut w, 1).unwrap();
        e::write_uint(&mut w, 1).unwrap();
        e::write_uint(&mut w, 1).unwrap();
        e::write_nil(&mut w).unwrap();
        e::write_uint(&mut w, 0).unwrap();
        let b = decode_batch(&w, &DecodeLimits::default()).unwrap();
        assert_eq!(b.events.len(), 3);
        let KvEvent::BlockStored(s) = &b.events[0] else {
            panic!("{:?}", b.events[0])
        };
        assert_eq!(s.block_hashes, vec![xxhash_rust::xxh3::xxh3_64(&[9u8; 32])]);
        assert_eq!(s.parent_block_hash, Some((-5i64) as u64));
        assert_eq!(s.token_ids, vec![10, 70_000]);
        assert_eq!(
            b.events[1],
            KvEvent::BlockRemoved {
                block_hashes: vec![4],
                medium: None,
                group_idx: None
            }
        );
        assert!(matches!(&b.events[2], KvEvent::BlockStored(s) if s.medium.is_none()));
    }

    #[test]
    fn the_fuzz_corpus_seeds_decode() {
        for (name, bytes, n) in [
            (
                "array_stored_cleared",
                &include_bytes!("../../../fuzz/corpus/kv_event_batch/array_stored_cleared")[..],
                2,
            ),
            (
                "map_events",
                &include_bytes!("../../../fuzz/corpus/kv_event_batch/map_events")[..],
                2,
            ),
            (
                "array_chain_removed",
                &include_bytes!("../../../fuzz/corpus/kv_event_batch/array_chain_removed")[..],
                2,
            ),
        ] {
            let b = decode_batch(bytes, &DecodeLimits::default())
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(b.events.len(), n, "{name}");
        }
    }

    #[test]
    fn malformed_or_oversized_input_is_an_error_not_a_panic() {
        let limits = DecodeLimits {
            max_events: 2,
            max_block_hashes: 2,
            max_token_ids: 8,
            max_block_size: 4,
        };
        let ok = encode_batch(&KvEventBatch {
            ts: 0.0,
            events: vec![stored(vec![1, 2], None, 4)],
            data_parallel_rank: None,
        });
        assert!(decode_batch(&ok, &limits).is_ok());
        // Every truncation fails cleanly.
        for cut in 0..ok.len() {
            assert!(decode_batch(&ok[..cut], &limits).is_err(), "cut at {cut}");
        }
        let mut trailing = ok.clone();
        trailing.push(0);
        let too_many = encode_batch(&KvEventBatch {
            ts: 0.0,
            events: vec![KvEvent::AllBlocksCleared; 3],
            data_parallel_rank: None,
        });
        let big_block = encode_batch(&KvEventBatch {
            ts: 0.0,
            events: vec![stored(vec![1], None, 5)],
            data_parallel_rank: None,
        });
        let mut wrong_tokens = KvEventBatch {
            ts: 0.0,
            events: vec![stored(vec![1], None, 4)],
            data_parallel_rank: None,
        };
        if let KvEvent::BlockStored(s) = &mut wrong_tokens.events[0] {
            s.token_ids.pop();
        }
        // An array claiming 2^32-1 events in a few bytes.
        let huge = [0x92, 0x00, 0xdd, 0xff, 0xff, 0xff, 0xff];
        // Deep nesting inside a skipped field.
        let mut deep = vec![0x94, 0x00, 0x90, 0xc0];
        deep.extend(std::iter::repeat_n(0x91, 100));
        deep.push(0x00);
        for (name, bytes) in [
            ("trailing", trailing),
            ("too many events", too_many),
            ("block size", big_block),
            ("token count", encode_batch(&wrong_tokens)),
            ("huge count", huge.to_vec()),
            ("deep", deep),
            ("reserved", vec![0xc1]),
            ("empty", vec![]),
            ("unknown tag", {
                let mut w = vec![0x92, 0x00, 0x91, 0x91, 0xa4];
                w.extend_from_slice(b"Nope");
                w
            }),
        ] {
            match decode_batch(&bytes, &limits) {
                Err(CoreError::KvEvents { .. }) => {}
                other => panic!("{name}: {other:?}"),
            }
        }
    }
}
