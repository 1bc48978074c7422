//! `pdx serve`: pdx's disaggregated prefill/decode router.
//!
//! Thread per core: each server thread runs its own monoio runtime (io_uring, or epoll where
//! io_uring is unavailable: monoio's `FusionDriver`) with its own `SO_REUSEPORT` listener,
//! HTTP/1.1 server connections ([`server`]) and its own keep-alive upstream connection pool
//! ([`upstream`]), both on monoio's native io_uring operations (owned buffers, a read in flight per
//! connection, vectored writes of the frames' own `Bytes`; `sock`) with pdx's own HTTP/1.1 codec
//! (`httparse` for heads, [`h1`] for body framing); hyper provides the `http`/`Body` types. Threads share only the registry snapshot
//! (`arc-swap`), per-worker atomics and the metrics. Routing decisions come from the sans-IO
//! [`pdx_router_core`]. See `docs/router.md`.
#![forbid(unsafe_code)]

pub mod admission;
pub mod api;
pub mod body;
pub mod config;
pub mod discovery;
pub mod divert;
pub mod error;
pub mod front;
pub mod front_auth;
#[doc(hidden)]
pub mod fuzzing;
pub mod h1;
pub mod ksana;
pub mod kv_events;
pub mod metrics;
pub mod migrate;
pub mod orchestrate;
pub mod registry;
pub mod request;
pub mod server;
pub mod shutdown;
mod sock;
pub mod telemetry;
pub mod tuning;
pub mod upstream;
pub mod zmtp;

pub use config::{Config, ServeArgs};
pub use error::RouterError;

use api::Shared;
use std::cell::Cell;
use std::future::Future;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A running router.
#[derive(Debug)]
pub struct RouterServer {
    /// Bound address.
    pub addr: SocketAddr,
    /// Shared state (registry, metrics; used by tests).
    pub shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
    /// A second handle on each server thread's listening socket, to shut it down from here.
    listeners: Vec<std::net::TcpListener>,
    /// The discovery watcher (`--discovery`), stopped with the router.
    discovery: Option<discovery::Running>,
}

impl RouterServer {
    /// Blocks until the server threads end (after a [`RouterServer::shutdown`] from elsewhere, or never).
    pub fn wait(mut self) {
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }

    /// Graceful shutdown (see [`shutdown`]): stops accepting, lets requests in flight finish for at most
    /// `timeout`, then ends the server threads and returns. Returns true when every request finished in time.
    pub fn shutdown(mut self, timeout: Duration) -> bool {
        self.shared.drain.begin(timeout);
        for l in &self.listeners {
            // A listening socket shut down for reading fails the pending accept at once (EINVAL) and refuses
            // new connections; the accept loop then sees the drain and stops.
            let _ = socket2::SockRef::from(l).shutdown(std::net::Shutdown::Read);
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        let cut_short = self.shared.drain.was_cut_short();
        if cut_short {
            tracing::warn!("shutdown deadline passed with requests in flight: they were dropped");
        }
        !cut_short
    }
}

impl Drop for RouterServer {
    fn drop(&mut self) {
        // Stops the control loop and the discovery watcher; server threads end with the process.
        self.stop.store(true, Ordering::Relaxed);
        self.discovery.take();
    }
}

/// One `SO_REUSEPORT` listener per server thread on `addr`, refusing an address another process holds (a second
/// router on the same port would otherwise take part of this one's connections; see `pdx-listen`).
fn bind(addr: SocketAddr, threads: usize) -> Result<Vec<std::net::TcpListener>, RouterError> {
    let listeners = pdx_listen::bind_set(addr, threads, 4096)?;
    for l in &listeners {
        // Accepted sockets inherit TCP_NODELAY from the listener.
        socket2::SockRef::from(l).set_nodelay(true)?;
    }
    Ok(listeners)
}

/// The runtime of every router thread.
pub(crate) type Runtime = monoio::FusionRuntime<
    monoio::time::TimeDriver<monoio::IoUringDriver>,
    monoio::time::TimeDriver<monoio::LegacyDriver>,
>;

/// Which I/O path a router runtime runs: `"io_uring native"` (monoio's io_uring driver: every socket operation
/// is an io_uring submission) or `"legacy epoll fallback"` (io_uring is unavailable, disabled by
/// `kernel.io_uring_disabled`, or refused by a seccomp profile; or `MONOIO_FORCE_LEGACY_DRIVER=1`: the same
/// operations run as readiness waits and non-blocking calls).
pub(crate) fn io_path(rt: &Runtime) -> &'static str {
    match rt {
        monoio::FusionRuntime::Uring(_) => "io_uring native",
        monoio::FusionRuntime::Legacy(_) => "legacy epoll fallback",
    }
}

