//! The discrete-event loop.
//!
//! Virtual time is `u64` ns. Events: request arrivals (from the sorted request list), engine
//! steps ending, KV reads ending, workers coming up, planner ticks. Each request goes the way
//! `pdx serve`'s `vllm-nixl` orchestration sends it:
//!
//! 1. the grid (`pdx_router_core::grid`) picks a prefill and a decode pool from the ISL (no
//!    per-request SLO targets: the middle of the grid's range, as `pdx serve` does);
//! 2. the prefill pool's `pdx_router_core::policy::Selector` picks a worker from the router's
//!    view (in-flight requests and tokens, eligibility); other prefill pools are tried if the
//!    pool has no eligible worker, and with none at all the decode worker computes the prompt
//!    (`pdx serve`'s default decode-only fallback);
//! 3. the prefill worker admits it as `pdx mock` does: KV blocks from its `BlockManager`
//!    (prefix hits reused; the request waits while the blocks are not there), then its
//!    `Scheduler` runs the prompt with `max_tokens = 1` in steps timed by the
//!    `TimingProfile`;
//! 4. when that step ends, the prompt's blocks stay held for the decode; the decode pool's
//!    policy picks a decode worker, which allocates blocks, reads the KV
//!    (`latency + bytes / bandwidth`, then the prefill frees its held blocks) and schedules the
//!    request with the prompt computed; tokens come out at the end of its steps.
//!
//! Aggregated pools run both phases on one worker. The TTFT, ITL, TPOT and end-to-end times
//! are what a client of the router would measure, with no network or HTTP cost.

use crate::config::Cluster;
use crate::workload::{block_hashes, SimRequest};
use crate::SimError;
use pdx_mock::kv_cache::BlockManager;
use pdx_mock::profile::Profile;
use pdx_mock::scheduler::{Scheduler, SeqSpec, Step};
use pdx_planner::{Connector, Decision, Observation, Planner, PlannerError, PoolRole};
use pdx_replay::client::Outcome;
use pdx_replay::report::{Accumulator, Report, RequestRecord, Slo};
use pdx_router_core::{Candidate, Selector};
use serde::Serialize;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};

