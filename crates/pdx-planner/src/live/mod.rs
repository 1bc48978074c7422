//! `pdx plan`: the planner against a live `pdx serve`.
//!
//! Every adjustment interval the [`Collector`] reads the router's registration API
//! (`GET /v1/workers`: pools, workers, their state and in-flight requests) and `/metrics`
//! (`pdx_pool_choices_total{role,pool}`: requests routed to each pool), and each worker's
//! vLLM-named `/metrics` (`vllm:prompt_tokens_total`, `vllm:generation_tokens_total`,
//! `vllm:request_success_total`, `vllm:time_to_first_token_seconds`,
//! `vllm:inter_token_latency_seconds`, `vllm:num_requests_waiting`), and turns the counters'
//! increase over the interval into one [`Observation`] per planned pool: requests from the
//! router, ISL and OSL per finished request, TTFT (the prefill engines' own, for prefill and
//! aggregated pools) and ITL (decode and aggregated pools), waiting requests. The
//! [`crate::Planner`] decides; the [`LocalConnector`] starts and stops `pdx mock` workers.
//! Decisions and their inputs are written one JSON object per interval.

pub mod export;
pub mod http;
pub mod prom;

use crate::{Connector, Observation, PlannerError, PoolPlan, PoolRole};
use serde::Deserialize;
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Time limit of one HTTP exchange.
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(5);

/// A worker as `GET /v1/workers` lists it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct WorkerInfo {
    /// Its URL.
    pub url: String,
    /// `prefill`, `decode` or `aggregated`.
    pub role: String,
    /// Pool name.
    pub pool: String,
    /// `healthy`, `unhealthy`, `draining`, `open`, `half_open`.
    pub state: String,
    /// Requests the router has in flight on it.
    #[serde(default)]
    pub in_flight: u64,
}

#[derive(Deserialize)]
struct WorkerList {
    workers: Vec<WorkerInfo>,
}

/// The router's workers (`GET /v1/workers`), at most 100,000.
///
/// Errors: [`PlannerError::Http`] when the router does not answer 200 with the list.
pub fn list_workers(router: &str) -> Result<Vec<WorkerInfo>, PlannerError> {
    let url = format!("{}/v1/workers", router.trim_end_matches('/'));
    let token = http::admin_token();
    let (status, body) = http::request_with("GET", &url, None, token.as_deref(), HTTP_TIMEOUT)?;
    if status != 200 {
        return Err(PlannerError::Http {
            url,
            why: format!("status {status}"),
        });
    }
    let l: WorkerList = serde_json::from_slice(&body).map_err(|e| PlannerError::Http {
        url: url.clone(),
        why: format!("bad worker list: {e}"),
    })?;
    if l.workers.len() > 100_000 {
        return Err(PlannerError::Http {
            url,
            why: "too many workers".into(),
        });
    }
    Ok(l.workers)
}

/// The samples of `url`'s `/metrics`.
///
/// Errors: [`PlannerError::Http`].
pub fn metrics(base: &str) -> Result<Vec<prom::Sample>, PlannerError> {
    let url = format!("{}/metrics", base.trim_end_matches('/'));
    let (status, body) = http::request("GET", &url, None, HTTP_TIMEOUT)?;
    if status != 200 {
        return Err(PlannerError::Http {
            url,
            why: format!("status {status}"),
        });
    }
    Ok(prom::parse(&String::from_utf8_lossy(&body)))
}

/// Cumulative counters of one worker.
#[derive(Debug, Clone, Copy, Default)]
struct Counters {
    prompt: f64,
    generated: f64,
    finished: f64,
    ttft_sum: f64,
    ttft_n: f64,
    itl_sum: f64,
    itl_n: f64,
    waiting: f64,
}

impl Counters {
    fn read(s: &[prom::Sample]) -> Self {
        let g = |n: &str| prom::sum(s, n, &[]);
        Self {
            prompt: g("vllm:prompt_tokens_total"),
            generated: g("vllm:generation_tokens_total"),
            finished: g("vllm:request_success_total"),
            ttft_sum: g("vllm:time_to_first_token_seconds_sum"),
            ttft_n: g("vllm:time_to_first_token_seconds_count"),
            itl_sum: g("vllm:inter_token_latency_seconds_sum"),
            itl_n: g("vllm:inter_token_latency_seconds_count"),
            waiting: g("vllm:num_requests_waiting"),
        }
    }

