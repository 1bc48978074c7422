//! Model/engine profile: KV shape, timing coefficients, scheduler limits and faults.
//! Loaded from TOML (`.toml`) or JSON (any other extension); every field is optional and
//! defaults to [`Profile::default`] (Qwen3-0.6B on one H100 SXM). See `docs/mock.md`.

use crate::error::MockError;
use serde::{Deserialize, Serialize};

/// Model shape; KV bytes per token = `layers * kv_heads * head_dim * 2 * dtype_bytes`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelProfile {
    /// Transformer layers (Qwen3-0.6B: 28).
    pub layers: u32,
    /// KV heads (Qwen3-0.6B: 8, GQA).
    pub kv_heads: u32,
    /// Head dimension (Qwen3-0.6B: 128).
    pub head_dim: u32,
    /// Bytes per KV element (bf16: 2).
    pub dtype_bytes: u32,
    /// Context length in tokens (`max_model_len`).
    pub max_model_len: u32,
}

impl Default for ModelProfile {
    /// Qwen3-0.6B (`config.json`: 28 layers, 8 KV heads, head_dim 128; bf16) → 112 KiB/token.
    fn default() -> Self {
        Self {
            layers: 28,
            kv_heads: 8,
            head_dim: 128,
            dtype_bytes: 2,
            max_model_len: 40_960,
        }
    }
}

impl ModelProfile {
    /// KV bytes per token at full scale.
    pub fn kv_bytes_per_token(&self) -> u64 {
        u64::from(self.layers)
            * u64::from(self.kv_heads)
            * u64::from(self.head_dim)
            * 2
            * u64::from(self.dtype_bytes)
    }
}

/// Step-time model of a continuous-batching engine step (µs).
///
/// `step = step_overhead_us
///        + prefill_token_us * prefill_tokens
///        + prefill_attn_ns * Σ_prefill(chunk_tokens * context_after_chunk) / 1000
///        + decode_seq_us * decode_seqs
///        + decode_ctx_ns * Σ_decode(context_tokens) / 1000`
///
/// Cached prompt tokens cost nothing to prefill except as attention context.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TimingProfile {
    /// Fixed cost of one engine step (scheduling, kernel launches, sampling), µs.
    pub step_overhead_us: f64,
    /// Linear-layer cost per prefilled token, µs.
    pub prefill_token_us: f64,
    /// Attention cost per (prefilled token × context token), ns.
    pub prefill_attn_ns: f64,
    /// Cost per sequence in a decode batch, µs.
    pub decode_seq_us: f64,
    /// KV read cost per context token of decoding sequences, ns.
    pub decode_ctx_ns: f64,
}

impl Default for TimingProfile {
    /// Qwen3-0.6B (0.44 B non-embedding params) on H100 SXM, derived from NVIDIA's H100 SXM
    /// datasheet (989 TFLOP/s dense BF16, 3.35 TB/s HBM3) at 40 % MFU for prefill and 70 % of
    /// HBM bandwidth for KV reads, plus a ~2 ms per-step overhead that dominates small-model
    /// decode in vLLM V1 (CUDA-graph launch, scheduling, sampling). See `docs/mock.md`.
    fn default() -> Self {
        Self {
            step_overhead_us: 2000.0,
            prefill_token_us: 2.2,
            prefill_attn_ns: 0.57,
            decode_seq_us: 10.0,
            decode_ctx_ns: 50.0,
        }
    }
}

/// Scheduler limits (vLLM flags of the same names).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SchedulerProfile {
    /// Token budget of one step (`--max-num-batched-tokens`), decode tokens included.
    pub max_num_batched_tokens: u32,
    /// Running sequences at most (`--max-num-seqs`).
    pub max_num_seqs: u32,
    /// Split long prompts across steps (`--enable-chunked-prefill`).
    pub chunked_prefill: bool,
}

impl Default for SchedulerProfile {
    fn default() -> Self {
        Self {
            max_num_batched_tokens: 8192,
            max_num_seqs: 256,
            chunked_prefill: true,
        }
    }
}

/// Fault injection (also settable by `--fault-*` flags, which win).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FaultProfile {
    /// Fraction `0..=1` of completion requests answered `500 InternalServerError` at once.
    pub error_rate: f64,
    /// Fraction `0..=1` of completion requests that never get an answer (the connection stays
    /// open until the client gives up).
    pub hang_rate: f64,
    /// Stop serving after this many completion requests: the listeners close, open connections
    /// are dropped, and `pdx mock` exits with an error.
    pub crash_after: Option<u64>,
    /// For this many seconds after start, `/health` and completions answer 503 (model loading).
    pub slow_start_secs: f64,
    /// Streams stall after this many tokens...
    pub stall_after_tokens: Option<u32>,
    /// ...for this many seconds (absent: forever, until the client disconnects).
    pub stall_secs: Option<f64>,
}

/// Everything a profile file can set.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Profile {
    /// Model shape.
    pub model: ModelProfile,
    /// Step-time coefficients.
    pub timing: TimingProfile,
    /// Scheduler limits.
    pub scheduler: SchedulerProfile,
    /// Faults.
    pub faults: FaultProfile,
}

impl Profile {
    /// Reads a TOML (`*.toml`) or JSON profile.
    ///
    /// Errors: [`MockError::Config`] on unreadable files, syntax errors or unknown fields.
    pub fn load(path: &std::path::Path) -> Result<Self, MockError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            MockError::Config(format!("cannot read profile {}: {e}", path.display()))
        })?;
        if path.extension().is_some_and(|e| e == "toml") {
            toml::from_str(&text)
                .map_err(|e| MockError::Config(format!("profile {}: {e}", path.display())))
        } else {
            serde_json::from_str(&text)
                .map_err(|e| MockError::Config(format!("profile {}: {e}", path.display())))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qwen3_kv_bytes_per_token() {
        assert_eq!(ModelProfile::default().kv_bytes_per_token(), 112 * 1024);
    }

    #[test]
    fn partial_toml_and_unknown_fields() {
        let p: Profile =
            toml::from_str("[timing]\nstep_overhead_us = 5.0\n[faults]\ncrash_after = 3\n")
                .unwrap();
        assert_eq!(p.timing.step_overhead_us, 5.0);
        assert_eq!(
            p.timing.prefill_token_us,
            TimingProfile::default().prefill_token_us
        );
        assert_eq!(p.faults.crash_after, Some(3));
        assert!(toml::from_str::<Profile>("[timing]\nstep_overhead = 5.0\n").is_err());
        let j: Profile = serde_json::from_str(r#"{"model":{"layers":2}}"#).unwrap();
        assert_eq!(j.model.layers, 2);
    }
}