/// A router thread's runtime, on the thread that runs it.
///
/// The io_uring is set up for one thread that does all its I/O (`IORING_SETUP_SINGLE_ISSUER`) and that
/// takes its completions when it waits for them (`IORING_SETUP_DEFER_TASKRUN`, `IORING_SETUP_COOP_TASKRUN`):
/// the kernel then never interrupts the thread (an inter-processor interrupt and a kernel entry) to post a
/// completion while it runs, which is what a socket that gets data from another core costs by default; the
/// completions of a loop turn are taken together when it parks. Kernels before 6.1 refuse these flags: the
/// ring is then set up without them, and where io_uring cannot be set up at all, monoio's legacy epoll driver
/// runs (see [`io_path`]).
pub(crate) fn runtime() -> std::io::Result<Runtime> {
    let mut urb = io_uring::IoUring::builder();
    urb.setup_single_issuer()
        .setup_coop_taskrun()
        .setup_defer_taskrun();
    let tuned = monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
        .uring_builder(urb)
        .enable_timer()
        .build();
    match tuned {
        Ok(rt) => Ok(rt),
        Err(e) => {
            tracing::info!(error = %e, "io_uring refused single-issuer deferred task work: a default ring");
            match monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
                .enable_timer()
                .build()
            {
                Ok(rt) => Ok(rt),
                Err(e) => {
                    tracing::info!(error = %e, "no io_uring: the legacy epoll driver");
                    Ok(monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
                        .enable_timer()
                        .build()?
                        .into())
                }
            }
        }
    }
}

