//! The engine: admission (output length, KV blocks, prefix hits), the disaggregated KV paths
//! (prefill keeps blocks for a remote decode; decode reads and verifies them), the timed
//! scheduler thread, and the per-request guard that frees everything on every exit path.

use crate::error::MockError;
use crate::kv_cache::{block_hashes, BlockManager, HoldTable};
use crate::metrics::Metrics;
use crate::profile::Profile;
use crate::scheduler::{Scheduler, SeqSpec};
use crate::tokenizer::Tokenizer;
use crate::transport::{KvEndpoint, KvTransport};
use pdx_protocol::{ApiError, FinishReason, KvTransferParams};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, Notify};

pub use pdx_protocol::Role;

/// Engine settings (built from `MockArgs` and the profile).
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Worker role.
    pub role: Role,
    /// Served model name.
    pub model: String,
    /// Tokens per KV block.
    pub block_size: usize,
    /// KV capacity in blocks.
    pub num_blocks: u32,
    /// No modelled delay: tokens are produced as fast as the client reads.
    pub instant: bool,
    /// Model-time speedup (step durations are divided by it).
    pub speedup: f64,
    /// How long a prefill worker keeps blocks for a remote decode.
    pub kv_hold_timeout: Duration,
    /// Output length when a request gives no limit, tokens.
    pub default_max_tokens: u32,
    /// The model "emits EOS" after this many tokens unless `ignore_eos` (default: never).
    pub eos_after: Option<u32>,
    /// Profile (model shape, timing, scheduler, faults).
    pub profile: Profile,
    /// Benchmark mode (`--kv-noop`): a prefill answers `kv_transfer_params` without holding
    /// its blocks, and a decode takes `do_remote_prefill` params without reading remote KV.
    pub kv_noop: bool,
    /// Token events per HTTP chunk of an instant-mode stream (`--instant-tokens-per-chunk`).
    pub instant_tokens_per_chunk: u32,
    /// Keys accepted on `/v1/*` as `Authorization: Bearer KEY` (`--api-key`; empty: no check).
    pub api_keys: Vec<String>,
    /// This worker's name in the `x-pdx-worker` response header (the engine id), so a client such as
    /// `pdx replay --export` can tell which worker served a request.
    pub worker_id: String,
}

/// Generation request after parsing and tokenization.
#[derive(Debug, Clone, Default)]
pub struct GenRequest {
    /// Prompt token ids.
    pub prompt: Vec<u32>,
    /// Output limit (tokens).
    pub max_tokens: Option<u32>,
    /// Minimum output tokens.
    pub min_tokens: Option<u32>,
    /// Ignore EOS.
    pub ignore_eos: bool,
    /// NixlConnector params.
    pub kv: Option<KvTransferParams>,
    /// Came through SGLang's PD router (bootstrap fields present).
    pub bootstrap: bool,
    /// Response id, also the `remote_request_id` of a held prefill.
    pub request_id: String,
    /// Choices, seed and stop strings ([`crate::generation`]); `n` 0 counts as 1.
    pub params: crate::generation::GenParams,
}

/// Event from the scheduler thread to one request: a token came out of a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenEvent {
    /// The request is done after this token.
    pub finished: bool,
}

enum SchedMsg {
    Add(SeqSpec, mpsc::UnboundedSender<TokenEvent>),
    Abort(u64),
}

/// Fault decided for one completion request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Answer 500.
    Error,
    /// Never answer.
    Hang,
    /// Crash the server now.
    Crash,
    /// Still "loading": answer 503.
    Loading,
}