    /// The increase since `prev` (a restarted worker's counters count from 0).
    fn since(&self, prev: &Counters) -> Counters {
        let d = |a: f64, b: f64| if a >= b { a - b } else { a };
        Counters {
            prompt: d(self.prompt, prev.prompt),
            generated: d(self.generated, prev.generated),
            finished: d(self.finished, prev.finished),
            ttft_sum: d(self.ttft_sum, prev.ttft_sum),
            ttft_n: d(self.ttft_n, prev.ttft_n),
            itl_sum: d(self.itl_sum, prev.itl_sum),
            itl_n: d(self.itl_n, prev.itl_n),
            waiting: self.waiting,
        }
    }
}

/// Reads the router and its workers once per interval; keeps the counters' previous values.
#[derive(Debug)]
pub struct Collector {
    router: String,
    choices: HashMap<(String, String), f64>,
    workers: HashMap<String, Counters>,
    last: Option<Instant>,
}

/// Requests offered to pool `pool` of `role` so far, from the router's metrics: the requests it routed
/// there (`pdx_pool_choices_total`), plus those the planner's diversions sent elsewhere, less those they
/// brought in (`pdx_planner_diverted_total{role,from,to}`). The grid's choice is the pool's load, as in
/// `pdx sim`: a capped pool keeps asking for what it needs while its excess is diverted.
pub fn offered(router_metrics: &[prom::Sample], role: &str, pool: &str) -> f64 {
    let routed = prom::sum(
        router_metrics,
        "pdx_pool_choices_total",
        &[("role", role), ("pool", pool)],
    );
    let d = |side: &str| {
        prom::sum(
            router_metrics,
            "pdx_planner_diverted_total",
            &[("role", role), (side, pool)],
        )
    };
    (routed + d("from") - d("to")).max(0.0)
}

fn role_name(r: PoolRole) -> &'static str {
    match r {
        PoolRole::Prefill => "prefill",
        PoolRole::Decode => "decode",
        PoolRole::Aggregated => "aggregated",
    }
}

impl Collector {
    /// A collector for the router at `router` (`http://host:port`).
    pub fn new(router: &str) -> Self {
        Self {
            router: router.trim_end_matches('/').to_string(),
            choices: HashMap::new(),
            workers: HashMap::new(),
            last: None,
        }
    }