/// Starts the router in background threads and returns once it listens.
///
/// Errors: [`RouterError::Config`]/[`RouterError::Core`] for a bad configuration,
/// [`RouterError::Listen`] when another process holds the address or it cannot be bound, [`RouterError::Io`] when a
/// runtime cannot start.
pub fn start(args: ServeArgs) -> Result<RouterServer, RouterError> {
    let cfg = Config::from_args(&args)?;
    front::check_topology(&cfg)?;
    let ip: std::net::IpAddr = cfg
        .host
        .parse()
        .map_err(|e| RouterError::Config(format!("bad host {}: {e}", cfg.host)))?;
    let listeners = bind(SocketAddr::new(ip, cfg.port), cfg.threads)?;
    let addr = listeners[0].local_addr()?;
    let listener_handles = listeners
        .iter()
        .map(std::net::TcpListener::try_clone)
        .collect::<Result<Vec<_>, _>>()?;
    let registry = registry::Registry::new(&cfg)?;
    let models = api::models::Catalog::new(&registry, &cfg.api_keys);
    let metrics = Arc::new(metrics::Metrics::new());
    let ksana = match &cfg.ksana {
        Some(k) => Some(ksana::Ksana::start(
            k.clone(),
            registry.clone(),
            metrics.clone(),
        )?),
        None => None,
    };
    let write_through = discovery::write_through(cfg.discovery.as_ref());
    let running = match &cfg.discovery {
        Some(spec) => Some(discovery::start(
            spec,
            registry.clone(),
            write_through.clone(),
            cfg.max_workers,
        )?),
        None => None,
    };
    let shared = Arc::new(Shared {
        cfg,
        registry,
        metrics,
        drain: shutdown::Drain::default(),
        models,
        migration_budgets: Default::default(),
        ksana,
        write_through,
    });
    let stop = Arc::new(AtomicBool::new(false));
    // The KV-event subscriber (off the data path; idle while no worker publishes events), stopped with the
    // control loop.
    kv_events::spawn(
        shared.registry.clone(),
        shared.metrics.clone(),
        stop.clone(),
    )?;
    let mut threads = Vec::new();
    for (i, l) in listeners.into_iter().enumerate() {
        let sh = shared.clone();
        threads.push(
            std::thread::Builder::new()
                .name(format!("pdx-router-{i}"))
                .spawn(move || {
                    let mut rt = match runtime() {
                        Ok(rt) => rt,
                        Err(e) => {
                            tracing::error!(error = %e, "cannot start runtime");
                            return;
                        }
                    };
                    if i == 0 {
                        tracing::info!(io = io_path(&rt), "router I/O path");
                    }
                    rt.block_on(serve(l, sh));
                })?,
        );
    }
    {
        let sh = shared.clone();
        let stop = stop.clone();
        std::thread::Builder::new()
            .name("pdx-router-ctl".into())
            .spawn(move || {
                if let Ok(mut rt) = runtime() {
                    rt.block_on(control(sh, stop));
                }
            })?;
    }
    telemetry::spawn(shared.clone(), stop.clone())?;
    if let Some(w) = open_admin_warning(&shared.cfg, ip) {
        tracing::warn!(%addr, "{w}");
    }
    tracing::info!(
        threads = shared.cfg.threads,
        "pdx serve listening on http://{addr}"
    );
    Ok(RouterServer {
        addr,
        shared,
        stop,
        threads,
        listeners: listener_handles,
        discovery: running,
    })
}

/// The warning `pdx serve` logs at start when its admin API is open to more than this host: it listens
/// beyond loopback, accepts registrations, and has no admin token; or, under `--orchestration ksana`, it
/// listens beyond loopback with no `--worker-allow-cidr` (KsanaLLM's node API has no credentials).
pub fn open_admin_warning(cfg: &Config, ip: std::net::IpAddr) -> Option<&'static str> {
    if cfg.ksana.as_ref().is_some_and(|k| k.allow.is_empty()) && !ip.is_loopback() {
        return Some(
            "pdx serve --orchestration ksana listens beyond loopback without --worker-allow-cidr: KsanaLLM's \
             node API takes no credentials (as KsanaLLM's own router), so anyone who reaches it can register a \
             node and receive user traffic; set --worker-allow-cidr to the nodes' network",
        );
    }
    (cfg.admin_token.is_none() && cfg.registration && !ip.is_loopback()).then_some(
        "pdx serve listens beyond loopback without --admin-token: anyone who reaches it can register workers \
         (and receive user traffic), list them and drain them; set --admin-token (and --worker-allow-cidr), \
         or registration = false in the file",
    )
}

/// Runs `pdx serve` until the process is killed.
///
/// Errors: as [`start`].
pub fn run(args: ServeArgs) -> Result<(), RouterError> {
    serve_until_signal(start(args)?)
}

