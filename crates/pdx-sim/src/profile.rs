//! A planner profile for a pool of `pdx mock` workers, measured by running the mock's own
//! sans-IO scheduler (`pdx_mock::scheduler::Scheduler`) with the pool's timing model and
//! limits in virtual time: what `pdx profile` would measure against a live mock, without the
//! HTTP and without waiting.
//!
//! * prefill, per ISL of a grid up to the context length and the KV capacity: the TTFT of one
//!   prompt alone (the steps of its chunked prefill) and the prompt tokens per second of a
//!   replica given as many such prompts as its KV blocks hold at once (at most 32);
//! * decode, per context of a grid and batch size (powers of two up to `max_num_seqs` and the
//!   KV capacity): the duration of a step decoding that batch, which is the ITL.

use pdx_mock::profile::Profile;
use pdx_mock::scheduler::{Scheduler, SeqSpec};
use pdx_planner::{DecodePoint, PoolProfile, PrefillPoint};

const ISL_GRID: [u32; 10] = [64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768];
const CTX_GRID: [u32; 9] = [128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768];

/// Runs the scheduler until idle; returns (µs until each id's first token, total µs).
fn run(s: &mut Scheduler) -> (Vec<(u64, f64)>, f64) {
    let mut t = 0.0;
    let mut firsts = Vec::new();
    while let Some(step) = s.schedule() {
        t += step.duration_us;
        for o in &step.outputs {
            if o.token && o.finished {
                firsts.push((o.id, t));
            }
        }
    }
    (firsts, t)
}

/// The profile of a pool whose workers run `p` with `num_blocks` KV blocks of `block_size`
/// tokens.
pub fn derive(p: &Profile, num_blocks: u32, block_size: u32) -> PoolProfile {
    let cap_tokens = u64::from(num_blocks) * u64::from(block_size.max(1));
    let max_len = u64::from(p.model.max_model_len);
    let new = || Scheduler::new(p.scheduler.clone(), p.timing.clone());
    let mut prefill = Vec::new();
    for &isl in ISL_GRID
        .iter()
        .filter(|&&i| u64::from(i) + 1 < max_len.min(cap_tokens))
    {
        let mut s = new();
        s.add(SeqSpec {
            id: 0,
            prompt_tokens: isl,
            cached_tokens: 0,
            output_tokens: 1,
        });
        let (_, alone) = run(&mut s);
        let blocks_each = (u64::from(isl) + 1).div_ceil(u64::from(block_size.max(1)));
        let m = (u64::from(num_blocks) / blocks_each.max(1)).clamp(1, 32);
        let mut s = new();
        for id in 0..m {
            s.add(SeqSpec {
                id,
                prompt_tokens: isl,
                cached_tokens: 0,
                output_tokens: 1,
            });
        }
        let (_, busy) = run(&mut s);
        prefill.push(PrefillPoint {
            isl: f64::from(isl),
            ttft_ms: alone / 1e3,
            tokens_per_s: (m * u64::from(isl)) as f64 / (busy / 1e6),
        });
    }
    let mut decode = Vec::new();
    for &ctx in CTX_GRID
        .iter()
        .filter(|&&c| u64::from(c) + 2 < max_len.min(cap_tokens))
    {
        let per_seq = (u64::from(ctx) + 2).div_ceil(u64::from(block_size.max(1)));
        let max_batch = (u64::from(num_blocks) / per_seq.max(1))
            .min(u64::from(p.scheduler.max_num_seqs.max(1)))
            .max(1);
        let mut b = 1u64;
        loop {
            let batch = b.min(max_batch);
            let mut s = new();
            for id in 0..batch {
                s.add(SeqSpec {
                    id,
                    prompt_tokens: ctx,
                    cached_tokens: ctx,
                    output_tokens: 3,
                });
            }
            // Step 1 computes each prompt's last token (first output); step 2 is pure decode.
            let _ = s.schedule();
            let itl_us = s.schedule().map_or(0.0, |st| st.duration_us);
            decode.push(DecodePoint {
                context: f64::from(ctx),
                batch: batch as f64,
                itl_ms: itl_us / 1e3,
            });
            if batch >= max_batch {
                break;
            }
            b *= 2;
        }
    }
    PoolProfile { prefill, decode }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_profile_matches_the_timing_formula() {
        let p = Profile::default();
        let prof = derive(&p, 2048, 16).validated().unwrap();
        let t = &p.timing;
        // ISL 1024 alone: one chunk of 1024 tokens (budget 8192), one step.
        let one = t.step_overhead_us
            + t.prefill_token_us * 1024.0
            + t.prefill_attn_ns * 1024.0 * 1024.0 / 1000.0;
        assert!((prof.prefill_service_ms(1024.0) - one / 1e3).abs() < 1e-6);
        // Busy throughput beats one-at-a-time (batching amortises the step overhead).
        assert!(prof.prefill_tokens_per_s(1024.0) > 1024.0 / (one / 1e6));
        // Decode: 8 sequences at 1024 tokens → overhead + 8 · seq + 8 · 1025 · ctx ns.
        let step =
            t.step_overhead_us + 8.0 * t.decode_seq_us + 8.0 * 1025.0 * t.decode_ctx_ns / 1e3;
        assert!((prof.decode_itl_ms(1024.0, 8.0) - step / 1e3).abs() < 1e-6);
        // KV capacity bounds the batch: 2048 blocks of 16 tokens hold 31 sequences of 1026.
        let max_b = prof
            .decode
            .iter()
            .filter(|d| d.context == 1024.0)
            .map(|d| d.batch)
            .fold(0.0, f64::max);
        assert_eq!(max_b, 31.0);
        // Nothing beyond the KV capacity (32768 tokens).
        assert!(prof.prefill.iter().all(|x| x.isl < 32768.0));
    }
}
