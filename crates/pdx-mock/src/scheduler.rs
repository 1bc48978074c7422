//! Sans-IO continuous-batching scheduler with chunked prefill, after vLLM V1's scheduler:
//! every step first gives one token to each running decode, then continues partial prefills,
//! then admits waiting requests FCFS while the token budget (`max_num_batched_tokens`) and
//! `max_num_seqs` allow; the step's duration comes from the [`TimingProfile`] formula.
//!
//! The caller feeds events ([`Scheduler::add`], [`Scheduler::abort`]) and asks for the next
//! step ([`Scheduler::schedule`]); the returned [`Step`] says how long it takes (µs of model
//! time) and which sequences produce a token at its end. No clocks, no sockets.

use crate::profile::{SchedulerProfile, TimingProfile};
use std::collections::{HashMap, VecDeque};

/// A request as the scheduler sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeqSpec {
    /// Caller's id.
    pub id: u64,
    /// Prompt length in tokens.
    pub prompt_tokens: u32,
    /// Prompt tokens whose KV is already present (prefix hit or read from a prefill engine).
    pub cached_tokens: u32,
    /// Tokens to generate (≥ 1; the first comes out of the step that finishes the prefill).
    pub output_tokens: u32,
}

#[derive(Debug, Clone)]
struct Seq {
    spec: SeqSpec,
    computed: u32,
    generated: u32,
}

/// One sequence's result at the end of a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeqOutput {
    /// Sequence id.
    pub id: u64,
    /// True when this step produced a token (false: a prefill chunk that did not finish).
    pub token: bool,
    /// True when the sequence is done after this step.
    pub finished: bool,
}

/// One engine step.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Step {
    /// Modelled duration, µs.
    pub duration_us: f64,
    /// Prompt tokens computed in this step.
    pub prefill_tokens: u32,
    /// Sequences decoding one token in this step.
    pub decode_seqs: u32,
    /// Per-sequence results, available at the end of the step.
    pub outputs: Vec<SeqOutput>,
}

/// The scheduler.
#[derive(Debug)]
pub struct Scheduler {
    limits: SchedulerProfile,
    timing: TimingProfile,
    waiting: VecDeque<u64>,
    running: Vec<u64>,
    seqs: HashMap<u64, Seq>,
}

impl Scheduler {
    /// A scheduler with the given limits and step-time coefficients.
    pub fn new(limits: SchedulerProfile, timing: TimingProfile) -> Self {
        Self {
            limits,
            timing,
            waiting: VecDeque::new(),
            running: Vec::new(),
            seqs: HashMap::new(),
        }
    }

    /// Queues a request (FCFS). `cached_tokens` is clamped so at least one prompt token is
    /// computed (the last prompt token is always run to produce the first output token).
    pub fn add(&mut self, mut spec: SeqSpec) {
        spec.output_tokens = spec.output_tokens.max(1);
        spec.cached_tokens = spec.cached_tokens.min(spec.prompt_tokens.saturating_sub(1));
        self.seqs.insert(
            spec.id,
            Seq {
                spec,
                computed: spec.cached_tokens,
                generated: 0,
            },
        );
        self.waiting.push_back(spec.id);
    }

    /// Removes a request wherever it is; false if unknown (already finished).
    pub fn abort(&mut self, id: u64) -> bool {
        if self.seqs.remove(&id).is_none() {
            return false;
        }
        self.waiting.retain(|&x| x != id);
        self.running.retain(|&x| x != id);
        true
    }