/// Serves with a started router until SIGTERM/SIGINT, then drains it (a second signal ends
/// the process at once); what [`run`] does after [`start`], for callers that start other
/// things beside the router (`pdx serve --planner`).
///
/// Errors: [`RouterError::Io`] when the signal handler cannot be installed.
pub fn serve_until_signal(server: RouterServer) -> Result<(), RouterError> {
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    ctrlc::set_handler(move || {
        let _ = tx.send(());
    })
    .map_err(|e| RouterError::Io(std::io::Error::other(e)))?;
    // SIGTERM/SIGINT: drain; a second one ends the process at once.
    let _ = rx.recv();
    let timeout = server.shared.cfg.shutdown_timeout;
    tracing::info!(
        requests = server.shared.drain.active_requests(),
        timeout_secs = timeout.as_secs_f64(),
        "shutting down: draining requests in flight"
    );
    std::thread::spawn(move || {
        if rx.recv().is_ok() {
            tracing::warn!("second signal: exiting without waiting");
            std::process::exit(130);
        }
    });
    if server.shutdown(timeout) {
        tracing::info!("drained; exiting");
    }
    Ok(())
}

async fn serve(l: std::net::TcpListener, sh: Arc<Shared>) {
    let l = match monoio::net::TcpListener::from_std(l) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "listener");
            return;
        }
    };
    orchestrate::handoff::set_live(true);
    // Idle upstream connections that are too old or closed by their server are closed about once a second.
    let serving = Rc::new(Cell::new(true));
    {
        let serving = serving.clone();
        monoio::spawn(async move {
            while serving.get() {
                monoio::time::sleep(Duration::from_secs(1)).await;
                upstream::prune();
            }
        });
    }
    // Connections open on this thread, so a drain knows when this thread is done, and the switch that ends
    // those left at the drain deadline.
    let open = Rc::new(Cell::new(0usize));
    let kill = Rc::new(shutdown::KillSwitch::default());
    loop {
        let (s, _) = match l.accept().await {
            Ok(x) => x,
            Err(_) if sh.drain.is_draining() => break,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                monoio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        // A connection accepted as the drain starts is still served (its answer closes it).
        let _ = s.set_nodelay(true);
        let sh2 = sh.clone();
        let open2 = open.clone();
        let killed = kill.killed();
        open.set(open.get() + 1);
        monoio::spawn(async move {
            let mut conn = std::pin::pin!(server::serve_conn(s, sh2));
            let mut killed = std::pin::pin!(killed);
            // The connection ends by itself, or is dropped (with its sockets) at the drain deadline.
            std::future::poll_fn(|cx| {
                if conn.as_mut().poll(cx).is_ready() || killed.as_mut().poll(cx).is_ready() {
                    std::task::Poll::Ready(())
                } else {
                    std::task::Poll::Pending
                }
            })
            .await;
            open2.set(open2.get() - 1);
        });
        if sh.drain.is_draining() {
            break;
        }
    }
    drop(l);
    // Draining: connections end after their current request (idle ones within IDLE_DRAIN_CHECK).
    while open.get() > 0 && !sh.drain.past_deadline() {
        monoio::time::sleep(shutdown::DRAIN_POLL).await;
    }
    if open.get() > 0 {
        // Deadline: drop what is left, so clients and engines see their connections close.
        sh.drain.note_deadline();
        kill.kill();
        for _ in 0..50 {
            if open.get() == 0 {
                break;
            }
            monoio::time::sleep(shutdown::DRAIN_POLL).await;
        }
    }
    serving.set(false);
    orchestrate::handoff::set_live(false);
}

/// A worker that is down, or whose breaker is open, is checked this often (at most every health-check
/// interval): a worker that comes back serves again within it.
pub const RECHECK: Duration = Duration::from_millis(500);