const NONE: u32 = u32::MAX;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Ev {
    StepDone(u32),
    KvRead(u32),
    WorkerUp(u32),
    Tick,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WState {
    Starting,
    Active,
    Draining,
    Gone,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Admit {
    /// Prefill for a remote decode (`max_tokens = 1`, blocks held at the end).
    Prefill,
    /// Decode reading the prompt's KV from the prefill worker.
    RemoteDecode,
    /// Both phases here (aggregated, or the decode-only fallback).
    Full,
}

struct Worker {
    pool: usize,
    id: u64,
    sched: Scheduler,
    kv: BlockManager,
    state: WState,
    step: Option<Step>,
    in_req: u64,
    in_tok: u64,
    waiting: VecDeque<(u32, Admit)>,
    holds: u32,
    block_bytes: u64,
    max_len: u32,
    added_ns: u64,
    gone_ns: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Queued,
    Prefill,
    Handoff,
    Decode,
    Done,
}

struct Req {
    phase: Phase,
    p_pool: u16,
    d_pool: u16,
    p_worker: u32,
    worker: u32,
    blocks: Vec<u32>,
    held: Vec<u32>,
    hashes: Vec<u64>,
    first_ns: u64,
    last_ns: u64,
    tokens: u32,
}

/// Counters of one pool over a planner interval.
#[derive(Debug, Clone, Copy, Default)]
struct Window {
    requests: f64,
    isl: f64,
    osl: f64,
    ttft_ms: f64,
    ttft_n: f64,
    itl_ms: f64,
    itl_n: f64,
}

struct PoolRt {
    name: String,
    role: PoolRole,
    selector: Selector,
    workers: Vec<u32>,
    profile: Profile,
    num_blocks: u32,
    gpus: u32,
    startup_ns: u64,
    window: Window,
    requests: u64,
    min_workers: u32,
    max_workers: u32,
    /// The planner's diversion of this pool: (index of the other pool within the role,
    /// fraction of new requests), and the credit that spreads them evenly.
    divert: Option<(usize, f64)>,
    divert_credit: f64,
    /// New requests the grid chose this pool for that went to another pool.
    diverted: u64,
}

/// What happened in one pool over the run.
#[derive(Debug, Clone, Serialize)]
pub struct PoolSummary {
    /// Pool name.
    pub name: String,
    /// Role.
    pub role: PoolRole,
    /// Requests routed to it (prefill or decode phase).
    pub requests: u64,
    /// Fewest workers it had serving or starting.
    pub min_workers: u32,
    /// Most workers it had serving or starting.
    pub max_workers: u32,
    /// Requests the grid chose this pool for that the planner's diversions sent to another
    /// pool of its role.
    pub diverted: u64,
    /// GPU-hours of its workers (from being added to being removed or the end).
    pub gpu_hours: f64,
}

/// Replicas per pool and arrival rate at a planner tick.
#[derive(Debug, Clone, Serialize)]
pub struct TimelinePoint {
    /// Virtual time, s.
    pub at_s: f64,
    /// Arrivals per second over the interval that ended.
    pub rate: f64,
    /// Workers serving or starting, per pool (cluster order).
    pub replicas: Vec<u32>,
}

/// The result of a simulation.
#[derive(Debug, Clone, Serialize)]
pub struct SimOutput {
    /// The `pdx replay` report.
    #[serde(flatten)]
    pub report: Report,
    /// Per-pool counts.
    pub pools: Vec<PoolSummary>,
    /// GPU-hours of all workers.
    pub gpu_hours: f64,
    /// Planner decisions, one per interval (empty without a planner).
    #[serde(skip)]
    pub decisions: Vec<Decision>,
    /// Replicas over time (planner ticks).
    #[serde(skip)]
    pub timeline: Vec<TimelinePoint>,
    /// Per-request records for `--plot` (no inter-token gaps: those go straight to the report).
    #[serde(skip)]
    pub records: Vec<RequestRecord>,
}

/// Options of one run.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// SLO of the report.
    pub slo: Slo,
    /// Show a progress bar.
    pub progress: bool,
    /// Seed of `power_of_two`.
    pub seed: u64,
    /// Ignore the planner's diversions ([`pdx_planner::global::Diversion`]): every request
    /// goes to the pool the grid chose (the baseline of the diversion comparison).
    pub no_divert: bool,
}

/// The simulator.
pub struct Sim<'a> {
    cluster: &'a Cluster,
    reqs: &'a [SimRequest],
    rt: Vec<Req>,
    workers: Vec<Worker>,
    pools: Vec<PoolRt>,
    heap: BinaryHeap<Reverse<(u64, u64, Ev)>>,
    seq: u64,
    /// Events in the heap other than planner ticks (ticks alone move nothing).
    pending: usize,
    now: u64,
    acc: Accumulator,
    records: Vec<RequestRecord>,
    done: usize,
    planner: Option<Planner>,
    planned: Vec<usize>,
    decisions: Vec<Decision>,
    timeline: Vec<TimelinePoint>,
    arrivals_in_window: u64,
    last_tick: u64,
    cands: Vec<Candidate>,
    no_divert: bool,
    bar: indicatif::ProgressBar,
}

fn block_bytes(p: &Profile, block_size: u32, scale_down: u32) -> u64 {
    // As `pdx mock` lays out a block: per token and layer, K and V of every KV head, scaled
    // down and rounded up to 8 bytes.
    let m = &p.model;
    let per_token_layer =
        (u64::from(m.kv_heads) * u64::from(m.head_dim) * 2 * u64::from(m.dtype_bytes))
            .div_ceil(u64::from(scale_down.max(1)))
            .next_multiple_of(8);
    u64::from(block_size) * u64::from(m.layers) * per_token_layer
}