    /// One observation per pool of `pools` over the time since the previous call (the first
    /// call only takes the baseline and returns observations with `interval_s = 0`).
    /// A worker whose `/metrics` cannot be read is left out of this interval.
    ///
    /// Errors: [`PlannerError::Http`] when the router cannot be read.
    pub fn collect(&mut self, pools: &[PoolPlan]) -> Result<Vec<Observation>, PlannerError> {
        let now = Instant::now();
        let interval_s = self
            .last
            .map_or(0.0, |t| now.duration_since(t).as_secs_f64());
        self.last = Some(now);
        let workers = list_workers(&self.router)?;
        let rm = metrics(&self.router)?;
        let mut per_worker: HashMap<String, Counters> = HashMap::new();
        for w in &workers {
            let Ok(s) = metrics(&w.url) else { continue };
            let c = Counters::read(&s);
            let prev = self.workers.get(&w.url).copied().unwrap_or_default();
            per_worker.insert(w.url.clone(), c.since(&prev));
            self.workers.insert(w.url.clone(), c);
        }
        self.workers
            .retain(|u, _| workers.iter().any(|w| &w.url == u));
        let mut out = Vec::new();
        let mut decode_osl = (0.0, 0.0);
        for p in pools {
            let role = role_name(p.role);
            let ours: Vec<&WorkerInfo> = workers
                .iter()
                .filter(|w| w.pool == p.name && w.role == role)
                .collect();
            let mut sum = Counters::default();
            for w in &ours {
                if let Some(c) = per_worker.get(&w.url) {
                    sum.prompt += c.prompt;
                    sum.generated += c.generated;
                    sum.finished += c.finished;
                    sum.ttft_sum += c.ttft_sum;
                    sum.ttft_n += c.ttft_n;
                    sum.itl_sum += c.itl_sum;
                    sum.itl_n += c.itl_n;
                    sum.waiting += c.waiting;
                }
            }
            let key = (role.to_string(), p.name.clone());
            let total = offered(&rm, role, &p.name);
            let prev = self.choices.insert(key, total).unwrap_or(total);
            let routed = if total >= prev { total - prev } else { total };
            let per = |x: f64| {
                if sum.finished > 0.0 {
                    x / sum.finished
                } else {
                    0.0
                }
            };
            if p.role != PoolRole::Prefill {
                decode_osl.0 += sum.generated;
                decode_osl.1 += sum.finished;
            }
            out.push(Observation {
                interval_s,
                requests: if interval_s > 0.0 { routed } else { 0.0 },
                isl: per(sum.prompt),
                osl: per(sum.generated),
                ttft_ms: (p.role != PoolRole::Decode && sum.ttft_n > 0.0)
                    .then(|| sum.ttft_sum / sum.ttft_n * 1e3),
                itl_ms: (p.role != PoolRole::Prefill && sum.itl_n > 0.0)
                    .then(|| sum.itl_sum / sum.itl_n * 1e3),
                replicas: ours.iter().filter(|w| w.state != "draining").count() as u32,
                queued: sum.waiting,
            });
        }
        // A prefill engine generates one token per request: take the OSL the decode pools saw.
        if decode_osl.1 > 0.0 {
            for (o, p) in out.iter_mut().zip(pools) {
                if p.role == PoolRole::Prefill {
                    o.osl = decode_osl.0 / decode_osl.1;
                }
            }
        }
        Ok(out)
    }
}

/// One pool the local connector manages.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalPool {
    /// Pool name (as in the planner).
    pub name: String,
    /// Extra `pdx mock` flags (`--profile FILE`, `--num-blocks N`, ...).
    #[serde(default)]
    pub args: Vec<String>,
}

/// Settings of the local connector.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalConfig {
    /// The `pdx` executable (default: the running one).
    #[serde(default)]
    pub pdx: Option<PathBuf>,
    /// Address the workers listen on and advertise (default 127.0.0.1).
    #[serde(default = "localhost")]
    pub host: String,
    /// Seconds between the workers' registration heartbeats (default 1).
    #[serde(default = "one_sec")]
    pub heartbeat_secs: f64,
    /// Per-pool worker flags.
    #[serde(default)]
    pub pools: Vec<LocalPool>,
}

fn localhost() -> String {
    "127.0.0.1".into()
}
fn one_sec() -> f64 {
    1.0
}

struct Child {
    pool: String,
    url: String,
    proc: std::process::Child,
    draining: bool,
}

/// The `local` connector: one `pdx mock` process per replica on this host, registered with
/// `pdx serve` by `pdx mock --register ROUTER --pool NAME --role ROLE`. Scale-down drains
/// (`DELETE /v1/workers`), and [`LocalConnector::reap`] stops a drained worker once the
/// router has nothing in flight on it and it holds no KV for a remote decode
/// (`pdx:kv_blocks_held` 0, `vllm:num_requests_running` 0). Only workers it started are
/// counted and stopped; all of them are stopped when it is dropped.
pub struct LocalConnector {
    pdx: PathBuf,
    router: String,
    model: String,
    cfg: LocalConfig,
    roles: HashMap<String, PoolRole>,
    children: Vec<Child>,
}

impl LocalConnector {
    /// A connector for the router at `router`, serving `model`; `roles` gives each planned
    /// pool's role.
    ///
    /// Errors: [`PlannerError::Connector`] when the `pdx` executable cannot be found.
    pub fn new(
        router: &str,
        model: &str,
        cfg: LocalConfig,
        roles: HashMap<String, PoolRole>,
    ) -> Result<Self, PlannerError> {
        let pdx = match &cfg.pdx {
            Some(p) => p.clone(),
            None => std::env::current_exe()
                .map_err(|e| PlannerError::Connector(format!("cannot find pdx: {e}")))?,
        };
        Ok(Self {
            pdx,
            router: router.trim_end_matches('/').to_string(),
            model: model.to_string(),
            cfg,
            roles,
            children: Vec::new(),
        })
    }