/// Control loop: heartbeat expiry (registered workers; KsanaLLM nodes, [`ksana::tick_interval`]) and drain
/// removal (every 100 ms; the metric series of removed workers
/// and pools are deleted), worker gauges, and active `GET /health` checks, each in a task of its own so a
/// worker that does not answer delays no other check (every interval; every [`RECHECK`] while a worker is
/// down or its breaker open), and the workers' `GET /v1/models` ([`models::refresh`], in a task of its own).
async fn control(sh: Arc<Shared>, stop: Arc<AtomicBool>) {
    let refreshing = Rc::new(Cell::new(false));
    let mut ksana_tick = std::time::Instant::now();
    while !stop.load(Ordering::Relaxed) {
        // KsanaLLM heartbeat expiry (on the registry's own thread; this only asks for it).
        if let Some(k) = &sh.ksana {
            if ksana_tick.elapsed() >= ksana::tick_interval(&k.cfg) {
                ksana_tick = std::time::Instant::now();
                k.tick();
            }
        }
        let swept = sh.registry.sweep();
        for w in &swept.workers {
            sh.metrics.remove_worker(w);
        }
        for (model, role, pool) in swept.pools {
            sh.metrics.remove_pool(&model, &pool);
            sh.metrics.pool_choices.remove(&metrics::PoolLabels {
                model: model.into(),
                role: role.as_str(),
                pool: pool.into(),
            });
        }
        let now = sh.registry.now_us();
        sh.metrics.worker_state.clear();
        for w in sh.registry.workers() {
            sh.metrics
                .worker_state
                .get_or_create(&metrics::WorkerStateLabels {
                    worker: w.url.clone(),
                    role: w.role.as_str(),
                    pool: w.pool.clone(),
                    state: w.state(now),
                })
                .set(1);
            let label = metrics::WorkerLabel {
                worker: w.url.clone(),
            };
            sh.metrics
                .worker_in_flight
                .get_or_create(&label)
                .set(w.in_flight.load(Ordering::Relaxed) as i64);
            if w.role == pdx_protocol::Role::Prefill {
                sh.metrics
                    .worker_kv_pending
                    .get_or_create(&label)
                    .set(w.kv_pending.load(Ordering::Relaxed) as i64);
            }
            if let Some(every) = sh.cfg.health_interval {
                let interval_us = every.as_micros() as u64;
                if w.start_check(now, interval_us, RECHECK.as_micros() as u64) {
                    let timeout = every.min(Duration::from_secs(2));
                    monoio::spawn(async move {
                        let ok = upstream::health(&w.authority, timeout).await;
                        w.on_check(ok);
                    });
                }
            }
        }
        // The workers' own model lists, due ones only (`models` keeps the interval), off this loop: a worker
        // that does not answer must not hold back heartbeat expiry or health checks.
        if !refreshing.get() {
            refreshing.set(true);
            let (sh, refreshing) = (sh.clone(), refreshing.clone());
            monoio::spawn(async move {
                api::models::refresh(&sh).await;
                refreshing.set(false);
            });
        }
        monoio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn an_open_admin_api_beyond_loopback_is_warned_about() {
        let cfg = |flags: &[&str]| {
            Config::from_args(
                &ServeArgs::try_parse_from(
                    std::iter::once("pdx-serve").chain(flags.iter().copied()),
                )
                .unwrap(),
            )
            .unwrap()
        };
        let any: std::net::IpAddr = "0.0.0.0".parse().unwrap();
        let lo: std::net::IpAddr = "127.0.0.1".parse().unwrap();
        let w = open_admin_warning(&cfg(&[]), any).expect("warned");
        assert!(w.contains("--admin-token"), "{w}");
        assert!(open_admin_warning(&cfg(&[]), "::".parse().unwrap()).is_some());
        assert!(open_admin_warning(&cfg(&[]), lo).is_none());
        assert!(open_admin_warning(&cfg(&["--admin-token", "t"]), any).is_none());
        // KsanaLLM's node API has no credentials: only an allow-list keeps strangers out.
        let k = ["--orchestration", "ksana", "--admin-token", "t"];
        let w = open_admin_warning(&cfg(&k), any).expect("warned");
        assert!(w.contains("--worker-allow-cidr"), "{w}");
        assert!(open_admin_warning(&cfg(&k), lo).is_none());
        assert!(open_admin_warning(
            &cfg(&[&k[..], &["--worker-allow-cidr", "10.0.0.0/8"]].concat()),
            any
        )
        .is_none());
    }
}