impl<'a> Sim<'a> {
    /// A simulation of `reqs` (sorted by arrival) on `cluster`, with `planner` if given (its
    /// pools' profiles filled in).
    ///
    /// Errors: [`SimError::Config`] when the planner names pools the cluster lacks.
    pub fn new(
        cluster: &'a Cluster,
        reqs: &'a [SimRequest],
        planner: Option<Planner>,
        opts: &RunOptions,
    ) -> Result<Self, SimError> {
        let mut s = Sim {
            cluster,
            reqs,
            rt: Vec::with_capacity(reqs.len()),
            workers: Vec::new(),
            pools: Vec::new(),
            heap: BinaryHeap::new(),
            seq: 0,
            pending: 0,
            now: 0,
            acc: Accumulator::new(opts.slo),
            records: Vec::new(),
            done: 0,
            planner: None,
            planned: Vec::new(),
            decisions: Vec::new(),
            timeline: Vec::new(),
            arrivals_in_window: 0,
            last_tick: 0,
            cands: Vec::new(),
            no_divert: opts.no_divert,
            bar: if opts.progress {
                indicatif::ProgressBar::new(reqs.len() as u64)
            } else {
                indicatif::ProgressBar::hidden()
            },
        };
        s.bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:40} {pos}/{len} requests (virtual time {msg})  {elapsed_precise}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        for (i, p) in cluster.pools.iter().enumerate() {
            let mut selector = Selector::new(p.spec.policy, opts.seed.wrapping_add(i as u64) | 1);
            selector.block_size = u64::from(cluster.block_size);
            selector.kind = match p.spec.role {
                PoolRole::Prefill => pdx_router_core::PoolKind::Prefill,
                PoolRole::Decode => pdx_router_core::PoolKind::Decode,
                PoolRole::Aggregated => pdx_router_core::PoolKind::Aggregated,
            };
            selector.weights = pdx_router_core::ScoreWeights::default_for(selector.kind);
            s.pools.push(PoolRt {
                name: p.spec.name.clone(),
                role: p.spec.role,
                selector,
                workers: Vec::new(),
                profile: p.profile.clone(),
                num_blocks: p.spec.num_blocks,
                gpus: p.spec.gpus_per_worker,
                startup_ns: (p.spec.startup_secs * 1e9) as u64,
                window: Window::default(),
                requests: 0,
                min_workers: p.workers.len() as u32,
                max_workers: p.workers.len() as u32,
                divert: None,
                divert_credit: 0.0,
                diverted: 0,
            });
            for wp in &p.workers {
                let w = s.add_worker(i, wp.clone());
                s.workers[w as usize].state = WState::Active;
            }
        }
        if let Some(pl) = planner {
            for pp in &pl.config().pools {
                let i = s
                    .pools
                    .iter()
                    .position(|q| q.name == pp.name && q.role == pp.role)
                    .ok_or_else(|| SimError::Config(format!("planner pool {} unknown", pp.name)))?;
                s.planned.push(i);
            }
            let every = (pl.config().interval_secs * 1e9) as u64;
            s.push(every, Ev::Tick);
            s.planner = Some(pl);
        }
        Ok(s)
    }

    fn push(&mut self, at: u64, ev: Ev) {
        self.seq += 1;
        if ev != Ev::Tick {
            self.pending += 1;
        }
        self.heap.push(Reverse((at, self.seq, ev)));
    }

    fn add_worker(&mut self, pool: usize, profile: Profile) -> u32 {
        let p = &self.pools[pool];
        let id = self.workers.len() as u32;
        self.workers.push(Worker {
            pool,
            id: u64::from(id) + 1,
            sched: Scheduler::new(profile.scheduler.clone(), profile.timing.clone()),
            kv: BlockManager::new(p.num_blocks, self.cluster.block_size as usize),
            state: WState::Starting,
            step: None,
            in_req: 0,
            in_tok: 0,
            waiting: VecDeque::new(),
            holds: 0,
            block_bytes: block_bytes(
                &profile,
                self.cluster.block_size,
                self.cluster.kv_handoff.kv_scale_down,
            ),
            max_len: profile.model.max_model_len,
            added_ns: self.now,
            gone_ns: None,
        });
        self.pools[pool].workers.push(id);
        id
    }

    /// Runs to the last request's end.
    pub fn run(mut self) -> SimOutput {
        let mut next = 0usize;
        let n = self.reqs.len();
        let mut scratch = Vec::new();
        while self.done < n {
            let arrival = self.reqs.get(next).map(|r| r.arrival_ns);
            let ev_at = self.heap.peek().map(|Reverse((t, _, _))| *t);
            match (arrival, ev_at) {
                (Some(a), e) if e.is_none_or(|e| a <= e) => {
                    self.now = a;
                    self.arrive(next as u32, &mut scratch);
                    next += 1;
                }
                (None, _) if self.pending == 0 => break, // only ticks left: stuck requests fail below
                (_, Some(_)) => {
                    let Reverse((t, _, ev)) = self.heap.pop().expect("peeked");
                    self.now = t;
                    if ev != Ev::Tick {
                        self.pending -= 1;
                    }
                    match ev {
                        Ev::StepDone(w) => self.step_done(w),
                        Ev::KvRead(r) => self.kv_read(r),
                        Ev::WorkerUp(w) => {
                            if self.workers[w as usize].state == WState::Starting {
                                self.workers[w as usize].state = WState::Active;
                            }
                        }
                        Ev::Tick => self.tick(),
                    }
                }
                (_, None) => break,
            }
        }
        self.finish()
    }

    fn fail(&mut self, r: u32, kind: &str) {
        let q = &self.reqs[r as usize];
        self.rt[r as usize].phase = Phase::Done;
        let o = Outcome {
            error: Some(kind.to_string()),
            ..Default::default()
        };
        self.record(r, q.arrival_ns, o);
        self.completed();
    }

    /// Counts request `r`, which arrived at `arrival_ns`, in the report.
    fn record(&mut self, r: u32, arrival_ns: u64, o: Outcome) {
        let q = &self.reqs[r as usize];
        let rec = RequestRecord::from_outcome(r as usize, arrival_ns as f64 / 1e9, o, q.isl, q.osl);
        self.acc.add(&rec);
        self.records.push(rec);
    }

    fn completed(&mut self) {
        self.done += 1;
        if self.done % 1024 == 0 {
            self.bar.set_position(self.done as u64);
            self.bar
                .set_message(format!("{:.0} s", self.now as f64 / 1e9));
        }
    }

    fn arrive(&mut self, r: u32, scratch: &mut Vec<u64>) {
        let q = &self.reqs[r as usize];
        self.arrivals_in_window += 1;
        block_hashes(q, self.cluster.block_size, u64::from(r) + 1, scratch);
        let (p_first, d_first) = match &self.cluster.grid {
            Some(g) => (
                g.select_prefill_pool(u64::from(q.isl), None),
                g.select_decode_pool(u64::from(q.isl), None),
            ),
            None => (0, 0),
        };
        self.rt.push(Req {
            phase: Phase::Queued,
            p_pool: 0,
            d_pool: d_first as u16,
            p_worker: NONE,
            worker: NONE,
            blocks: Vec::new(),
            held: Vec::new(),
            hashes: std::mem::take(scratch),
            first_ns: 0,
            last_ns: 0,
            tokens: 0,
        });
        // The offered load: each request counts for the pools the grid gives it on arrival
        // (what the planner must provision for), even if it waits elsewhere first.
        let (isl, osl) = (f64::from(q.isl), f64::from(q.osl));
        let roles: &[(PoolRole, usize)] = if self.cluster.disaggregated() {
            &[(PoolRole::Prefill, p_first), (PoolRole::Decode, d_first)]
        } else {
            &[(PoolRole::Aggregated, 0)]
        };
        for &(role, k) in roles {
            if let Some(pi) = (0..self.pools.len())
                .filter(|&i| self.pools[i].role == role)
                .nth(k)
            {
                let win = &mut self.pools[pi].window;
                win.requests += 1.0;
                win.isl += isl;
                win.osl += osl;
            }
        }
        let (p_first, d_first) = if self.cluster.disaggregated() {
            (
                self.divert(PoolRole::Prefill, p_first),
                self.divert(PoolRole::Decode, d_first),
            )
        } else {
            (p_first, d_first)
        };
        self.rt[r as usize].d_pool = d_first as u16;
        if self.cluster.disaggregated() {
            if let Some(w) = self.pick(PoolRole::Prefill, p_first, r) {
                self.rt[r as usize].p_pool = self.workers[w as usize].pool as u16;
                self.admit(w, r, Admit::Prefill);
                return;
            }
            // No prefill worker at all: decode-only fallback.
            self.dispatch_decode(r, Admit::Full);
        } else {
            match self.pick(PoolRole::Aggregated, 0, r) {
                Some(w) => {
                    self.rt[r as usize].p_pool = self.workers[w as usize].pool as u16;
                    self.admit(w, r, Admit::Full)
                }
                None => self.fail(r, "http_503"),
            }
        }
    }

    /// The pool (index within `role`) a new request the grid sent to pool `k` of `role` goes
    /// to: the planner's diversion of that pool, if any, takes every request at which the
    /// running credit (`+ fraction` per request) reaches 1, so exactly `fraction` of them,
    /// evenly spread and deterministic.
    fn divert(&mut self, role: PoolRole, k: usize) -> usize {
        let Some(pi) = (0..self.pools.len())
            .filter(|&i| self.pools[i].role == role)
            .nth(k)
        else {
            return k;
        };
        let p = &mut self.pools[pi];
        let Some((to, fraction)) = p.divert else {
            return k;
        };
        p.divert_credit += fraction;
        if p.divert_credit >= 1.0 {
            p.divert_credit -= 1.0;
            p.diverted += 1;
            return to;
        }
        k
    }

    /// The router's choice among pools of `role`, `first` (the grid's index within the role)
    /// first; counts the dispatch in the worker's in-flight load and the pool's window.
    fn pick(&mut self, role: PoolRole, first: usize, r: u32) -> Option<u32> {
        let of_role: Vec<usize> = (0..self.pools.len())
            .filter(|&i| self.pools[i].role == role)
            .collect();
        let order = std::iter::once(first).chain((0..of_role.len()).filter(|&i| i != first));
        let now_us = self.now / 1000;
        let q = &self.reqs[r as usize];
        for k in order {
            let Some(&pi) = of_role.get(k) else { continue };
            self.cands.clear();
            for &w in &self.pools[pi].workers {
                let w = &self.workers[w as usize];
                self.cands.push(Candidate::new(
                    w.id,
                    w.in_req,
                    w.in_tok,
                    w.state == WState::Active,
                ));
            }
            let hashes: &[u64] = if self.pools[pi].selector.policy.uses_overlap() {
                &self.rt[r as usize].hashes
            } else {
                &[]
            };
            self.pools[pi]
                .selector
                .fill_overlap(&mut self.cands, hashes, now_us);
            if let Some(i) = self.pools[pi].selector.choose(&self.cands, hashes, now_us) {
                let w = self.pools[pi].workers[i];
                let wk = &mut self.workers[w as usize];
                wk.in_req += 1;
                wk.in_tok += u64::from(q.isl) + u64::from(q.osl);
                self.pools[pi].requests += 1;
                return Some(w);
            }
        }
        None
    }

    fn dispatch_decode(&mut self, r: u32, how: Admit) {
        let first = self.rt[r as usize].d_pool as usize;
        match self.pick(PoolRole::Decode, first, r) {
            Some(w) => self.admit(w, r, how),
            None => {
                self.release_held(r);
                self.fail(r, "http_503");
            }
        }
    }

    fn unload(&mut self, w: u32, r: u32) {
        let q = &self.reqs[r as usize];
        let wk = &mut self.workers[w as usize];
        wk.in_req -= 1;
        wk.in_tok -= u64::from(q.isl) + u64::from(q.osl);
    }

    /// `pdx mock`'s admission: length checks, KV blocks (or wait), then the scheduler or the
    /// KV read.
    fn admit(&mut self, w: u32, r: u32, how: Admit) {
        let q = &self.reqs[r as usize];
        let bs = self.cluster.block_size as usize;
        let out = if how == Admit::Prefill { 1 } else { q.osl };
        let wk = &self.workers[w as usize];
        if q.isl >= wk.max_len || u64::from(q.isl) + u64::from(out) > u64::from(wk.max_len) {
            self.unload(w, r);
            self.release_held(r);
            return self.fail(r, "http_400");
        }
        let total = (q.isl as usize + out as usize).div_ceil(bs);
        let n_full = q.isl as usize / bs;
        let st = &mut self.rt[r as usize];
        let wk = &mut self.workers[w as usize];
        match wk.kv.allocate(&st.hashes[..n_full], total) {
            Ok(a) => {
                wk.kv.commit(&a.blocks[..n_full], &st.hashes[..n_full]);
                let cached = ((a.cached_blocks * bs).min(q.isl as usize)) as u32;
                st.blocks = a.blocks;
                st.worker = w;
                match how {
                    Admit::Prefill | Admit::Full => {
                        st.phase = if how == Admit::Prefill {
                            st.p_worker = w;
                            Phase::Prefill
                        } else {
                            Phase::Decode
                        };
                        wk.sched.add(SeqSpec {
                            id: u64::from(r),
                            prompt_tokens: q.isl,
                            cached_tokens: cached,
                            output_tokens: out,
                        });
                        if how == Admit::Full {
                            st.hashes = Vec::new();
                        }
                        self.kick(w);
                    }
                    Admit::RemoteDecode => {
                        st.phase = Phase::Handoff;
                        let n_pb = (q.isl as usize).div_ceil(bs);
                        let moved = n_pb.saturating_sub(a.cached_blocks) as u64;
                        let d = self.cluster.kv_handoff.duration_ns(moved * wk.block_bytes);
                        self.push(self.now + d.max(1), Ev::KvRead(r));
                    }
                }
            }
            Err(pdx_mock::MockError::OutOfBlocks { .. }) => wk.waiting.push_back((r, how)),
            Err(_) => {
                self.unload(w, r);
                self.release_held(r);
                self.fail(r, "http_400");
            }
        }
    }

    /// Starts the worker's next step if it is not stepping.
    fn kick(&mut self, w: u32) {
        let wk = &mut self.workers[w as usize];
        if wk.step.is_some() || wk.state == WState::Gone {
            return;
        }
        if let Some(step) = wk.sched.schedule() {
            let d = (step.duration_us * 1e3).max(1.0) as u64;
            wk.step = Some(step);
            self.push(self.now + d, Ev::StepDone(w));
        }
    }

    /// Frees the prompt blocks a prefill worker held for request `r`'s decode.
    fn release_held(&mut self, r: u32) {
        let held = std::mem::take(&mut self.rt[r as usize].held);
        let p = self.rt[r as usize].p_worker;
        if p == NONE || held.is_empty() {
            return;
        }
        let wk = &mut self.workers[p as usize];
        wk.kv.free(&held);
        wk.holds -= 1;
        self.retry_waiting(p);
        self.kick(p);
        self.maybe_gone(p);
    }

    fn kv_read(&mut self, r: u32) {
        self.release_held(r);
        let q = &self.reqs[r as usize];
        let st = &mut self.rt[r as usize];
        st.phase = Phase::Decode;
        st.hashes = Vec::new();
        let w = st.worker;
        self.workers[w as usize].sched.add(SeqSpec {
            id: u64::from(r),
            prompt_tokens: q.isl,
            cached_tokens: q.isl,
            output_tokens: q.osl,
        });
        self.kick(w);
    }

    fn step_done(&mut self, w: u32) {
        let Some(step) = self.workers[w as usize].step.take() else {
            return;
        };
        let bs = self.cluster.block_size as usize;
        for o in &step.outputs {
            if !o.token {
                continue;
            }
            let r = o.id as u32;
            let q = &self.reqs[r as usize];
            let pool = self.workers[w as usize].pool;
            match self.rt[r as usize].phase {
                Phase::Prefill => {
                    // The prefill's answer: keep the prompt's blocks for the decode to read.
                    let st = &mut self.rt[r as usize];
                    let n_pb = (q.isl as usize).div_ceil(bs).min(st.blocks.len());
                    let mut blocks = std::mem::take(&mut st.blocks);
                    st.held = blocks.drain(..n_pb).collect();
                    st.hashes.truncate(n_pb);
                    let wk = &mut self.workers[w as usize];
                    wk.kv.free(&blocks);
                    wk.holds += 1;
                    self.unload(w, r);
                    // The prefill pool's latency: arrival to the prefill's answer (queue,
                    // KV-block wait and prompt steps), what it can act on.
                    let win = &mut self.pools[pool].window;
                    win.ttft_ms += (self.now - q.arrival_ns) as f64 / 1e6;
                    win.ttft_n += 1.0;
                    self.dispatch_decode(r, Admit::RemoteDecode);
                }
                Phase::Decode => {
                    let now = self.now;
                    let st = &mut self.rt[r as usize];
                    st.tokens += 1;
                    if st.first_ns == 0 {
                        st.first_ns = now.max(1);
                        let ttft_ms = (now - q.arrival_ns) as f64 / 1e6;
                        // An aggregated pool sees the TTFT; a prefill pool observes its own
                        // answer time (below), as its workers' TTFT metric does.
                        if !self.cluster.disaggregated() {
                            let win = &mut self.pools[pool].window;
                            win.ttft_ms += ttft_ms;
                            win.ttft_n += 1.0;
                        }
                    } else {
                        let gap = now - st.last_ns;
                        self.acc.record_itl_us(gap / 1000);
                        let win = &mut self.pools[pool].window;
                        win.itl_ms += gap as f64 / 1e6;
                        win.itl_n += 1.0;
                    }
                    let st = &mut self.rt[r as usize];
                    st.last_ns = now;
                    if o.finished {
                        st.phase = Phase::Done;
                        let blocks = std::mem::take(&mut st.blocks);
                        let (first, tokens) = (st.first_ns, st.tokens);
                        self.workers[w as usize].kv.free(&blocks);
                        self.unload(w, r);
                        let o = Outcome {
                            ttft_us: Some((first - q.arrival_ns) / 1000),
                            e2e_us: (now - q.arrival_ns) / 1000,
                            tokens,
                            ..Default::default()
                        };
                        self.record(r, q.arrival_ns, o);
                        self.completed();
                    }
                }
                _ => {}
            }
        }
        self.retry_waiting(w);
        self.kick(w);
        self.maybe_gone(w);
    }

    /// Requests waiting for KV blocks on `w` retry, in arrival order (`pdx mock` wakes every
    /// waiter when blocks are freed).
    fn retry_waiting(&mut self, w: u32) {
        let n = self.workers[w as usize].waiting.len();
        for _ in 0..n {
            let Some((r, how)) = self.workers[w as usize].waiting.pop_front() else {
                break;
            };
            let before = self.workers[w as usize].waiting.len();
            self.admit(w, r, how);
            // Still out of blocks: it went to the back; keep the others' order and stop when
            // the first waiter does not fit (the rest need at least as many blocks in FIFO).
            if self.workers[w as usize].waiting.len() > before {
                let back = self.workers[w as usize]
                    .waiting
                    .pop_back()
                    .expect("just pushed");
                self.workers[w as usize].waiting.push_front(back);
                break;
            }
        }
    }

    fn maybe_gone(&mut self, w: u32) {
        let wk = &mut self.workers[w as usize];
        if wk.state == WState::Draining
            && wk.in_req == 0
            && wk.holds == 0
            && wk.sched.is_idle()
            && wk.step.is_none()
        {
            self.gone(w);
        }
    }

    fn gone(&mut self, w: u32) {
        let wk = &mut self.workers[w as usize];
        wk.state = WState::Gone;
        wk.gone_ns = Some(self.now);
        let (pool, id) = (wk.pool, wk.id);
        let p = &mut self.pools[pool];
        p.workers.retain(|&x| x != w);
        p.selector.index.remove_worker(id);
    }

    fn live(&self, pool: usize) -> u32 {
        self.pools[pool]
            .workers
            .iter()
            .filter(|&&w| {
                matches!(
                    self.workers[w as usize].state,
                    WState::Starting | WState::Active
                )
            })
            .count() as u32
    }

    fn active(&self, pool: usize) -> u32 {
        self.pools[pool]
            .workers
            .iter()
            .filter(|&&w| self.workers[w as usize].state == WState::Active)
            .count() as u32
    }

    fn tick(&mut self) {
        let Some(mut planner) = self.planner.take() else {
            return;
        };
        let interval = planner.config().interval_secs;
        let planned = self.planned.clone();
        let obs: Vec<Observation> = planned
            .iter()
            .map(|&pi| {
                let w = std::mem::take(&mut self.pools[pi].window);
                Observation {
                    interval_s: interval,
                    requests: w.requests,
                    isl: if w.requests > 0.0 {
                        w.isl / w.requests
                    } else {
                        0.0
                    },
                    osl: if w.requests > 0.0 {
                        w.osl / w.requests
                    } else {
                        0.0
                    },
                    ttft_ms: (w.ttft_n > 0.0).then(|| w.ttft_ms / w.ttft_n),
                    itl_ms: (w.itl_n > 0.0).then(|| w.itl_ms / w.itl_n),
                    replicas: self.active(pi),
                    queued: self.pools[pi]
                        .workers
                        .iter()
                        .map(|&w| {
                            let wk = &self.workers[w as usize];
                            (wk.waiting.len() + wk.sched.num_waiting()) as f64
                        })
                        .sum(),
                }
            })
            .collect();
        let at_s = self.now as f64 / 1e9;
        let d = planner.step(at_s, &obs);
        planner.apply(&d, &mut VirtualConnector { sim: self });
        for p in &mut self.pools {
            p.divert = None;
        }
        if !self.no_divert {
            for v in &d.diversions {
                let find = |name: &str| {
                    planned
                        .iter()
                        .copied()
                        .find(|&pi| self.pools[pi].name == name)
                };
                let (Some(from), Some(to)) = (find(&v.from), find(&v.to)) else {
                    continue;
                };
                let role = self.pools[to].role;
                let Some(k) = (0..self.pools.len())
                    .filter(|&i| self.pools[i].role == role)
                    .position(|i| i == to)
                else {
                    continue;
                };
                self.pools[from].divert = Some((k, v.fraction.clamp(0.0, 1.0)));
            }
        }
        self.decisions.push(d);
        let rate = self.arrivals_in_window as f64 / ((self.now - self.last_tick) as f64 / 1e9);
        self.arrivals_in_window = 0;
        self.last_tick = self.now;
        self.timeline.push(TimelinePoint {
            at_s,
            rate,
            replicas: (0..self.pools.len()).map(|p| self.live(p)).collect(),
        });
        self.push(self.now + (interval * 1e9) as u64, Ev::Tick);
        self.planner = Some(planner);
    }

    fn finish(mut self) -> SimOutput {
        // Requests that could never be served (a pool with no worker left and no event to
        // wake it) count as failed, like a client timeout.
        for r in 0..self.rt.len() {
            if self.rt[r].phase != Phase::Done {
                self.fail(r as u32, "timeout");
            }
        }
        self.bar.finish_and_clear();
        let end = self.now;
        let mut pools: Vec<PoolSummary> = self
            .pools
            .iter()
            .map(|p| PoolSummary {
                name: p.name.clone(),
                role: p.role,
                requests: p.requests,
                min_workers: p.min_workers,
                max_workers: p.max_workers,
                diverted: p.diverted,
                gpu_hours: 0.0,
            })
            .collect();
        for w in &self.workers {
            let until = w.gone_ns.unwrap_or(end);
            pools[w.pool].gpu_hours += f64::from(self.pools[w.pool].gpus)
                * until.saturating_sub(w.added_ns) as f64
                / 3.6e12;
        }
        let gpu_hours = pools.iter().map(|p| p.gpu_hours).sum();
        let report = self.acc.finish(end as f64 / 1e9);
        SimOutput {
            report,
            pools,
            gpu_hours,
            decisions: self.decisions,
            timeline: self.timeline,
            records: self.records,
        }
    }
}