    /// URLs of the workers it runs, draining ones included, by pool.
    pub fn workers(&self) -> Vec<(String, String, bool)> {
        self.children
            .iter()
            .map(|c| (c.pool.clone(), c.url.clone(), c.draining))
            .collect()
    }

    fn spawn(&mut self, pool: &str) -> Result<(), PlannerError> {
        let role = *self
            .roles
            .get(pool)
            .ok_or_else(|| PlannerError::Connector(format!("no pool {pool}")))?;
        // A free port: bind, read, release (the worker binds it a moment later).
        let port = std::net::TcpListener::bind((self.cfg.host.as_str(), 0))
            .and_then(|l| l.local_addr())
            .map_err(|e| PlannerError::Connector(format!("no free port: {e}")))?
            .port();
        let url = format!("http://{}:{port}", self.cfg.host);
        let extra = self
            .cfg
            .pools
            .iter()
            .find(|p| p.name == pool)
            .map(|p| p.args.clone())
            .unwrap_or_default();
        let proc = std::process::Command::new(&self.pdx)
            .arg("mock")
            .args(["--role", role_name(role)])
            .args(["--host", &self.cfg.host, "--port", &port.to_string()])
            .args(["--model", &self.model, "--pool", pool])
            .args(["--register", &self.router])
            .args(["--heartbeat-secs", &self.cfg.heartbeat_secs.to_string()])
            .args(["--kv-listen", &format!("{}:0", self.cfg.host)])
            .args(&extra)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .spawn()
            .map_err(|e| {
                PlannerError::Connector(format!("cannot start {}: {e}", self.pdx.display()))
            })?;
        tracing::info!(pool, %url, pid = proc.id(), "worker started");
        self.children.push(Child {
            pool: pool.to_string(),
            url,
            proc,
            draining: false,
        });
        Ok(())
    }

    fn drain(&mut self, i: usize) -> Result<(), PlannerError> {
        let url = format!("{}/v1/workers", self.router);
        let body = serde_json::json!({ "url": self.children[i].url }).to_string();
        let token = http::admin_token();
        let (status, _) =
            http::request_with("DELETE", &url, Some(&body), token.as_deref(), HTTP_TIMEOUT)?;
        // 404: it has not registered yet (or was swept): nothing routes to it.
        if status != 200 && status != 404 {
            return Err(PlannerError::Connector(format!(
                "drain of {} answered {status}",
                self.children[i].url
            )));
        }
        self.children[i].draining = true;
        tracing::info!(url = %self.children[i].url, "worker draining");
        Ok(())
    }

    /// Stops drained workers that are idle, drains again a drained worker that re-registered,
    /// and forgets workers that exited. Call it often (every few hundred ms). Returns the URLs
    /// stopped.
    ///
    /// Errors: [`PlannerError::Http`] when the router cannot be read (nothing is stopped).
    pub fn reap(&mut self) -> Result<Vec<String>, PlannerError> {
        let listed = list_workers(&self.router)?;
        let mut stopped = Vec::new();
        let mut i = 0;
        while i < self.children.len() {
            let c = &mut self.children[i];
            if let Ok(Some(_)) = c.proc.try_wait() {
                tracing::warn!(url = %c.url, "worker exited");
                stopped.push(self.children.remove(i).url);
                continue;
            }
            if !c.draining {
                i += 1;
                continue;
            }
            let entry = listed.iter().find(|w| w.url == c.url);
            if entry.is_some_and(|w| w.state != "draining") {
                // A heartbeat registered it again after the router swept it: drain again.
                let _ = self.drain(i);
                i += 1;
                continue;
            }
            let idle_router = entry.is_none_or(|w| w.in_flight == 0);
            let idle_engine = metrics(&c.url).is_ok_and(|s| {
                prom::sum(&s, "pdx:kv_blocks_held", &[]) == 0.0
                    && prom::sum(&s, "vllm:num_requests_running", &[]) == 0.0
            });
            if idle_router && idle_engine {
                let mut c = self.children.remove(i);
                let _ = c.proc.kill();
                let _ = c.proc.wait();
                tracing::info!(url = %c.url, "worker stopped");
                stopped.push(c.url);
                continue;
            }
            i += 1;
        }
        Ok(stopped)
    }
}

