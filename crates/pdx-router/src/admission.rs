//! Admission shaping on the request path: [`pdx_router_core::admission`] decides, this module waits and
//! answers. A request for a pool with a TTFT target takes a [`Permit`] before its prefill (`vllm-nixl`,
//! `sglang-bootstrap`) or before it is sent (aggregated); the permit is given back with the TTFT the
//! engine took (the prefill's duration; the first token's delay on an aggregated worker), which moves
//! the pool's limit. A request whose decode pool has an ITL target takes that pool's permit first, before
//! the prefill's, and holds it until its stream ends; the stream feeds it the mean ITL of every
//! [`crate::body::DECODE_WINDOW`] token events ([`Permit::observe`]). A full queue answers 429 with
//! `Retry-After`, a wait past the request's deadline 503, both OpenAI error JSON.
//!
//! The pool's state is one mutex shared by every server thread, taken a few times per request only when
//! admission is on. A waiting request polls a flag of its own every [`WAIT_POLL`] (monoio tasks are not
//! woken across threads here), so a freed slot is taken within that delay; only requests that wait pay it.

use crate::api::{error_response, Shared};
use crate::body::RouterBody;
use crate::metrics::{AdmissionLabels, Metrics};
use crate::registry::Pool;
use crate::request::Job;
use hyper::header::HeaderValue;
use hyper::Response;
use pdx_protocol::ApiError;
use pdx_router_core::{Admission, AdmissionConfig, Cancelled, Decision, Signal, Ticket};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How often a queued request looks at its flag.
pub const WAIT_POLL: Duration = Duration::from_millis(2);

/// Metric handles of one pool, made once (so a decision costs no label allocation).
#[derive(Debug)]
struct Handles {
    admitted: Counter,
    queued: Counter,
    rejected: Counter,
    timed_out: Counter,
    limit: Gauge,
    in_flight: Gauge,
    waiting: Gauge,
    /// `pdx_admission_ewma_ttft_seconds` or, for a decode pool, `pdx_admission_ewma_tpot_seconds`.
    ewma: Gauge<f64, AtomicU64>,
}

#[derive(Debug)]
struct State {
    core: Admission,
    /// The flag of each queued request, set when its ticket is granted.
    waiters: HashMap<Ticket, Arc<AtomicBool>>,
}

/// One pool's admission state, shared by every thread.
#[derive(Debug)]
pub struct PoolAdmission {
    signal: Signal,
    target_us: u64,
    model: String,
    pool: String,
    start: Instant,
    state: Mutex<State>,
    handles: OnceLock<Handles>,
}

impl PoolAdmission {
    /// Admission of pool `pool` of `model` with `cfg`.
    pub fn new(model: &str, pool: &str, cfg: AdmissionConfig) -> Self {
        Self {
            signal: cfg.signal,
            target_us: cfg.target_us,
            model: model.into(),
            pool: pool.into(),
            start: Instant::now(),
            state: Mutex::new(State {
                core: Admission::new(cfg),
                waiters: HashMap::new(),
            }),
            handles: OnceLock::new(),
        }
    }

    fn now_us(&self) -> u64 {
        self.start.elapsed().as_micros() as u64
    }

    /// The current limit, requests in flight and requests queued (tests, metrics).
    pub fn counts(&self) -> (u32, u32, usize) {
        self.state.lock().map_or((0, 0, 0), |s| {
            (s.core.limit(), s.core.in_flight(), s.core.queued())
        })
    }