/// The engine, shared by all server threads.
pub struct Engine {
    /// Settings.
    pub cfg: EngineConfig,
    /// Tokenizer.
    pub tokenizer: Tokenizer,
    /// Metrics.
    pub metrics: Metrics,
    kv: Mutex<BlockManager>,
    freed: Notify,
    holds: Mutex<HoldTable>,
    transport: Option<Arc<dyn KvTransport>>,
    /// Publisher of the prefix cache's KV events (`--kv-events-config`).
    kv_events: Option<crate::kv_events::KvEventPublisher>,
    sched: Option<mpsc::UnboundedSender<SchedMsg>>,
    next_id: AtomicU64,
    completions: AtomicU64,
    started: Instant,
    /// Set to true to stop the server (crash fault or shutdown).
    pub shutdown: tokio::sync::watch::Sender<bool>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

/// What [`Engine::admit`] returns: the request is admitted, its blocks allocated.
#[derive(Debug)]
pub struct Admitted {
    /// Owns blocks, scheduler slot and gauges; frees them on drop.
    pub guard: SeqGuard,
    /// Prompt length, tokens.
    pub prompt_tokens: u32,
    /// Prompt tokens found in the local prefix cache.
    pub cached_tokens: u32,
    /// Steps that generate tokens: the longest choice's tokens (each step gives every unfinished choice one).
    pub output_tokens: u32,
    /// The choices, in index order.
    pub choices: Vec<crate::generation::ChoicePlan>,
    /// Timed mode: one event per generated token.
    pub events: Option<mpsc::UnboundedReceiver<TokenEvent>>,
    /// Prefill for a remote decode: hold the prompt blocks at the end.
    pub hold_for_remote: bool,
}

impl Engine {
    /// Builds the engine; in timed mode starts the scheduler thread.
    pub fn new(
        cfg: EngineConfig,
        tokenizer: Tokenizer,
        transport: Option<Arc<dyn KvTransport>>,
    ) -> Arc<Self> {
        Self::with_kv_events(cfg, tokenizer, transport, None)
    }