impl Connector for LocalConnector {
    fn replicas(&self, pool: &str) -> u32 {
        self.children
            .iter()
            .filter(|c| c.pool == pool && !c.draining)
            .count() as u32
    }

    /// `PUT {router}/v1/planner/diversions` with this model's diversions (replace-all).
    fn divert(&mut self, diversions: &[crate::global::Diversion]) -> Result<(), PlannerError> {
        let url = format!("{}/v1/planner/diversions", self.router);
        let body = serde_json::json!({ "model": self.model, "diversions": diversions }).to_string();
        let token = http::admin_token();
        let (status, answer) =
            http::request_with("PUT", &url, Some(&body), token.as_deref(), HTTP_TIMEOUT)?;
        if status != 200 {
            return Err(PlannerError::Connector(format!(
                "the router answered {status} to the diversions: {}",
                String::from_utf8_lossy(&answer[..answer.len().min(512)])
            )));
        }
        Ok(())
    }

    fn scale(&mut self, pool: &str, target: u32) -> Result<(), PlannerError> {
        let have = self.replicas(pool);
        for _ in have..target {
            self.spawn(pool)?;
        }
        if target < have {
            // The newest first: the oldest hold the warmest prefix caches.
            let mut idx: Vec<usize> = (0..self.children.len())
                .filter(|&i| self.children[i].pool == pool && !self.children[i].draining)
                .collect();
            idx.reverse();
            for &i in idx.iter().take((have - target) as usize) {
                self.drain(i)?;
            }
        }
        Ok(())
    }
}

impl Drop for LocalConnector {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.proc.kill();
            let _ = c.proc.wait();
        }
    }
}

/// How long [`run`] goes on, and where it writes.
pub struct LiveOptions {
    /// Stop after this long (none: until `stop` is set).
    pub duration: Option<Duration>,
    /// Checked between polls; set it to stop.
    pub stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Decisions, one JSON object per line.
    pub log: Box<dyn std::io::Write + Send>,
    /// Where the last decision is published as Prometheus gauges, if anywhere.
    pub export: Option<export::Exported>,
}