    fn handles(&self, m: &Metrics) -> &Handles {
        self.handles.get_or_init(|| {
            let outcome = |outcome: &'static str| {
                m.admission
                    .get_or_create(&AdmissionLabels {
                        model: self.model.clone(),
                        pool: self.pool.clone(),
                        outcome,
                    })
                    .clone()
            };
            let labels = crate::metrics::PoolNameLabels {
                model: self.model.clone(),
                pool: self.pool.clone(),
            };
            Handles {
                admitted: outcome("admitted"),
                queued: outcome("queued"),
                rejected: outcome("rejected"),
                timed_out: outcome("timed_out"),
                limit: m.admission_limit.get_or_create(&labels).clone(),
                in_flight: m.admission_in_flight.get_or_create(&labels).clone(),
                waiting: m.admission_queue.get_or_create(&labels).clone(),
                ewma: match self.signal {
                    Signal::Ttft => &m.admission_ewma_ttft,
                    Signal::Tpot => &m.admission_ewma_tpot,
                }
                .get_or_create(&labels)
                .clone(),
            }
        })
    }

    fn publish(h: &Handles, st: &State) {
        h.limit.set(i64::from(st.core.limit()));
        h.in_flight.set(i64::from(st.core.in_flight()));
        h.waiting.set(st.core.queued() as i64);
        if let Some(t) = st.core.ewma_s() {
            h.ewma.set(t);
        }
    }

    /// Runs `f` on the pool's state at the current time (µs), then hands free slots to waiters and publishes
    /// the gauges.
    fn update(&self, m: &Metrics, f: impl FnOnce(&mut Admission, u64)) {
        let h = self.handles(m);
        let now = self.now_us();
        let Ok(mut st) = self.state.lock() else {
            return;
        };
        f(&mut st.core, now);
        Self::grant(&mut st);
        Self::publish(h, &st);
    }

    /// Gives a slot back (with a latency sample, if any) and hands free slots to waiters.
    fn release(&self, sample_s: Option<f64>, m: &Metrics) {
        self.update(m, |core, now| core.release(sample_s, now));
    }

    fn grant(st: &mut State) {
        while let Some(t) = st.core.next_grant() {
            match st.waiters.remove(&t) {
                Some(flag) => flag.store(true, Ordering::Release),
                // A waiter cancels under this lock before it goes, so every queued ticket has a flag; if one
                // had none, its slot would be lost: give it back.
                None => st.core.release(None, 0),
            }
        }
    }
}

/// A slot of a pool's admission: given back when dropped, or with a TTFT sample by [`Permit::done`].
#[derive(Debug)]
pub struct Permit {
    adm: Arc<PoolAdmission>,
    metrics: Arc<Metrics>,
    at: Instant,
    released: bool,
}

impl Permit {
    /// When the slot was granted.
    pub fn granted_at(&self) -> Instant {
        self.at
    }

    /// Gives the slot back with a latency sample, seconds: the TTFT the engine took, or a decode stream's last ITLs.
    pub fn done(mut self, ttft_s: f64) {
        self.released = true;
        self.adm.release(Some(ttft_s), &self.metrics);
    }

    /// The pool's latency target, seconds (TTFT, or a decode pool's TPOT).
    pub fn target_s(&self) -> f64 {
        self.adm.target_us as f64 / 1e6
    }

    /// A latency sample, seconds, while the slot is held (a decode stream's mean ITL over a window of its token
    /// events): moves the pool's limit ([`pdx_router_core::Admission::observe`]) and hands out slots it frees.
    pub fn observe(&self, sample_s: f64) {
        self.adm
            .update(&self.metrics, |core, now| core.observe(sample_s, now));
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if !self.released {
            self.adm.release(None, &self.metrics);
        }
    }
}

/// Cancels a queued ticket if the waiting request goes away (its client left); a ticket granted meanwhile
/// gives its slot back.
struct Waiting<'a> {
    adm: &'a PoolAdmission,
    metrics: &'a Metrics,
    ticket: Option<Ticket>,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let Some(t) = self.ticket.take() else { return };
        let Ok(mut st) = self.adm.state.lock() else {
            return;
        };
        st.waiters.remove(&t);
        if st.core.cancel(t) == Cancelled::NotQueued {
            st.core.release(None, self.adm.now_us());
            PoolAdmission::grant(&mut st);
        }
        PoolAdmission::publish(self.adm.handles(self.metrics), &st);
    }
}

/// 429 with `Retry-After` (the pool's queue is full).
fn too_many(pool: &str, retry_after_secs: u32) -> Response<RouterBody> {
    let mut r = error_response(&ApiError::new(
        429,
        "RateLimitError",
        format!("pool {pool} is at its admission limit and its wait queue is full; retry later"),
    ));
    r.headers_mut().insert(
        hyper::header::RETRY_AFTER,
        HeaderValue::from(retry_after_secs),
    );
    r
}