    /// [`Engine::new`], publishing the prefix cache's KV events through `kv_events`.
    pub fn with_kv_events(
        cfg: EngineConfig,
        tokenizer: Tokenizer,
        transport: Option<Arc<dyn KvTransport>>,
        kv_events: Option<crate::kv_events::KvEventPublisher>,
    ) -> Arc<Self> {
        let metrics = Metrics::new(&cfg.model);
        let sched = if cfg.instant {
            None
        } else {
            let (tx, rx) = mpsc::unbounded_channel();
            let s = Scheduler::new(cfg.profile.scheduler.clone(), cfg.profile.timing.clone());
            let (running, waiting) = (metrics.running.clone(), metrics.waiting.clone());
            let speedup = cfg.speedup.max(1e-9);
            std::thread::Builder::new()
                .name("pdx-mock-sched".into())
                .spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_time()
                        .build()
                        .expect("runtime");
                    rt.block_on(sched_loop(s, rx, speedup, running, waiting));
                })
                .expect("spawn scheduler thread");
            Some(tx)
        };
        let (shutdown, _) = tokio::sync::watch::channel(false);
        let mut kv = BlockManager::new(cfg.num_blocks, cfg.block_size);
        kv.record_events(kv_events.is_some());
        Arc::new(Self {
            kv: Mutex::new(kv),
            kv_events,
            cfg,
            tokenizer,
            metrics,
            freed: Notify::new(),
            holds: Mutex::new(HoldTable::default()),
            transport,
            sched,
            next_id: AtomicU64::new(1),
            completions: AtomicU64::new(0),
            started: Instant::now(),
            shutdown,
        })
    }

    /// The KV endpoint advertised in `kv_transfer_params`, if this engine moves KV.
    pub fn kv_endpoint(&self) -> Option<KvEndpoint> {
        self.transport.as_ref().map(|t| t.endpoint())
    }

    /// Layout of one KV block (bytes per block), if this engine moves KV.
    pub fn kv_layout(&self) -> Option<crate::kv_cache::KvLayout> {
        self.transport.as_ref().map(|t| t.layout())
    }

    /// Blocks in use (requests running or held for remote decode).
    pub fn used_blocks(&self) -> u32 {
        self.kv.lock().expect("kv lock").used_blocks()
    }

    /// The KV event publisher, if this engine publishes events.
    pub fn kv_events(&self) -> Option<&crate::kv_events::KvEventPublisher> {
        self.kv_events.as_ref()
    }

    /// Hands the events the block manager recorded to the publisher. Called with the KV lock held, so
    /// events leave in the order the cache changed.
    fn publish_events(&self, kv: &mut BlockManager) {
        if let Some(p) = &self.kv_events {
            p.publish(kv.take_events());
        }
    }

    /// Clears the prefix cache (vLLM `reset_prefix_cache`; publishes `AllBlocksCleared`). Returns false,
    /// changing nothing, while any block is in use.
    pub fn reset_prefix_cache(&self) -> bool {
        let mut kv = self.kv.lock().expect("kv lock");
        let done = kv.reset_prefix_cache();
        self.publish_events(&mut kv);
        done
    }

    /// Requests whose blocks are held for a remote decode.
    pub fn held_requests(&self) -> usize {
        self.holds.lock().expect("holds lock").len()
    }

    /// True while the slow-start fault says "loading".
    pub fn loading(&self) -> bool {
        self.started.elapsed().as_secs_f64() < self.cfg.profile.faults.slow_start_secs
    }

    /// A fresh request number.
    pub fn next_request_number(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Decides the fault (if any) for the next completion request. Deterministic: the n-th
    /// request gets an error if `mix64(n) / 2^64 < error_rate`, a hang likewise with a
    /// different stream. Crash: request `crash_after + 1` triggers it.
    pub fn fault_for_request(&self) -> Option<Fault> {
        let f = &self.cfg.profile.faults;
        if self.loading() {
            return Some(Fault::Loading);
        }
        let n = self.completions.fetch_add(1, Ordering::Relaxed) + 1;
        if f.crash_after.is_some_and(|k| n > k) {
            self.shutdown.send_replace(true);
            return Some(Fault::Crash);
        }
        let u = |salt: u64| (crate::kv_cache::mix64(n ^ salt) >> 11) as f64 / (1u64 << 53) as f64;
        if f.error_rate > 0.0 && u(0x1111) < f.error_rate {
            return Some(Fault::Error);
        }
        if f.hang_rate > 0.0 && u(0x2222) < f.hang_rate {
            return Some(Fault::Hang);
        }
        None
    }

    /// Completion requests seen (for the crash fault).
    pub fn completions_seen(&self) -> u64 {
        self.completions.load(Ordering::Relaxed)
    }

    fn free_blocks(&self, blocks: &[u32]) {
        if blocks.is_empty() {
            return;
        }
        let mut kv = self.kv.lock().expect("kv lock");
        kv.free(blocks);
        self.metrics.kv_usage.set(kv.usage());
        drop(kv);
        self.freed.notify_waiters();
    }

    /// Frees blocks held for remote decodes whose read notification arrived or whose hold
    /// timed out. Called periodically by the server (and by tests).
    pub fn reap_holds(&self, now: Instant) {
        let Some(t) = &self.transport else { return };
        let notes = t.take_notifications();
        let mut freed = Vec::new();
        {
            let mut h = self.holds.lock().expect("holds lock");
            for n in notes {
                let id = String::from_utf8_lossy(&n);
                // vLLM sends "<request id>:<tp rank>" in some versions; accept both.
                let id = h
                    .release(&id)
                    .or_else(|| id.rsplit_once(':').and_then(|(a, _)| h.release(a)));
                if let Some(b) = id {
                    freed.extend(b);
                }
            }
            for (id, b) in h.expire(now) {
                tracing::warn!(request = %id, blocks = b.len(), "KV hold timed out; freeing blocks");
                freed.extend(b);
            }
        }
        if !freed.is_empty() {
            self.metrics.held_blocks.dec_by(freed.len() as i64);
            self.free_blocks(&freed);
        }
    }

    /// Admits a request: decides its output length, allocates KV blocks (waiting while the
    /// cache is full), reuses prefix-cache hits, runs the disaggregated KV path, and in timed
    /// mode queues it in the scheduler.
    ///
    /// Errors (OpenAI errors): 400 for empty/too-long prompts and bad limits or incomplete
    /// `kv_transfer_params`; 502 `KVTransferError` when remote KV cannot be read or does not
    /// verify (nothing is generated then); blocks are freed on every error.
    pub async fn admit(self: &Arc<Self>, req: GenRequest) -> Result<Admitted, ApiError> {
        let n_prompt = req.prompt.len() as u32;
        let max_len = self.cfg.profile.model.max_model_len;
        if n_prompt == 0 {
            return Err(ApiError::bad_request("The decoder prompt cannot be empty"));
        }
        if n_prompt >= max_len {
            return Err(ApiError::bad_request(format!(
                "This model's maximum context length is {max_len} tokens. However, your request has {n_prompt} input tokens. Please reduce the length of the input messages."
            )));
        }
        let limit = match req.max_tokens {
            Some(0) => {
                return Err(ApiError::invalid_param(
                    "max_tokens",
                    "max_tokens must be at least 1, got 0.",
                ))
            }
            Some(m) if u64::from(n_prompt) + u64::from(m) > u64::from(max_len) => {
                return Err(ApiError::invalid_param(
                    "max_tokens",
                    format!(
                        "This model's maximum context length is {max_len} tokens. However, you requested {} tokens ({n_prompt} in the messages, {m} in the completion). Please reduce the length of the messages or completion.",
                        u64::from(n_prompt) + u64::from(m)
                    ),
                ));
            }
            Some(m) => m,
            None => self.cfg.default_max_tokens.min(max_len - n_prompt).max(1),
        };
        let min_tokens = req.min_tokens.unwrap_or(0);
        if min_tokens > limit {
            return Err(ApiError::invalid_param(
                "min_tokens",
                format!("min_tokens must be less than or equal to max_tokens={limit}, got {min_tokens}."),
            ));
        }
        let kv_params = req.kv.clone().unwrap_or_default();
        let hold_for_remote = kv_params.do_remote_decode && self.transport.is_some();
        let remote_prefill =
            kv_params.do_remote_prefill && self.transport.is_some() && !self.cfg.kv_noop;
        let bootstrap_prefill = req.bootstrap && self.cfg.role == Role::Prefill;
        let bootstrap_decode = req.bootstrap && self.cfg.role == Role::Decode;
        let natural = match (req.ignore_eos, self.cfg.eos_after) {
            (false, Some(e)) => e.max(min_tokens).max(1),
            _ => u32::MAX,
        };
        let (mut output, mut finish) = if natural < limit {
            (natural, FinishReason::Stop)
        } else {
            (limit, FinishReason::Length)
        };
        if bootstrap_prefill {
            (output, finish) = (1, FinishReason::Length);
        }
        let bs = self.cfg.block_size;
        let hashes = block_hashes(&req.prompt, bs);
        // The text's seed is the prompt's last block hash: the same prompt, the same text, on any worker.
        let prompt_seed = hashes.last().copied().unwrap_or(0);
        let choices = crate::generation::plan(
            &self.tokenizer,
            prompt_seed,
            output,
            finish,
            min_tokens,
            &req.params,
        );
        // Every step gives each unfinished choice a token, so the longest choice sets the steps.
        output = choices.iter().map(|c| c.tokens).max().unwrap_or(output);
        let n_full = req.prompt.len() / bs;
        let n_pb = hashes.len();
        // The choices share the prompt's blocks; each further choice needs blocks for its own output.
        let total = (n_prompt as usize + output as usize).div_ceil(bs)
            + (choices.len().saturating_sub(1)) * (output as usize).div_ceil(bs);
        // Validate the remote params before taking blocks.
        let remote = if remote_prefill {
            Some(self.remote_source(&kv_params, n_pb)?)
        } else {
            None
        };

        let alloc = {
            let mut waited = false;
            let _waiting = WaitingGauge(&self.metrics, std::cell::Cell::new(false));
            loop {
                let notified = self.freed.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                let r = {
                    let mut kv = self.kv.lock().expect("kv lock");
                    let r = kv.allocate(&hashes[..n_full], total);
                    self.publish_events(&mut kv);
                    r
                };
                match r {
                    Ok(a) => break a,
                    Err(MockError::OutOfBlocks { .. }) => {
                        if !waited {
                            waited = true;
                            _waiting.start();
                        }
                        notified.await;
                    }
                    Err(e) => return Err(e.to_api()),
                }
            }
        };
        let id = self.next_request_number();
        let mut guard = SeqGuard {
            engine: self.clone(),
            id,
            blocks: alloc.blocks,
            in_sched: false,
            counted_running: false,
            done: false,
        };
        let cached_tokens = (alloc.cached_blocks * bs).min(n_prompt as usize) as u32;
        self.metrics.prefix_queries.inc_by(u64::from(n_prompt));
        self.metrics.prefix_hits.inc_by(u64::from(cached_tokens));
        self.metrics
            .kv_usage
            .set(self.kv.lock().expect("kv lock").usage());

        let mut computed = cached_tokens;
        if let (Some((ep, remote_ids, notif)), Some(t)) = (remote, &self.transport) {
            let start = alloc.cached_blocks.min(n_pb);
            let local = &guard.blocks[start..n_pb];
            let res = t
                .read_remote(&ep, &remote_ids[start..n_pb], local, notif.as_bytes())
                .await;
            if let Err(e) = res {
                self.metrics.kv_transfer_errors.inc();
                tracing::warn!(error = %e, "remote KV read failed");
                return Err(e.to_api());
            }
            let layout = t.layout();
            for (i, &b) in guard.blocks.iter().enumerate().take(n_pb).skip(start) {
                let n = (req.prompt.len() - i * bs).min(bs);
                let mut ok = false;
                t.read_block(b, &mut |bytes| ok = layout.verify(bytes, hashes[i], n));
                if !ok {
                    self.metrics.kv_transfer_errors.inc();
                    let e = MockError::KvMismatch {
                        engine: ep.engine_id.clone(),
                        block: i,
                    };
                    tracing::warn!(error = %e, "remote KV did not verify");
                    return Err(e.to_api());
                }
            }
            let received = (n_pb - start) as u64;
            self.metrics.kv_blocks_received.inc_by(received);
            self.metrics
                .kv_bytes_received
                .inc_by(received * layout.block_bytes() as u64);
            computed = n_prompt;
        } else if let Some(t) = &self.transport {
            let layout = t.layout();
            for (i, &b) in guard
                .blocks
                .iter()
                .enumerate()
                .take(n_pb)
                .skip(alloc.cached_blocks)
            {
                let n = (req.prompt.len() - i * bs).min(bs);
                t.write_block(b, &mut |bytes| layout.fill(bytes, hashes[i], n));
            }
        }
        // The KV "arrived" without a read (bootstrap flow, or the benchmark no-op mode).
        if bootstrap_decode || (self.cfg.kv_noop && kv_params.do_remote_prefill) {
            computed = n_prompt;
        }
        {
            let mut kv = self.kv.lock().expect("kv lock");
            kv.commit_prompt(&guard.blocks[..n_full], &hashes[..n_full], &req.prompt);
            self.publish_events(&mut kv);
        }

        let events = match &self.sched {
            Some(tx) => {
                let (etx, erx) = mpsc::unbounded_channel();
                let spec = SeqSpec {
                    id,
                    prompt_tokens: n_prompt,
                    cached_tokens: computed,
                    output_tokens: output,
                };
                if tx.send(SchedMsg::Add(spec, etx)).is_err() {
                    return Err(ApiError::internal("scheduler thread is gone"));
                }
                guard.in_sched = true;
                Some(erx)
            }
            None => {
                guard.counted_running = true;
                self.metrics.running.inc();
                None
            }
        };
        Ok(Admitted {
            guard,
            prompt_tokens: n_prompt,
            cached_tokens,
            output_tokens: output,
            choices,
            events,
            hold_for_remote,
        })
    }

    fn remote_source(
        &self,
        p: &KvTransferParams,
        n_pb: usize,
    ) -> Result<(KvEndpoint, Vec<u32>, String), ApiError> {
        let missing = |f: &str| {
            ApiError::invalid_param(
                "kv_transfer_params",
                format!("kv_transfer_params.do_remote_prefill is set but {f} is missing"),
            )
        };
        let engine_id = p
            .remote_engine_id
            .clone()
            .ok_or_else(|| missing("remote_engine_id"))?;
        let ids = p
            .remote_block_ids
            .clone()
            .ok_or_else(|| missing("remote_block_ids"))?;
        let host = p
            .remote_host
            .clone()
            .ok_or_else(|| missing("remote_host"))?;
        let port = p.remote_port.ok_or_else(|| missing("remote_port"))?;
        if ids.len() != n_pb {
            return Err(ApiError::invalid_param(
                "kv_transfer_params",
                format!(
                    "the prompt fills {n_pb} KV blocks of {} tokens but remote_block_ids has {}; was the prefill run on the same prompt and model?",
                    self.cfg.block_size,
                    ids.len()
                ),
            ));
        }
        let notif = p.remote_request_id.clone().unwrap_or_default();
        Ok((
            KvEndpoint {
                engine_id,
                host,
                port,
            },
            ids,
            notif,
        ))
    }
}