/// The `virtual` connector: workers added to a simulated pool serve after the pool's
/// `startup_secs`; removed ones are drained (starting ones first, then the least loaded), and
/// leave once nothing is in flight on them and they hold no KV for a decode.
pub struct VirtualConnector<'s, 'a> {
    sim: &'s mut Sim<'a>,
}

impl Connector for VirtualConnector<'_, '_> {
    fn replicas(&self, pool: &str) -> u32 {
        self.sim
            .pools
            .iter()
            .position(|p| p.name == pool)
            .map_or(0, |i| self.sim.live(i))
    }

    fn scale(&mut self, pool: &str, target: u32) -> Result<(), PlannerError> {
        let s = &mut *self.sim;
        let pi = s
            .pools
            .iter()
            .position(|p| p.name == pool)
            .ok_or_else(|| PlannerError::Connector(format!("no pool {pool}")))?;
        let live = s.live(pi);
        if target > live {
            for _ in live..target {
                let profile = s.pools[pi].profile.clone();
                let w = s.add_worker(pi, profile);
                let at = s.now + s.pools[pi].startup_ns;
                if at == s.now {
                    s.workers[w as usize].state = WState::Active;
                } else {
                    s.push(at, Ev::WorkerUp(w));
                }
            }
        } else if target < live {
            let mut cand: Vec<u32> = s.pools[pi]
                .workers
                .iter()
                .copied()
                .filter(|&w| {
                    matches!(
                        s.workers[w as usize].state,
                        WState::Starting | WState::Active
                    )
                })
                .collect();
            // Starting ones first (newest first), then the least loaded.
            cand.sort_by_key(|&w| {
                let wk = &s.workers[w as usize];
                (
                    wk.state != WState::Starting,
                    wk.in_req,
                    wk.in_tok,
                    Reverse(w),
                )
            });
            for &w in cand.iter().take((live - target) as usize) {
                if s.workers[w as usize].state == WState::Starting {
                    s.gone(w);
                } else {
                    s.workers[w as usize].state = WState::Draining;
                    s.maybe_gone(w);
                }
            }
        }
        let n = s.live(pi);
        let p = &mut s.pools[pi];
        p.min_workers = p.min_workers.min(n);
        p.max_workers = p.max_workers.max(n);
        Ok(())
    }
}