/// The admission slots of a prefill → decode request, `(prefill, decode)`: the decode pool's first (a slot
/// held from before the prefill to the stream's end, so no prefill is spent on a request its decode pool
/// cannot take; streamed requests only, as their token events are what feeds that pool's limit), then the
/// prefill pool's. A request with its own TTFT target waits for both within it: the prefill pool's wait is
/// shortened by the decode pool's. A continued stream ([`Job::continuation`]) takes neither: its client's
/// stream keeps the slots it was admitted with.
///
/// Errors: the client's answer, as [`admit`].
pub(crate) async fn admit_pd(
    sh: &Shared,
    job: &Job,
    prefill: Option<&Arc<Pool>>,
    decode: Option<&Arc<Pool>>,
) -> Result<(Option<Permit>, Option<Permit>), Response<RouterBody>> {
    if job.continuation {
        return Ok((None, None));
    }
    let decode_slot = match decode.filter(|_| job.body.is_stream()) {
        Some(p) => admit(sh, p, job.ttft_ms).await?,
        None => None,
    };
    let left_ms = job
        .ttft_ms
        .map(|t| (t - job.start.elapsed().as_secs_f64() * 1e3).max(0.0));
    let permit = match prefill {
        Some(p) => admit(sh, p, left_ms).await?,
        None => None,
    };
    Ok((permit, decode_slot))
}

/// Takes a slot of `pool`'s admission for a request (`None` when the pool has none). `ttft_target_ms` is the
/// request's own target, which shortens how long it may wait.
///
/// Errors: the client's answer: 429 with `Retry-After` when the queue is full, 503 when the wait passed the
/// deadline.
pub(crate) async fn admit(
    sh: &Shared,
    pool: &Pool,
    ttft_target_ms: Option<f64>,
) -> Result<Option<Permit>, Response<RouterBody>> {
    let Some(adm) = &pool.admission else {
        return Ok(None);
    };
    let m = &sh.metrics;
    let h = adm.handles(m);
    let now = adm.now_us();
    let permit = |adm: &Arc<PoolAdmission>| Permit {
        adm: adm.clone(),
        metrics: m.clone(),
        at: Instant::now(),
        released: false,
    };
    let (ticket, flag, deadline_us) = {
        let Ok(mut st) = adm.state.lock() else {
            return Ok(None);
        };
        let own = ttft_target_ms.map(|t| (t * 1e3) as u64);
        let deadline_us = st.core.deadline(now, own);
        let d = st.core.request(now, deadline_us);
        let out = match d {
            Decision::Admit => {
                h.admitted.inc();
                Ok(None)
            }
            Decision::Reject { retry_after_secs } => {
                h.rejected.inc();
                Err(retry_after_secs)
            }
            Decision::Queued(t) => {
                h.queued.inc();
                let flag = Arc::new(AtomicBool::new(false));
                st.waiters.insert(t, flag.clone());
                Ok(Some((t, flag)))
            }
        };
        PoolAdmission::publish(h, &st);
        match out {
            Ok(None) => return Ok(Some(permit(adm))),
            Err(secs) => return Err(too_many(&pool.name, secs)),
            Ok(Some((t, flag))) => (t, flag, deadline_us),
        }
    };
    let mut waiting = Waiting {
        adm,
        metrics: m,
        ticket: Some(ticket),
    };
    loop {
        if flag.load(Ordering::Acquire) {
            waiting.ticket = None;
            h.admitted.inc();
            return Ok(Some(permit(adm)));
        }
        if adm.now_us() >= deadline_us {
            let Ok(mut st) = adm.state.lock() else {
                return Ok(None);
            };
            waiting.ticket = None;
            st.waiters.remove(&ticket);
            if st.core.cancel(ticket) == Cancelled::NotQueued {
                // Granted just now: the slot is this request's.
                drop(st);
                h.admitted.inc();
                return Ok(Some(permit(adm)));
            }
            PoolAdmission::publish(h, &st);
            h.timed_out.inc();
            let over = match adm.signal {
                Signal::Ttft => "TTFT",
                Signal::Tpot => "ITL",
            };
            return Err(error_response(&ApiError::unavailable(format!(
                "waited past the deadline for admission to pool {} ({over} over its target)",
                pool.name
            ))));
        }
        monoio::time::sleep(WAIT_POLL).await;
    }
}