struct WaitingGauge<'a>(&'a Metrics, std::cell::Cell<bool>);
impl WaitingGauge<'_> {
    fn start(&self) {
        self.1.set(true);
        self.0.waiting.inc();
    }
}
impl Drop for WaitingGauge<'_> {
    fn drop(&mut self) {
        if self.1.get() {
            self.0.waiting.dec();
        }
    }
}

/// Owns one admitted request's resources; dropping it (finish, error, client disconnect)
/// frees the KV blocks, removes the request from the scheduler and fixes the gauges.
#[derive(Debug)]
pub struct SeqGuard {
    engine: Arc<Engine>,
    id: u64,
    blocks: Vec<u32>,
    in_sched: bool,
    counted_running: bool,
    done: bool,
}

impl SeqGuard {
    /// The engine.
    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// Marks the request finished normally with `reason` (counted in metrics).
    pub fn finish(&mut self, reason: FinishReason) {
        if !self.done {
            self.done = true;
            self.engine.metrics.finished(reason.as_str());
        }
    }

    /// Prefill for a remote decode (vLLM NixlConnector `request_finished`): moves the prompt's
    /// blocks to the hold table (freed on the decode side's read notification or after the
    /// hold timeout) and returns the `kv_transfer_params` for the decode request.
    pub fn hold_for_remote(&mut self, request_id: &str, prompt_tokens: u32) -> KvTransferParams {
        let e = &self.engine;
        let ep = e.kv_endpoint().expect("hold_for_remote needs a transport");
        let n_pb = (prompt_tokens as usize)
            .div_ceil(e.cfg.block_size)
            .min(self.blocks.len());
        if e.cfg.kv_noop {
            // Benchmark mode: the same answer, nothing held (no decode will read it).
            return KvTransferParams {
                do_remote_prefill: true,
                do_remote_decode: false,
                remote_engine_id: Some(ep.engine_id),
                remote_block_ids: Some(self.blocks[..n_pb].to_vec()),
                remote_host: Some(ep.host),
                remote_port: Some(ep.port),
                remote_request_id: Some(request_id.to_string()),
                tp_size: Some(1),
                extra: Default::default(),
            };
        }
        let held: Vec<u32> = self.blocks.drain(..n_pb).collect();
        e.metrics.held_blocks.inc_by(held.len() as i64);
        let old = e.holds.lock().expect("holds lock").hold(
            request_id.to_string(),
            held.clone(),
            Instant::now() + e.cfg.kv_hold_timeout,
        );
        if let Some(old) = old {
            e.metrics.held_blocks.dec_by(old.len() as i64);
            e.free_blocks(&old);
        }
        KvTransferParams {
            do_remote_prefill: true,
            do_remote_decode: false,
            remote_engine_id: Some(ep.engine_id),
            remote_block_ids: Some(held),
            remote_host: Some(ep.host),
            remote_port: Some(ep.port),
            remote_request_id: Some(request_id.to_string()),
            tp_size: Some(1),
            extra: Default::default(),
        }
    }
}