    /// Requests admitted (running).
    pub fn num_running(&self) -> usize {
        self.running.len()
    }
    /// Requests queued, not yet admitted.
    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }
    /// True when there is nothing to do.
    pub fn is_idle(&self) -> bool {
        self.seqs.is_empty()
    }

    /// Plans and applies the next step; `None` when idle. Finished sequences are removed.
    pub fn schedule(&mut self) -> Option<Step> {
        if self.seqs.is_empty() {
            return None;
        }
        let mut budget = self.limits.max_num_batched_tokens.max(1);
        let mut step = Step::default();
        let mut prefill_attn = 0f64;
        let mut decode_ctx = 0f64;
        // (id, prefill chunk) for this step
        let mut chunks: Vec<(u64, u32)> = Vec::new();
        // 1. running decodes, 2. running partial prefills
        for &id in &self.running {
            let s = &self.seqs[&id];
            if s.computed >= s.spec.prompt_tokens {
                if budget == 0 {
                    break;
                }
                budget -= 1;
                chunks.push((id, 0));
            }
        }
        for &id in &self.running {
            let s = &self.seqs[&id];
            if s.computed < s.spec.prompt_tokens && budget > 0 {
                let left = s.spec.prompt_tokens - s.computed;
                if left > budget && !self.limits.chunked_prefill {
                    continue;
                }
                let c = left.min(budget);
                budget -= c;
                chunks.push((id, c));
            }
        }
        // 3. admit waiting FCFS
        while budget > 0 && self.running.len() < self.limits.max_num_seqs.max(1) as usize {
            let Some(&id) = self.waiting.front() else {
                break;
            };
            let s = &self.seqs[&id];
            let left = s.spec.prompt_tokens - s.computed;
            if left > budget && !self.limits.chunked_prefill {
                // without chunking a prompt larger than the whole budget still runs alone
                if !(chunks.is_empty() && left > self.limits.max_num_batched_tokens) {
                    break;
                }
            }
            self.waiting.pop_front();
            self.running.push(id);
            let c = if self.limits.chunked_prefill {
                left.min(budget)
            } else {
                left
            };
            budget = budget.saturating_sub(c);
            chunks.push((id, c));
        }
        for &(id, c) in &chunks {
            let s = self.seqs.get_mut(&id).expect("scheduled seq exists");
            let mut out = SeqOutput {
                id,
                token: false,
                finished: false,
            };
            if c == 0 {
                step.decode_seqs += 1;
                decode_ctx += f64::from(s.spec.prompt_tokens + s.generated);
                s.generated += 1;
                out.token = true;
            } else {
                step.prefill_tokens += c;
                s.computed += c;
                prefill_attn += f64::from(c) * f64::from(s.computed);
                if s.computed >= s.spec.prompt_tokens {
                    s.generated += 1;
                    out.token = true;
                }
            }
            out.finished = s.generated >= s.spec.output_tokens;
            step.outputs.push(out);
        }
        for o in &step.outputs {
            if o.finished {
                self.seqs.remove(&o.id);
            }
        }
        self.running.retain(|id| self.seqs.contains_key(id));
        let t = &self.timing;
        step.duration_us = t.step_overhead_us
            + t.prefill_token_us * f64::from(step.prefill_tokens)
            + t.prefill_attn_ns * prefill_attn / 1000.0
            + t.decode_seq_us * f64::from(step.decode_seqs)
            + t.decode_ctx_ns * decode_ctx / 1000.0;
        Some(step)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sched(budget: u32, seqs: u32) -> Scheduler {
        Scheduler::new(
            SchedulerProfile {
                max_num_batched_tokens: budget,
                max_num_seqs: seqs,
                chunked_prefill: true,
            },
            TimingProfile {
                step_overhead_us: 100.0,
                prefill_token_us: 1.0,
                prefill_attn_ns: 0.0,
                decode_seq_us: 10.0,
                decode_ctx_ns: 0.0,
            },
        )
    }

    fn spec(id: u64, p: u32, c: u32, o: u32) -> SeqSpec {
        SeqSpec {
            id,
            prompt_tokens: p,
            cached_tokens: c,
            output_tokens: o,
        }
    }

    #[test]
    fn prefill_then_decode_tokens_and_durations() {
        let mut s = sched(1000, 8);
        s.add(spec(1, 100, 0, 3));
        let st = s.schedule().unwrap();
        assert_eq!(st.prefill_tokens, 100);
        assert_eq!(
            st.outputs,
            vec![SeqOutput {
                id: 1,
                token: true,
                finished: false
            }]
        );
        assert_eq!(st.duration_us, 200.0);
        let st = s.schedule().unwrap();
        assert_eq!((st.prefill_tokens, st.decode_seqs), (0, 1));
        assert_eq!(st.duration_us, 110.0);
        let st = s.schedule().unwrap();
        assert!(st.outputs[0].finished);
        assert!(s.schedule().is_none());
    }

    #[test]
    fn chunked_prefill_splits_long_prompt_and_decodes_go_first() {
        let mut s = sched(64, 8);
        s.add(spec(1, 10, 0, 100));
        s.schedule().unwrap(); // seq 1 prefilled, first token
        s.add(spec(2, 150, 0, 1));
        let st = s.schedule().unwrap();
        assert_eq!(st.decode_seqs, 1);
        assert_eq!(st.prefill_tokens, 63);
        assert!(!st.outputs.iter().find(|o| o.id == 2).unwrap().token);
        let st = s.schedule().unwrap();
        assert_eq!(st.prefill_tokens, 63);
        let st = s.schedule().unwrap();
        assert_eq!(st.prefill_tokens, 24);
        let o2 = st.outputs.iter().find(|o| o.id == 2).unwrap();
        assert!(o2.token && o2.finished);
        assert_eq!(s.num_running(), 1);
    }

    #[test]
    fn cached_tokens_are_not_recomputed_and_max_seqs_queues() {
        let mut s = sched(1000, 1);
        s.add(spec(1, 100, 96, 2));
        s.add(spec(2, 10, 0, 1));
        let st = s.schedule().unwrap();
        assert_eq!(st.prefill_tokens, 4);
        assert_eq!(s.num_waiting(), 1, "max_num_seqs = 1 keeps seq 2 waiting");
        s.schedule().unwrap();
        let st = s.schedule().unwrap();
        assert_eq!(
            st.outputs,
            vec![SeqOutput {
                id: 2,
                token: true,
                finished: true
            }]
        );
        // fully cached prompt still computes its last token
        s.add(spec(3, 32, 32, 1));
        assert_eq!(s.schedule().unwrap().prefill_tokens, 1);
    }

    #[test]
    fn abort_removes_everywhere() {
        let mut s = sched(1000, 8);
        s.add(spec(1, 10, 0, 10));
        s.add(spec(2, 10, 0, 10));
        s.schedule();
        assert!(s.abort(1));
        assert!(!s.abort(1));
        let st = s.schedule().unwrap();
        assert_eq!(st.outputs.len(), 1);
        assert!(s.abort(2));
        assert!(s.is_idle());
        assert!(s.schedule().is_none());
    }
}