/// Runs the planner against the router until `opts` says stop: brings every pool to its
/// minimum, then every interval collects, decides, applies and logs; between intervals the
/// connector reaps drained workers every 200 ms. Collection and connector errors are logged
/// and retried at the next interval.
///
/// Errors: only a failure to write the log.
pub fn run(
    mut planner: crate::Planner,
    mut collector: Collector,
    mut conn: Option<&mut LocalConnector>,
    mut opts: LiveOptions,
) -> Result<(), PlannerError> {
    let start = Instant::now();
    let pools = planner.config().pools.clone();
    let interval = Duration::from_secs_f64(planner.config().interval_secs);
    if let Some(c) = conn.as_deref_mut() {
        for p in &pools {
            if let Err(e) = c.scale(&p.name, p.min_replicas) {
                tracing::warn!(pool = %p.name, error = %e, "cannot start the minimum");
            }
        }
    }
    if let Err(e) = collector.collect(&pools) {
        tracing::warn!(error = %e, "first collection failed");
    }
    let mut next = Instant::now() + interval;
    let mut decisions = 0u64;
    let stop = |o: &LiveOptions| {
        o.stop.load(std::sync::atomic::Ordering::Relaxed)
            || o.duration.is_some_and(|d| start.elapsed() >= d)
    };
    while !stop(&opts) {
        std::thread::sleep(
            Duration::from_millis(200).min(next.saturating_duration_since(Instant::now())),
        );
        if let Some(c) = conn.as_deref_mut() {
            if let Err(e) = c.reap() {
                tracing::debug!(error = %e, "reap failed");
            }
        }
        if Instant::now() < next {
            continue;
        }
        next += interval;
        let obs = match collector.collect(&pools) {
            Ok(o) => o,
            Err(e) => {
                tracing::warn!(error = %e, "collection failed; skipping this interval");
                continue;
            }
        };
        let d = planner.step(start.elapsed().as_secs_f64(), &obs);
        if let Some(c) = conn.as_deref_mut() {
            planner.apply(&d, c);
        }
        decisions += 1;
        if let Some(x) = &opts.export {
            x.set(export::render(&d, decisions));
        }
        let line = serde_json::to_string(&d).map_err(|e| PlannerError::Connector(e.to_string()))?;
        writeln!(opts.log, "{line}")
            .and_then(|_| opts.log.flush())
            .map_err(|e| PlannerError::Connector(format!("cannot write the log: {e}")))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpListener;

    /// Answers each of `answers` to one request in turn; returns what each request carried.
    fn router(answers: &'static [&'static str]) -> (String, std::thread::JoinHandle<Vec<String>>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = format!("http://{}", l.local_addr().unwrap());
        let h = std::thread::spawn(move || {
            let mut seen = Vec::new();
            for a in answers {
                let (mut s, _) = l.accept().unwrap();
                s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                // Until the head and the Content-Length body are in.
                loop {
                    let n = s.read(&mut chunk).unwrap();
                    buf.extend_from_slice(&chunk[..n]);
                    let t = String::from_utf8_lossy(&buf).to_string();
                    if let Some(i) = t.find("\r\n\r\n") {
                        let len = t
                            .lines()
                            .find_map(|l| l.strip_prefix("Content-Length: "))
                            .and_then(|v| v.trim().parse::<usize>().ok())
                            .unwrap_or(0);
                        if buf.len() >= i + 4 + len || n == 0 {
                            break;
                        }
                    }
                    if n == 0 {
                        break;
                    }
                }
                seen.push(String::from_utf8_lossy(&buf).to_string());
                let body = "{}";
                let _ = write!(
                    s,
                    "HTTP/1.1 {a}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
            seen
        });
        (addr, h)
    }

    #[test]
    fn offered_load_counts_diverted_requests_at_their_grid_choice() {
        let m = prom::parse(concat!(
            "pdx_pool_choices_total{model=\"m\",role=\"prefill\",pool=\"a\"} 10\n",
            "pdx_pool_choices_total{model=\"m\",role=\"prefill\",pool=\"b\"} 7\n",
            "pdx_pool_choices_total{model=\"m\",role=\"decode\",pool=\"a\"} 17\n",
            "pdx_planner_diverted_total{model=\"m\",role=\"prefill\",from=\"a\",to=\"b\"} 5\n",
        ));
        assert_eq!(offered(&m, "prefill", "a"), 15.0);
        assert_eq!(offered(&m, "prefill", "b"), 2.0);
        assert_eq!(offered(&m, "decode", "a"), 17.0);
        assert_eq!(offered(&m, "decode", "b"), 0.0);
    }

    #[test]
    fn diversions_are_put_to_the_router() {
        let (addr, h) = router(&["200 OK", "400 Bad Request"]);
        let cfg: LocalConfig = serde_json::from_str("{}").unwrap();
        let mut c = LocalConnector::new(&addr, "m", cfg, HashMap::new()).unwrap();
        let d = vec![crate::global::Diversion {
            from: "p-short".into(),
            to: "p-long".into(),
            fraction: 0.25,
        }];
        c.divert(&d).unwrap();
        let e = c.divert(&[]).unwrap_err();
        assert!(e.to_string().contains("400"), "{e}");
        let seen = h.join().unwrap();
        assert!(
            seen[0].starts_with("PUT /v1/planner/diversions HTTP/1.1\r\n"),
            "{}",
            seen[0]
        );
        let body = |r: &str| -> serde_json::Value {
            serde_json::from_str(r.split("\r\n\r\n").nth(1).unwrap()).unwrap()
        };
        assert_eq!(
            body(&seen[0]),
            serde_json::json!({"model": "m", "diversions": [{"from": "p-short", "to": "p-long", "fraction": 0.25}]})
        );
        assert_eq!(
            body(&seen[1]),
            serde_json::json!({"model": "m", "diversions": []})
        );
    }
}