impl Drop for SeqGuard {
    fn drop(&mut self) {
        let e = &self.engine;
        if self.in_sched && !self.done {
            if let Some(tx) = &e.sched {
                let _ = tx.send(SchedMsg::Abort(self.id));
            }
        }
        if !self.done {
            e.metrics.finished(FinishReason::Abort.as_str());
        }
        if self.counted_running {
            e.metrics.running.dec();
        }
        let blocks = std::mem::take(&mut self.blocks);
        e.free_blocks(&blocks);
    }
}

async fn sched_loop(
    mut s: Scheduler,
    mut rx: mpsc::UnboundedReceiver<SchedMsg>,
    speedup: f64,
    running: prometheus_client::metrics::gauge::Gauge,
    waiting: prometheus_client::metrics::gauge::Gauge,
) {
    let mut outs: std::collections::HashMap<u64, mpsc::UnboundedSender<TokenEvent>> =
        Default::default();
    let mut deadline = tokio::time::Instant::now();
    let mut last_waiting = 0i64;
    let apply = |m: SchedMsg, s: &mut Scheduler, outs: &mut std::collections::HashMap<_, _>| match m
    {
        SchedMsg::Add(spec, tx) => {
            outs.insert(spec.id, tx);
            s.add(spec);
        }
        SchedMsg::Abort(id) => {
            outs.remove(&id);
            s.abort(id);
        }
    };
    loop {
        if s.is_idle() {
            running.set(0);
            waiting.dec_by(last_waiting);
            last_waiting = 0;
            match rx.recv().await {
                Some(m) => apply(m, &mut s, &mut outs),
                None => return,
            }
            deadline = tokio::time::Instant::now();
        }
        while let Ok(m) = rx.try_recv() {
            apply(m, &mut s, &mut outs);
        }
        let Some(step) = s.schedule() else { continue };
        running.set(
            s.num_running() as i64 + step.outputs.iter().filter(|o| o.finished).count() as i64,
        );
        let w = s.num_waiting() as i64;
        waiting.inc_by(w - last_waiting);
        last_waiting = w;
        deadline = deadline.max(tokio::time::Instant::now() - Duration::from_millis(5))
            + Duration::from_secs_f64(step.duration_us / 1e6 / speedup);
        tokio::time::sleep_until(deadline).await;
        for o in step.outputs {
            if o.token {
                if let Some(tx) = outs.get(&o.id) {
                    let _ = tx.send(TokenEvent {
                        finished: o.finished,
                    });
                }
            }
            if o.finished {
                outs.remove(&o.id);
            }
        }
        running.set(s.num_running() as i64);
    }
}
