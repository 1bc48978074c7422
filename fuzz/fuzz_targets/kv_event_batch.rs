//! A vLLM KV event batch (msgpack `KVEventBatch` from a worker's ZMQ publisher): the strict decoder, and the
//! exact index applying it as live batch 0 and then as a gap with a replay.
#![no_main]
use libfuzzer_sys::fuzz_target;
use pdx_router_core::kv_events::{decode_batch, DecodeLimits};
use pdx_router_core::ExactIndex;

fuzz_target!(|data: &[u8]| {
    let _ = decode_batch(data, &DecodeLimits::default());
    let mut ix = ExactIndex::default();
    ix.add_worker(1, true);
    let _ = ix.on_live(1, 0, data);
    if let Some(r) = ix.on_live(1, 2, data) {
        ix.on_replay(r.worker, 1, data);
        let _ = ix.on_replay_end(r.worker);
    }
    let _ = ix.overlap(1, &[1, 2, 3], 16);
});
